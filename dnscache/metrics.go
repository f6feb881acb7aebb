package dnscache

import (
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics is a snapshot of a Cache's counters.
type Metrics struct {
	// Hits counts lookups answered from a fresh entry, positive or
	// negative (one per name: Resolve counts its MX and each host).
	Hits uint64
	// Misses counts lookups that waited for an upstream lookup.
	Misses uint64
	// Stale counts answers served past their expiry because every
	// resolver failed.
	Stale uint64
	// Prefetches counts background refreshes started.
	Prefetches uint64
	// Lookups counts upstream lookups (an MX query, or an A+AAAA pair).
	Lookups uint64
	// LookupSeconds is the total time spent in them.
	LookupSeconds float64
	// Errors counts upstream lookups that did not yield records, by kind
	// (NXDOMAIN and NODATA included). Kinds never seen are absent.
	Errors map[Kind]uint64
	// Entries is the number of cached entries.
	Entries int64
}

// Metrics returns a snapshot of the counters.
func (c *Cache) Metrics() Metrics {
	m := Metrics{
		Misses:        c.misses.Load(),
		Prefetches:    c.prefetches.Load(),
		Lookups:       c.hist.count.Load(),
		LookupSeconds: time.Duration(c.hist.sum.Load()).Seconds(),
		Entries:       c.entries.Load(),
		Errors:        make(map[Kind]uint64),
	}
	for i := range c.shards {
		m.Hits += c.shards[i].hits.Load()
		m.Stale += c.shards[i].stale.Load()
	}
	for k := range c.errs {
		if n := c.errs[k].Load(); n > 0 {
			m.Errors[Kind(k)] = n
		}
	}
	return m
}

// durationBuckets are the upper bounds (seconds) of the lookup duration
// histogram.
var durationBuckets = [...]float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

// histogram is a lock-free fixed-bucket histogram of durations.
type histogram struct {
	buckets [len(durationBuckets) + 1]atomic.Uint64 // not cumulative; the last is +Inf
	count   atomic.Uint64
	sum     atomic.Int64 // nanoseconds
}

func (h *histogram) observe(d time.Duration) {
	s := d.Seconds()
	i := 0
	for i < len(durationBuckets) && s > durationBuckets[i] {
		i++
	}
	h.buckets[i].Add(1)
	h.sum.Add(int64(d))
	h.count.Add(1)
}

// Collector returns a Prometheus collector for the cache's metrics:
//
//	hermod_dns_cache_hits_total
//	hermod_dns_cache_misses_total
//	hermod_dns_stale_total
//	hermod_dns_prefetch_total
//	hermod_dns_lookup_errors_total{kind}
//	hermod_dns_lookup_duration_seconds (histogram)
//	hermod_dns_cache_entries (gauge)
//
// Nothing is registered; the caller registers it on its own registry.
func (c *Cache) Collector() prometheus.Collector {
	return &collector{
		c:        c,
		hits:     prometheus.NewDesc("hermod_dns_cache_hits_total", "DNS lookups answered from a fresh cache entry.", nil, nil),
		misses:   prometheus.NewDesc("hermod_dns_cache_misses_total", "DNS lookups that waited for an upstream lookup.", nil, nil),
		stale:    prometheus.NewDesc("hermod_dns_stale_total", "DNS answers served past expiry because every resolver failed.", nil, nil),
		prefetch: prometheus.NewDesc("hermod_dns_prefetch_total", "Background refreshes of hot DNS entries started.", nil, nil),
		errors:   prometheus.NewDesc("hermod_dns_lookup_errors_total", "Upstream DNS lookups that yielded no records, by kind.", []string{"kind"}, nil),
		duration: prometheus.NewDesc("hermod_dns_lookup_duration_seconds", "Duration of upstream DNS lookups (MX, or A and AAAA together).", nil, nil),
		entries:  prometheus.NewDesc("hermod_dns_cache_entries", "Entries in the DNS cache.", nil, nil),
	}
}

type collector struct {
	c                                                        *Cache
	hits, misses, stale, prefetch, errors, duration, entries *prometheus.Desc
}

func (x *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{x.hits, x.misses, x.stale, x.prefetch, x.errors, x.duration, x.entries} {
		ch <- d
	}
}

func (x *collector) Collect(ch chan<- prometheus.Metric) {
	m := x.c.Metrics()
	ch <- prometheus.MustNewConstMetric(x.hits, prometheus.CounterValue, float64(m.Hits))
	ch <- prometheus.MustNewConstMetric(x.misses, prometheus.CounterValue, float64(m.Misses))
	ch <- prometheus.MustNewConstMetric(x.stale, prometheus.CounterValue, float64(m.Stale))
	ch <- prometheus.MustNewConstMetric(x.prefetch, prometheus.CounterValue, float64(m.Prefetches))
	for k := KindNXDomain; int(k) < numKinds; k++ {
		ch <- prometheus.MustNewConstMetric(x.errors, prometheus.CounterValue, float64(m.Errors[k]), k.String())
	}
	h := &x.c.hist
	buckets := make(map[float64]uint64, len(durationBuckets))
	var cum uint64
	for i, ub := range durationBuckets {
		cum += h.buckets[i].Load()
		buckets[ub] = cum
	}
	cum += h.buckets[len(durationBuckets)].Load()
	ch <- prometheus.MustNewConstHistogram(x.duration, cum, time.Duration(h.sum.Load()).Seconds(), buckets)
	ch <- prometheus.MustNewConstMetric(x.entries, prometheus.GaugeValue, float64(m.Entries))
}

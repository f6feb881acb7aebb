package engine

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// deliveryOutcomes are the fixed values of the outcome label.
var deliveryOutcomes = []string{"delivered", "deferred", "bounced", "expired"}

type schedCounters struct {
	outcomes     [4]atomic.Int64
	dsns         atomic.Int64
	overflow     atomic.Int64 // enqueues left to the spool scan
	destFull     atomic.Int64 // admissions refused by a full destination queue
	scanned      atomic.Int64 // messages admitted from the due index
	staleConns   atomic.Int64 // cached connections found closed by the server
	tlsFallbacks atomic.Int64 // opportunistic TLS handshakes failed, mail sent in clear
	requeued     atomic.Int64 // jobs put back because a destination capped connections
	activeMsgs   atomic.Int64
	ready        atomic.Int64
	conns        atomic.Int64
	busy         atomic.Int64
	idle         atomic.Int64
	latency      prometheus.Histogram
}

func (m *schedCounters) outcome(o string) {
	for i, name := range deliveryOutcomes {
		if name == o {
			m.outcomes[i].Add(1)
			return
		}
	}
}

func newLatencyHistogram() prometheus.Histogram {
	return prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "hermod_delivery_latency_seconds",
		Help:    "Time from acceptance to the remote server's 250, per delivered recipient.",
		Buckets: []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400},
	})
}

// SchedulerMetrics is a snapshot of the scheduler's counters.
type SchedulerMetrics struct {
	Outcomes        map[string]int64 // recipients by outcome
	BouncesQueued   int64            // delivery status notifications generated
	ActiveMessages  int64            // messages in the in-memory active set
	ReadyJobs       int64            // transactions waiting for a connection
	Connections     int64            // outbound connections open
	BusyConnections int64
	IdleConnections int64
	ScanAdmitted    int64 // messages admitted from the spool's due index
	Overflow        int64 // new messages left to the spool scan (active set full)
	TLSFallbacks    int64 // connections made again without TLS after a failed opportunistic handshake
}

// Metrics returns a snapshot of the counters.
func (s *Scheduler) Metrics() SchedulerMetrics {
	m := SchedulerMetrics{
		Outcomes:        map[string]int64{},
		BouncesQueued:   s.m.dsns.Load(),
		ActiveMessages:  s.m.activeMsgs.Load(),
		ReadyJobs:       s.m.ready.Load(),
		Connections:     s.m.conns.Load(),
		BusyConnections: s.m.busy.Load(),
		IdleConnections: s.m.idle.Load(),
		ScanAdmitted:    s.m.scanned.Load(),
		Overflow:        s.m.overflow.Load(),
		TLSFallbacks:    s.m.tlsFallbacks.Load(),
	}
	for i, name := range deliveryOutcomes {
		m.Outcomes[name] = s.m.outcomes[i].Load()
	}
	return m
}

var (
	descDeliveries = prometheus.NewDesc("hermod_deliveries_total", "Recipient delivery outcomes.", []string{"outcome"}, nil)
	descDSN        = prometheus.NewDesc("hermod_bounces_queued_total", "Delivery status notifications generated and queued.", nil, nil)
	descQueue      = prometheus.NewDesc("hermod_queue_size", "Queue size by state: active messages in memory, ready transactions, all messages in the spool.", []string{"state"}, nil)
	descOutConns   = prometheus.NewDesc("hermod_outbound_connections", "Outbound SMTP connections by state.", []string{"state"}, nil)
	descTLSFall    = prometheus.NewDesc("hermod_outbound_tls_fallbacks_total", "Connections made again without TLS because an opportunistic STARTTLS handshake failed.", nil, nil)
)

// Collector returns a Prometheus collector for the scheduler's metrics.
func (s *Scheduler) Collector() prometheus.Collector { return schedCollector{s} }

type schedCollector struct{ s *Scheduler }

func (c schedCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descDeliveries, descDSN, descQueue, descOutConns, descTLSFall} {
		ch <- d
	}
	c.s.m.latency.Describe(ch)
}

func (c schedCollector) Collect(ch chan<- prometheus.Metric) {
	m := c.s.Metrics()
	for _, name := range deliveryOutcomes {
		ch <- prometheus.MustNewConstMetric(descDeliveries, prometheus.CounterValue, float64(m.Outcomes[name]), name)
	}
	ch <- prometheus.MustNewConstMetric(descDSN, prometheus.CounterValue, float64(m.BouncesQueued))
	ch <- prometheus.MustNewConstMetric(descQueue, prometheus.GaugeValue, float64(m.ActiveMessages), "active")
	ch <- prometheus.MustNewConstMetric(descQueue, prometheus.GaugeValue, float64(m.ReadyJobs), "ready")
	ch <- prometheus.MustNewConstMetric(descQueue, prometheus.GaugeValue, float64(c.s.st.Stats().Messages), "spool")
	ch <- prometheus.MustNewConstMetric(descOutConns, prometheus.GaugeValue, float64(m.BusyConnections), "busy")
	ch <- prometheus.MustNewConstMetric(descOutConns, prometheus.GaugeValue, float64(m.IdleConnections), "idle")
	ch <- prometheus.MustNewConstMetric(descTLSFall, prometheus.CounterValue, float64(m.TLSFallbacks))
	c.s.m.latency.Collect(ch)
}

package spool

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Stats is a cheap summary of the store.
type Stats struct {
	// Messages is the number of queued messages: counted from the due index
	// at Open, +1 per durable Commit, -1 per durable removal.
	Messages int64
	// DiskBytes is pebble's total on-disk size (WAL, sstables, MANIFEST).
	DiskBytes uint64
	// Failed is the error that put the store into the failed state, or ""
	// (see Err).
	Failed string `json:",omitempty"`
}

// Stats returns the current Stats.
func (s *Store) Stats() Stats {
	st := Stats{Messages: s.messages.Load(), DiskBytes: s.refreshDiskBytes()}
	if err := s.failed(); err != nil {
		st.Failed = err.Error()
	}
	return st
}

// Err returns the error (wrapping ErrFailed) that put the store into the
// failed state, in which it rejects every write, or nil.
func (s *Store) Err() error { return s.failed() }

// refreshDiskBytes reads pebble's disk usage (or the last value once
// closed).
func (s *Store) refreshDiskBytes() uint64 {
	if s.enter() {
		s.diskBytes.Store(s.db.Metrics().DiskSpaceUsage())
		s.exit()
	}
	return s.diskBytes.Load()
}

// Metrics is a snapshot of the spool's counters.
type Metrics struct {
	Messages  int64  // queued messages (see Stats)
	DiskBytes uint64 // pebble's on-disk size

	Commits       uint64 // messages made durable by Commit
	CommitBatches uint64 // pebble batches written (groups of Commits and Updates)
	LazySyncs     uint64 // syncs made for lazy writes no other write synced in time
	CommitErrors  uint64 // Commit/Update/Reschedule/Delete writes that failed
	Updates       uint64 // Update calls that wrote or would write
	Removals      uint64 // messages removed (no recipient pending, or Delete)

	WALFsyncs    uint64        // syncs of WAL files: what acknowledges writes
	OtherFsyncs  uint64        // syncs of sstables, MANIFEST, directories
	FsyncErrors  uint64        // syncs that returned an error
	FsyncTime    time.Duration // total time spent in syncs
	FsyncBuckets []uint64      // sync latency histogram, non-cumulative; bounds in FsyncBounds
	FsyncBounds  []float64     // upper bounds in seconds; FsyncBuckets has one more (+Inf)
	Failed       bool          // the store is in the failed state
}

// Fsyncs returns all syncs.
func (m Metrics) Fsyncs() uint64 { return m.WALFsyncs + m.OtherFsyncs }

// Metrics returns a snapshot of the counters.
func (s *Store) Metrics() Metrics {
	m := Metrics{
		Messages:      s.messages.Load(),
		DiskBytes:     s.refreshDiskBytes(),
		Commits:       s.commits.Load(),
		CommitBatches: s.commitBatches.Load(),
		LazySyncs:     s.lazySyncs.Load(),
		CommitErrors:  s.commitErrors.Load(),
		Updates:       s.updates.Load(),
		Removals:      s.removals.Load(),
		WALFsyncs:     s.syncs.wal.Load(),
		OtherFsyncs:   s.syncs.other.Load(),
		FsyncErrors:   s.syncs.errors.Load(),
		FsyncTime:     time.Duration(s.syncs.sumNanos.Load()),
		FsyncBounds:   fsyncBuckets[:],
		FsyncBuckets:  make([]uint64, len(s.syncs.buckets)),
		Failed:        s.failed() != nil,
	}
	for i := range s.syncs.buckets {
		m.FsyncBuckets[i] = s.syncs.buckets[i].Load()
	}
	return m
}

// Collector returns a Prometheus collector for the spool's metrics. It is
// not registered anywhere; cmd/hermod registers it.
func (s *Store) Collector() prometheus.Collector { return collector{s} }

var (
	descCommits = prometheus.NewDesc("hermod_spool_commits_total",
		"Messages made durable by Commit.", nil, nil)
	descBatches = prometheus.NewDesc("hermod_spool_commit_batches_total",
		"Pebble batches written (groups of commits and updates).", nil, nil)
	descLazySyncs = prometheus.NewDesc("hermod_spool_lazy_syncs_total",
		"Syncs the spool made for delivery outcomes no other write synced within lazy_sync_delay.", nil, nil)
	descCommitErrors = prometheus.NewDesc("hermod_spool_commit_errors_total",
		"Spool writes that failed.", nil, nil)
	descUpdates = prometheus.NewDesc("hermod_spool_updates_total",
		"Recipient state updates.", nil, nil)
	descRemovals = prometheus.NewDesc("hermod_spool_removals_total",
		"Messages removed from the spool.", nil, nil)
	descFsyncs = prometheus.NewDesc("hermod_spool_fsyncs_total",
		"File syncs by file kind (wal acknowledges writes).", []string{"file"}, nil)
	descFsyncDur = prometheus.NewDesc("hermod_spool_fsync_duration_seconds",
		"Latency of file syncs.", nil, nil)
	descMessages = prometheus.NewDesc("hermod_spool_messages",
		"Queued messages.", nil, nil)
	descDiskBytes = prometheus.NewDesc("hermod_spool_disk_bytes",
		"On-disk size of the spool database.", nil, nil)
	descFreeBytes = prometheus.NewDesc("hermod_spool_filesystem_free_bytes",
		"Space available on the spool's filesystem (MAIL is refused with 452 below spool.min_free).", nil, nil)
	descFailed = prometheus.NewDesc("hermod_spool_failed",
		"1 when the spool is in the failed state and rejects writes.", nil, nil)
)

type collector struct{ s *Store }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descCommits, descBatches, descLazySyncs, descCommitErrors, descUpdates,
		descRemovals, descFsyncs, descFsyncDur, descMessages, descDiskBytes, descFreeBytes, descFailed} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	m := c.s.Metrics()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	counter(descCommits, m.Commits)
	counter(descBatches, m.CommitBatches)
	counter(descLazySyncs, m.LazySyncs)
	counter(descCommitErrors, m.CommitErrors)
	counter(descUpdates, m.Updates)
	counter(descRemovals, m.Removals)
	counter(descFsyncs, m.WALFsyncs, "wal")
	counter(descFsyncs, m.OtherFsyncs, "other")
	buckets := make(map[float64]uint64, len(m.FsyncBounds))
	var cum uint64
	for i, ub := range m.FsyncBounds {
		cum += m.FsyncBuckets[i]
		buckets[ub] = cum
	}
	cum += m.FsyncBuckets[len(m.FsyncBounds)]
	ch <- prometheus.MustNewConstHistogram(descFsyncDur, cum, m.FsyncTime.Seconds(), buckets)
	ch <- prometheus.MustNewConstMetric(descMessages, prometheus.GaugeValue, float64(m.Messages))
	ch <- prometheus.MustNewConstMetric(descDiskBytes, prometheus.GaugeValue, float64(m.DiskBytes))
	if free := c.s.FreeBytes(); free >= 0 {
		ch <- prometheus.MustNewConstMetric(descFreeBytes, prometheus.GaugeValue, float64(free))
	}
	failed := 0.0
	if m.Failed {
		failed = 1
	}
	ch <- prometheus.MustNewConstMetric(descFailed, prometheus.GaugeValue, failed)
}

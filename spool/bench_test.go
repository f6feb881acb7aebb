package spool

import (
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// committers is the number of concurrent committers in
// BenchmarkCommitParallel, like 50 SMTP sessions finishing DATA at once.
const committers = 50

func benchStore(b *testing.B, workers int) *Store {
	b.Helper()
	cfg := Config{Dir: b.TempDir(), CommitWorkers: workers}
	s, err := Open(cfg, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close() })
	return s
}

func reportSyncs(b *testing.B, s *Store, before Metrics, start time.Time, ops int) {
	m := s.Metrics()
	el := time.Since(start)
	b.ReportMetric(float64(m.WALFsyncs-before.WALFsyncs)/float64(ops), "walfsyncs/op")
	b.ReportMetric(float64(m.Fsyncs()-before.Fsyncs())/float64(ops), "fsyncs/op")
	b.ReportMetric(float64(ops)/el.Seconds(), "msgs/s")
	if n := m.CommitBatches - before.CommitBatches; n > 0 {
		b.ReportMetric(float64(ops)/float64(n), "msgs/batch")
	}
}

// BenchmarkCommitParallel commits 1 KiB messages from 50 goroutines to a
// store on disk and reports fsyncs per message.
func BenchmarkCommitParallel(b *testing.B) {
	for _, workers := range []int{1, 2, 4, 8} {
		b.Run(fmt.Sprintf("workers=%d", workers), func(b *testing.B) {
			s := benchStore(b, workers)
			body := testBody(0, 1024)
			var n atomic.Int64
			b.SetParallelism((committers + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
			b.ReportAllocs()
			before := s.Metrics()
			start := time.Now()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					i := int(n.Add(1))
					m := testMessage(i, "rcpt@example.test", "other@example.org")
					if err := s.CommitWait(m, body); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			reportSyncs(b, s, before, start, b.N)
		})
	}
}

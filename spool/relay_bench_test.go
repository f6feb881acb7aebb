package spool

import (
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// cpuTime returns the process's user+system CPU time.
func cpuTime(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkRelay is the spool's share of relaying one message, as the
// daemon does it under steady-1k: 50 goroutines each commit a 1 KiB
// message with one recipient, then record its delivery (which removes it).
// It reports the process CPU per message (cpu-µs/msg, fsyncs included),
// commit batches per message and allocations.
func BenchmarkRelay(b *testing.B) {
	s := benchStore(b, defaultCommitWorkers)
	body := testBody(0, 1024)
	var next atomic.Int64
	b.ReportAllocs()
	before := s.Metrics()
	cpu0 := cpuTime(b)
	start := time.Now()
	b.ResetTimer()
	var wg sync.WaitGroup
	for range committers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1)) - 1; i < b.N; i = int(next.Add(1)) - 1 {
				m := testMessage(i, "rcpt@example.test")
				if err := s.CommitWait(m, body); err != nil {
					b.Error(err)
					return
				}
				removed, err := s.Update(m.ID, []Recipient{{Index: 0, State: Delivered, Attempts: 1}})
				if err != nil || !removed {
					b.Errorf("Update = %v, %v", removed, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(cpuTime(b)-cpu0)/1e3/float64(b.N), "cpu-µs/msg")
	reportSyncs(b, s, before, start, b.N)
	if n := s.Stats().Messages; n != 0 {
		b.Fatalf("%d messages left", n)
	}
}

package spool

import (
	"fmt"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
	"runtime"
	"sync"
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
	if n := m.Fsyncs() - before.Fsyncs(); n > 0 {
		b.ReportMetric(float64(m.FsyncTime-before.FsyncTime)/float64(n)/1e3, "µs/fsync")
	}
	if n := m.CommitBatches - before.CommitBatches; n > 0 {
		b.ReportMetric(float64(ops)/float64(n), "msgs/batch")
	}
}

// slowSync adds a fixed latency to every sync of a WAL file, to measure
// group commit as on a disk whose fsync takes about a millisecond.
func slowSync(d time.Duration) errorfs.Injector {
	return errorfs.InjectorFunc(func(op errorfs.Op) error {
		switch op.Kind {
		case errorfs.OpFileSync, errorfs.OpFileSyncData:
			if isWAL(op.Path) {
				time.Sleep(d)
			}
		}
		return nil
	})
}

// BenchmarkCommitParallel commits 1 KiB messages (two recipients) from 50
// goroutines to a store on disk and reports WAL fsyncs per message, for
// several CommitWorkers, on the real disk and with 1 ms added to each WAL
// fsync.
func BenchmarkCommitParallel(b *testing.B) {
	for _, lat := range []time.Duration{0, time.Millisecond} {
		for _, wait := range []bool{false, true} {
			for _, workers := range []int{1, 2, 4, 8} {
				benchCommitParallel(b, lat, wait, workers)
			}
		}
	}
}

func benchCommitParallel(b *testing.B, lat time.Duration, waitApply bool, workers int) {
	mode := "async"
	if waitApply {
		mode = "wait"
	}
	b.Run(fmt.Sprintf("fsync+%v/apply=%s/workers=%d", lat, mode, workers), func(b *testing.B) {
		cfg := Config{Dir: b.TempDir(), CommitWorkers: workers}
		if lat > 0 {
			cfg.FS = errorfs.Wrap(vfs.Default, slowSync(lat))
		}
		s, err := Open(cfg, nil)
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		s.waitApply = waitApply
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

// BenchmarkUpdate measures Update from 50 goroutines: each op delivers the
// last recipient of a queued message, which removes it (a read of the
// recipient records, then a synced removal). rangedel=true removes with one
// DeleteRange instead of point SingleDeletes, to compare.
func BenchmarkUpdate(b *testing.B) {
	for _, rangeDel := range []bool{false, true} {
		b.Run(fmt.Sprintf("rangedel=%t", rangeDel), func(b *testing.B) {
			s := benchStore(b, defaultCommitWorkers)
			s.removeWithRangeDel = rangeDel
			ids := make([]ID, b.N)
			body := testBody(0, 1024)
			var wg sync.WaitGroup
			var next atomic.Int64
			for range committers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						i := int(next.Add(1)) - 1
						if i >= b.N {
							return
						}
						m := testMessage(i, "rcpt@example.test")
						if err := s.CommitWait(m, body); err != nil {
							b.Error(err)
							return
						}
						ids[i] = m.ID
					}
				}()
			}
			wg.Wait()
			next.Store(0)
			b.SetParallelism((committers + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
			b.ReportAllocs()
			before := s.Metrics()
			start := time.Now()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					id := ids[next.Add(1)-1]
					removed, err := s.Update(id, []Recipient{{Index: 0, State: Delivered, Attempts: 1}})
					if err != nil || !removed {
						b.Errorf("Update = %v, %v", removed, err)
						return
					}
				}
			})
			b.StopTimer()
			reportSyncs(b, s, before, start, b.N)
			if n := s.Stats().Messages; n != 0 {
				b.Fatalf("%d messages left", n)
			}
		})
	}
}

// parallel runs fn(i) for i in [0, n) on 50 goroutines.
func parallel(n int, fn func(i int)) {
	var wg sync.WaitGroup
	var next atomic.Int64
	for range committers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
				fn(i)
			}
		}()
	}
	wg.Wait()
}

// BenchmarkNextDueAfterChurn measures NextDue when the memtable holds the
// deleted due entries of 20,000 delivered messages below 10 live ones.
func BenchmarkNextDueAfterChurn(b *testing.B) {
	s := benchStore(b, defaultCommitWorkers)
	const churn = 20000
	ids := make([]ID, churn)
	parallel(churn, func(i int) {
		m := testMessage(i, "r@x.test")
		if err := s.CommitWait(m, nil); err != nil {
			b.Error(err)
		}
		ids[i] = m.ID
	})
	parallel(churn-10, func(i int) {
		if _, err := s.Update(ids[i], []Recipient{{Index: 0, State: Delivered}}); err != nil {
			b.Error(err)
		}
	})
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, ok := s.NextDue(); !ok {
			b.Fatal("no due entry")
		}
	}
}

// BenchmarkEncodeDecode encodes and decodes an envelope with two recipient
// records and a 1 KiB body with each codec.
func BenchmarkEncodeDecode(b *testing.B) {
	m := sampleMessage()
	m.Rcpts = m.Rcpts[:2]
	r := sampleRecipient()
	body := testBody(1, 1024)
	for _, name := range []string{CompressionS2, CompressionZstd, CompressionNone} {
		b.Run(name, func(b *testing.B) {
			c, err := newBodyCodec(name)
			if err != nil {
				b.Fatal(err)
			}
			defer c.close()
			var buf []byte
			b.ReportAllocs()
			b.SetBytes(int64(len(body)))
			for range b.N {
				buf = appendEnvelope(buf[:0], m)
				if _, _, err := decodeEnvelope(buf); err != nil {
					b.Fatal(err)
				}
				for range 2 {
					buf = appendRecipient(buf[:0], &r)
					if _, err := decodeRecipient(buf); err != nil {
						b.Fatal(err)
					}
				}
				if buf, err = c.appendBody(buf[:0], body); err != nil {
					b.Fatal(err)
				}
				if _, err := c.decodeBody(buf); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(buf)), "stored-body-bytes")
		})
	}
}

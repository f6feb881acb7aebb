package spool

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
)

// walFault injects err into operations of kind ops on WAL files while on.
type walFault struct {
	on  atomic.Bool
	ops []errorfs.OpKind
	err error
	hit atomic.Int64
}

func (f *walFault) MaybeError(op errorfs.Op) error {
	if !f.on.Load() || !isWAL(op.Path) {
		return nil
	}
	for _, k := range f.ops {
		if op.Kind == k {
			f.hit.Add(1)
			return f.err
		}
	}
	return nil
}

func (f *walFault) String() string { return "walFault" }

// TestWALFailure injects ENOSPC into WAL syncs or writes while many
// goroutines commit and update. It checks that the store never reports
// success for a write that is not durable: after the failure every
// acknowledged message is found on a crash clone (synced data only), every
// later write fails with ErrFailed, and Close returns.
func TestWALFailure(t *testing.T) {
	enospc := fmt.Errorf("injected: %w", syscall.ENOSPC)
	cases := map[string][]errorfs.OpKind{
		"sync":  {errorfs.OpFileSync, errorfs.OpFileSyncData, errorfs.OpFileSyncTo},
		"write": {errorfs.OpFileWrite, errorfs.OpFileWriteAt},
	}
	for name, ops := range cases {
		t.Run(name, func(t *testing.T) {
			mem := vfs.NewCrashableMem()
			fault := &walFault{ops: ops, err: enospc}
			cfg := memConfig(errorfs.Wrap(mem, fault))
			cfg.CommitWorkers = 4
			s := openT(t, cfg)
			s.closeTimeout = 500 * time.Millisecond

			var (
				mu     sync.Mutex
				acked  []ID
				failed int
			)
			// Phase 1: commits succeed.
			for i := range 50 {
				m := testMessage(i, "a@x.test")
				if err := s.CommitWait(m, testBody(i, 300)); err != nil {
					t.Fatalf("commit before fault: %v", err)
				}
				acked = append(acked, m.ID)
			}
			// Phase 2: turn the fault on while 20 goroutines commit.
			var wg sync.WaitGroup
			var started sync.WaitGroup
			started.Add(20)
			for g := range 20 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					started.Done()
					for i := range 20 {
						m := testMessage(g*1000+i, "b@y.test")
						err := s.CommitWait(m, testBody(i, 300))
						mu.Lock()
						if err == nil {
							acked = append(acked, m.ID)
						} else {
							failed++
							if !errors.Is(err, ErrFailed) {
								t.Errorf("commit error %v is not ErrFailed", err)
							}
						}
						mu.Unlock()
					}
				}()
			}
			started.Wait()
			fault.on.Store(true)
			wg.Wait()
			// The crash clone is taken while the fault is on: it holds only
			// what was synced before.
			clone := mem.CrashClone(vfs.CrashCloneCfg{})
			if fault.hit.Load() == 0 {
				t.Fatal("fault never hit")
			}
			if failed == 0 {
				t.Fatal("no commit failed")
			}
			if err := s.Err(); !errors.Is(err, ErrFailed) || !strings.Contains(err.Error(), "no space") {
				t.Fatalf("Err() = %v", err)
			}
			if st := s.Stats(); !strings.Contains(st.Failed, "no space") {
				t.Fatalf("Stats().Failed = %q", st.Failed)
			}
			// Every later write is refused.
			if err := s.CommitWait(testMessage(1, "c@z.test"), nil); !errors.Is(err, ErrFailed) {
				t.Fatalf("commit after failure: %v", err)
			}
			if _, err := s.Update(acked[0], []Recipient{{Index: 0, State: Delivered}}); !errors.Is(err, ErrFailed) {
				t.Fatalf("update after failure: %v", err)
			}
			if m := s.Metrics(); !m.Failed || m.CommitErrors == 0 {
				t.Fatalf("metrics: %+v", m)
			}
			done := make(chan error, 1)
			go func() { done <- s.Close() }()
			select {
			case err := <-done:
				if !errors.Is(err, ErrFailed) {
					t.Fatalf("Close = %v", err)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("Close hung")
			}

			// Everything acknowledged is on the synced state.
			s2 := openT(t, memConfig(clone))
			defer s2.Close()
			for _, id := range acked {
				if _, err := s2.Load(id); err != nil {
					t.Fatalf("acked %s lost: %v", id, err)
				}
			}
			if got := s2.Stats().Messages; got < int64(len(acked)) {
				t.Fatalf("messages = %d, acked %d", got, len(acked))
			}
			t.Logf("acked %d, failed %d, fault hits %d, pebble wedged %v", len(acked), failed, fault.hit.Load(), s.wedged.Load())
		})
	}
}

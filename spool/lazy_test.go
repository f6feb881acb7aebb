package spool

import (
	"errors"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestUpdateLazy checks the durability of UpdateLazy on crash clones (only
// synced data survives): the outcome is visible at once, is not durable
// until a sync, and becomes durable through the next synced write or,
// failing one, through the store's own sync after LazySyncDelay. Whatever
// the crash, the message is either still queued (delivered again) or
// removed: never lost, never half-written.
func TestUpdateLazy(t *testing.T) {
	tests := []struct {
		name string
		// after runs after the UpdateLazy and before the crash clone.
		after func(t *testing.T, s *Store)
		delay time.Duration
		// removed: the removal survives the crash; lazySyncs: how many
		// syncs the store made for lazy writes.
		removed   bool
		lazySyncs uint64
	}{
		{
			name:    "crash before any sync",
			after:   func(*testing.T, *Store) {},
			delay:   10 * time.Second,
			removed: false,
		},
		{
			name: "next synced write covers it",
			after: func(t *testing.T, s *Store) {
				if err := s.CommitWait(testMessage(99, "z@x.test"), testBody(99, 300)); err != nil {
					t.Fatal(err)
				}
			},
			delay:   10 * time.Second,
			removed: true,
		},
		{
			name: "synced by the store after the delay",
			after: func(t *testing.T, s *Store) {
				deadline := time.Now().Add(10 * time.Second)
				for s.Metrics().LazySyncs == 0 || s.Metrics().WALFsyncs < 2 {
					if time.Now().After(deadline) {
						t.Fatalf("no lazy sync: %+v", s.Metrics())
					}
					time.Sleep(5 * time.Millisecond)
				}
				// Give the queued sync time to complete.
				time.Sleep(50 * time.Millisecond)
			},
			delay:     20 * time.Millisecond,
			removed:   true,
			lazySyncs: 1,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			mem := vfs.NewCrashableMem()
			cfg := memConfig(mem)
			cfg.LazySyncDelay = tc.delay
			s := openT(t, cfg)
			m := testMessage(1, "a@x.test")
			if err := s.CommitWait(m, testBody(1, 500)); err != nil {
				t.Fatal(err)
			}
			syncs := s.Metrics().WALFsyncs
			removed, err := s.UpdateLazy(m.ID, []Recipient{{Index: 0, State: Delivered, Attempts: 1}})
			if err != nil || !removed {
				t.Fatalf("UpdateLazy = %v, %v", removed, err)
			}
			if _, err := s.Load(m.ID); !errors.Is(err, ErrNotFound) {
				t.Fatalf("Load after UpdateLazy: %v, want ErrNotFound", err)
			}
			if n := s.Stats().Messages; n != 0 {
				t.Fatalf("Messages = %d after the removal", n)
			}
			if got := s.Metrics().WALFsyncs; got != syncs {
				t.Fatalf("UpdateLazy synced the WAL: %d -> %d syncs", syncs, got)
			}
			tc.after(t, s)
			clone := mem.CrashClone(vfs.CrashCloneCfg{})
			if got := s.Metrics().LazySyncs; got != tc.lazySyncs {
				t.Errorf("LazySyncs = %d, want %d", got, tc.lazySyncs)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}

			c := openT(t, memConfig(clone))
			defer c.Close()
			checkInvariants(t, c)
			got, err := c.Load(m.ID)
			switch {
			case tc.removed && !errors.Is(err, ErrNotFound):
				t.Fatalf("after the crash: Load = %v, want the removal durable", err)
			case !tc.removed && err != nil:
				t.Fatalf("after the crash: the message is lost: %v", err)
			case !tc.removed && got.Rcpts[0].State != Pending:
				t.Fatalf("after the crash: recipient %v, want still pending", got.Rcpts[0].State)
			}
		})
	}
}

// TestUpdateLazyCloseSyncs checks that a clean Close makes lazy writes
// durable (pebble syncs the WAL when it closes).
func TestUpdateLazyCloseSyncs(t *testing.T) {
	mem := vfs.NewCrashableMem()
	cfg := memConfig(mem)
	cfg.LazySyncDelay = 10 * time.Second
	s := openT(t, cfg)
	m := testMessage(1, "a@x.test", "b@y.test")
	if err := s.CommitWait(m, testBody(1, 500)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateLazy(m.ID, []Recipient{{Index: 0, State: Delivered, Attempts: 1}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	c := openT(t, memConfig(mem.CrashClone(vfs.CrashCloneCfg{})))
	defer c.Close()
	got, err := c.Load(m.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Rcpts[0].State != Delivered || got.Rcpts[1].State != Pending {
		t.Fatalf("recipients after Close and crash: %v %v, want delivered and pending", got.Rcpts[0].State, got.Rcpts[1].State)
	}
}

// TestDeleteLazy checks that DeleteLazy removes at once, is undone by a
// crash before any sync, and is made durable by the next synced write.
func TestDeleteLazy(t *testing.T) {
	mem := vfs.NewCrashableMem()
	cfg := memConfig(mem)
	cfg.LazySyncDelay = 10 * time.Second
	s := openT(t, cfg)
	defer s.Close()
	a, b := testMessage(1, "a@x.test"), testMessage(2, "b@x.test")
	for _, m := range []*Message{a, b} {
		if err := s.CommitWait(m, testBody(1, 300)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.DeleteLazy(a.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(a.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Load after DeleteLazy: %v", err)
	}
	before := mem.CrashClone(vfs.CrashCloneCfg{})
	if err := s.Delete(b.ID); err != nil { // synced: covers the lazy delete
		t.Fatal(err)
	}
	after := mem.CrashClone(vfs.CrashCloneCfg{})
	for _, tc := range []struct {
		name    string
		fs      *vfs.MemFS
		aExists bool
	}{{"crash before a sync", before, true}, {"crash after a synced write", after, false}} {
		c := openT(t, memConfig(tc.fs))
		checkInvariants(t, c)
		_, err := c.Load(a.ID)
		if exists := err == nil; exists != tc.aExists {
			t.Errorf("%s: a exists = %v (%v), want %v", tc.name, exists, err, tc.aExists)
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

package spool

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestRcptCacheMatchesStore drives random Updates, Reschedules and Deletes
// (mostly served by the recipient cache) and checks after every step, and
// again after reopening without any cache, that the store holds exactly
// what a model of it says: recipient states, the message count and the due
// index.
func TestRcptCacheMatchesStore(t *testing.T) {
	for seed := range uint64(4) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			fs := vfs.NewMem()
			clock := &fakeClock{now: t0}
			cfg := memConfig(fs)
			cfg.Clock = clock.Now
			s := openT(t, cfg)
			rng := rand.New(rand.NewPCG(seed, 7))
			model := map[ID][]Recipient{}
			var ids []ID
			for i := range 40 {
				n := 1 + rng.IntN(3)
				var rcpts []string
				for k := range n {
					rcpts = append(rcpts, fmt.Sprintf("r%d@d%d.test", k, rng.IntN(3)))
				}
				m := testMessage(i, rcpts...)
				if err := s.CommitWait(m, testBody(i, 100)); err != nil {
					t.Fatal(err)
				}
				model[m.ID] = append([]Recipient(nil), m.Rcpts...)
				ids = append(ids, m.ID)
			}
			for step := range 400 {
				id := ids[rng.IntN(len(ids))]
				want, queued := model[id]
				var err error
				var removed bool
				op := rng.IntN(10)
				switch {
				case op < 7: // Update one or two recipients
					var ups []Recipient
					for _, j := range rng.Perm(max(1, len(want)))[:1+rng.IntN(max(1, len(want)))] {
						u := Recipient{Index: uint16(j), State: RcptState(rng.IntN(int(numRcptStates))), Attempts: uint32(step),
							NextAttempt: t0.Add(time.Duration(rng.IntN(3)) * time.Hour), LastReply: fmt.Sprint("reply ", step)}
						ups = append(ups, u)
					}
					removed, err = s.Update(id, ups)
					if queued {
						for _, u := range ups {
							r := &want[u.Index]
							r.State, r.Attempts, r.NextAttempt, r.LastReply = u.State, u.Attempts, u.NextAttempt, u.LastReply
						}
					}
				case op < 9:
					at := t0.Add(time.Duration(rng.IntN(5)) * time.Minute)
					err = s.Reschedule(id, at)
					if queued {
						for j := range want {
							if want[j].State == Pending {
								want[j].NextAttempt = at
							}
						}
					}
				default:
					err = s.Delete(id)
					if queued {
						for j := range want {
							if want[j].State == Pending {
								want[j].State = Expired
							}
						}
					}
				}
				if !queued {
					if !errors.Is(err, ErrNotFound) {
						t.Fatalf("step %d: on a removed message: %v", step, err)
					}
					continue
				}
				if err != nil {
					t.Fatalf("step %d: %v", step, err)
				}
				if _, pending := earliestPending(want); !pending {
					delete(model, id)
				} else if removed {
					t.Fatalf("step %d: removed with pending recipients", step)
				}
				checkModel(t, s, model, fmt.Sprint("step ", step))
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = openT(t, cfg)
			defer s.Close()
			checkModel(t, s, model, "after reopen")
		})
	}
}

// checkModel compares every queued message's recipients, the message
// count and the due index with model.
func checkModel(t *testing.T, s *Store, model map[ID][]Recipient, when string) {
	t.Helper()
	if n := s.Stats().Messages; n != int64(len(model)) {
		t.Fatalf("%s: %d messages, want %d", when, n, len(model))
	}
	for id, want := range model {
		got, err := s.Load(id)
		if err != nil {
			t.Fatalf("%s: Load %s: %v", when, id, err)
		}
		for j := range want {
			g, w := got.Rcpts[j], want[j]
			if g.State != w.State || g.Attempts != w.Attempts || !g.NextAttempt.Equal(w.NextAttempt) || g.LastReply != w.LastReply || g.Addr != w.Addr {
				t.Fatalf("%s: %s rcpt %d = %+v, want %+v", when, id, j, g, w)
			}
		}
	}
	seen := map[ID]bool{}
	err := s.Due(time.Unix(0, 1<<62), func(id ID, due time.Time) bool {
		want, ok := model[id]
		if !ok || seen[id] {
			t.Errorf("%s: due entry for %s (queued %v, seen %v)", when, id, ok, seen[id])
			return true
		}
		seen[id] = true
		if d, _ := earliestPending(want); d != dueNanos(due) {
			t.Errorf("%s: due of %s = %v, want %v", when, id, due, nanosToTime(d))
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(seen) != len(model) {
		t.Fatalf("%s: %d due entries, want %d", when, len(seen), len(model))
	}
}

// TestRcptCacheUpdateBeforeCommitDone checks that an entry whose commit is
// not yet durable is never used: Update then reads pebble.
func TestRcptCacheUpdateBeforeCommitDone(t *testing.T) {
	s := openT(t, memConfig(vfs.NewMem()))
	defer s.Close()
	m := testMessage(1, "a@x.test")
	if err := s.prepareCommit(m, nil); err != nil {
		t.Fatal(err)
	}
	e := s.rcache.add(m.ID, m.Rcpts)
	if got := s.rcache.take(m.ID); got != nil {
		t.Fatalf("take of an entry not durable = %v", got)
	}
	s.rcache.settle(m.ID, e, true) // no longer in the map: no effect
	if _, err := s.Update(m.ID, []Recipient{{Index: 0, State: Delivered}}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Update of a message never committed = %v, want ErrNotFound", err)
	}
	if n := s.rcache.n.Load(); n != 0 {
		t.Fatalf("%d cache entries left", n)
	}
}

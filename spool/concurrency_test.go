package spool

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// checkInvariants verifies the key layout of the whole store: every message
// has an envelope, a body and as many recipient records as the envelope
// says; it has a pending recipient iff it has exactly one due entry, at the
// earliest pending NextAttempt; there are no other keys; and Stats counts
// the messages. It returns the number of messages.
func checkInvariants(t *testing.T, s *Store) int {
	t.Helper()
	it, err := s.db.NewIter(&pebble.IterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	type msgState struct {
		env, body bool
		nrcpt     int
		rcpts     []Recipient
	}
	msgs := map[ID]*msgState{}
	dues := map[ID][]int64{}
	get := func(id ID) *msgState {
		if msgs[id] == nil {
			msgs[id] = &msgState{}
		}
		return msgs[id]
	}
	for ok := it.First(); ok; ok = it.Next() {
		k := it.Key()
		if due, id, ok := parseDueKey(k); ok {
			dues[id] = append(dues[id], due)
			continue
		}
		id, suffix, _, ok := parseMsgKey(k)
		if !ok {
			t.Fatalf("stray key %x", k)
		}
		st := get(id)
		switch suffix {
		case suffixEnv:
			m, n, err := decodeEnvelope(it.Value())
			if err != nil || m.ID != id {
				t.Fatalf("envelope %s: %v", id, err)
			}
			st.env, st.nrcpt = true, n
		case suffixBody:
			if _, err := s.codec.decodeBody(it.Value()); err != nil {
				t.Fatalf("body %s: %v", id, err)
			}
			st.body = true
		case suffixRcpt:
			r, err := decodeRecipient(it.Value())
			if err != nil {
				t.Fatalf("rcpt %s: %v", id, err)
			}
			st.rcpts = append(st.rcpts, r)
		}
	}
	for id, st := range msgs {
		if !st.env || !st.body || len(st.rcpts) != st.nrcpt {
			t.Fatalf("message %s incomplete: %+v", id, st)
		}
		due, pending := earliestPending(st.rcpts)
		if !pending {
			t.Fatalf("message %s has no pending recipient but is stored", id)
		}
		if d := dues[id]; len(d) != 1 || d[0] != due {
			t.Fatalf("message %s: due entries %v, want [%d]", id, d, due)
		}
	}
	for id := range dues {
		if msgs[id] == nil {
			t.Fatalf("due entry for missing message %s", id)
		}
	}
	if got := s.Stats().Messages; got != int64(len(msgs)) {
		t.Fatalf("Stats().Messages = %d, stored %d", got, len(msgs))
	}
	// The due index seen through Due agrees (and the due floor hides none).
	n := 0
	if err := s.Due(time.Unix(0, 1<<62), func(ID, time.Time) bool { n++; return true }); err != nil {
		t.Fatal(err)
	}
	if n != len(msgs) {
		t.Fatalf("Due listed %d, stored %d", n, len(msgs))
	}
	return len(msgs)
}

// TestConcurrentCommitUpdate runs 40 goroutines that commit messages and
// then defer and deliver their recipients, while others scan the due index
// and walk the queue. Run with -race.
func TestConcurrentCommitUpdate(t *testing.T) {
	cfg := Config{Dir: t.TempDir(), CommitWorkers: 4, CommitQueue: 64, MemTableSize: 2 << 20}
	s := openT(t, cfg)
	defer s.Close()

	const goroutines, perG = 40, 25
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		live    = map[ID]bool{}
		removed = map[ID]bool{}
	)
	stop := make(chan struct{})
	var scanners sync.WaitGroup
	for range 2 {
		scanners.Add(1)
		go func() {
			defer scanners.Done()
			for i := 0; i < 10000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				s.NextDue()
				if i%10 == 0 {
					_ = s.Walk(func(*Message) bool { return true })
				}
				time.Sleep(time.Millisecond)
			}
		}()
	}
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			for i := range perG {
				m := testMessage(g*perG + i)
				nr := 1 + rng.IntN(3)
				for r := range nr {
					m.Rcpts = append(m.Rcpts, Recipient{Addr: fmt.Sprintf("r%d@d%d.test", r, rng.IntN(5))})
				}
				m.Received = t0.Add(time.Duration(rng.IntN(1000)) * time.Second)
				errc := make(chan error, 1)
				s.Commit(m, testBody(i, 200+rng.IntN(3000)), func(err error) { errc <- err })
				if err := <-errc; err != nil {
					t.Errorf("commit: %v", err)
					return
				}
				// Defer every recipient once, then finish a random subset.
				var ups []Recipient
				for r := range nr {
					ups = append(ups, Recipient{Index: uint16(r), State: Pending, Attempts: 1,
						NextAttempt: t0.Add(time.Duration(rng.IntN(5000)) * time.Second)})
				}
				if rm, err := s.Update(m.ID, ups); err != nil || rm {
					t.Errorf("defer: %v %v", rm, err)
					return
				}
				done := 0
				var rm bool
				for r := range nr {
					if rng.IntN(3) == 0 {
						continue
					}
					done++
					var err error
					rm, err = s.Update(m.ID, []Recipient{{Index: uint16(r), State: RcptState(1 + rng.IntN(3)), Attempts: 2}})
					if err != nil {
						t.Errorf("update: %v", err)
						return
					}
				}
				if rm != (done == nr) {
					t.Errorf("removed = %v after %d of %d recipients", rm, done, nr)
				}
				mu.Lock()
				if rm {
					removed[m.ID] = true
				} else {
					live[m.ID] = true
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(stop)
	scanners.Wait()
	if t.Failed() {
		return
	}
	if n := checkInvariants(t, s); n != len(live) {
		t.Fatalf("stored %d, want %d", n, len(live))
	}
	for id := range removed {
		if _, err := s.Load(id); !errors.Is(err, ErrNotFound) {
			t.Fatalf("removed %s: Load = %v", id, err)
		}
	}
	m := s.Metrics()
	if m.Commits != goroutines*perG || m.CommitBatches == 0 || m.WALFsyncs == 0 || m.Removals != uint64(len(removed)) {
		t.Fatalf("metrics: %+v", m)
	}
	t.Logf("%d live, %d removed, %d batches, %d WAL fsyncs", len(live), len(removed), m.CommitBatches, m.WALFsyncs)
}

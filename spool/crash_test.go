package spool

import (
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// Message fates tracked by the crash tests.
const (
	fateCommitted = iota + 1 // commit acknowledged, no removal started
	fateRemoving             // removal started, not acknowledged
	fateRemoved              // removal acknowledged
)

// TestCrashDuringWrites takes crash clones of a crashable in-memory
// filesystem while 20 goroutines commit and remove messages, and checks
// that every acknowledged commit and removal is found on the clone.
func TestCrashDuringWrites(t *testing.T) {
	for _, unsynced := range []int{0, 50} {
		mem := vfs.NewCrashableMem()
		s := openT(t, memConfig(mem))
		var (
			fates sync.Map // ID -> *atomic.Int32
			stop  atomic.Bool
			wg    sync.WaitGroup
		)
		for g := range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 5000 && !stop.Load(); i++ {
					m := testMessage(g*10000+i, "a@x.test", "b@y.test")
					if err := s.CommitWait(m, testBody(i, 500)); err != nil {
						if !stop.Load() {
							t.Errorf("commit: %v", err)
						}
						return
					}
					fate := new(atomic.Int32)
					fate.Store(fateCommitted)
					fates.Store(m.ID, fate)
					if i%2 == 0 {
						fate.Store(fateRemoving)
						rm, err := s.Update(m.ID, []Recipient{{Index: 0, State: Delivered}, {Index: 1, State: Bounced}})
						if err != nil || !rm {
							if !stop.Load() {
								t.Errorf("update: %v %v", rm, err)
							}
							return
						}
						fate.Store(fateRemoved)
					}
				}
			}()
		}
		var clones []*vfs.MemFS
		var snaps []map[ID]int32
		rng := rand.New(rand.NewPCG(uint64(unsynced), 7))
		for range 3 {
			time.Sleep(30 * time.Millisecond)
			// Read the fates first: whatever was acknowledged then must be
			// on the clone taken after.
			snap := map[ID]int32{}
			fates.Range(func(k, v any) bool {
				snap[k.(ID)] = v.(*atomic.Int32).Load()
				return true
			})
			snaps = append(snaps, snap)
			clones = append(clones, mem.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: unsynced, RNG: rng}))
		}
		stop.Store(true)
		wg.Wait()
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		for i, clone := range clones {
			c := openT(t, memConfig(clone))
			checkInvariants(t, c)
			var present, absent int
			for id, fate := range snaps[i] {
				_, err := c.Load(id)
				switch {
				case fate == fateCommitted && err != nil:
					t.Fatalf("clone %d: acknowledged %s lost: %v", i, id, err)
				case fate == fateRemoved && !errors.Is(err, ErrNotFound):
					t.Fatalf("clone %d: acknowledged removal of %s undone: %v", i, id, err)
				case err == nil:
					present++
				default:
					absent++
				}
			}
			if len(snaps[i]) == 0 {
				t.Fatalf("clone %d: nothing acknowledged before the crash", i)
			}
			t.Logf("unsynced=%d%% clone %d: %d acknowledged, %d present, %d absent", unsynced, i, len(snaps[i]), present, absent)
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestCopyWhileOpen copies the spool directory of a store that is still
// open (as a crash with the page cache intact would leave it) and opens the
// copy: every acknowledged message is there, with its body and due entry.
func TestCopyWhileOpen(t *testing.T) {
	dir := t.TempDir()
	s := openT(t, Config{Dir: dir})
	defer s.Close()
	var ids []ID
	for i := range 200 {
		m := testMessage(i, "a@x.test")
		m.Rcpts[0].NextAttempt = t0.Add(time.Duration(i) * time.Second)
		s.Commit(m, testBody(i, 2000), nil)
		if i%10 == 9 {
			m := testMessage(i, "b@x.test")
			if err := s.CommitWait(m, testBody(i, 2000)); err != nil {
				t.Fatal(err)
			}
			ids = append(ids, m.ID)
		}
	}
	if _, err := s.Update(ids[0], []Recipient{{Index: 0, State: Delivered}}); err != nil {
		t.Fatal(err)
	}
	cp := t.TempDir()
	copyDir(t, dir, cp)
	c := openT(t, Config{Dir: cp})
	defer c.Close()
	checkInvariants(t, c)
	if _, err := c.Load(ids[0]); !errors.Is(err, ErrNotFound) {
		t.Fatalf("removed message present: %v", err)
	}
	for _, id := range ids[1:] {
		if _, err := c.Body(id); err != nil {
			t.Fatalf("%s: %v", id, err)
		}
	}
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	entries, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.IsDir() || e.Name() == "LOCK" {
			continue
		}
		src, err := os.Open(filepath.Join(from, e.Name()))
		if errors.Is(err, os.ErrNotExist) {
			continue // deleted meanwhile (an obsolete file)
		}
		if err != nil {
			t.Fatal(err)
		}
		dst, err := os.Create(filepath.Join(to, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(dst, src); err != nil {
			t.Fatal(err)
		}
		src.Close()
		if err := dst.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

package spool

import (
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// freeSpaceTTL is how long a reading of the filesystem's free space is
// used before it is renewed (see watchFree).
const freeSpaceTTL = 250 * time.Millisecond

// freeSpace caches the free space of the spool's filesystem.
type freeSpace struct {
	bytes atomic.Int64  // available to unprivileged users; -1 unknown
	stop  chan struct{} // ends watchFree (closed by close)
}

// FreeBytes returns the space available on the spool's filesystem, as of
// at most freeSpaceTTL ago, or -1 when it cannot be read (statfs failed,
// or the store runs on an in-memory filesystem). Open takes the first
// reading and watchFree the next ones, on a goroutine of its own, so that
// a caller on an event loop never waits for statfs(2) or for pebble's
// metrics (and their mutex).
func (s *Store) FreeBytes() int64 { return s.free.bytes.Load() }

// watchFree renews the free space reading every freeSpaceTTL until stop
// is closed.
func (s *Store) watchFree(stop <-chan struct{}) {
	t := time.NewTicker(freeSpaceTTL)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			s.readFree()
		case <-stop:
			return
		}
	}
}

// readFree takes a reading of the free space and of the spool's size.
func (s *Store) readFree() {
	s.free.bytes.Store(statFree(s.cfg.Dir))
	s.refreshDiskBytes()
}

// HasRoom reports whether a message of size octets (0: unknown) may be
// accepted: false when its spooled size would leave less than
// Config.MinFree plus half the spool's on-disk size free on its
// filesystem. The second term is room for compactions, which write their
// output before they delete their input: in a small or freshly grown spool
// one may rewrite most of it. Unknown free space, a disabled check
// (negative MinFree) and a failed store report true (a failed store
// refuses the commit itself). It never blocks (see FreeBytes).
func (s *Store) HasRoom(size int64) bool {
	if s.cfg.MinFree < 0 {
		return true
	}
	free := s.FreeBytes()
	return free < 0 || free-max(size, 0) >= s.cfg.MinFree+int64(s.diskBytes.Load()/2)
}

// statFree returns the space available to unprivileged users on the
// filesystem holding dir, or -1.
func statFree(dir string) int64 {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return -1
	}
	return int64(st.Bavail) * int64(st.Bsize)
}

// openReserve is the free space Open wants beyond the WAL it replays:
// room for a new MANIFEST, OPTIONS file and WAL.
const openReserve = 4 << 20

// checkOpenSpace refuses to open the spool in dir when its filesystem
// cannot take the replay of its WAL files (flushed into sstables when they
// exceed a memtable) plus openReserve. Pebble has no way out of a full disk
// during Open: a failed flush is retried at once, forever, and a failed
// MANIFEST write is fatal. An error wrapping syscall.ENOSPC lets the
// daemon exit and be restarted once there is room. Unknown free space
// passes.
func checkOpenSpace(dir string) error {
	free := statFree(dir)
	if free < 0 {
		return nil
	}
	var wal int64
	if ents, err := os.ReadDir(dir); err == nil {
		for _, e := range ents {
			if strings.HasSuffix(e.Name(), ".log") {
				if fi, err := e.Info(); err == nil {
					wal += fi.Size()
				}
			}
		}
	}
	if need := wal + openReserve; free < need {
		return fmt.Errorf("%w: %d bytes free on the spool's filesystem, %d needed to replay %d bytes of WAL and open",
			syscall.ENOSPC, free, need, wal)
	}
	return nil
}

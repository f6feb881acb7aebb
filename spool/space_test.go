package spool

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestHasRoom reads the real free space of the test's filesystem.
func TestHasRoom(t *testing.T) {
	open := func(minFree int64, fs vfs.FS, dir string) *Store {
		cfg := DefaultConfig()
		cfg.Dir, cfg.MinFree, cfg.FS = dir, minFree, fs
		st, err := Open(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		return st
	}
	st := open(1, nil, t.TempDir())
	free := st.FreeBytes()
	if free <= 0 {
		t.Fatalf("FreeBytes = %d on a real filesystem", free)
	}
	tests := []struct {
		name    string
		st      *Store
		size    int64
		hasRoom bool
	}{
		{"small message", st, 1000, true},
		{"unknown size", st, 0, true},
		{"message larger than the free space", st, free + 1<<30, false},
		{"floor above the free space", open(1<<62, nil, t.TempDir()), 0, false},
		{"check disabled", open(-1, nil, t.TempDir()), 1 << 62, true},
		{"free space unknown (memory filesystem)", open(1<<62, vfs.NewMem(), "/no/such/hermod/dir"), 1 << 62, true},
	}
	for _, tt := range tests {
		if got := tt.st.HasRoom(tt.size); got != tt.hasRoom {
			t.Errorf("%s: HasRoom(%d) = %v, want %v (free %d, min_free %d)", tt.name, tt.size, got, tt.hasRoom, tt.st.FreeBytes(), tt.st.cfg.MinFree)
		}
	}
	if d := DefaultConfig().MinFree; d != 64<<20 {
		t.Errorf("default min_free %d", d)
	}
}

// TestOpenRefusesWithoutRoomForItsWAL: Open checks, before pebble replays
// the WAL, that the filesystem can take it (a sparse WAL file of 8 TiB
// stands for one larger than the free space).
func TestOpenRefusesWithoutRoomForItsWAL(t *testing.T) {
	dir := t.TempDir()
	if err := checkOpenSpace(dir); err != nil {
		t.Fatalf("empty directory: %v", err)
	}
	f, err := os.Create(filepath.Join(dir, "000999.log"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(8 << 40); err != nil {
		f.Close()
		t.Skipf("no sparse 8 TiB file here: %v", err)
	}
	f.Close()
	cfg := DefaultConfig()
	cfg.Dir = dir
	if _, err := Open(cfg, nil); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("Open with an 8 TiB WAL to replay: %v, want ENOSPC", err)
	}
}

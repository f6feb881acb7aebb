package spool

import (
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
	if d := DefaultConfig().MinFree; d != 256<<20 {
		t.Errorf("default min_free %d", d)
	}
}

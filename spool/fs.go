package spool

import (
	"strings"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// fsyncBuckets are the upper bounds (seconds) of the fsync latency histogram.
var fsyncBuckets = [...]float64{
	0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
	0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
}

// syncStats counts file syncs (Sync, SyncData, and SyncTo when it did a full
// sync) and their latency. WAL syncs are what acknowledge commits; the other
// syncs come from flushes, compactions, the MANIFEST and directories.
type syncStats struct {
	wal, other atomic.Uint64
	rangeSyncs atomic.Uint64 // SyncTo calls that only started write-back
	errors     atomic.Uint64
	sumNanos   atomic.Uint64
	buckets    [len(fsyncBuckets) + 1]atomic.Uint64 // last is +Inf
}

func (s *syncStats) observe(wal bool, d time.Duration, err error) {
	if err != nil {
		s.errors.Add(1)
	}
	if wal {
		s.wal.Add(1)
	} else {
		s.other.Add(1)
	}
	s.sumNanos.Add(uint64(d))
	sec := d.Seconds()
	i := 0
	for i < len(fsyncBuckets) && sec > fsyncBuckets[i] {
		i++
	}
	s.buckets[i].Add(1)
}

// countingFS wraps a vfs.FS so that every file it opens counts its syncs.
type countingFS struct {
	vfs.FS
	stats *syncStats
}

var _ vfs.FS = (*countingFS)(nil)

func isWAL(name string) bool { return strings.HasSuffix(name, ".log") }

func (fs *countingFS) wrap(name string, f vfs.File, err error) (vfs.File, error) {
	if err != nil {
		return f, err
	}
	return &countingFile{File: f, wal: isWAL(name), stats: fs.stats}, nil
}

func (fs *countingFS) Create(name string, category vfs.DiskWriteCategory) (vfs.File, error) {
	f, err := fs.FS.Create(name, category)
	return fs.wrap(name, f, err)
}

func (fs *countingFS) Open(name string, opts ...vfs.OpenOption) (vfs.File, error) {
	f, err := fs.FS.Open(name, opts...)
	return fs.wrap(name, f, err)
}

func (fs *countingFS) OpenReadWrite(name string, category vfs.DiskWriteCategory, opts ...vfs.OpenOption) (vfs.File, error) {
	f, err := fs.FS.OpenReadWrite(name, category, opts...)
	return fs.wrap(name, f, err)
}

func (fs *countingFS) OpenDir(name string) (vfs.File, error) {
	f, err := fs.FS.OpenDir(name)
	return fs.wrap(name, f, err)
}

func (fs *countingFS) ReuseForWrite(oldname, newname string, category vfs.DiskWriteCategory) (vfs.File, error) {
	f, err := fs.FS.ReuseForWrite(oldname, newname, category)
	return fs.wrap(newname, f, err)
}

// Unwrap returns the wrapped filesystem.
func (fs *countingFS) Unwrap() vfs.FS { return fs.FS }

type countingFile struct {
	vfs.File
	wal   bool
	stats *syncStats
}

func (f *countingFile) Sync() error {
	start := time.Now()
	err := f.File.Sync()
	f.stats.observe(f.wal, time.Since(start), err)
	return err
}

func (f *countingFile) SyncData() error {
	start := time.Now()
	err := f.File.SyncData()
	f.stats.observe(f.wal, time.Since(start), err)
	return err
}

func (f *countingFile) SyncTo(length int64) (bool, error) {
	start := time.Now()
	full, err := f.File.SyncTo(length)
	if full {
		f.stats.observe(f.wal, time.Since(start), err)
	} else {
		f.stats.rangeSyncs.Add(1)
		if err != nil {
			f.stats.errors.Add(1)
		}
	}
	return full, err
}

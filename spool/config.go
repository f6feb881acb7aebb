package spool

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// Compression names accepted by Config.Compression.
const (
	CompressionS2   = "s2"
	CompressionZstd = "zstd"
	CompressionNone = "none"
)

// Config configures a Store. It is nested into the daemon's configuration
// under the [spool] table.
type Config struct {
	// Dir is the directory holding the pebble database. It is created if
	// missing.
	// Default: "data/spool".
	Dir string `toml:"dir"`

	// Compression is the codec for message bodies: "s2", "zstd" or "none".
	// Bodies that do not shrink are stored uncompressed whatever the codec.
	// Stored bodies carry their codec, so it may be changed at any time.
	// Default: "s2".
	Compression string `toml:"compression"`

	// MemTableSize is the size in bytes of one pebble memtable. Larger
	// memtables let more messages be written and deleted before they are
	// ever flushed to an sstable (write-once, deliver, delete-soon).
	// Default: 64 MiB.
	MemTableSize int64 `toml:"memtable_size"`

	// CommitWorkers is the number of goroutines that merge queued writes
	// into grouped pebble batches (compressing bodies) and write them to the
	// WAL. One group forms at a time (the one holding the gate; see the
	// package doc), so their number changes neither how many writes one
	// fsync covers nor how many bodies are compressed at once: more than
	// one only keeps a worker ready when the gate comes back.
	// Default: 4.
	CommitWorkers int `toml:"commit_workers"`

	// CommitQueue is the capacity of the queue between Commit/Update callers
	// and the commit workers. A full queue blocks callers (backpressure).
	// Default: 4096.
	CommitQueue int `toml:"commit_queue"`

	// CacheSize is the size in bytes of pebble's block cache.
	// Default: 64 MiB.
	CacheSize int64 `toml:"cache_size"`

	// LazySyncDelay bounds how long a write made by UpdateLazy (a delivery
	// outcome) may stay unsynced: any later synced write covers it (the WAL
	// is written in order), and when none comes within this delay the store
	// syncs by itself. It is the window in which an operating-system crash
	// or power loss can undo an outcome, so that the mail is delivered
	// again (never lost). A process crash loses only what pebble had not
	// yet handed to the kernel, a few milliseconds' worth under load.
	// Between 1ms and 10s. Default: 100ms.
	LazySyncDelay time.Duration `toml:"lazy_sync_delay"`

	// MinFree is the free space, in bytes, to keep on the spool's
	// filesystem beyond half the spool's own size (room for compactions):
	// HasRoom reports false (the daemon answers MAIL with 452 4.3.1) once
	// accepting a message would leave less. It keeps room for
	// pebble's memtable flushes and compactions and for the outcomes of
	// deliveries, which free space, so that the spool never reaches ENOSPC
	// (where it fails and must be reopened). Negative disables the check.
	// Default: 64 MiB (Postfix refuses below 1.5 × its message size
	// limit: 15 MiB by default).
	MinFree int64 `toml:"min_free"`

	// NodeID is written into every ID made by NewID. It is set by the cluster
	// wiring, not by the configuration file.
	// Default: 0.
	NodeID uint16 `toml:"-"`

	// FS is the filesystem pebble uses. Tests inject vfs.NewMem,
	// vfs.NewCrashableMem or an errorfs.
	// Default: nil, meaning vfs.Default.
	FS vfs.FS `toml:"-"`

	// Clock returns the current time, for IDs and default Received times.
	// Default: nil, meaning time.Now.
	Clock func() time.Time `toml:"-"`
}

const (
	defaultDir           = "data/spool"
	defaultMemTableSize  = 64 << 20
	defaultCommitWorkers = 4
	defaultCommitQueue   = 4096
	defaultCacheSize     = 64 << 20
	defaultLazySyncDelay = 100 * time.Millisecond
	defaultMinFree       = 64 << 20
	minLazySyncDelay     = time.Millisecond
	maxLazySyncDelay     = 10 * time.Second

	minMemTableSize = 1 << 20
	maxMemTableSize = 1 << 31 // pebble requires < 4 GiB; keep a margin.
	maxCommitWorker = 64
)

// DefaultConfig returns a Config with every default filled in.
func DefaultConfig() Config {
	var c Config
	c.EnsureDefaults()
	return c
}

// EnsureDefaults replaces zero values by their defaults.
func (c *Config) EnsureDefaults() {
	if c.Dir == "" {
		c.Dir = defaultDir
	}
	if c.Compression == "" {
		c.Compression = CompressionS2
	}
	if c.MemTableSize == 0 {
		c.MemTableSize = defaultMemTableSize
	}
	if c.CommitWorkers == 0 {
		c.CommitWorkers = defaultCommitWorkers
	}
	if c.CommitQueue == 0 {
		c.CommitQueue = defaultCommitQueue
	}
	if c.CacheSize == 0 {
		c.CacheSize = defaultCacheSize
	}
	if c.LazySyncDelay == 0 {
		c.LazySyncDelay = defaultLazySyncDelay
	}
	if c.MinFree == 0 {
		c.MinFree = defaultMinFree
	}
}

// Validate reports every problem of c at once, each prefixed with its TOML
// key. It expects defaults to have been applied.
func (c Config) Validate() error {
	var errs []error
	add := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("spool.%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if strings.TrimSpace(c.Dir) == "" {
		add("dir", "must not be empty")
	}
	switch c.Compression {
	case CompressionS2, CompressionZstd, CompressionNone:
	default:
		add("compression", "must be one of %q, %q, %q (got %q)",
			CompressionS2, CompressionZstd, CompressionNone, c.Compression)
	}
	if c.MemTableSize < minMemTableSize || c.MemTableSize > maxMemTableSize {
		add("memtable_size", "must be between %d and %d (got %d)", minMemTableSize, maxMemTableSize, c.MemTableSize)
	}
	if c.CommitWorkers < 1 || c.CommitWorkers > maxCommitWorker {
		add("commit_workers", "must be between 1 and %d (got %d)", maxCommitWorker, c.CommitWorkers)
	}
	if c.CommitQueue < 1 {
		add("commit_queue", "must be >= 1 (got %d)", c.CommitQueue)
	}
	if c.CacheSize < 0 {
		add("cache_size", "must be >= 0 (got %d)", c.CacheSize)
	}
	if c.LazySyncDelay < minLazySyncDelay || c.LazySyncDelay > maxLazySyncDelay {
		add("lazy_sync_delay", "must be between %s and %s (got %s)", minLazySyncDelay, maxLazySyncDelay, c.LazySyncDelay)
	}
	return errors.Join(errs...)
}

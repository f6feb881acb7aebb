package spool

import (
	"fmt"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// t0 is the base of the tests' fake clock.
var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// fakeClock is a settable clock for Config.Clock.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	c.now = t
	c.mu.Unlock()
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return nil
}

// memConfig returns a small in-memory configuration.
func memConfig(fs vfs.FS) Config {
	return Config{Dir: "spool", FS: fs, MemTableSize: 4 << 20, CommitWorkers: 2, CacheSize: 8 << 20}
}

func openT(t testing.TB, cfg Config) *Store {
	t.Helper()
	s, err := Open(cfg, testLogger(t))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return s
}

func testMessage(i int, rcpts ...string) *Message {
	m := &Message{From: fmt.Sprintf("sender%d@example.test", i), ClientIP: "127.0.0.1", Helo: "client.test"}
	for _, r := range rcpts {
		m.Rcpts = append(m.Rcpts, Recipient{Addr: r})
	}
	return m
}

func testBody(i, size int) []byte {
	b := make([]byte, size)
	line := fmt.Sprintf("Subject: message %d\r\n\r\nThis is line of body text number %d. ", i, i)
	for j := range b {
		b[j] = line[j%len(line)]
	}
	return b
}

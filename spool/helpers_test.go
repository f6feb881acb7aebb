package spool

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
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

var testWords = strings.Fields(`the of and to in is that for it as was with be by on not he this are or
	his from at which but have an they you were her she there been one all we their has would when if so no
	will more can out up about into them some time could than other only then its also after first two like
	delivery message queue server mail relay domain spool report header subject received invoice meeting`)

// testBody returns size bytes of mail-like text (headers, then lines of
// words chosen by a PRNG seeded with i): it compresses about like mail.
func testBody(i, size int) []byte {
	rng := rand.New(rand.NewPCG(uint64(i), 42))
	b := fmt.Appendf(make([]byte, 0, size+16), "Subject: message %d\r\nMessage-ID: <%d.%d@example.test>\r\n\r\n", i, i, rng.Uint64())
	col := 0
	for len(b) < size {
		w := testWords[rng.IntN(len(testWords))]
		b = append(b, w...)
		col += len(w) + 1
		if col > 70 {
			b = append(b, '\r', '\n')
			col = 0
		} else {
			b = append(b, ' ')
		}
	}
	return b[:size]
}

func slogDiscard() *slog.Logger { return slog.New(slog.DiscardHandler) }

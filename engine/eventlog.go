package engine

import (
	"bufio"
	"encoding/json"
	"io"
	"os"
	"sync"
	"time"

	"github.com/hermod-mta/hermod/spool"
)

// EventLog is the delivery log: one JSON object per line for each
// reception (and, with the scheduler, each delivery, deferral, bounce and
// expiry). Lines are buffered and flushed at least every flushEvery, so a
// crash may lose the last fraction of a second of log lines but never a
// message.
type EventLog struct {
	mu     sync.Mutex
	w      *bufio.Writer
	c      io.Closer
	stop   chan struct{}
	done   chan struct{}
	closed bool
}

const flushEvery = 200 * time.Millisecond

// OpenEventLog opens the log at path, appending; "-" is standard output.
func OpenEventLog(path string) (*EventLog, error) {
	if path == "-" {
		return NewEventLog(os.Stdout, nil), nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, err
	}
	return NewEventLog(f, f), nil
}

// NewEventLog writes to w; c, when non-nil, is closed by Close.
func NewEventLog(w io.Writer, c io.Closer) *EventLog {
	l := &EventLog{w: bufio.NewWriterSize(w, 64<<10), c: c, stop: make(chan struct{}), done: make(chan struct{})}
	go l.flusher()
	return l
}

func (l *EventLog) flusher() {
	defer close(l.done)
	t := time.NewTicker(flushEvery)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			l.mu.Lock()
			_ = l.w.Flush()
			l.mu.Unlock()
		case <-l.stop:
			return
		}
	}
}

// Close flushes and closes the log.
func (l *EventLog) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	l.mu.Unlock()
	close(l.stop)
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	err := l.w.Flush()
	if l.c != nil {
		if cerr := l.c.Close(); err == nil {
			err = cerr
		}
	}
	return err
}

func (l *EventLog) write(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		return
	}
	l.mu.Lock()
	if !l.closed {
		_, _ = l.w.Write(b)
		_ = l.w.WriteByte('\n')
	}
	l.mu.Unlock()
}

// ReceivedRecord is the log line of one accepted message.
type ReceivedRecord struct {
	Time     time.Time `json:"time"`
	Event    string    `json:"event"` // "received"
	MsgID    string    `json:"msg_id"`
	From     string    `json:"from"`
	Rcpts    int       `json:"rcpts"`
	Size     int       `json:"size"`
	ClientIP string    `json:"client_ip"`
	Helo     string    `json:"helo"`
	TLS      bool      `json:"tls"`
	CommitMS float64   `json:"commit_ms"` // from end of data to durable
}

// Received logs one accepted message.
func (l *EventLog) Received(m *spool.Message, size int, tls bool, commit time.Duration) {
	l.write(ReceivedRecord{
		Time: time.Now().UTC(), Event: "received", MsgID: m.ID.String(), From: m.From, Rcpts: len(m.Rcpts),
		Size: size, ClientIP: m.ClientIP, Helo: m.Helo, TLS: tls, CommitMS: float64(commit.Microseconds()) / 1000,
	})
}

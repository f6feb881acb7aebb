package engine

import (
	"encoding/json"
	"io"
	"os"
	"sync"
	"time"

	"github.com/hermod-mta/hermod/spool"
)

// EventLog is the delivery log: one JSON object per line for each
// reception, delivery, deferral, bounce and expiry. Lines are buffered and
// written at least every FlushInterval (and when 64 KiB are waiting), so a
// crash of the process may lose the last fraction of a second of log lines
// — never a message: the spool, not the log, is the record of what is
// queued.
type EventLog struct {
	mu     sync.Mutex
	w      io.Writer
	c      io.Closer
	buf    []byte
	closed bool
	stop   chan struct{}
	done   chan struct{}
}

// FlushInterval bounds how long a log line waits in memory.
const FlushInterval = 100 * time.Millisecond

const flushSize = 64 << 10

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
	l := &EventLog{w: w, c: c, buf: make([]byte, 0, flushSize+4096), stop: make(chan struct{}), done: make(chan struct{})}
	go l.flusher()
	return l
}

func (l *EventLog) flusher() {
	defer close(l.done)
	t := time.NewTicker(FlushInterval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			l.mu.Lock()
			l.flushLocked()
			l.mu.Unlock()
		case <-l.stop:
			return
		}
	}
}

func (l *EventLog) flushLocked() {
	if len(l.buf) > 0 {
		_, _ = l.w.Write(l.buf)
		l.buf = l.buf[:0]
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
	l.flushLocked()
	if l.c != nil {
		return l.c.Close()
	}
	return nil
}

func (l *EventLog) write(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		return
	}
	l.mu.Lock()
	if !l.closed {
		l.buf = append(append(l.buf, b...), '\n')
		if len(l.buf) >= flushSize {
			l.flushLocked()
		}
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

// DeliveryRecord is the log line of one recipient's delivery attempt
// outcome: delivered, deferred, bounced or expired.
type DeliveryRecord struct {
	Time        time.Time `json:"time"`
	Event       string    `json:"event"`
	MsgID       string    `json:"msg_id"`
	Rcpt        string    `json:"rcpt"`
	Domain      string    `json:"domain"`
	MX          string    `json:"mx,omitempty"`
	IP          string    `json:"ip,omitempty"`
	Reply       string    `json:"reply"`
	TLS         bool      `json:"tls"`
	Attempt     uint32    `json:"attempt"`
	NextAttempt time.Time `json:"next_attempt,omitzero"`
	// Delay is the time since acceptance, in seconds.
	Delay float64 `json:"delay"`
	// Delays splits the attempt like Postfix's delays=a/b/c/d: time in the
	// ready queue before the attempt, DNS, connection setup (connect,
	// greeting, EHLO, TLS), transmission; seconds.
	Delays string `json:"delays,omitempty"`
}

// Delivery logs one delivery outcome.
func (l *EventLog) Delivery(r DeliveryRecord) { l.write(r) }

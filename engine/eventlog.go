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
// reception (and, with the scheduler, each delivery, deferral, bounce and
// expiry). Each line is written with one write(2) as it happens, so a
// crash of the process loses no line of an acknowledged message (a crash of
// the machine may lose what the kernel had not written back).
type EventLog struct {
	mu     sync.Mutex
	w      io.Writer
	c      io.Closer
	buf    []byte
	closed bool
}

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
	return &EventLog{w: w, c: c}
}

// Close closes the log.
func (l *EventLog) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
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
		l.buf = append(append(l.buf[:0], b...), '\n')
		_, _ = l.w.Write(l.buf)
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

package engine

import (
	"encoding/json"
	"io"
	"math"
	"os"
	"strconv"
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

// write appends one line, encoded by enc straight into the buffer (no
// intermediate allocation). A record enc cannot encode (ok false: a NaN or
// infinite number, as encoding/json refuses too) is dropped.
func (l *EventLog) write(enc func([]byte) ([]byte, bool)) {
	l.mu.Lock()
	if !l.closed {
		n := len(l.buf)
		b, ok := enc(l.buf)
		if ok {
			l.buf = append(b, '\n')
		} else {
			l.buf = b[:n]
		}
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
	r := ReceivedRecord{
		Time: time.Now().UTC(), Event: "received", MsgID: m.ID.String(), From: m.From, Rcpts: len(m.Rcpts),
		Size: size, ClientIP: m.ClientIP, Helo: m.Helo, TLS: tls, CommitMS: float64(commit.Microseconds()) / 1000,
	}
	l.write(r.appendJSON)
}

// appendJSON appends r as encoding/json would marshal it; ok is false when
// it would fail.
func (r *ReceivedRecord) appendJSON(b []byte) ([]byte, bool) {
	ok := true
	b = append(b, `{"time":`...)
	b = appendJSONTime(b, r.Time, &ok)
	b = append(b, `,"event":`...)
	b = appendJSONString(b, r.Event)
	b = append(b, `,"msg_id":`...)
	b = appendJSONString(b, r.MsgID)
	b = append(b, `,"from":`...)
	b = appendJSONString(b, r.From)
	b = append(b, `,"rcpts":`...)
	b = strconv.AppendInt(b, int64(r.Rcpts), 10)
	b = append(b, `,"size":`...)
	b = strconv.AppendInt(b, int64(r.Size), 10)
	b = append(b, `,"client_ip":`...)
	b = appendJSONString(b, r.ClientIP)
	b = append(b, `,"helo":`...)
	b = appendJSONString(b, r.Helo)
	b = append(b, `,"tls":`...)
	b = strconv.AppendBool(b, r.TLS)
	b = append(b, `,"commit_ms":`...)
	b = appendJSONFloat(b, r.CommitMS, &ok)
	return append(b, '}'), ok
}

// DeliveryRecord is the log line of one recipient's delivery attempt
// outcome: delivered, deferred, bounced or expired, or resent (refused
// for the server's recipient limit in a transaction that delivered
// others, and sent again at once in a new one: neither a deferral nor an
// attempt of its retry schedule).
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
func (l *EventLog) Delivery(r DeliveryRecord) { l.write(r.appendJSON) }

// appendJSON appends r as encoding/json would marshal it; ok is false when
// it would fail.
func (r *DeliveryRecord) appendJSON(b []byte) ([]byte, bool) {
	ok := true
	b = append(b, `{"time":`...)
	b = appendJSONTime(b, r.Time, &ok)
	b = append(b, `,"event":`...)
	b = appendJSONString(b, r.Event)
	b = append(b, `,"msg_id":`...)
	b = appendJSONString(b, r.MsgID)
	b = append(b, `,"rcpt":`...)
	b = appendJSONString(b, r.Rcpt)
	b = append(b, `,"domain":`...)
	b = appendJSONString(b, r.Domain)
	if r.MX != "" {
		b = append(b, `,"mx":`...)
		b = appendJSONString(b, r.MX)
	}
	if r.IP != "" {
		b = append(b, `,"ip":`...)
		b = appendJSONString(b, r.IP)
	}
	b = append(b, `,"reply":`...)
	b = appendJSONString(b, r.Reply)
	b = append(b, `,"tls":`...)
	b = strconv.AppendBool(b, r.TLS)
	b = append(b, `,"attempt":`...)
	b = strconv.AppendUint(b, uint64(r.Attempt), 10)
	if !r.NextAttempt.IsZero() {
		b = append(b, `,"next_attempt":`...)
		b = appendJSONTime(b, r.NextAttempt, &ok)
	}
	b = append(b, `,"delay":`...)
	b = appendJSONFloat(b, r.Delay, &ok)
	if r.Delays != "" {
		b = append(b, `,"delays":`...)
		b = appendJSONString(b, r.Delays)
	}
	return append(b, '}'), ok
}

// FormatDelays formats the four parts of an attempt in seconds with
// millisecond precision, "a/b/c/d" (as fmt's %.3f would, without its
// allocations).
func FormatDelays(queue, dns, conn, xmit time.Duration) string {
	var buf [64]byte
	b := buf[:0]
	for i, d := range [4]time.Duration{queue, dns, conn, xmit} {
		if i > 0 {
			b = append(b, '/')
		}
		b = strconv.AppendFloat(b, d.Seconds(), 'f', 3, 64)
	}
	return string(b)
}

// appendJSONTime appends t as time.Time's MarshalJSON does (RFC 3339 with
// nanoseconds, quoted). Times other than UTC in years 0-9999 (the log's
// are all UTC) go through MarshalJSON itself; *ok becomes false when it
// refuses the time.
func appendJSONTime(b []byte, t time.Time, ok *bool) []byte {
	if y := t.Year(); y < 0 || y > 9999 || t.Location() != time.UTC {
		v, err := t.MarshalJSON()
		if err != nil {
			*ok = false
			return b
		}
		return append(b, v...)
	}
	b = append(b, '"')
	b = t.AppendFormat(b, time.RFC3339Nano)
	return append(b, '"')
}

// appendJSONString appends s quoted as encoding/json does (HTML-safe).
// Strings of plain printable ASCII, nearly all of them, are copied as
// they are; any other goes through encoding/json.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			v, _ := json.Marshal(s) // a string always marshals
			return append(b, v...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

// appendJSONFloat appends f as encoding/json does ('f' format, or 'e'
// beyond [1e-6, 1e21), shortest representation); *ok becomes false for
// NaN and infinities, which JSON cannot carry.
func appendJSONFloat(b []byte, f float64, ok *bool) []byte {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		*ok = false
		return b
	}
	format := byte('f')
	if a := math.Abs(f); a != 0 && (a < 1e-6 || a >= 1e21) {
		format = 'e'
	}
	b = strconv.AppendFloat(b, f, format, -1, 64)
	if format == 'e' {
		// clean up e-09 to e-9, as encoding/json does
		if n := len(b); n >= 4 && b[n-4] == 'e' && b[n-3] == '-' && b[n-2] == '0' {
			b[n-2] = b[n-1]
			b = b[:n-1]
		}
	}
	return b
}

package netio

import (
	"bytes"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// deadlineCounter counts the deadlines set on a connection.
type deadlineCounter struct {
	net.Conn
	reads, writes atomic.Int64
}

func (d *deadlineCounter) SetReadDeadline(t time.Time) error {
	d.reads.Add(1)
	return d.Conn.SetReadDeadline(t)
}

func (d *deadlineCounter) SetWriteDeadline(t time.Time) error {
	d.writes.Add(1)
	return d.Conn.SetWriteDeadline(t)
}

// TestClientWriteDeadlineKept checks that transactions on a reused
// connection, with the default timeouts (different for commands and
// data), do not move the socket's write deadline for every write: each
// move is a runtime timer update, twice per message when the envelope and
// the message had different write timeouts.
func TestClientWriteDeadlineKept(t *testing.T) {
	addr := clientSink(t, true)
	cfg := DefaultClientConfig()
	cfg.Hostname = "client.test"
	cfg.TLS = TLSDisabled
	c := clientDial(t, &cfg, addr)
	dc := &deadlineCounter{Conn: c.conn}
	c.conn = dc
	ctx := clientTestCtx(t)
	body := bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!\r\n"), 16)
	env := &ClientEnvelope{From: "s@x.test", Rcpts: []string{"r@y.test"}}
	const n = 100
	for range n {
		c.ResetNext()
		res, err := c.Send(ctx, env, body)
		if err != nil || res.Data == nil || res.Data.Code != 250 {
			t.Fatalf("Send: %v %v", res, err)
		}
	}
	t.Logf("%d transactions: %d write deadlines, %d read deadlines set", n, dc.writes.Load(), dc.reads.Load())
	// The deadline moves at most once a second (clientSlack); 100
	// transactions on loopback take far less than n/4 seconds.
	if w := dc.writes.Load(); w > n/4 {
		t.Errorf("%d write deadlines set for %d transactions (2 writes each)", w, n)
	}
}

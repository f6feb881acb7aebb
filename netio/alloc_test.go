//go:build !race

package netio

import (
	"bufio"
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// Allocation guards for the hot paths (counts, not timings: they hold on a
// noisy machine). The race detector changes allocation counts, so these
// run without it.

func TestAllocsSessionTransaction(t *testing.T) {
	cfg := testConfig()
	cfg.MaxMessageSize = 1 << 20
	body := strings.Repeat(strings.Repeat("b", 78)+"\r\n", 13)
	txn := []byte("MAIL FROM:<sender@x.test>\r\nRCPT TO:<rcpt@y.test>\r\nDATA\r\n" + body + ".\r\n")
	s := NewSession(cfg, benchBackend{}, ConnInfo{}, false, func(*smtperr.Error) {})
	out, _ := s.Greeting(nil)
	_, out, _ = s.Feed([]byte(hello), out[:0])
	out = make([]byte, 0, 4096)
	got := testing.AllocsPerRun(200, func() {
		_, o, _ := s.Feed(txn, out[:0])
		s.Resume(replyOK, o[:0])
	})
	// Envelope, its recipient list, the two address strings, the body.
	if got > 5 {
		t.Fatalf("%.1f allocations per 1 KiB transaction, want <= 5", got)
	}
}

func TestAllocsClientHotPaths(t *testing.T) {
	in := []byte("250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10\r\n250 2.1.5 ok\r\n")
	rd := bytes.NewReader(in)
	r := bufio.NewReader(rd)
	var p clientReplyReader
	if got := testing.AllocsPerRun(200, func() {
		rd.Reset(in)
		r.Reset(rd)
		if _, err := p.read(r); err != nil {
			t.Fatal(err)
		}
	}); got > 0 {
		t.Errorf("reply parsing: %.1f allocations, want 0", got)
	}
	body := bytes.Repeat([]byte("0123456789abcdef\r\n.dot\r\n"), 100)
	w := bufio.NewWriterSize(clientDiscard{}, clientWriteBuf)
	if got := testing.AllocsPerRun(200, func() { clientWriteBody(w, body) }); got > 0 {
		t.Errorf("body writing: %.1f allocations, want 0", got)
	}
	if got := testing.AllocsPerRun(200, func() { clientNormalize(body) }); got > 0 {
		t.Errorf("normalising a clean body: %.1f allocations, want 0", got)
	}
}

// TestAllocsClientSend guards a whole transaction on a reused pipelining
// connection, called as the scheduler's agents call it (cancellable
// context, RSET first): only the SendResult is allocated (the sink's
// goroutine, counted too, allocates nothing per transaction).
func TestAllocsClientSend(t *testing.T) {
	addr := clientSink(t, true)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, err := Dial(ctx, clientTestConfig(), "sink.test", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Quit()
	body := bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!\r\n"), 16)
	env := &ClientEnvelope{From: "a@x.test", Rcpts: []string{"rcpt@y.test"}}
	got := testing.AllocsPerRun(200, func() {
		c.ResetNext()
		res, err := c.Send(ctx, env, body)
		if err != nil || res.Data == nil || res.Data.Code != 250 {
			t.Fatalf("Send = %+v, %v", res, err)
		}
	})
	if got > 1 {
		t.Fatalf("%.1f allocations per transaction, want <= 1", got)
	}
}

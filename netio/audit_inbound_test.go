package netio

// Regression tests from an audit of the inbound server against RFC 5321,
// 3030, 2920 and 3207 and the behaviour of real clients. Each test names
// the case and the section it enforces.

import (
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// TestAuditTextLineDotStuffed: RFC 5321 §4.5.3.1.6 limits a text line to
// 1000 octets with its CRLF, "not counting the leading dot duplicated for
// transparency". A 1000-octet line that starts with a dot travels as 1001
// octets and must be accepted; one octet more is over-long. The reply must
// not depend on how the line is split into reads.
func TestAuditTextLineDotStuffed(t *testing.T) {
	cases := []struct {
		name, line string // the line on the wire, without its CRLF
		ok         bool
	}{
		{"plain 1000", strings.Repeat("a", 998), true},
		{"plain 1001", strings.Repeat("a", 999), false},
		{"stuffed 1000", ".." + strings.Repeat("a", 997), true},
		{"stuffed 1001", ".." + strings.Repeat("a", 998), false},
		{"stuffed dots 1000", strings.Repeat(".", 999), true},
	}
	for _, c := range cases {
		for _, chunk := range []int{0, 1, 7, 999, 1000, 1001} {
			t.Run(fmt.Sprintf("%s/chunk%d", c.name, chunk), func(t *testing.T) {
				b := &fakeBackend{}
				in := hello + tx + "DATA\r\nSubject: t\r\n\r\n" + c.line + "\r\n.\r\nNOOP\r\n"
				out, _ := runSession(t, testConfig(), b, in, chunk)
				checkReplies(t, out)
				if !c.ok {
					if len(b.msgs) != 0 || !strings.Contains(out, "554 5.6.0") {
						t.Fatalf("over-long line accepted: %d messages, %q", len(b.msgs), out)
					}
					return
				}
				if len(b.msgs) != 1 {
					t.Fatalf("legal line refused: %q", out)
				}
				want := "Subject: t\r\n\r\n" + c.line[1:] + "\r\n"
				if c.line[0] != '.' {
					want = "Subject: t\r\n\r\n" + c.line + "\r\n"
				}
				if b.msgs[0].body != want {
					t.Fatalf("body %q, want %q", b.msgs[0].body, want)
				}
				checkBody(t, b.msgs[0].body)
				if !strings.HasSuffix(out, "250 2.0.0 Ok\r\n") {
					t.Fatalf("session out of step: %q", out)
				}
			})
		}
	}
}

// TestAuditHalfClose: a client may send its whole session and shut down
// its side of the connection (shutdown(SHUT_WR), as `nc -N` and many
// scripts do) and then read the replies. The server must still answer
// what it received: the reply to the end of data once the commit is done
// (without it the client believes a queued message failed and sends it
// again) and the 221 to QUIT (RFC 5321 §4.1.1.10: the server must not
// close before it has replied to QUIT).
func TestAuditHalfClose(t *testing.T) {
	cases := []struct {
		name, in string
		want     []string // prefixes of the replies after EHLO's
	}{
		{"data quit", tx + "DATA\r\nSubject: t\r\n\r\nhello\r\n.\r\nQUIT\r\n",
			[]string{"250 2.1.0", "250 2.1.5", "354 ", "250 2.0.0 Ok: queued", "221 2.0.0"}},
		{"data only", tx + "DATA\r\nSubject: t\r\n\r\nhello\r\n.\r\n",
			[]string{"250 2.1.0", "250 2.1.5", "354 ", "250 2.0.0 Ok: queued"}},
		{"bdat quit", tx + "BDAT 7 LAST\r\nhello\r\nQUIT\r\n",
			[]string{"250 2.1.0", "250 2.1.5", "250 2.0.0 Ok: queued", "221 2.0.0"}},
		{"two messages", tx + "DATA\r\none\r\n.\r\n" + tx + "DATA\r\ntwo\r\n.\r\nQUIT\r\n",
			[]string{"250 2.1.0", "250 2.1.5", "354 ", "250 2.0.0 Ok: queued", "250 2.1.0", "250 2.1.5", "354 ", "250 2.0.0 Ok: queued", "221 2.0.0"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := &asyncBackend{delay: 200 * time.Millisecond}
			srv, addr := startServer(t, ServerConfig{}, b, nil)
			d := dial(t, addr)
			d.expect("220 ")
			d.send(hello)
			d.expect("250-mx.test")
			d.send(c.in)
			if err := d.c.(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			_ = d.c.SetReadDeadline(time.Now().Add(10 * time.Second))
			rest, err := io.ReadAll(d.r)
			if err != nil {
				t.Fatalf("reading replies: %v (got %q)", err, rest)
			}
			replies := splitReplies(string(rest))
			if len(replies) != len(c.want) {
				t.Fatalf("%d replies, want %d: %q", len(replies), len(c.want), rest)
			}
			for i, w := range c.want {
				if !strings.HasPrefix(replies[i], w) {
					t.Errorf("reply %d is %q, want %q…", i, replies[i], w)
				}
			}
			queued := 0
			for _, w := range c.want {
				if strings.Contains(w, "queued") {
					queued++
				}
			}
			if n := b.count(); n != queued {
				t.Errorf("%d messages committed, %d acknowledged", n, queued)
			}
			waitActive(t, srv, 0)
		})
	}
}

// waitActive waits (up to 10 s) until the server counts n open connections.
func waitActive(t *testing.T, s *Server, n int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for s.m.active.Load() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections open, want %d", s.m.active.Load(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestAuditOutcomeClientClosed: a client that ends the connection without
// QUIT is counted as client_closed, not as a server-side error (gnet
// reports the end of input as an error).
func TestAuditOutcomeClientClosed(t *testing.T) {
	srv, addr := startServer(t, ServerConfig{}, &asyncBackend{}, nil)
	d := dial(t, addr)
	d.expect("220 ")
	d.send(hello)
	d.expect("250-mx.test")
	d.c.Close()
	waitActive(t, srv, 0)
	m := srv.Metrics().SessionOutcomes
	if m["client_closed"] != 1 || m["error"] != 0 {
		t.Fatalf("outcomes %v, want one client_closed", m)
	}
}

// TestAuditRefusedGreeting: RFC 5321 §3.1 lets a server refuse a client
// with 554 in place of the 220 greeting, but it "MUST still wait for the
// client to send a QUIT before closing the connection and SHOULD respond
// to any intervening commands with 503". A 421 greeting (§3.8) and 521
// (RFC 7504: the host accepts no mail) close at once. Nothing of the
// refused session reaches the backend.
func TestAuditRefusedGreeting(t *testing.T) {
	blocked := smtperr.New(554, "5.7.1", "Error: connections from 192.0.2.1 are blocked by policy")
	cases := []struct {
		name   string
		refuse *smtperr.Error
		in     string
		want   string // reply codes, greeting included
		act    Action
	}{
		{"554 then quit", blocked, "QUIT\r\n", "554 221", ActClose},
		{"554 commands then quit", blocked, hello + "MAIL FROM:<a@x.test>\r\nSTARTTLS\r\nQUIT\r\n", "554 503 503 503 221", ActClose},
		{"554 errors", blocked, strings.Repeat("NOOP\r\n", 10), "554 503 503 503 503 503 421", ActClose},
		{"421 closes", smtperr.New(421, "4.7.0", "busy"), "QUIT\r\n", "421", ActClose},
		{"521 closes", smtperr.New(521, "5.3.2", "no mail here"), "QUIT\r\n", "521", ActClose},
	}
	for _, c := range cases {
		for _, chunk := range []int{0, 1} {
			t.Run(fmt.Sprintf("%s/chunk%d", c.name, chunk), func(t *testing.T) {
				b := &fakeBackend{refuse: c.refuse}
				out, act := runSession(t, testConfig(), b, c.in, chunk)
				checkReplies(t, out)
				if codes(out) != c.want || act != c.act {
					t.Fatalf("got %s %v, want %s %v:\n%s", codes(out), act, c.want, c.act, out)
				}
				if len(b.msgs) != 0 {
					t.Fatalf("refused session committed %d messages", len(b.msgs))
				}
			})
		}
	}
	// Over the network: the 554 client stays connected until its QUIT.
	srv, addr := startServer(t, ServerConfig{}, &fakeBackend{refuse: blocked}, nil)
	d := dial(t, addr)
	d.expect("554 5.7.1")
	d.send(hello)
	d.expect("503 ")
	d.send("QUIT\r\n")
	d.expect("221 ")
	d.expectClosed()
	waitActive(t, srv, 0)
	if n := srv.Metrics().SessionOutcomes["refused"]; n != 1 {
		t.Fatalf("refused sessions: %d, want 1", n)
	}
}

// TestAuditHalfCloseSTARTTLS: a client that has shut down its sending side
// cannot negotiate TLS, so a STARTTLS pipelined behind its message is
// refused (502) rather than answered 220 and dropped.
func TestAuditHalfCloseSTARTTLS(t *testing.T) {
	b := &asyncBackend{delay: 200 * time.Millisecond}
	_, addr := startServer(t, ServerConfig{}, b, selfSigned(t))
	d := dial(t, addr)
	d.expect("220 ")
	d.send(hello)
	d.expect("250-mx.test")
	d.send(tx + "DATA\r\nSubject: t\r\n\r\nhello\r\n.\r\nSTARTTLS\r\nQUIT\r\n")
	if err := d.c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	_ = d.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	rest, err := io.ReadAll(d.r)
	if err != nil {
		t.Fatalf("reading replies: %v (got %q)", err, rest)
	}
	if got, want := codes(string(rest)), "250 250 354 250 502 221"; got != want {
		t.Fatalf("replies %s, want %s: %q", got, want, rest)
	}
}

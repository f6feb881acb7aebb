package netio

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// clientPeer is the server side of a scripted SMTP dialogue on loopback. Its
// methods run on the script's goroutine and report mismatches with
// t.Errorf; got records every octet the peer read.
type clientPeer struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
	got  bytes.Buffer
}

// clientScript serves one connection on 127.0.0.1 with script. It returns
// the address and a function that waits for the script to end and returns
// everything the peer read.
func clientScript(t *testing.T, script func(p *clientPeer)) (netip.AddrPort, func() string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &clientPeer{t: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		conn, err := ln.Accept()
		ln.Close()
		if err != nil {
			return // the test ended before dialling
		}
		defer conn.Close()
		// Bounds every read and write of the script.
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		p.conn, p.r = conn, bufio.NewReader(conn)
		script(p)
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	wait := func() string {
		t.Helper()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Fatal("script did not finish")
		}
		return p.got.String()
	}
	return netip.MustParseAddrPort(ln.Addr().String()), wait
}

// send writes lines, each with CRLF, in one write.
func (p *clientPeer) send(lines ...string) {
	var b []byte
	for _, l := range lines {
		b = append(b, l...)
		b = append(b, '\r', '\n')
	}
	if _, err := p.conn.Write(b); err != nil {
		p.t.Errorf("peer: write: %v", err)
	}
}

// line reads one line, terminator included.
func (p *clientPeer) line() string {
	l, err := p.r.ReadString('\n')
	p.got.WriteString(l)
	if err != nil {
		p.t.Errorf("peer: read after %q: %v", l, err)
	}
	return l
}

// expect reads a line and checks that it starts with prefix. A prefix
// ending in CRLF checks the whole line.
func (p *clientPeer) expect(prefix string) string {
	l := p.line()
	if !strings.HasPrefix(l, prefix) {
		p.t.Errorf("peer: got %q, want %q", l, prefix)
	}
	return l
}

// data reads message content up to and including the final dot line.
func (p *clientPeer) data() string {
	var b strings.Builder
	for i := 0; i < 10000; i++ {
		l := p.line()
		b.WriteString(l)
		if l == ".\r\n" || l == "" {
			break
		}
	}
	return b.String()
}

// quiet checks that the client sends nothing while it waits for a reply.
func (p *clientPeer) quiet() {
	p.conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := p.r.Peek(1); err == nil {
		p.t.Errorf("peer: client sent %q without waiting for the reply", p.peekAll())
	}
	p.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
}

func (p *clientPeer) peekAll() []byte {
	b, _ := p.r.Peek(p.r.Buffered())
	return b
}

// waitClose reads until the client closes the connection, and reports an
// error if the peer's own deadline ended the wait instead.
func (p *clientPeer) waitClose() {
	b := make([]byte, 512)
	for i := 0; i < 1000; i++ {
		n, err := p.r.Read(b)
		p.got.Write(b[:n])
		if errors.Is(err, os.ErrDeadlineExceeded) {
			p.t.Errorf("peer: the client did not close the connection")
		}
		if err != nil {
			return
		}
	}
}

// hello plays the greeting and answers EHLO with the extensions.
func (p *clientPeer) hello(ext ...string) {
	p.send("220 mx.test ESMTP")
	p.expect("EHLO client.test\r\n")
	lines := append([]string{"mx.test"}, ext...)
	for i := range lines {
		sep := "-"
		if i == len(lines)-1 {
			sep = " "
		}
		lines[i] = "250" + sep + lines[i]
	}
	p.send(lines...)
}

// transaction plays MAIL, the RCPTs and DATA answered with replies (one per
// command, in order, 354 for DATA to accept), reads the body and answers
// final; it returns the body as on the wire. Pipelined clients send all
// commands before any reply.
func (p *clientPeer) transaction(pipe bool, cmds, replies []string, final string) string {
	if pipe {
		for _, c := range cmds {
			p.expect(c)
		}
		p.send(replies...)
	} else {
		for i, c := range cmds {
			p.expect(c)
			p.quiet()
			p.send(replies[i])
		}
	}
	if !strings.HasPrefix(replies[len(replies)-1], "354") {
		return ""
	}
	body := p.data()
	if final != "" {
		p.send(final)
	}
	return body
}

func (p *clientPeer) quit() {
	p.expect("QUIT\r\n")
	p.send("221 2.0.0 bye")
}

// clientTestConfig returns a configuration for loopback tests.
func clientTestConfig() *ClientConfig {
	cfg := ClientConfig{
		Hostname:         "client.test",
		TLS:              TLSDisabled,
		ConnectTimeout:   5 * time.Second,
		GreetingTimeout:  5 * time.Second,
		MailTimeout:      5 * time.Second,
		RcptTimeout:      5 * time.Second,
		DataInitTimeout:  5 * time.Second,
		DataBlockTimeout: 5 * time.Second,
		DataTermTimeout:  5 * time.Second,
	}
	cfg.EnsureDefaults()
	return &cfg
}

func clientTestCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func clientDial(t *testing.T, cfg *ClientConfig, addr netip.AddrPort) *ClientConn {
	t.Helper()
	c, err := Dial(clientTestCtx(t), cfg, "mx.test", addr)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// clientWantReply checks a reply's code and enhanced code.
func clientWantReply(t *testing.T, what string, got *smtperr.Error, code int, enhanced string) {
	t.Helper()
	if got == nil {
		t.Errorf("%s: no reply, want %d %s", what, code, enhanced)
		return
	}
	if got.Code != code || got.Enhanced != enhanced {
		t.Errorf("%s: got %v, want %d %s", what, got, code, enhanced)
	}
}

// clientWantSMTPErr checks that err carries an *smtperr.Error.
func clientWantSMTPErr(t *testing.T, err error, code int, enhanced string) *smtperr.Error {
	t.Helper()
	var e *smtperr.Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) carries no *smtperr.Error, want %d %s", err, err, code, enhanced)
	}
	clientWantReply(t, "error", e, code, enhanced)
	return e
}

var clientEnv3 = &ClientEnvelope{From: "s@x.test", Rcpts: []string{"bad@y.test", "busy@y.test", "ok@y.test"}}

func TestClientGreetingAndEHLO(t *testing.T) {
	addr, wait := clientScript(t, func(p *clientPeer) {
		p.send("220-mx.test ESMTP", "220-second line", "220 third")
		p.expect("EHLO client.test\r\n")
		p.send("250-mx.test greets client.test", "250-PIPELINING", "250-SIZE 35882577", "250-8BITMIME",
			"250-auth PLAIN LOGIN", "250 ENHANCEDSTATUSCODES")
		p.quit()
	})
	c := clientDial(t, clientTestConfig(), addr)
	if got, want := c.Greeting(), "mx.test ESMTP\nsecond line\nthird"; got != want {
		t.Errorf("Greeting = %q, want %q", got, want)
	}
	want := map[string]string{"PIPELINING": "", "SIZE": "35882577", "8BITMIME": "", "AUTH": "PLAIN LOGIN", "ENHANCEDSTATUSCODES": ""}
	got := c.Extensions()
	if len(got) != len(want) {
		t.Errorf("Extensions = %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("Extensions[%s] = %q, want %q", k, got[k], v)
		}
	}
	if !c.Has("pipelining") || !c.Has("AUTH") || c.Has("STARTTLS") {
		t.Errorf("Has: wrong answers for %v", got)
	}
	if c.MaxSize() != 35882577 {
		t.Errorf("MaxSize = %d", c.MaxSize())
	}
	if c.RemoteAddr() != addr {
		t.Errorf("RemoteAddr = %v, want %v", c.RemoteAddr(), addr)
	}
	if _, _, _, ok := c.TLSInfo(); ok {
		t.Error("TLSInfo reports TLS on a plain connection")
	}
	if !c.Usable() {
		t.Error("fresh connection not usable")
	}
	if err := c.Quit(); err != nil {
		t.Errorf("Quit: %v", err)
	}
	if c.Usable() {
		t.Error("usable after Quit")
	}
	wait()
	if _, err := c.Send(clientTestCtx(t), clientEnv3, nil); !errors.Is(err, ErrClientUnusable) {
		t.Errorf("Send after Quit: %v, want ErrClientUnusable", err)
	}
}

func TestClientHELOFallback(t *testing.T) {
	addr, wait := clientScript(t, func(p *clientPeer) {
		p.send("220 mx.test")
		p.expect("EHLO client.test\r\n")
		p.send("502 5.5.2 command not recognized")
		p.expect("HELO client.test\r\n")
		p.send("250 mx.test")
		// The 8-bit message is refused before MAIL: the next command is
		// the plain message's MAIL, without parameters.
		body := p.transaction(false,
			[]string{"MAIL FROM:<>\r\n", "RCPT TO:<b@y.test>\r\n", "DATA\r\n"},
			[]string{"250 ok", "250 ok", "354 go"}, "250 queued")
		if body != "hi\r\n.\r\n" {
			t.Errorf("body on the wire %q", body)
		}
		p.quit()
	})
	c := clientDial(t, clientTestConfig(), addr)
	if len(c.Extensions()) != 0 || c.Has("8BITMIME") {
		t.Errorf("extensions after HELO: %v", c.Extensions())
	}
	ctx := clientTestCtx(t)
	_, err := c.Send(ctx, &ClientEnvelope{Rcpts: []string{"b@y.test"}, Body8Bit: true}, []byte("caf\xc3\xa9\r\n"))
	if e := clientWantSMTPErr(t, err, 554, "5.6.3"); !e.Permanent() {
		t.Error("8BITMIME refusal is not permanent")
	}
	res, err := c.Send(ctx, &ClientEnvelope{Rcpts: []string{"b@y.test"}}, []byte("hi\r\n"))
	if err != nil {
		t.Fatalf("Send: %v", err)
	}
	clientWantReply(t, "DATA", res.Data, 250, "")
	clientWantReply(t, "outcome", res.Outcome(0), 250, "")
	c.Quit()
	wait()
}

func TestClientMixedRecipients(t *testing.T) {
	for _, pipe := range []bool{true, false} {
		name := "lockstep"
		if pipe {
			name = "pipelined"
		}
		t.Run(name, func(t *testing.T) {
			ext := []string{"ENHANCEDSTATUSCODES"}
			if pipe {
				ext = append(ext, "PIPELINING")
			}
			addr, wait := clientScript(t, func(p *clientPeer) {
				p.hello(ext...)
				// A pipelining client must send DATA before it gets any
				// reply: the peer answers only then, so a lock-step client
				// would time out here.
				body := p.transaction(pipe,
					[]string{"MAIL FROM:<s@x.test>\r\n", "RCPT TO:<bad@y.test>\r\n", "RCPT TO:<busy@y.test>\r\n", "RCPT TO:<ok@y.test>\r\n", "DATA\r\n"},
					[]string{"250 2.1.0 sender ok", "550 5.1.1 no such user", "451 4.3.0 try later", "250 2.1.5 ok", "354 go ahead"},
					"250 2.0.0 queued as X")
				if body != "Subject: t\r\n\r\nbody\r\n.\r\n" {
					t.Errorf("body on the wire %q", body)
				}
				p.quit()
			})
			c := clientDial(t, clientTestConfig(), addr)
			res, err := c.Send(clientTestCtx(t), clientEnv3, []byte("Subject: t\r\n\r\nbody\r\n"))
			if err != nil {
				t.Fatalf("Send: %v", err)
			}
			clientWantReply(t, "MAIL", res.Mail, 250, "2.1.0")
			if len(res.Rcpts) != 3 {
				t.Fatalf("%d RCPT replies", len(res.Rcpts))
			}
			clientWantReply(t, "rcpt 0", res.Outcome(0), 550, "5.1.1")
			clientWantReply(t, "rcpt 1", res.Outcome(1), 451, "4.3.0")
			clientWantReply(t, "rcpt 2", res.Outcome(2), 250, "2.0.0")
			if res.Outcome(0).Message != "no such user" || !res.Outcome(0).Permanent() || !res.Outcome(1).Temporary() {
				t.Errorf("outcomes %v / %v", res.Outcome(0), res.Outcome(1))
			}
			if res.Data.Message != "queued as X" {
				t.Errorf("Data = %v", res.Data)
			}
			if res.Timing.Envelope <= 0 || res.Timing.Acked <= 0 {
				t.Errorf("timing not recorded: %+v", res.Timing)
			}
			if !c.Usable() {
				t.Error("not usable after a complete transaction")
			}
			c.Quit()
			wait()
		})
	}
}

func TestClientAllRecipientsRefused(t *testing.T) {
	env := &ClientEnvelope{From: "s@x.test", Rcpts: []string{"a@y.test", "b@y.test"}}
	cmds := []string{"MAIL FROM:<s@x.test>\r\n", "RCPT TO:<a@y.test>\r\n", "RCPT TO:<b@y.test>\r\n", "DATA\r\n"}
	second := &ClientEnvelope{From: "s@x.test", Rcpts: []string{"c@y.test"}}
	secondCmds := []string{"MAIL FROM:<s@x.test>\r\n", "RCPT TO:<c@y.test>\r\n", "DATA\r\n"}
	ok3 := []string{"250 ok", "250 ok", "354 go"}

	t.Run("pipelined DATA refused", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING")
			p.transaction(true, cmds, []string{"250 ok", "550 5.1.1 no", "550 5.1.1 no", "554 5.5.1 no valid recipients"}, "")
			// No body: the next thing is the next transaction, which
			// starts with RSET because MAIL was accepted.
			p.expect("RSET\r\n")
			p.transaction(true, secondCmds, append([]string{"250 reset"}, ok3...), "250 queued")
			p.quit()
		})
		c := clientDial(t, clientTestConfig(), addr)
		res, err := c.Send(clientTestCtx(t), env, []byte("body\r\n"))
		if err != nil {
			t.Fatal(err)
		}
		if res.Data != nil {
			t.Errorf("Data = %v, want nil", res.Data)
		}
		clientWantReply(t, "rcpt 0", res.Outcome(0), 550, "5.1.1")
		clientWantReply(t, "rcpt 1", res.Outcome(1), 550, "5.1.1")
		res, err = c.Send(clientTestCtx(t), second, []byte("x\r\n"))
		if err != nil {
			t.Fatal(err)
		}
		clientWantReply(t, "second", res.Outcome(0), 250, "")
		c.Quit()
		wait()
	})

	t.Run("pipelined DATA accepted anyway", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING")
			// A lone dot, not the body (RFC 2920 §3.1).
			if body := p.transaction(true, cmds, []string{"250 ok", "550 no", "550 no", "354 go"}, "554 5.5.1 no valid recipients"); body != ".\r\n" {
				t.Errorf("body on the wire %q, want a lone dot", body)
			}
			p.quit()
		})
		c := clientDial(t, clientTestConfig(), addr)
		res, err := c.Send(clientTestCtx(t), env, []byte("body\r\n"))
		if err != nil {
			t.Fatal(err)
		}
		if res.Data != nil || !c.Usable() {
			t.Errorf("Data = %v, usable %v", res.Data, c.Usable())
		}
		clientWantReply(t, "rcpt 1", res.Outcome(1), 550, "")
		c.Quit()
		wait()
	})

	t.Run("lockstep", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello()
			p.transaction(false, cmds[:3], []string{"250 ok", "550 no", "451 later"}, "")
			// No DATA; the next transaction starts with RSET.
			p.expect("RSET\r\n")
			p.quiet()
			p.send("250 reset")
			p.transaction(false, secondCmds, ok3, "250 queued")
			p.quit()
		})
		c := clientDial(t, clientTestConfig(), addr)
		res, err := c.Send(clientTestCtx(t), env, []byte("body\r\n"))
		if err != nil {
			t.Fatal(err)
		}
		if res.Data != nil {
			t.Errorf("Data = %v, want nil", res.Data)
		}
		clientWantReply(t, "rcpt 1", res.Outcome(1), 451, "")
		res, err = c.Send(clientTestCtx(t), second, []byte("x\r\n"))
		if err != nil {
			t.Fatal(err)
		}
		clientWantReply(t, "second", res.Outcome(0), 250, "")
		c.Quit()
		wait()
	})
}

func TestClientMailRefused(t *testing.T) {
	for _, pipe := range []bool{true, false} {
		addr, wait := clientScript(t, func(p *clientPeer) {
			if pipe {
				p.hello("PIPELINING")
				p.transaction(true, []string{"MAIL", "RCPT", "RCPT", "RCPT", "DATA"},
					[]string{"553 5.1.8 bad sender", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL"}, "")
			} else {
				p.hello()
				p.transaction(false, []string{"MAIL"}, []string{"553 5.1.8 bad sender"}, "")
			}
			p.quit() // no RSET needed, nothing else sent
		})
		c := clientDial(t, clientTestConfig(), addr)
		res, err := c.Send(clientTestCtx(t), clientEnv3, []byte("x\r\n"))
		if err != nil {
			t.Fatal(err)
		}
		for i := range clientEnv3.Rcpts {
			clientWantReply(t, "outcome", res.Outcome(i), 553, "5.1.8")
		}
		if res.Data != nil {
			t.Errorf("Data = %v", res.Data)
		}
		c.Quit()
		wait()
	}
}

func TestClientGreetingRefused(t *testing.T) {
	addr, wait := clientScript(t, func(p *clientPeer) {
		p.send("421 4.3.2 too busy, try later")
	})
	_, err := Dial(clientTestCtx(t), clientTestConfig(), "mx.test", addr)
	if e := clientWantSMTPErr(t, err, 421, "4.3.2"); !e.Temporary() || !smtperr.IsTemporary(err) {
		t.Errorf("421 greeting not temporary: %v", err)
	}
	wait()

	addr, wait = clientScript(t, func(p *clientPeer) {
		p.send("554 5.7.1 no service for you")
		p.expect("QUIT\r\n") // RFC 5321 §3.1
	})
	_, err = Dial(clientTestCtx(t), clientTestConfig(), "mx.test", addr)
	if e := clientWantSMTPErr(t, err, 554, "5.7.1"); !e.Permanent() {
		t.Errorf("554 greeting not permanent: %v", err)
	}
	wait()

	addr, wait = clientScript(t, func(p *clientPeer) {
		p.send("220 mx.test")
		p.expect("EHLO")
		p.send("421 4.7.0 go away")
	})
	_, err = Dial(clientTestCtx(t), clientTestConfig(), "mx.test", addr)
	clientWantSMTPErr(t, err, 421, "4.7.0")
	wait()
}

func TestClientTooManyRecipients(t *testing.T) {
	addr, wait := clientScript(t, func(p *clientPeer) {
		p.hello("PIPELINING", "ENHANCEDSTATUSCODES")
		p.transaction(true, []string{"MAIL", "RCPT", "RCPT", "RCPT", "DATA"},
			[]string{"250 2.1.0 ok", "250 2.1.5 ok", "250 2.1.5 ok", "452 4.5.3 too many recipients", "354 go"},
			"250 2.0.0 queued")
		p.quit()
	})
	c := clientDial(t, clientTestConfig(), addr)
	res, err := c.Send(clientTestCtx(t), clientEnv3, []byte("x\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	clientWantReply(t, "rcpt 0", res.Outcome(0), 250, "2.0.0")
	clientWantReply(t, "rcpt 1", res.Outcome(1), 250, "2.0.0")
	clientWantReply(t, "rcpt 2", res.Outcome(2), 452, "4.5.3")
	if !res.Outcome(2).Temporary() {
		t.Error("452 not temporary")
	}
	if res.Rcpts[0] != res.Rcpts[1] {
		t.Error("identical RCPT replies were not shared")
	}
	c.Quit()
	wait()
}

func TestClientDataRefusedAfterBody(t *testing.T) {
	addr, wait := clientScript(t, func(p *clientPeer) {
		p.hello("PIPELINING")
		cmds := []string{"MAIL", "RCPT", "DATA"}
		p.transaction(true, cmds, []string{"250 ok", "250 ok", "354 go"}, "554 5.7.1 message refused: spam")
		// The transaction ended with the final reply: the connection is
		// reused without RSET.
		p.transaction(true, cmds, []string{"250 ok", "250 ok", "354 go"}, "250 2.0.0 queued")
		p.quit()
	})
	c := clientDial(t, clientTestConfig(), addr)
	env := &ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test"}}
	res, err := c.Send(clientTestCtx(t), env, []byte("x\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	if clientWantReply(t, "DATA", res.Data, 554, "5.7.1"); !res.Outcome(0).Permanent() || !c.Usable() {
		t.Errorf("outcome %v, usable %v", res.Outcome(0), c.Usable())
	}
	res, err = c.Send(clientTestCtx(t), env, []byte("x\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	clientWantReply(t, "second", res.Outcome(0), 250, "2.0.0")
	c.Quit()
	wait()
}

func TestClient421MidTransaction(t *testing.T) {
	for _, pipe := range []bool{true, false} {
		addr, wait := clientScript(t, func(p *clientPeer) {
			if pipe {
				p.hello("PIPELINING")
				for _, c := range []string{"MAIL", "RCPT", "RCPT", "RCPT", "DATA"} {
					p.expect(c)
				}
				p.send("250 ok", "250 ok", "421 4.4.2 shutting down")
			} else {
				p.hello()
				p.transaction(false, []string{"MAIL", "RCPT", "RCPT"}, []string{"250 ok", "250 ok", "421 4.4.2 shutting down"}, "")
			}
		})
		c := clientDial(t, clientTestConfig(), addr)
		res, err := c.Send(clientTestCtx(t), clientEnv3, []byte("x\r\n"))
		if err != nil {
			t.Fatalf("Send: %v", err)
		}
		if c.Usable() {
			t.Error("usable after 421")
		}
		// Accepted recipient 0 gets the 421 through DATA; 1 and 2 directly.
		for i := range clientEnv3.Rcpts {
			clientWantReply(t, "outcome", res.Outcome(i), 421, "4.4.2")
		}
		wait()
	}
}

func TestClientDotStuffingOnTheWire(t *testing.T) {
	cases := clientBodyCases()
	addr, wait := clientScript(t, func(p *clientPeer) {
		p.hello("PIPELINING")
		for _, tc := range cases {
			got := p.transaction(true, []string{"MAIL", "RCPT", "DATA"}, []string{"250 ok", "250 ok", "354 go"}, "250 queued")
			if got != tc.wire {
				t.Errorf("body %q: on the wire %q, want %q", tc.body, got, tc.wire)
			}
		}
		p.quit()
	})
	c := clientDial(t, clientTestConfig(), addr)
	env := &ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test"}}
	for _, tc := range cases {
		if _, err := c.Send(clientTestCtx(t), env, []byte(tc.body)); err != nil {
			t.Fatalf("Send(%q): %v", tc.body, err)
		}
	}
	c.Quit()
	wait()
}

func TestClientSize(t *testing.T) {
	addr, wait := clientScript(t, func(p *clientPeer) {
		p.hello("PIPELINING", "SIZE 1000")
		// The two oversized messages are refused without a command.
		p.transaction(true, []string{"MAIL FROM:<a@x.test> SIZE=500\r\n", "RCPT", "DATA"}, []string{"250 ok", "250 ok", "354 go"}, "250 queued")
		p.quit()
	})
	c := clientDial(t, clientTestConfig(), addr)
	env := &ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test"}}
	ctx := clientTestCtx(t)
	_, err := c.Send(ctx, env, bytes.Repeat([]byte("x"), 2000))
	if e := clientWantSMTPErr(t, err, 552, "5.3.4"); !e.Permanent() {
		t.Error("size refusal not permanent")
	}
	big := *env
	big.Size = 5000 // Size, not len(body), is what counts
	_, err = c.Send(ctx, &big, []byte("x\r\n"))
	clientWantSMTPErr(t, err, 552, "5.3.4")
	if !c.Usable() {
		t.Fatal("refusal before MAIL made the connection unusable")
	}
	if _, err := c.Send(ctx, env, bytes.Repeat([]byte("y"), 500)); err != nil {
		t.Fatal(err)
	}
	c.Quit()
	wait()
}

func TestClient8BitAndUTF8(t *testing.T) {
	t.Run("missing", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING", "SIZE")
			p.quit() // every message is refused before MAIL
		})
		c := clientDial(t, clientTestConfig(), addr)
		ctx := clientTestCtx(t)
		for _, tc := range []struct {
			env      ClientEnvelope
			enhanced string
		}{
			{ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test"}, Body8Bit: true}, "5.6.3"},
			{ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test"}, SMTPUTF8: true}, "5.6.7"},
			{ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test", "jürgen@y.test"}}, "5.6.7"},
			{ClientEnvelope{From: "δ@x.test", Rcpts: []string{"b@y.test"}}, "5.6.7"},
		} {
			_, err := c.Send(ctx, &tc.env, []byte("caf\xc3\xa9\r\n"))
			if e := clientWantSMTPErr(t, err, 554, tc.enhanced); !e.Permanent() {
				t.Errorf("%+v: not permanent", tc.env)
			}
		}
		if c.MaxSize() != 0 {
			t.Errorf("MaxSize = %d for a bare SIZE", c.MaxSize())
		}
		c.Quit()
		wait()
	})
	t.Run("offered", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING", "8BITMIME", "SMTPUTF8")
			// No DSN offered: RET, ENVID and the RCPT parameters are left out.
			p.transaction(true,
				[]string{"MAIL FROM:<a@x.test> BODY=8BITMIME SMTPUTF8\r\n", "RCPT TO:<jürgen@y.test>\r\n", "DATA\r\n"},
				[]string{"250 ok", "250 ok", "354 go"}, "250 queued")
			p.quit()
		})
		c := clientDial(t, clientTestConfig(), addr)
		env := &ClientEnvelope{From: "a@x.test", Rcpts: []string{"jürgen@y.test"}, Body8Bit: true,
			Ret: "FULL", EnvID: "q1", RcptParams: []string{"NOTIFY=NEVER"}}
		if _, err := c.Send(clientTestCtx(t), env, []byte("caf\xc3\xa9\r\n")); err != nil {
			t.Fatal(err)
		}
		c.Quit()
		wait()
	})
	t.Run("declared SMTPUTF8, not needed", func(t *testing.T) {
		// A server without SMTPUTF8 gets, without the parameter, a message
		// declared SMTPUTF8 whose addresses and header section are ASCII
		// (its body 8-bit only with BODY=8BITMIME offered); one that needs
		// it is still refused.
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING", "8BITMIME")
			p.transaction(true,
				[]string{"MAIL FROM:<a@x.test>\r\n", "RCPT TO:<b@y.test>\r\n", "DATA\r\n"},
				[]string{"250 ok", "250 ok", "354 go"}, "250 queued")
			p.transaction(true,
				[]string{"MAIL FROM:<a@x.test> BODY=8BITMIME\r\n", "RCPT TO:<b@y.test>\r\n", "DATA\r\n"},
				[]string{"250 ok", "250 ok", "354 go"}, "250 queued")
			p.quit()
		})
		c := clientDial(t, clientTestConfig(), addr)
		ctx := clientTestCtx(t)
		for _, tc := range []struct {
			env  ClientEnvelope
			body string
			sent bool
		}{
			{ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test"}, SMTPUTF8: true}, "Subject: hi\r\n\r\nplain\r\n", true},
			{ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test"}, SMTPUTF8: true, Body8Bit: true}, "Subject: hi\r\n\r\ncaf\xc3\xa9\r\n", true},
			{ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test"}, SMTPUTF8: true}, "Subject: caf\xc3\xa9\r\n\r\nplain\r\n", false},
			{ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test"}, SMTPUTF8: true}, "Subject: hi\r\n\r\ncaf\xc3\xa9\r\n", false},
			{ClientEnvelope{From: "a@x.test", Rcpts: []string{"jürgen@y.test"}, SMTPUTF8: true}, "Subject: hi\r\n\r\nplain\r\n", false},
		} {
			_, err := c.Send(ctx, &tc.env, []byte(tc.body))
			if tc.sent {
				if err != nil {
					t.Fatalf("%+v %q: %v", tc.env, tc.body, err)
				}
				continue
			}
			clientWantSMTPErr(t, err, 554, "5.6.7")
		}
		c.Quit()
		wait()
	})
	t.Run("dsn", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING", "DSN")
			p.transaction(true,
				[]string{"MAIL FROM:<a@x.test> RET=HDRS ENVID=q+2B1+20+3Dx\r\n", "RCPT TO:<b@y.test> NOTIFY=FAILURE ORCPT=rfc822;b@y.test\r\n", "RCPT TO:<c@y.test>\r\n", "DATA\r\n"},
				[]string{"250 ok", "250 ok", "250 ok", "354 go"}, "250 queued")
			p.quit()
		})
		c := clientDial(t, clientTestConfig(), addr)
		env := &ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test", "c@y.test"}, Ret: "hdrs", EnvID: "q+1 =x",
			RcptParams: []string{"NOTIFY=FAILURE ORCPT=rfc822;b@y.test", ""}}
		if _, err := c.Send(clientTestCtx(t), env, []byte("x\r\n")); err != nil {
			t.Fatal(err)
		}
		c.Quit()
		wait()
	})
}

func TestClientInvalidEnvelope(t *testing.T) {
	addr, wait := clientScript(t, func(p *clientPeer) {
		p.hello("PIPELINING", "DSN")
		p.quit()
	})
	c := clientDial(t, clientTestConfig(), addr)
	for _, env := range []ClientEnvelope{
		{From: "a@x.test"},
		{From: "a@x.test>\r\nRCPT TO:<evil@z.test", Rcpts: []string{"b@y.test"}},
		{From: "a@x.test", Rcpts: []string{"b@y.test\r\nDATA"}},
		{From: "a@x.test", Rcpts: []string{""}},
		{From: "a@x.test", Rcpts: []string{"b@y.test"}, RcptParams: []string{"a", "b"}},
		{From: "a@x.test", Rcpts: []string{"b@y.test"}, RcptParams: []string{"NOTIFY=NEVER\r\nQUIT"}},
		{From: "a@x.test", Rcpts: []string{"b@y.test"}, Ret: "ALL"},
	} {
		if _, err := c.Send(clientTestCtx(t), &env, []byte("x\r\n")); !errors.Is(err, ErrClientEnvelope) {
			t.Errorf("%+v: err %v, want ErrClientEnvelope", env, err)
		}
	}
	if !c.Usable() {
		t.Error("invalid envelope made the connection unusable")
	}
	c.Quit()
	wait()
}

func TestClientLocalAddr(t *testing.T) {
	addr, wait := clientScript(t, func(p *clientPeer) {
		if got := p.conn.RemoteAddr().(*net.TCPAddr).IP.String(); got != "127.0.0.2" {
			t.Errorf("connection from %s, want 127.0.0.2", got)
		}
		p.hello()
		p.quit()
	})
	cfg := clientTestConfig()
	cfg.LocalAddr = netip.MustParseAddr("127.0.0.2")
	c := clientDial(t, cfg, addr)
	c.Quit()
	wait()
}

func TestClientPortDefault(t *testing.T) {
	addr, wait := clientScript(t, func(p *clientPeer) {
		p.hello()
		p.quit()
	})
	cfg := clientTestConfig()
	cfg.Port = int(addr.Port())
	c := clientDial(t, cfg, netip.AddrPortFrom(addr.Addr(), 0))
	if c.RemoteAddr() != addr {
		t.Errorf("RemoteAddr %v, want %v", c.RemoteAddr(), addr)
	}
	c.Quit()
	wait()
}

func TestClientReset(t *testing.T) {
	addr, wait := clientScript(t, func(p *clientPeer) {
		p.hello("PIPELINING")
		p.expect("RSET\r\n")
		p.send("250 2.0.0 flushed")
		p.expect("RSET\r\n")
		p.send("421 4.3.0 bye")
	})
	c := clientDial(t, clientTestConfig(), addr)
	if err := c.Reset(clientTestCtx(t)); err != nil {
		t.Fatal(err)
	}
	err := c.Reset(clientTestCtx(t))
	clientWantSMTPErr(t, err, 421, "4.3.0")
	if c.Usable() {
		t.Error("usable after RSET got 421")
	}
	if err := c.Reset(clientTestCtx(t)); !errors.Is(err, ErrClientUnusable) {
		t.Errorf("Reset on unusable: %v", err)
	}
	wait()
}

func TestClientStartTLSScripted(t *testing.T) {
	t.Run("not offered, opportunistic", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING")
			p.quit()
		})
		cfg := clientTestConfig()
		cfg.TLS = TLSOpportunistic
		c := clientDial(t, cfg, addr)
		if _, _, _, ok := c.TLSInfo(); ok {
			t.Error("TLS reported")
		}
		c.Quit()
		wait()
	})
	t.Run("refused, opportunistic", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("STARTTLS")
			p.expect("STARTTLS\r\n")
			p.send("454 4.7.0 TLS not available")
			p.quit()
		})
		cfg := clientTestConfig()
		cfg.TLS = TLSOpportunistic
		c := clientDial(t, cfg, addr)
		if !c.Usable() {
			t.Error("not usable after 454 to STARTTLS")
		}
		c.Quit()
		wait()
	})
	for _, mode := range []TLSMode{TLSOpportunistic, TLSRequired} {
		t.Run("handshake fails, "+mode.String(), func(t *testing.T) {
			addr, wait := clientScript(t, func(p *clientPeer) {
				p.hello("STARTTLS")
				p.expect("STARTTLS\r\n")
				p.send("220 2.0.0 go ahead")
				p.r.Peek(1) // the ClientHello
				p.send("this is not TLS")
				p.waitClose()
			})
			cfg := clientTestConfig()
			cfg.TLS = mode
			_, err := Dial(clientTestCtx(t), cfg, "mx.test", addr)
			if !errors.Is(err, ErrClientTLS) {
				t.Errorf("err %v, want ErrClientTLS", err)
			}
			if e := clientWantSMTPErr(t, err, 421, "4.7.5"); !e.Temporary() {
				t.Error("not temporary")
			}
			wait()
		})
	}
	t.Run("response injection", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("STARTTLS")
			p.expect("STARTTLS\r\n")
			p.send("220 2.0.0 go ahead", "250-injected", "250 AUTH PLAIN")
			p.waitClose()
		})
		cfg := clientTestConfig()
		cfg.TLS = TLSOpportunistic
		_, err := Dial(clientTestCtx(t), cfg, "mx.test", addr)
		if !errors.Is(err, ErrClientProtocol) || !smtperr.IsTemporary(err) {
			t.Errorf("err %v, want a temporary ErrClientProtocol", err)
		}
		wait()
	})
	t.Run("required, not offered", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING")
			p.expect("QUIT\r\n")
			p.waitClose()
		})
		cfg := clientTestConfig()
		cfg.TLS = TLSRequired
		_, err := Dial(clientTestCtx(t), cfg, "mx.test", addr)
		if !errors.Is(err, ErrClientTLS) {
			t.Errorf("err %v, want ErrClientTLS", err)
		}
		if e := clientWantSMTPErr(t, err, 421, "4.7.10"); !e.Temporary() {
			t.Error("not temporary")
		}
		wait()
	})
	t.Run("required, refused", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("STARTTLS")
			p.expect("STARTTLS\r\n")
			p.send("454 4.7.0 TLS not available")
			p.expect("QUIT\r\n")
			p.waitClose()
		})
		cfg := clientTestConfig()
		cfg.TLS = TLSRequired
		_, err := Dial(clientTestCtx(t), cfg, "mx.test", addr)
		clientWantSMTPErr(t, err, 421, "4.7.10")
		wait()
	})
}

func TestClientTimeouts(t *testing.T) {
	t.Run("greeting", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) { p.waitClose() })
		cfg := clientTestConfig()
		cfg.GreetingTimeout = 100 * time.Millisecond
		_, err := Dial(clientTestCtx(t), cfg, "mx.test", addr)
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("err %v, want a deadline error", err)
		}
		wait()
	})
	t.Run("MAIL", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello()
			p.expect("MAIL")
			p.waitClose()
		})
		cfg := clientTestConfig()
		cfg.MailTimeout = 100 * time.Millisecond
		c := clientDial(t, cfg, addr)
		res, err := c.Send(clientTestCtx(t), clientEnv3, []byte("x\r\n"))
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("err %v, want a deadline error", err)
		}
		if c.Usable() || res == nil || res.Mail != nil || res.Outcome(0) != nil {
			t.Errorf("after timeout: usable %v, result %+v", c.Usable(), res)
		}
		c.Close()
		wait()
	})
	t.Run("final dot", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING")
			p.transaction(true, []string{"MAIL", "RCPT", "DATA"}, []string{"250 ok", "250 ok", "354 go"}, "")
			p.waitClose() // never answers the dot
		})
		cfg := clientTestConfig()
		cfg.DataTermTimeout = 100 * time.Millisecond
		c := clientDial(t, cfg, addr)
		res, err := c.Send(clientTestCtx(t), &ClientEnvelope{Rcpts: []string{"b@y.test"}}, []byte("x\r\n"))
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("err %v, want a deadline error", err)
		}
		if res == nil || res.Rcpts[0] == nil || res.Outcome(0) != nil || c.Usable() {
			t.Errorf("after timeout: usable %v, result %+v", c.Usable(), res)
		}
		c.Close()
		wait()
	})
	t.Run("context", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello()
			p.expect("MAIL")
			p.waitClose()
		})
		cfg := clientTestConfig()
		cfg.MailTimeout = time.Minute // only the context can end the wait
		c := clientDial(t, cfg, addr)
		ctx, cancel := context.WithCancel(clientTestCtx(t))
		time.AfterFunc(100*time.Millisecond, cancel)
		_, err := c.Send(ctx, clientEnv3, []byte("x\r\n"))
		if !errors.Is(err, context.Canceled) || c.Usable() {
			t.Errorf("err %v (usable %v), want context.Canceled", err, c.Usable())
		}
		wait()
	})
	t.Run("context in Dial", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) { p.waitClose() })
		cfg := clientTestConfig()
		cfg.GreetingTimeout = time.Minute
		ctx, cancel := context.WithCancel(clientTestCtx(t))
		time.AfterFunc(100*time.Millisecond, cancel)
		_, err := Dial(ctx, cfg, "mx.test", addr)
		if !errors.Is(err, context.Canceled) {
			t.Errorf("err %v, want context.Canceled", err)
		}
		wait()
	})
}

func TestClientProtocolErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		reply string
	}{
		{"garbage", "hello there"},
		{"code changes", "250-ok\r\n251 ok"},
		{"3xx to MAIL", "354 what"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, wait := clientScript(t, func(p *clientPeer) {
				p.hello()
				p.expect("MAIL")
				p.send(tc.reply)
				p.waitClose()
			})
			c := clientDial(t, clientTestConfig(), addr)
			_, err := c.Send(clientTestCtx(t), clientEnv3, []byte("x\r\n"))
			if !errors.Is(err, ErrClientProtocol) || c.Usable() {
				t.Errorf("err %v (usable %v), want ErrClientProtocol", err, c.Usable())
			}
			c.Close()
			wait()
		})
	}
}

// clientBodyCase is a message body and its form on the wire.
type clientBodyCase struct{ body, wire string }

func clientBodyCases() []clientBodyCase {
	return []clientBodyCase{
		{"Subject: x\r\n\r\n.hidden\r\n..two\r\n.\r\nend\r\n", "Subject: x\r\n\r\n..hidden\r\n...two\r\n..\r\nend\r\n.\r\n"},
		{"a\nb\n.c\n", "a\r\nb\r\n..c\r\n.\r\n"},
		{"a\rb\r\n\r.x", "a\r\nb\r\n\r\n..x\r\n.\r\n"},
		{"no newline", "no newline\r\n.\r\n"},
		{"", ".\r\n"},
		{"\r\n\n", "\r\n\r\n.\r\n"},
		{"x\r", "x\r\n.\r\n"},
		{".", "..\r\n.\r\n"},
		{"a\r\r\nb", "a\r\n\r\nb\r\n.\r\n"},
		{"ends\r\n.", "ends\r\n..\r\n.\r\n"},
	}
}

func TestClientWriteBody(t *testing.T) {
	for _, tc := range clientBodyCases() {
		if got := clientBodyWire([]byte(tc.body)); got != tc.wire {
			t.Errorf("%q: got %q, want %q", tc.body, got, tc.wire)
		}
		if ref := clientBodyRef(tc.body); ref != tc.wire {
			t.Errorf("%q: reference gives %q, want %q", tc.body, ref, tc.wire)
		}
	}
}

func FuzzClientWriteBody(f *testing.F) {
	for _, tc := range clientBodyCases() {
		f.Add(tc.body)
	}
	f.Fuzz(func(t *testing.T, body string) {
		if got, want := clientBodyWire([]byte(body)), clientBodyRef(body); got != want {
			t.Fatalf("%q: got %q, want %q", body, got, want)
		}
	})
}

func clientBodyWire(body []byte) string {
	var b bytes.Buffer
	w := bufio.NewWriterSize(&b, 16)
	clientWriteBody(w, body)
	w.Flush()
	return b.String()
}

// clientBodyRef is a simple reference for clientWriteBody.
func clientBodyRef(body string) string {
	s := strings.ReplaceAll(strings.ReplaceAll(body, "\r\n", "\n"), "\r", "\n")
	if s == "" {
		return ".\r\n"
	}
	s = strings.TrimSuffix(s, "\n")
	var b strings.Builder
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, ".") {
			b.WriteByte('.')
		}
		b.WriteString(l)
		b.WriteString("\r\n")
	}
	b.WriteString(".\r\n")
	return b.String()
}

func TestClientHeloName(t *testing.T) {
	for in, want := range map[string]string{
		"mta.example.org":  "mta.example.org",
		"192.0.2.1":        "[192.0.2.1]",
		"2001:db8::1":      "[IPv6:2001:db8::1]",
		"::ffff:192.0.2.1": "[192.0.2.1]",
	} {
		if got := clientHeloName(in); got != want {
			t.Errorf("%s: got %s, want %s", in, got, want)
		}
	}
}

// TestClientEarlyReplyDuringData: a server that refuses a message while it
// is still being sent (552, a size limit it did not advertise) and closes
// the connection makes the body's write fail; the refusal it sent first is
// the outcome, not a network error retried until the message expires.
func TestClientEarlyReplyDuringData(t *testing.T) {
	for _, pipe := range []bool{true, false} {
		t.Run(fmt.Sprintf("pipelining=%v", pipe), func(t *testing.T) {
			addr, wait := clientScript(t, func(p *clientPeer) {
				if pipe {
					p.hello("PIPELINING")
				} else {
					p.hello()
				}
				p.transaction(pipe, []string{"MAIL FROM:<a@x.test>\r\n", "RCPT TO:<b@y.test>\r\n", "DATA\r\n"},
					[]string{"250 ok", "250 ok", "354 go"}, "")
				buf := make([]byte, 64<<10)
				if _, err := io.ReadFull(p.r, buf); err != nil {
					t.Errorf("reading the body: %v", err)
				}
				p.send("552 5.3.4 Message size exceeds fixed limit")
				time.Sleep(20 * time.Millisecond)
			})
			c := clientDial(t, clientTestConfig(), addr)
			body := bytes.Repeat([]byte(strings.Repeat("x", 76)+"\r\n"), (16<<20)/78)
			env := &ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test"}}
			res, err := c.Send(clientTestCtx(t), env, body)
			if err != nil {
				t.Fatalf("Send: %v", err)
			}
			clientWantReply(t, "outcome", res.Outcome(0), 552, "5.3.4")
			if c.Usable() {
				t.Error("connection still usable")
			}
			wait()
		})
	}
}

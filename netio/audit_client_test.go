package netio

// Audit of the outbound client against odd, hostile and slow receiving
// servers, each a scripted TCP peer on 127.0.0.1 (clientScript). Every case
// checks what the engine would record for each recipient (auditClientFate, the
// rule of engine.classify): a transaction cut short must leave its
// recipients deferred, never delivered, and a reply that says nothing about
// the message (RSET, a server going away) must never bounce it.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// auditClientFate is what the engine records for recipient i of a transaction
// that returned res and err: "delivered", "deferred" or "bounced" (the
// rule of engine.classify applied to SendResult.Outcome).
func auditClientFate(res *SendResult, err error, i int) string {
	var reply *smtperr.Error
	if res != nil && res.Rcpts != nil {
		reply = res.Outcome(i)
	}
	if reply == nil {
		if err == nil {
			return "deferred"
		}
		reply = smtperr.Classify(err)
	}
	switch {
	case reply.Code/100 == 2:
		return "delivered"
	case reply.Permanent():
		return "bounced"
	}
	return "deferred"
}

// auditClientFates checks the fate of every recipient.
func auditClientFates(t *testing.T, res *SendResult, err error, want ...string) {
	t.Helper()
	for i, w := range want {
		if got := auditClientFate(res, err, i); got != w {
			t.Errorf("recipient %d: %s, want %s (err %v, result %+v)", i, got, w, err, res)
		}
	}
}

// auditBDAT reads a "BDAT n [LAST]" command and its chunk.
func (p *clientPeer) auditBDAT() string {
	l := p.expect("BDAT ")
	f := strings.Fields(l)
	if len(f) < 2 {
		p.t.Errorf("peer: bad BDAT %q", l)
		return ""
	}
	n, err := strconv.Atoi(f[1])
	if err != nil || n < 0 || n > 64<<20 {
		p.t.Errorf("peer: bad BDAT size %q", l)
		return ""
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(p.r, b); err != nil {
		p.t.Errorf("peer: BDAT chunk: %v", err)
	}
	p.got.Write(b)
	return string(b)
}

// auditDrain reads whatever the client sends until it closes the connection or
// the peer's deadline ends, and returns it.
func (p *clientPeer) auditDrain() string {
	var b bytes.Buffer
	buf := make([]byte, 32<<10)
	for i := 0; i < 100000; i++ {
		n, err := p.r.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	p.got.Write(b.Bytes())
	return b.String()
}

var auditClientEnv = &ClientEnvelope{From: "s@x.test", Rcpts: []string{"a@y.test"}}

// TestAuditClientDisconnects: a server that goes away at any step leaves every
// recipient without a definitive reply deferred, never delivered.
func TestAuditClientDisconnects(t *testing.T) {
	cases := []struct {
		name   string
		ext    []string
		script func(p *clientPeer)
		fates  []string
	}{
		{"after MAIL, lock-step", nil, func(p *clientPeer) {
			p.expect("MAIL")
		}, []string{"deferred", "deferred", "deferred"}},
		{"after MAIL reply, lock-step", nil, func(p *clientPeer) {
			p.expect("MAIL")
			p.send("250 ok")
			p.expect("RCPT")
		}, []string{"deferred", "deferred", "deferred"}},
		{"after the envelope, pipelined", []string{"PIPELINING"}, func(p *clientPeer) {
			for _, c := range []string{"MAIL", "RCPT", "RCPT", "RCPT", "DATA"} {
				p.expect(c)
			}
			p.send("250 ok", "550 5.1.1 no such user")
		}, []string{"bounced", "deferred", "deferred"}},
		{"mid-DATA", []string{"PIPELINING"}, func(p *clientPeer) {
			for _, c := range []string{"MAIL", "RCPT", "RCPT", "RCPT", "DATA"} {
				p.expect(c)
			}
			p.send("250 ok", "550 5.1.1 no such user", "250 ok", "250 ok", "354 go")
			p.line() // part of the body
		}, []string{"bounced", "deferred", "deferred"}},
		{"after the dot, before its reply", []string{"PIPELINING"}, func(p *clientPeer) {
			for _, c := range []string{"MAIL", "RCPT", "RCPT", "RCPT", "DATA"} {
				p.expect(c)
			}
			p.send("250 ok", "250 ok", "250 ok", "450 4.2.1 busy", "354 go")
			p.data()
		}, []string{"deferred", "deferred", "deferred"}},
		{"after the dot, lock-step", nil, func(p *clientPeer) {
			p.transaction(false, []string{"MAIL", "RCPT", "RCPT", "RCPT", "DATA"},
				[]string{"250 ok", "250 ok", "250 ok", "250 ok", "354 go"}, "")
		}, []string{"deferred", "deferred", "deferred"}},
		{"after BDAT, before its reply", []string{"PIPELINING", "CHUNKING"}, func(p *clientPeer) {
			for _, c := range []string{"MAIL", "RCPT", "RCPT", "RCPT"} {
				p.expect(c)
			}
			p.auditBDAT()
			p.send("250 ok", "250 ok", "550 5.1.1 no", "250 ok")
		}, []string{"deferred", "bounced", "deferred"}},
		{"half a reply to the dot", []string{"PIPELINING"}, func(p *clientPeer) {
			for _, c := range []string{"MAIL", "RCPT", "RCPT", "RCPT", "DATA"} {
				p.expect(c)
			}
			p.send("250 ok", "250 ok", "250 ok", "250 ok", "354 go")
			p.data()
			p.conn.Write([]byte("250-2.0.0 queued as\r\n250-more"))
		}, []string{"deferred", "deferred", "deferred"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			addr, wait := clientScript(t, func(p *clientPeer) {
				p.hello(tc.ext...)
				tc.script(p)
			})
			c := clientDial(t, clientTestConfig(), addr)
			res, err := c.Send(clientTestCtx(t), clientEnv3, []byte("Subject: x\r\n\r\nbody\r\n"))
			if err == nil {
				t.Error("no error from a transaction the server cut short")
			}
			if c.Usable() {
				t.Error("connection usable after the server went away")
			}
			auditClientFates(t, res, err, tc.fates...)
			wait()
		})
	}
}

// TestAuditClient421EveryStep: 421 to any command ends the session; every
// recipient is deferred and the connection is not used again.
func TestAuditClient421EveryStep(t *testing.T) {
	const r421 = "421 4.3.2 closing"
	t.Run("greeting, EHLO, HELO", func(t *testing.T) {
		for _, script := range []func(p *clientPeer){
			func(p *clientPeer) { p.send(r421) },
			func(p *clientPeer) { p.send("220 mx"); p.expect("EHLO"); p.send(r421) },
			func(p *clientPeer) {
				p.send("220 mx")
				p.expect("EHLO")
				p.send("502 5.5.1 no")
				p.expect("HELO")
				p.send(r421)
			},
		} {
			addr, wait := clientScript(t, script)
			_, err := Dial(clientTestCtx(t), clientTestConfig(), "mx.test", addr)
			clientWantSMTPErr(t, err, 421, "4.3.2")
			wait()
		}
	})
	for _, pipe := range []bool{false, true} {
		for step := 0; step < 6; step++ { // MAIL, RCPT 0..2, DATA, dot
			t.Run(fmt.Sprintf("pipelining %v, command %d", pipe, step), func(t *testing.T) {
				addr, wait := clientScript(t, func(p *clientPeer) {
					if pipe {
						p.hello("PIPELINING")
					} else {
						p.hello()
					}
					cmds := []string{"MAIL", "RCPT", "RCPT", "RCPT", "DATA"}
					replies := []string{"250 ok", "250 ok", "550 5.1.1 no", "250 ok", "354 go"}
					n := min(step+1, len(cmds))
					if step < len(cmds) {
						replies[step] = r421
					}
					if pipe {
						for _, c := range cmds {
							p.expect(c)
						}
						p.send(replies[:n]...)
					} else {
						for i := 0; i < n; i++ {
							p.expect(cmds[i])
							p.send(replies[i])
						}
					}
					if step == len(cmds) {
						p.data()
						p.send(r421)
					}
					p.waitClose()
				})
				c := clientDial(t, clientTestConfig(), addr)
				res, err := c.Send(clientTestCtx(t), clientEnv3, []byte("x\r\n"))
				if c.Usable() {
					t.Error("usable after 421")
				}
				want := []string{"deferred", "deferred", "deferred"}
				if step > 2 {
					want[1] = "bounced" // its 550 came before the 421
				}
				auditClientFates(t, res, err, want...)
				c.Close()
				wait()
			})
		}
	}
	t.Run("RSET of a reused connection", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING")
			p.transaction(true, []string{"RSET", "MAIL", "RCPT", "DATA"}, []string{r421}, "")
			p.waitClose()
		})
		c := clientDial(t, clientTestConfig(), addr)
		c.ResetNext()
		res, err := c.Send(clientTestCtx(t), auditClientEnv, []byte("x\r\n"))
		auditClientFates(t, res, err, "deferred")
		if c.Usable() {
			t.Error("usable after 421")
		}
		c.Close()
		wait()
	})
}

// TestAuditClientResetRefused: a negative reply to RSET says nothing about the
// messages behind it. They must be retried, not bounced (RFC 5321
// §4.1.1.5: RSET cannot fail on a sane server; a 5xx means the session is
// out of step).
func TestAuditClientResetRefused(t *testing.T) {
	t.Run("Send after ResetNext", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING")
			for _, c := range []string{"RSET", "MAIL", "RCPT", "DATA"} {
				p.expect(c)
			}
			p.send("500 5.5.2 what", "250 ok", "250 ok", "354 go")
			p.waitClose()
		})
		c := clientDial(t, clientTestConfig(), addr)
		c.ResetNext()
		res, err := c.Send(clientTestCtx(t), auditClientEnv, []byte("x\r\n"))
		if err == nil || c.Usable() {
			t.Errorf("err %v, usable %v: want an error and an unusable connection", err, c.Usable())
		}
		auditClientFates(t, res, err, "deferred")
		c.Close()
		wait()
	})
	t.Run("batch with CHUNKING", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING", "CHUNKING")
			p.expect("MAIL")
			p.expect("RCPT")
			p.auditBDAT()
			p.expect("RSET")
			p.send("250 ok", "250 ok", "250 2.0.0 queued", "502 5.5.1 RSET not implemented")
			p.waitClose()
		})
		c := clientDial(t, clientTestConfig(), addr)
		envs := []*ClientEnvelope{auditClientEnv, auditClientEnv, auditClientEnv}
		res, errs := c.SendBatch(clientTestCtx(t), envs, [][]byte{[]byte("0\r\n"), []byte("1\r\n"), []byte("2\r\n")})
		auditClientFates(t, res[0], errs[0], "delivered")
		for i := 1; i < 3; i++ {
			if got := auditClientFate(res[i], errs[i], 0); got != "deferred" {
				t.Errorf("txn %d: %s (err %v), want deferred", i, got, errs[i])
			}
		}
		c.Close()
		wait()
	})
	t.Run("batch with DATA", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING")
			p.transaction(true, []string{"MAIL", "RCPT", "DATA"}, []string{"250 ok", "250 ok", "451 4.3.0 not now"}, "")
			// DATA was refused: the next envelope starts with RSET.
			for _, c := range []string{"RSET", "MAIL", "RCPT", "DATA"} {
				p.expect(c)
			}
			p.send("503 5.5.1 bad sequence")
			p.waitClose()
		})
		c := clientDial(t, clientTestConfig(), addr)
		res, errs := c.SendBatch(clientTestCtx(t), []*ClientEnvelope{auditClientEnv, auditClientEnv}, [][]byte{[]byte("0\r\n"), []byte("1\r\n")})
		auditClientFates(t, res[0], errs[0], "deferred")
		auditClientFates(t, res[1], errs[1], "deferred")
		c.Close()
		wait()
	})
}

// TestAuditClientRecipients: refusals of some recipients, and the "too many
// recipients" replies (RFC 5321 §4.5.3.1.10), per recipient.
func TestAuditClientRecipients(t *testing.T) {
	cases := []struct {
		name    string
		ext     []string
		replies []string // MAIL, RCPT 0..2, and DATA (or BDAT)
		final   string
		fates   []string
	}{
		{"mixed, pipelined", []string{"PIPELINING"},
			[]string{"250 ok", "550 5.1.1 no", "250 ok", "451 4.7.1 greylisted", "354 go"}, "250 2.0.0 queued",
			[]string{"bounced", "delivered", "deferred"}},
		{"mixed, lock-step", nil,
			[]string{"250 ok", "550 5.1.1 no", "250 ok", "451 4.7.1 greylisted", "354 go"}, "250 2.0.0 queued",
			[]string{"bounced", "delivered", "deferred"}},
		{"452 too many", []string{"PIPELINING"},
			[]string{"250 ok", "250 ok", "452 4.5.3 too many recipients", "452 4.5.3 too many recipients", "354 go"}, "250 queued",
			[]string{"delivered", "deferred", "deferred"}},
		{"mixed, BDAT", []string{"PIPELINING", "CHUNKING"},
			[]string{"250 ok", "550 5.1.1 no", "250 ok", "452 4.5.3 too many recipients", "250 2.0.0 queued"}, "",
			[]string{"bounced", "delivered", "deferred"}},
		{"BDAT refused", []string{"PIPELINING", "CHUNKING"},
			[]string{"250 ok", "250 ok", "250 ok", "250 ok", "554 5.7.1 spam"}, "",
			[]string{"bounced", "bounced", "bounced"}},
		{"BDAT deferred", []string{"PIPELINING", "CHUNKING"},
			[]string{"250 ok", "250 ok", "250 ok", "250 ok", "451 4.3.0 try later"}, "",
			[]string{"deferred", "deferred", "deferred"}},
		{"MAIL deferred", []string{"PIPELINING"},
			[]string{"451 4.3.0 later", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL", "503 5.5.1 no valid recipients"}, "",
			[]string{"deferred", "deferred", "deferred"}},
		{"DATA refused", []string{"PIPELINING"},
			[]string{"250 ok", "250 ok", "250 ok", "250 ok", "554 5.3.0 no"}, "",
			[]string{"bounced", "bounced", "bounced"}},
		{"dot deferred", []string{"PIPELINING"},
			[]string{"250 ok", "250 ok", "250 ok", "250 ok", "354 go"}, "452 4.3.1 insufficient storage",
			[]string{"deferred", "deferred", "deferred"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pipe := len(tc.ext) > 0
			chunk := len(tc.ext) > 1
			addr, wait := clientScript(t, func(p *clientPeer) {
				p.hello(tc.ext...)
				switch {
				case chunk:
					for _, c := range []string{"MAIL", "RCPT", "RCPT", "RCPT"} {
						p.expect(c)
					}
					p.auditBDAT()
					p.send(tc.replies...)
				case pipe:
					p.transaction(true, []string{"MAIL", "RCPT", "RCPT", "RCPT", "DATA"}, tc.replies, tc.final)
				default:
					p.transaction(false, []string{"MAIL", "RCPT", "RCPT", "RCPT", "DATA"}, tc.replies, tc.final)
				}
				p.quit()
			})
			c := clientDial(t, clientTestConfig(), addr)
			res, err := c.Send(clientTestCtx(t), clientEnv3, []byte("x\r\n"))
			if err != nil {
				t.Fatalf("Send: %v", err)
			}
			auditClientFates(t, res, err, tc.fates...)
			c.Quit()
			wait()
		})
	}
}

// TestAuditClientTimeouts: a server that stops answering, or answers forever a
// little at a time, holds the client no longer than the step's timeout
// (RFC 5321 §4.5.3.2). The bound checked is loose (the timeouts are 200 ms,
// the bound 8 s): it catches a hang, not slowness.
func TestAuditClientTimeouts(t *testing.T) {
	const short = 200 * time.Millisecond
	drip := func(p *clientPeer, line string) {
		for i := 0; i < 2000; i++ {
			if _, err := p.conn.Write([]byte(line)); err != nil {
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	cases := []struct {
		name   string
		set    func(c *ClientConfig)
		dial   bool // the failure is Dial's
		script func(p *clientPeer)
	}{
		{"banner never comes", func(c *ClientConfig) { c.GreetingTimeout = short }, true,
			func(p *clientPeer) { p.waitClose() }},
		{"endless greeting, a line at a time", func(c *ClientConfig) { c.GreetingTimeout = short }, true,
			func(p *clientPeer) { drip(p, "220-\r\n") }},
		{"greeting an octet at a time", func(c *ClientConfig) { c.GreetingTimeout = short }, true,
			func(p *clientPeer) { drip(p, "2") }},
		{"EHLO never answered", func(c *ClientConfig) { c.MailTimeout = short }, true,
			func(p *clientPeer) { p.send("220 mx"); p.expect("EHLO"); p.waitClose() }},
		{"RCPT never answered, pipelined", func(c *ClientConfig) { c.RcptTimeout = short }, false,
			func(p *clientPeer) {
				p.hello("PIPELINING")
				for _, c := range []string{"MAIL", "RCPT", "RCPT", "RCPT", "DATA"} {
					p.expect(c)
				}
				p.send("250 ok", "250 ok")
				p.waitClose()
			}},
		{"354 never comes", func(c *ClientConfig) { c.DataInitTimeout = short }, false,
			func(p *clientPeer) {
				p.hello()
				p.transaction(false, []string{"MAIL", "RCPT", "RCPT", "RCPT"}, []string{"250 ok", "250 ok", "250 ok", "250 ok"}, "")
				p.expect("DATA")
				p.waitClose()
			}},
		{"reply to the dot dribbled forever", func(c *ClientConfig) { c.DataTermTimeout = short }, false,
			func(p *clientPeer) {
				p.hello("PIPELINING")
				p.transaction(true, []string{"MAIL", "RCPT", "RCPT", "RCPT", "DATA"},
					[]string{"250 ok", "250 ok", "250 ok", "250 ok", "354 go"}, "")
				drip(p, "250-still thinking\r\n")
			}},
		{"BDAT never answered", func(c *ClientConfig) { c.DataTermTimeout = short }, false,
			func(p *clientPeer) {
				p.hello("PIPELINING", "CHUNKING")
				for _, c := range []string{"MAIL", "RCPT", "RCPT", "RCPT"} {
					p.expect(c)
				}
				p.auditBDAT()
				p.send("250 ok", "250 ok", "250 ok", "250 ok")
				p.waitClose()
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			addr, wait := clientScript(t, tc.script)
			cfg := clientTestConfig()
			tc.set(cfg)
			start := time.Now()
			var res *SendResult
			c, err := Dial(clientTestCtx(t), cfg, "mx.test", addr)
			if !tc.dial {
				if err != nil {
					t.Fatalf("Dial: %v", err)
				}
				res, err = c.Send(clientTestCtx(t), clientEnv3, []byte("x\r\n"))
				c.Close()
			} else if err == nil {
				c.Close()
			}
			if el := time.Since(start); el > 8*time.Second {
				t.Errorf("took %v with %v timeouts", el, short)
			}
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("err %v, want a deadline error", err)
			}
			if !tc.dial {
				auditClientFates(t, res, err, "deferred", "deferred", "deferred")
			}
			wait()
		})
	}
	t.Run("server stops reading the message", func(t *testing.T) {
		stop := make(chan struct{})
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING")
			for _, c := range []string{"MAIL", "RCPT", "DATA"} {
				p.expect(c)
			}
			p.send("250 ok", "250 ok", "354 go")
			// Reads nothing more until the client has given up.
			select {
			case <-stop:
			case <-time.After(10 * time.Second):
			}
		})
		cfg := clientTestConfig()
		cfg.DataBlockTimeout = short
		c := clientDial(t, cfg, addr)
		// Larger than the loopback socket buffers of both ends.
		body := bytes.Repeat([]byte(strings.Repeat("y", 78)+"\r\n"), 400000)
		start := time.Now()
		res, err := c.Send(clientTestCtx(t), auditClientEnv, body)
		close(stop)
		if el := time.Since(start); el > 8*time.Second {
			t.Errorf("took %v with a %v data block timeout", el, short)
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("err %v, want a deadline error", err)
		}
		auditClientFates(t, res, err, "deferred")
		c.Close()
		wait()
	})
}

// TestAuditClientRepliesBounded: a reply that never ends, or a line that never
// ends, is refused after a bounded amount of input.
func TestAuditClientRepliesBounded(t *testing.T) {
	flood := func(p *clientPeer, s string) {
		for i := 0; i < 100000; i++ {
			if _, err := p.conn.Write([]byte(s)); err != nil {
				return
			}
		}
	}
	for _, tc := range []struct {
		name   string
		script func(p *clientPeer)
	}{
		{"endless multi-line greeting", func(p *clientPeer) { flood(p, "220-and more\r\n") }},
		{"endless greeting line", func(p *clientPeer) { flood(p, "220 "+strings.Repeat("x", 1000)) }},
		{"endless EHLO reply", func(p *clientPeer) {
			p.send("220 mx")
			p.expect("EHLO")
			flood(p, "250-X-JUNK "+strings.Repeat("j", 500)+"\r\n")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, wait := clientScript(t, tc.script)
			_, err := Dial(clientTestCtx(t), clientTestConfig(), "mx.test", addr)
			if !errors.Is(err, ErrClientProtocol) || !smtperr.IsTemporary(err) {
				t.Errorf("err %v, want a temporary ErrClientProtocol", err)
			}
			wait()
		})
	}
	t.Run("600-octet rejection line is read", func(t *testing.T) {
		long := "550 5.7.1 " + strings.Repeat("see https://policy.example/", 22)
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING")
			p.transaction(true, []string{"MAIL", "RCPT", "DATA"}, []string{"250 ok", long, "554 5.5.1 no valid recipients"}, "")
			p.quit()
		})
		c := clientDial(t, clientTestConfig(), addr)
		res, err := c.Send(clientTestCtx(t), auditClientEnv, []byte("x\r\n"))
		auditClientFates(t, res, err, "bounced")
		c.Quit()
		wait()
	})
}

// TestAuditClientOddGreetings: servers that talk out of turn, refuse the
// session, or refuse EHLO.
func TestAuditClientOddGreetings(t *testing.T) {
	t.Run("554 greeting gets QUIT", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.send("554 5.7.1 go away")
			p.expect("QUIT\r\n")
			p.waitClose()
		})
		_, err := Dial(clientTestCtx(t), clientTestConfig(), "mx.test", addr)
		clientWantSMTPErr(t, err, 554, "5.7.1")
		wait()
	})
	for _, tc := range []struct{ name, pre string }{
		{"junk before the greeting", "SSH-2.0-OpenSSH_9.6\r\n220 mx\r\n"},
		{"two greetings", "220 proxy\r\n220 mx\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, wait := clientScript(t, func(p *clientPeer) {
				p.conn.Write([]byte(tc.pre))
				p.auditDrain()
			})
			_, err := Dial(clientTestCtx(t), clientTestConfig(), "mx.test", addr)
			if !errors.Is(err, ErrClientProtocol) || !smtperr.IsTemporary(err) {
				t.Errorf("err %v, want a temporary ErrClientProtocol", err)
			}
			wait()
		})
	}
	t.Run("a reply before EHLO", func(t *testing.T) {
		// "250 early" is taken for the reply to EHLO; every later reply is
		// then one step behind its command. The DATA step (which must get
		// 354) catches it: nothing is counted delivered.
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.send("220 mx", "250 early")
			p.expect("EHLO")
			p.send("250-mx", "250 PIPELINING")
			p.expect("MAIL")
			p.send("250 ok")
			p.expect("RCPT")
			p.send("250 ok")
			p.auditDrain()
		})
		c := clientDial(t, clientTestConfig(), addr)
		res, err := c.Send(clientTestCtx(t), auditClientEnv, []byte("x\r\n"))
		auditClientFates(t, res, err, "deferred")
		c.Close()
		wait()
	})
	t.Run("EHLO refused, HELO accepted", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.send("220 mx")
			p.expect("EHLO client.test\r\n")
			p.send("500 5.5.1 what is EHLO")
			p.expect("HELO client.test\r\n")
			p.send("250 mx")
			p.transaction(false, []string{"MAIL FROM:<s@x.test>\r\n", "RCPT", "DATA"}, []string{"250 ok", "250 ok", "354 go"}, "250 queued")
			p.quit()
		})
		c := clientDial(t, clientTestConfig(), addr)
		res, err := c.Send(clientTestCtx(t), auditClientEnv, []byte("x\r\n"))
		auditClientFates(t, res, err, "delivered")
		c.Quit()
		wait()
	})
	t.Run("EHLO and HELO refused", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.send("220 mx")
			p.expect("EHLO")
			p.send("502 no")
			p.expect("HELO")
			p.send("550 5.7.1 not you")
			p.waitClose()
		})
		_, err := Dial(clientTestCtx(t), clientTestConfig(), "mx.test", addr)
		clientWantSMTPErr(t, err, 550, "5.7.1") // the engine makes a refused session 451 4.4.1
		wait()
	})
}

// TestAuditClientSlowPipelining: a server that offers PIPELINING but answers one
// reply per packet, slowly.
func TestAuditClientSlowPipelining(t *testing.T) {
	addr, wait := clientScript(t, func(p *clientPeer) {
		p.hello("PIPELINING")
		for _, c := range []string{"MAIL", "RCPT", "RCPT", "RCPT", "DATA"} {
			p.expect(c)
		}
		for _, r := range []string{"250 ok", "250 ok", "550 5.1.1 no", "250 ok", "354 go"} {
			time.Sleep(30 * time.Millisecond)
			for i := 0; i < len(r); i += 3 {
				p.conn.Write([]byte(r[i:min(i+3, len(r))]))
				time.Sleep(time.Millisecond)
			}
			p.conn.Write([]byte("\r\n"))
		}
		p.data()
		p.send("250 queued")
		p.quit()
	})
	c := clientDial(t, clientTestConfig(), addr)
	res, err := c.Send(clientTestCtx(t), clientEnv3, []byte("x\r\n"))
	auditClientFates(t, res, err, "delivered", "bounced", "delivered")
	c.Quit()
	wait()
}

// TestAuditClientRefusedBeforeSending: what the server says it cannot take is not
// sent (RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531 SMTPUTF8).
func TestAuditClientRefusedBeforeSending(t *testing.T) {
	addr, wait := clientScript(t, func(p *clientPeer) {
		p.hello("PIPELINING", "SIZE 100")
		p.quit() // nothing else: every message is refused before MAIL
	})
	c := clientDial(t, clientTestConfig(), addr)
	ctx := clientTestCtx(t)
	for _, tc := range []struct {
		env  ClientEnvelope
		body string
		code int
	}{
		{ClientEnvelope{From: "s@x.test", Rcpts: []string{"a@y.test"}}, strings.Repeat("z", 101), 552},
		{ClientEnvelope{From: "s@x.test", Rcpts: []string{"a@y.test"}, Body8Bit: true}, "caf\xc3\xa9\r\n", 554},
		{ClientEnvelope{From: "s@x.test", Rcpts: []string{"ä@y.test"}}, "x\r\n", 554},
	} {
		_, err := c.Send(ctx, &tc.env, []byte(tc.body))
		if e := smtperr.Classify(err); e.Code != tc.code {
			t.Errorf("%+v: %v, want %d", tc.env, err, tc.code)
		}
	}
	if !c.Usable() {
		t.Error("unusable after refusals made before sending")
	}
	c.Quit()
	wait()
}

// TestAuditClientSTARTTLSFailures: with TLS required nothing goes out in clear
// text after a failed STARTTLS, whatever the server does.
func TestAuditClientSTARTTLSFailures(t *testing.T) {
	for _, tc := range []struct {
		name  string
		after func(p *clientPeer)
	}{
		{"garbage instead of a handshake", func(p *clientPeer) {
			p.send("220 2.0.0 go ahead")
			p.r.Peek(1)
			p.send("250 plaintext")
		}},
		{"plaintext injected in a later packet", func(p *clientPeer) {
			p.send("220 2.0.0 go ahead")
			time.Sleep(20 * time.Millisecond)
			p.send("250-PIPELINING", "250 AUTH PLAIN")
		}},
		{"plaintext injected with the 220", func(p *clientPeer) {
			p.send("220 2.0.0 go ahead", "250 ok")
		}},
		{"closed after 220", func(p *clientPeer) {
			p.send("220 2.0.0 go ahead")
			p.conn.Close()
		}},
		{"never answers the ClientHello", func(p *clientPeer) {
			p.send("220 2.0.0 go ahead")
		}},
	} {
		for _, mode := range []TLSMode{TLSRequired, TLSOpportunistic} {
			t.Run(tc.name+", "+mode.String(), func(t *testing.T) {
				var rest string
				addr, wait := clientScript(t, func(p *clientPeer) {
					p.hello("PIPELINING", "STARTTLS")
					p.expect("STARTTLS\r\n")
					tc.after(p)
					rest = p.auditDrain()
				})
				cfg := clientTestConfig()
				cfg.TLS = mode
				cfg.ConnectTimeout = 300 * time.Millisecond // the handshake
				c, err := Dial(clientTestCtx(t), cfg, "mx.test", addr)
				if err == nil {
					c.Close()
					t.Fatal("Dial succeeded")
				}
				if !smtperr.IsTemporary(err) {
					t.Errorf("err %v: not temporary", err)
				}
				wait()
				for _, verb := range []string{"EHLO", "MAIL", "AUTH", "QUIT"} {
					if strings.Contains(rest, verb) {
						t.Errorf("%s sent in clear after STARTTLS: %q", verb, rest)
					}
				}
			})
		}
	}
}

// TestAuditClient8BitToSevenBitServer: a server without 8BITMIME cannot take
// 8-bit content (RFC 6152 §3), but a message merely declared BODY=8BITMIME
// whose content is 7-bit is plain RFC 5321 mail: it is sent, without the
// parameter the server does not know.
func TestAuditClient8BitToSevenBitServer(t *testing.T) {
	for _, chunk := range []bool{false, true} {
		t.Run(fmt.Sprintf("chunking %v", chunk), func(t *testing.T) {
			addr, wait := clientScript(t, func(p *clientPeer) {
				if chunk {
					p.hello("PIPELINING", "CHUNKING")
					p.expect("MAIL FROM:<s@x.test>\r\n")
					p.expect("RCPT")
					p.auditBDAT()
					p.send("250 ok", "250 ok", "250 queued")
				} else {
					p.hello("PIPELINING")
					p.transaction(true, []string{"MAIL FROM:<s@x.test>\r\n", "RCPT", "DATA"}, []string{"250 ok", "250 ok", "354 go"}, "250 queued")
				}
				p.quit()
			})
			c := clientDial(t, clientTestConfig(), addr)
			ctx := clientTestCtx(t)
			env := &ClientEnvelope{From: "s@x.test", Rcpts: []string{"a@y.test"}, Body8Bit: true}
			_, err := c.Send(ctx, env, []byte("caf\xc3\xa9\r\n"))
			clientWantSMTPErr(t, err, 554, "5.6.3")
			res, err := c.Send(ctx, env, []byte("Subject: plain\r\n\r\nseven bits\r\n"))
			auditClientFates(t, res, err, "delivered")
			c.Quit()
			wait()
		})
	}
}

// TestAuditClientExtraReply: a server that sends more replies than commands is
// out of step: the surplus would be read as the replies of the next
// transaction on the connection. With CHUNKING there is no 354 to catch
// it, so a refused message was counted delivered. The connection must not
// be reused.
func TestAuditClientExtraReply(t *testing.T) {
	for _, chunk := range []bool{true, false} {
		t.Run(fmt.Sprintf("chunking %v", chunk), func(t *testing.T) {
			addr, wait := clientScript(t, func(p *clientPeer) {
				if chunk {
					p.hello("PIPELINING", "CHUNKING")
					p.expect("MAIL")
					p.expect("RCPT")
					p.auditBDAT()
					p.send("250 ok", "250 ok", "250 2.0.0 queued", "250 2.0.0 queued")
					// The next transaction, if any, is refused.
					if _, err := p.r.Peek(1); err != nil {
						return // the client closed the connection
					}
					p.expect("MAIL")
					p.expect("RCPT")
					p.auditBDAT()
					p.send("250 ok", "250 ok", "451 4.3.0 failed")
				} else {
					p.hello("PIPELINING")
					// The 354 step catches the shift if the connection is
					// used again: the next transaction gets no reply.
					p.transaction(true, []string{"MAIL", "RCPT", "DATA"}, []string{"250 ok", "250 ok", "354 go"}, "250 2.0.0 queued\r\n250 2.0.0 queued")
				}
				p.auditDrain()
			})
			c := clientDial(t, clientTestConfig(), addr)
			ctx := clientTestCtx(t)
			res, err := c.Send(ctx, auditClientEnv, []byte("0\r\n"))
			auditClientFates(t, res, err, "delivered")
			if c.Usable() {
				res, err = c.Send(ctx, auditClientEnv, []byte("1\r\n"))
				auditClientFates(t, res, err, "deferred")
			}
			c.Close()
			wait()
		})
	}
}

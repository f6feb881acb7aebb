package netio

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// Early replies: a server that refuses a message while it is still being
// sent (RFC 3030 §2 lets it answer a BDAT and close; servers do the same
// during DATA) and then closes makes the client's write fail. The replies
// it sent first decide the outcome; only transactions without a reply are
// network errors. The DATA path of a single message is tested by
// TestClientEarlyReplyDuringData.

// earlyBody returns a message of about n octets in 78-octet lines.
func earlyBody(n int) []byte {
	return bytes.Repeat([]byte(strings.Repeat("x", 76)+"\r\n"), n/78)
}

// earlyStopReading makes the peer's receive buffer small and fixed (no
// autotuning), so that a client writing a message of several MiB the peer
// does not read blocks, and fails once the peer closes.
func earlyStopReading(p *clientPeer) {
	if err := p.conn.(*net.TCPConn).SetReadBuffer(64 << 10); err != nil {
		p.t.Errorf("peer: SetReadBuffer: %v", err)
	}
}

// earlyRefuse reads some of the message being sent, then sends reply
// (none when "") and closes with the rest unread, which resets the
// connection.
func earlyRefuse(p *clientPeer, reply string) {
	buf := make([]byte, 64<<10)
	if _, err := io.ReadFull(p.r, buf); err != nil {
		p.t.Errorf("peer: reading the message: %v", err)
	}
	if reply != "" {
		p.send(reply)
	}
	time.Sleep(20 * time.Millisecond)
}

// TestClientEarlyReplyBDAT: a single message sent with BDAT, refused by a
// reply to BDAT before the chunk was read, has that reply as its outcome
// (permanent or temporary as the reply says), with no error.
func TestClientEarlyReplyBDAT(t *testing.T) {
	body := earlyBody(16 << 20)
	cases := []struct {
		reply    string
		code     int
		enhanced string
	}{
		{"552 5.3.4 Message size exceeds fixed limit", 552, "5.3.4"},
		{"554 5.7.1 Content refused", 554, "5.7.1"},
		{"451 4.3.0 Try again later", 451, "4.3.0"},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprint(tc.code), func(t *testing.T) {
			addr, wait := clientScript(t, func(p *clientPeer) {
				earlyStopReading(p)
				p.hello("PIPELINING", "CHUNKING")
				p.expect("MAIL FROM:<a@x.test>\r\n")
				p.expect("RCPT TO:<b@y.test>\r\n")
				p.expect(fmt.Sprintf("BDAT %d LAST\r\n", len(body)))
				p.send("250 2.1.0 ok", "250 2.1.5 ok")
				earlyRefuse(p, tc.reply)
			})
			c := clientDial(t, clientTestConfig(), addr)
			env := &ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test"}}
			res, err := c.Send(clientTestCtx(t), env, body)
			if err != nil {
				t.Fatalf("Send: %v", err)
			}
			clientWantReply(t, "MAIL", res.Mail, 250, "2.1.0")
			out := res.Outcome(0)
			clientWantReply(t, "outcome", out, tc.code, tc.enhanced)
			if out != nil && out.Permanent() != (tc.code/100 == 5) {
				t.Errorf("outcome %v: permanent %v", out, out.Permanent())
			}
			if c.Usable() {
				t.Error("connection still usable")
			}
			wait()
		})
	}
}

// TestClientEarlyReplyBatch: in a pipelined batch of three, message 0 is
// accepted, message 1 (16 MiB) is refused while being sent and the server
// closes. Message 0 is delivered (never to be sent again), message 1 has
// the refusal as its outcome, and message 2, which got no reply, is a
// network error (temporary, to be retried). Without a refusal, message 1
// is a network error too. Both with DATA and with BDAT.
func TestClientEarlyReplyBatch(t *testing.T) {
	bodies := [][]byte{earlyBody(256 << 10), earlyBody(16 << 20), earlyBody(64 << 10)}
	envs := make([]*ClientEnvelope, len(bodies))
	for i := range envs {
		envs[i] = &ClientEnvelope{From: "s@x.test", Rcpts: []string{fmt.Sprintf("r%d@y.test", i)}}
	}
	// dataScript plays the DATA batch: the envelope of message 1 comes
	// behind the final dot of message 0.
	dataScript := func(refusal string) func(p *clientPeer) {
		return func(p *clientPeer) {
			earlyStopReading(p)
			p.hello("PIPELINING")
			p.transaction(true, []string{"MAIL FROM:<s@x.test>\r\n", "RCPT TO:<r0@y.test>\r\n", "DATA\r\n"},
				[]string{"250 2.1.0 ok", "250 2.1.5 ok", "354 go"}, "")
			for _, c := range []string{"MAIL FROM:<s@x.test>\r\n", "RCPT TO:<r1@y.test>\r\n", "DATA\r\n"} {
				p.expect(c)
			}
			p.send("250 2.0.0 queued as 0", "250 2.1.0 ok", "250 2.1.5 ok", "354 go")
			earlyRefuse(p, refusal)
		}
	}
	// bdatScript plays the BDAT batch: every transaction in one write.
	bdatScript := func(refusal string) func(p *clientPeer) {
		return func(p *clientPeer) {
			earlyStopReading(p)
			p.hello("PIPELINING", "CHUNKING")
			for _, c := range []string{"MAIL FROM:<s@x.test>\r\n", "RCPT TO:<r0@y.test>\r\n", fmt.Sprintf("BDAT %d LAST\r\n", len(bodies[0]))} {
				p.expect(c)
			}
			if _, err := io.CopyN(io.Discard, p.r, int64(len(bodies[0]))); err != nil {
				p.t.Errorf("peer: reading message 0: %v", err)
			}
			p.send("250 2.1.0 ok", "250 2.1.5 ok", "250 2.0.0 queued as 0")
			for _, c := range []string{"RSET\r\n", "MAIL FROM:<s@x.test>\r\n", "RCPT TO:<r1@y.test>\r\n", fmt.Sprintf("BDAT %d LAST\r\n", len(bodies[1]))} {
				p.expect(c)
			}
			p.send("250 2.0.0 reset", "250 2.1.0 ok", "250 2.1.5 ok")
			earlyRefuse(p, refusal)
		}
	}
	const refusal = "552 5.3.4 Message size exceeds fixed limit"
	cases := []struct {
		name   string
		script func(p *clientPeer)
		// code is message 1's outcome, 0 for a network error.
		code int
	}{
		{"data", dataScript(refusal), 552},
		{"data/no reply", dataScript(""), 0},
		{"bdat", bdatScript(refusal), 552},
		{"bdat/no reply", bdatScript(""), 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			addr, wait := clientScript(t, tc.script)
			c := clientDial(t, clientTestConfig(), addr)
			res, errs := c.SendBatch(clientTestCtx(t), envs, bodies)

			if errs[0] != nil {
				t.Errorf("message 0: %v", errs[0])
			}
			if res[0] != nil {
				clientWantReply(t, "message 0", res[0].Outcome(0), 250, "2.0.0")
			}

			if tc.code != 0 {
				if errs[1] != nil {
					t.Errorf("message 1: %v", errs[1])
				}
				out := res[1].Outcome(0)
				clientWantReply(t, "message 1", out, tc.code, "5.3.4")
				if out != nil && !out.Permanent() {
					t.Errorf("message 1: %v is not permanent", out)
				}
			} else {
				if errs[1] == nil {
					t.Errorf("message 1: no error (outcome %v)", res[1].Outcome(0))
				} else if e := smtperr.Classify(errs[1]); !e.Temporary() {
					t.Errorf("message 1: %v classified %v, want temporary", errs[1], e)
				}
				if o := res[1].Outcome(0); o != nil && o.Code/100 != 4 {
					t.Errorf("message 1: outcome %v", o)
				}
			}

			if errs[2] == nil {
				t.Errorf("message 2: no error (result %+v)", res[2])
			} else if e := smtperr.Classify(errs[2]); !e.Temporary() {
				t.Errorf("message 2: %v classified %v, want temporary", errs[2], e)
			}
			if res[2] != nil && (res[2].Mail != nil || res[2].Rcpts[0] != nil || res[2].Data != nil) {
				t.Errorf("message 2: replies %v %v %v for a transaction never sent", res[2].Mail, res[2].Rcpts[0], res[2].Data)
			}
			if c.Usable() {
				t.Error("connection still usable")
			}
			wait()
		})
	}
}

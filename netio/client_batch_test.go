package netio

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// TestClientSendBatchDataOnTheWire checks the pipelined batch without
// CHUNKING against a scripted server: each message goes out with the next
// envelope behind its final dot, before the reply to that dot; a refused
// DATA leaves the transaction open, so the next envelope starts with RSET;
// a transaction refused before sending takes no part.
func TestClientSendBatchDataOnTheWire(t *testing.T) {
	bodies := [][]byte{[]byte("Subject: a\r\n\r\na\r\n"), []byte("b\r\n"), []byte("x\r\n"), []byte(".c\r\n"), []byte("e\r\n")}
	envs := []*ClientEnvelope{
		{From: "s@x.test", Rcpts: []string{"a@ok.test"}},
		{From: "s@x.test", Rcpts: []string{"b@refuse.test"}},
		{From: "s@x.test", Rcpts: []string{"big@ok.test"}, Size: 1 << 40},
		{From: "s@x.test", Rcpts: []string{"c@ok.test", "d@refuse.test"}},
		{From: "", Rcpts: []string{"e@ok.test"}},
	}
	addr, wait := clientScript(t, func(p *clientPeer) {
		p.hello("PIPELINING", "SIZE 1000000")
		// Transaction 0, on a reused connection: RSET first.
		for _, c := range []string{"RSET\r\n", "MAIL FROM:<s@x.test> SIZE=17\r\n", "RCPT TO:<a@ok.test>\r\n", "DATA\r\n"} {
			p.expect(c)
		}
		p.quiet()
		p.send("250 2.0.0 reset", "250 2.1.0 ok", "250 2.1.5 ok", "354 go")
		if got := p.data(); got != "Subject: a\r\n\r\na\r\n.\r\n" {
			p.t.Errorf("message 0: %q", got)
		}
		// Transaction 1 came with it; its DATA is refused.
		for _, c := range []string{"MAIL FROM:<s@x.test> SIZE=3\r\n", "RCPT TO:<b@refuse.test>\r\n", "DATA\r\n"} {
			p.expect(c)
		}
		p.quiet()
		p.send("250 2.0.0 queued 0", "250 2.1.0 ok", "550 5.1.1 no such user", "554 5.5.1 no valid recipients")
		// Transaction 3 (2 was too big to send): RSET first.
		for _, c := range []string{"RSET\r\n", "MAIL FROM:<s@x.test> SIZE=4\r\n", "RCPT TO:<c@ok.test>\r\n", "RCPT TO:<d@refuse.test>\r\n", "DATA\r\n"} {
			p.expect(c)
		}
		p.quiet()
		p.send("250 2.0.0 reset", "250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 no such user", "354 go")
		if got := p.data(); got != "..c\r\n.\r\n" {
			p.t.Errorf("message 3: %q", got)
		}
		for _, c := range []string{"MAIL FROM:<> SIZE=3\r\n", "RCPT TO:<e@ok.test>\r\n", "DATA\r\n"} {
			p.expect(c)
		}
		p.quiet()
		p.send("250 2.0.0 queued 3", "250 2.1.0 ok", "250 2.1.5 ok", "354 go")
		if got := p.data(); got != "e\r\n.\r\n" {
			p.t.Errorf("message 4: %q", got)
		}
		p.quiet() // nothing after the last message
		p.send("250 2.0.0 queued 4")
		p.quit()
	})
	c := clientDial(t, clientTestConfig(), addr)
	c.ResetNext()
	res, errs := c.SendBatch(clientTestCtx(t), envs, bodies)
	want := []struct {
		codes []int
		err   bool
	}{{[]int{250}, false}, {[]int{550}, false}, {nil, true}, {[]int{250, 550}, false}, {[]int{250}, false}}
	for i, w := range want {
		if (errs[i] != nil) != w.err {
			t.Fatalf("txn %d: error %v", i, errs[i])
		}
		for k, code := range w.codes {
			if out := res[i].Outcome(k); out == nil || out.Code != code {
				t.Errorf("txn %d rcpt %d: %v, want %d", i, k, out, code)
			}
		}
	}
	clientWantReply(t, "txn 0 data", res[0].Data, 250, "2.0.0")
	if res[1].Data != nil {
		t.Errorf("txn 1: Data %v, want none (no recipient accepted)", res[1].Data)
	}
	if !c.Usable() {
		t.Fatal("connection unusable after the batch")
	}
	if err := c.Quit(); err != nil {
		t.Errorf("Quit: %v", err)
	}
	wait()
}

// TestClientSendBatchDataFailures covers a batch cut short: by a 421 to a
// final dot (the pipelined transaction behind it gets the 421, the rest is
// not sent), by a 421 to DATA (nothing more is sent), and by the server
// vanishing (every transaction without all its replies gets the error).
func TestClientSendBatchDataFailures(t *testing.T) {
	envs := func(n int) []*ClientEnvelope {
		out := make([]*ClientEnvelope, n)
		for i := range out {
			out[i] = &ClientEnvelope{From: "s@x.test", Rcpts: []string{fmt.Sprintf("r%d@ok.test", i)}}
		}
		return out
	}
	bodies := [][]byte{[]byte("0\r\n"), []byte("1\r\n"), []byte("2\r\n")}
	envelope := func(p *clientPeer, i int) {
		for _, c := range []string{"MAIL FROM:<s@x.test>", fmt.Sprintf("RCPT TO:<r%d@ok.test>", i), "DATA\r\n"} {
			p.expect(c)
		}
	}
	type outcome struct {
		code int  // outcome of the recipient, 0 for none
		err  bool // error returned
	}
	cases := []struct {
		name   string
		script func(p *clientPeer)
		want   []outcome
	}{
		{"421 to the dot", func(p *clientPeer) {
			envelope(p, 0)
			p.send("250 ok", "250 ok", "354 go")
			p.data()
			envelope(p, 1)
			p.send("421 4.3.2 shutting down")
			p.waitClose()
		}, []outcome{{421, false}, {421, false}, {0, true}}},
		{"421 to DATA", func(p *clientPeer) {
			envelope(p, 0)
			p.send("250 ok", "250 ok", "354 go")
			p.data()
			envelope(p, 1)
			p.send("250 queued", "250 ok", "250 ok", "421 4.3.2 shutting down")
			p.waitClose()
		}, []outcome{{250, false}, {421, false}, {0, true}}},
		{"server gone", func(p *clientPeer) {
			envelope(p, 0)
			p.send("250 ok", "250 ok", "354 go")
			p.data()
			envelope(p, 1)
			p.send("250 queued", "250 ok")
		}, []outcome{{250, false}, {0, true}, {0, true}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			addr, wait := clientScript(t, func(p *clientPeer) {
				p.hello("PIPELINING")
				tc.script(p)
			})
			c := clientDial(t, clientTestConfig(), addr)
			res, errs := c.SendBatch(clientTestCtx(t), envs(3), bodies)
			for i, w := range tc.want {
				if (errs[i] != nil) != w.err {
					t.Errorf("txn %d: error %v, want error %v", i, errs[i], w.err)
				}
				var got int
				if res[i] != nil && res[i].Rcpts[0] != nil {
					if o := res[i].Outcome(0); o != nil {
						got = o.Code
					}
				}
				if got != w.code {
					t.Errorf("txn %d: outcome %d, want %d", i, got, w.code)
				}
			}
			if errs[2] != nil && !errors.Is(errs[2], ErrClientUnusable) && tc.name != "server gone" {
				t.Errorf("txn 2: %v, want ErrClientUnusable", errs[2])
			}
			if c.Usable() {
				t.Error("connection usable after the failure")
			}
			c.Close()
			wait()
		})
	}
}

// TestClientSendBatchDataSink sends batches to a pipelining sink without
// CHUNKING and checks every message arrives whole, in order.
func TestClientSendBatchDataSink(t *testing.T) {
	addr := clientSink(t, true)
	c := clientDial(t, clientTestConfig(), addr)
	if c.Has("CHUNKING") {
		t.Fatal("the sink offers CHUNKING")
	}
	ctx := clientTestCtx(t)
	for round := 0; round < 3; round++ {
		n := 1 + round*5
		envs := make([]*ClientEnvelope, n)
		bodies := make([][]byte, n)
		for i := range envs {
			envs[i] = &ClientEnvelope{From: "s@x.test", Rcpts: []string{"r@y.test"}}
			bodies[i] = bytes.Repeat([]byte(strings.Repeat("x", 70)+"\r\n"), 1+i*40)
		}
		c.ResetNext()
		res, errs := c.SendBatch(ctx, envs, bodies)
		for i := range envs {
			if errs[i] != nil {
				t.Fatalf("round %d txn %d: %v", round, i, errs[i])
			}
			clientWantReply(t, fmt.Sprintf("round %d txn %d", round, i), res[i].Data, 250, "2.0.0")
		}
	}
	if !c.Usable() {
		t.Fatal("unusable after the batches")
	}
}

// BenchmarkSendBatchData sends batches of 8 messages of 1 KiB over one
// reused connection to a pipelining sink without CHUNKING: 9 writes and
// round trips per batch instead of 16.
func BenchmarkSendBatchData(b *testing.B) {
	addr := clientSink(b, true)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, err := Dial(ctx, clientTestConfig(), "sink.test", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Quit()
	body := bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!\r\n"), 16)
	const n = 8
	envs := make([]*ClientEnvelope, n)
	bodies := make([][]byte, n)
	for i := range envs {
		envs[i] = &ClientEnvelope{From: "bench@x.test", Rcpts: []string{"rcpt@y.test"}}
		bodies[i] = body
	}
	b.ReportAllocs()
	b.SetBytes(n * int64(len(body)))
	for b.Loop() {
		c.ResetNext()
		res, errs := c.SendBatch(ctx, envs, bodies)
		for i := range errs {
			if errs[i] != nil || res[i].Data == nil || res[i].Data.Code != 250 {
				b.Fatalf("txn %d: %v %v", i, errs[i], res[i])
			}
		}
	}
	b.ReportMetric(float64(b.N*n)/b.Elapsed().Seconds(), "msgs/s")
}

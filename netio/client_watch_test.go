package netio

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestClientContextKeptAcrossCalls covers the context watch that stays
// registered between calls: a context cancelled during a call closes the
// connection; one cancelled between calls leaves the idle connection alone
// (so that QUIT still goes out) and fails the next call at once.
func TestClientContextKeptAcrossCalls(t *testing.T) {
	env := &ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test"}}
	body := []byte("Subject: x\r\n\r\nbody\r\n")

	t.Run("cancelled between calls", func(t *testing.T) {
		addr := clientSink(t, true)
		ctx, cancel := context.WithCancel(clientTestCtx(t))
		c, err := Dial(ctx, clientTestConfig(), "sink.test", addr)
		if err != nil {
			t.Fatal(err)
		}
		for range 3 {
			if _, err := c.Send(ctx, env, body); err != nil {
				t.Fatal(err)
			}
		}
		cancel()
		time.Sleep(10 * time.Millisecond) // let an AfterFunc callback run, if any
		if err := c.Quit(); err != nil {
			t.Fatalf("Quit after the context ended between calls: %v", err)
		}
	})

	t.Run("next call after cancel", func(t *testing.T) {
		addr := clientSink(t, true)
		ctx, cancel := context.WithCancel(clientTestCtx(t))
		c, err := Dial(ctx, clientTestConfig(), "sink.test", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Send(ctx, env, body); err != nil {
			t.Fatal(err)
		}
		cancel()
		if _, err := c.Send(ctx, env, body); !errors.Is(err, context.Canceled) || c.Usable() {
			t.Fatalf("Send after cancel: %v (usable %v), want context.Canceled", err, c.Usable())
		}
	})

	t.Run("cancelled during a later call", func(t *testing.T) {
		addr, wait := clientScript(t, func(p *clientPeer) {
			p.hello("PIPELINING")
			p.transaction(true, []string{"MAIL", "RCPT", "DATA"}, []string{"250 ok", "250 ok", "354 go"}, "250 queued")
			p.expect("MAIL")
			p.waitClose()
		})
		cfg := clientTestConfig()
		cfg.MailTimeout = time.Minute // only the context can end the wait
		ctx, cancel := context.WithCancel(clientTestCtx(t))
		c, err := Dial(ctx, cfg, "mx.test", addr)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Send(ctx, env, body); err != nil {
			t.Fatal(err)
		}
		time.AfterFunc(100*time.Millisecond, cancel)
		if _, err := c.Send(ctx, env, body); !errors.Is(err, context.Canceled) || c.Usable() {
			t.Errorf("err %v (usable %v), want context.Canceled", err, c.Usable())
		}
		wait()
	})

	t.Run("another context", func(t *testing.T) {
		addr := clientSink(t, true)
		ctx1, cancel1 := context.WithCancel(clientTestCtx(t))
		c, err := Dial(ctx1, clientTestConfig(), "sink.test", addr)
		if err != nil {
			t.Fatal(err)
		}
		ctx2, cancel2 := context.WithCancel(clientTestCtx(t))
		defer cancel2()
		if _, err := c.Send(ctx2, env, body); err != nil {
			t.Fatal(err)
		}
		cancel1() // no longer watched
		if _, err := c.Send(ctx2, env, body); err != nil || !c.Usable() {
			t.Fatalf("Send on ctx2 after ctx1 ended: %v (usable %v)", err, c.Usable())
		}
		if err := c.Quit(); err != nil {
			t.Fatal(err)
		}
		c.wmu.Lock()
		stop := c.watchStop
		c.wmu.Unlock()
		if stop != nil {
			t.Fatal("context callback still registered after Quit")
		}
	})
}

package engine

import (
	"bufio"
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/spool"
)

// TestIdleTimeoutReplyOnCachedConnection: a server that ends an idle
// connection with "421 4.4.2 timeout" (as Postfix's smtpd does) leaves
// that reply waiting in the socket; the next message sent on the cached
// connection must go out at once on a new connection, not be deferred.
func TestIdleTimeoutReplyOnCachedConnection(t *testing.T) {
	var (
		mu    sync.Mutex
		got   []string
		conns int
	)
	addr := serveLoopback(t, func(c net.Conn) {
		mu.Lock()
		conns++
		first := conns == 1
		mu.Unlock()
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		r, w := bufio.NewReader(c), bufio.NewWriter(c)
		say := func(s string) { w.WriteString(s + "\r\n"); w.Flush() }
		say("220 mx ESMTP")
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			switch v := strings.ToUpper(line[:min(4, len(line))]); v {
			case "EHLO":
				say("250-mx\r\n250 PIPELINING")
			case "MAIL", "RSET":
				say("250 2.0.0 ok")
			case "RCPT":
				mu.Lock()
				got = append(got, strings.TrimSpace(line))
				mu.Unlock()
				say("250 2.1.5 ok")
			case "DATA":
				say("354 go")
				if !skipData(r) {
					return
				}
				say("250 2.0.0 queued")
				if first {
					// The idle timeout of the first connection.
					time.Sleep(50 * time.Millisecond)
					say("421 4.4.2 mx Error: timeout exceeded")
					return
				}
			case "QUIT":
				say("221 bye")
				return
			}
		}
	})
	st := openStore(t)
	s := testScheduler(t, st, addr, func(cfg *DeliveryConfig) { cfg.MaxConnectionsPerDomain = 1 })
	s.Start()
	defer s.Stop(context.Background())
	send := func(rcpt string) {
		now := time.Now()
		msg := &spool.Message{
			ID: st.NewID(), From: "s@src.test", Received: now, ClientIP: "127.0.0.1", Helo: "src.test",
			Rcpts: []spool.Recipient{{Addr: rcpt, Domain: "dest.test", NextAttempt: now}},
		}
		body := []byte("Subject: x\r\n\r\nbody\r\n")
		if err := st.CommitWait(msg, body); err != nil {
			t.Fatal(err)
		}
		s.Enqueue(msg, body)
	}
	wait := func(n int64) SchedulerMetrics {
		deadline := time.Now().Add(10 * time.Second)
		for {
			m := s.Metrics()
			if m.Outcomes["delivered"]+m.Outcomes["deferred"]+m.Outcomes["bounced"] >= n {
				return m
			}
			if time.Now().After(deadline) {
				t.Fatalf("no outcome: %+v", m)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	send("a@dest.test")
	wait(1)
	time.Sleep(200 * time.Millisecond) // the server's 421 is waiting in the socket
	send("b@dest.test")
	m := wait(2)
	mu.Lock()
	defer mu.Unlock()
	if m.Outcomes["delivered"] != 2 || m.Outcomes["deferred"] != 0 || len(got) != 2 || conns != 2 {
		t.Fatalf("outcomes %v, server got %v on %d connections: want both delivered, the second on a new connection", m.Outcomes, got, conns)
	}
}

package engine

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/spool"
)

// auditLimitSink is a pipelining server with a small SIZE that takes at most
// perConn MAIL commands on a connection and answers the next with 421 (as
// providers limit the messages of one connection). It counts the messages
// it accepted per recipient.
type auditLimitSink struct {
	perConn int
	// rcptMax, when set, is the most recipients of a transaction; the
	// next get 552 5.5.3 (RFC 821's code for too many recipients).
	rcptMax int
	// tooMany is the reply past rcptMax. Default: 552 5.5.3.
	tooMany string
	mu      sync.Mutex
	got     map[string]int
}

func startAuditLimitSink(t *testing.T, perConn int) (*auditLimitSink, netip.AddrPort) {
	b := &auditLimitSink{perConn: perConn, got: map[string]int{}}
	return b, serveLoopback(t, b.serve)
}

func (b *auditLimitSink) serve(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second)) // bounds every loop below
	r, w := bufio.NewReader(c), bufio.NewWriter(c)
	w.WriteString("220 sink ESMTP\r\n")
	w.Flush()
	mails := 0
	var rcpts []string
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		switch strings.ToUpper(line[:min(4, len(line))]) {
		case "EHLO":
			w.WriteString("250-sink\r\n250-PIPELINING\r\n250 SIZE 1000\r\n")
		case "RSET":
			rcpts = rcpts[:0]
			w.WriteString("250 2.0.0 ok\r\n")
		case "MAIL":
			if mails++; mails > b.perConn {
				w.WriteString("421 4.7.0 too many messages on this connection\r\n")
				w.Flush()
				return
			}
			rcpts = rcpts[:0]
			w.WriteString("250 2.0.0 ok\r\n")
		case "RCPT":
			if b.rcptMax > 0 && len(rcpts) == b.rcptMax {
				if b.tooMany == "" {
					b.tooMany = "552 5.5.3 too many recipients"
				}
				w.WriteString(b.tooMany + "\r\n")
				break
			}
			rcpts = append(rcpts, strings.TrimSpace(line))
			w.WriteString("250 2.1.5 ok\r\n")
		case "DATA":
			w.WriteString("354 go\r\n")
			w.Flush()
			if !skipData(r) {
				return
			}
			b.mu.Lock()
			for _, a := range rcpts {
				b.got[a]++
			}
			b.mu.Unlock()
			w.WriteString("250 2.0.0 queued\r\n")
		case "QUIT":
			w.WriteString("221 2.0.0 bye\r\n")
			w.Flush()
			return
		default:
			w.WriteString("500 5.5.2 what\r\n")
		}
		if r.Buffered() == 0 {
			if w.Flush() != nil {
				return
			}
		}
	}
}

func (b *auditLimitSink) snapshot() map[string]int {
	b.mu.Lock()
	defer b.mu.Unlock()
	got := make(map[string]int, len(b.got))
	for k, v := range b.got {
		got[k] = v
	}
	return got
}

// TestAuditAgentReusedBatchNotResent: on a reused connection, a batch whose
// first message is refused before sending (larger than the server's SIZE)
// and whose later messages are delivered, then cut off by a 421, must not
// be sent again as if the cached connection had been stale: the messages
// already accepted would arrive twice.
func TestAuditAgentReusedBatchNotResent(t *testing.T) {
	sink, addr := startAuditLimitSink(t, 5)
	st := openStore(t)
	s := testScheduler(t, st, addr, func(cfg *DeliveryConfig) {
		cfg.MaxConnectionsPerDomain = 1
		cfg.PipelineTransactions = 4
	})
	// Batches of four: m0..m3 open the connection; m4 (too big), m5, m6
	// and m7 reuse it. m5 is the connection's fifth message, m6 gets 421.
	var ids []spool.ID
	for i := range 8 {
		body := []byte(fmt.Sprintf("Subject: %d\r\n\r\nbody %d\r\n", i, i))
		if i == 4 {
			body = []byte("Subject: big\r\n\r\n" + strings.Repeat("x", 2000) + "\r\n")
		}
		now := time.Now()
		msg := &spool.Message{
			ID: st.NewID(), From: "", Received: now, ClientIP: "127.0.0.1", Helo: "src.test", Size: int64(len(body)),
			Rcpts: []spool.Recipient{{Addr: fmt.Sprintf("m%d@dest.test", i), Domain: "dest.test", NextAttempt: now}},
		}
		if err := st.CommitWait(msg, body); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, msg.ID)
		s.Enqueue(msg, body)
	}
	s.Start()
	defer s.Stop(context.Background())

	// Done when every message has had its attempt.
	deadline := time.Now().Add(20 * time.Second)
	for {
		tried := 0
		for _, id := range ids {
			if m, err := st.Load(id); err != nil || m.Rcpts[0].Attempts > 0 {
				tried++
			}
		}
		if tried == len(ids) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 20 s, %d of %d messages attempted", tried, len(ids))
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // a duplicate would be on its way
	for rcpt, n := range sink.snapshot() {
		if n != 1 {
			t.Errorf("%s: received %d times", rcpt, n)
		}
	}
}

// TestAuditAgentTooManyRecipients: a server's recipient limit answers the
// surplus RCPTs 452 4.5.3, or 552 5.5.3 (RFC 821's code, which RFC 5321
// §4.5.3.1.10 says to treat as temporary): those recipients are not
// bounced but sent again at once in new transactions, each delivering
// one more, so that all arrive within seconds, once each, instead of
// waiting for the retry delay (an hour here).
func TestAuditAgentTooManyRecipients(t *testing.T) {
	for _, tooMany := range []string{"452 4.5.3 too many recipients", "552 5.5.3 too many recipients"} {
		t.Run(tooMany[:3], func(t *testing.T) {
			sink, addr := startAuditLimitSink(t, 100)
			sink.rcptMax, sink.tooMany = 1, tooMany
			st := openStore(t)
			s := testScheduler(t, st, addr, nil)
			now := time.Now()
			body := []byte("Subject: x\r\n\r\nbody\r\n")
			msg := &spool.Message{
				ID: st.NewID(), From: "", Received: now, ClientIP: "127.0.0.1", Helo: "src.test", Size: int64(len(body)),
				Rcpts: []spool.Recipient{
					{Addr: "a@dest.test", Domain: "dest.test", NextAttempt: now},
					{Addr: "b@dest.test", Domain: "dest.test", NextAttempt: now},
					{Addr: "c@dest.test", Domain: "dest.test", NextAttempt: now},
				},
			}
			deliverOne(t, s, st, msg, body)
			deadline := time.Now().Add(20 * time.Second)
			for {
				if _, err := st.Load(msg.ID); errors.Is(err, spool.ErrNotFound) {
					break
				}
				if time.Now().After(deadline) {
					m, _ := st.Load(msg.ID)
					t.Fatalf("not all delivered after 20 s: %+v", m.Rcpts)
				}
				time.Sleep(10 * time.Millisecond)
			}
			m := s.Metrics()
			// b and c, then c, were sent again at once: resent, neither
			// deferred nor counted as attempts.
			if m.Outcomes["delivered"] != 3 || m.Outcomes["bounced"] != 0 || m.Outcomes["deferred"] != 0 {
				t.Errorf("outcomes %v, want 3 delivered and no deferral", m.Outcomes)
			}
			got := sink.snapshot()
			for _, r := range []string{"a", "b", "c"} {
				if got["RCPT TO:<"+r+"@dest.test>"] != 1 {
					t.Errorf("sink got %v, want each recipient once", got)
				}
			}
		})
	}
}

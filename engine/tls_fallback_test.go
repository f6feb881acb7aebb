package engine

import (
	"context"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/netio"
	"github.com/hermod-mta/hermod/spool"
)

// TestOpportunisticTLSFallback delivers to an MX that offers STARTTLS but
// whose handshake always fails: with opportunistic TLS the agent connects
// again without TLS and delivers (Postfix's "may" level); with TLS
// required the mail is deferred and nothing is sent in clear.
func TestOpportunisticTLSFallback(t *testing.T) {
	for _, tc := range []struct {
		mode      netio.TLSMode
		delivered bool
	}{
		{netio.TLSOpportunistic, true},
		{netio.TLSRequired, false},
	} {
		t.Run(tc.mode.String(), func(t *testing.T) {
			sink, addr := startBatchSink(t)
			sink.brokenTLS = true
			st := openStore(t)
			s := testScheduler(t, st, addr, func(cfg *DeliveryConfig) { cfg.TLS = tc.mode })
			now := time.Now()
			msg := &spool.Message{
				ID: st.NewID(), From: "s@src.test", Received: now, ClientIP: "127.0.0.1", Helo: "src.test",
				Rcpts: []spool.Recipient{{Addr: "r@dest.test", Domain: "dest.test", NextAttempt: now}},
			}
			if err := st.CommitWait(msg, []byte("Subject: x\r\n\r\nbody\r\n")); err != nil {
				t.Fatal(err)
			}
			s.Start()
			defer s.Stop(context.Background())
			deadline := time.Now().Add(10 * time.Second)
			for {
				m := s.Metrics()
				if m.Outcomes["delivered"]+m.Outcomes["deferred"] > 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("no outcome after 10 s: %+v", m)
				}
				time.Sleep(5 * time.Millisecond)
			}
			got, _, _ := sink.snapshot()
			m := s.Metrics()
			sink.mu.Lock()
			starttls := sink.starttls
			sink.mu.Unlock()
			if starttls == 0 {
				t.Fatal("the client never tried STARTTLS")
			}
			if tc.delivered {
				if got["r@dest.test"] != 1 || m.Outcomes["delivered"] != 1 || m.TLSFallbacks != 1 {
					t.Fatalf("sink got %v, outcomes %v, fallbacks %d: want delivered once in clear after one fallback", got, m.Outcomes, m.TLSFallbacks)
				}
				return
			}
			if len(got) != 0 || m.Outcomes["deferred"] != 1 || m.TLSFallbacks != 0 {
				t.Fatalf("sink got %v, outcomes %v, fallbacks %d: want deferred, nothing sent", got, m.Outcomes, m.TLSFallbacks)
			}
			if r, err := st.Load(msg.ID); err != nil || r.Rcpts[0].State != spool.Pending {
				t.Fatalf("queued message: %v, %v", r, err)
			}
		})
	}
}

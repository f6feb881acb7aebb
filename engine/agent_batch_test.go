package engine

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/dnscache"
	"github.com/hermod-mta/hermod/netio"
	"github.com/hermod-mta/hermod/spool"
)

// batchSink is a pipelining SMTP server without CHUNKING: it answers
// commands as they come and flushes its replies when it has read all its
// input. Recipients starting with "defer" get 451; it records the messages
// it accepted (one entry per accepted recipient).
type batchSink struct {
	mu    sync.Mutex
	got   map[string]int // recipient -> messages received
	conns int
	// afterDot counts messages whose end of data arrived together with
	// the next command: the client pipelined it behind the message.
	afterDot int
	// brokenTLS offers STARTTLS, answers it 220 and then sends garbage
	// instead of a handshake; starttls counts those.
	brokenTLS bool
	starttls  int
}

func startBatchSink(t testing.TB) (*batchSink, netip.AddrPort) {
	b := &batchSink{got: map[string]int{}}
	return b, serveLoopback(t, b.serve)
}

// skipData reads a message's data up to its final dot; false when the
// connection ended first.
func skipData(r *bufio.Reader) bool {
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return false
		}
		if l == ".\r\n" {
			return true
		}
	}
}

// serveLoopback listens on 127.0.0.1 and runs serve on a goroutine for
// every connection until the test ends (which waits for them).
func serveLoopback(t testing.TB, serve func(net.Conn)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				serve(c)
			}()
		}
	}()
	return netip.MustParseAddrPort(ln.Addr().String())
}

// deliverOne commits msg with body to st, hands it to s and starts s,
// which is stopped when the test ends.
func deliverOne(t testing.TB, s *Scheduler, st *spool.Store, msg *spool.Message, body []byte) {
	t.Helper()
	if err := st.CommitWait(msg, body); err != nil {
		t.Fatal(err)
	}
	s.Enqueue(msg, body)
	s.Start()
	t.Cleanup(func() { s.Stop(context.Background()) })
}

// testScheduler returns a scheduler over st delivering every domain to
// addr without TLS, retrying after an hour, with edit applied to its
// configuration (nil: none). It is not started.
func testScheduler(t testing.TB, st *spool.Store, addr netip.AddrPort, edit func(*DeliveryConfig)) *Scheduler {
	t.Helper()
	cfg := DeliveryConfig{}
	cfg.Hostname = "relay.test"
	cfg.TLS = netio.TLSDisabled
	cfg.Port = int(addr.Port())
	cfg.Retry = []time.Duration{time.Hour}
	if edit != nil {
		edit(&cfg)
	}
	s, err := NewScheduler(cfg, SchedulerOptions{Store: st, Resolver: staticResolver{addr.Addr()}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (b *batchSink) serve(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second)) // bounds every loop below
	b.mu.Lock()
	b.conns++
	b.mu.Unlock()
	r, w := bufio.NewReader(c), bufio.NewWriter(c)
	w.WriteString("220 sink ESMTP\r\n")
	w.Flush()
	var rcpts []string
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		verb := strings.ToUpper(line[:min(4, len(line))])
		switch verb {
		case "EHLO":
			w.WriteString("250-sink\r\n")
			if b.brokenTLS {
				w.WriteString("250-STARTTLS\r\n")
			}
			w.WriteString("250-PIPELINING\r\n250 SIZE 10000000\r\n")
		case "STAR":
			b.mu.Lock()
			b.starttls++
			b.mu.Unlock()
			w.WriteString("220 2.0.0 go ahead\r\n")
			w.Flush()
			time.Sleep(10 * time.Millisecond) // after the client's ClientHello
			c.Write([]byte("this is not TLS\r\n"))
			return
		case "MAIL", "RSET":
			rcpts = rcpts[:0]
			w.WriteString("250 2.0.0 ok\r\n")
		case "RCPT":
			addr := strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(line[len("RCPT TO:"):]), "<"), ">")
			if strings.HasPrefix(addr, "defer") {
				w.WriteString("451 4.2.0 try later\r\n")
				continue
			}
			rcpts = append(rcpts, addr)
			w.WriteString("250 2.1.5 ok\r\n")
		case "DATA":
			if len(rcpts) == 0 {
				w.WriteString("554 5.5.1 no valid recipients\r\n")
				break
			}
			w.WriteString("354 go\r\n")
			w.Flush()
			if !skipData(r) {
				return
			}
			b.mu.Lock()
			for _, a := range rcpts {
				b.got[a]++
			}
			if r.Buffered() > 0 {
				b.afterDot++
			}
			b.mu.Unlock()
			rcpts = rcpts[:0]
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

func (b *batchSink) snapshot() (map[string]int, int, int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	got := make(map[string]int, len(b.got))
	for k, v := range b.got {
		got[k] = v
	}
	return got, b.conns, b.afterDot
}

// staticResolver sends every domain to one address.
type staticResolver struct{ addr netip.Addr }

func (r staticResolver) Resolve(_ context.Context, domain string) (*dnscache.Route, error) {
	return &dnscache.Route{Hosts: []dnscache.Host{{Name: "mx." + domain, Addrs: []netip.Addr{r.addr}}}}, nil
}

// TestAgentBatchesWithoutChunking queues a burst of messages for one
// destination allowed a single connection, so that the agent gets
// batches, to a server with PIPELINING and no CHUNKING: every message
// arrives once, messages whose recipient was deferred stay queued with
// their attempt recorded, and the rest leave the spool.
func TestAgentBatchesWithoutChunking(t *testing.T) {
	sink, addr := startBatchSink(t)
	st := openStore(t)
	cfg := DeliveryConfig{}
	cfg.Hostname = "relay.test"
	cfg.TLS = netio.TLSDisabled
	cfg.Port = int(addr.Port())
	cfg.MaxConnectionsPerDomain = 1
	cfg.PipelineTransactions = 8
	cfg.Retry = []time.Duration{time.Hour}
	s, err := NewScheduler(cfg, SchedulerOptions{Store: st, Resolver: staticResolver{addr.Addr()}})
	if err != nil {
		t.Fatal(err)
	}
	const n = 40
	var deferred []spool.ID
	var msgs []*spool.Message
	var bodies [][]byte
	for i := range n {
		rcpt := fmt.Sprintf("r%d@dest.test", i)
		if i%7 == 3 {
			rcpt = fmt.Sprintf("defer%d@dest.test", i)
		}
		now := time.Now()
		msg := &spool.Message{
			ID: st.NewID(), From: "s@src.test", Received: now, ClientIP: "127.0.0.1", Helo: "src.test",
			Rcpts: []spool.Recipient{{Addr: rcpt, Domain: "dest.test", NextAttempt: now}},
		}
		body := []byte(fmt.Sprintf("Subject: %d\r\n\r\nbody %d\r\n", i, i))
		if err := st.CommitWait(msg, body); err != nil {
			t.Fatal(err)
		}
		if i%7 == 3 {
			deferred = append(deferred, msg.ID)
		}
		msgs, bodies = append(msgs, msg), append(bodies, body)
	}
	// All at once, before the loop starts (and before its first scan
	// admits them from the spool): the destination's one connection gets
	// batches.
	for i, msg := range msgs {
		s.Enqueue(msg, bodies[i])
	}
	s.Start()
	defer s.Stop(context.Background())

	deadline := time.Now().Add(20 * time.Second)
	for {
		got, _, _ := sink.snapshot()
		if len(got) == n-len(deferred) && st.Stats().Messages == int64(len(deferred)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 20 s: sink got %d messages (want %d), spool holds %d (want %d)",
				len(got), n-len(deferred), st.Stats().Messages, len(deferred))
		}
		time.Sleep(10 * time.Millisecond)
	}
	got, conns, afterDot := sink.snapshot()
	for rcpt, k := range got {
		if k != 1 || strings.HasPrefix(rcpt, "defer") {
			t.Errorf("sink got %d messages for %s", k, rcpt)
		}
	}
	for _, id := range deferred {
		m, err := st.Load(id)
		if err != nil {
			t.Fatalf("deferred message %v: %v", id, err)
		}
		if r := m.Rcpts[0]; r.State != spool.Pending || r.Attempts != 1 || !strings.HasPrefix(r.LastReply, "451") {
			t.Errorf("deferred message %v: recipient %+v", id, r)
		}
	}
	if conns != 1 {
		t.Errorf("%d connections, want 1 (max_connections_per_domain)", conns)
	}
	if afterDot == 0 {
		t.Error("no message had the next transaction pipelined behind it: the agent got no batch")
	}
}

// BenchmarkAgentDrain delivers b.N queued 1 KiB messages to one
// destination over one connection, in batches of 16, to a pipelining
// server without CHUNKING: the drain of a backlog. It reports messages
// per second and WAL fsyncs per message (the records of a batch share a
// group commit).
func BenchmarkAgentDrain(b *testing.B) {
	_, addr := startBatchSink(b)
	scfg := spool.DefaultConfig()
	scfg.Dir = b.TempDir()
	st, err := spool.Open(scfg, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	cfg := DeliveryConfig{}
	cfg.Hostname = "relay.test"
	cfg.TLS = netio.TLSDisabled
	cfg.Port = int(addr.Port())
	cfg.MaxConnectionsPerDomain = 1
	cfg.PipelineTransactions = 16
	cfg.MaxMessagesPerConnection = 1 << 30
	s, err := NewScheduler(cfg, SchedulerOptions{Store: st, Resolver: staticResolver{addr.Addr()}})
	if err != nil {
		b.Fatal(err)
	}
	body := []byte("Subject: bench\r\n\r\n" + strings.Repeat(strings.Repeat("x", 62)+"\r\n", 16))
	msgs := make([]*spool.Message, b.N)
	done := make(chan error, b.N)
	for i := range msgs {
		now := time.Now()
		msgs[i] = &spool.Message{
			ID: st.NewID(), From: "s@src.test", Received: now, ClientIP: "127.0.0.1", Helo: "src.test",
			Rcpts: []spool.Recipient{{Addr: fmt.Sprintf("r%d@dest.test", i), Domain: "dest.test", NextAttempt: now}},
		}
		st.Commit(msgs[i], body, func(err error) { done <- err })
	}
	for range msgs {
		if err := <-done; err != nil {
			b.Fatal(err)
		}
	}
	syncs := st.Metrics().WALFsyncs
	b.ResetTimer()
	for _, m := range msgs {
		s.Enqueue(m, nil) // beyond the event queue's room, the first scan finds them
	}
	s.Start()
	defer s.Stop(context.Background())
	deadline := time.Now().Add(2 * time.Minute)
	for st.Stats().Messages > 0 {
		if time.Now().After(deadline) {
			b.Fatalf("%d messages left after 2 minutes", st.Stats().Messages)
		}
		time.Sleep(time.Millisecond)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
	b.ReportMetric(float64(st.Metrics().WALFsyncs-syncs)/float64(b.N), "fsyncs/msg")
}

package netio

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// heldBackend commits nothing until released: Data calls wait in pending.
type heldBackend struct {
	fakeBackend
	pending []func(*smtperr.Error)
}

func (b *heldBackend) Data(env *Envelope, body []byte, done func(*smtperr.Error)) {
	b.msgs = append(b.msgs, fakeMsg{env: *env, body: string(body)})
	b.pending = append(b.pending, done)
}

// TestSessionContentBudget: sessions sharing a ServerConfig share its
// budget of buffered content: a message that does not fit is read to its
// end and refused with 452 4.3.1, MAIL is refused while the budget is
// spent, and every octet is given back when a body is committed, refused,
// reset or its connection lost.
func TestSessionContentBudget(t *testing.T) {
	cfg := testConfig()
	cfg.MaxMessageSize = 1 << 20
	cfg.budget = newContentBudget(20 << 10) // one body of 10,000 octets (16 KiB reserved), not two
	line := strings.Repeat("x", 98) + "\r\n"
	body := strings.Repeat(line, 100) // 10,000 octets: one step
	newSess := func(b Backend) *Session {
		s := NewSession(cfg, b, ConnInfo{Remote: netip.MustParseAddrPort("192.0.2.1:5000")}, false, func(*smtperr.Error) {})
		s.Greeting(nil)
		return s
	}
	feed := func(s *Session, in string) string {
		t.Helper()
		n, out, _ := s.Feed([]byte(in), nil)
		if n != len(in) {
			t.Fatalf("fed %d of %d octets", n, len(in))
		}
		return codes(string(out))
	}
	hb := &heldBackend{}
	a := newSess(hb)
	if got := feed(a, hello+tx+"DATA\r\n"+body); got != "250 250 250 354" {
		t.Fatalf("a: %q", got)
	}
	if u := cfg.budget.buffered(); u < 10000 || u > 16<<10 {
		t.Fatalf("a holds %d octets of budget for 10,000 octets of content", u)
	}
	// b's content finds no room: read whole, refused, nothing kept.
	fb := &fakeBackend{}
	b := newSess(fb)
	if got := feed(b, hello+tx+"DATA\r\n"+body+".\r\n"); got != "250 250 250 354 452" {
		t.Fatalf("b: %q, want its message refused with 452", got)
	}
	if len(fb.msgs) != 0 {
		t.Fatal("b's message was committed")
	}
	// a ends its message: the commit holds the budget until Resume.
	if got := feed(a, ".\r\n"); got != "" || a.Phase() != PhasePending {
		t.Fatalf("a at its dot: %q, phase %v", got, a.Phase())
	}
	cfg.budget.used.Add(cfg.budget.max) // spend the rest
	if got := feed(b, "MAIL FROM:<c@x.test>\r\n"); got != "452" {
		t.Errorf("MAIL while the budget is spent: %q, want 452", got)
	}
	cfg.budget.used.Add(-cfg.budget.max)
	hb.pending[0](smtperr.New(250, "2.0.0", "queued"))
	if out, _ := a.Resume(smtperr.New(250, "2.0.0", "queued"), nil); codes(string(out)) != "250" {
		t.Fatalf("a's commit: %q", out)
	}
	if u := cfg.budget.buffered(); u != 0 {
		t.Errorf("%d octets still held after a's commit", u)
	}
	// Room again: b's next message goes through (fakeBackend commits at
	// once; the transport would then call Resume).
	if got := feed(b, "RSET\r\n"+tx+"DATA\r\n"+body+".\r\n"); got != "250 250 250 354" || b.Phase() != PhasePending {
		t.Errorf("b after a's commit: %q, phase %v", got, b.Phase())
	}
	if out, _ := b.Resume(smtperr.New(250, "2.0.0", "queued"), nil); codes(string(out)) != "250" {
		t.Errorf("b's commit: %q", out)
	}
	// Held budget comes back on RSET-less aborts too: mid-DATA, and with a
	// commit pending.
	c := newSess(hb)
	feed(c, hello+tx+"DATA\r\n"+body)
	c.Abort()
	d := newSess(hb)
	feed(d, hello+tx+"DATA\r\n"+body+".\r\n")
	d.Abort()
	if u := cfg.budget.buffered(); u != 0 {
		t.Errorf("%d octets still held after aborted sessions", u)
	}
	if r := cfg.budget.refused.Load(); r != 2 {
		t.Errorf("refused = %d, want 2 (b's message, the MAIL)", r)
	}
}

// TestServerContentBudget: over real connections, clients sending large
// messages at once past max_buffered_bytes get 452 4.3.1 for those that do
// not fit and 250 for the others, and the budget is all given back.
func TestServerContentBudget(t *testing.T) {
	cfg := ServerConfig{Listen: []string{freePort(t)}, MaxMessageSize: 3 << 20, MaxBufferedBytes: 4 << 20}
	b := &asyncBackend{}
	srv, addr := startServer(t, cfg, b, nil)
	const clients = 4
	msg := strings.Repeat(strings.Repeat("y", 998)+"\r\n", 2<<10) // 2 MiB
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		replies []string
	)
	start := make(chan struct{})
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(60 * time.Second))
			r := bufio.NewReader(c)
			read := func() string {
				for {
					l, err := r.ReadString('\n')
					if err != nil || len(l) < 4 || l[3] != '-' {
						return l
					}
				}
			}
			read()
			fmt.Fprintf(c, "EHLO c%d\r\n", i)
			read()
			fmt.Fprintf(c, "MAIL FROM:<a@x.test>\r\n")
			read()
			fmt.Fprintf(c, "RCPT TO:<b@y.test>\r\n")
			read()
			fmt.Fprintf(c, "DATA\r\n")
			read()
			// Half of each message first, so that all four are held at
			// once, then the rest.
			c.Write([]byte(msg[:len(msg)/2]))
			<-start
			c.Write([]byte(msg[len(msg)/2:] + ".\r\n"))
			rep := read()
			mu.Lock()
			replies = append(replies, rep)
			mu.Unlock()
			fmt.Fprintf(c, "QUIT\r\n")
			read()
		}()
	}
	time.Sleep(500 * time.Millisecond) // the first halves are in
	close(start)
	wg.Wait()
	ok, full := 0, 0
	for _, r := range replies {
		switch {
		case strings.HasPrefix(r, "250 "):
			ok++
		case strings.HasPrefix(r, "452 4.3.1 "):
			full++
		default:
			t.Errorf("reply %q", r)
		}
	}
	// 4 MiB hold at most one 2 MiB message and a half: at least one is
	// accepted, at least two are refused.
	if ok < 1 || full < 2 || ok+full != clients {
		t.Errorf("%d accepted, %d refused with 452 (%q)", ok, full, replies)
	}
	if n := b.count(); n != ok {
		t.Errorf("backend got %d messages, %d were acknowledged", n, ok)
	}
	deadline := time.Now().Add(5 * time.Second)
	for srv.Metrics().BufferedBytes != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if m := srv.Metrics(); m.BufferedBytes != 0 || m.BufferRefused < int64(full) {
		t.Errorf("after the sessions: %d octets held, %d refusals counted", m.BufferedBytes, m.BufferRefused)
	}
}

package engine

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/internal/smtperr"
	"github.com/hermod-mta/hermod/netio"
	"github.com/hermod-mta/hermod/spool"
)

func openStore(t *testing.T) *spool.Store {
	t.Helper()
	cfg := spool.DefaultConfig()
	cfg.Dir = t.TempDir()
	st, err := spool.Open(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func TestRelayPolicy(t *testing.T) {
	r, err := NewReceiver(RelayConfig{RelayNetworks: []string{"10.0.0.0/8", "2001:db8::/32"}, RelayDomains: []string{"Inbound.TEST."}},
		ReceiverOptions{Store: openStore(t)})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		ip, rcpt string
		ok       bool
	}{
		{"10.1.2.3", "a@anywhere.test", true},
		{"::ffff:10.1.2.3", "a@anywhere.test", true},
		{"2001:db8::5", "a@anywhere.test", true},
		{"192.0.2.1", "a@anywhere.test", false},
		{"192.0.2.1", "a@inbound.test", true},
		{"192.0.2.1", "a@INBOUND.test", true},
		{"192.0.2.1", "a@sub.inbound.test", false},
		{"127.0.0.1", "a@anywhere.test", false},
	}
	for _, c := range cases {
		env := &netio.Envelope{Conn: &netio.ConnInfo{Remote: netip.AddrPortFrom(netip.MustParseAddr(c.ip), 1)}}
		got := r.Rcpt(env, c.rcpt)
		if (got == nil) != c.ok {
			t.Errorf("Rcpt(%s, %s) = %v, want ok=%v", c.ip, c.rcpt, got, c.ok)
		}
		if got != nil && (got.Code != 554 || got.Enhanced != "5.7.1") {
			t.Errorf("relay refusal is %v, want 554 5.7.1", got)
		}
	}
}

func TestRelayConfigValidate(t *testing.T) {
	c := RelayConfig{RelayNetworks: []string{"10.0.0.0/33", "x"}, RelayDomains: []string{"a b"}, MaxHops: -1}
	err := c.Validate()
	if err == nil {
		t.Fatal("invalid config accepted")
	}
	for _, want := range []string{"10.0.0.0/33", `"x"`, "relay_domains", "max_hops"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
}

func TestCountReceived(t *testing.T) {
	msg := []byte("Received: a\r\n\tb\r\nreceived: c\r\nSubject: x\r\n\r\nReceived: in body\r\n")
	if n := countReceived(msg); n != 2 {
		t.Fatalf("countReceived = %d, want 2", n)
	}
}

func TestReceivedHeader(t *testing.T) {
	env := &netio.Envelope{
		Conn:  &netio.ConnInfo{Remote: netip.MustParseAddrPort("192.0.2.7:4000"), Helo: "client.test", ESMTP: true},
		Rcpts: []string{"b@y.test"},
	}
	now := time.Date(2026, 11, 23, 19, 0, 0, 0, time.UTC)
	got := string(appendReceived(nil, env, "mx.test", "0123456789abcdef", now))
	want := "Received: from client.test ([192.0.2.7])\r\n\tby mx.test (Hermod) with ESMTP id 0123456789abcdef\r\n\tfor <b@y.test>; Mon, 23 Nov 2026 19:00:00 +0000\r\n"
	if got != want {
		t.Fatalf("got  %q\nwant %q", got, want)
	}
	env.Rcpts = append(env.Rcpts, "c@y.test")
	env.SMTPUTF8 = true
	if got := string(appendReceived(nil, env, "mx.test", "id", now)); strings.Contains(got, "for <") || !strings.Contains(got, "with UTF8SMTP id") {
		t.Fatalf("multi-recipient / UTF8 header: %q", got)
	}
}

// TestReceiverEndToEnd runs the real gnet server and a real spool.
func TestReceiverEndToEnd(t *testing.T) {
	st := openStore(t)
	var buf bytes.Buffer
	elog := NewEventLog(&buf, nil)
	accepted := make(chan *spool.Message, 10)
	r, err := NewReceiver(RelayConfig{}, ReceiverOptions{Hostname: "mx.test", Store: st, Log: elog, Accepted: func(m *spool.Message, _ []byte) { accepted <- m }})
	if err != nil {
		t.Fatal(err)
	}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := l.Addr().String()
	l.Close()
	srv, err := netio.NewServer(netio.ServerConfig{Hostname: "mx.test", Listen: []string{addr}}, r, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve() }()
	select {
	case <-srv.Ready():
	case err := <-errc:
		t.Fatal(err)
	}
	defer func() { srv.Shutdown(context.Background()); <-errc }()

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rd := bufio.NewReader(c)
	c.Write([]byte("EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@z.test>\r\nDATA\r\nSubject: t\r\n\r\nhello\r\n.\r\n" +
		"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n" + strings.Repeat("Received: x\r\n", 100) + "\r\nloop\r\n.\r\nQUIT\r\n"))
	var replies []string
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		line, err := rd.ReadString('\n')
		if err != nil {
			break
		}
		if line[3] == ' ' {
			replies = append(replies, strings.TrimSpace(line))
		}
	}
	if len(replies) != 12 {
		t.Fatalf("replies: %q", replies)
	}
	queued := replies[6]
	if !strings.HasPrefix(queued, "250 2.0.0 Ok: queued as ") || !strings.HasPrefix(replies[10], "554 5.4.6") {
		t.Fatalf("replies: %q", replies)
	}
	id, err := spool.ParseID(strings.TrimPrefix(queued, "250 2.0.0 Ok: queued as "))
	if err != nil {
		t.Fatal(err)
	}
	m, err := st.Load(id)
	if err != nil {
		t.Fatalf("accepted message not in spool: %v", err)
	}
	if m.From != "a@x.test" || len(m.Rcpts) != 2 || m.Rcpts[1].Domain != "z.test" || m.ClientIP != "127.0.0.1" || m.Helo != "c.test" {
		t.Fatalf("spooled envelope %+v", m)
	}
	body, _ := st.Body(id)
	if !strings.HasPrefix(string(body), "Received: from c.test ([127.0.0.1])\r\n\tby mx.test (Hermod) with ESMTP id "+id.String()) ||
		!strings.HasSuffix(string(body), "\r\nSubject: t\r\n\r\nhello\r\n") {
		t.Fatalf("spooled body %q", body)
	}
	select {
	case got := <-accepted:
		if got.ID != id {
			t.Fatalf("scheduler got %v, want %v", got.ID, id)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("accepted message not handed on")
	}
	elog.Close()
	if !strings.Contains(buf.String(), `"event":"received","msg_id":"`+id.String()+`"`) {
		t.Fatalf("event log: %s", buf.String())
	}
	if got := r.Metrics(); got.Messages != 1 || got.Rejected != 1 {
		t.Fatalf("metrics %+v", got)
	}
}

// TestPostmaster: <postmaster> (RFC 5321 §4.5.1) is taken from any client
// when smtp.postmaster is set, and delivered there.
func TestPostmaster(t *testing.T) {
	st := openStore(t)
	outside := &netio.ConnInfo{Remote: netip.MustParseAddrPort("192.0.2.9:1000"), Helo: "c.test"}
	r, err := NewReceiver(RelayConfig{}, ReceiverOptions{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	if got := r.Rcpt(&netio.Envelope{Conn: outside}, "postmaster"); got == nil || got.Code != 550 {
		t.Fatalf("postmaster without smtp.postmaster: %v, want 550", got)
	}
	if err := r.SetPolicy(RelayConfig{Postmaster: "ops@example.test"}); err != nil {
		t.Fatal(err)
	}
	env := &netio.Envelope{Conn: outside, From: "a@x.test"}
	if got := r.Rcpt(env, "postmaster"); got != nil {
		t.Fatalf("postmaster refused: %v", got)
	}
	env.Rcpts = []string{"postmaster"}
	done := make(chan *smtperr.Error, 1)
	r.Data(env, []byte("Subject: hi\r\n\r\nhello\r\n"), func(e *smtperr.Error) { done <- e })
	reply := <-done
	id, err := spool.ParseID(strings.TrimPrefix(reply.Message, "Ok: queued as "))
	if err != nil {
		t.Fatalf("reply %v: %v", reply, err)
	}
	m, err := st.Load(id)
	if err != nil {
		t.Fatal(err)
	}
	if m.Rcpts[0].Addr != "ops@example.test" || m.Rcpts[0].Domain != "example.test" {
		t.Fatalf("postmaster mail queued for %+v", m.Rcpts[0])
	}
	if err := (RelayConfig{Postmaster: "nobody"}).Validate(); err == nil || !strings.Contains(err.Error(), "smtp.postmaster") {
		t.Fatalf("bad postmaster accepted: %v", err)
	}
}

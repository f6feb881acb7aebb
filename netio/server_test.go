package netio

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	gosmtp "github.com/emersion/go-smtp"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// asyncBackend commits on another goroutine after a delay, like the spool.
type asyncBackend struct {
	mu    sync.Mutex
	msgs  []fakeMsg
	delay time.Duration
}

func (b *asyncBackend) Connect(*ConnInfo) *smtperr.Error          { return nil }
func (b *asyncBackend) Mail(*Envelope) *smtperr.Error             { return nil }
func (b *asyncBackend) Rcpt(_ *Envelope, _ string) *smtperr.Error { return nil }
func (b *asyncBackend) Data(env *Envelope, body []byte, done func(*smtperr.Error)) {
	e := *env
	e.Rcpts = append([]string(nil), env.Rcpts...)
	info := *env.Conn
	e.Conn = &info
	go func() {
		time.Sleep(b.delay)
		b.mu.Lock()
		b.msgs = append(b.msgs, fakeMsg{env: e, body: string(body)})
		n := len(b.msgs)
		b.mu.Unlock()
		done(smtperr.New(250, "2.0.0", "Ok: queued as %d", n))
	}()
}

func (b *asyncBackend) count() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.msgs)
}

func freePort(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func startServer(t testing.TB, cfg ServerConfig, b Backend, tlsCfg *tls.Config) (*Server, string) {
	t.Helper()
	addr := freePort(t)
	cfg.Listen = []string{addr}
	cfg.Hostname = "mx.test"
	s, err := NewServer(cfg, b, tlsCfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	errc := serveReady(t, s)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
		<-errc
	})
	return s, addr
}

// serveReady runs s.Serve and waits until it accepts (fatal if it fails or
// takes over 10 s); the channel then gets Serve's result.
func serveReady(t testing.TB, s *Server) <-chan error {
	t.Helper()
	errc := make(chan error, 1)
	go func() { errc <- s.Serve() }()
	select {
	case <-s.Ready():
	case err := <-errc:
		t.Fatalf("serve: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("server did not start")
	}
	return errc
}

func selfSigned(t testing.TB) *tls.Config {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "mx.test"},
		DNSNames:     []string{"mx.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
}

// dialog is a line-oriented test client.
type dialog struct {
	t  testing.TB
	c  net.Conn
	r  *bufio.Reader
	to time.Duration
}

func dial(t testing.TB, addr string) *dialog {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &dialog{t: t, c: c, r: bufio.NewReader(c), to: 10 * time.Second}
}

func (d *dialog) send(s string) {
	d.t.Helper()
	if _, err := d.c.Write([]byte(s)); err != nil {
		d.t.Fatalf("write: %v", err)
	}
}

// expect reads one (possibly multi-line) reply and checks its code.
func (d *dialog) expect(code string) string {
	d.t.Helper()
	_ = d.c.SetReadDeadline(time.Now().Add(d.to))
	var all strings.Builder
	for {
		line, err := d.r.ReadString('\n')
		if err != nil {
			d.t.Fatalf("waiting for %s: %v (got %q)", code, err, all.String()+line)
		}
		all.WriteString(line)
		if len(line) < 4 || line[3] == ' ' {
			break
		}
	}
	if !strings.HasPrefix(all.String(), code) {
		d.t.Fatalf("got %q, want %s", all.String(), code)
	}
	return all.String()
}

// expectClosed checks that the server closed the connection.
func (d *dialog) expectClosed() {
	d.t.Helper()
	_ = d.c.SetReadDeadline(time.Now().Add(d.to))
	if line, err := d.r.ReadString('\n'); err == nil {
		d.t.Fatalf("connection still open, got %q", line)
	}
}

func TestServerPipelinedTransactions(t *testing.T) {
	b := &asyncBackend{delay: 20 * time.Millisecond}
	_, addr := startServer(t, ServerConfig{}, b, nil)
	d := dial(t, addr)
	d.expect("220 mx.test ESMTP")
	// Two messages and QUIT in one write: replies must come in order, the
	// second transaction only after the first commit finished.
	d.send("EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\none\r\n.\r\n" +
		"MAIL FROM:<a@x.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\ntwo\r\n.\r\nQUIT\r\n")
	d.expect("250-mx.test")
	d.expect("250 2.1.0")
	d.expect("250 2.1.5")
	d.expect("354")
	d.expect("250 2.0.0 Ok: queued as 1")
	d.expect("250 2.1.0")
	d.expect("250 2.1.5")
	d.expect("354")
	d.expect("250 2.0.0 Ok: queued as 2")
	d.expect("221")
	d.expectClosed()
	if b.count() != 2 || b.msgs[0].body != "one\r\n" || b.msgs[1].env.Rcpts[0] != "c@y.test" {
		t.Fatalf("messages: %+v", b.msgs)
	}
	if b.msgs[0].env.Conn.Remote.Addr().String() != "127.0.0.1" {
		t.Fatalf("remote %v", b.msgs[0].env.Conn.Remote)
	}
}

func TestServerLargeMessageStreams(t *testing.T) {
	b := &asyncBackend{}
	cfg := ServerConfig{MaxMessageSize: 8 << 20}
	_, addr := startServer(t, cfg, b, nil)
	d := dial(t, addr)
	d.expect("220")
	line := strings.Repeat("x", 998) + "\r\n"
	body := strings.Repeat(line, 5000) // ~5 MB, many reads
	d.send("EHLO c\r\nMAIL FROM:<a@x.test> SIZE=5000000\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
	d.expect("250")
	d.expect("250")
	d.expect("250")
	d.expect("354")
	go d.c.Write([]byte(body + ".\r\n"))
	d.expect("250")
	if b.count() != 1 || len(b.msgs[0].body) != len(body) {
		t.Fatalf("body of %d octets, want %d", len(b.msgs[0].body), len(body))
	}
	// Over the limit: refused while streaming, connection still usable.
	d.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
	d.expect("250")
	d.expect("250")
	d.expect("354")
	go d.c.Write([]byte(strings.Repeat(line, 9000) + ".\r\n"))
	d.expect("552 5.3.4")
	d.send("NOOP\r\n")
	d.expect("250")
}

func TestServerSTARTTLS(t *testing.T) {
	b := &asyncBackend{}
	srv, addr := startServer(t, ServerConfig{}, b, selfSigned(t))
	d := dial(t, addr)
	d.expect("220")
	d.send("EHLO c.test\r\n")
	if !strings.Contains(d.expect("250"), "STARTTLS") {
		t.Fatal("STARTTLS not offered")
	}
	d.send("STARTTLS\r\n")
	d.expect("220 2.0.0")
	tc := tls.Client(d.c, &tls.Config{InsecureSkipVerify: true, ServerName: "mx.test"})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	d2 := &dialog{t: t, c: tc, r: bufio.NewReader(tc), to: 10 * time.Second}
	d2.send("MAIL FROM:<a@x.test>\r\n")
	d2.expect("503") // EHLO again first (RFC 3207)
	d2.send("EHLO c.test\r\n")
	if strings.Contains(d2.expect("250"), "STARTTLS") {
		t.Fatal("STARTTLS offered again inside TLS")
	}
	d2.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nsecret\r\n.\r\nQUIT\r\n")
	d2.expect("250")
	d2.expect("250")
	d2.expect("354")
	d2.expect("250 2.0.0 Ok: queued as 1")
	d2.expect("221")
	if b.count() != 1 || b.msgs[0].env.Conn.TLS == nil || b.msgs[0].body != "secret\r\n" {
		t.Fatalf("message over TLS: %+v", b.msgs)
	}
	deadline := time.Now().Add(5 * time.Second)
	for srv.Metrics().Active != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if m := srv.Metrics(); m.Active != 0 || m.TLSHandshakes != 1 || m.SessionOutcomes["quit"] != 1 {
		t.Fatalf("metrics after TLS session: %+v", m)
	}
}

func TestServerSTARTTLSInjection(t *testing.T) {
	b := &asyncBackend{}
	_, addr := startServer(t, ServerConfig{}, b, selfSigned(t))

	// Pipelined in the same packet: refused before any TLS.
	d := dial(t, addr)
	d.expect("220")
	d.send("EHLO c.test\r\n")
	d.expect("250")
	d.send("STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
	d.expect("554 5.5.1")
	d.expectClosed()

	// Sent after the 220 but before the handshake: the handshake gets the
	// plaintext and fails; the command is never executed.
	d = dial(t, addr)
	d.expect("220")
	d.send("EHLO c.test\r\n")
	d.expect("250")
	d.send("STARTTLS\r\n")
	d.expect("220")
	d.send("MAIL FROM:<evil@x.test>\r\n")
	d.expectClosed()
	if b.count() != 0 {
		t.Fatal("injected transaction committed")
	}
}

func TestServerConnectionLimits(t *testing.T) {
	_, addr := startServer(t, ServerConfig{MaxConnectionsPerIP: 2}, &asyncBackend{}, nil)
	d1, d2 := dial(t, addr), dial(t, addr)
	d1.expect("220")
	d2.expect("220")
	d3 := dial(t, addr)
	d3.expect("421 4.7.0")
	d3.expectClosed()
	d1.send("QUIT\r\n")
	d1.expect("221")
	d1.expectClosed()
	// The slot is free again (released on close, asynchronously).
	var ok bool
	for i := 0; i < 50 && !ok; i++ {
		d4 := dial(t, addr)
		_ = d4.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, _ := d4.r.ReadString('\n')
		ok = strings.HasPrefix(line, "220")
		d4.c.Close()
		if !ok {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if !ok {
		t.Fatal("connection slot never released")
	}

	_, addr = startServer(t, ServerConfig{MaxConnections: 1}, &asyncBackend{}, nil)
	e1 := dial(t, addr)
	e1.expect("220")
	e2 := dial(t, addr)
	e2.expect("421 4.7.0")
}

func TestServerTimeouts(t *testing.T) {
	cfg := ServerConfig{CommandTimeout: time.Second, DataTimeout: time.Second}
	srv, addr := startServer(t, cfg, &asyncBackend{}, nil)
	d := dial(t, addr)
	d.expect("220")
	d.send("EHLO c\r\nNO") // a partial command does not extend the deadline
	d.expect("250")
	d.expect("421 4.4.2")
	d.expectClosed()

	// Slow data: 1 byte a second is far below min_data_rate once the grace
	// period is over.
	cfg = ServerConfig{DataRateGrace: time.Second, MinDataRate: 1000, DataTimeout: 5 * time.Second}
	_, addr = startServer(t, cfg, &asyncBackend{}, nil)
	d = dial(t, addr)
	d.expect("220")
	d.send("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
	d.expect("250")
	d.expect("250")
	d.expect("250")
	d.expect("354")
	stop := time.After(20 * time.Second)
	got := make(chan string, 1)
	go func() {
		_ = d.c.SetReadDeadline(time.Now().Add(20 * time.Second))
		line, _ := d.r.ReadString('\n')
		got <- line
	}()
	for {
		select {
		case line := <-got:
			if !strings.HasPrefix(line, "421 4.4.2") {
				t.Fatalf("slow client got %q", line)
			}
			if srv.Metrics().SessionOutcomes["timeout"] < 1 {
				t.Fatalf("first server's timeout not counted: %+v", srv.Metrics())
			}
			return
		case <-stop:
			t.Fatal("slow client never disconnected")
		case <-time.After(500 * time.Millisecond):
			_, _ = d.c.Write([]byte("x"))
		}
	}
}

// TestServerGoSMTPClient interoperates with an independent client
// implementation, over STARTTLS.
func TestServerGoSMTPClient(t *testing.T) {
	b := &asyncBackend{}
	_, addr := startServer(t, ServerConfig{}, b, selfSigned(t))
	c, err := gosmtp.DialStartTLS(addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := c.TLSConnectionState(); !ok {
		t.Fatal("go-smtp client not on TLS")
	}
	for i := 0; i < 3; i++ {
		if err := c.SendMail("a@x.test", []string{"b@y.test", "c@z.test"}, strings.NewReader("Subject: hi\r\n\r\n.leading dot\r\nbody\r\n")); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	if err := c.Quit(); err != nil {
		t.Fatal(err)
	}
	if b.count() != 3 {
		t.Fatalf("%d messages", b.count())
	}
	if got := b.msgs[0].body; got != "Subject: hi\r\n\r\n.leading dot\r\nbody\r\n" {
		t.Fatalf("body %q", got)
	}
}

func BenchmarkServerPlain(b *testing.B) { benchServer(b, false) }
func BenchmarkServerTLS(b *testing.B)   { benchServer(b, true) }

// benchServer measures one client sending 1 KiB messages over one
// connection, pipelined, through the real server (plain or STARTTLS).
func benchServer(b *testing.B, useTLS bool) {
	be := &benchBackend{}
	var tc *tls.Config
	if useTLS {
		tc = selfSigned(b)
	}
	_, addr := startServer(b, ServerConfig{}, be, tc)
	d := dial(b, addr)
	d.expect("220")
	d.send("EHLO c\r\n")
	d.expect("250")
	if useTLS {
		d.send("STARTTLS\r\n")
		d.expect("220")
		c := tls.Client(d.c, &tls.Config{InsecureSkipVerify: true})
		d.c, d.r = c, bufio.NewReader(c)
		d.send("EHLO c\r\n")
		d.expect("250")
	}
	body := strings.Repeat(strings.Repeat("b", 78)+"\r\n", 13)
	txn := []byte("MAIL FROM:<sender@x.test>\r\nRCPT TO:<rcpt@y.test>\r\nDATA\r\n" + body + ".\r\n")
	b.SetBytes(int64(len(txn)))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		d.send(string(txn))
		d.expect("250")
		d.expect("250")
		d.expect("354")
		d.expect("250")
	}
}

func TestServerEventLoops(t *testing.T) {
	for _, tc := range []struct{ n, procs, want int }{
		{0, 1, 1},
		{0, 2, 1},
		{0, 3, 1},
		{0, 8, 4},
		{3, 2, 3}, // set explicitly: as configured
		{1, 64, 1},
	} {
		if got := eventLoops(tc.n, tc.procs); got != tc.want {
			t.Errorf("eventLoops(%d, %d) = %d, want %d", tc.n, tc.procs, got, tc.want)
		}
	}
}

package netio

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"log"
	"math/big"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// clientGoMsg is a message as emersion/go-smtp's server received it.
type clientGoMsg struct {
	from  string
	opts  smtp.MailOptions
	rcpts []string
	body  string
	tls   bool
}

// clientGoBackend records messages; recipients starting with "bad" are
// refused with 550 5.1.1.
type clientGoBackend struct {
	mu   sync.Mutex
	msgs []clientGoMsg
}

func (b *clientGoBackend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	return &clientGoSession{b: b, c: c}, nil
}

func (b *clientGoBackend) messages() []clientGoMsg {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]clientGoMsg(nil), b.msgs...)
}

type clientGoSession struct {
	b   *clientGoBackend
	c   *smtp.Conn
	msg clientGoMsg
}

func (s *clientGoSession) Reset()        { s.msg = clientGoMsg{} }
func (s *clientGoSession) Logout() error { return nil }

func (s *clientGoSession) Mail(from string, opts *smtp.MailOptions) error {
	s.msg.from = from
	if opts != nil {
		s.msg.opts = *opts
	}
	return nil
}

func (s *clientGoSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	if strings.HasPrefix(to, "bad") {
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	}
	s.msg.rcpts = append(s.msg.rcpts, to)
	return nil
}

func (s *clientGoSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.msg.body = string(b)
	_, s.msg.tls = s.c.TLSConnectionState()
	s.b.mu.Lock()
	s.b.msgs = append(s.b.msgs, s.msg)
	s.b.mu.Unlock()
	return nil
}

// clientGoServer runs go-smtp's server on 127.0.0.1 with STARTTLS when
// cert is non-nil.
func clientGoServer(t *testing.T, cert *tls.Certificate) (netip.AddrPort, *clientGoBackend) {
	t.Helper()
	be := &clientGoBackend{}
	s := smtp.NewServer(be)
	s.Domain = "mx.test"
	s.EnableSMTPUTF8 = true
	s.EnableDSN = true
	s.MaxMessageBytes = 1 << 20
	s.ReadTimeout = 10 * time.Second
	s.WriteTimeout = 10 * time.Second
	s.ErrorLog = log.New(io.Discard, "", 0)
	if cert != nil {
		s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{*cert}}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Serve(ln)
	}()
	t.Cleanup(func() {
		s.Close()
		<-done
	})
	return netip.MustParseAddrPort(ln.Addr().String()), be
}

// clientTestCert makes a self-signed certificate for mx.test and a pool
// that trusts it.
func clientTestCert(t *testing.T) (*tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "mx.test"},
		DNSNames:              []string{"mx.test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}

func TestClientGoSMTPReuse(t *testing.T) {
	addr, be := clientGoServer(t, nil)
	c := clientDial(t, clientTestConfig(), addr)
	if !c.Has("PIPELINING") || !c.Has("ENHANCEDSTATUSCODES") || c.MaxSize() != 1<<20 {
		t.Fatalf("extensions %v", c.Extensions())
	}
	envs := []*ClientEnvelope{
		{From: "a@x.test", Rcpts: []string{"b@y.test", "bad@y.test", "c@y.test"}},
		{From: "", Rcpts: []string{"d@y.test"}, Ret: "HDRS", EnvID: "id 1+2", RcptParams: []string{"NOTIFY=FAILURE"}},
		{From: "ü@x.test", Rcpts: []string{"é@y.test"}, Body8Bit: true, SMTPUTF8: true},
	}
	bodies := []string{
		"Subject: one\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n",
		"Subject: two\n\nbare LF\n",
		"Subject: caf\xc3\xa9\r\n\r\nno final newline",
	}
	wantBodies := []string{
		bodies[0],
		"Subject: two\r\n\r\nbare LF\r\n",
		"Subject: caf\xc3\xa9\r\n\r\nno final newline\r\n",
	}
	ctx := clientTestCtx(t)
	for i, env := range envs {
		res, err := c.Send(ctx, env, []byte(bodies[i]))
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		for j := range env.Rcpts {
			if o := res.Outcome(j); o == nil || (o.Code != 250) != strings.HasPrefix(env.Rcpts[j], "bad") {
				t.Errorf("message %d rcpt %d: outcome %v", i, j, o)
			}
		}
		clientWantReply(t, "DATA", res.Data, 250, "2.0.0")
		if err := c.Reset(ctx); err != nil {
			t.Fatalf("Reset after message %d: %v", i, err)
		}
	}
	if err := c.Quit(); err != nil {
		t.Errorf("Quit: %v", err)
	}
	msgs := be.messages()
	if len(msgs) != 3 {
		t.Fatalf("server got %d messages, want 3", len(msgs))
	}
	if m := msgs[0]; m.from != "a@x.test" || strings.Join(m.rcpts, ",") != "b@y.test,c@y.test" || m.opts.Size != int64(len(bodies[0])) {
		t.Errorf("message 0: %+v", m)
	}
	if m := msgs[1]; m.from != "" || m.opts.Return != smtp.DSNReturnHeaders || m.opts.EnvelopeID != "id 1+2" {
		t.Errorf("message 1: %+v", m)
	}
	if m := msgs[2]; m.opts.Body != smtp.Body8BitMIME || !m.opts.UTF8 || m.rcpts[0] != "é@y.test" {
		t.Errorf("message 2: %+v", m)
	}
	for i, m := range msgs {
		if m.body != wantBodies[i] {
			t.Errorf("message %d: body %q, want %q", i, m.body, wantBodies[i])
		}
		if m.tls {
			t.Errorf("message %d came over TLS", i)
		}
	}
}

func TestClientGoSMTPStartTLS(t *testing.T) {
	cert, pool := clientTestCert(t)
	tlsAddr, tlsBackend := clientGoServer(t, cert)
	plainAddr, _ := clientGoServer(t, nil)
	cases := []struct {
		name     string
		mode     TLSMode
		base     *tls.Config
		mx       string
		plain    bool   // dial the server without STARTTLS
		enhanced string // Dial fails with this 421 4.7.x
		tls      bool
		verified bool
	}{
		{name: "opportunistic, unverifiable", mode: TLSOpportunistic, mx: "mx.test", tls: true},
		{name: "opportunistic, verified", mode: TLSOpportunistic, base: &tls.Config{RootCAs: pool}, mx: "mx.test", tls: true, verified: true},
		{name: "opportunistic, wrong name", mode: TLSOpportunistic, base: &tls.Config{RootCAs: pool}, mx: "other.test", tls: true},
		{name: "opportunistic, not offered", mode: TLSOpportunistic, mx: "mx.test", plain: true},
		{name: "required, verified", mode: TLSRequired, base: &tls.Config{RootCAs: pool}, mx: "mx.test.", tls: true, verified: true},
		{name: "required, wrong name", mode: TLSRequired, base: &tls.Config{RootCAs: pool}, mx: "other.test", enhanced: "4.7.5"},
		{name: "required, unknown CA", mode: TLSRequired, mx: "mx.test", enhanced: "4.7.5"},
		{name: "required, insecure", mode: TLSRequired, base: &tls.Config{InsecureSkipVerify: true}, mx: "other.test", tls: true},
		{name: "required, not offered", mode: TLSRequired, mx: "mx.test", plain: true, enhanced: "4.7.10"},
		{name: "disabled", mode: TLSDisabled, mx: "mx.test"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := clientTestConfig()
			cfg.TLS, cfg.TLSConfig = tc.mode, tc.base
			addr := tlsAddr
			if tc.plain {
				addr = plainAddr
			}
			c, err := Dial(clientTestCtx(t), cfg, tc.mx, addr)
			if tc.enhanced != "" {
				if !errors.Is(err, ErrClientTLS) {
					t.Fatalf("err %v, want ErrClientTLS", err)
				}
				if e := clientWantSMTPErr(t, err, 421, tc.enhanced); !e.Temporary() {
					t.Error("not temporary")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			version, cipher, verified, ok := c.TLSInfo()
			if ok != tc.tls || verified != tc.verified {
				t.Errorf("TLSInfo = %q %q verified %v ok %v, want ok %v verified %v", version, cipher, verified, ok, tc.tls, tc.verified)
			}
			if ok && (!strings.HasPrefix(version, "TLS 1.") || cipher == "") {
				t.Errorf("TLSInfo = %q %q", version, cipher)
			}
			if ok && c.Has("STARTTLS") {
				t.Error("EHLO after TLS still offers STARTTLS: EHLO was not repeated")
			}
			n := len(tlsBackend.messages())
			res, err := c.Send(clientTestCtx(t), &ClientEnvelope{From: "a@x.test", Rcpts: []string{"b@y.test"}}, []byte("x\r\n"))
			if err != nil {
				t.Fatal(err)
			}
			clientWantReply(t, "DATA", res.Data, 250, "2.0.0")
			if err := c.Quit(); err != nil {
				t.Errorf("Quit: %v", err)
			}
			if msgs := tlsBackend.messages(); !tc.plain && (len(msgs) != n+1 || msgs[n].tls != tc.tls) {
				t.Errorf("server side: %d new messages, %+v", len(msgs)-n, msgs[n:])
			}
		})
	}
}

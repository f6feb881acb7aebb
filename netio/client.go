// Outbound SMTP client.
//
// Design: every outbound connection runs on its own goroutine over a
// blocking net.Conn. Go's netpoller already multiplexes those goroutines on
// an event loop, and a delivery is a linear conversation (greeting, EHLO,
// STARTTLS, EHLO, then MAIL/RCPT/DATA transactions on a reused connection)
// with a deadline per step, so straight-line code is the clearest correct
// form. gnet's client would need the same conversation as an explicit
// asynchronous state machine and has no TLS at all.
//
// Hot path: each connection owns one bufio.Reader (4 KiB) and one
// bufio.Writer (16 KiB, one TLS record), reused for its whole life. With
// PIPELINING (RFC 2920) the MAIL, all RCPT and the DATA command go out in one
// write, and the body with its terminating dot in as few writes as the
// writer's buffer allows. Replies are parsed into a reused buffer; a reply
// that equals the previous one of the same step on the connection (the usual
// "250 2.1.5 Ok") reuses its *smtperr.Error, so a transaction allocates
// little beyond its SendResult.
//
// Failure behaviour:
//   - Dial returns an error wrapping the *smtperr.Error when the server
//     replied negatively (421 or 554 greeting, EHLO and HELO refused), and a
//     wrapped network error otherwise (temporary for the caller). TLS
//     failures wrap ErrClientTLS together with a temporary 421 4.7.x reply.
//   - Send reports the server's replies in a SendResult. Its error is
//     non-nil when the transaction could not run to the end (network error,
//     timeout, cancelled context, malformed reply): the connection is then
//     unusable and every recipient without a definitive reply is to be
//     retried. Refusals decided before anything is sent (SIZE, 8BITMIME,
//     SMTPUTF8) are a permanent *smtperr.Error and leave the connection
//     usable. When a message cannot be written because the server
//     refused it early (a reply to DATA's content or to BDAT before its
//     end) and closed, the reply it sent first is the result (no error;
//     the connection is unusable). SendBatch likewise reads, after a
//     failed write, the replies already sent for the transactions written
//     before: each keeps the outcome its replies give (a 250 is a
//     delivery), and only those without their replies get the error.
//   - A 421 reply to any command means the server is closing the channel:
//     it becomes the reply to every command still outstanding, and the
//     connection is unusable.
//
// Timeouts are those of RFC 5321 §4.5.3.2, set as socket deadlines before
// each read and each write; cancelling the context of a call closes the
// connection, which ends any blocked read or write at once. Every write of
// a transaction is bounded by DataBlockTimeout, so that the socket's write
// deadline (a runtime timer) is not moved back and forth between the
// envelope and the message of every transaction.

package netio

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// TLSMode says whether the outbound client uses STARTTLS (RFC 3207).
type TLSMode uint8

const (
	// TLSOpportunistic uses STARTTLS when the server offers it and does not
	// verify the server's certificate (whether it verified is recorded, see
	// ClientConn.TLSInfo). A server that does not offer STARTTLS, or refuses
	// the command, gets the message in clear text. A failed handshake leaves
	// the connection unusable (RFC 3207 §4.1): Dial returns a temporary
	// error, and the caller may retry that MX with TLSDisabled.
	TLSOpportunistic TLSMode = iota
	// TLSRequired refuses to send without TLS and verifies the certificate
	// against the MX host name (unless the base tls.Config sets
	// InsecureSkipVerify). Every failure is a temporary 4.7.x error.
	TLSRequired
	// TLSDisabled never sends STARTTLS.
	TLSDisabled
)

// String returns the configuration name of m.
func (m TLSMode) String() string {
	switch m {
	case TLSOpportunistic:
		return "opportunistic"
	case TLSRequired:
		return "required"
	case TLSDisabled:
		return "disabled"
	}
	return "TLSMode(" + strconv.Itoa(int(m)) + ")"
}

// ParseTLSMode parses "opportunistic", "required" or "disabled" (any case).
// The empty string is TLSOpportunistic, the default.
func ParseTLSMode(s string) (TLSMode, error) {
	switch strings.ToLower(s) {
	case "", "opportunistic":
		return TLSOpportunistic, nil
	case "required":
		return TLSRequired, nil
	case "disabled":
		return TLSDisabled, nil
	}
	return 0, fmt.Errorf("unknown TLS mode %q (want opportunistic, required or disabled)", s)
}

// MarshalText implements encoding.TextMarshaler.
func (m TLSMode) MarshalText() ([]byte, error) {
	if m > TLSDisabled {
		return nil, fmt.Errorf("invalid %v", m)
	}
	return []byte(m.String()), nil
}

// UnmarshalText implements encoding.TextUnmarshaler, so that configuration
// files can say tls = "required".
func (m *TLSMode) UnmarshalText(b []byte) error {
	v, err := ParseTLSMode(string(b))
	if err != nil {
		return err
	}
	*m = v
	return nil
}

// ClientConfig configures outbound connections. The daemon embeds it in the
// [delivery] table of its configuration file (engine.DeliveryConfig), so its
// keys sit in that table. Dial works on its own copy.
type ClientConfig struct {
	// Hostname is the name sent with EHLO and HELO. An IP address is sent
	// as an address literal ([192.0.2.1], [IPv6:2001:db8::1]).
	// Default: os.Hostname(), or "localhost" when that fails.
	Hostname string `toml:"hostname"`

	// Port is the destination TCP port, used when the address given to
	// Dial has port 0. Default: 25.
	Port int `toml:"port"`

	// TLS says whether to use STARTTLS: "opportunistic" (when offered,
	// unverified; the scheduler delivers in clear on a new connection to
	// an MX whose handshake fails), "required" (verified, never in clear)
	// or "disabled". Default: "opportunistic".
	TLS TLSMode `toml:"tls"`

	// TLSConfig is the base TLS configuration (RootCAs, MinVersion,
	// certificates for client authentication, ...). Dial clones it and sets
	// ServerName to the MX host name; verification follows TLS.
	// Default: nil (system roots, Go's defaults).
	TLSConfig *tls.Config `toml:"-"`

	// ConnectTimeout bounds the TCP connect, the TLS handshake and the wait
	// for the reply to QUIT. Default: 30s.
	ConnectTimeout time.Duration `toml:"connect_timeout"`

	// GreetingTimeout bounds the wait for the 220 greeting (RFC 5321
	// §4.5.3.2.1). Default: 5m.
	GreetingTimeout time.Duration `toml:"greeting_timeout"`

	// MailTimeout bounds the wait for the reply to MAIL (§4.5.3.2.2) and to
	// the other short commands (EHLO, HELO, STARTTLS, RSET). Default: 5m.
	MailTimeout time.Duration `toml:"mail_timeout"`

	// RcptTimeout bounds the wait for the reply to each RCPT (§4.5.3.2.3).
	// Default: 5m.
	RcptTimeout time.Duration `toml:"rcpt_timeout"`

	// DataInitTimeout bounds the wait for the 354 reply to DATA
	// (§4.5.3.2.4). Default: 2m.
	DataInitTimeout time.Duration `toml:"data_init_timeout"`

	// DataBlockTimeout bounds each write of a transaction, its commands
	// as well as its message data (§4.5.3.2.5, the RFC's one timeout for
	// sending; the other timeouts bound the waits for replies).
	// Default: 3m.
	DataBlockTimeout time.Duration `toml:"data_block_timeout"`

	// DataTermTimeout bounds the wait for the reply to the final dot
	// (§4.5.3.2.6). Default: 10m.
	DataTermTimeout time.Duration `toml:"data_term_timeout"`

	// LocalAddr is the source address of outbound connections. The zero
	// value lets the kernel choose. Default: unset.
	LocalAddr netip.Addr `toml:"local_addr"`

	// Logger receives debug records about connections (TLS fallbacks,
	// HELO fallbacks). Default: nil, which discards them.
	Logger *slog.Logger `toml:"-"`
}

// DefaultClientConfig returns the configuration used when nothing is set.
func DefaultClientConfig() ClientConfig {
	var c ClientConfig
	c.EnsureDefaults()
	return c
}

// EnsureDefaults fills zero fields with their defaults. It calls
// os.Hostname when Hostname is empty, so call it once, not per Dial.
func (c *ClientConfig) EnsureDefaults() {
	if c.Hostname == "" {
		c.Hostname = defaultHostname()
	}
	if c.Port == 0 {
		c.Port = 25
	}
	clientDefaultDuration(&c.ConnectTimeout, 30*time.Second)
	clientDefaultDuration(&c.GreetingTimeout, 5*time.Minute)
	clientDefaultDuration(&c.MailTimeout, 5*time.Minute)
	clientDefaultDuration(&c.RcptTimeout, 5*time.Minute)
	clientDefaultDuration(&c.DataInitTimeout, 2*time.Minute)
	clientDefaultDuration(&c.DataBlockTimeout, 3*time.Minute)
	clientDefaultDuration(&c.DataTermTimeout, 10*time.Minute)
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

func clientDefaultDuration(d *time.Duration, def time.Duration) {
	if *d == 0 {
		*d = def
	}
}

// Validate reports every invalid field at once. Key names are those of the
// [delivery] table, which embeds these keys.
func (c ClientConfig) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("delivery.%s: %s", key, fmt.Sprintf(format, args...)))
	}
	switch {
	case c.Hostname == "":
		bad("hostname", "must not be empty")
	case !clientPrintable(c.Hostname) || strings.ContainsAny(c.Hostname, "<>"):
		bad("hostname", "%q must be printable ASCII without spaces or angle brackets", c.Hostname)
	}
	if c.Port < 1 || c.Port > 65535 {
		bad("port", "must be between 1 and 65535, got %d", c.Port)
	}
	if c.TLS > TLSDisabled {
		bad("tls", "unknown mode %d", int(c.TLS))
	}
	for _, d := range []struct {
		key string
		v   time.Duration
	}{
		{"connect_timeout", c.ConnectTimeout},
		{"greeting_timeout", c.GreetingTimeout},
		{"mail_timeout", c.MailTimeout},
		{"rcpt_timeout", c.RcptTimeout},
		{"data_init_timeout", c.DataInitTimeout},
		{"data_block_timeout", c.DataBlockTimeout},
		{"data_term_timeout", c.DataTermTimeout},
	} {
		if d.v <= 0 {
			bad(d.key, "must be positive, got %v", d.v)
		}
	}
	return errors.Join(errs...)
}

// ErrClientTLS is wrapped, together with a temporary 421 4.7.x
// *smtperr.Error, by Dial's errors about STARTTLS: required but not offered
// or refused, or a failed handshake.
var ErrClientTLS = errors.New("netio: client: STARTTLS failed")

// ErrClientTLSHandshake is wrapped, with ErrClientTLS, by Dial's error when
// the server accepted STARTTLS but the handshake failed (or the connection
// dropped during it): with TLSOpportunistic the caller may deliver to that
// MX again with TLSDisabled, as Postfix does.
var ErrClientTLSHandshake = errors.New("netio: client: TLS handshake failed")

// ErrClientUnusable is returned by operations on a connection that an
// earlier error, a 421 reply, Quit or Close has made unusable.
var ErrClientUnusable = errors.New("netio: client: connection is unusable")

// Extension bits the client acts on.
const (
	clientExtPipelining uint16 = 1 << iota
	clientExtSize
	clientExt8BitMIME
	clientExtSMTPUTF8
	clientExtDSN
	clientExtStartTLS
	clientExtChunking
)

// clientStep indexes the per-connection cache of the last reply per step.
type clientStep uint8

const (
	clientStepMail clientStep = iota
	clientStepRcpt
	clientStepDataInit
	clientStepDot
	clientStepReset
	// clientStepCount doubles as "no cache".
	clientStepCount
)

// Buffer sizes of a connection.
const (
	clientReadBuf  = 4 << 10
	clientWriteBuf = 16 << 10
)

// ClientConn is one outbound SMTP connection, opened by Dial. It carries any
// number of transactions, one at a time.
//
// A ClientConn is not safe for concurrent use, with one exception: Close
// may be called from any goroutine to abort a blocked call.
type ClientConn struct {
	cfg ClientConfig
	log *slog.Logger
	mx  string

	raw  net.Conn // the TCP connection; closing it ends everything
	conn net.Conn // raw, or the *tls.Conn over it
	br   *bufio.Reader
	bw   *bufio.Writer
	rr   clientReplyReader

	// wtimeout is the write deadline applied by clientConnWriter.
	wtimeout time.Duration
	// wrote counts the octets the socket took from bw; wfailed is set by
	// the first write error. When a write fails they tell which of the
	// commands and messages buffered went out whole (see outPos).
	wrote   int64
	wfailed bool
	// early, when set, bounds the wait for every reply: the replies the
	// server sent before a write failed are being read (see earlyReplyWait).
	early time.Time
	// rwant is the deadline of the reply being read, applied by
	// clientConnReader; rslack is how much earlier the socket's deadline
	// may be (see clientSlack). rdl and wdl are the read and write
	// deadlines last set on the socket.
	rwant, rdl, wdl time.Time
	rslack          time.Duration

	// watchCtx is the context whose cancellation closes the connection
	// during a call (registered once, see watch); inCall is set during
	// calls; endCallFn is endCall, made once. wmu guards watchStop, which
	// Close may call from another goroutine.
	watchCtx  context.Context
	inCall    atomic.Bool
	endCallFn func() bool
	wmu       sync.Mutex
	watchStop func() bool

	remote   netip.AddrPort
	remoteIP string
	greeting string
	helo     string // EHLO/HELO argument
	ext      map[string]string
	exts     uint16
	maxSize  int64

	tlsOn       bool
	tlsVersion  uint16
	tlsCipher   uint16
	tlsVerified bool

	// broken is set by an error or a 421: no more commands may be sent.
	broken bool
	// closing is the 421 reply that ended the session, if any.
	closing *smtperr.Error
	// needReset is set when a transaction was left open (MAIL accepted,
	// no message sent); the next Send starts with RSET.
	needReset bool
	closed    atomic.Bool

	cache [clientStepCount]*smtperr.Error
	num   [24]byte
}

// Dial connects to addr (the MX host mxHost resolved; port 0 means
// cfg.Port), reads the greeting, introduces itself with EHLO (HELO when
// EHLO is refused with 5xx) and, depending on cfg.TLS, starts TLS with SNI
// mxHost and repeats EHLO.
//
// cfg is copied; EnsureDefaults is applied to the copy. Cancelling ctx
// aborts the dial. See the failure behaviour above for the errors.
func Dial(ctx context.Context, cfg *ClientConfig, mxHost string, addr netip.AddrPort) (*ClientConn, error) {
	c := &ClientConn{cfg: *cfg, mx: strings.TrimSuffix(mxHost, ".")}
	c.cfg.EnsureDefaults()
	if err := c.cfg.Validate(); err != nil {
		return nil, err
	}
	c.log = c.cfg.Logger.With("mx", c.mx)
	if !addr.Addr().IsValid() {
		return nil, fmt.Errorf("netio: client: dial %s: invalid address", mxHost)
	}
	if addr.Port() == 0 {
		addr = netip.AddrPortFrom(addr.Addr(), uint16(c.cfg.Port))
	}
	c.remote = addr
	c.remoteIP = addr.Addr().String()
	c.helo = clientHeloName(c.cfg.Hostname)

	d := net.Dialer{Timeout: c.cfg.ConnectTimeout}
	if c.cfg.LocalAddr.IsValid() {
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(c.cfg.LocalAddr, 0))
	}
	conn, err := d.DialContext(ctx, "tcp", addr.String())
	if err != nil {
		return nil, fmt.Errorf("netio: client: connect to %s (%s): %w", c.mx, addr, err)
	}
	c.raw, c.conn = conn, conn
	c.br = bufio.NewReaderSize(clientConnReader{c}, clientReadBuf)
	c.bw = bufio.NewWriterSize(clientConnWriter{c}, clientWriteBuf)

	stop := c.watch(ctx)
	err = c.open()
	if stop != nil && !stop() {
		err = fmt.Errorf("netio: client: dial %s: %w", c.mx, context.Cause(ctx))
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// open runs the conversation up to the first transaction.
func (c *ClientConn) open() error {
	rep, err := c.readReply(c.cfg.GreetingTimeout, clientStepCount)
	if err != nil {
		return c.ioError("greeting", err)
	}
	if rep.Code != 220 {
		if rep.Code != 421 {
			// RFC 5321 §3.1: after a 554 greeting the client should QUIT.
			c.bestEffortQuit()
		}
		return c.replyError("greeting", rep)
	}
	c.greeting = rep.Message
	if err := c.hello(); err != nil {
		return err
	}
	if c.cfg.TLS == TLSDisabled {
		return nil
	}
	if c.exts&clientExtStartTLS == 0 {
		if c.cfg.TLS == TLSRequired {
			c.bestEffortQuit()
			return fmt.Errorf("%w: %w", ErrClientTLS,
				smtperr.New(421, "4.7.10", "TLS is required but %s does not offer STARTTLS", c.mx))
		}
		return nil
	}
	return c.startTLS()
}

// hello sends EHLO, or HELO when EHLO is refused with 5xx (RFC 5321 §3.2),
// and records the extensions the server offers.
func (c *ClientConn) hello() error {
	c.ext, c.exts, c.maxSize = nil, 0, 0
	rep, err := c.command(c.cfg.MailTimeout, "EHLO ", c.helo)
	if err != nil {
		return c.ioError("EHLO", err)
	}
	if rep.Code == 250 {
		c.parseEHLO(rep.Message)
		return nil
	}
	if rep.Code/100 != 5 {
		return c.replyError("EHLO", rep)
	}
	c.log.Debug("EHLO refused, trying HELO", "code", rep.Code)
	rep, err = c.command(c.cfg.MailTimeout, "HELO ", c.helo)
	if err != nil {
		return c.ioError("HELO", err)
	}
	if rep.Code != 250 {
		return c.replyError("HELO", rep)
	}
	c.ext = map[string]string{}
	return nil
}

// parseEHLO records the keywords of an EHLO reply (one per line after the
// first, RFC 5321 §4.1.1.1).
func (c *ClientConn) parseEHLO(msg string) {
	c.ext = make(map[string]string, 12)
	_, lines, _ := strings.Cut(msg, "\n")
	for lines != "" {
		var line string
		line, lines, _ = strings.Cut(lines, "\n")
		kw, val, _ := strings.Cut(strings.TrimSpace(line), " ")
		if kw == "" {
			continue
		}
		kw = strings.ToUpper(kw)
		val = strings.TrimSpace(val)
		c.ext[kw] = val
		switch kw {
		case "PIPELINING":
			c.exts |= clientExtPipelining
		case "SIZE":
			c.exts |= clientExtSize
			if n, err := strconv.ParseInt(val, 10, 64); err == nil && n > 0 {
				c.maxSize = n
			}
		case "8BITMIME":
			c.exts |= clientExt8BitMIME
		case "SMTPUTF8":
			c.exts |= clientExtSMTPUTF8
		case "DSN":
			c.exts |= clientExtDSN
		case "STARTTLS":
			c.exts |= clientExtStartTLS
		case "CHUNKING":
			c.exts |= clientExtChunking
		}
	}
}

// startTLS sends STARTTLS, runs the handshake and repeats EHLO.
func (c *ClientConn) startTLS() error {
	rep, err := c.command(c.cfg.MailTimeout, "STARTTLS", "")
	if err != nil {
		return c.ioError("STARTTLS", err)
	}
	if rep.Code != 220 {
		if rep.Code == 421 || c.cfg.TLS == TLSRequired {
			if rep.Code != 421 {
				c.bestEffortQuit()
			}
			return fmt.Errorf("%w: %w", ErrClientTLS,
				smtperr.New(421, "4.7.10", "TLS is required but %s refused STARTTLS: %v", c.mx, rep))
		}
		c.log.Debug("STARTTLS refused, continuing without TLS", "code", rep.Code)
		return nil
	}
	if c.br.Buffered() > 0 {
		// Anything after the 220 was sent before the handshake and must
		// not be taken as coming from the TLS peer (RFC 3207 §4.2;
		// the response injection of CVE-2011-0411's family).
		return fmt.Errorf("%w: %w: %d octets sent after the STARTTLS reply", ErrClientTLS, ErrClientProtocol, c.br.Buffered())
	}
	tc := tls.Client(c.raw, c.tlsConfig())
	dl := time.Now().Add(c.cfg.ConnectTimeout)
	if err := c.raw.SetDeadline(dl); err != nil {
		return c.ioError("TLS handshake", err)
	}
	c.rdl, c.wdl = dl, dl
	if err := tc.Handshake(); err != nil {
		c.broken = true
		c.log.Debug("TLS handshake failed", "err", err)
		return fmt.Errorf("%w: %w: %w", ErrClientTLS, ErrClientTLSHandshake,
			smtperr.New(421, "4.7.5", "TLS handshake with %s failed: %v", c.mx, err))
	}
	st := tc.ConnectionState()
	c.conn = tc
	c.br.Reset(clientConnReader{c})
	c.tlsOn, c.tlsVersion, c.tlsCipher = true, st.Version, st.CipherSuite
	return c.hello()
}

// tlsConfig returns the per-connection TLS configuration. Go's own
// verification is switched off so that opportunistic TLS can record whether
// the certificate verified; verifyConnection does the same checks and fails
// the handshake only when verification is required.
func (c *ClientConn) tlsConfig() *tls.Config {
	var tc *tls.Config
	if c.cfg.TLSConfig != nil {
		tc = c.cfg.TLSConfig.Clone()
	} else {
		tc = &tls.Config{}
	}
	required := c.cfg.TLS == TLSRequired && !tc.InsecureSkipVerify
	name, roots, now, next := c.mx, tc.RootCAs, tc.Time, tc.VerifyConnection
	tc.ServerName = name
	tc.InsecureSkipVerify = true
	tc.VerifyConnection = func(cs tls.ConnectionState) error {
		err := clientVerifyChain(cs, name, roots, now)
		c.tlsVerified = err == nil
		if err != nil && required {
			return err
		}
		if next != nil {
			return next(cs)
		}
		return nil
	}
	return tc
}

// clientVerifyChain verifies the peer's chain for name, as crypto/tls would.
func clientVerifyChain(cs tls.ConnectionState, name string, roots *x509.CertPool, now func() time.Time) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("no certificate")
	}
	opts := x509.VerifyOptions{DNSName: name, Roots: roots, Intermediates: x509.NewCertPool()}
	if now != nil {
		opts.CurrentTime = now()
	}
	for _, cert := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(cert)
	}
	_, err := cs.PeerCertificates[0].Verify(opts)
	return err
}

// Extensions returns a copy of the EHLO keywords (upper case) and their
// parameters. It is empty after a HELO fallback.
func (c *ClientConn) Extensions() map[string]string { return maps.Clone(c.ext) }

// Has reports whether the server offered the EHLO keyword ext (any case).
func (c *ClientConn) Has(ext string) bool {
	_, ok := c.ext[strings.ToUpper(ext)]
	return ok
}

// DSN reports whether the server offered DSN (RFC 3461): the DSN
// parameters of an envelope are then sent. Cheaper than Has("DSN").
func (c *ClientConn) DSN() bool { return c.exts&clientExtDSN != 0 }

// MaxSize is the message size limit the server announced with SIZE, 0 when
// it announced none.
func (c *ClientConn) MaxSize() int64 { return c.maxSize }

// TLSInfo describes the TLS session: protocol version and cipher suite
// names, and whether the certificate verified for the MX host name. ok is
// false when the connection is not encrypted.
func (c *ClientConn) TLSInfo() (version, cipher string, verified bool, ok bool) {
	if !c.tlsOn {
		return "", "", false, false
	}
	return tls.VersionName(c.tlsVersion), tls.CipherSuiteName(c.tlsCipher), c.tlsVerified, true
}

// RemoteAddr is the address Dial connected to.
func (c *ClientConn) RemoteAddr() netip.AddrPort { return c.remote }

// RemoteIP is RemoteAddr's address as a string, made once.
func (c *ClientConn) RemoteIP() string { return c.remoteIP }

// Greeting is the text of the server's 220 greeting, lines joined with "\n".
func (c *ClientConn) Greeting() string { return c.greeting }

// Usable reports whether the connection can carry another transaction.
func (c *ClientConn) Usable() bool { return !c.broken && !c.closed.Load() }

// Reset sends RSET (RFC 5321 §4.1.1.5), ending any transaction. Send does it
// by itself when the previous transaction was left open, so Reset is needed
// only to check that a pooled connection still answers.
func (c *ClientConn) Reset(ctx context.Context) error {
	if !c.Usable() {
		return ErrClientUnusable
	}
	stop := c.watch(ctx)
	rep, err := c.command(c.cfg.MailTimeout, "RSET", "")
	if stop != nil && !stop() {
		err = context.Cause(ctx)
	}
	switch {
	case err != nil:
		return c.ioError("RSET", err)
	case rep.Code/100 != 2:
		c.broken = true
		return c.replyError("RSET", rep)
	}
	c.needReset = false
	return nil
}

// ResetNext makes the next Send start with RSET, pipelined with MAIL when
// the server offers PIPELINING: a reused connection is reset and checked
// without a round trip of its own.
func (c *ClientConn) ResetNext() { c.needReset = true }

// Quit sends QUIT, waits up to ConnectTimeout for the reply and closes the
// connection. It returns the error of that exchange; the connection is
// closed in any case.
func (c *ClientConn) Quit() error {
	var err error
	if c.Usable() {
		var rep *smtperr.Error
		rep, err = c.command(c.cfg.ConnectTimeout, "QUIT", "")
		if err == nil && rep.Code != 221 {
			err = rep
		}
		c.broken = true
		if c.closed.CompareAndSwap(false, true) {
			// Closing c.conn sends TLS's close_notify.
			_ = c.conn.SetDeadline(time.Now().Add(c.cfg.ConnectTimeout))
			_ = c.conn.Close()
		}
	}
	c.Close()
	return err
}

// Close closes the connection without QUIT. It is safe to call from any
// goroutine and more than once.
func (c *ClientConn) Close() error {
	c.wmu.Lock()
	if c.watchStop != nil {
		c.watchStop()
		c.watchStop = nil
	}
	c.wmu.Unlock()
	if !c.closed.CompareAndSwap(false, true) {
		return nil
	}
	return c.raw.Close()
}

// bestEffortQuit writes QUIT without waiting for the reply.
func (c *ClientConn) bestEffortQuit() {
	c.wtimeout = time.Second
	c.bw.WriteString("QUIT\r\n")
	_ = c.bw.Flush()
}

// watch makes cancellation of ctx close the connection. The returned
// function (nil when ctx cannot be cancelled) must be called when the
// operation ends; it returns false when ctx was cancelled meanwhile.
//
// The callback is registered with ctx once and kept across calls (every
// call of the scheduler's agents passes the same context: registering and
// removing it per transaction cost an allocation and the context's lock);
// between calls it does nothing, and a call that starts with ctx already
// cancelled closes the connection itself.
func (c *ClientConn) watch(ctx context.Context) func() bool {
	if ctx.Done() == nil {
		return nil
	}
	if ctx != c.watchCtx {
		c.wmu.Lock()
		if c.watchStop != nil {
			c.watchStop()
		}
		raw := c.raw
		c.watchStop = context.AfterFunc(ctx, func() {
			if c.inCall.Load() {
				raw.Close()
			}
		})
		c.wmu.Unlock()
		c.watchCtx = ctx
		if c.endCallFn == nil {
			c.endCallFn = c.endCall
		}
	}
	c.inCall.Store(true)
	if ctx.Err() != nil {
		c.raw.Close()
	}
	return c.endCallFn
}

// endCall ends a call begun by watch; it reports whether the context is
// still live.
func (c *ClientConn) endCall() bool {
	c.inCall.Store(false)
	return c.watchCtx.Err() == nil
}

// command writes verb+arg and reads the reply.
func (c *ClientConn) command(timeout time.Duration, verb, arg string) (*smtperr.Error, error) {
	c.bw.WriteString(verb)
	c.bw.WriteString(arg)
	c.bw.WriteString("\r\n")
	if err := c.flush(timeout); err != nil {
		return nil, err
	}
	return c.readReply(timeout, clientStepCount)
}

// flush writes the buffered commands with the given write timeout.
func (c *ClientConn) flush(timeout time.Duration) error {
	c.wtimeout = timeout
	if err := c.bw.Flush(); err != nil {
		c.broken = true
		return err
	}
	return nil
}

// readReply reads one reply within timeout. step selects the reply cache
// (clientStepCount for none). A read error makes the connection unusable.
func (c *ClientConn) readReply(timeout time.Duration, step clientStep) (*smtperr.Error, error) {
	c.rwant, c.rslack = time.Now().Add(timeout), clientSlack(timeout)
	code, err := c.rr.read(c.br)
	if err != nil {
		c.broken = true
		return nil, err
	}
	if step < clientStepCount {
		if c.rr.same(code, c.cache[step]) {
			return c.cache[step], nil
		}
		rep := c.rr.reply(code)
		c.cache[step] = rep
		return rep, nil
	}
	return c.rr.reply(code), nil
}

// ioError wraps a network or protocol error of step and marks the
// connection unusable.
func (c *ClientConn) ioError(step string, err error) error {
	c.broken = true
	return fmt.Errorf("netio: client: %s %s: %w", c.mx, step, err)
}

// replyError wraps an unexpected reply to step. Negative replies stay
// *smtperr.Error for errors.As; anything else is a protocol error. The
// connection is unusable afterwards.
func (c *ClientConn) replyError(step string, rep *smtperr.Error) error {
	c.broken = true
	if rep.Code/100 == 4 || rep.Code/100 == 5 {
		return fmt.Errorf("netio: client: %s %s: %w", c.mx, step, rep)
	}
	return fmt.Errorf("netio: client: %s %s: %w: unexpected reply %v", c.mx, step, ErrClientProtocol, rep)
}

// clientConnWriter is the bufio.Writer's sink: it sets the write deadline
// before each write, so a long body gets DataBlockTimeout per block.
type clientConnWriter struct{ c *ClientConn }

func (w clientConnWriter) Write(p []byte) (int, error) {
	c := w.c
	want := time.Now().Add(c.wtimeout)
	if d := want.Sub(c.wdl); d < 0 || d > clientSlack(c.wtimeout) {
		if err := c.conn.SetWriteDeadline(want); err != nil {
			c.wfailed = true
			return 0, err
		}
		c.wdl = want
	}
	n, err := c.conn.Write(p)
	c.wrote += int64(n)
	if err != nil {
		c.wfailed = true
	}
	return n, err
}

// clientConnReader is the bufio.Reader's source: before reading the socket
// it sets the deadline of the reply being read (readReply), so that a reply
// already buffered costs no deadline change.
type clientConnReader struct{ c *ClientConn }

func (r clientConnReader) Read(p []byte) (int, error) {
	c := r.c
	if d := c.rwant.Sub(c.rdl); d < 0 || d > c.rslack {
		if err := c.conn.SetReadDeadline(c.rwant); err != nil {
			return 0, err
		}
		c.rdl = c.rwant
	}
	return c.conn.Read(p)
}

// clientSlack is how much earlier than asked a deadline may fall, so that
// the socket's deadline (a timer the runtime must move) is not set again
// for every reply: a sixteenth of the timeout, at most a second. A step
// gets at least 15/16 of its timeout, never more than all of it.
func clientSlack(timeout time.Duration) time.Duration {
	return min(timeout/16, time.Second)
}

// clientHeloName returns the EHLO argument for hostname: IP addresses
// become address literals (RFC 5321 §4.1.3).
func clientHeloName(hostname string) string {
	ip, err := netip.ParseAddr(hostname)
	switch {
	case err != nil:
		return hostname
	case ip.Is4() || ip.Is4In6():
		return "[" + ip.Unmap().String() + "]"
	}
	return "[IPv6:" + ip.String() + "]"
}

// clientPrintable reports whether s is printable ASCII without spaces.
func clientPrintable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

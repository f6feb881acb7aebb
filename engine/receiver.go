package engine

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hermod-mta/hermod/internal/smtperr"
	"github.com/hermod-mta/hermod/netio"
	"github.com/hermod-mta/hermod/spool"
)

// RelayConfig is the relay policy of the SMTP server: the keys of the
// [smtp] table that decide who may send where.
type RelayConfig struct {
	// RelayNetworks are the client networks (CIDR) allowed to relay to any
	// domain. Default: ["127.0.0.0/8", "::1/128"].
	RelayNetworks []string `toml:"relay_networks"`
	// RelayDomains are the recipient domains accepted from any client.
	// Default: [] (none).
	RelayDomains []string `toml:"relay_domains"`
	// Postmaster is where mail to <postmaster> (no domain, which RFC 5321
	// §4.5.1 requires every SMTP server to accept, from any client) is
	// delivered. Default: "" (such mail is refused with 550 5.1.1).
	Postmaster string `toml:"postmaster"`
	// MaxHops is the number of Received: headers beyond which a message is
	// refused as looping (RFC 5321 §6.3). Default: 100.
	MaxHops int `toml:"max_hops"`
}

// EnsureDefaults fills zero fields with their defaults.
func (c *RelayConfig) EnsureDefaults() {
	if c.RelayNetworks == nil {
		c.RelayNetworks = []string{"127.0.0.0/8", "::1/128"}
	}
	if c.RelayDomains == nil {
		c.RelayDomains = []string{}
	}
	if c.MaxHops == 0 {
		c.MaxHops = 100
	}
}

// Validate reports every invalid field.
func (c RelayConfig) Validate() error {
	var errs []error
	for _, n := range c.RelayNetworks {
		if _, err := netip.ParsePrefix(n); err != nil {
			errs = append(errs, fmt.Errorf("smtp.relay_networks: %q is not a CIDR prefix (%v)", n, err))
		}
	}
	for _, d := range c.RelayDomains {
		if d == "" || strings.ContainsAny(d, " @[]") {
			errs = append(errs, fmt.Errorf("smtp.relay_domains: %q is not a domain", d))
		}
	}
	if c.Postmaster != "" && (!strings.Contains(c.Postmaster, "@") || strings.ContainsAny(c.Postmaster, " <>\r\n")) {
		errs = append(errs, fmt.Errorf("smtp.postmaster: %q is not a mailbox (local@domain)", c.Postmaster))
	}
	if c.MaxHops < 1 {
		errs = append(errs, fmt.Errorf("smtp.max_hops: must be at least 1, got %d", c.MaxHops))
	}
	return errors.Join(errs...)
}

// relayPolicy is the compiled RelayConfig.
type relayPolicy struct {
	nets       []netip.Prefix
	domains    map[string]bool
	maxHops    int
	postmaster string
}

func compileRelay(c RelayConfig) (*relayPolicy, error) {
	c.EnsureDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	p := &relayPolicy{domains: make(map[string]bool), maxHops: c.MaxHops, postmaster: c.Postmaster}
	for _, n := range c.RelayNetworks {
		pr := netip.MustParsePrefix(n)
		p.nets = append(p.nets, pr.Masked())
	}
	for _, d := range c.RelayDomains {
		// The form netio.Domain gives recipients: either spelling of an
		// internationalised name matches.
		p.domains[netio.CanonicalDomain(strings.TrimSuffix(d, "."))] = true
	}
	return p, nil
}

func (p *relayPolicy) trusted(ip netip.Addr) bool {
	ip = ip.Unmap()
	for _, n := range p.nets {
		if n.Contains(ip) {
			return true
		}
	}
	return false
}

// ReceiverOptions are the collaborators of a Receiver.
type ReceiverOptions struct {
	// Hostname names this server in Received: headers.
	Hostname string
	// Store is the spool messages are committed to.
	Store *spool.Store
	// Logger gets operational messages. nil discards them.
	Logger *slog.Logger
	// Log gets one record per received message. nil discards them.
	Log *EventLog
	// Accepted, when set, is called with each message and its body once
	// the message is durable: the hot path to the scheduler (which may
	// keep the body to deliver without reading it back). It must not
	// block, nor modify body.
	Accepted func(msg *spool.Message, body []byte)
	// Arriving, when set, is called with each message's ID before its
	// commit starts, and Abandoned when the commit failed (Accepted
	// follows a success): the scheduler's Arriving and Abandon.
	Arriving, Abandoned func(id spool.ID)
	// Replicate, when set, copies each message to cluster peers before it
	// is acknowledged: it is called just before the local commit (it may
	// set msg.Peers), and the 250 waits for both. done(err) reports
	// whether the copies are durable (an error answers 451 4.3.0).
	Replicate func(msg *spool.Message, body []byte, done func(error))
	// Guard, when set, admits or refuses each new connection beyond the
	// server's own limits (cluster-wide per-IP limits and blocks).
	Guard ConnGuard
	// Now returns the current time. nil means time.Now.
	Now func() time.Time
}

// Receiver is the engine's side of inbound SMTP: it implements
// netio.Backend. It applies the relay policy to each recipient, adds the
// Received: header, commits the message to the spool and answers the
// client only once the commit is durable.
//
// Failure: a failed commit answers 451 4.3.0 and nothing is queued; the
// client keeps responsibility for the message.
type Receiver struct {
	policy atomic.Pointer[relayPolicy]
	opt    ReceiverOptions
	m      receiverCounters
}

// NewReceiver returns a Receiver with the given policy.
func NewReceiver(cfg RelayConfig, opt ReceiverOptions) (*Receiver, error) {
	p, err := compileRelay(cfg)
	if err != nil {
		return nil, err
	}
	if opt.Store == nil {
		return nil, errors.New("engine: receiver needs a spool")
	}
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.DiscardHandler)
	}
	if opt.Now == nil {
		opt.Now = time.Now
	}
	r := &Receiver{opt: opt}
	r.policy.Store(p)
	return r, nil
}

// SetPolicy replaces the relay policy (configuration reload).
func (r *Receiver) SetPolicy(cfg RelayConfig) error {
	p, err := compileRelay(cfg)
	if err != nil {
		return err
	}
	r.policy.Store(p)
	return nil
}

var (
	errRelayDenied  = smtperr.New(554, "5.7.1", "Error: relay access denied")
	errNoPostmaster = smtperr.New(550, "5.1.1", "Error: this server has no local mailboxes (smtp.postmaster is not set)")
	errLoop         = smtperr.New(554, "5.4.6", "Error: too many hops (mail loop?)")
	errCommit       = smtperr.New(451, "4.3.0", "Error: queue file write error, try again later")
	errNoRoom       = smtperr.New(452, "4.3.1", "Error: insufficient system storage, try again later")
)

// ConnGuard decides on new connections beyond the SMTP server's own
// limits. Both methods run on event loops: fast, never blocking.
type ConnGuard interface {
	// Admit returns nil to accept a connection from ip, or the refusal.
	Admit(ip netip.Addr) *smtperr.Error
	// Release reports the end of a connection Admit accepted.
	Release(ip netip.Addr)
}

// Connect implements netio.Backend. The server enforces its own
// connection limits; the Guard, when set, decides next.
func (r *Receiver) Connect(c *netio.ConnInfo) *smtperr.Error {
	if r.opt.Guard != nil {
		return r.opt.Guard.Admit(c.Remote.Addr())
	}
	return nil
}

// Disconnect implements netio.Disconnecter.
func (r *Receiver) Disconnect(c *netio.ConnInfo) {
	if r.opt.Guard != nil {
		r.opt.Guard.Release(c.Remote.Addr())
	}
}

// Mail implements netio.Backend. A transaction is refused with 452 4.3.1
// (RFC 3463: mail system full) while the spool's filesystem is short of
// space (spool.Store.HasRoom, with the SIZE the client declared): the
// client tries again later, the spool never reaches ENOSPC, and the mail
// already queued keeps going out, freeing space.
func (r *Receiver) Mail(env *netio.Envelope) *smtperr.Error {
	if !r.opt.Store.HasRoom(env.Size) {
		r.m.noRoom.Add(1)
		return errNoRoom
	}
	return nil
}

// Rcpt implements netio.Backend: clients in relay_networks may send
// anywhere, others only to relay_domains, and there only to mailboxes
// without sender-specified routing: a local part holding '%', '!' or '@'
// (user%other@domain, other!user@domain, "user@other"@domain) asks the
// domain's own servers, some of which still honour such routing, to relay
// further (RFC 2505 §2.2; Postfix's allow_untrusted_routing = no).
func (r *Receiver) Rcpt(env *netio.Envelope, rcpt string) *smtperr.Error {
	p := r.policy.Load()
	if !strings.Contains(rcpt, "@") { // <postmaster>, the only local name
		if p.postmaster == "" {
			return errNoPostmaster
		}
		return nil
	}
	if p.trusted(env.Conn.Remote.Addr()) {
		return nil
	}
	if p.domains[netio.Domain(rcpt)] && !routedLocalPart(rcpt) {
		return nil
	}
	r.m.relayDenied.Add(1)
	return errRelayDenied
}

// routedLocalPart reports whether the local part of a mailbox carries
// routing: '%', '!' or (quoted) '@'.
func routedLocalPart(mailbox string) bool {
	i := strings.LastIndexByte(mailbox, '@')
	return i >= 0 && strings.ContainsAny(mailbox[:i], "%!@")
}

// Data implements netio.Backend.
func (r *Receiver) Data(env *netio.Envelope, body []byte, done func(*smtperr.Error)) {
	start := r.opt.Now()
	if hops := countReceived(body); hops >= r.policy.Load().maxHops {
		r.m.rejected.Add(1)
		done(errLoop)
		return
	}
	st := r.opt.Store
	msg := &spool.Message{
		ID:       st.NewID(),
		From:     env.From,
		Received: start,
		Body8Bit: env.Body8Bit,
		SMTPUTF8: env.SMTPUTF8,
		EnvID:    env.EnvID,
		Ret:      env.Ret,
		ClientIP: env.Conn.Remote.Addr().String(),
		Helo:     env.Conn.Helo,
		Rcpts:    make([]spool.Recipient, len(env.Rcpts)),
	}
	postmaster := r.policy.Load().postmaster
	for i, a := range env.Rcpts {
		if !strings.Contains(a, "@") {
			a = postmaster // <postmaster>, accepted by Rcpt only when set
		}
		msg.Rcpts[i] = spool.Recipient{Index: uint16(i), Addr: a, Domain: netio.Domain(a), NextAttempt: start}
		if env.RcptDSN != nil {
			msg.Rcpts[i].Notify = spoolNotify(env.RcptDSN[i].Notify)
			msg.Rcpts[i].ORcpt = env.RcptDSN[i].ORcpt
		}
	}
	full := make([]byte, 0, len(body)+320)
	full = appendReceived(full, env, r.opt.Hostname, msg.ID.String(), start)
	full = append(full, body...)
	tlsOn := env.Conn.TLS != nil
	finish := func(err error) {
		if err != nil {
			if r.opt.Abandoned != nil {
				r.opt.Abandoned(msg.ID)
			}
			r.m.commitFailed.Add(1)
			r.opt.Logger.Error("spool commit failed", "msg_id", msg.ID.String(), "err", err)
			done(errCommit)
			return
		}
		r.m.accepted.Add(1)
		r.m.bytes.Add(int64(len(full)))
		if r.opt.Log != nil {
			r.opt.Log.Received(msg, len(full), tlsOn, r.opt.Now().Sub(start))
		}
		done(smtperr.New(250, "2.0.0", "Ok: queued as %s", msg.ID.String()))
		if r.opt.Accepted != nil {
			r.opt.Accepted(msg, full)
		}
	}
	if r.opt.Arriving != nil {
		r.opt.Arriving(msg.ID)
	}
	if r.opt.Replicate == nil {
		st.Commit(msg, full, finish)
		return
	}
	// Local commit and replication run side by side; the answer waits
	// for both. A message committed here whose copies failed is answered
	// 451 but stays queued (the client's retry is a duplicate, never a
	// loss).
	var (
		mu       sync.Mutex
		left     = 2
		firstErr error
	)
	both := func(err error) {
		mu.Lock()
		if err != nil && firstErr == nil {
			firstErr = err
		}
		left--
		last := left == 0
		mu.Unlock()
		if last {
			finish(firstErr)
		}
	}
	r.opt.Replicate(msg, full, both)
	st.Commit(msg, full, both)
}

// countReceived counts the Received: header fields of a message.
func countReceived(body []byte) int {
	n := 0
	for len(body) > 0 {
		i := bytes.Index(body, []byte("\r\n"))
		if i <= 0 {
			return n // end of the header section (or a malformed one)
		}
		if len(body) >= 9 && strings.EqualFold(string(body[:9]), "received:") {
			n++
		}
		body = body[i+2:]
	}
	return n
}

// appendReceived appends the trace header of RFC 5321 §4.4.
func appendReceived(b []byte, env *netio.Envelope, host, id string, now time.Time) []byte {
	c := env.Conn
	b = append(b, "Received: from "...)
	b = append(b, c.Helo...)
	b = append(b, " (["...)
	if ip := c.Remote.Addr(); ip.Is6() && !ip.Is4In6() {
		b = append(b, "IPv6:"...) // RFC 5321 §4.1.3 address literal
	}
	b = append(b, c.Remote.Addr().String()...)
	b = append(b, "])\r\n\tby "...)
	b = append(b, host...)
	b = append(b, " (Hermod) with "...)
	switch {
	case env.SMTPUTF8:
		b = append(b, "UTF8SMTP"...)
	case c.ESMTP:
		b = append(b, "ESMTP"...)
	default:
		b = append(b, "SMTP"...)
	}
	if c.TLS != nil {
		b = append(b, 'S')
	}
	b = append(b, " id "...)
	b = append(b, id...)
	if c.TLS != nil {
		b = append(b, "\r\n\t(using "...)
		b = append(b, tlsVersionName(c.TLS.Version)...)
		b = append(b, " with cipher "...)
		b = append(b, tls.CipherSuiteName(c.TLS.CipherSuite)...)
		b = append(b, ')')
	}
	if len(env.Rcpts) == 1 {
		b = append(b, "\r\n\tfor <"...)
		b = append(b, env.Rcpts[0]...)
		b = append(b, '>')
	}
	b = append(b, "; "...)
	b = now.AppendFormat(b, "Mon, 02 Jan 2006 15:04:05 -0700")
	return append(b, "\r\n"...)
}

func tlsVersionName(v uint16) string {
	switch v {
	case tls.VersionTLS10:
		return "TLSv1.0"
	case tls.VersionTLS11:
		return "TLSv1.1"
	case tls.VersionTLS12:
		return "TLSv1.2"
	case tls.VersionTLS13:
		return "TLSv1.3"
	}
	return fmt.Sprintf("TLS(0x%04x)", v)
}

// spoolNotify converts the NOTIFY flags the server parsed to the spool's.
func spoolNotify(n uint8) uint8 {
	var f uint8
	for _, m := range [...]struct{ from, to uint8 }{
		{netio.NotifyNever, spool.NotifyNever},
		{netio.NotifySuccess, spool.NotifySuccess},
		{netio.NotifyFailure, spool.NotifyFailure},
		{netio.NotifyDelay, spool.NotifyDelay},
	} {
		if n&m.from != 0 {
			f |= m.to
		}
	}
	return f
}

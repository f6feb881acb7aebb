package netio

import (
	"bytes"
	"crypto/tls"
	"math"
	"net/netip"
	"strconv"
	"strings"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// Protocol limits of RFC 5321 §4.5.3.1.
const (
	// maxCommandLine is the longest command line, CRLF included.
	maxCommandLine = 512
	// maxMailRcptLine is the longest MAIL or RCPT line: RFC 5321 lets
	// extensions (SIZE, SMTPUTF8, DSN's ORCPT/ENVID) raise the 512 octets.
	maxMailRcptLine = 1024
	// maxTextLine is the longest line of message data, CRLF included.
	maxTextLine = 1000
	// maxPath is the longest reverse- or forward-path, brackets included.
	maxPath = 256
	// maxDomain bounds the domain of a mailbox. The local part is bounded
	// only by maxPath: RFC 5321 §4.5.3.1.1 sets 64 octets but §4.5.3.1
	// asks servers to impose no limit where they can, and senders' VERP
	// and SRS return paths (which encode a whole recipient address) run
	// longer; Postfix and Exim accept them too.
	maxDomain = 255
)

// Phase is where a Session is in the protocol.
type Phase uint8

const (
	// PhaseCommand waits for a command line.
	PhaseCommand Phase = iota
	// PhaseData reads DATA message content up to the lone dot.
	PhaseData
	// PhaseBDAT reads a BDAT chunk of known size.
	PhaseBDAT
	// PhasePending waits for the backend to finish a commit; input is not
	// read until Resume is called.
	PhasePending
	// PhaseClosed means the session is over; the connection must close.
	PhaseClosed
)

func (p Phase) String() string {
	switch p {
	case PhaseCommand:
		return "command"
	case PhaseData:
		return "data"
	case PhaseBDAT:
		return "bdat"
	case PhasePending:
		return "pending"
	case PhaseClosed:
		return "closed"
	}
	return "phase(" + strconv.Itoa(int(p)) + ")"
}

// Action tells the transport what to do after Feed or Resume.
type Action uint8

const (
	// ActNone: write the replies, feed more input when it arrives.
	ActNone Action = iota
	// ActPending: write the replies; a commit is outstanding. Do not feed
	// input until the session's notify function has been called and Resume
	// has run.
	ActPending
	// ActStartTLS: write the replies (ending with 220), then run the TLS
	// handshake and call TLSStarted. Input after the STARTTLS line was
	// already refused by the session.
	ActStartTLS
	// ActClose: write the replies, then close the connection.
	ActClose
)

// ConnInfo describes the client connection of a session.
type ConnInfo struct {
	// Remote and Local are the socket addresses.
	Remote netip.AddrPort
	Local  netip.AddrPort
	// TLS is set once STARTTLS has completed.
	TLS *tls.ConnectionState
	// Helo is the name given with the last HELO or EHLO.
	Helo string
	// ESMTP is true after EHLO, false after HELO.
	ESMTP bool
}

// Envelope is one mail transaction as the client stated it.
type Envelope struct {
	// Conn is the connection the transaction came on. The backend may read
	// it only during the call it was passed to.
	Conn *ConnInfo
	// From is the reverse-path without angle brackets; "" is the null
	// reverse-path <>.
	From string
	// Rcpts are the accepted forward-paths, without angle brackets, in the
	// order given, duplicates removed.
	Rcpts []string
	// Size is the SIZE= the client declared, 0 if none.
	Size int64
	// Body8Bit is set by BODY=8BITMIME.
	Body8Bit bool
	// SMTPUTF8 is set by the SMTPUTF8 parameter.
	SMTPUTF8 bool
	// Chunked is set when the content arrived with BDAT.
	Chunked bool
	// EnvID is the DSN ENVID parameter, xtext-decoded ("" when absent);
	// Ret is RET=, "FULL" or "HDRS" ("" when absent). RFC 3461.
	EnvID, Ret string
	// RcptDSN holds the DSN parameters (NOTIFY, ORCPT) of Rcpts, index for
	// index; nil while no accepted recipient gave any.
	RcptDSN []RcptDSN
}

// Backend is the policy and storage behind sessions. It is implemented by
// the engine. Connect, Mail and Rcpt run on an event loop: they must decide
// from memory and never block. Data must not block either: it starts the
// commit and calls done later, from any goroutine, exactly once.
type Backend interface {
	// Connect is called for a new connection; a non-nil reply refuses it
	// (the reply is sent and the connection closed).
	Connect(c *ConnInfo) *smtperr.Error
	// Mail checks the reverse-path of a new transaction.
	Mail(env *Envelope) *smtperr.Error
	// Rcpt checks one forward-path; env.Rcpts holds those accepted so far.
	Rcpt(env *Envelope, rcpt string) *smtperr.Error
	// Data takes the complete message content (CRLF line endings,
	// dot-unstuffed) and commits it. The backend owns body afterwards and
	// must not keep env. done receives the reply for the client: 250 only
	// once the message is durable.
	Data(env *Envelope, body []byte, done func(*smtperr.Error))
}

// Disconnecter is implemented by backends that track open connections:
// Disconnect is called once when a connection that Connect accepted ends
// (whatever the reason), from the goroutine that ends it.
type Disconnecter interface {
	Disconnect(c *ConnInfo)
}

// Fixed replies. They are shared and must not be modified.
var (
	replyOK           = smtperr.New(250, "2.0.0", "Ok")
	replyBye          = smtperr.New(221, "2.0.0", "Bye")
	replyData         = smtperr.New(354, "", "End data with <CR><LF>.<CR><LF>")
	replyVrfy         = smtperr.New(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
	replyHelp         = smtperr.New(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS")
	replyTLSReady     = smtperr.New(220, "2.0.0", "Ready to start TLS")
	errUnknownCommand = smtperr.New(500, "5.5.2", "Error: command not recognized")
	errNotImpl        = smtperr.New(502, "5.5.1", "Error: command not implemented")
	errLineTooLong    = smtperr.New(500, "5.5.2", "Error: line too long")
	errBareLFCommand  = smtperr.New(500, "5.5.2", "Error: bare <LF> or <CR> in command; lines must end with <CR><LF>")
	errNeedHelo       = smtperr.New(503, "5.5.1", "Error: send HELO/EHLO first")
	errNestedMail     = smtperr.New(503, "5.5.1", "Error: nested MAIL command")
	errNeedMail       = smtperr.New(503, "5.5.1", "Error: need MAIL command")
	errNeedRcpt       = smtperr.New(503, "5.5.1", "Error: need RCPT command")
	errNoValidRcpt    = smtperr.New(554, "5.5.1", "Error: no valid recipients")
	errMixedDataBDAT  = smtperr.New(503, "5.5.1", "Error: DATA and BDAT may not be mixed in one transaction")
	errHeloSyntax     = smtperr.New(501, "5.5.4", "Syntax: EHLO hostname")
	errMailSyntax     = smtperr.New(501, "5.5.4", "Syntax: MAIL FROM:<address>")
	errRcptSyntax     = smtperr.New(501, "5.5.4", "Syntax: RCPT TO:<address>")
	errBDATSyntax     = smtperr.New(501, "5.5.4", "Syntax: BDAT size [LAST]")
	errNoArgs         = smtperr.New(501, "5.5.4", "Syntax error: no arguments allowed")
	errBadSender      = smtperr.New(553, "5.1.7", "Error: malformed sender address")
	errBadRcpt        = smtperr.New(553, "5.1.3", "Error: malformed recipient address")
	errPathTooLong    = smtperr.New(501, "5.5.4", "Error: address too long")
	errNeedUTF8       = smtperr.New(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8")
	errUnknownParam   = smtperr.New(555, "5.5.4", "Error: unsupported MAIL/RCPT parameter")
	errBadParam       = smtperr.New(501, "5.5.4", "Error: malformed MAIL/RCPT parameter")
	errTooBig         = smtperr.New(552, "5.3.4", "Error: message too big for system")
	errNoBuffer       = smtperr.New(452, "4.3.1", "Error: insufficient system resources, try again later")
	errTooManyRcpts   = smtperr.New(452, "4.5.3", "Error: too many recipients")
	errTooManyErrors  = smtperr.New(421, "4.7.0", "Error: too many errors, closing connection")
	errBareLFData     = smtperr.New(554, "5.6.0", "Error: bare <LF> or <CR> in message data; lines must end with <CR><LF> (SMTP smuggling protection)")
	errBareLFDotClose = smtperr.New(554, "5.6.0", "Error: bare <LF> or <CR> near end of data; message rejected, closing connection (SMTP smuggling protection)")
	errDataLineLong   = smtperr.New(554, "5.6.0", "Error: message line longer than 1000 octets")
	errNULData        = smtperr.New(554, "5.6.0", "Error: NUL octet in message data (not allowed in 7bit or 8bit content)")
	errTLSNotOffered  = smtperr.New(502, "5.5.1", "Error: STARTTLS not offered")
	errTLSActive      = smtperr.New(503, "5.5.1", "Error: TLS already active")
	errTLSInMail      = smtperr.New(503, "5.5.1", "Error: MAIL transaction in progress")
	errTLSPipelined   = smtperr.New(554, "5.5.1", "Error: data pipelined after STARTTLS; closing connection")
	errAddrLiteral    = smtperr.New(553, "5.1.3", "Error: address literals are not accepted as recipient domains")
	errRefused        = smtperr.New(503, "5.7.1", "Error: connection refused; only QUIT is accepted")
)

// Session is the server side of one SMTP connection as a pure state machine:
// bytes in, replies out. It does no I/O, keeps no timers and is not safe for
// concurrent use; the transport (the gnet event loop or, after STARTTLS, a
// goroutine) drives it and enforces timeouts by looking at Phase.
//
// Invariants: replies are produced in command order; nothing after a
// STARTTLS line is ever interpreted; message content is terminated only by
// <CRLF>.<CRLF> and content with a bare CR or LF, or a NUL, is never
// handed to the backend.
type Session struct {
	cfg    *ServerConfig
	b      Backend
	notify func(*smtperr.Error)
	info   ConnInfo
	tls    bool // STARTTLS may be offered
	// connected is set once Connect accepted the connection, until Abort
	// reports its end (Disconnecter).
	connected bool
	// refused is set when Connect refused the connection with a 5xx
	// greeting: only QUIT is accepted then (RFC 5321 §3.1).
	refused bool

	phase    Phase
	quit     bool
	errors   int
	junkCmds int    // commands that moved no mail (see junk)
	discard  bool   // discarding an over-long command line up to its LF
	progress uint64 // complete command lines and content octets consumed

	env       *Envelope // current transaction, nil when none
	rcptTried bool      // a RCPT was given in this transaction
	overshoot int       // RCPTs past MaxRecipients in this transaction

	// Message content being received.
	body     []byte
	dataErr  *smtperr.Error // first problem found in the content
	midLine  bool           // inside an over-long data line being discarded
	lastBare bool           // previous data line ended with a bare LF
	prevCR   bool           // BDAT: previous chunk ended with CR
	lineLen  int            // BDAT: length of the current line so far
	bodySize int64          // content octets so far, stored or not
	// reserved: octets of the budget (ServerConfig.MaxBufferedBytes) held
	// for body; committing: those of the body handed to the backend,
	// until its commit ends.
	reserved, committing int64
	bdatLeft             int64
	bdatLast             bool

	// DataBytes counts content octets received in the current DATA or BDAT
	// phase (before unstuffing); the transport uses it for the minimum
	// data rate.
	DataBytes int64
}

// NewSession returns a session for a new connection. notify is called (from
// any goroutine) with the backend's reply once a Data commit finishes; the
// transport must then call Resume on the session's own goroutine. tlsOK
// says whether STARTTLS may be offered.
func NewSession(cfg *ServerConfig, b Backend, info ConnInfo, tlsOK bool, notify func(*smtperr.Error)) *Session {
	return &Session{cfg: cfg, b: b, notify: notify, info: info, tls: tlsOK && info.TLS == nil}
}

// Phase returns the current phase.
func (s *Session) Phase() Phase { return s.phase }

// Progress counts the complete command lines and the message content
// octets consumed so far. The transport restarts its idle timer only when
// it changes: octets of a command line that never ends (however many, and
// even once the line is over-long and being discarded) are not progress,
// so a client dribbling them is still cut off by the command timeout.
func (s *Session) Progress() uint64 { return s.progress }

// Refused reports whether the greeting refused the connection.
func (s *Session) Refused() bool { return s.refused }

// Quit reports whether the client ended the session with QUIT.
func (s *Session) Quit() bool { return s.quit }

// Info returns the connection information.
func (s *Session) Info() *ConnInfo { return &s.info }

// Greeting appends the opening 220 reply, or the backend's refusal. A
// 421 (or 521, RFC 7504) refusal returns ActClose. After a 554 the session
// stays open until the client's QUIT, answering every other command with
// 503, as RFC 5321 §3.1 requires; Refused then reports true.
func (s *Session) Greeting(out []byte) ([]byte, Action) {
	if r := s.b.Connect(&s.info); r != nil {
		if r.Code >= 500 && r.Code != 521 {
			s.refused = true
			return r.AppendReply(out), ActNone
		}
		s.phase = PhaseClosed
		return r.AppendReply(out), ActClose
	}
	s.connected = true
	out = append(out, "220 "...)
	out = append(out, s.cfg.Hostname...)
	out = append(out, " ESMTP Hermod\r\n"...)
	return out, ActNone
}

// Feed consumes as much of in as it can, appending replies to out. It
// returns the number of bytes consumed (the rest — an incomplete line, or
// everything after a command that started a commit — must be fed again
// later, followed by any new input), the extended out, and what the
// transport must do next.
func (s *Session) Feed(in []byte, out []byte) (int, []byte, Action) {
	n := 0
	for {
		switch s.phase {
		case PhaseClosed:
			return len(in), out, ActClose
		case PhasePending:
			return n, out, ActPending
		case PhaseData:
			c, done, closeNow := s.readData(in[n:])
			n += c
			s.progress += uint64(c)
			if closeNow {
				s.resetTxn()
				s.phase = PhaseClosed
				return len(in), errBareLFDotClose.AppendReply(out), ActClose
			}
			if !done {
				return n, out, ActNone
			}
			var act Action
			out, act = s.endData(out)
			if act != ActNone {
				return n, out, act
			}
		case PhaseBDAT:
			c := s.readBDAT(in[n:])
			n += c
			s.progress += uint64(c)
			if s.bdatLeft > 0 {
				return n, out, ActNone
			}
			var act Action
			out, act = s.endBDAT(out)
			if act != ActNone {
				return n, out, act
			}
		case PhaseCommand:
			if n >= len(in) {
				return n, out, ActNone
			}
			i := bytes.IndexByte(in[n:], '\n')
			if i < 0 {
				if s.discard || len(in)-n > maxMailRcptLine {
					s.discard = true
					return len(in), out, ActNone
				}
				return n, out, ActNone
			}
			line := in[n : n+i+1]
			n += i + 1
			s.progress++
			if s.discard {
				s.discard = false
				var act Action
				if out, act = s.fail(out, errLineTooLong); act != ActNone {
					return len(in), out, act
				}
				continue
			}
			var act Action
			out, act = s.command(line, out)
			switch act {
			case ActStartTLS:
				if n < len(in) {
					// CVE-2011-0411: anything pipelined after STARTTLS
					// would be taken as sent over TLS. Refuse it all.
					s.phase = PhaseClosed
					return len(in), errTLSPipelined.AppendReply(out), ActClose
				}
				return n, replyTLSReady.AppendReply(out), ActStartTLS
			case ActClose:
				return len(in), out, ActClose
			case ActPending:
				return n, out, ActPending
			}
		}
	}
}

// Resume finishes a pending commit with the backend's reply and returns the
// session to command phase. Pipelined input left unconsumed by Feed must be
// fed again after Resume.
func (s *Session) Resume(r *smtperr.Error, out []byte) ([]byte, Action) {
	if s.phase != PhasePending {
		return out, ActNone
	}
	s.phase = PhaseCommand
	s.cfg.budget.release(s.committing)
	s.committing = 0
	s.resetTxn()
	if r == nil {
		r = smtperr.New(451, "4.3.0", "Error: no reply from queue")
	}
	if !r.Positive() {
		return s.fail(out, r)
	}
	// A message accepted forgives the errors and junk commands before it
	// (as Postfix does): a long session of a bulk sender, with RSETs and
	// a few refused recipients between its messages, is not cut off.
	s.errors, s.junkCmds = 0, 0
	return r.AppendReply(out), ActNone
}

// TLSStarted records a completed TLS handshake: the session starts afresh
// (RFC 3207 §4.2: the client must send EHLO again).
func (s *Session) TLSStarted(cs *tls.ConnectionState) {
	s.info.TLS = cs
	s.info.Helo = ""
	s.info.ESMTP = false
	s.tls = false
	s.resetTxn()
	s.phase = PhaseCommand
}

// Abort releases a transaction in progress (the connection is gone).
func (s *Session) Abort() {
	if s.phase != PhasePending {
		s.resetTxn()
	}
	// A pending commit still holds its body for a moment: its budget is
	// given back a little early rather than never.
	s.cfg.budget.release(s.committing)
	s.committing = 0
	s.phase = PhaseClosed
	if s.connected {
		s.connected = false
		if d, ok := s.b.(Disconnecter); ok {
			d.Disconnect(&s.info)
		}
	}
}

func (s *Session) resetTxn() {
	s.env = nil
	s.rcptTried = false
	s.overshoot = 0
	s.dropBody()
	s.dataErr = nil
	s.midLine = false
	s.lastBare = false
	s.prevCR = false
	s.lineLen = 0
	s.bodySize = 0
	s.bdatLeft = 0
	s.bdatLast = false
	s.DataBytes = 0
}

// fail appends an error reply and counts it; past MaxErrors it closes.
func (s *Session) fail(out []byte, r *smtperr.Error) ([]byte, Action) {
	out = r.AppendReply(out)
	if r.Code == 421 {
		s.phase = PhaseClosed
		return out, ActClose
	}
	s.errors++
	if s.errors >= s.cfg.MaxErrors {
		s.phase = PhaseClosed
		return errTooManyErrors.AppendReply(out), ActClose
	}
	return out, ActNone
}

func (s *Session) reply(out []byte, r *smtperr.Error) ([]byte, Action) {
	if r.Positive() {
		return r.AppendReply(out), ActNone
	}
	return s.fail(out, r)
}

// command executes one command line (terminated by LF).
func (s *Session) command(line []byte, out []byte) ([]byte, Action) {
	// A line longer than any command is too long whatever its ending: Feed
	// discards one whose first maxMailRcptLine octets arrive without an LF
	// and reports it so, and the reply must not depend on how the input
	// was split into reads.
	if len(line)-1 > maxMailRcptLine {
		return s.fail(out, errLineTooLong)
	}
	// Strict CRLF: the line must end in CRLF and contain no other CR.
	if len(line) < 2 || line[len(line)-2] != '\r' || bytes.IndexByte(line[:len(line)-2], '\r') >= 0 {
		return s.fail(out, errBareLFCommand)
	}
	line = line[:len(line)-2]
	if bytes.IndexByte(line, 0) >= 0 {
		return s.fail(out, errUnknownCommand)
	}
	verb, arg := line, []byte(nil)
	if i := bytes.IndexByte(line, ' '); i >= 0 {
		verb, arg = line[:i], line[i+1:]
	}
	isMailRcpt := bytes.EqualFold(verb, []byte("MAIL")) || bytes.EqualFold(verb, []byte("RCPT"))
	if len(line)+2 > maxCommandLine && !(isMailRcpt && len(line)+2 <= maxMailRcptLine) {
		return s.fail(out, errLineTooLong)
	}
	if s.refused && !eqVerb(verb, "QUIT") {
		return s.fail(out, errRefused)
	}
	switch {
	case eqVerb(verb, "EHLO"), eqVerb(verb, "HELO"):
		// Counted as junk too: repeated greetings move no mail.
		errs := s.errors
		out, act := s.helo(arg, eqVerb(verb, "EHLO"), out)
		if act != ActNone || s.errors != errs {
			return out, act
		}
		return s.junk(out)
	case eqVerb(verb, "MAIL"):
		return s.reply(out, s.mail(arg))
	case eqVerb(verb, "RCPT"):
		r := s.rcpt(arg)
		if r == errTooManyRcpts {
			// Flow control, not a client error (RFC 5321 §4.5.3.1.10:
			// the client sends the rest in another transaction). Counted
			// as errors, a pipelined list longer than MaxRecipients +
			// MaxErrors would end in 421 and the transaction would never
			// get through. Past maxOvershoot surplus recipients they do
			// count, so that they cannot hold a session open forever
			// (Postfix: smtpd_recipient_overshoot_limit).
			if s.overshoot++; s.overshoot > maxOvershoot {
				return s.fail(out, r)
			}
			return r.AppendReply(out), ActNone
		}
		return s.reply(out, r)
	case eqVerb(verb, "DATA"):
		return s.data(arg, out)
	case eqVerb(verb, "BDAT"):
		return s.bdat(arg, out)
	case eqVerb(verb, "RSET"):
		if len(bytes.TrimSpace(arg)) > 0 {
			return s.fail(out, errNoArgs)
		}
		s.resetTxn()
		return s.junk(replyOK.AppendReply(out))
	case eqVerb(verb, "NOOP"):
		return s.junk(replyOK.AppendReply(out))
	case eqVerb(verb, "QUIT"):
		s.quit = true
		s.resetTxn()
		s.phase = PhaseClosed
		return replyBye.AppendReply(out), ActClose
	case eqVerb(verb, "VRFY"):
		if len(bytes.TrimSpace(arg)) == 0 {
			return s.fail(out, smtperr.New(501, "5.5.4", "Syntax: VRFY address"))
		}
		return s.junk(replyVrfy.AppendReply(out))
	case eqVerb(verb, "HELP"):
		return s.junk(replyHelp.AppendReply(out))
	case eqVerb(verb, "STARTTLS"):
		switch {
		case len(bytes.TrimSpace(arg)) > 0:
			return s.fail(out, errNoArgs)
		case s.info.TLS != nil:
			return s.fail(out, errTLSActive)
		case !s.tls:
			return s.fail(out, errTLSNotOffered)
		case s.env != nil:
			return s.fail(out, errTLSInMail)
		}
		return out, ActStartTLS
	case eqVerb(verb, "EXPN"), eqVerb(verb, "TURN"), eqVerb(verb, "ETRN"), eqVerb(verb, "AUTH"),
		eqVerb(verb, "SEND"), eqVerb(verb, "SOML"), eqVerb(verb, "SAML"), eqVerb(verb, "ATRN"):
		return s.fail(out, errNotImpl)
	}
	return s.fail(out, errUnknownCommand)
}

// maxOvershoot is the number of recipients past MaxRecipients a
// transaction may give before each further one counts as an error
// (Postfix's smtpd_recipient_overshoot_limit).
const maxOvershoot = 1000

// maxJunk is the number of commands that move no mail (NOOP, RSET, VRFY,
// HELP, EHLO/HELO, an empty BDAT that is not LAST) a session may send
// between accepted messages before each further one counts as an error,
// so that a client cannot hold a connection open forever with them
// (Postfix's smtpd_junk_command_limit).
const maxJunk = 100

// junk counts a command that moves no mail; past maxJunk it counts as an
// error too, and past MaxErrors the session ends with 421.
func (s *Session) junk(out []byte) ([]byte, Action) {
	s.junkCmds++
	if s.junkCmds <= maxJunk {
		return out, ActNone
	}
	s.errors++
	if s.errors >= s.cfg.MaxErrors {
		s.phase = PhaseClosed
		return errTooManyErrors.AppendReply(out), ActClose
	}
	return out, ActNone
}

func eqVerb(verb []byte, want string) bool {
	if len(verb) != len(want) {
		return false
	}
	for i := 0; i < len(verb); i++ {
		c := verb[i]
		if 'a' <= c && c <= 'z' {
			c -= 'a' - 'A'
		}
		if c != want[i] {
			return false
		}
	}
	return true
}

func (s *Session) helo(arg []byte, ehlo bool, out []byte) ([]byte, Action) {
	name := bytes.TrimSpace(arg)
	if len(name) == 0 || len(name) > maxDomain || bytes.ContainsAny(name, " \t") || !printableASCII(name) {
		if !ehlo {
			return s.fail(out, smtperr.New(501, "5.5.4", "Syntax: HELO hostname"))
		}
		return s.fail(out, errHeloSyntax)
	}
	s.resetTxn()
	s.info.Helo = string(name)
	s.info.ESMTP = ehlo
	if !ehlo {
		out = append(out, "250 "...)
		out = append(out, s.cfg.Hostname...)
		return append(out, "\r\n"...), ActNone
	}
	out = append(out, "250-"...)
	out = append(out, s.cfg.Hostname...)
	out = append(out, "\r\n250-PIPELINING\r\n250-SIZE "...)
	out = strconv.AppendInt(out, s.cfg.MaxMessageSize, 10)
	out = append(out, "\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250-DSN\r\n"...)
	if s.tls {
		out = append(out, "250-STARTTLS\r\n"...)
	}
	out = append(out, "250 ENHANCEDSTATUSCODES\r\n"...)
	return out, ActNone
}

func printableASCII(b []byte) bool {
	for _, c := range b {
		if c <= ' ' || c >= 0x7f {
			return false
		}
	}
	return true
}

func (s *Session) mail(arg []byte) *smtperr.Error {
	if s.info.Helo == "" {
		return errNeedHelo
	}
	if s.env != nil {
		return errNestedMail
	}
	if s.cfg.budget.spent() {
		return errNoBuffer
	}
	rest, ok := cutPrefixFold(arg, "FROM:")
	if !ok {
		return errMailSyntax
	}
	path, params, perr := splitPath(rest)
	if perr != nil {
		if perr == errPathTooLong {
			return perr
		}
		return errMailSyntax
	}
	env := &Envelope{Conn: &s.info}
	for len(params) > 0 {
		var p []byte
		p, params = nextParam(params)
		key, val, hasVal := bytes.Cut(p, []byte("="))
		switch {
		case eqVerb(key, "SIZE"):
			n, ok := parseSize(val)
			if !hasVal || !ok {
				return errBadParam
			}
			if n > s.cfg.MaxMessageSize {
				return smtperr.New(552, "5.3.4", "Error: message size exceeds fixed limit of %d octets", s.cfg.MaxMessageSize)
			}
			env.Size = n
		case eqVerb(key, "BODY"):
			switch {
			case eqVerb(val, "8BITMIME"):
				env.Body8Bit = true
			case eqVerb(val, "7BIT"):
				env.Body8Bit = false
			default:
				return smtperr.New(555, "5.5.4", "Error: unsupported BODY type")
			}
		case eqVerb(key, "SMTPUTF8"):
			if hasVal {
				return errBadParam
			}
			env.SMTPUTF8 = true
		case eqVerb(key, "RET"):
			ret, ok := parseRet(val)
			if !ok || env.Ret != "" {
				return errDSNRet
			}
			env.Ret = ret
		case eqVerb(key, "ENVID"):
			id, ok := parseEnvID(val)
			if !ok || env.EnvID != "" {
				return errDSNEnvID
			}
			env.EnvID = id
		default:
			return errUnknownParam
		}
	}
	addr, kind := parseMailbox(path, true)
	switch kind {
	case mbBad:
		return errBadSender
	case mbUTF8:
		if !env.SMTPUTF8 {
			return errNeedUTF8
		}
	}
	env.From = addr
	if r := s.b.Mail(env); r != nil {
		return r
	}
	s.env = env
	return replyMailOK
}

var replyMailOK = smtperr.New(250, "2.1.0", "Ok")

// parseSize parses an RFC 1870 size-value, 1*20DIGIT. Values beyond int64
// (still valid syntax) come back as math.MaxInt64, so they are refused as
// too big (552) rather than malformed (501).
func parseSize(b []byte) (int64, bool) {
	if len(b) == 0 || len(b) > 20 {
		return 0, false
	}
	var n int64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		d := int64(c - '0')
		if n > (math.MaxInt64-d)/10 {
			n = math.MaxInt64
			continue
		}
		n = n*10 + d
	}
	return n, true
}

func (s *Session) rcpt(arg []byte) *smtperr.Error {
	if s.env == nil {
		return errNeedMail
	}
	if s.env.Chunked {
		return errMixedDataBDAT
	}
	rest, ok := cutPrefixFold(arg, "TO:")
	if !ok {
		return errRcptSyntax
	}
	path, params, perr := splitPath(rest)
	if perr != nil {
		if perr == errPathTooLong {
			return perr
		}
		return errRcptSyntax
	}
	s.rcptTried = true
	var dsn RcptDSN
	for len(params) > 0 {
		var p []byte
		p, params = nextParam(params)
		key, val, _ := bytes.Cut(p, []byte("="))
		switch {
		case eqVerb(key, "NOTIFY"):
			n, ok := parseNotify(val)
			if !ok || dsn.Notify != 0 {
				return errDSNNotify
			}
			dsn.Notify = n
		case eqVerb(key, "ORCPT"):
			o, ok := parseORcpt(val, s.env.SMTPUTF8)
			if !ok || dsn.ORcpt != "" {
				return errDSNORcpt
			}
			dsn.ORcpt = o
		default:
			return errUnknownParam
		}
	}
	if len(s.env.Rcpts) >= s.cfg.MaxRecipients {
		return errTooManyRcpts
	}
	addr, kind := parseMailbox(path, false)
	switch kind {
	case mbBad, mbNull:
		return errBadRcpt
	case mbUTF8:
		if !s.env.SMTPUTF8 {
			return errNeedUTF8
		}
	case mbLiteral:
		return errAddrLiteral
	}
	for _, r := range s.env.Rcpts {
		if sameMailbox(r, addr) {
			return replyDupRcpt
		}
	}
	if r := s.b.Rcpt(s.env, addr); r != nil {
		return r
	}
	if s.env.RcptDSN == nil && dsn != (RcptDSN{}) {
		s.env.RcptDSN = make([]RcptDSN, len(s.env.Rcpts), len(s.env.Rcpts)+1)
	}
	if s.env.RcptDSN != nil {
		s.env.RcptDSN = append(s.env.RcptDSN, dsn)
	}
	s.env.Rcpts = append(s.env.Rcpts, addr)
	return replyRcptOK
}

var (
	replyRcptOK  = smtperr.New(250, "2.1.5", "Ok")
	replyDupRcpt = smtperr.New(250, "2.1.5", "Ok (duplicate recipient)")
)

// sameMailbox compares two mailboxes: the local part exactly (it may be
// case-sensitive, RFC 5321 §2.4), the domain without regard to case.
func sameMailbox(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	i, j := strings.LastIndexByte(a, '@'), strings.LastIndexByte(b, '@')
	if i < 0 || j < 0 {
		return i == j && strings.EqualFold(a, b) // <postmaster>
	}
	return i == j && a[:i] == b[:j] && strings.EqualFold(a[i:], b[j:])
}

func (s *Session) data(arg []byte, out []byte) ([]byte, Action) {
	switch {
	case len(bytes.TrimSpace(arg)) > 0:
		return s.fail(out, errNoArgs)
	case s.env == nil:
		return s.fail(out, errNeedMail)
	case s.env.Chunked:
		return s.fail(out, errMixedDataBDAT)
	case len(s.env.Rcpts) == 0 && !s.rcptTried:
		return s.fail(out, errNeedRcpt)
	case len(s.env.Rcpts) == 0:
		return s.fail(out, errNoValidRcpt)
	}
	s.phase = PhaseData
	s.body = make([]byte, 0, bodyCap(s.env.Size))
	s.bodySize = 0
	s.DataBytes = 0
	return replyData.AppendReply(out), ActNone
}

// bodyCap picks the initial body buffer size from the declared SIZE (or
// BDAT chunk size), at most maxBodyPrealloc: what a client merely declares
// must not reserve memory (ten thousand connections declaring 1 MiB and
// then trickling would otherwise hold 10 GiB); beyond it the buffer grows
// with the data actually received.
func bodyCap(declared int64) int {
	if declared > 0 && declared <= maxBodyPrealloc-512 {
		return int(declared) + 512
	}
	if declared > 0 {
		return maxBodyPrealloc
	}
	return 4096
}

// maxBodyPrealloc bounds bodyCap.
const maxBodyPrealloc = 64 << 10

// readData consumes complete lines of DATA content. It returns the bytes
// consumed, whether the terminating <CRLF>.<CRLF> was read, and whether the
// connection must be closed because a dot line came with bare line endings
// (the client, or an attacker, believes the message ended there: a
// smuggling attempt or a broken client, either way nothing after it can be
// trusted).
func (s *Session) readData(p []byte) (consumed int, done, closeNow bool) {
	for consumed < len(p) {
		i := bytes.IndexByte(p[consumed:], '\n')
		if i < 0 {
			rest := len(p) - consumed
			// A line without its LF yet is over-long once it cannot end
			// within maxTextLine octets, the dot doubled for transparency
			// not counted (RFC 5321 §4.5.3.1.6).
			limit := maxTextLine
			if p[consumed] == '.' {
				limit++
			}
			if s.midLine || rest >= limit {
				// An over-long line: note it and drop what we have,
				// checked and counted as if it were kept, so that the
				// reply does not depend on how the line was split.
				drop := p[consumed:]
				if drop[len(drop)-1] == '\r' {
					drop = drop[:len(drop)-1] // it may pair with the next LF
				}
				if len(drop) == 0 {
					return consumed, false, false
				}
				s.noteDataErr(errDataLineLong)
				s.checkText(drop)
				size := len(drop)
				if !s.midLine && drop[0] == '.' {
					size-- // dot-unstuffing
				}
				s.midLine = true
				s.countBody(size)
				s.DataBytes += int64(len(drop))
				return consumed + len(drop), false, false
			}
			return consumed, false, false
		}
		line := p[consumed : consumed+i+1]
		consumed += i + 1
		s.DataBytes += int64(len(line))
		if s.midLine {
			s.midLine = false
			bare := len(line) < 2 || line[len(line)-2] != '\r'
			if bare || bytes.IndexByte(line[:len(line)-1], '\r') != len(line)-2 {
				s.noteDataErr(errBareLFData)
			}
			if bytes.IndexByte(line, 0) >= 0 {
				s.noteDataErr(errNULData)
			}
			s.countBody(len(line))
			s.lastBare = bare
			continue
		}
		bare := len(line) < 2 || line[len(line)-2] != '\r'
		content := line[:len(line)-1]
		if !bare {
			content = line[:len(line)-2]
		}
		if bytes.IndexByte(content, '\r') >= 0 {
			s.noteDataErr(errBareLFData)
		}
		if bytes.IndexByte(content, 0) >= 0 {
			// RFC 5322 text and RFC 2045 7bit/8bit data exclude NUL;
			// some receivers strip it, turning "<NUL>." into a dot line.
			s.noteDataErr(errNULData)
		}
		if len(content) == 1 && content[0] == '.' {
			if bare || s.lastBare || bytes.IndexByte(content, '\r') >= 0 {
				return consumed, false, true
			}
			return consumed, true, false
		}
		if bare {
			s.noteDataErr(errBareLFData)
		}
		s.lastBare = bare
		if len(line) > 0 && line[0] == '.' {
			line = line[1:] // dot-unstuffing
		}
		// The limit counts the CRLF but not the dot doubled for
		// transparency (RFC 5321 §4.5.3.1.6).
		if len(line) > maxTextLine {
			s.noteDataErr(errDataLineLong)
		}
		s.appendBody(line)
	}
	return consumed, false, false
}

// noteDataErr records a problem with the content being received. The most
// important one is kept, whatever the order they were found in, so that
// the reply does not depend on how the input was split into reads.
func (s *Session) noteDataErr(e *smtperr.Error) {
	if dataErrRank(e) > dataErrRank(s.dataErr) {
		s.dataErr = e
	}
}

// rankState is the rank of transaction state errors (BDAT without MAIL or
// RCPT): the content of such a chunk is not examined at all.
const rankState = 6

func dataErrRank(e *smtperr.Error) int {
	switch e {
	case nil:
		return 0
	case errNoBuffer:
		return 1
	case errDataLineLong:
		return 2
	case errTooBig:
		return 3
	case errNULData:
		return 4
	case errBareLFData:
		return 5
	}
	return rankState
}

// checkText notes a CR or NUL in content known to hold no line ending.
func (s *Session) checkText(b []byte) {
	if bytes.IndexByte(b, '\r') >= 0 {
		s.noteDataErr(errBareLFData)
	}
	if bytes.IndexByte(b, 0) >= 0 {
		s.noteDataErr(errNULData)
	}
}

// countBody counts n content octets towards MaxMessageSize.
func (s *Session) countBody(n int) {
	s.bodySize += int64(n)
	if s.bodySize > s.cfg.MaxMessageSize {
		s.noteDataErr(errTooBig)
		s.dropBody()
	}
}

// appendBody counts b and keeps it, unless the message is already refused
// or the servers' content budget has no room for it (the message is then
// refused with 452 at its end).
func (s *Session) appendBody(b []byte) {
	s.countBody(len(b))
	if s.dataErr != nil {
		return // refused anyway: keep nothing more
	}
	if need := int64(len(s.body) + len(b)); need > s.reserved {
		// Steps double from 4 KiB up to budgetStep: a small message
		// holds little, a large one costs an atomic add per 64 KiB.
		step := max(need-s.reserved, min(max(s.reserved, 4<<10), budgetStep))
		if !s.cfg.budget.reserve(step) {
			s.noteDataErr(errNoBuffer)
			s.dropBody()
			return
		}
		s.reserved += step
	}
	s.body = append(s.body, b...)
}

// dropBody discards the content kept so far and gives its budget back.
func (s *Session) dropBody() {
	s.body = nil
	s.cfg.budget.release(s.reserved)
	s.reserved = 0
}

// endData finishes a DATA phase after the terminating dot.
func (s *Session) endData(out []byte) ([]byte, Action) {
	if s.dataErr != nil {
		e := s.dataErr
		s.resetTxn()
		s.phase = PhaseCommand
		return s.fail(out, e)
	}
	return s.commit(out)
}

func (s *Session) commit(out []byte) ([]byte, Action) {
	env, body := s.env, s.body
	s.env, s.body = nil, nil
	s.committing, s.reserved = s.reserved, 0 // given back by Resume or Abort
	s.phase = PhasePending
	s.b.Data(env, body, s.notify)
	return out, ActPending
}

func (s *Session) bdat(arg []byte, out []byte) ([]byte, Action) {
	sz, last, ok := parseBDAT(arg)
	if !ok {
		// The chunk size is unknown, so the stream cannot be
		// resynchronised: refuse and close.
		s.phase = PhaseClosed
		return errBDATSyntax.AppendReply(out), ActClose
	}
	s.phase = PhaseBDAT
	s.bdatLeft = sz
	s.bdatLast = last
	switch {
	case s.env == nil:
		s.noteDataErr(errNeedMail)
	case len(s.env.Rcpts) == 0 && !s.rcptTried:
		s.noteDataErr(errNeedRcpt) // as DATA: 503, not 554
	case len(s.env.Rcpts) == 0:
		s.noteDataErr(errNoValidRcpt)
	case !s.env.Chunked:
		s.env.Chunked = true
		s.body = make([]byte, 0, bodyCap(max(s.env.Size, sz)))
		s.bodySize = 0
	}
	if sz == 0 {
		out, act := s.endBDAT(out)
		if !last && act == ActNone {
			// An empty chunk that is not the last moves no mail.
			return s.junk(out)
		}
		return out, act
	}
	return out, ActNone
}

func parseBDAT(arg []byte) (size int64, last, ok bool) {
	f := bytes.Fields(arg)
	if len(f) == 0 || len(f) > 2 || len(f[0]) > 18 {
		return 0, false, false
	}
	for _, c := range f[0] {
		if c < '0' || c > '9' {
			return 0, false, false
		}
	}
	n, err := strconv.ParseInt(string(f[0]), 10, 64)
	if err != nil {
		return 0, false, false
	}
	if len(f) == 2 {
		if !eqVerb(f[1], "LAST") {
			return 0, false, false
		}
		last = true
	}
	return n, last, true
}

// readBDAT consumes up to bdatLeft raw octets of chunk content, checking
// line endings and lengths across chunk boundaries.
func (s *Session) readBDAT(p []byte) int {
	if int64(len(p)) > s.bdatLeft {
		p = p[:s.bdatLeft]
	}
	s.bdatLeft -= int64(len(p))
	s.DataBytes += int64(len(p))
	if dataErrRank(s.dataErr) >= rankState {
		return len(p)
	}
	if bytes.IndexByte(p, 0) >= 0 {
		s.noteDataErr(errNULData) // no BINARYMIME: as in DATA
	}
	// Every LF must follow a CR, every CR must precede an LF.
	i := 0
	if s.prevCR && len(p) > 0 {
		s.prevCR = false
		if p[0] == '\n' {
			s.endBDATLine()
			i = 1
		} else {
			s.noteDataErr(errBareLFData)
		}
	}
	for i < len(p) {
		j := bytes.IndexAny(p[i:], "\r\n")
		if j < 0 {
			s.lineLen += len(p) - i
			break
		}
		s.lineLen += j
		i += j
		switch {
		case p[i] == '\n':
			s.noteDataErr(errBareLFData) // LF without CR
			i++
		case i+1 == len(p):
			s.prevCR = true // CR at the end of the chunk
			i++
		case p[i+1] != '\n':
			s.noteDataErr(errBareLFData) // CR without LF
			i++
		default:
			s.endBDATLine()
			i += 2
		}
	}
	if s.lineLen > maxTextLine {
		s.noteDataErr(errDataLineLong)
	}
	if s.env != nil && s.env.Chunked {
		s.appendBody(p)
	}
	return len(p)
}

func (s *Session) endBDATLine() {
	if s.lineLen+2 > maxTextLine {
		s.noteDataErr(errDataLineLong)
	}
	s.lineLen = 0
}

func (s *Session) endBDAT(out []byte) ([]byte, Action) {
	if !s.bdatLast {
		s.phase = PhaseCommand
		if s.dataErr != nil && (s.env == nil || len(s.env.Rcpts) == 0) {
			e := s.dataErr
			s.dataErr = nil
			return s.fail(out, e)
		}
		out = append(out, "250 2.0.0 "...)
		out = strconv.AppendInt(out, s.DataBytes, 10)
		out = append(out, " octets received\r\n"...)
		s.DataBytes = 0
		return out, ActNone
	}
	if s.prevCR {
		s.noteDataErr(errBareLFData)
	}
	if s.lineLen > 0 && s.lineLen+2 > maxTextLine {
		s.noteDataErr(errDataLineLong) // with the CRLF added below
	}
	if s.dataErr != nil {
		e := s.dataErr
		s.resetTxn()
		s.phase = PhaseCommand
		return s.fail(out, e)
	}
	if n := len(s.body); n < 2 || s.body[n-2] != '\r' || s.body[n-1] != '\n' {
		if n > 0 {
			s.body = append(s.body, '\r', '\n')
		}
	}
	return s.commit(out)
}

// cutPrefixFold removes prefix (ASCII, case-insensitive) and the optional
// spaces after it (a common deviation from RFC 5321 that real clients make).
func cutPrefixFold(b []byte, prefix string) ([]byte, bool) {
	if len(b) < len(prefix) || !strings.EqualFold(string(b[:len(prefix)]), prefix) {
		return nil, false
	}
	b = b[len(prefix):]
	for len(b) > 0 && b[0] == ' ' {
		b = b[1:]
	}
	return b, true
}

// splitPath splits "<path> params" into the text inside the brackets and
// the parameters. A '>' inside a quoted local part does not end the path.
func splitPath(b []byte) (path, params []byte, err *smtperr.Error) {
	if len(b) == 0 || b[0] != '<' {
		return nil, nil, errMailSyntax
	}
	inQuote := false
	for i := 1; i < len(b); i++ {
		c := b[i]
		switch {
		case inQuote && c == '\\':
			i++
		case c == '"':
			inQuote = !inQuote
		case !inQuote && c == '>':
			if i+1 > maxPath {
				return nil, nil, errPathTooLong
			}
			rest := b[i+1:]
			if len(rest) > 0 && rest[0] != ' ' {
				return nil, nil, errMailSyntax
			}
			return b[1:i], bytes.TrimLeft(rest, " "), nil
		}
	}
	return nil, nil, errMailSyntax
}

func nextParam(b []byte) (param, rest []byte) {
	i := bytes.IndexByte(b, ' ')
	if i < 0 {
		return b, nil
	}
	return b[:i], bytes.TrimLeft(b[i+1:], " ")
}

package engine

// Delivery status notifications (RFC 3464) that Hermod generates: bounces
// ("failed"), delay warnings ("delayed") and, when asked for with
// NOTIFY=SUCCESS, "delivered"/"relayed"/"expanded" reports.
//
// BuildDSN is a pure function of its input: the same DSNInput (Now and
// Msg.ID included) gives the same bytes, which makes it safe to build the
// notification again after a crash and easy to test.
//
// What it guarantees about the message it returns:
//   - every line ends in CRLF and is at most 998 octets (RFC 5322 §2.1.1):
//     long field values are folded at spaces (a word longer than a line is
//     split, which adds a space when the field is unfolded), and lines of
//     the returned original that are too long are split (header section) or
//     make the DSN fall back to returning the header section only (full
//     content, which must not be altered);
//   - the MIME boundary occurs nowhere in the content of any part;
//   - the explanation (part 1) is 7-bit (quoted-printable when it has
//     UTF-8); the report (part 2) is 7-bit unless it is the RFC 6533 global
//     form with UTF-8 in it; the returned original (part 3) is as 8-bit as
//     the original was. DSN.Body8Bit says whether BODY=8BITMIME is needed,
//     DSN.SMTPUTF8 whether the header section of the DSN itself (its To:
//     field, the original sender) needs SMTPUTF8.
//
// Failure: BuildDSN never panics on any body or reply text; it reports an
// error (wrapping ErrDSNInput) only for input the caller built wrongly (no
// message, no recipients, unknown action, a reporting MTA or sender that
// cannot be written into a header). A DSN that must not be sent (null
// sender, a DSN of ours, nobody asked for it) is ok=false with no error.

import (
	"bytes"
	"errors"
	"fmt"
	"mime/quotedprintable"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/hermod-mta/hermod/spool"
)

// DSN actions (RFC 3464 §2.3.3), for DSNRecipient.Action.
const (
	DSNFailed    = "failed"
	DSNDelayed   = "delayed"
	DSNDelivered = "delivered"
	DSNRelayed   = "relayed"
	DSNExpanded  = "expanded"
)

// DefaultDSNMaxReturn is the default DSNInput.MaxReturn: 64 KiB.
const DefaultDSNMaxReturn = 64 << 10

// ErrDSNInput is wrapped by the errors BuildDSN returns for input that
// cannot produce a notification.
var ErrDSNInput = errors.New("engine: invalid DSN input")

// DSNRecipient is what a DSN reports about one recipient.
type DSNRecipient struct {
	// Addr is the final recipient, as given in RCPT TO. It is reported as
	// "rfc822; addr", or "utf-8; addr" when it is not ASCII (RFC 6533).
	Addr string
	// ORcpt is the DSN ORCPT parameter as received, "addr-type;xtext"
	// (RFC 3461 §4.2, e.g. "rfc822;a+2Bb@example.org"); it is reported
	// xtext-decoded in Original-Recipient. A value without ";" is taken as
	// a plain address. Empty means: the ORcpt of the matching recipient of
	// DSNInput.Msg, if any.
	ORcpt string
	// Action is one of DSNFailed, DSNDelayed, DSNDelivered, DSNRelayed,
	// DSNExpanded.
	Action string
	// Status is the RFC 3463 enhanced status code, e.g. "5.1.1". When empty
	// or malformed it is derived from Diagnostic (its enhanced code, else
	// the class of its reply code as "5.0.0"/"4.0.0"/"2.0.0"), else from
	// Action (failed: 5.0.0, delayed: 4.0.0, the others: 2.0.0).
	Status string
	// RemoteMTA is the host name of the MX that gave the reply, e.g.
	// "mx.example.com" (reported as "dns; mx.example.com"; a value that
	// already has "type;" is used as it is). Optional.
	RemoteMTA string
	// Diagnostic is the remote reply, e.g. "550 5.1.1 user unknown"
	// (reported as "smtp; 550 5.1.1 user unknown"; the lines of a
	// multi-line reply are joined with spaces), or a local error text
	// without a reply code (reported as "X-Hermod; text"). A value that
	// already starts with "smtp;" or "x-…;" is used as it is. Optional.
	Diagnostic string
	// LastAttempt is when delivery was last attempted. Optional.
	LastAttempt time.Time
	// WillRetryUntil is when retrying stops; reported for "delayed" only.
	WillRetryUntil time.Time
}

// DSNInput is everything BuildDSN needs.
type DSNInput struct {
	// ReportingMTA is our host name (Reporting-MTA, From: MAILER-DAEMON@…,
	// Message-ID).
	ReportingMTA string
	// Msg is the original envelope: ID, From, Received, EnvID, Ret,
	// SMTPUTF8, Bounce, and Rcpts for the NOTIFY flags and ORCPT of each
	// reported recipient (matched by Addr, in order, exactly or else
	// without regard to case; an unmatched recipient counts as having given
	// no NOTIFY).
	Msg *spool.Message
	// Body is the original message as spooled (starting with our Received:
	// header).
	Body []byte
	// Rcpts are the recipients to report on. Those that did not ask for a
	// notification of their action are left out.
	Rcpts []DSNRecipient
	// Now is the time of the notification (Date:, Message-ID, boundary).
	// All dates are written in Now's location.
	Now time.Time
	// MaxReturn is the largest original, in octets, returned whole when
	// RET=FULL; a larger one is returned as its header section only.
	// 0 means DefaultDSNMaxReturn; negative means never return it whole.
	// The returned header section is cut, at a line boundary, after
	// max(MaxReturn, DefaultDSNMaxReturn) octets.
	MaxReturn int
}

// DSN is a notification ready to be queued: send Body from the null
// reverse-path (RFC 5321 §4.5.5) to Rcpt.
type DSN struct {
	// Rcpt is the envelope recipient: the original sender.
	Rcpt string
	// Body is the whole message, header section included, with CRLF line
	// ends.
	Body []byte
	// Body8Bit says Body has octets above 127 (in a part, or in the To:
	// field when SMTPUTF8 is set too): send it with BODY=8BITMIME.
	Body8Bit bool
	// SMTPUTF8 says Rcpt (and so the To: field) is not ASCII: send it with
	// SMTPUTF8.
	SMTPUTF8 bool
	// Reported are the indexes in DSNInput.Rcpts of the recipients the DSN
	// reports on, in order.
	Reported []int
}

// Envelope returns the spool envelope for queueing d: null sender, d.Rcpt
// as the one recipient, Bounce set (so that no DSN is ever generated about
// it), Body8Bit and SMTPUTF8 as d needs. ID, Received and Size are left for
// spool.Store.Commit to fill in.
func (d *DSN) Envelope() *spool.Message {
	return &spool.Message{
		From:     "",
		Rcpts:    []spool.Recipient{{Addr: d.Rcpt}},
		Body8Bit: d.Body8Bit,
		SMTPUTF8: d.SMTPUTF8,
		Bounce:   true,
	}
}

// DSNRecipientFor returns a DSNRecipient for the spooled recipient r with
// the given action: Addr, ORcpt, LastAttempt, and LastReply as Diagnostic.
// Status is left to be derived from the reply; RemoteMTA and
// WillRetryUntil are for the caller to add.
func DSNRecipientFor(r *spool.Recipient, action string) DSNRecipient {
	return DSNRecipient{Addr: r.Addr, ORcpt: r.ORcpt, Action: action, Diagnostic: r.LastReply, LastAttempt: r.LastAttempt}
}

// BuildDSN builds the notification for in.
//
// ok is false, with no error and no DSN, when none may be sent: the
// original has the null sender (never bounce a bounce), is itself a DSN of
// ours (Msg.Bounce), or no recipient asked for one. Which recipients ask
// (RFC 3461 §4.1): NOTIFY=NEVER never; "failed" with NOTIFY=FAILURE or no
// NOTIFY; "delayed" with NOTIFY=DELAY or no NOTIFY (the RFC's suggested
// default FAILURE,DELAY: whether and when delay warnings are sent at all is
// the scheduler's policy, not this function's); "delivered", "relayed" and
// "expanded" with NOTIFY=SUCCESS only.
//
// The message (RFC 3464, RFC 6522): From: "Mail Delivery System"
// <MAILER-DAEMON@ReportingMTA>, To: the sender, a Subject after the gravest
// action reported, Date: Now, Message-ID: <id.micros.dsn@ReportingMTA>,
// Auto-Submitted: auto-replied (RFC 3834), and a multipart/report of three
// parts: a text/plain explanation; the message/delivery-status report; the
// original's header section (text/rfc822-headers) or, when RET=FULL, a
// "failed" recipient is reported and the original fits in MaxReturn, the
// whole original (message/rfc822). When the original used SMTPUTF8 or an
// address is not ASCII, the RFC 6533 types are used instead
// (message/global-delivery-status, message/global-headers, message/global).
func BuildDSN(in DSNInput) (DSN, bool, error) {
	m := in.Msg
	if m == nil {
		return DSN{}, false, fmt.Errorf("%w: no message", ErrDSNInput)
	}
	if m.From == "" || m.Bounce {
		return DSN{}, false, nil
	}
	if err := dsnCheckInput(&in); err != nil {
		return DSN{}, false, err
	}
	b := dsnBuilder{in: &in, loc: in.Now.Location()}
	b.selectRcpts()
	if len(b.rcpts) == 0 {
		return DSN{}, false, nil
	}
	return b.build(), true, nil
}

// dsnCheckInput reports input BuildDSN cannot write a message from.
func dsnCheckInput(in *DSNInput) error {
	var errs []error
	if !dsnValidHost(in.ReportingMTA) {
		errs = append(errs, fmt.Errorf("%w: reporting MTA %q is not a host name", ErrDSNInput, in.ReportingMTA))
	}
	if f := in.Msg.From; len(f) > 900 || strings.ContainsFunc(f, func(r rune) bool {
		return r < 0x20 || r == 0x7f || r == '<' || r == '>' || r == utf8.RuneError
	}) {
		errs = append(errs, fmt.Errorf("%w: sender %q cannot be written in a To: field", ErrDSNInput, f))
	}
	if len(in.Rcpts) == 0 {
		errs = append(errs, fmt.Errorf("%w: no recipients", ErrDSNInput))
	}
	for i, r := range in.Rcpts {
		if r.Addr == "" {
			errs = append(errs, fmt.Errorf("%w: recipient %d has no address", ErrDSNInput, i))
		}
		if _, ok := dsnActionNotify(r.Action); !ok {
			errs = append(errs, fmt.Errorf("%w: recipient %d: unknown action %q", ErrDSNInput, i, r.Action))
		}
	}
	return errors.Join(errs...)
}

// dsnValidHost reports whether h can be written as a host name (or an
// address literal) in Reporting-MTA and a Message-ID.
func dsnValidHost(h string) bool {
	if h == "" || len(h) > 255 {
		return false
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case c == '.', c == '-', c == '_', c == '[', c == ']', c == ':':
		default:
			return false
		}
	}
	return true
}

// dsnActionNotify returns the NOTIFY flag that asks for action (0 for
// "failed" and "delayed", which are also sent when NOTIFY was not given).
func dsnActionNotify(action string) (flag uint8, ok bool) {
	switch action {
	case DSNFailed:
		return spool.NotifyFailure, true
	case DSNDelayed:
		return spool.NotifyDelay, true
	case DSNDelivered, DSNRelayed, DSNExpanded:
		return spool.NotifySuccess, true
	}
	return 0, false
}

// dsnWants reports whether a recipient with NOTIFY flags notify asked for a
// DSN of action.
func dsnWants(notify uint8, action string) bool {
	flag, _ := dsnActionNotify(action)
	switch {
	case notify&spool.NotifyNever != 0:
		return false
	case notify == 0:
		return flag != spool.NotifySuccess
	}
	return notify&flag != 0
}

// dsnRcpt is one reported recipient, resolved.
type dsnRcpt struct {
	r         *DSNRecipient
	orcptType string // "" when no ORCPT
	orcpt     string // decoded
	status    string
}

type dsnBuilder struct {
	in    *DSNInput
	loc   *time.Location
	rcpts []dsnRcpt
	idx   []int

	global                   bool // RFC 6533 types
	failed, delayed, success bool // actions reported
}

// selectRcpts keeps the recipients that asked for their action and
// resolves their ORCPT and status.
func (b *dsnBuilder) selectRcpts() {
	m := b.in.Msg
	used := make([]bool, len(m.Rcpts))
	find := func(addr string) *spool.Recipient {
		for pass := 0; pass < 2; pass++ {
			for i := range m.Rcpts {
				a := m.Rcpts[i].Addr
				if !used[i] && (a == addr || pass == 1 && strings.EqualFold(a, addr)) {
					used[i] = true
					return &m.Rcpts[i]
				}
			}
		}
		return nil
	}
	b.global = m.SMTPUTF8 || !dsnASCII(m.From)
	for i := range b.in.Rcpts {
		r := &b.in.Rcpts[i]
		var notify uint8
		orcpt := r.ORcpt
		if sr := find(r.Addr); sr != nil {
			notify = sr.Notify
			if orcpt == "" {
				orcpt = sr.ORcpt
			}
		}
		if !dsnWants(notify, r.Action) {
			continue
		}
		dr := dsnRcpt{r: r, status: dsnRcptStatus(r)}
		if orcpt != "" {
			dr.orcptType, dr.orcpt = dsnParseORcpt(orcpt)
		}
		if !dsnASCII(r.Addr) || !dsnASCII(dr.orcpt) {
			b.global = true
		}
		switch r.Action {
		case DSNFailed:
			b.failed = true
		case DSNDelayed:
			b.delayed = true
		default:
			b.success = true
		}
		b.rcpts = append(b.rcpts, dr)
		b.idx = append(b.idx, i)
	}
}

// build writes the message.
func (b *dsnBuilder) build() DSN {
	in, m := b.in, b.in.Msg
	host := in.ReportingMTA

	text, textQP := b.textPart()
	status := b.statusPart()
	orig, full := b.originalPart()

	var parts [3]struct{ head, body []byte }
	// Part 1: the explanation.
	h := append([]byte(nil), "Content-Description: Notification\r\n"...)
	if textQP {
		h = append(h, "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"...)
	} else {
		h = append(h, "Content-Type: text/plain; charset=us-ascii\r\n"...)
	}
	parts[0].head, parts[0].body = h, text
	// Part 2: the report.
	h = append([]byte(nil), "Content-Description: Delivery report\r\nContent-Type: "...)
	if b.global {
		h = append(h, "message/global-delivery-status\r\n"...)
	} else {
		h = append(h, "message/delivery-status\r\n"...)
	}
	h = dsnAppendCTE(h, status)
	parts[1].head, parts[1].body = h, status
	// Part 3: the original.
	what := "Undelivered Message"
	if !b.failed {
		what = "Message"
	}
	var ctype string
	switch {
	case full && b.global:
		ctype = "message/global"
	case full:
		ctype = "message/rfc822"
	case b.global:
		what += " Headers"
		ctype = "message/global-headers"
	default:
		what += " Headers"
		ctype = "text/rfc822-headers"
	}
	h = append([]byte(nil), "Content-Description: "+what+"\r\nContent-Type: "+ctype+"\r\n"...)
	h = dsnAppendCTE(h, orig)
	parts[2].head, parts[2].body = h, orig

	eight := !dsnASCIIBytes(status) || !dsnASCIIBytes(orig)
	boundary := b.boundary(text, status, orig)

	size := 1024 + len(text) + len(status) + len(orig)
	out := make([]byte, 0, size)
	out = append(out, "From: \"Mail Delivery System\" <MAILER-DAEMON@"+host+">\r\n"...)
	out = append(out, "To: <"+m.From+">\r\n"...)
	out = append(out, "Subject: "+b.subject()+"\r\n"...)
	out = append(out, "Date: "...)
	out = in.Now.AppendFormat(out, time.RFC1123Z)
	out = append(out, "\r\nMessage-ID: <"+m.ID.String()+"."...)
	out = strconv.AppendInt(out, in.Now.UnixMicro(), 10)
	out = append(out, ".dsn@"+host+">\r\n"...)
	out = append(out, "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type="...)
	if b.global {
		out = append(out, "global-"...)
	}
	out = append(out, "delivery-status;\r\n\tboundary=\""+boundary+"\"\r\nContent-Transfer-Encoding: "...)
	if eight {
		out = append(out, "8bit\r\n"...)
	} else {
		out = append(out, "7bit\r\n"...)
	}
	out = append(out, "\r\nThis is a MIME-encapsulated message.\r\n"...)
	for _, p := range parts {
		out = append(out, "\r\n--"+boundary+"\r\n"...)
		out = append(out, p.head...)
		out = append(out, "\r\n"...)
		out = append(out, p.body...)
	}
	out = append(out, "\r\n--"+boundary+"--\r\n"...)

	return DSN{Rcpt: m.From, Body: out, Body8Bit: eight || !dsnASCII(m.From), SMTPUTF8: !dsnASCII(m.From), Reported: b.idx}
}

// subject names the gravest action reported.
func (b *dsnBuilder) subject() string {
	switch {
	case b.failed:
		return "Undelivered Mail Returned to Sender"
	case b.delayed:
		return "Delayed Mail (still being retried)"
	}
	return "Successful Mail Delivery Report"
}

// boundary returns a boundary that occurs in none of the parts. It is
// derived from the queue id and a counter, so it is deterministic; the
// candidates all have the same length, so a content of n octets rules out
// at most n+1 of them and the loop ends.
func (b *dsnBuilder) boundary(parts ...[]byte) string {
	id := b.in.Msg.ID.String()
	for i := uint64(0); ; i++ {
		c := fmt.Sprintf("=_hermod_%s_%08x", id, i)
		clash := false
		for _, p := range parts {
			if bytes.Contains(p, []byte(c)) {
				clash = true
				break
			}
		}
		if !clash {
			return c
		}
	}
}

// date formats t for a DSN field in the notification's time zone.
func (b *dsnBuilder) date(t time.Time) string {
	return t.In(b.loc).Format(time.RFC1123Z)
}

// textPart returns the human-readable explanation and whether it had to
// be quoted-printable encoded (it has UTF-8).
func (b *dsnBuilder) textPart() ([]byte, bool) {
	in := b.in
	var t []byte
	para := func(s string) {
		t = dsnAppendFolded(t, "", "", s, 72)
		t = append(t, "\r\n"...)
	}
	para("This is the mail delivery system at " + in.ReportingMTA + ".")
	if b.failed {
		para("Your message could not be delivered to one or more of its recipients. " +
			"Delivery to them has failed permanently and will not be tried again.")
	}
	if b.delayed {
		para("Your message has not yet been delivered to one or more of its recipients. " +
			"Delivery is still being retried; you do not need to send it again. " +
			"You will be told if it cannot be delivered in the end.")
	}
	if b.success {
		para("Your message was delivered to the recipients listed below as delivered, " +
			"or passed on towards those listed as relayed.")
	}
	if _, full := b.returnFull(); full {
		para("The message is attached.")
	} else {
		para("The header section of the message is attached.")
	}
	for _, r := range b.rcpts {
		line := "<" + r.r.Addr + ">: " + dsnActionText(r.r.Action) + " (" + r.status + ")"
		if r.orcpt != "" && r.orcpt != r.r.Addr {
			line += ", originally addressed to <" + r.orcpt + ">"
		}
		t = dsnAppendFolded(t, "", "    ", dsnClean(line, true), 72)
		if d := dsnClean(r.r.Diagnostic, true); d != "" {
			if mta := dsnClean(r.r.RemoteMTA, true); mta != "" {
				d = mta + " said: " + d
			}
			t = dsnAppendFolded(t, "    ", "    ", d, 72)
		}
		if r.r.Action == DSNDelayed && !r.r.WillRetryUntil.IsZero() {
			t = dsnAppendFolded(t, "    ", "    ", "Will retry until "+b.date(r.r.WillRetryUntil), 72)
		}
		t = append(t, "\r\n"...)
	}
	line := "Queue id: " + in.Msg.ID.String()
	if !in.Msg.Received.IsZero() {
		line += ", received " + b.date(in.Msg.Received)
	}
	t = dsnAppendFolded(t, "", "", line, 72)
	if dsnASCIIBytes(t) {
		return t, false
	}
	var buf bytes.Buffer
	w := quotedprintable.NewWriter(&buf)
	_, _ = w.Write(t) // a bytes.Buffer does not fail
	_ = w.Close()
	if n := buf.Len(); n < 2 || !bytes.HasSuffix(buf.Bytes(), []byte("\r\n")) {
		buf.WriteString("\r\n")
	}
	return buf.Bytes(), true
}

func dsnActionText(a string) string {
	switch a {
	case DSNFailed:
		return "delivery failed"
	case DSNDelayed:
		return "delivery delayed"
	case DSNDelivered:
		return "delivered"
	case DSNRelayed:
		return "relayed to a system that does not report delivery"
	}
	return "delivered to a list or alias"
}

// statusPart returns the message/delivery-status content (RFC 3464 §2.1):
// the per-message fields, then one block of per-recipient fields for each
// recipient, each block ending in an empty line but the last.
func (b *dsnBuilder) statusPart() []byte {
	in, m := b.in, b.in.Msg
	g := b.global
	var s []byte
	field := func(name, value string) {
		s = dsnAppendFolded(s, name+": ", " ", dsnClean(value, g), 78)
	}
	field("Reporting-MTA", "dns; "+in.ReportingMTA)
	field("X-Hermod-Queue-ID", m.ID.String())
	if m.EnvID != "" {
		field("Original-Envelope-Id", m.EnvID)
	}
	if !m.Received.IsZero() {
		field("Arrival-Date", b.date(m.Received))
	}
	for _, r := range b.rcpts {
		s = append(s, "\r\n"...)
		if r.orcpt != "" {
			field("Original-Recipient", r.orcptType+"; "+r.orcpt)
		}
		field("Final-Recipient", dsnAddrType(r.r.Addr)+"; "+r.r.Addr)
		field("Action", r.r.Action)
		field("Status", r.status)
		if mta := dsnClean(r.r.RemoteMTA, g); mta != "" {
			if !dsnHasType(mta) {
				mta = "dns; " + mta
			}
			field("Remote-MTA", mta)
		}
		if d := dsnClean(r.r.Diagnostic, g); d != "" {
			field("Diagnostic-Code", dsnDiagnostic(d))
		}
		if !r.r.LastAttempt.IsZero() {
			field("Last-Attempt-Date", b.date(r.r.LastAttempt))
		}
		if r.r.Action == DSNDelayed && !r.r.WillRetryUntil.IsZero() {
			field("Will-Retry-Until", b.date(r.r.WillRetryUntil))
		}
	}
	return s
}

// returnFull returns the effective MaxReturn and whether the whole
// original is to be returned (before checking that it can be sent as it
// is).
func (b *dsnBuilder) returnFull() (limit int, full bool) {
	limit = b.in.MaxReturn
	if limit == 0 {
		limit = DefaultDSNMaxReturn
	}
	full = b.failed && strings.EqualFold(b.in.Msg.Ret, "FULL") && len(b.in.Body) <= limit
	return limit, full
}

// originalPart returns the original to return, and whether it is the
// whole message (else its header section).
func (b *dsnBuilder) originalPart() ([]byte, bool) {
	limit, full := b.returnFull()
	if full {
		if o, ok := dsnWholeOriginal(b.in.Body); ok {
			return o, true
		}
	}
	return dsnHeaderSection(b.in.Body, max(limit, DefaultDSNMaxReturn)), false
}

// dsnWholeOriginal returns src with every line ending (CRLF, LF, lone CR)
// made CRLF and a final CRLF added when missing; ok is false when src
// cannot go into a message/rfc822 part unchanged otherwise (a NUL octet or
// a line longer than 998 octets).
func dsnWholeOriginal(src []byte) ([]byte, bool) {
	if bytes.IndexByte(src, 0) >= 0 {
		return nil, false
	}
	dst := make([]byte, 0, len(src)+len(src)/32+2)
	for len(src) > 0 {
		line, rest := dsnCutLine(src)
		if len(line) > 998 {
			return nil, false
		}
		dst = append(dst, line...)
		dst = append(dst, '\r', '\n')
		src = rest
	}
	return dst, true
}

// dsnHeaderSection returns the header section of src (up to its first
// empty line), with CRLF line ends, NUL octets removed, lines longer than
// 998 octets split into continuation lines, cut at a line boundary once it
// exceeds limit octets.
func dsnHeaderSection(src []byte, limit int) []byte {
	var dst []byte
	for len(src) > 0 && len(dst) < limit {
		line, rest := dsnCutLine(src)
		if len(line) == 0 {
			break
		}
		src = rest
		if bytes.IndexByte(line, 0) >= 0 {
			line = bytes.ReplaceAll(line, []byte{0}, nil)
		}
		for room := 998; len(line) > room; room = 997 { // a continuation line starts with a tab
			k := room
			for j := 0; j < 3 && line[k]&0xc0 == 0x80; j++ { // keep UTF-8 sequences whole
				k--
			}
			dst = append(dst, line[:k]...)
			dst = append(dst, "\r\n\t"...)
			line = line[k:]
		}
		dst = append(dst, line...)
		dst = append(dst, '\r', '\n')
	}
	return dst
}

// dsnCutLine returns the first line of b without its line end (CRLF, LF
// or a lone CR) and what follows that line end.
func dsnCutLine(b []byte) (line, rest []byte) {
	i := bytes.IndexAny(b, "\r\n")
	if i < 0 {
		return b, nil
	}
	if b[i] == '\r' && i+1 < len(b) && b[i+1] == '\n' {
		return b[:i], b[i+2:]
	}
	return b[:i], b[i+1:]
}

// dsnAppendCTE appends the Content-Transfer-Encoding field for a part
// whose content is body.
func dsnAppendCTE(h, body []byte) []byte {
	if dsnASCIIBytes(body) {
		return append(h, "Content-Transfer-Encoding: 7bit\r\n"...)
	}
	return append(h, "Content-Transfer-Encoding: 8bit\r\n"...)
}

// dsnRcptStatus returns the enhanced status code to report for r.
func dsnRcptStatus(r *DSNRecipient) string {
	if dsnValidStatus(r.Status) {
		return r.Status
	}
	d := strings.TrimSpace(r.Diagnostic)
	if len(d) >= 3 && d[0] >= '2' && d[0] <= '5' && d[0] != '3' && dsnDigits(d[1:3]) {
		if len(d) > 4 && (d[3] == ' ' || d[3] == '-') {
			code := d[4:]
			if i := strings.IndexAny(code, " \t\r\n"); i >= 0 {
				code = code[:i]
			}
			if dsnValidStatus(code) && code[0] == d[0] {
				return code
			}
		}
		if len(d) == 3 || d[3] == ' ' || d[3] == '-' || d[3] == '\r' || d[3] == '\n' {
			return d[:1] + ".0.0"
		}
	}
	switch r.Action {
	case DSNFailed:
		return "5.0.0"
	case DSNDelayed:
		return "4.0.0"
	}
	return "2.0.0"
}

// dsnValidStatus reports whether s is an RFC 3463 status code:
// class "." subject "." detail, class 2, 4 or 5, subject and detail of one
// to three digits.
func dsnValidStatus(s string) bool {
	if len(s) < 5 || (s[0] != '2' && s[0] != '4' && s[0] != '5') || s[1] != '.' {
		return false
	}
	subj, detail, ok := strings.Cut(s[2:], ".")
	return ok && len(subj) >= 1 && len(subj) <= 3 && dsnDigits(subj) &&
		len(detail) >= 1 && len(detail) <= 3 && dsnDigits(detail)
}

func dsnDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// dsnDiagnostic returns the Diagnostic-Code value for the cleaned
// diagnostic d: "smtp; d" for an SMTP reply, d itself when it already has
// a diagnostic type, else "X-Hermod; d".
func dsnDiagnostic(d string) string {
	if len(d) >= 3 && d[0] >= '1' && d[0] <= '5' && dsnDigits(d[1:3]) && (len(d) == 3 || d[3] == ' ' || d[3] == '-') {
		return "smtp; " + d
	}
	if t, _, ok := strings.Cut(d, ";"); ok && (strings.EqualFold(t, "smtp") || len(t) > 2 && strings.EqualFold(t[:2], "x-") && dsnAtom(t)) {
		return d
	}
	return "X-Hermod; " + d
}

// dsnHasType reports whether v starts with "type;" (a DSN type such as
// "dns").
func dsnHasType(v string) bool {
	t, _, ok := strings.Cut(v, ";")
	return ok && dsnAtom(t)
}

// dsnAtom reports whether s is a non-empty run of letters, digits and
// hyphens.
func dsnAtom(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// dsnAddrType returns the address type to report addr with.
func dsnAddrType(addr string) string {
	if dsnASCII(addr) {
		return "rfc822"
	}
	return "utf-8"
}

// dsnParseORcpt splits an ORCPT parameter into its address type
// (lower-cased; "utf-8" when the address is not ASCII) and its decoded
// address. A value without "type;" is a plain address.
func dsnParseORcpt(v string) (typ, addr string) {
	t, rest, ok := strings.Cut(v, ";")
	if !ok || !dsnAtom(strings.TrimSpace(t)) {
		return dsnAddrType(v), v
	}
	typ = strings.ToLower(strings.TrimSpace(t))
	addr = dsnXtextDecode(strings.TrimSpace(rest), typ == "utf-8")
	if typ == "rfc822" && !dsnASCII(addr) {
		typ = "utf-8"
	}
	return typ, addr
}

// dsnXtextDecode decodes xtext (RFC 3461 §4: "+HH"), and with unitext also
// the "\x{HHHH}" escapes of utf-8-addr-xtext (RFC 6533 §3). Malformed
// escapes are left as they are.
func dsnXtextDecode(s string, unitext bool) string {
	if !strings.ContainsAny(s, `+\`) {
		return s
	}
	var sb strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '+' && i+2 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+3], 16, 8); err == nil {
				sb.WriteByte(byte(v))
				i += 2
				continue
			}
		}
		if unitext && c == '\\' && strings.HasPrefix(s[i:], `\x{`) {
			if j := strings.IndexByte(s[i:], '}'); j > 3 && j <= 9 {
				if v, err := strconv.ParseUint(s[i+3:i+j], 16, 32); err == nil && utf8.ValidRune(rune(v)) {
					sb.WriteRune(rune(v))
					i += j
					continue
				}
			}
		}
		sb.WriteByte(c)
	}
	return sb.String()
}

// dsnClean makes s fit for a header field or a line of text: line breaks,
// tabs and runs of spaces become one space, leading and trailing spaces
// go, control characters and invalid UTF-8 become '?', and unless utf8ok
// so does every non-ASCII character.
func dsnClean(s string, utf8ok bool) string {
	clean := true
	for i := 0; i < len(s) && clean; i++ {
		c := s[i]
		clean = c > ' ' && c < 0x7f || c == ' ' && i > 0 && i < len(s)-1 && s[i-1] != ' '
	}
	if clean {
		return s
	}
	var sb strings.Builder
	sb.Grow(len(s))
	space := false
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		i += n
		switch {
		case r == ' ' || r == '\t' || r == '\r' || r == '\n':
			space = sb.Len() > 0
			continue
		case r < 0x20 || r == 0x7f || r >= 0x80 && r < 0xa0 || r == utf8.RuneError && n == 1 || r >= 0x80 && !utf8ok:
			r = '?'
		case r == '\u2028' || r == '\u2029' || r == '\ufeff':
			r = '?'
		}
		if space {
			sb.WriteByte(' ')
			space = false
		}
		sb.WriteRune(r)
	}
	return sb.String()
}

// dsnAppendFolded appends first+value and CRLF, folded at spaces so that
// lines stay within soft octets where the words allow and never exceed 998
// octets (a longer word is split). Continuation lines start with cont.
// value must be dsnClean'ed (single spaces, no control characters).
func dsnAppendFolded(dst []byte, first, cont, value string, soft int) []byte {
	dst = append(dst, first...)
	n := len(first)
	start := n // where the content of the current line starts
	for value != "" {
		word, rest, _ := strings.Cut(value, " ")
		value = rest
		if word == "" {
			continue
		}
		if n > start {
			if n+1+len(word) > soft {
				dst = append(dst, "\r\n"...)
				dst = append(dst, cont...)
				n = len(cont)
				start = n
			} else {
				dst = append(dst, ' ')
				n++
			}
		}
		for n+len(word) > 998 {
			k := 998 - n
			for j := 0; j < 3 && k > 1 && word[k]&0xc0 == 0x80; j++ { // keep UTF-8 sequences whole
				k--
			}
			dst = append(dst, word[:k]...)
			dst = append(dst, "\r\n"...)
			if cont == "" {
				dst = append(dst, ' ') // a split word must not look like a new field or paragraph
			} else {
				dst = append(dst, cont...)
			}
			n = max(len(cont), 1)
			start = n
			word = word[k:]
		}
		dst = append(dst, word...)
		n += len(word)
	}
	return append(dst, "\r\n"...)
}

func dsnASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

func dsnASCIIBytes(b []byte) bool {
	for _, c := range b {
		if c >= 0x80 {
			return false
		}
	}
	return true
}

package netio

import (
	"bytes"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// fakeBackend accepts everything except a few marker addresses and records
// committed messages.
type fakeBackend struct {
	msgs    []fakeMsg
	reply   *smtperr.Error // reply to Data; default 250
	refuse  *smtperr.Error // Connect refusal
	pending func(*smtperr.Error)
}

type fakeMsg struct {
	env  Envelope
	body string
}

func (b *fakeBackend) Connect(*ConnInfo) *smtperr.Error { return b.refuse }
func (b *fakeBackend) Mail(env *Envelope) *smtperr.Error {
	if env.From == "blocked@bad.test" {
		return smtperr.New(550, "5.7.1", "sender blocked")
	}
	return nil
}
func (b *fakeBackend) Rcpt(env *Envelope, rcpt string) *smtperr.Error {
	if strings.HasSuffix(rcpt, "@elsewhere.test") {
		return smtperr.New(554, "5.7.1", "Relay access denied")
	}
	return nil
}
func (b *fakeBackend) Data(env *Envelope, body []byte, done func(*smtperr.Error)) {
	e := *env
	e.Rcpts = append([]string(nil), env.Rcpts...)
	b.msgs = append(b.msgs, fakeMsg{env: e, body: string(body)})
	r := b.reply
	if r == nil {
		r = smtperr.New(250, "2.0.0", "Ok: queued as %d", len(b.msgs))
	}
	done(r)
}

// runSession feeds input to a session in chunks of the given size (0: all
// at once), resuming pending commits as the transport would, and returns
// the replies split into lines and the final action.
func runSession(t testing.TB, cfg *ServerConfig, b *fakeBackend, input string, chunk int) (string, Action) {
	t.Helper()
	var got *smtperr.Error
	notified := false
	s := NewSession(cfg, b, ConnInfo{Remote: netip.MustParseAddrPort("192.0.2.1:5000")}, true, func(r *smtperr.Error) {
		got, notified = r, true
	})
	out, act := s.Greeting(nil)
	if act == ActClose {
		return string(out), act
	}
	var buf []byte
	in := []byte(input)
	for step := 0; step < 1_000_000; step++ {
		if len(in) > 0 {
			k := len(in)
			if chunk > 0 && chunk < k {
				k = chunk
			}
			buf = append(buf, in[:k]...)
			in = in[k:]
		}
		n, o, a := s.Feed(buf, out)
		out = o
		buf = buf[n:]
		switch a {
		case ActClose:
			return string(out), a
		case ActStartTLS:
			s.TLSStarted(nil)
			return string(out), a
		case ActPending:
			if !notified {
				t.Fatalf("pending without notification")
			}
			notified = false
			out, a = s.Resume(got, out)
			if a == ActClose {
				return string(out), a
			}
			continue
		}
		if len(in) == 0 && (len(buf) == 0 || n == 0) {
			break
		}
	}
	return string(out), ActNone
}

// codes returns the reply codes of a reply transcript (one per reply; the
// continuation lines of multi-line replies are skipped).
func codes(transcript string) string {
	var cs []string
	for _, l := range strings.Split(strings.TrimSuffix(transcript, "\r\n"), "\r\n") {
		if len(l) >= 4 && l[3] == ' ' {
			cs = append(cs, l[:3])
		}
	}
	return strings.Join(cs, " ")
}

func testConfig() *ServerConfig {
	c := ServerConfig{Hostname: "mx.test", MaxMessageSize: 2000, MaxRecipients: 100, MaxErrors: 5}
	c.EnsureDefaults()
	return &c
}

const (
	hello = "EHLO client.test\r\n"
	tx    = "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
)

func TestSessionReplies(t *testing.T) {
	long := strings.Repeat("x", 600)
	cases := []struct {
		name  string
		input string
		want  string // reply codes after the greeting
		act   Action
		msgs  int
	}{
		{"helo", "HELO client.test\r\n", "250", ActNone, 0},
		{"ehlo", hello, "250", ActNone, 0},
		{"ehlo no arg", "EHLO\r\n", "501", ActNone, 0},
		{"helo no arg", "HELO \r\n", "501", ActNone, 0},
		{"unknown", "FOO\r\n", "500", ActNone, 0},
		{"not implemented", "EXPN list\r\nTURN\r\n", "502 502", ActNone, 0},
		{"noop rset vrfy help", "NOOP\r\nRSET\r\nVRFY bob\r\nHELP\r\n", "250 250 252 214", ActNone, 0},
		{"vrfy no arg", "VRFY\r\n", "501", ActNone, 0},
		{"rset args", "RSET now\r\n", "501", ActNone, 0},
		{"quit", "QUIT\r\nNOOP\r\n", "221", ActClose, 0},
		{"lower case verbs", "ehlo c\r\nmail from:<a@x.test>\r\nrcpt to:<b@y.test>\r\ndata\r\nhi\r\n.\r\n", "250 250 250 354 250", ActNone, 1},
		{"mail before helo", "MAIL FROM:<a@x.test>\r\n", "503", ActNone, 0},
		{"rcpt before mail", hello + "RCPT TO:<b@y.test>\r\n", "250 503", ActNone, 0},
		{"data before mail", hello + "DATA\r\n", "250 503", ActNone, 0},
		{"data without rcpt", hello + "MAIL FROM:<a@x.test>\r\nDATA\r\n", "250 250 503", ActNone, 0},
		{"data all rcpts refused", hello + "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@elsewhere.test>\r\nDATA\r\n", "250 250 554 554", ActNone, 0},
		{"data with arg", hello + tx + "DATA x\r\n", "250 250 250 501", ActNone, 0},
		{"nested mail", hello + tx + "MAIL FROM:<c@x.test>\r\n", "250 250 250 503", ActNone, 0},
		{"mail syntax", hello + "MAIL <a@x.test>\r\nMAIL FROM:a@x.test\r\nMAIL FROM:<a@x.test\r\n", "250 501 501 501", ActNone, 0},
		{"mail space after colon", hello + "MAIL FROM: <a@x.test>\r\n", "250 250", ActNone, 0},
		{"null sender", hello + "MAIL FROM:<>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nx\r\n.\r\n", "250 250 250 354 250", ActNone, 1},
		{"null rcpt", hello + "MAIL FROM:<>\r\nRCPT TO:<>\r\n", "250 250 553", ActNone, 0},
		{"bad sender", hello + "MAIL FROM:<a@@x>\r\nMAIL FROM:<a..b@x.test>\r\nMAIL FROM:<a@-x.test>\r\n", "250 553 553 553", ActNone, 0},
		{"blocked sender", hello + "MAIL FROM:<blocked@bad.test>\r\n", "250 550", ActNone, 0},
		{"source route", hello + "MAIL FROM:<@r1.test,@r2.test:a@x.test>\r\n", "250 250", ActNone, 0},
		{"quoted local part", hello + "MAIL FROM:<\"a b>c\"@x.test>\r\nRCPT TO:<\"q@r\"@y.test>\r\n", "250 250 250", ActNone, 0},
		{"address literal sender", hello + "MAIL FROM:<a@[192.0.2.1]>\r\nRCPT TO:<b@[192.0.2.1]>\r\n", "250 250 553", ActNone, 0},
		{"postmaster goes to the backend", hello + "MAIL FROM:<a@x.test>\r\nRCPT TO:<Postmaster>\r\nRCPT TO:<postmaster>\r\nDATA\r\nx\r\n.\r\n", "250 250 250 250 354 250", ActNone, 1},
		{"relay denied", hello + "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@elsewhere.test>\r\n", "250 250 554", ActNone, 0},
		{"utf8 without smtputf8", hello + "MAIL FROM:<δ@x.test>\r\n", "250 553", ActNone, 0},
		{"utf8 with smtputf8", hello + "MAIL FROM:<δ@x.test> SMTPUTF8\r\nRCPT TO:<ü@bücher.test>\r\n", "250 250 250", ActNone, 0},
		{"utf8 rcpt without smtputf8", hello + "MAIL FROM:<a@x.test>\r\nRCPT TO:<ü@y.test>\r\n", "250 250 553", ActNone, 0},
		{"invalid utf8", hello + "MAIL FROM:<\xff@x.test> SMTPUTF8\r\n", "250 553", ActNone, 0},
		{"size ok", hello + "MAIL FROM:<a@x.test> SIZE=100 BODY=8BITMIME\r\n", "250 250", ActNone, 0},
		{"size too big", hello + "MAIL FROM:<a@x.test> SIZE=999999\r\n", "250 552", ActNone, 0},
		{"size malformed", hello + "MAIL FROM:<a@x.test> SIZE=abc\r\n", "250 501", ActNone, 0},
		{"body binarymime", hello + "MAIL FROM:<a@x.test> BODY=BINARYMIME\r\n", "250 555", ActNone, 0},
		{"unknown mail param", hello + "MAIL FROM:<a@x.test> FOO=BAR\r\n", "250 555", ActNone, 0},
		{"unknown rcpt param", hello + "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test> FOO=BAR\r\n", "250 250 555", ActNone, 0},
		{"local part past 64 (VERP)", hello + "MAIL FROM:<bounces+" + strings.Repeat("a", 100) + "=y.test@x.test>\r\n", "250 250", ActNone, 0},
		{"path too long", hello + "MAIL FROM:<a@" + strings.Repeat("b.", 130) + "test>\r\n", "250 501", ActNone, 0},
		{"command too long", "NOOP " + long + "\r\nNOOP\r\n", "500 250", ActNone, 0},
		{"line without LF too long", strings.Repeat("y", 3000) + "\r\nNOOP\r\n", "500 250", ActNone, 0},
		{"bare LF command", "NOOP\nNOOP\r\n", "500 250", ActNone, 0},
		{"bare CR command", "NO\rOP\r\nNOOP\r\n", "500 250", ActNone, 0},
		{"CR CR LF command", "NOOP\r\r\n", "500", ActNone, 0},
		{"NUL in command", "NO\x00OP\r\n", "500", ActNone, 0},
		{"too many errors", "A\r\nB\r\nC\r\nD\r\nE\r\nNOOP\r\n", "500 500 500 500 500 421", ActClose, 0},
		{"starttls", hello + "STARTTLS\r\n", "250 220", ActStartTLS, 0},
		{"starttls pipelined injection", hello + "STARTTLS\r\nRSET\r\n", "250 554", ActClose, 0},
		{"starttls with arg", hello + "STARTTLS now\r\n", "250 501", ActNone, 0},
		{"starttls in transaction", hello + tx + "STARTTLS\r\n", "250 250 250 503", ActNone, 0},
		{"data ok", hello + tx + "DATA\r\nSubject: x\r\n\r\nbody\r\n..dot\r\n.\r\n", "250 250 250 354 250", ActNone, 1},
		{"pipelined two messages", hello + tx + "DATA\r\na\r\n.\r\n" + tx + "DATA\r\nb\r\n.\r\nQUIT\r\n", "250 250 250 354 250 250 250 354 250 221", ActClose, 2},
		{"data bare LF", hello + tx + "DATA\r\nbad\nline\r\n.\r\nNOOP\r\n", "250 250 250 354 554 250", ActNone, 0},
		{"data bare CR", hello + tx + "DATA\r\nbad\rline\r\n.\r\nNOOP\r\n", "250 250 250 354 554 250", ActNone, 0},
		{"data CR CR LF", hello + tx + "DATA\r\nbad\r\r\n.\r\nNOOP\r\n", "250 250 250 354 554 250", ActNone, 0},
		{"smuggle LF dot LF", hello + tx + "DATA\r\nx\n.\nMAIL FROM:<e@x.test>\r\nRCPT TO:<v@y.test>\r\nDATA\r\nevil\r\n.\r\n", "250 250 250 354 554", ActClose, 0},
		{"smuggle LF dot CRLF", hello + tx + "DATA\r\nx\n.\r\nMAIL FROM:<e@x.test>\r\nRCPT TO:<v@y.test>\r\nDATA\r\nevil\r\n.\r\n", "250 250 250 354 554", ActClose, 0},
		{"smuggle CRLF dot LF", hello + tx + "DATA\r\nx\r\n.\nMAIL FROM:<e@x.test>\r\nRCPT TO:<v@y.test>\r\nDATA\r\nevil\r\n.\r\n", "250 250 250 354 554", ActClose, 0},
		{"smuggle CR dot CR", hello + tx + "DATA\r\nx\r.\rMAIL FROM:<e@x.test>\r\nRCPT TO:<v@y.test>\r\nDATA\r\nevil\r\n.\r\nNOOP\r\n", "250 250 250 354 554 250", ActNone, 0},
		{"data line too long", hello + tx + "DATA\r\n" + strings.Repeat("z", 1200) + "\r\n.\r\nNOOP\r\n", "250 250 250 354 554 250", ActNone, 0},
		{"data too big", hello + tx + "DATA\r\n" + strings.Repeat(strings.Repeat("z", 98)+"\r\n", 30) + ".\r\nNOOP\r\n", "250 250 250 354 552 250", ActNone, 0},
		{"backend tempfail", hello + tx + "DATA\r\nx\r\n.\r\n", "250 250 250 354 451", ActNone, 1},
		{"bdat", hello + tx + "BDAT 5\r\nhello" + "BDAT 8 LAST\r\n world\r\n", "250 250 250 250 250", ActNone, 1},
		{"bdat zero last", hello + tx + "BDAT 4\r\nab\r\nBDAT 0 LAST\r\n", "250 250 250 250 250", ActNone, 1},
		{"bdat without mail", hello + "BDAT 3 LAST\r\nabcNOOP\r\n", "250 503 250", ActNone, 0},
		{"bdat bare LF", hello + tx + "BDAT 5 LAST\r\na\nb\r\nNOOP\r\n", "250 250 250 554 250", ActNone, 0},
		{"bdat CR across chunks", hello + tx + "BDAT 2\r\na\rBDAT 2 LAST\r\n\nb", "250 250 250 250 250", ActNone, 1},
		{"bdat bare CR across chunks", hello + tx + "BDAT 2\r\na\rBDAT 2 LAST\r\nxb", "250 250 250 250 554", ActNone, 0},
		{"bdat syntax", hello + tx + "BDAT x\r\n", "250 250 250 501", ActClose, 0},
		{"bdat then data", hello + tx + "BDAT 3\r\nabcDATA\r\n", "250 250 250 250 503", ActNone, 0},
		{"bdat too big", hello + tx + "BDAT 3000 LAST\r\n" + strings.Repeat(strings.Repeat("q", 98)+"\r\n", 30) + "NOOP\r\n", "250 250 250 552 250", ActNone, 0},
		{"rset clears transaction", hello + tx + "RSET\r\nRCPT TO:<b@y.test>\r\n", "250 250 250 250 503", ActNone, 0},
		{"ehlo clears transaction", hello + tx + hello + "DATA\r\n", "250 250 250 250 503", ActNone, 0},
		{"duplicate rcpt", hello + tx + "RCPT TO:<b@y.test>\r\nDATA\r\nx\r\n.\r\n", "250 250 250 250 354 250", ActNone, 1},
		{"duplicate rcpt domain case", hello + tx + "RCPT TO:<b@Y.TEST>\r\nRCPT TO:<B@y.test>\r\nDATA\r\nx\r\n.\r\n", "250 250 250 250 250 354 250", ActNone, 1},
	}
	for _, c := range cases {
		for _, chunk := range []int{0, 1, 7} {
			if chunk > 0 && c.name == "starttls pipelined injection" {
				// Arriving later, the injected bytes reach the TLS
				// handshake instead (and fail it); see the server test.
				continue
			}
			t.Run(fmt.Sprintf("%s/chunk%d", c.name, chunk), func(t *testing.T) {
				b := &fakeBackend{}
				if c.name == "backend tempfail" {
					b.reply = smtperr.New(451, "4.3.0", "spool commit failed")
				}
				out, act := runSession(t, testConfig(), b, c.input, chunk)
				if !strings.HasPrefix(out, "220 mx.test ESMTP") {
					t.Fatalf("no greeting: %q", out)
				}
				out = out[strings.Index(out, "\r\n")+2:]
				if got := codes(out); got != c.want {
					t.Errorf("replies %q, want %q\n%s", got, c.want, out)
				}
				if act != c.act {
					t.Errorf("action %v, want %v", act, c.act)
				}
				if len(b.msgs) != c.msgs {
					t.Errorf("%d messages committed, want %d", len(b.msgs), c.msgs)
				}
			})
		}
	}
}

func TestSessionBodies(t *testing.T) {
	cases := []struct{ name, input, body string }{
		{"unstuff", hello + tx + "DATA\r\n..a\r\n.\r\n.\r\n", ".a\r\n"},
		{"two dots line", hello + tx + "DATA\r\n..\r\n.\r\n", ".\r\n"},
		{"empty", hello + tx + "DATA\r\n.\r\n", ""},
		{"bdat verbatim", hello + tx + "BDAT 6 LAST\r\n.a\r\n.\r", ""},
		{"bdat adds CRLF", hello + tx + "BDAT 3 LAST\r\nabc", "abc\r\n"},
		{"bdat dots kept", hello + tx + "BDAT 8 LAST\r\n..a\r\n.\r\n", "..a\r\n.\r\n"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := &fakeBackend{}
			runSession(t, testConfig(), b, c.input, 0)
			if c.body == "" && c.name == "bdat verbatim" {
				// ends with a bare CR: must be refused
				if len(b.msgs) != 0 {
					t.Fatalf("message with trailing bare CR accepted: %q", b.msgs[0].body)
				}
				return
			}
			if len(b.msgs) != 1 {
				t.Fatalf("%d messages", len(b.msgs))
			}
			if b.msgs[0].body != c.body {
				t.Errorf("body %q, want %q", b.msgs[0].body, c.body)
			}
		})
	}
}

func TestSessionEnvelope(t *testing.T) {
	b := &fakeBackend{}
	runSession(t, testConfig(), b, hello+"MAIL FROM:<δ@x.test> SIZE=10 BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@z.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nhi\r\n.\r\n", 0)
	if len(b.msgs) != 1 {
		t.Fatalf("%d messages", len(b.msgs))
	}
	e := b.msgs[0].env
	if e.From != "δ@x.test" || e.Size != 10 || !e.Body8Bit || !e.SMTPUTF8 || strings.Join(e.Rcpts, ",") != "b@y.test,c@z.test" {
		t.Fatalf("envelope %+v", e)
	}
	if e.Conn.Helo != "client.test" || !e.Conn.ESMTP {
		t.Fatalf("conn info %+v", e.Conn)
	}
}

func TestSessionDuplicateRecipients(t *testing.T) {
	b := &fakeBackend{}
	runSession(t, testConfig(), b, hello+tx+"RCPT TO:<b@Y.TEST>\r\nRCPT TO:<B@y.test>\r\nDATA\r\nx\r\n.\r\n", 0)
	if len(b.msgs) != 1 || strings.Join(b.msgs[0].env.Rcpts, ",") != "b@y.test,B@y.test" {
		t.Fatalf("recipients %+v: the domain's case must not make a duplicate, the local part's must", b.msgs)
	}
}

// TestSessionJunkCommands: commands that move no mail are free up to
// maxJunk; past it each counts as an error, so the session ends with 421
// after MaxErrors more instead of being held open forever.
func TestSessionJunkCommands(t *testing.T) {
	cfg := testConfig() // MaxErrors 5
	out, act := runSession(t, cfg, &fakeBackend{}, strings.Repeat("NOOP\r\n", maxJunk+10), 0)
	if act != ActClose || !strings.HasSuffix(out, "421 4.7.0 Error: too many errors, closing connection\r\n") {
		t.Fatalf("junk flood: action %v, ends %q", act, out[max(0, len(out)-80):])
	}
	if n := strings.Count(out, "250 2.0.0 Ok\r\n"); n != maxJunk+cfg.MaxErrors {
		t.Fatalf("%d NOOPs answered before 421, want %d", n, maxJunk+cfg.MaxErrors)
	}
	// An accepted message resets the count (as Postfix does).
	in := strings.Repeat("NOOP\r\n", maxJunk) + hello + tx + "DATA\r\nx\r\n.\r\n" + strings.Repeat("NOOP\r\n", maxJunk) + "QUIT\r\n"
	out, act = runSession(t, cfg, &fakeBackend{}, in, 0)
	if act != ActClose || !strings.HasSuffix(out, "221 2.0.0 Bye\r\n") || strings.Contains(out, "421") {
		t.Fatalf("a session within the limit was cut: %q", out[max(0, len(out)-80):])
	}
	// Repeated greetings and empty BDAT chunks are junk too.
	for _, junk := range []string{hello, "HELO client.test\r\n", "BDAT 0\r\n"} {
		pre := hello
		if junk == "BDAT 0\r\n" {
			pre = hello + tx
		}
		out, act = runSession(t, cfg, &fakeBackend{}, pre+strings.Repeat(junk, maxJunk+10), 0)
		if act != ActClose || !strings.HasSuffix(out, "421 4.7.0 Error: too many errors, closing connection\r\n") {
			t.Fatalf("%q flood: action %v, ends %q", junk, act, out[max(0, len(out)-80):])
		}
	}
}

// TestSessionErrorsForgiven: a long session whose messages each come
// with an RSET and a refused recipient (errors) is not cut off, since each
// accepted message forgives what came before it; errors without an
// accepted message in between still end the session.
func TestSessionErrorsForgiven(t *testing.T) {
	cfg := testConfig() // MaxErrors 5
	b := &fakeBackend{}
	var in strings.Builder
	in.WriteString(hello)
	const n = 3 * maxJunk
	for range n {
		in.WriteString("RSET\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<c@elsewhere.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nx\r\n.\r\n")
	}
	in.WriteString("QUIT\r\n")
	out, act := runSession(t, cfg, b, in.String(), 0)
	if act != ActClose || !strings.HasSuffix(out, "221 2.0.0 Bye\r\n") || len(b.msgs) != n {
		t.Fatalf("%d of %d messages accepted, ends %q", len(b.msgs), n, out[max(0, len(out)-80):])
	}
	out, act = runSession(t, cfg, &fakeBackend{}, hello+strings.Repeat("RCPT TO:<c@elsewhere.test>\r\n", cfg.MaxErrors+1), 0)
	if act != ActClose || !strings.HasSuffix(out, "421 4.7.0 Error: too many errors, closing connection\r\n") {
		t.Fatalf("errors without mail: action %v, ends %q", act, out[max(0, len(out)-80):])
	}
}

// TestSessionRecipientOvershoot: recipients past MaxRecipients get 452
// without counting as errors, so that a long pipelined list still gets
// its first MaxRecipients through; past maxOvershoot of them each counts,
// and the session ends with 421 after MaxErrors more.
func TestSessionRecipientOvershoot(t *testing.T) {
	cfg := testConfig() // MaxRecipients 100, MaxErrors 5
	rcpts := func(n int) string {
		var b strings.Builder
		for i := range n {
			fmt.Fprintf(&b, "RCPT TO:<r%d@y.test>\r\n", i)
		}
		return b.String()
	}
	b := &fakeBackend{}
	in := hello + "MAIL FROM:<a@x.test>\r\n" + rcpts(cfg.MaxRecipients+maxOvershoot) + "DATA\r\nx\r\n.\r\nQUIT\r\n"
	out, act := runSession(t, cfg, b, in, 0)
	if act != ActClose || !strings.HasSuffix(out, "221 2.0.0 Bye\r\n") || len(b.msgs) != 1 || len(b.msgs[0].env.Rcpts) != cfg.MaxRecipients {
		t.Fatalf("within the overshoot: %d messages, ends %q", len(b.msgs), out[max(0, len(out)-80):])
	}
	in = hello + "MAIL FROM:<a@x.test>\r\n" + rcpts(cfg.MaxRecipients+maxOvershoot+cfg.MaxErrors+10)
	out, act = runSession(t, cfg, &fakeBackend{}, in, 0)
	if act != ActClose || !strings.HasSuffix(out, "421 4.7.0 Error: too many errors, closing connection\r\n") {
		t.Fatalf("past the overshoot: action %v, ends %q", act, out[max(0, len(out)-80):])
	}
	if n := strings.Count(out, "452 4.5.3"); n != maxOvershoot+cfg.MaxErrors {
		t.Fatalf("%d surplus recipients answered before 421, want %d", n, maxOvershoot+cfg.MaxErrors)
	}
}

func TestSessionMaxRecipients(t *testing.T) {
	var in strings.Builder
	in.WriteString(hello + "MAIL FROM:<a@x.test>\r\n")
	for i := 0; i < 101; i++ {
		fmt.Fprintf(&in, "RCPT TO:<r%d@y.test>\r\n", i)
	}
	b := &fakeBackend{}
	out, _ := runSession(t, testConfig(), b, in.String(), 0)
	if !strings.HasSuffix(out, "452 4.5.3 Error: too many recipients\r\n") {
		t.Fatalf("101st recipient not refused with 452: ...%q", out[len(out)-80:])
	}
}

func TestSessionEHLOAdvertises(t *testing.T) {
	out, _ := runSession(t, testConfig(), &fakeBackend{}, hello, 0)
	for _, ext := range []string{"PIPELINING", "SIZE 2000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN", "STARTTLS"} {
		if !strings.Contains(out, "250-"+ext+"\r\n") && !strings.Contains(out, "250 "+ext+"\r\n") {
			t.Errorf("EHLO reply lacks %s:\n%s", ext, out)
		}
	}
	// After TLS, STARTTLS is no longer offered and EHLO is required again.
	b := &fakeBackend{}
	s := NewSession(testConfig(), b, ConnInfo{}, true, func(*smtperr.Error) {})
	s.TLSStarted(nil)
	_, out2, _ := s.Feed([]byte("MAIL FROM:<a@x.test>\r\n"+hello), nil)
	if codes(string(out2)) != "503 250" || bytes.Contains(out2, []byte("STARTTLS")) {
		t.Fatalf("after TLS: %q", out2)
	}
}

func TestSessionConnectRefused(t *testing.T) {
	b := &fakeBackend{refuse: smtperr.New(421, "4.7.0", "too many connections")}
	out, act := runSession(t, testConfig(), b, hello, 0)
	if out != "421 4.7.0 too many connections\r\n" || act != ActClose {
		t.Fatalf("got %q %v", out, act)
	}
}

func TestParseMailbox(t *testing.T) {
	cases := []struct {
		in   string
		mail bool
		want string
		kind mbKind
	}{
		{"a@x.test", true, "a@x.test", mbOK},
		{"", true, "", mbNull},
		{"A.B+c@Sub.X-Y.test", false, "A.B+c@Sub.X-Y.test", mbOK},
		{"@r.test:a@x.test", false, "a@x.test", mbOK},
		{"@r.test,a@x.test", false, "", mbBad},
		{"a@x..test", false, "", mbBad},
		{".a@x.test", false, "", mbBad},
		{"a.@x.test", false, "", mbBad},
		{"a b@x.test", false, "", mbBad},
		{"a@x_y.test", false, "", mbBad},
		{"a@", false, "", mbBad},
		{"@x.test", false, "", mbBad},
		{"a", false, "", mbBad},
		{"postmaster", false, "postmaster", mbPostmaster},
		{"postmaster", true, "", mbBad},
		{`"a\"b"@x.test`, false, `"a\"b"@x.test`, mbOK},
		{`"a"b"@x.test`, false, "", mbBad},
		{"a@[192.0.2.1]", false, "a@[192.0.2.1]", mbLiteral},
		{"a@[IPv6:2001:db8::1]", true, "a@[IPv6:2001:db8::1]", mbOK},
		{"a@[300.1.1.1]", false, "", mbBad},
		{"ü@x.test", false, "ü@x.test", mbUTF8},
		{"a@bücher.test", false, "a@bücher.test", mbUTF8},
	}
	for _, c := range cases {
		got, kind := parseMailbox([]byte(c.in), c.mail)
		if got != c.want || kind != c.kind {
			t.Errorf("parseMailbox(%q, %v) = %q, %v; want %q, %v", c.in, c.mail, got, kind, c.want, c.kind)
		}
	}
}

func BenchmarkSessionTransaction(b *testing.B) {
	cfg := testConfig()
	cfg.MaxMessageSize = 1 << 20
	body := strings.Repeat(strings.Repeat("b", 78)+"\r\n", 13) // ~1 KiB
	txn := []byte("MAIL FROM:<sender@x.test>\r\nRCPT TO:<rcpt@y.test>\r\nDATA\r\n" + body + ".\r\n")
	be := &benchBackend{}
	s := NewSession(cfg, be, ConnInfo{}, false, func(*smtperr.Error) {})
	out, _ := s.Greeting(nil)
	_, out, _ = s.Feed([]byte(hello), out[:0])
	b.ReportAllocs()
	b.SetBytes(int64(len(txn)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		n, o, act := s.Feed(txn, out[:0])
		if act != ActPending || n != len(txn) {
			b.Fatalf("act %v n %d: %q", act, n, o)
		}
		out, _ = s.Resume(replyOK, o[:0])
	}
}

type benchBackend struct{}

func (benchBackend) Connect(*ConnInfo) *smtperr.Error                      { return nil }
func (benchBackend) Mail(*Envelope) *smtperr.Error                         { return nil }
func (benchBackend) Rcpt(*Envelope, string) *smtperr.Error                 { return nil }
func (benchBackend) Data(_ *Envelope, _ []byte, done func(*smtperr.Error)) { done(replyOK) }

// TestBodyCapBounded checks that the body buffer reserved for a message is
// bounded whatever SIZE (or BDAT chunk size) the client declares: memory
// follows the data received, not the client's claims.
func TestBodyCapBounded(t *testing.T) {
	for _, tc := range []struct {
		declared int64
		want     int
	}{
		{0, 4096},
		{1024, 1024 + 512},
		{maxBodyPrealloc - 512, maxBodyPrealloc},
		{maxBodyPrealloc, maxBodyPrealloc},
		{1 << 20, maxBodyPrealloc},
		{1 << 40, maxBodyPrealloc},
	} {
		if got := bodyCap(tc.declared); got != tc.want {
			t.Errorf("bodyCap(%d) = %d, want %d", tc.declared, got, tc.want)
		}
	}
	cfg := testConfig()
	cfg.MaxMessageSize = 2 << 20
	s := NewSession(cfg, &fakeBackend{}, ConnInfo{}, false, func(*smtperr.Error) {})
	in := []byte(hello + "MAIL FROM:<a@example.test> SIZE=1000000\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
	var out []byte
	for len(in) > 0 {
		n, o, _ := s.Feed(in, out)
		out, in = o, in[n:]
		if n == 0 {
			break
		}
	}
	if !bytes.Contains(out, []byte("354")) {
		t.Fatalf("no 354: %q", out)
	}
	if c := cap(s.body); c > maxBodyPrealloc {
		t.Fatalf("DATA with SIZE=1000000 reserved %d bytes before any content", c)
	}
}

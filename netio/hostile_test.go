package netio

// Hostile-client tests: what an attacker or a broken peer sends, checked
// against RFC 5321, 3207, 2920, 3030, 6531, 1870, 6152 and 3463 and against
// the published SMTP smuggling and STARTTLS injection attacks. The
// session-level tests feed the pure state machine (whole, byte by byte and
// in odd chunks); the server-level tests drive the real gnet server and the
// TLS hand-off over loopback sockets.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// checkBody fails if a committed body could be read differently by another
// MTA: a bare CR or LF, a NUL, or a line that is the end-of-data marker.
func checkBody(t *testing.T, body string) {
	t.Helper()
	b := []byte(body)
	for i, c := range b {
		switch {
		case c == '\n' && (i == 0 || b[i-1] != '\r'):
			t.Errorf("committed body has a bare LF at %d: %q", i, body)
			return
		case c == '\r' && (i+1 == len(b) || b[i+1] != '\n'):
			t.Errorf("committed body has a bare CR at %d: %q", i, body)
			return
		case c == 0:
			t.Errorf("committed body has a NUL at %d: %q", i, body)
			return
		}
	}
}

// replyLineRE is one line of a server reply.
var replyLineRE = regexp.MustCompile(`^([2-5][0-5][0-9])([ -])(.*)$`)

// enhancedRE is an RFC 3463 enhanced status code at the start of a text.
var enhancedRE = regexp.MustCompile(`^([245])\.(\d{1,3})\.(\d{1,3}) `)

// checkReplies verifies the form of every reply in a transcript: CRLF
// lines, a three-digit code, continuation lines with the same code, and on
// every reply but the greeting, 354 and the EHLO/HELO reply an enhanced
// status code (RFC 2034 and 3463) of the same class as the reply.
func checkReplies(t *testing.T, transcript string) {
	t.Helper()
	if transcript == "" {
		return
	}
	if !strings.HasSuffix(transcript, "\r\n") {
		t.Errorf("transcript does not end with CRLF: %q", transcript)
		return
	}
	lines := strings.Split(strings.TrimSuffix(transcript, "\r\n"), "\r\n")
	first := true // the next line starts a reply
	code := ""
	for _, l := range lines {
		if strings.ContainsAny(l, "\r\n") {
			t.Errorf("bare CR or LF in reply line %q", l)
			continue
		}
		m := replyLineRE.FindStringSubmatch(l)
		if m == nil {
			t.Errorf("malformed reply line %q", l)
			continue
		}
		if !first && m[1] != code {
			t.Errorf("continuation line %q does not repeat code %s", l, code)
		}
		if first {
			code = m[1]
			text := m[3]
			noEnhanced := code == "220" && strings.Contains(text, "ESMTP") || code == "354" ||
				code == "250" && m[2] == "-" || // EHLO reply
				code == "250" && !strings.Contains(text, " ") // HELO reply: the host name
			if !noEnhanced {
				e := enhancedRE.FindStringSubmatch(text)
				if e == nil {
					t.Errorf("reply %q has no enhanced status code", l)
				} else if e[1] != code[:1] {
					t.Errorf("reply %q: enhanced code class %s differs from reply class %s", l, e[1], code[:1])
				}
			}
		}
		first = m[2] == " "
	}
}

// splitReplies returns the first line of each reply of a transcript.
func splitReplies(transcript string) []string {
	var replies []string
	start := true
	for _, l := range strings.SplitAfter(transcript, "\r\n") {
		if len(l) < 4 {
			continue
		}
		if start {
			replies = append(replies, l)
		}
		start = l[3] != '-'
	}
	return replies
}

// smugglers are the end-of-data look-alikes of the SMTP smuggling research
// (SEC Consult 2023; Postfix, Exim and Sendmail advisories) and its
// follow-ups: a receiver that takes any of them for <CRLF>.<CRLF> splits
// one message into two.
var smugglers = []struct{ name, sep string }{
	{"LF.LF", "\n.\n"},
	{"CR.CR", "\r.\r"},
	{"LF.CRLF", "\n.\r\n"},
	{"CRLF.LF", "\r\n.\n"},
	{"CR.CRLF", "\r.\r\n"},
	{"CRLF.CR", "\r\n.\r"},
	{"CRCRLF", "\r\r\n.\r\r\n"},
	{"CRLF.CRCRLF", "\r\n.\r\r\n"},
	{"LF.", "\n."},
	{"NUL.", "\r\n\x00.\r\n"},
	{".NUL", "\r\n.\x00\r\n"},
	{"NUL LF.LF", "\x00\n.\n"},
	{"CRLF.NUL CRLF", "\r\n.\x00\r\n\x00"},
	{"CR LF . LF CR", "\r\n.\n\r"},
}

// smuggled is what an attacker hides after the fake terminator: a second
// transaction from a forged sender.
const smuggled = "MAIL FROM:<ceo@forged.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nFrom: ceo@forged.test\r\n\r\nsmuggled\r\n"

// checkNoSmuggle checks the messages of one run: none from the forged
// sender, none to the victim, no body with a bare line ending or NUL.
func checkNoSmuggle(t *testing.T, msgs []fakeMsg) {
	t.Helper()
	for _, m := range msgs {
		if m.env.From == "ceo@forged.test" {
			t.Errorf("smuggled message committed: %+v %q", m.env, m.body)
		}
		for _, r := range m.env.Rcpts {
			if r == "victim@y.test" {
				t.Errorf("smuggled recipient committed: %+v", m.env)
			}
		}
		checkBody(t, m.body)
	}
}

// TestHostileSmugglingData sends every smuggling separator inside DATA,
// in one write, byte by byte and in odd chunks, with the rest of the
// session pipelined behind it. Nothing may be split into two messages and
// nothing with a bare CR, LF or NUL may be committed.
func TestHostileSmugglingData(t *testing.T) {
	for _, sm := range smugglers {
		for _, chunk := range []int{0, 1, 2, 5} {
			t.Run(fmt.Sprintf("%s/chunk%d", sm.name, chunk), func(t *testing.T) {
				b := &fakeBackend{}
				in := hello + tx + "DATA\r\nSubject: t\r\n\r\nhello" + sm.sep + smuggled + "\r\n.\r\nQUIT\r\n"
				out, _ := runSession(t, testConfig(), b, in, chunk)
				checkReplies(t, out)
				checkNoSmuggle(t, b.msgs)
				if len(b.msgs) > 0 {
					t.Errorf("%d message(s) committed from a smuggling attempt: %q", len(b.msgs), b.msgs[0].body)
				}
				if strings.Count(out, "354 ") > 1 {
					t.Errorf("a second DATA was started: %q", out)
				}
			})
		}
	}
}

// TestHostileSmugglingControl shows the checks above can fail: with a
// genuine <CRLF>.<CRLF> the "smuggled" transaction is the client's own
// pipelined second message and is committed.
func TestHostileSmugglingControl(t *testing.T) {
	b := &fakeBackend{}
	runSession(t, testConfig(), b, hello+tx+"DATA\r\nSubject: t\r\n\r\nhello\r\n.\r\n"+smuggled+"\r\n.\r\n", 1)
	if len(b.msgs) != 2 || b.msgs[1].env.From != "ceo@forged.test" {
		t.Fatalf("control: %d messages", len(b.msgs))
	}
}

// TestHostileSmugglingLockStep is the same attack by a client
// that talks lock-step up to DATA and then sends content, fake terminator
// and the smuggled transaction in one segment.
func TestHostileSmugglingLockStep(t *testing.T) {
	for _, sm := range smugglers {
		t.Run(sm.name, func(t *testing.T) {
			b := &fakeBackend{}
			s := NewSession(testConfig(), b, ConnInfo{Remote: netip.MustParseAddrPort("192.0.2.1:5000")}, false, func(*smtperr.Error) {})
			out, _ := s.Greeting(nil)
			for _, cmd := range []string{hello, "MAIL FROM:<a@x.test>\r\n", "RCPT TO:<b@y.test>\r\n", "DATA\r\n"} {
				n, o, act := s.Feed([]byte(cmd), out)
				out = o
				if n != len(cmd) || act != ActNone {
					t.Fatalf("%q: n=%d act=%v", cmd, n, act)
				}
			}
			payload := []byte("hello" + sm.sep + smuggled + "\r\n.\r\n")
			var buf []byte
			for i := 0; i < len(payload); i++ { // one TCP segment per octet
				buf = append(buf, payload[i])
				n, o, act := s.Feed(buf, out)
				out = o
				buf = buf[n:]
				if act == ActClose {
					break
				}
				if act == ActPending {
					t.Fatalf("a message was committed mid-stream at octet %d: %q", i, payload[:i+1])
				}
			}
			checkReplies(t, string(out))
			checkNoSmuggle(t, b.msgs)
			if len(b.msgs) != 0 {
				t.Errorf("committed %q", b.msgs[0].body)
			}
		})
	}
}

// TestHostileSmugglingBDAT puts the separators inside BDAT chunks (where
// no dot is special) and across chunk boundaries: content with bare line
// endings or NUL is refused; nothing after it is interpreted as commands
// except the next BDAT, whose size is known.
func TestHostileSmugglingBDAT(t *testing.T) {
	for _, sm := range smugglers {
		for _, chunk := range []int{0, 1, 3} {
			t.Run(fmt.Sprintf("%s/chunk%d", sm.name, chunk), func(t *testing.T) {
				content := "Subject: t\r\n\r\nhello" + sm.sep + smuggled
				// Split the content in two chunks in the middle of the separator.
				cut := strings.Index(content, sm.sep) + len(sm.sep)/2 + 1
				c1, c2 := content[:cut], content[cut:]
				in := hello + tx + fmt.Sprintf("BDAT %d\r\n%sBDAT %d LAST\r\n%s", len(c1), c1, len(c2), c2) + "NOOP\r\n"
				b := &fakeBackend{}
				out, _ := runSession(t, testConfig(), b, in, chunk)
				checkReplies(t, out)
				checkNoSmuggle(t, b.msgs)
				if len(b.msgs) != 0 {
					t.Errorf("committed %q", b.msgs[0].body)
				}
				if !strings.HasSuffix(out, "250 2.0.0 Ok\r\n") {
					t.Errorf("session out of step after the refused chunk: %q", out)
				}
			})
		}
	}
}

// TestHostileNULInData: RFC 5322 text and RFC 6152 8bit data exclude NUL
// (RFC 2045 §2.7, §2.8); only BINARYMIME, which Hermod does not offer,
// allows it. A NUL before a dot is a smuggling vector against receivers
// that strip NULs. Such content is refused, in DATA and in BDAT.
func TestHostileNULInData(t *testing.T) {
	cases := []struct{ name, in string }{
		{"data", hello + tx + "DATA\r\nSubject: t\r\n\r\na\x00b\r\n.\r\nNOOP\r\n"},
		{"data 8bitmime", hello + "MAIL FROM:<a@x.test> BODY=8BITMIME\r\nRCPT TO:<b@y.test>\r\nDATA\r\n\x00\r\n.\r\nNOOP\r\n"},
		{"bdat", hello + tx + "BDAT 4 LAST\r\na\x00\r\nNOOP\r\n"},
		{"bdat two chunks", hello + tx + "BDAT 2\r\nabBDAT 3 LAST\r\n\x00\r\nNOOP\r\n"},
	}
	for _, c := range cases {
		for _, chunk := range []int{0, 1} {
			t.Run(fmt.Sprintf("%s/chunk%d", c.name, chunk), func(t *testing.T) {
				b := &fakeBackend{}
				out, act := runSession(t, testConfig(), b, c.in, chunk)
				checkReplies(t, out)
				if len(b.msgs) != 0 {
					t.Fatalf("message with NUL committed: %q", b.msgs[0].body)
				}
				if act != ActNone || !strings.Contains(out, "554 5.6.0") || !strings.HasSuffix(out, "250 2.0.0 Ok\r\n") {
					t.Fatalf("want 554 5.6.0 and the session going on, got %v %q", act, out)
				}
			})
		}
	}
}

// TestHostileTooManyRecipients: a client that pipelines more recipients
// than max_recipients gets 452 4.5.3 for the excess (RFC 5321
// §4.5.3.1.10) and delivers the rest in this transaction. The 452 replies
// are flow control, not errors: counting them towards max_errors would
// drop the connection with 421 and lose the whole transaction, every time
// the client retries.
func TestHostileTooManyRecipients(t *testing.T) {
	cfg := testConfig() // 100 recipients, 5 errors
	var in strings.Builder
	in.WriteString(hello + "MAIL FROM:<a@x.test>\r\n")
	for i := 0; i < 130; i++ {
		fmt.Fprintf(&in, "RCPT TO:<r%d@y.test>\r\n", i)
	}
	in.WriteString("DATA\r\nhi\r\n.\r\nQUIT\r\n")
	b := &fakeBackend{}
	out, act := runSession(t, cfg, b, in.String(), 0)
	checkReplies(t, out)
	if n := strings.Count(out, "452 4.5.3"); n != 30 {
		t.Errorf("%d replies 452 4.5.3, want 30", n)
	}
	if strings.Contains(out, "421") || act != ActClose || !strings.HasSuffix(out, "221 2.0.0 Bye\r\n") {
		t.Fatalf("session dropped: %v ...%q", act, out[max(0, len(out)-200):])
	}
	if len(b.msgs) != 1 || len(b.msgs[0].env.Rcpts) != 100 {
		t.Fatalf("want one message to 100 recipients, got %d", len(b.msgs))
	}
}

// TestHostileReplyCodes checks the exact reply (code and enhanced code) of
// every error path a hostile or broken client can reach, and the form of
// every reply.
func TestHostileReplyCodes(t *testing.T) {
	cases := []struct {
		name, in string
		want     []string // prefixes of the replies after the greeting, in order
	}{
		{"lower case", "ehlo c\r\nmail from:<a@x.test>\r\nrcpt to:<b@y.test>\r\ndata\r\nx\r\n.\r\nquit\r\n",
			[]string{"250-mx.test", "250 2.1.0", "250 2.1.5", "354 ", "250 2.0.0", "221 2.0.0"}},
		{"mixed case", "EhLo c\r\nMaIl FrOm:<a@x.test>\r\nrCpT tO:<b@y.test>\r\n", []string{"250-", "250 2.1.0", "250 2.1.5"}},
		{"helo after ehlo", hello + tx + "HELO c\r\nDATA\r\n", []string{"250-", "250 2.1.0", "250 2.1.5", "250 mx.test", "503 5.5.1"}},
		{"ehlo twice", hello + hello, []string{"250-", "250-"}},
		{"null sender", hello + "MAIL FROM:<>\r\n", []string{"250-", "250 2.1.0"}},
		{"size zero", hello + "MAIL FROM:<> SIZE=0\r\n", []string{"250-", "250 2.1.0"}},
		{"size at limit", hello + "MAIL FROM:<a@x.test> SIZE=2000\r\n", []string{"250-", "250 2.1.0"}},
		{"size over", hello + "MAIL FROM:<a@x.test> SIZE=2001\r\n", []string{"250-", "552 5.3.4"}},
		{"size 20 digits", hello + "MAIL FROM:<a@x.test> SIZE=99999999999999999999\r\n", []string{"250-", "552 5.3.4"}},
		{"size negative", hello + "MAIL FROM:<a@x.test> SIZE=-1\r\n", []string{"250-", "501 5.5.4"}},
		{"size plus sign", hello + "MAIL FROM:<a@x.test> SIZE=+100\r\n", []string{"250-", "501 5.5.4"}},
		{"size 21 digits", hello + "MAIL FROM:<a@x.test> SIZE=100000000000000000000\r\n", []string{"250-", "501 5.5.4"}},
		{"size empty", hello + "MAIL FROM:<a@x.test> SIZE=\r\n", []string{"250-", "501 5.5.4"}},
		{"very long params", hello + "MAIL FROM:<a@x.test> " + strings.Repeat("X-P=1 ", 200) + "\r\nNOOP\r\n", []string{"250-", "500 5.5.2", "250 2.0.0"}},
		{"mail twice", hello + tx + "MAIL FROM:<a@x.test>\r\n", []string{"250-", "250", "250", "503 5.5.1"}},
		{"rcpt no mail", hello + "RCPT TO:<a@y.test>\r\n", []string{"250-", "503 5.5.1"}},
		{"data no rcpt", hello + "MAIL FROM:<a@x.test>\r\nDATA\r\n", []string{"250-", "250", "503 5.5.1"}},
		{"bdat no rcpt", hello + "MAIL FROM:<a@x.test>\r\nBDAT 1 LAST\r\nxNOOP\r\n", []string{"250-", "250", "503 5.5.1", "250 2.0.0"}},
		{"bdat refused rcpts", hello + "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@elsewhere.test>\r\nBDAT 1 LAST\r\nx", []string{"250-", "250", "554 5.7.1", "554 5.5.1"}},
		// RFC 2920 §3.1: DATA ends a group; after failed RCPTs the client
		// sees the DATA refusal before sending content.
		{"pipelined data after failed rcpts", hello + "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@elsewhere.test>\r\nRCPT TO:<c@elsewhere.test>\r\nDATA\r\nNOOP\r\n",
			[]string{"250-", "250 2.1.0", "554 5.7.1", "554 5.7.1", "554 5.5.1", "250 2.0.0"}},
		{"bdat 0 last", hello + tx + "BDAT 0 LAST\r\n", []string{"250-", "250", "250", "250 2.0.0 Ok: queued"}},
		{"bdat 0 then last", hello + tx + "BDAT 0\r\nBDAT 3 LAST\r\nab\n", []string{"250-", "250", "250", "250 2.0.0 0 octets", "554 5.6.0"}},
		{"bdat size 19 digits", hello + tx + "BDAT 9999999999999999999 LAST\r\n", []string{"250-", "250", "250", "501 5.5.4"}},
		{"bdat negative", hello + tx + "BDAT -1\r\n", []string{"250-", "250", "250", "501 5.5.4"}},
		{"bdat no size", hello + tx + "BDAT\r\n", []string{"250-", "250", "250", "501 5.5.4"}},
		{"rset", hello + tx + "RSET\r\nDATA\r\n", []string{"250-", "250", "250", "250 2.0.0", "503 5.5.1"}},
		{"noop with arg", "NOOP hello\r\n", []string{"250 2.0.0"}},
		{"vrfy", "VRFY root\r\n", []string{"252 2."}},
		{"expn", "EXPN staff\r\n", []string{"502 5.5.1"}},
		{"help", "HELP\r\nHELP MAIL\r\n", []string{"214 2.0.0", "214 2.0.0"}},
		{"quit with pipelined garbage", "QUIT\r\nMAIL FROM:<a@x.test>\r\n", []string{"221 2.0.0"}},
		{"auth not offered", hello + "AUTH PLAIN AGFAYgBj\r\n", []string{"250-", "502 5.5.1"}},
		{"empty line", "\r\nNOOP\r\n", []string{"500 5.5.2", "250"}},
		{"space only", " \r\n", []string{"500 5.5.2"}},
		{"verb with tab", "NOOP\t\r\n", []string{"500 5.5.2"}},
		{"http", "GET / HTTP/1.1\r\nHost: x\r\n\r\n", []string{"500 5.5.2", "500 5.5.2", "500 5.5.2"}},
		{"rcpt address literal", hello + "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@[127.0.0.1]>\r\n", []string{"250-", "250", "553 5.1.3"}},
		{"rcpt trailing dot", hello + "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test.>\r\n", []string{"250-", "250", "553 5.1.3"}},
		{"rcpt no brackets", hello + "MAIL FROM:<a@x.test>\r\nRCPT TO:b@y.test\r\n", []string{"250-", "250", "501 5.5.4"}},
		{"rcpt space inside", hello + "MAIL FROM:<a@x.test>\r\nRCPT TO:< b@y.test>\r\n", []string{"250-", "250", "553 5.1.3"}},
		{"rcpt space after colon", hello + "MAIL FROM:<a@x.test>\r\nRCPT TO: <b@y.test>\r\n", []string{"250-", "250", "250 2.1.5"}},
		{"smtputf8 rcpt", hello + "MAIL FROM:<a@x.test> SMTPUTF8\r\nRCPT TO:<пример@испытание.test>\r\n", []string{"250-", "250 2.1.0", "250 2.1.5"}},
		{"invalid idn", hello + "MAIL FROM:<a@x.test> SMTPUTF8\r\nRCPT TO:<b@a\u200db.test>\r\nRCPT TO:<b@\u0300ab.test>\r\n", []string{"250-", "250", "553 5.1.3", "553 5.1.3"}},
		{"smtputf8 with value", hello + "MAIL FROM:<a@x.test> SMTPUTF8=yes\r\n", []string{"250-", "501 5.5.4"}},
		{"utf8 without smtputf8", hello + "MAIL FROM:<a@x.test>\r\nRCPT TO:<пример@y.test>\r\n", []string{"250-", "250", "553 5.6.7"}},
		{"body 7bit", hello + "MAIL FROM:<a@x.test> BODY=7BIT\r\n", []string{"250-", "250 2.1.0"}},
		{"body binarymime", hello + "MAIL FROM:<a@x.test> BODY=BINARYMIME\r\n", []string{"250-", "555 5.5.4"}},
	}
	for _, c := range cases {
		for _, chunk := range []int{0, 1} {
			t.Run(fmt.Sprintf("%s/chunk%d", c.name, chunk), func(t *testing.T) {
				b := &fakeBackend{}
				out, _ := runSession(t, testConfig(), b, c.in, chunk)
				checkReplies(t, out)
				out = out[strings.Index(out, "\r\n")+2:] // greeting
				replies := splitReplies(out)
				if len(replies) != len(c.want) {
					t.Fatalf("%d replies, want %d:\n%s", len(replies), len(c.want), out)
				}
				for i, w := range c.want {
					if !strings.HasPrefix(replies[i], w) {
						t.Errorf("reply %d is %q, want %q…", i, replies[i], w)
					}
				}
			})
		}
	}
}

// dialFrom connects from a given loopback source address.
func dialFrom(t *testing.T, src, addr string) *dialog {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &dialog{t: t, c: c, r: bufio.NewReader(c), to: 10 * time.Second}
}

// dribble writes s one octet every gap until stop is closed or a write
// fails, starting over when s is exhausted.
func dribble(c net.Conn, s string, gap time.Duration, stop <-chan struct{}) {
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		case <-time.After(gap):
		}
		if _, err := c.Write([]byte{s[i%len(s)]}); err != nil {
			return
		}
	}
}

// expectTimeoutWhileDribbling reads until the server's 421 4.4.2 while a
// goroutine keeps sending octets, and fails if it does not come in time.
func expectTimeoutWhileDribbling(t *testing.T, c net.Conn, r *bufio.Reader, s string, within time.Duration) {
	t.Helper()
	stop := make(chan struct{})
	defer close(stop)
	go dribble(c, s, 200*time.Millisecond, stop)
	_ = c.SetReadDeadline(time.Now().Add(within))
	start := time.Now()
	line, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "421 4.4.2") {
		t.Fatalf("after %v of slow input: %q %v (want 421 4.4.2 within %v)", time.Since(start).Round(time.Millisecond), line, err, within)
	}
}

// TestHostileSlowloris: a client that never finishes a command line keeps
// nothing open past command_timeout, however often it sends an octet —
// also once the line is over-long and being discarded. command_timeout
// is the time allowed between complete commands (RFC 5321 §4.5.3.2.7).
func TestHostileSlowloris(t *testing.T) {
	cfg := ServerConfig{CommandTimeout: time.Second, DataTimeout: 2 * time.Second}
	_, addr := startServer(t, cfg, &asyncBackend{}, nil)
	t.Run("partial command", func(t *testing.T) {
		t.Parallel()
		d := dial(t, addr)
		d.expect("220")
		d.send("EHLO c\r\n")
		d.expect("250")
		expectTimeoutWhileDribbling(t, d.c, d.r, "NOOP NOOP NOOP", 6*time.Second)
	})
	t.Run("over-long line", func(t *testing.T) {
		t.Parallel()
		d := dial(t, addr)
		d.expect("220")
		d.send(strings.Repeat("A", 3000)) // discarded: the session waits for its LF
		expectTimeoutWhileDribbling(t, d.c, d.r, "A", 6*time.Second)
	})
}

// startTLSDialog runs EHLO and STARTTLS on a new connection and returns a
// dialog over TLS (after the second EHLO).
func startTLSDialog(t *testing.T, addr string) *dialog {
	t.Helper()
	d := dial(t, addr)
	d.expect("220")
	d.send("EHLO c.test\r\n")
	d.expect("250")
	d.send("STARTTLS\r\n")
	d.expect("220 2.0.0")
	tc := tls.Client(d.c, &tls.Config{InsecureSkipVerify: true, ServerName: "mx.test"})
	_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	_ = tc.SetDeadline(time.Time{})
	d2 := &dialog{t: t, c: tc, r: bufio.NewReader(tc), to: 10 * time.Second}
	d2.send("EHLO c.test\r\n")
	d2.expect("250")
	return d2
}

// TestHostileSlowlorisTLS: the same after STARTTLS, where a goroutine with
// socket deadlines serves the session instead of the event loop.
func TestHostileSlowlorisTLS(t *testing.T) {
	cfg := ServerConfig{CommandTimeout: time.Second, DataTimeout: 2 * time.Second}
	_, addr := startServer(t, cfg, &asyncBackend{}, selfSigned(t))
	t.Run("partial command", func(t *testing.T) {
		t.Parallel()
		d := startTLSDialog(t, addr)
		expectTimeoutWhileDribbling(t, d.c, d.r, "NOOP NOOP NOOP", 6*time.Second)
	})
	t.Run("over-long line", func(t *testing.T) {
		t.Parallel()
		d := startTLSDialog(t, addr)
		d.send(strings.Repeat("A", 3000))
		expectTimeoutWhileDribbling(t, d.c, d.r, "A", 6*time.Second)
	})
}

// TestHostileTLSLongData: over TLS, a message whose DATA phase lasts
// longer than command_timeout (a big message on a slow link, well above
// min_data_rate) must still get its 250: the reply after the commit is
// written with a fresh deadline, not the one set when 354 was sent.
// Otherwise the client never learns the message was queued and sends it
// again, for ever.
func TestHostileTLSLongData(t *testing.T) {
	cfg := ServerConfig{CommandTimeout: time.Second, DataTimeout: 3 * time.Second, MinDataRate: 1}
	b := &asyncBackend{}
	_, addr := startServer(t, cfg, b, selfSigned(t))
	d := startTLSDialog(t, addr)
	d.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
	d.expect("250")
	d.expect("250")
	d.expect("354")
	for i := 0; i < 10; i++ { // 2.5 s of data, one line every 250 ms
		time.Sleep(250 * time.Millisecond)
		d.send(fmt.Sprintf("line %d\r\n", i))
	}
	d.send(".\r\n")
	d.expect("250 2.0.0 Ok: queued as 1")
	d.send("QUIT\r\n")
	d.expect("221")
}

// TestHostileSTARTTLS covers the STARTTLS attacks and misuses of RFC 3207
// and CVE-2011-0411's family against the server.
func TestHostileSTARTTLS(t *testing.T) {
	cfg := ServerConfig{CommandTimeout: time.Second}
	b := &asyncBackend{}
	srv, addr := startServer(t, cfg, b, selfSigned(t))
	evil := "MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nevil\r\n.\r\n"

	t.Run("injection byte by byte", func(t *testing.T) {
		// Octet by octet, the injected commands arrive either with the
		// STARTTLS line (refused before TLS) or after the 220 (fed to
		// the handshake, which fails). Never executed either way.
		d := dial(t, addr)
		d.c.(*net.TCPConn).SetNoDelay(true)
		d.expect("220")
		d.send("EHLO c.test\r\n")
		d.expect("250")
		for _, c := range []byte("STARTTLS\r\n" + evil) {
			if _, err := d.c.Write([]byte{c}); err != nil {
				break
			}
		}
		_ = d.c.SetReadDeadline(time.Now().Add(10 * time.Second))
		rest, _ := io.ReadAll(d.r)
		if bytes.Contains(rest, []byte("250 2.1.0")) || bytes.Contains(rest, []byte("354")) {
			t.Fatalf("injected commands executed: %q", rest)
		}
	})
	t.Run("plaintext behind the ClientHello", func(t *testing.T) {
		// The client's first TLS flight carries plaintext commands in the
		// same segment: they are not TLS records and end the connection.
		d := dial(t, addr)
		d.expect("220")
		d.send("EHLO c.test\r\n")
		d.expect("250")
		d.send("STARTTLS\r\n")
		d.expect("220")
		tc := tls.Client(&appendFirstWrite{Conn: d.c, extra: []byte(evil)}, &tls.Config{InsecureSkipVerify: true})
		_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
		if err := tc.Handshake(); err == nil {
			tc.Write([]byte("EHLO c\r\n"))
			r := bufio.NewReader(tc)
			line, err := r.ReadString('\n')
			if err == nil {
				t.Fatalf("TLS session usable after injected plaintext: %q", line)
			}
		}
	})
	t.Run("twice", func(t *testing.T) {
		d := startTLSDialog(t, addr)
		d.send("STARTTLS\r\n")
		d.expect("503 5.5.1")
		d.send("NOOP\r\n")
		d.expect("250")
	})
	t.Run("in transaction", func(t *testing.T) {
		d := dial(t, addr)
		d.expect("220")
		d.send("EHLO c\r\nMAIL FROM:<a@x.test>\r\nSTARTTLS\r\nRSET\r\nSTARTTLS\r\n")
		d.expect("250")
		d.expect("250")
		d.expect("503 5.5.1")
		d.expect("250")
		d.expect("220")
	})
	t.Run("handshake garbage", func(t *testing.T) {
		d := dial(t, addr)
		d.expect("220")
		d.send("EHLO c\r\nSTARTTLS\r\n")
		d.expect("250")
		d.expect("220")
		d.send("GET / HTTP/1.0\r\n\r\n" + strings.Repeat("\x16\x03\x01\xff\xff", 100))
		d.expectClosed()
	})
	for _, partial := range []int{0, 5, 40} {
		t.Run(fmt.Sprintf("handshake never completed/%d octets", partial), func(t *testing.T) {
			// A client that stops mid-handshake is cut off by
			// command_timeout like any other silent client.
			d := dial(t, addr)
			d.expect("220")
			d.send("EHLO c\r\nSTARTTLS\r\n")
			d.expect("250")
			d.expect("220")
			if partial > 0 {
				hello := captureClientHello(t)
				d.send(string(hello[:partial]))
			}
			start := time.Now()
			d.to = 8 * time.Second
			d.expectClosed()
			if el := time.Since(start); el > 6*time.Second {
				t.Fatalf("closed after %v", el)
			}
		})
	}
	if b.count() != 0 {
		t.Fatalf("%d message(s) committed by STARTTLS attacks", b.count())
	}
	deadline := time.Now().Add(5 * time.Second)
	for srv.Metrics().TLSFailures < 4 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if m := srv.Metrics(); m.TLSFailures < 4 {
		t.Errorf("TLS failures not counted: %+v", m)
	}
	// Every connection handed to TLS gave its slot back, however it ended.
	for srv.Metrics().Active != 0 && time.Now().Before(deadline.Add(5*time.Second)) {
		time.Sleep(20 * time.Millisecond)
	}
	if m := srv.Metrics(); m.Active != 0 {
		t.Errorf("%d connection slot(s) leaked after STARTTLS attacks: %+v", m.Active, m)
	}
}

// TestHostileSTARTTLSNotOffered: without a certificate STARTTLS is neither
// advertised nor accepted.
func TestHostileSTARTTLSNotOffered(t *testing.T) {
	_, addr := startServer(t, ServerConfig{}, &asyncBackend{}, nil)
	d := dial(t, addr)
	d.expect("220")
	d.send("EHLO c\r\n")
	if strings.Contains(d.expect("250"), "STARTTLS") {
		t.Fatal("STARTTLS advertised without a certificate")
	}
	d.send("STARTTLS\r\nNOOP\r\n")
	d.expect("502 5.5.1")
	d.expect("250")
}

// appendFirstWrite sends extra in the same write as the first one.
type appendFirstWrite struct {
	net.Conn
	extra []byte
	done  bool
}

func (a *appendFirstWrite) Write(p []byte) (int, error) {
	if a.done {
		return a.Conn.Write(p)
	}
	a.done = true
	if _, err := a.Conn.Write(append(append([]byte(nil), p...), a.extra...)); err != nil {
		return 0, err
	}
	return len(p), nil
}

// captureClientHello returns the first flight of a Go TLS client.
func captureClientHello(t *testing.T) []byte {
	t.Helper()
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	go tls.Client(c1, &tls.Config{InsecureSkipVerify: true}).Handshake()
	buf := make([]byte, 4096)
	_ = c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c2.Read(buf)
	if err != nil || n < 40 {
		t.Fatalf("client hello: %d %v", n, err)
	}
	return buf[:n]
}

// TestHostileClientResponseInjection: the outbound client against a
// server that injects replies after its 220 to STARTTLS, in the same
// segment and in a later one (before the handshake). The client must not
// take injected plaintext as coming from the TLS peer.
func TestHostileClientResponseInjection(t *testing.T) {
	for _, later := range []bool{false, true} {
		t.Run(fmt.Sprintf("later=%v", later), func(t *testing.T) {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			plainAfterTLS := make(chan string, 1)
			go func() {
				c, err := l.Accept()
				if err != nil {
					plainAfterTLS <- ""
					return
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				r := bufio.NewReader(c)
				c.Write([]byte("220 hostile ESMTP\r\n"))
				r.ReadString('\n') // EHLO
				c.Write([]byte("250-hostile\r\n250-PIPELINING\r\n250 STARTTLS\r\n"))
				r.ReadString('\n') // STARTTLS
				inject := "250-injected\r\n250 AUTH PLAIN\r\n"
				if later {
					c.Write([]byte("220 2.0.0 go ahead\r\n"))
					time.Sleep(100 * time.Millisecond)
					c.Write([]byte(inject))
				} else {
					c.Write([]byte("220 2.0.0 go ahead\r\n" + inject))
				}
				rest, _ := io.ReadAll(r)
				plainAfterTLS <- string(rest)
			}()
			cfg := DefaultClientConfig()
			cfg.Hostname = "client.test"
			cfg.TLS = TLSOpportunistic
			cfg.ConnectTimeout = 5 * time.Second
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			cc, err := Dial(ctx, &cfg, "mx.test", netip.MustParseAddrPort(l.Addr().String()))
			if err == nil {
				cc.Close()
				t.Fatal("client accepted a session with injected replies")
			}
			if !errors.Is(err, ErrClientTLS) {
				t.Errorf("error %v, want ErrClientTLS", err)
			}
			if rest := <-plainAfterTLS; strings.Contains(rest, "EHLO") || strings.Contains(rest, "MAIL") {
				t.Fatalf("client spoke plaintext after STARTTLS: %q", rest)
			}
		})
	}
}

// TestHostileOutputBacklog: a client that pipelines commands and never
// reads the replies is disconnected once the replies pile up, instead of
// making the server buffer without bound.
func TestHostileOutputBacklog(t *testing.T) {
	srv, addr := startServer(t, ServerConfig{}, &asyncBackend{}, nil)
	d := net.Dialer{Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.(*net.TCPConn).SetReadBuffer(4096)
	// Whole transactions, not NOOP, EHLO or surplus RCPTs: past 100 of
	// those (1000 RCPTs) the error limits would end the session first (see
	// TestSessionJunkCommands, TestSessionRecipientOvershoot), while each
	// accepted message forgives what came before it.
	flood := bytes.Repeat([]byte("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nx\r\n.\r\n"), 64<<10/56)
	_ = c.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write([]byte("EHLO client.test\r\n")); err != nil {
		t.Fatal(err)
	}
	sent := 0
	for sent < 256<<20 {
		n, err := c.Write(flood)
		sent += n
		if err != nil {
			break
		}
	}
	if sent >= 256<<20 {
		t.Fatalf("server took %d MiB of pipelined commands without a read", sent>>20)
	}
	deadline := time.Now().Add(10 * time.Second)
	for srv.Metrics().SessionOutcomes["backlog"] < 1 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if m := srv.Metrics(); m.SessionOutcomes["backlog"] != 1 {
		t.Fatalf("outcome not counted as backlog: %+v (sent %d KiB)", m.SessionOutcomes, sent>>10)
	}
}

// TestHostileConnectionLimits: per-IP and global limits answer 421 4.7.0
// (checked per source address on several loopback addresses), and slots
// of connections that vanish abruptly are released.
func TestHostileConnectionLimits(t *testing.T) {
	srv, addr := startServer(t, ServerConfig{MaxConnectionsPerIP: 3, MaxConnections: 5}, &asyncBackend{}, nil)
	var ds []*dialog
	for i, src := range []string{"127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2", "127.0.0.3"} {
		d := dialFrom(t, src, addr)
		switch i {
		case 3: // fourth from 127.0.0.1
			if !strings.Contains(d.expect("421 4.7.0"), "your address") {
				t.Fatal("per-IP refusal does not say so")
			}
			d.expectClosed()
		case 6: // sixth in all
			d.expect("421 4.7.0")
			d.expectClosed()
		default:
			d.expect("220")
			ds = append(ds, d)
		}
	}
	if m := srv.Metrics(); m.RefusedPerIP != 1 || m.RefusedLimit != 1 || m.Active != 5 {
		t.Fatalf("metrics %+v", m)
	}
	// Reset every connection (RST, no QUIT): all slots come back.
	for _, d := range ds {
		d.c.(*net.TCPConn).SetLinger(0)
		d.c.Close()
	}
	deadline := time.Now().Add(10 * time.Second)
	for srv.Metrics().Active != 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	for i := 0; i < 3; i++ {
		dialFrom(t, "127.0.0.1", addr).expect("220")
	}
}

// TestHostileTooManyErrors: a client that keeps sending garbage is cut off
// with 421 4.7.0 after max_errors, over the real server.
func TestHostileTooManyErrors(t *testing.T) {
	_, addr := startServer(t, ServerConfig{MaxErrors: 10}, &asyncBackend{}, nil)
	d := dial(t, addr)
	d.expect("220")
	d.send(strings.Repeat("XYZZY\r\n", 30))
	for i := 0; i < 9; i++ {
		d.expect("500 5.5.2")
	}
	d.expect("500 5.5.2")
	d.expect("421 4.7.0")
	d.expectClosed()
}

// TestHostileBDATHuge: a BDAT chunk announced far over the size limit is
// read and discarded without buffering it; the session answers 552 and
// stays in step.
func TestHostileBDATHuge(t *testing.T) {
	b := &asyncBackend{}
	_, addr := startServer(t, ServerConfig{MaxMessageSize: 1 << 20}, b, nil)
	d := dial(t, addr)
	d.expect("220")
	const size = 8 << 20
	d.send(fmt.Sprintf("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT %d LAST\r\n", size))
	d.expect("250")
	d.expect("250")
	d.expect("250")
	line := []byte(strings.Repeat("z", 998) + "\r\n")
	go func() {
		for sent := 0; sent < size; sent += len(line) {
			n := min(len(line), size-sent)
			if _, err := d.c.Write(line[:n]); err != nil {
				return
			}
		}
		d.c.Write([]byte("NOOP\r\n"))
	}()
	d.expect("552 5.3.4")
	d.expect("250")
	if b.count() != 0 {
		t.Fatal("oversized message committed")
	}
}

var _ sync.Mutex

// TestHostileCanonicalDomain: every spelling of a domain maps to one
// routing key, the form the DNS knows, so relay checks and delivery agree.
func TestHostileCanonicalDomain(t *testing.T) {
	cases := []struct{ in, want string }{
		{"u@Example.TEST", "example.test"},
		{"u@bücher.test", "xn--bcher-kva.test"},
		{"u@BÜCHER.Test", "xn--bcher-kva.test"},
		{"u@XN--BCHER-KVA.test", "xn--bcher-kva.test"},
		{"\"a@b\"@bücher.test", "xn--bcher-kva.test"},
		{"u@παράδειγμα.test", "xn--hxajbheg2az3al.test"},
		{"u@ｆｕｌｌ.test", "full.test"}, // UTS 46 width mapping: routed to full.test, checked as full.test
		{"nodomain", ""},
	}
	for _, c := range cases {
		if got := Domain(c.in); got != c.want {
			t.Errorf("Domain(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

// cleanText reports whether content (CRLF-separated lines, the last one
// possibly unterminated) is acceptable message text: no bare CR or LF, no
// NUL, every line at most 1000 octets with its CRLF.
func cleanText(content []byte) bool {
	for _, l := range bytes.Split(content, []byte("\r\n")) {
		// The limit is on the text line: a dot doubled for transparency
		// is not part of it (RFC 5321 §4.5.3.1.6).
		n := len(l)
		if bytes.HasPrefix(l, []byte(".")) {
			n--
		}
		if bytes.ContainsAny(l, "\r\n\x00") || n+2 > maxTextLine {
			return false
		}
	}
	return true
}

func fuzzConfig() *ServerConfig {
	c := testConfig()
	c.MaxMessageSize = 1 << 20
	return c
}

// FuzzHostileData checks DATA against a model: content followed by the
// terminator is committed as exactly one message whose body is the
// dot-unstuffed content when that content is clean text, and nothing is
// committed otherwise, however the input is split. Content holding its own
// <CRLF>.<CRLF> is checked only for the invariants of every run.
func FuzzHostileData(f *testing.F) {
	for _, sm := range smugglers {
		f.Add([]byte("hello"+sm.sep+smuggled), uint8(1))
	}
	f.Add([]byte(".\r\n..\r\n.a"), uint8(2))
	f.Add([]byte(strings.Repeat("x", 998)), uint8(7))
	f.Add([]byte(strings.Repeat("x", 999)), uint8(7))
	// Over-long lines dropped while streaming are still checked for NUL
	// and CR, and counted towards the size, as when read whole.
	f.Add([]byte("a\x00"+strings.Repeat("x", 1500)), uint8(0))
	f.Add([]byte(strings.Repeat("x", 1500)+"\ra\r\n.."), uint8(0))
	f.Fuzz(func(t *testing.T, content []byte, chunk uint8) {
		in := hello + tx + "DATA\r\n" + string(content) + "\r\n.\r\nNOOP\r\n"
		b1, b2 := &fakeBackend{}, &fakeBackend{}
		out1, _ := runSession(t, fuzzConfig(), b1, in, 0)
		out2, _ := runSession(t, fuzzConfig(), b2, in, int(chunk%9)+1)
		if out1 != out2 || len(b1.msgs) != len(b2.msgs) {
			t.Fatalf("split changes the outcome:\n%q\n%q", out1, out2)
		}
		for _, m := range b1.msgs {
			checkBody(t, m.body)
		}
		framed := []byte("\r\n" + string(content) + "\r\n.\r\n")
		if bytes.Index(framed, []byte("\r\n.\r\n")) != len(content)+2 {
			return // the content ends the data itself
		}
		if len(b1.msgs) > 1 {
			t.Fatalf("one DATA made %d messages", len(b1.msgs))
		}
		if !cleanText(content) {
			if len(b1.msgs) != 0 {
				t.Fatalf("unclean content committed: %q", b1.msgs[0].body)
			}
			return
		}
		var want []byte
		for _, l := range bytes.Split(content, []byte("\r\n")) {
			want = append(append(want, bytes.TrimPrefix(l, []byte("."))...), '\r', '\n')
		}
		if len(b1.msgs) != 1 || b1.msgs[0].body != string(want) {
			t.Fatalf("clean content: %d messages, want 1 with body %q\n%q", len(b1.msgs), want, out1)
		}
	})
}

// FuzzHostileBDAT checks BDAT against the same model, the content cut in
// two chunks at a fuzzed point: committed verbatim (plus a final CRLF when
// missing) when clean, refused otherwise.
func FuzzHostileBDAT(f *testing.F) {
	for _, sm := range smugglers {
		f.Add([]byte("hello"+sm.sep+smuggled), uint16(6), uint8(1))
	}
	f.Add([]byte("a\r\nb"), uint16(1), uint8(1))
	f.Add([]byte(strings.Repeat("x", 999)), uint16(500), uint8(3))
	f.Fuzz(func(t *testing.T, content []byte, cut uint16, chunk uint8) {
		k := int(cut) % (len(content) + 1)
		c1, c2 := content[:k], content[k:]
		in := hello + tx + fmt.Sprintf("BDAT %d\r\n%sBDAT %d LAST\r\n%sNOOP\r\n", len(c1), c1, len(c2), c2)
		b1, b2 := &fakeBackend{}, &fakeBackend{}
		out1, _ := runSession(t, fuzzConfig(), b1, in, 0)
		out2, _ := runSession(t, fuzzConfig(), b2, in, int(chunk%9)+1)
		if out1 != out2 || len(b1.msgs) != len(b2.msgs) {
			t.Fatalf("split changes the outcome:\n%q\n%q", out1, out2)
		}
		if !strings.HasSuffix(out1, "250 2.0.0 Ok\r\n") {
			t.Fatalf("session out of step: %q", out1)
		}
		if !cleanText(content) {
			if len(b1.msgs) != 0 {
				t.Fatalf("unclean content committed: %q", b1.msgs[0].body)
			}
			return
		}
		want := string(content)
		if len(want) > 0 && !strings.HasSuffix(want, "\r\n") {
			want += "\r\n"
		}
		if len(b1.msgs) != 1 || b1.msgs[0].body != want {
			t.Fatalf("clean content: %d messages, want 1 with body %q\n%q", len(b1.msgs), want, out1)
		}
		checkBody(t, b1.msgs[0].body)
	})
}

// TestHostileFloodWhilePending: a client that keeps sending while its
// message is being committed (instead of waiting for the reply, RFC 2920
// §3.1) is cut off once a bounded amount is buffered; its input does not
// pile up in the server's memory for as long as the commit lasts.
func TestHostileFloodWhilePending(t *testing.T) {
	b := &asyncBackend{delay: 4 * time.Second}
	srv, addr := startServer(t, ServerConfig{}, b, nil)
	d := dial(t, addr)
	d.expect("220")
	d.send("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
	d.expect("250")
	d.expect("250")
	d.expect("250")
	d.expect("354")
	d.send("x\r\n.\r\n")
	junk := bytes.Repeat([]byte("NOOP\r\n"), 64<<10/6)
	_ = d.c.SetWriteDeadline(time.Now().Add(3 * time.Second))
	sent := 0
	for sent < 256<<20 {
		n, err := d.c.Write(junk)
		sent += n
		if err != nil {
			break
		}
	}
	if sent > 64<<20 {
		t.Fatalf("server buffered %d MiB sent during a pending commit", sent>>20)
	}
	deadline := time.Now().Add(5 * time.Second)
	for srv.Metrics().SessionOutcomes["backlog"] < 1 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if m := srv.Metrics(); m.SessionOutcomes["backlog"] != 1 {
		t.Fatalf("outcomes %+v after %d KiB", m.SessionOutcomes, sent>>10)
	}
}

// TestHostileSlowData: message data trickling in below min_data_rate is cut
// off with 421 4.4.2 once the grace period is over — in DATA and BDAT, on
// the event loop and over TLS.
func TestHostileSlowData(t *testing.T) {
	cfg := ServerConfig{DataRateGrace: time.Second, MinDataRate: 1000, DataTimeout: 20 * time.Second, CommandTimeout: 20 * time.Second}
	_, addr := startServer(t, cfg, &asyncBackend{}, selfSigned(t))
	begin := map[string]string{
		"data": "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n",
		"bdat": "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 100000 LAST\r\n",
	}
	for _, useTLS := range []bool{false, true} {
		for _, verb := range []string{"data", "bdat"} {
			t.Run(fmt.Sprintf("%s/tls=%v", verb, useTLS), func(t *testing.T) {
				t.Parallel()
				var d *dialog
				if useTLS {
					d = startTLSDialog(t, addr)
				} else {
					d = dial(t, addr)
					d.expect("220")
					d.send("EHLO c\r\n")
					d.expect("250")
				}
				d.send(begin[verb])
				d.expect("250")
				d.expect("250")
				if verb == "data" {
					d.expect("354")
				}
				expectTimeoutWhileDribbling(t, d.c, d.r, "slow data\r\n", 8*time.Second)
			})
		}
	}
}

package main

// Interoperability and hostile-input tests against the real binary: an
// untrusted client probing for an open relay, SMTP smuggling on the wire,
// and real clients and servers (Python smtplib, swaks, Postfix's
// smtp-source and smtp-sink) on both sides of hermod.
//
// Tools: python3, swaks and Postfix's smtp-source/smtp-sink (Debian
// package postfix). A test skips when its tool is missing, unless $CI is
// set: then it fails, because CI must run it (.ci/run installs them).

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/bench"
	"github.com/hermod-mta/hermod/spool"
)

// needTool returns the path of an external program, skipping the test when
// it is missing outside CI.
func needTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/usr/local/sbin"} {
		if p := filepath.Join(dir, name); isExecutable(p) {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s is missing in CI: install the Debian package %s", name, pkg)
	}
	t.Skipf("%s not installed (Debian package %s)", name, pkg)
	return ""
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// smtpLine sends one command line and returns the reply (all its lines).
type rawSMTP struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func dialRaw(t *testing.T, addr string) *rawSMTP {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	s := &rawSMTP{t: t, c: c, r: bufio.NewReader(c)}
	if g := s.reply(); !strings.HasPrefix(g, "220 ") {
		t.Fatalf("greeting %q", g)
	}
	return s
}

func (s *rawSMTP) reply() string {
	s.t.Helper()
	_ = s.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var all strings.Builder
	for {
		line, err := s.r.ReadString('\n')
		all.WriteString(line)
		if err != nil {
			return all.String()
		}
		if len(line) < 4 || line[3] != '-' {
			return all.String()
		}
	}
}

func (s *rawSMTP) cmd(line string) string {
	s.t.Helper()
	if _, err := s.c.Write([]byte(line + "\r\n")); err != nil {
		s.t.Fatalf("write %q: %v", line, err)
	}
	return s.reply()
}

// queuedMessage is a message read back from a stopped daemon's spool.
type queuedMessage struct {
	msg  *spool.Message
	body []byte
}

// readSpool opens the spool of a stopped daemon and returns every message
// with its body.
func readSpool(t *testing.T, dir string) []queuedMessage {
	t.Helper()
	return readSpoolDir(t, filepath.Join(dir, "spool"))
}

// readSpoolDir is readSpool for the spool directory itself.
func readSpoolDir(t *testing.T, spoolDir string) []queuedMessage {
	t.Helper()
	st, err := spool.Open(spool.Config{Dir: spoolDir}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var out []queuedMessage
	var werr error
	err = st.Walk(func(m *spool.Message) bool {
		b, err := st.Body(m.ID)
		if err != nil {
			werr = err
			return false
		}
		out = append(out, queuedMessage{msg: m, body: b})
		return true
	})
	if err != nil || werr != nil {
		t.Fatal(err, werr)
	}
	return out
}

// checkQueuedBody fails on a body another MTA could read differently.
func checkQueuedBody(t *testing.T, id string, b []byte) {
	t.Helper()
	for i, c := range b {
		switch {
		case c == '\n' && (i == 0 || b[i-1] != '\r'),
			c == '\r' && (i+1 == len(b) || b[i+1] != '\n'):
			t.Errorf("message %s queued with a bare CR or LF at %d: %q", id, i, b)
			return
		case c == 0:
			t.Errorf("message %s queued with a NUL at %d", id, i)
			return
		}
	}
	if len(b) > 0 && !strings.HasSuffix(string(b), "\r\n") {
		t.Errorf("message %s does not end with CRLF", id)
	}
}

// TestE2EOpenRelay probes the relay policy of the real daemon from a
// client outside relay_networks, with every known way of sneaking a
// foreign recipient past a domain check, and then reads the spool.
func TestE2EOpenRelay(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	dir := t.TempDir()
	d := writeConfig(t, dir, `relay_networks = ["192.0.2.0/24"]
relay_domains = ["allowed.test", "Bücher.test"]
max_errors = 100`, "")
	d.start()
	cases := []struct {
		rcpt string
		want string // reply prefix
	}{
		{"<victim@evil.test>", "554 5.7.1"},
		{"<victim@EVIL.TEST>", "554 5.7.1"},
		// Sender-specified routing (RFC 2505 §2.x; Postfix's
		// allow_untrusted_routing = no): an allowed domain's MX would
		// forward these to evil.test.
		{"<victim%evil.test@allowed.test>", "554 5.7.1"},
		{"<victim%evil.test@ALLOWED.test>", "554 5.7.1"},
		{"<evil.test!victim@allowed.test>", "554 5.7.1"},
		{"<\"victim@evil.test\"@allowed.test>", "554 5.7.1"},
		{"<\"victim%evil.test\"@allowed.test>", "554 5.7.1"},
		// Source routes are dropped (RFC 5321 §4.1.1.3 / appendix C):
		// the final mailbox decides.
		{"<@allowed.test:victim@evil.test>", "554 5.7.1"},
		{"<@allowed.test,@allowed.test:victim@evil.test>", "554 5.7.1"},
		{"<victim@evil.test@allowed.test>", "553 5.1.3"},
		{"<victim@allowed.test.evil.test>", "554 5.7.1"},
		{"<victim@evilallowed.test>", "554 5.7.1"},
		{"<victim@sub.allowed.test>", "554 5.7.1"},
		{"<victim@allowed.test.>", "553 5.1.3"},
		{"<victim@evil.test.>", "553 5.1.3"},
		{"<victim@[127.0.0.1]>", "553 5.1.3"},
		{"<victim@[IPv6:::1]>", "553 5.1.3"},
		{"<victim@[192.0.2.1]>", "553 5.1.3"},
		{"<postmaster>", "550 5.1.1"},
		{"<Postmaster@evil.test>", "554 5.7.1"},
		{"<victim@allowed.test >", "553 5.1.3"},
		{"< victim@allowed.test>", "553 5.1.3"},
		{"<victim@evil.test> <x@allowed.test>", "555 5.5.4"},
		// ORCPT (RFC 3461) only names the original recipient in DSNs;
		// the mail goes to x@allowed.test, as the spool check below
		// verifies.
		{"<x@allowed.test> ORCPT=rfc822;victim@evil.test", "250 2.1.5"},
		{"<x2@allowed.test> FOO=rfc822;victim@evil.test", "555 5.5.4"},
		{"victim@allowed.test", "501 5.5.4"},
		{"<victim@аllowed.test>", "553 5.6.7"}, // Cyrillic а, no SMTPUTF8
		// Accepted: the allowed domain itself, in any case.
		{"<friend@allowed.test>", "250 2.1.5"},
		{"<Friend2@ALLOWED.TEST>", "250 2.1.5"},
		{" <friend3@allowed.test>", "250 2.1.5"},
		{"<@evil.test:friend4@allowed.test>", "250 2.1.5"},
	}
	s := dialRaw(t, d.smtp)
	s.cmd("EHLO prober.test")
	if r := s.cmd("MAIL FROM:<spammer@evil.test>"); !strings.HasPrefix(r, "250") {
		t.Fatal(r)
	}
	for _, c := range cases {
		if r := s.cmd("RCPT TO:" + c.rcpt); !strings.HasPrefix(r, c.want) {
			t.Errorf("RCPT TO:%s: %q, want %s", c.rcpt, strings.TrimSpace(r), c.want)
		}
	}
	if r := s.cmd("DATA"); !strings.HasPrefix(r, "354") {
		t.Fatal(r)
	}
	if r := s.cmd("Subject: relay probe\r\n\r\nhi\r\n."); !strings.HasPrefix(r, "250 2.0.0") {
		t.Fatal(r)
	}
	// Internationalised names: the same checks with SMTPUTF8 in effect.
	utf := []struct{ rcpt, want string }{
		{"<victim@évil.test>", "554 5.7.1"},
		{"<victim@аllowed.test>", "554 5.7.1"}, // Cyrillic а
		{"<victim%évil.test@allowed.test>", "554 5.7.1"},
		{"<ü@bücher.test>", "250 2.1.5"},
		{"<ü2@BÜCHER.test>", "250 2.1.5"},
	}
	if r := s.cmd("MAIL FROM:<spammer@evil.test> SMTPUTF8"); !strings.HasPrefix(r, "250") {
		t.Fatal(r)
	}
	for _, c := range utf {
		if r := s.cmd("RCPT TO:" + c.rcpt); !strings.HasPrefix(r, c.want) {
			t.Errorf("RCPT TO:%s (SMTPUTF8): %q, want %s", c.rcpt, strings.TrimSpace(r), c.want)
		}
	}
	s.cmd("DATA")
	if r := s.cmd("Subject: utf8 probe\r\n\r\nhi\r\n."); !strings.HasPrefix(r, "250 2.0.0") {
		t.Fatal(r)
	}
	s.cmd("QUIT")

	_, metrics := d.get("/metrics")
	if !strings.Contains(metrics, "hermod_smtp_relay_denied_total") {
		t.Error("relay denials not in /metrics")
	}
	d.kill(syscall.SIGTERM)
	friends := 0
	for _, m := range readSpool(t, dir) {
		if m.msg.From == "" {
			continue // a bounce to the prober (a failed delivery attempt)
		}
		for _, r := range m.msg.Rcpts {
			if strings.HasPrefix(strings.ToLower(r.Addr), "friend") {
				friends++
			}
			dom := strings.ToLower(r.Domain)
			if dom != "allowed.test" && dom != "xn--bcher-kva.test" || strings.ContainsAny(r.Addr[:strings.LastIndexByte(r.Addr, '@')], "%!@") {
				t.Errorf("open relay: queued recipient %q (domain %q)", r.Addr, r.Domain)
			}
		}
	}
	if friends != 4 {
		t.Errorf("%d allowed recipients queued, want 4", friends)
	}
}

// bodyAfterTrace returns the message as the client sent it: the body
// without hermod's Received: header (the first field, with its folded
// lines).
func bodyAfterTrace(t *testing.T, b []byte) []byte {
	t.Helper()
	if !bytes.HasPrefix(b, []byte("Received: from ")) {
		t.Fatalf("no Received: header first: %q", b[:min(len(b), 200)])
	}
	i := 0
	for {
		j := bytes.Index(b[i:], []byte("\r\n"))
		if j < 0 {
			t.Fatalf("unterminated Received: header")
		}
		i += j + 2
		if i >= len(b) || (b[i] != ' ' && b[i] != '\t') {
			return b[i:]
		}
	}
}

// TestE2ESmugglingOnTheWire sends the smuggling variants to the real
// daemon (whole, and octet by octet for some) and the STARTTLS injection,
// then reads the spool: only the control message is queued, and nothing
// queued has a bare CR or LF or a NUL.
func TestE2ESmugglingOnTheWire(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	dir := t.TempDir()
	cert, key := writeCert(t, dir)
	d := writeConfig(t, dir, fmt.Sprintf("tls_cert = %q\ntls_key = %q\nmax_errors = 100", cert, key), "")
	d.start()
	forged := "MAIL FROM:<ceo@forged.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nFrom: ceo@forged.test\r\n\r\nsmuggled\r\n"
	seps := []struct {
		name, sep string
		bytewise  bool
	}{
		{"LF.LF", "\n.\n", true},
		{"CR.CR", "\r.\r", true},
		{"LF.CRLF", "\n.\r\n", true},
		{"CRLF.LF", "\r\n.\n", true},
		{"CR.CRLF", "\r.\r\n", false},
		{"CRLF.CR", "\r\n.\r", false},
		{"CRCRLF", "\r\r\n.\r\r\n", false},
		{"NUL.", "\r\n\x00.\r\n", true},
		{".NUL", "\r\n.\x00\r\n", false},
	}
	send := func(payload string, bytewise bool) string {
		c, err := net.DialTimeout("tcp", d.smtp, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.(*net.TCPConn).SetNoDelay(true)
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		if bytewise {
			for i := 0; i < len(payload); i++ {
				if _, err := c.Write([]byte{payload[i]}); err != nil {
					break
				}
			}
		} else {
			c.Write([]byte(payload))
		}
		out, _ := io.ReadAll(c)
		return string(out)
	}
	for _, sp := range seps {
		for _, bytewise := range []bool{false, true} {
			if bytewise && !sp.bytewise {
				continue
			}
			out := send("EHLO s.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nSubject: "+sp.name+"\r\n\r\nhello"+sp.sep+forged+"\r\n.\r\nQUIT\r\n", bytewise)
			if queuedRE.MatchString(out) {
				t.Errorf("%s (bytewise %v): a message was queued: %q", sp.name, bytewise, out)
			}
		}
	}
	// BDAT: the fake terminator inside a chunk.
	content := "Subject: bdat\r\n\r\nhello\n.\n" + forged
	if out := send(fmt.Sprintf("EHLO s.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT %d LAST\r\n%sQUIT\r\n", len(content), content), false); queuedRE.MatchString(out) {
		t.Errorf("BDAT: a message was queued: %q", out)
	}
	// STARTTLS with commands in the same segment.
	if out := send("EHLO s.test\r\nSTARTTLS\r\n"+forged+"\r\n.\r\n", false); !strings.Contains(out, "554 5.5.1") || queuedRE.MatchString(out) {
		t.Errorf("STARTTLS injection: %q", out)
	}
	// Control: the same framing with a genuine terminator is queued.
	if out := send("EHLO s.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nSubject: control\r\n\r\nhello\r\n.\r\nQUIT\r\n", true); !queuedRE.MatchString(out) {
		t.Fatalf("control message not queued: %q", out)
	}
	d.kill(syscall.SIGTERM)
	msgs := readSpool(t, dir)
	for _, m := range msgs {
		checkQueuedBody(t, m.msg.ID.String(), m.body)
		if m.msg.From == "ceo@forged.test" || bytes.Contains(m.body, []byte("smuggled")) {
			t.Errorf("smuggled content queued: %+v %q", m.msg, m.body)
		}
	}
	if len(msgs) != 1 {
		t.Fatalf("%d messages queued, want only the control message", len(msgs))
	}
}

// pythonInterop exercises smtplib against the daemon: every command it
// has, 8BITMIME and SMTPUTF8 (internationalised sender and recipient),
// dot-stuffing, the 998-octet line limit, SIZE, and STARTTLS. It prints a
// JSON object: reply codes and the queue id of each message.
const pythonInterop = `
import smtplib, ssl, sys, json
host, port = sys.argv[1].rsplit(":", 1)
res = {}
def qid(msg):
    return msg.decode().rsplit(" ", 1)[1]
s = smtplib.SMTP(host, int(port), local_hostname="py.client.test", timeout=30)
code, _ = s.ehlo()
assert code == 250
for ext in ("pipelining", "8bitmime", "smtputf8", "size", "enhancedstatuscodes", "chunking", "starttls"):
    assert s.has_extn(ext), ext
res["size_ext"] = s.esmtp_features["size"]
res["noop"] = s.noop()[0]
res["rset"] = s.rset()[0]
res["vrfy"] = s.verify("root")[0]
res["help"] = s.docmd("HELP")[0]
res["expn"] = s.expn("staff")[0]
res["helo_after_ehlo"] = s.helo("py.client.test")[0]
s.ehlo("py.client.test")
res["mail_size_too_big"] = s.mail("big@x.test", ["SIZE=999999999999"])[0]
s.rset()

body = sys.stdin.buffer.read()
parts = json.loads(body)
code, msg = s.data if False else (0, b"")
s.mail("plain@x.test", ["SIZE=%d" % len(parts["plain"])])
s.rcpt("r1@y.test")
code, msg = s.data(parts["plain"].encode())
assert code == 250, (code, msg)
res["plain"] = qid(msg)

s.mail("eight@x.test", ["BODY=8BITMIME"])
s.rcpt("r2@y.test")
code, msg = s.data(bytes.fromhex(parts["eight_hex"]))
assert code == 250, (code, msg)
res["eight"] = qid(msg)

s.mail("\u03c0\u03b5\u03c4\u03c1\u03bf\u03c2@\u03c0\u03b1\u03c1\u03ac\u03b4\u03b5\u03b9\u03b3\u03bc\u03b1.test", ["SMTPUTF8", "BODY=8BITMIME"])
code, _ = s.rcpt("\u0434\u0435\u0434@y.test")
assert code == 250, code
code, msg = s.data(bytes.fromhex(parts["utf8_hex"]))
assert code == 250, (code, msg)
res["utf8"] = qid(msg)

s.mail("long@x.test")
s.rcpt("r3@y.test")
try:
    c, m = s.data(parts["too_long"].encode())
    res["too_long"] = c
    res["too_long_msg"] = m.decode() + " len=%d" % len(parts["too_long"])
except smtplib.SMTPDataError as e:
    res["too_long"] = e.smtp_code
res["after_refusal"] = s.noop()[0]

s.starttls(context=ssl._create_unverified_context())
code, _ = s.ehlo()
assert code == 250 and not s.has_extn("starttls")
res["tls_twice"] = s.docmd("STARTTLS")[0]
s.mail("tls@x.test")
s.rcpt("r4@y.test")
code, msg = s.data(parts["plain"].encode())
assert code == 250, (code, msg)
res["tls"] = qid(msg)
res["quit"] = s.quit()[0]
print(json.dumps(res))
`

// TestE2EInteropClients sends with Python's smtplib and with swaks
// (pipelining, STARTTLS) to the real daemon and checks, byte by byte in
// the spool, that what they sent is what was queued.
func TestE2EInteropClients(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	py := needTool(t, "python3", "python3")
	dir := t.TempDir()
	cert, key := writeCert(t, dir)
	d := writeConfig(t, dir, fmt.Sprintf("tls_cert = %q\ntls_key = %q\nmax_message_size = 1048576", cert, key), "")
	d.start()

	plain := "Subject: plain\r\n\r\nhello\r\n.leading dot\r\n..two dots\r\n.\r\n" + strings.Repeat("x", 998) + "\r\n"
	eight := []byte("Subject: eight\r\nContent-Type: text/plain; charset=latin1\r\nContent-Transfer-Encoding: 8bit\r\n\r\nna\xefve caf\xe9 \xff\xfe\x80\r\n.\xe9\r\n")
	utf8 := []byte("From: \"Πέτρος\" <πετρος@παράδειγμα.test>\r\nTo: дед@y.test\r\nSubject: Grüße 🌍\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nΚαλημέρα\r\n")
	tooLong := "Subject: long\r\n\r\n" + strings.Repeat("y", 999) + "\r\n"
	in, _ := json.Marshal(map[string]string{
		"plain":     plain,
		"eight_hex": fmt.Sprintf("%x", eight),
		"utf8_hex":  fmt.Sprintf("%x", utf8),
		"too_long":  tooLong,
	})
	cmd := exec.Command(py, "-c", pythonInterop, d.smtp)
	cmd.Stdin = bytes.NewReader(in)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("python smtplib: %v\n%s\ndaemon log:\n%s", err, out, d.log.String())
	}
	var res map[string]any
	if err := json.Unmarshal(bytes.TrimSpace(out), &res); err != nil {
		t.Fatalf("python output %q: %v", out, err)
	}
	wantCodes := map[string]float64{"noop": 250, "rset": 250, "vrfy": 252, "help": 214, "expn": 502,
		"helo_after_ehlo": 250, "mail_size_too_big": 552, "too_long": 554, "after_refusal": 250, "tls_twice": 503, "quit": 221}
	for k, v := range wantCodes {
		if res[k] != v {
			t.Errorf("smtplib %s: %v, want %v (%v)", k, res[k], v, res)
		}
	}
	if res["size_ext"] != "1048576" {
		t.Errorf("SIZE %v", res["size_ext"])
	}

	// swaks: pipelined, then over STARTTLS.
	var swaksIDs []string
	if sw := needTool(t, "swaks", "swaks"); sw != "" {
		run := func(args ...string) string {
			args = append([]string{"--server", d.smtp, "--from", "swaks@x.test", "--timeout", "30", "--helo", "swaks.client.test"}, args...)
			out, err := exec.Command(sw, args...).CombinedOutput()
			m := queuedRE.FindStringSubmatch(string(out))
			if err != nil || m == nil {
				t.Fatalf("swaks %v: %v\n%s", args, err, out)
			}
			return m[1]
		}
		swaksIDs = append(swaksIDs, run("--to", "sw1@y.test,sw2@y.test,sw3@z.test", "--pipeline", "--header", "Subject: swaks pipelined", "--body", "from swaks"))
		if exec.Command("perl", "-MNet::SSLeay", "-e1").Run() == nil {
			swaksIDs = append(swaksIDs, run("--to", "sw4@y.test", "--tls", "--header", "Subject: swaks tls", "--body", "from swaks over TLS"))
		} else if os.Getenv("CI") != "" {
			t.Fatal("swaks --tls needs Net::SSLeay: install libnet-ssleay-perl in CI")
		} else {
			t.Log("Net::SSLeay missing: swaks --tls skipped")
		}
	}

	d.kill(syscall.SIGTERM)
	byID := map[string]queuedMessage{}
	for _, m := range readSpool(t, dir) {
		byID[m.msg.ID.String()] = m
		checkQueuedBody(t, m.msg.ID.String(), m.body)
	}
	get := func(key string) queuedMessage {
		id, _ := res[key].(string)
		m, ok := byID[id]
		if !ok {
			t.Fatalf("%s message %q not in the spool", key, id)
		}
		return m
	}
	unstuffed := strings.Replace(strings.Replace(plain, "\r\n..two", "\r\n.two", 1), "\r\n.\r\n", "\r\n.\r\n", 1)
	_ = unstuffed
	if m := get("plain"); string(bodyAfterTrace(t, m.body)) != plain {
		// smtplib dot-stuffs; hermod must unstuff to exactly what was given.
		t.Errorf("plain body changed:\n%q\nwant\n%q", bodyAfterTrace(t, m.body), plain)
	} else if !bytes.Contains(m.body, []byte("with ESMTP id")) {
		t.Errorf("plain: Received header %q", m.body[:120])
	}
	if m := get("eight"); !bytes.Equal(bodyAfterTrace(t, m.body), eight) || !m.msg.Body8Bit {
		t.Errorf("8BITMIME message changed (8bit %v): %q", m.msg.Body8Bit, bodyAfterTrace(t, m.body))
	}
	m := get("utf8")
	if !bytes.Equal(bodyAfterTrace(t, m.body), utf8) || !m.msg.SMTPUTF8 || m.msg.From != "πετρος@παράδειγμα.test" ||
		len(m.msg.Rcpts) != 1 || m.msg.Rcpts[0].Addr != "дед@y.test" || !bytes.Contains(m.body, []byte("with UTF8SMTP id")) {
		t.Errorf("SMTPUTF8 message: %+v\n%q", m.msg, m.body)
	}
	if m := get("tls"); !bytes.Contains(m.body, []byte("with ESMTPS id")) || !bytes.Contains(m.body, []byte("(using TLSv1.3")) {
		t.Errorf("STARTTLS message's Received header: %q", m.body[:min(len(m.body), 300)])
	}
	for _, id := range swaksIDs {
		if _, ok := byID[id]; !ok {
			t.Errorf("swaks message %s not queued", id)
		}
	}
	if len(swaksIDs) > 0 {
		if m := byID[swaksIDs[0]]; len(m.msg.Rcpts) != 3 {
			t.Errorf("swaks pipelined message has %d recipients", len(m.msg.Rcpts))
		}
	}
	if want := 4 + len(swaksIDs); len(byID) != want {
		t.Errorf("%d messages queued, want %d", len(byID), want)
	}
}

// smtpSink runs Postfix's smtp-sink on addr, dumping each transaction to
// a file of dir.
type smtpSink struct {
	cmd *exec.Cmd
	dir string
	out *syncBuffer
}

func startSMTPSink(t *testing.T, addr string) *smtpSink {
	t.Helper()
	return startSMTPSinkArgs(t, addr)
}

// startSMTPSinkArgs is startSMTPSink with extra smtp-sink options (before
// the address), e.g. "-f", "RCPT" to refuse every recipient with 5xx.
func startSMTPSinkArgs(t *testing.T, addr string, extra ...string) *smtpSink {
	t.Helper()
	bin := needTool(t, "smtp-sink", "postfix")
	// Not t.TempDir: smtp-sink may drop to "nobody", who needs a path it
	// can traverse.
	dir, err := os.MkdirTemp("", "hermod-smtp-sink")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o777)
	t.Cleanup(func() { os.RemoveAll(dir) })
	args := append([]string{"-d", dir + "/%H%M%S.", "-h", "sink.test"}, extra...)
	if os.Geteuid() == 0 {
		args = append(args, "-u", "nobody") // required when run as root
	}
	args = append(args, addr, "128")
	s := &smtpSink{cmd: exec.Command(bin, args...), dir: dir, out: &syncBuffer{}}
	s.cmd.Stdout, s.cmd.Stderr = s.out, s.out
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { s.cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		s.cmd.Process.Kill()
		<-exited
	})
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return s
		}
		select {
		case <-exited:
			t.Fatalf("smtp-sink exited: %s", s.out.String())
		case <-time.After(50 * time.Millisecond):
		}
		if i > 200 {
			t.Fatalf("smtp-sink not listening on %s: %s", addr, s.out.String())
		}
	}
}

// dumps returns the transactions smtp-sink has written so far.
func (s *smtpSink) dumps(t *testing.T) [][]byte {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(s.dir, "*"))
	var out [][]byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err == nil && len(b) > 0 {
			out = append(out, b)
		}
	}
	return out
}

// metric returns the value of an unlabelled counter in /metrics.
func (d *hermodProc) metric(name string) float64 {
	d.t.Helper()
	_, body := d.get("/metrics")
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` ([0-9.e+]+)$`).FindStringSubmatch(body)
	if m == nil {
		return -1
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// TestE2EInteropPostfix injects mail with Postfix's smtp-source (new
// connection per message, and reused connections with several recipients)
// and relays it through the real daemon, resolving through a loopback DNS
// server, to Postfix's smtp-sink as the destination MX.
func TestE2EInteropPostfix(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	source := needTool(t, "smtp-source", "postfix")
	py := needTool(t, "python3", "python3")
	const sinkIP = "127.0.0.9"
	port := freePortOn(t, sinkIP)
	sink := startSMTPSink(t, fmt.Sprintf("%s:%d", sinkIP, port))
	mx := []bench.MX{{Host: "mx.sink.test", Pref: 10, Addrs: []string{sinkIP}}}
	dns, err := bench.NewDNS(bench.DNSConfig{Listen: "127.0.0.1:0", Domains: 1, MX: []string{sinkIP}, Extra: []string{}, TTL: 60,
		Zones: []bench.Zone{{Name: "sink.test", MX: mx}, {Name: "src.test", MX: mx}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dns.Close() })
	dir := t.TempDir()
	d := writeConfig(t, dir, "", fmt.Sprintf(`[dns]
resolvers = [%q]
[delivery]
port = %d
retry = ["1s"]
idle_timeout = "1s"
scan_interval = "200ms"
`, dns.Addr(), port))
	d.start()

	runSource := func(args ...string) {
		t.Helper()
		args = append(args, "-f", "loader@src.test", "-M", "smtp-source.client.test", "-l", "1024", d.smtp)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, source, args...).CombinedOutput()
		if err != nil || len(bytes.TrimSpace(out)) > 0 {
			t.Fatalf("smtp-source %v: %v\n%s", args, err, out)
		}
	}
	// 100 messages, 10 parallel sessions, a new connection per message.
	runSource("-s", "10", "-m", "100", "-t", "one@sink.test")
	// 100 messages over 5 reused connections, 3 recipients each.
	runSource("-d", "-s", "5", "-m", "100", "-r", "3", "-N", "-t", "many@sink.test")
	// One message whose content tests transparency on the way out: dot
	// lines, 8-bit octets, a 998-octet line.
	tricky := "Subject: tricky\r\n\r\n.\r\n..\r\n.leading\r\n\xe9t\xe9\r\n" + strings.Repeat("z", 998) + "\r\nend\r\n"
	script := `import smtplib, sys
s = smtplib.SMTP(sys.argv[1].rsplit(":",1)[0], int(sys.argv[1].rsplit(":",1)[1]), timeout=30)
s.ehlo("py.client.test")
s.sendmail("tricky@src.test", ["tricky@sink.test"], sys.stdin.buffer.read(), mail_options=["BODY=8BITMIME"])
# DSN parameters (RFC 3461) go on to smtp-sink, which offers DSN.
s.sendmail("dsn@src.test", ["dsn@sink.test"], b"Subject: dsn\r\n\r\nnotify\r\n",
           mail_options=["RET=HDRS", "ENVID=batch+2B7"], rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;list+2Bdsn@src.test"])
s.quit()`
	cmd := exec.Command(py, "-c", script, d.smtp)
	cmd.Stdin = strings.NewReader(tricky)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("python: %v\n%s", err, out)
	}

	const total = 202
	if got := d.metric("hermod_smtp_messages_received_total"); got != total {
		t.Errorf("hermod_smtp_messages_received_total = %v, want %d", got, total)
	}
	deadline := time.Now().Add(30 * time.Second)
	var dumps [][]byte
	for {
		dumps = sink.dumps(t)
		if len(dumps) >= total || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(dumps) != total {
		_, q := d.get("/api/queue")
		t.Fatalf("smtp-sink received %d transactions, want %d\nqueue: %.2000s\nlog: %.3000s", len(dumps), total, q, d.log.String())
	}
	rcpts, trickyOK, dsnOK := 0, false, false
	for _, b := range dumps {
		if bytes.Contains(b, []byte("Subject: dsn")) {
			dsnOK = bytes.Contains(b, []byte("X-Mail-Args: <dsn@src.test> RET=HDRS ENVID=batch+2B7")) &&
				bytes.Contains(b, []byte("X-Rcpt-Args: <dsn@sink.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;list+2Bdsn@src.test"))
			if !dsnOK {
				t.Errorf("DSN parameters not passed on:\n%q", b)
			}
		}
		rcpts += bytes.Count(b, []byte("\nX-Rcpt-Args: <"))
		if !bytes.Contains(b, []byte("\tby mx.e2e.test (Hermod) with ")) {
			t.Fatalf("dump without hermod's Received header: %.400q", b)
		}
		if bytes.Contains(b, []byte("Subject: tricky")) {
			// smtp-sink writes LF line endings.
			want := strings.ReplaceAll(tricky, "\r\n", "\n")
			trickyOK = bytes.Contains(b, []byte(want)) && bytes.Contains(b, []byte("X-Mail-Args: <tricky@src.test> BODY=8BITMIME"))
			if !trickyOK {
				t.Errorf("tricky message changed on the way:\n%q", b)
			}
		}
	}
	if rcpts != 100+300+2 {
		t.Errorf("smtp-sink saw %d recipients, want 402", rcpts)
	}
	if !dsnOK {
		t.Error("message with DSN parameters not delivered")
	}
	if !trickyOK {
		t.Error("tricky message not delivered intact")
	}
	// Everything delivered: the queue drains.
	deadline = time.Now().Add(10 * time.Second)
	for {
		_, q := d.get("/api/queue")
		if strings.TrimSpace(q) == "[]" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("queue not empty after delivery: %.2000s", q)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

var _ = tls.VersionTLS13

// TestE2EIDNRelayAndDelivery: internationalised domains (RFC 6531, RFC
// 5890). relay_domains match whether the configuration or the client uses
// the U-label or the A-label form, and mail to a U-label domain is routed
// through the DNS under its A-label and delivered with SMTPUTF8.
func TestE2EIDNRelayAndDelivery(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	const mxIP = "127.0.0.10"
	port := freePortOn(t, mxIP)
	sink, err := bench.NewSink(bench.SinkConfig{Listen: []string{fmt.Sprintf("%s:%d", mxIP, port)}, Hostname: "sink.test",
		Capture: []string{"bücher.test", "xn--bcher-kva.test", "müller.test", "xn--mller-kva.test"}, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sink.Close() })
	mx := func(host string) []bench.MX { return []bench.MX{{Host: host, Pref: 10, Addrs: []string{mxIP}}} }
	dns, err := bench.NewDNS(bench.DNSConfig{Listen: "127.0.0.1:0", Domains: 1, MX: []string{mxIP}, Extra: []string{}, TTL: 60,
		Zones: []bench.Zone{{Name: "xn--bcher-kva.test", MX: mx("mx.xn--bcher-kva.test")}, {Name: "xn--mller-kva.test", MX: mx("mx.xn--mller-kva.test")}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dns.Close() })
	dir := t.TempDir()
	d := writeConfig(t, dir, `relay_networks = ["192.0.2.0/24"]
relay_domains = ["xn--bcher-kva.test", "Müller.test"]`, fmt.Sprintf(`[dns]
resolvers = [%q]
[delivery]
port = %d
tls = "disabled"
retry = ["1s"]
idle_timeout = "1s"
scan_interval = "200ms"
`, dns.Addr(), port))
	d.start()

	s := dialRaw(t, d.smtp)
	s.cmd("EHLO idn.client.test")
	steps := []struct{ cmd, want string }{
		{"MAIL FROM:<sender@example.test> SMTPUTF8", "250"},
		{"RCPT TO:<ü@bücher.test>", "250 2.1.5"}, // U-label; config has the A-label
		{"RCPT TO:<ä@BÜCHER.test>", "250 2.1.5"}, // case folded
		{"RCPT TO:<ö@müller.test>", "250 2.1.5"}, // as configured
		{"RCPT TO:<x@bücher.evil.test>", "554 5.7.1"},
		{"DATA", "354"},
		{"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nGrüße\r\n.", "250 2.0.0"},
		{"MAIL FROM:<sender@example.test>", "250"},
		{"RCPT TO:<u@XN--BCHER-KVA.test>", "250 2.1.5"}, // A-label, no SMTPUTF8 needed
		{"RCPT TO:<m@xn--mller-kva.test>", "250 2.1.5"}, // config has the U-label
		{"DATA", "354"},
		{"Subject: ascii\r\n\r\nhi\r\n.", "250 2.0.0"},
		{"QUIT", "221"},
	}
	for _, st := range steps {
		if r := s.cmd(st.cmd); !strings.HasPrefix(r, st.want) {
			t.Fatalf("%q: %q, want %s", st.cmd, r, st.want)
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	count := func() int {
		n := 0
		for _, dom := range []string{"bücher.test", "xn--bcher-kva.test", "müller.test", "xn--mller-kva.test"} {
			for _, c := range sink.Captured(dom) {
				n += len(c.Rcpts)
			}
		}
		return n
	}
	for count() < 5 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if n := count(); n != 5 {
		_, q := d.get("/api/queue")
		t.Fatalf("%d of 5 recipients delivered to the IDN domains' MX\nqueue: %.3000s", n, q)
	}
	for _, c := range sink.Captured("bücher.test") {
		for _, r := range c.Rcpts {
			if r == "ü@bücher.test" && !bytes.Contains(c.Raw, []byte("Grüße")) {
				t.Errorf("UTF-8 message changed: %q", c.Raw)
			}
		}
	}
}

// TestE2EReceivedIPv6: over IPv6 the Received: header carries the client
// address as an RFC 5321 §4.1.3 address literal, [IPv6:...], which trace
// parsers expect.
func TestE2EReceivedIPv6(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	l6, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	addr6 := l6.Addr().String()
	l6.Close()
	dir := t.TempDir()
	d := writeConfig(t, dir, "", "")
	cfg, _ := os.ReadFile(d.cfg)
	cfg = bytes.Replace(cfg, []byte(fmt.Sprintf("listen = [%q]", d.smtp)), []byte(fmt.Sprintf("listen = [%q, %q]", d.smtp, addr6)), 1)
	os.WriteFile(d.cfg, cfg, 0o600)
	d.start()
	for _, a := range []string{addr6, d.smtp} {
		s := dialRaw(t, a)
		for _, c := range []string{"EHLO v6.client.test", "MAIL FROM:<a@x.test>", "RCPT TO:<b@y.test>", "DATA", "Subject: v6\r\n\r\nhi\r\n.", "QUIT"} {
			if r := s.cmd(c); r[0] != '2' && r[0] != '3' {
				t.Fatalf("%s %q: %q", a, c, r)
			}
		}
	}
	d.kill(syscall.SIGTERM)
	var got []string
	for _, m := range readSpool(t, dir) {
		got = append(got, string(m.body[:bytes.Index(m.body, []byte("\r\n"))]))
	}
	want := map[string]bool{"Received: from v6.client.test ([IPv6:::1])": true, "Received: from v6.client.test ([127.0.0.1])": true}
	for _, g := range got {
		delete(want, g)
	}
	if len(got) != 2 || len(want) != 0 {
		t.Fatalf("Received lines %q", got)
	}
}

// TestE2EHermodToHermod relays through one daemon to another: the first
// delivers with its own client (PIPELINING, CHUNKING: several MAIL/RCPT/
// "BDAT n LAST" transactions per write) and the second must take every
// message exactly as the first queued it.
func TestE2EHermodToHermod(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	dirB := t.TempDir()
	b := writeConfig(t, dirB, "", "")
	b.start()
	// A relay between the daemons that records what the first one sends.
	pl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pl.Close() })
	var wireMu sync.Mutex
	var sentToB bytes.Buffer
	go func() {
		for {
			cc, err := pl.Accept()
			if err != nil {
				return
			}
			go func() {
				defer cc.Close()
				up, err := net.DialTimeout("tcp", b.smtp, 5*time.Second)
				if err != nil {
					return
				}
				defer up.Close()
				go io.Copy(cc, up)
				buf := make([]byte, 32<<10)
				for {
					k, err := cc.Read(buf)
					if k > 0 {
						wireMu.Lock()
						sentToB.Write(buf[:k])
						wireMu.Unlock()
						if _, werr := up.Write(buf[:k]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	_, bPort, _ := net.SplitHostPort(pl.Addr().String())
	mx := []bench.MX{{Host: "mx.b.test", Pref: 10, Addrs: []string{"127.0.0.1"}}}
	dns, err := bench.NewDNS(bench.DNSConfig{Listen: "127.0.0.1:0", Domains: 1, MX: []string{"127.0.0.1"}, Extra: []string{}, TTL: 60,
		Zones: []bench.Zone{{Name: "b.test", MX: mx}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dns.Close() })
	dirA := t.TempDir()
	a := writeConfig(t, dirA, "", fmt.Sprintf(`[dns]
resolvers = [%q]
[delivery]
port = %s
tls = "disabled"
retry = ["1s"]
idle_timeout = "2s"
scan_interval = "200ms"
`, dns.Addr(), bPort))
	a.start()

	const n = 60
	bodies := make(map[string]string, n)
	var wire strings.Builder
	wire.WriteString("EHLO injector.test\r\n")
	for i := 0; i < n; i++ {
		subj := fmt.Sprintf("n%03d", i)
		var body string
		switch i % 6 {
		case 0:
			body = "Subject: " + subj + "\r\n\r\nplain\r\n"
		case 1:
			body = "Subject: " + subj + "\r\n\r\n.\r\n..\r\n.dot\r\n...\r\n"
		case 2:
			body = "Subject: " + subj + "\r\n\r\n" + strings.Repeat("w", 998) + "\r\n" + strings.Repeat("v", 997) + "\r\n"
		case 3:
			body = "Subject: " + subj + "\r\n\r\n\xe9\xe8\xff8bit\r\n"
		case 4:
			body = "Subject: " + subj + "\r\n\r\nGrüße, 世界\r\n"
		case 5:
			body = "Subject: " + subj + "\r\n\r\n" + strings.Repeat("line\r\n", 2000)
		}
		bodies[subj] = body
		params := ""
		switch i % 6 {
		case 3:
			params = " BODY=8BITMIME"
		case 4:
			params = " SMTPUTF8 BODY=8BITMIME"
		}
		fmt.Fprintf(&wire, "MAIL FROM:<s%d@a.test>%s\r\nRCPT TO:<r%d@b.test>\r\nRCPT TO:<q%d@b.test>\r\nDATA\r\n", i, params, i, i)
		// DATA content is dot-stuffed on the wire.
		for _, l := range strings.SplitAfter(body, "\r\n") {
			if strings.HasPrefix(l, ".") {
				wire.WriteString(".")
			}
			wire.WriteString(l)
		}
		wire.WriteString(".\r\n")
	}
	wire.WriteString("QUIT\r\n")
	c, err := net.DialTimeout("tcp", a.smtp, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	go c.Write([]byte(wire.String()))
	replies, _ := io.ReadAll(c)
	c.Close()
	if got := len(queuedRE.FindAll(replies, -1)); got != n {
		t.Fatalf("%d of %d messages accepted by the first daemon: %.2000s", got, n, replies)
	}
	deadline := time.Now().Add(30 * time.Second)
	for b.metric("hermod_smtp_messages_received_total") < n && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if got := b.metric("hermod_smtp_messages_received_total"); got != n {
		_, q := a.get("/api/queue")
		t.Fatalf("second daemon received %v of %d\nfirst's queue: %.3000s\nlog: %.3000s", got, n, q, a.log.String())
	}
	a.kill(syscall.SIGTERM)
	b.kill(syscall.SIGTERM)
	seen := 0
	for _, m := range readSpool(t, dirB) {
		checkQueuedBody(t, m.msg.ID.String(), m.body)
		i := bytes.Index(m.body, []byte("Subject: n"))
		if i < 0 {
			t.Errorf("unexpected message %q", m.body)
			continue
		}
		subj := string(m.body[i+9 : i+13])
		if !bytes.HasSuffix(m.body, []byte(bodies[subj])) || bytes.Count(m.body, []byte("Received: from ")) != 2 {
			t.Errorf("%s changed between the daemons:\n%q", subj, m.body)
		}
		if len(m.msg.Rcpts) != 2 {
			t.Errorf("%s: %d recipients", subj, len(m.msg.Rcpts))
		}
		seen++
	}
	if seen != n {
		t.Fatalf("%d messages in the second spool, want %d", seen, n)
	}
	wireMu.Lock()
	defer wireMu.Unlock()
	if bytes.Count(sentToB.Bytes(), []byte("\r\nBDAT ")) == 0 {
		t.Errorf("the first daemon did not use CHUNKING towards the second (%d octets sent)", sentToB.Len())
	}
	t.Logf("between the daemons: %d BDAT, %d DATA, %d RSET", bytes.Count(sentToB.Bytes(), []byte("\r\nBDAT ")),
		bytes.Count(sentToB.Bytes(), []byte("\r\nDATA\r\n")), bytes.Count(sentToB.Bytes(), []byte("\r\nRSET\r\n")))
}

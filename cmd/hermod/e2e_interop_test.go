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
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

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
	st, err := spool.Open(spool.Config{Dir: filepath.Join(dir, "spool")}, nil)
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
		{"<x@allowed.test> ORCPT=rfc822;victim@evil.test", "555 5.5.4"},
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
			if dom != "allowed.test" && dom != "bücher.test" || strings.ContainsAny(r.Addr[:strings.LastIndexByte(r.Addr, '@')], "%!@") {
				t.Errorf("open relay: queued recipient %q (domain %q)", r.Addr, r.Domain)
			}
		}
	}
	if friends != 4 {
		t.Errorf("%d allowed recipients queued, want 4", friends)
	}
}

var _ = io.EOF
var _ = fmt.Sprint

package main

// Black-box audit of the DSN extension (RFC 3461, RFC 3464, RFC 6533)
// against the real daemon: the syntax the server takes and refuses, what
// it keeps in the spool, what it passes on to a next hop that offers DSN
// (Postfix's smtp-sink), and the notifications it sends itself (bounces,
// "relayed" notices), read back with Python's email package.

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/bench"
	"github.com/hermod-mta/hermod/spool"
)

// TestE2EAuditDSNSyntax sends MAIL and RCPT commands with DSN parameters,
// valid and not, each on a fresh connection (the server counts errors), and
// checks the reply. Invalid syntax is 501 (RFC 3461 §5: "a syntax error in
// the parameters ... MUST be rejected with a 501"), an unknown parameter
// 555 (RFC 5321 §4.1.1.11); nothing crashes the daemon.
func TestE2EAuditDSNSyntax(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	d := writeConfig(t, t.TempDir(), "", "")
	d.start()
	const mail = "MAIL FROM:<a@x.test>"
	const mailUTF8 = "MAIL FROM:<a@x.test> SMTPUTF8"
	cases := []struct {
		name, pre, cmd, want string
	}{
		// MAIL: RET and ENVID (RFC 3461 §4.3, §4.4).
		{"ret envid lower case", "", "MAIL FROM:<a@x.test> ret=hdrs envid=abc", "250 "},
		{"ret twice", "", "MAIL FROM:<a@x.test> RET=FULL RET=HDRS", "501 5.5.4"},
		{"ret no value", "", "MAIL FROM:<a@x.test> RET", "501 5.5.4"},
		{"ret empty", "", "MAIL FROM:<a@x.test> RET=", "501 5.5.4"},
		{"ret unknown", "", "MAIL FROM:<a@x.test> RET=BOTH", "501 5.5.4"},
		{"envid no value", "", "MAIL FROM:<a@x.test> ENVID", "501 5.5.4"},
		{"envid empty", "", "MAIL FROM:<a@x.test> ENVID=", "501 5.5.4"},
		{"envid cut escape", "", "MAIL FROM:<a@x.test> ENVID=a+2", "501 5.5.4"},
		{"envid bad escape", "", "MAIL FROM:<a@x.test> ENVID=a+ZZ", "501 5.5.4"},
		{"envid raw equals", "", "MAIL FROM:<a@x.test> ENVID=a=b", "501 5.5.4"},
		{"envid NUL", "", "MAIL FROM:<a@x.test> ENVID=+00", "501 5.5.4"},
		{"envid CRLF", "", "MAIL FROM:<a@x.test> ENVID=a+0D+0Ab", "501 5.5.4"},
		{"envid 8-bit", "", "MAIL FROM:<a@x.test> ENVID=+E9", "501 5.5.4"},
		{"envid raw utf-8 under SMTPUTF8", "", "MAIL FROM:<a@x.test> SMTPUTF8 ENVID=\u00e9t\u00e9", "501 5.5.4"},
		{"envid space", "", "MAIL FROM:<a@x.test> ENVID=a+20b", "250 "},
		{"envid tab", "", "MAIL FROM:<a@x.test> ENVID=a+09b", "250 "},
		{"envid 100", "", "MAIL FROM:<a@x.test> ENVID=" + strings.Repeat("e", 100), "250 "},
		{"envid 101", "", "MAIL FROM:<a@x.test> ENVID=" + strings.Repeat("e", 101), "501 5.5.4"},
		{"envid twice", "", "MAIL FROM:<a@x.test> ENVID=a ENVID=b", "501 5.5.4"},
		{"all parameters", "", "MAIL FROM:<a@x.test> SIZE=100 BODY=8BITMIME SMTPUTF8 RET=FULL ENVID=Q+2B1", "250 "},
		{"null sender", "", "MAIL FROM:<> RET=HDRS ENVID=bounce", "250 "},
		{"size too big beats dsn", "", "MAIL FROM:<a@x.test> RET=FULL SIZE=99999999999", "552 5.3.4"},
		{"bad body with dsn", "", "MAIL FROM:<a@x.test> RET=FULL BODY=BINARYMIME", "555 5.5.4"},
		{"notify on MAIL", "", "MAIL FROM:<a@x.test> NOTIFY=NEVER", "555 5.5.4"},
		{"orcpt on MAIL", "", "MAIL FROM:<a@x.test> ORCPT=rfc822;a@b", "555 5.5.4"},
		// RCPT: NOTIFY (RFC 3461 §4.1).
		{"notify never lower", mail, "RCPT TO:<b@y.test> notify=never", "250 "},
		{"notify mixed case", mail, "RCPT TO:<b@y.test> Notify=Success,failure,DELAY", "250 "},
		{"notify never with others", mail, "RCPT TO:<b@y.test> NOTIFY=NEVER,SUCCESS", "501 5.5.4"},
		{"notify repeated keyword", mail, "RCPT TO:<b@y.test> NOTIFY=SUCCESS,SUCCESS", "501 5.5.4"},
		{"notify empty", mail, "RCPT TO:<b@y.test> NOTIFY=", "501 5.5.4"},
		{"notify no value", mail, "RCPT TO:<b@y.test> NOTIFY", "501 5.5.4"},
		{"notify trailing comma", mail, "RCPT TO:<b@y.test> NOTIFY=SUCCESS,", "501 5.5.4"},
		{"notify leading comma", mail, "RCPT TO:<b@y.test> NOTIFY=,SUCCESS", "501 5.5.4"},
		{"notify empty item", mail, "RCPT TO:<b@y.test> NOTIFY=SUCCESS,,FAILURE", "501 5.5.4"},
		{"notify spaces", mail, "RCPT TO:<b@y.test> NOTIFY=SUCCESS, FAILURE", "501 5.5.4"},
		{"notify twice", mail, "RCPT TO:<b@y.test> NOTIFY=SUCCESS NOTIFY=FAILURE", "501 5.5.4"},
		{"notify unknown", mail, "RCPT TO:<b@y.test> NOTIFY=ALWAYS", "501 5.5.4"},
		// RCPT: ORCPT (RFC 3461 §4.2, RFC 6533 §3).
		{"orcpt xtext", mail, "RCPT TO:<b@y.test> NOTIFY=FAILURE ORCPT=rfc822;a+2Bb@y.test", "250 "},
		{"orcpt upper type", mail, "RCPT TO:<b@y.test> ORCPT=RFC822;a@y.test", "250 "},
		{"orcpt x-400", mail, "RCPT TO:<b@y.test> ORCPT=x-400;c+3Dus+3Ba+3Db", "250 "},
		{"orcpt no type", mail, "RCPT TO:<b@y.test> ORCPT=a@y.test", "501 5.5.4"},
		{"orcpt type only", mail, "RCPT TO:<b@y.test> ORCPT=rfc822", "501 5.5.4"},
		{"orcpt empty type", mail, "RCPT TO:<b@y.test> ORCPT=;a@y.test", "501 5.5.4"},
		{"orcpt empty address", mail, "RCPT TO:<b@y.test> ORCPT=rfc822;", "501 5.5.4"},
		{"orcpt raw equals", mail, "RCPT TO:<b@y.test> ORCPT=x-400;c=us", "501 5.5.4"},
		{"orcpt bad escape", mail, "RCPT TO:<b@y.test> ORCPT=rfc822;a+ZZ@y.test", "501 5.5.4"},
		{"orcpt cut escape", mail, "RCPT TO:<b@y.test> ORCPT=rfc822;a@y.test+4", "501 5.5.4"},
		{"orcpt twice", mail, "RCPT TO:<b@y.test> ORCPT=rfc822;a@y.test ORCPT=rfc822;c@y.test", "501 5.5.4"},
		{"orcpt 500", mail, "RCPT TO:<b@y.test> ORCPT=rfc822;" + strings.Repeat("o", 493), "250 "},
		{"orcpt 501", mail, "RCPT TO:<b@y.test> ORCPT=rfc822;" + strings.Repeat("o", 494), "501 5.5.4"},
		{"orcpt raw utf-8 without SMTPUTF8", mail, "RCPT TO:<b@y.test> ORCPT=utf-8;j\u00f6rg@y.test", "501 5.5.4"},
		{"orcpt embedded unicode without SMTPUTF8", mail, `RCPT TO:<b@y.test> ORCPT=utf-8;j\x{F6}rg@y.test`, "250 "},
		{"orcpt raw utf-8 with SMTPUTF8", mailUTF8, "RCPT TO:<b@y.test> ORCPT=utf-8;j\u00f6rg@y.test", "250 "},
		{"orcpt utf-8 rcpt with SMTPUTF8", mailUTF8, "RCPT TO:<j\u00f6rg@y.test> NOTIFY=FAILURE ORCPT=utf-8;j\u00f6rg@y.test", "250 "},
		// RFC 6533 §3: raw UTF-8 (utf-8-addr-unitext) belongs to the utf-8
		// address type only; any other type is xtext, ASCII (RFC 3461 §4).
		// Taken, an rfc822 ORCPT would go on as "rfc822;j\x{F6}rg@...",
		// which the next hop reads literally.
		{"orcpt raw utf-8 in rfc822 with SMTPUTF8", mailUTF8, "RCPT TO:<b@y.test> ORCPT=rfc822;j\u00f6rg@y.test", "501 5.5.4"},
		{"orcpt upper-case utf-8 type with SMTPUTF8", mailUTF8, "RCPT TO:<b@y.test> ORCPT=UTF-8;j\u00f6rg@y.test", "250 "},
		{"orcpt invalid utf-8 with SMTPUTF8", mailUTF8, "RCPT TO:<b@y.test> ORCPT=utf-8;j\xff@y.test", "501 5.5.4"},
		{"orcpt truncated utf-8 with SMTPUTF8", mailUTF8, "RCPT TO:<b@y.test> ORCPT=utf-8;j\xc3", "501 5.5.4"},
		{"rcpt with MAIL parameters", mail, "RCPT TO:<b@y.test> RET=FULL", "555 5.5.4"},
		{"rcpt with ENVID", mail, "RCPT TO:<b@y.test> ENVID=x", "555 5.5.4"},
		{"rcpt bad dsn before unknown", mail, "RCPT TO:<b@y.test> NOTIFY=BOGUS X=1", "501 5.5.4"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := dialRaw(t, d.smtp)
			if r := s.cmd("EHLO audit.test"); !strings.Contains(r, "250-DSN\r\n") && !strings.Contains(r, "250 DSN\r\n") {
				t.Fatalf("EHLO does not offer DSN: %q", r)
			}
			if c.pre != "" {
				if r := s.cmd(c.pre); !strings.HasPrefix(r, "250 ") {
					t.Fatalf("%q: %q", c.pre, r)
				}
			}
			got := s.cmd(c.cmd)
			if !strings.HasPrefix(got, c.want) {
				t.Fatalf("%q: got %q, want %s", c.cmd, got, c.want)
			}
			// A refused parameter leaves the transaction as it was: after a
			// refused RCPT the MAIL still stands, after a refused MAIL a new
			// one is taken.
			if !strings.HasPrefix(got, "250") {
				next := "MAIL FROM:<a@x.test>"
				if strings.HasPrefix(c.cmd, "RCPT") {
					next = "RCPT TO:<ok@y.test>"
				}
				if r := s.cmd(next); !strings.HasPrefix(r, "250 ") {
					t.Fatalf("after the refusal %q: %q", next, r)
				}
			}
		})
	}
	if code, _ := d.get("/healthz"); code != 200 {
		t.Fatalf("daemon unhealthy after the syntax probes")
	}
}

// TestE2EAuditDSNSpooled checks what odd but valid DSN parameters become in
// the spool: the ENVID decoded (RFC 3461 §4.4), RET upper-cased, NOTIFY
// flags, ORCPT kept as received.
func TestE2EAuditDSNSpooled(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	dir := t.TempDir()
	d := writeConfig(t, dir, "", "")
	d.start()
	s := dialRaw(t, d.smtp)
	s.cmd("EHLO audit.test")
	for _, l := range []string{
		"MAIL FROM:<dsn@x.test> rEt=hDrS EnViD=id+2Bwith+20space+3Dand+09tab SMTPUTF8",
		"RCPT TO:<one@y.test> nOtIfY=delay,Success",
		"RCPT TO:<two@y.test> ORCPT=Utf-8;j\u00f6rg+2B@list.test",
		"RCPT TO:<three@y.test> NOTIFY=NEVER ORCPT=x-400;c+3Dus",
		"RCPT TO:<four@y.test>",
	} {
		if r := s.cmd(l); !strings.HasPrefix(r, "250 ") {
			t.Fatalf("%q: %q", l, r)
		}
	}
	if r := s.cmd("DATA"); !strings.HasPrefix(r, "354") {
		t.Fatalf("DATA: %q", r)
	}
	r := s.cmd("Subject: spooled\r\n\r\nbody\r\n.")
	if !queuedRE.MatchString(r) {
		t.Fatalf("end of data: %q", r)
	}
	s.cmd("QUIT")
	d.kill(syscall.SIGTERM)
	msgs := readSpool(t, dir)
	if len(msgs) != 1 {
		t.Fatalf("%d messages spooled, want 1", len(msgs))
	}
	m := msgs[0].msg
	if m.EnvID != "id+with space=and\ttab" || m.Ret != "HDRS" || !m.SMTPUTF8 {
		t.Errorf("envelope: EnvID %q Ret %q SMTPUTF8 %v", m.EnvID, m.Ret, m.SMTPUTF8)
	}
	want := []struct {
		notify uint8
		orcpt  string
	}{
		{spool.NotifyDelay | spool.NotifySuccess, ""},
		{0, "Utf-8;j\u00f6rg+2B@list.test"},
		{spool.NotifyNever, "x-400;c+3Dus"},
		{0, ""},
	}
	if len(m.Rcpts) != len(want) {
		t.Fatalf("%d recipients spooled", len(m.Rcpts))
	}
	for i, w := range want {
		if r := m.Rcpts[i]; r.Notify != w.notify || r.ORcpt != w.orcpt {
			t.Errorf("recipient %s: Notify %b ORcpt %q, want %b %q", r.Addr, r.Notify, r.ORcpt, w.notify, w.orcpt)
		}
	}
}

// dsnWorld is a loopback world for the DSN reports: one port on several
// 127.0.0.x addresses; bench.Sink (no DSN) on .2 for plain.test (accepts),
// reject.test (550 to every RCPT) and sender.test (captures the
// notifications); Postfix's smtp-sink (offers DSN) on .12 for dsnhop.test
// and, refusing every RCPT with 5xx, on .13 for dsnreject.test.
type dsnWorld struct {
	sink        *bench.Sink
	hop, refuse *smtpSink
	config      string
}

func newDSNWorld(t *testing.T) *dsnWorld {
	t.Helper()
	port := freePortOn(t, "127.0.0.12")
	w := &dsnWorld{}
	w.hop = startSMTPSink(t, fmt.Sprintf("127.0.0.12:%d", port))
	w.refuse = startSMTPSinkArgs(t, fmt.Sprintf("127.0.0.13:%d", port), "-f", "RCPT")
	mx := func(host, ip string) []bench.MX { return []bench.MX{{Host: host, Pref: 10, Addrs: []string{ip}}} }
	dns, err := bench.NewDNS(bench.DNSConfig{Listen: "127.0.0.1:0", Domains: 1, MX: []string{"127.0.0.2"}, Extra: []string{}, TTL: 60,
		Zones: []bench.Zone{
			{Name: "plain.test", MX: mx("mx.plain.test", "127.0.0.2")},
			{Name: "reject.test", MX: mx("mx.reject.test", "127.0.0.2")},
			{Name: "sender.test", MX: mx("mx.sender.test", "127.0.0.2")},
			{Name: "dsnhop.test", MX: mx("mx.dsnhop.test", "127.0.0.12")},
			{Name: "dsnreject.test", MX: mx("mx.dsnreject.test", "127.0.0.13")},
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dns.Close() })
	w.sink, err = bench.NewSink(bench.SinkConfig{
		Listen:   []string{fmt.Sprintf("127.0.0.2:%d", port)},
		Hostname: "sink.test",
		Capture:  []string{"plain.test", "sender.test"},
		Seed:     1,
		Faults:   bench.Faults{Domain: map[string]bench.FaultRule{"reject.test": {Rcpt: map[string]float64{"550": 1}}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.sink.Close() })
	w.config = fastDelivery(dns.Addr(), port)
	return w
}

// dsnParsed is what pyDSNParser reports about one notification.
type dsnParsed struct {
	Defects    []string            `json:"defects"`
	Type       string              `json:"type"`
	ReportType string              `json:"report_type"`
	Parts      []string            `json:"parts"`
	From       string              `json:"from"`
	ToAddr     string              `json:"to"`
	Auto       string              `json:"auto"`
	PerMessage map[string]string   `json:"per_message"`
	PerRcpt    []map[string]string `json:"per_rcpt"`
	OrigSubj   string              `json:"orig_subject"`
	OrigBody   string              `json:"orig_body"`
}

// pyDSNParser reads a JSON list of base64 messages on stdin and prints, for
// each, its structure as Python's email package (RFC 3464/6522-aware: a
// message/delivery-status part is a list of field blocks) sees it.
const pyDSNParser = `
import sys, json, base64, email, email.policy
from email import message_from_bytes
def rawpart(raw, m, i):
    # The content of part i of m as sent (UTF-8 text): the email package
    # decodes the headers of message/* parts it does not know lossily.
    b = ("--" + m.get_boundary()).encode()
    part = raw.split(b)[i + 1]
    return part.split(b"\r\n\r\n", 1)[1].decode("utf-8")
out = []
for raw in json.load(sys.stdin):
    raw = base64.b64decode(raw)
    m = message_from_bytes(raw, policy=email.policy.default)
    r = {"defects": [repr(d) for d in m.defects], "type": m.get_content_type(),
         "report_type": m.get_param("report-type") or "", "parts": [], "from": str(m["From"]),
         "to": str(m["To"]), "auto": str(m["Auto-Submitted"]), "per_message": {}, "per_rcpt": [],
         "orig_subject": "", "orig_body": ""}
    if m.is_multipart():
        for i, p in enumerate(m.get_payload()):
            r["defects"] += [repr(d) for d in p.defects]
            ct = p.get_content_type()
            r["parts"].append(ct)
            if ct == "message/delivery-status":
                blocks = p.get_payload()
                r["per_message"] = {k.lower(): str(v) for k, v in blocks[0].items()}
                r["per_rcpt"] = [{k.lower(): str(v) for k, v in b.items()} for b in blocks[1:]]
            elif ct == "message/global-delivery-status":
                # Not known to the email package: split the blocks by hand
                # (RFC 6533 §6.1: same syntax, UTF-8 allowed).
                text = rawpart(raw, m, i)
                blocks = [b for b in text.replace("\r\n", "\n").split("\n\n") if b.strip()]
                parse = lambda b: {k.lower(): str(v) for k, v in email.message_from_string(b + "\n\n").items()}
                r["per_message"] = parse(blocks[0])
                r["per_rcpt"] = [parse(b) for b in blocks[1:]]
            elif ct in ("message/rfc822", "message/global"):
                o = p.get_payload()[0] if isinstance(p.get_payload(), list) else message_from_bytes(p.get_payload(decode=True))
                r["orig_subject"] = str(o["Subject"])
                r["orig_body"] = o.get_payload() if isinstance(o.get_payload(), str) else ""
            elif ct in ("text/rfc822-headers", "message/global-headers"):
                o = email.message_from_string(rawpart(raw, m, i))
                r["orig_subject"] = str(o["Subject"])
    out.append(r)
json.dump(out, sys.stdout)
`

// parseDSNs runs pyDSNParser over raw messages.
func parseDSNs(t *testing.T, raws [][]byte) []dsnParsed {
	t.Helper()
	py := needTool(t, "python3", "python3")
	var in []string
	for _, r := range raws {
		in = append(in, base64.StdEncoding.EncodeToString(r))
	}
	js, _ := json.Marshal(in)
	cmd := exec.Command(py, "-c", pyDSNParser)
	cmd.Stdin = bytes.NewReader(js)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("python email: %v\n%s", err, stderr.String())
	}
	var res []dsnParsed
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("python output: %v\n%s", err, out)
	}
	return res
}

// TestE2EAuditDSNReports drives the notifications Hermod sends: bounces
// with RET=FULL and RET=HDRS and an ENVID, NOTIFY=NEVER (none), NOTIFY=
// SUCCESS through a next hop without DSN ("relayed", RFC 3461 §6.2.2) and
// through one with DSN (none from us: the next hop reports), NOTIFY=FAILURE
// on success (none), a UTF-8 ORCPT in an SMTPUTF8 transaction (RFC 6533
// global types), a refusal by a next hop that offers DSN (we report: it
// refused in the SMTP dialogue); and the DSN parameters passed on to
// smtp-sink, re-encoded as xtext.
func TestE2EAuditDSNReports(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	w := newDSNWorld(t)
	d := writeConfig(t, t.TempDir(), "", w.config)
	d.start()

	type msg struct {
		mail, body string
		rcpts      []string
	}
	send := func(m msg) {
		t.Helper()
		s := dialRaw(t, d.smtp)
		s.cmd("EHLO audit.test")
		for _, l := range append([]string{m.mail}, m.rcpts...) {
			if r := s.cmd(l); !strings.HasPrefix(r, "250 ") {
				t.Fatalf("%q: %q", l, r)
			}
		}
		s.cmd("DATA")
		if r := s.cmd(m.body + "."); !queuedRE.MatchString(r) {
			t.Fatalf("not queued: %q", r)
		}
		s.cmd("QUIT")
	}
	body := func(subj string) string {
		return "From: <x@sender.test>\r\nSubject: " + subj + "\r\nMessage-ID: <" + subj + "@audit.test>\r\n\r\nthe body of " + subj + "\r\n"
	}
	send(msg{"MAIL FROM:<full@sender.test> RET=FULL ENVID=audit+2B1+20x", body("full"),
		[]string{"RCPT TO:<nobody@reject.test> NOTIFY=FAILURE ORCPT=rfc822;orig+2Bfail@list.test"}})
	send(msg{"MAIL FROM:<hdrs@sender.test> RET=HDRS", body("hdrs"), []string{"RCPT TO:<nobody@reject.test>"}})
	send(msg{"MAIL FROM:<never@sender.test> RET=FULL ENVID=never", body("never"), []string{"RCPT TO:<nobody@reject.test> NOTIFY=NEVER"}})
	send(msg{"MAIL FROM:<relayed@sender.test> ENVID=rel+3D1", body("relayed"),
		[]string{"RCPT TO:<u@plain.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@plain.test"}})
	send(msg{"MAIL FROM:<fonly@sender.test>", body("fonly"), []string{"RCPT TO:<v@plain.test> NOTIFY=FAILURE"}})
	send(msg{"MAIL FROM:<hop@sender.test> SMTPUTF8 RET=HDRS ENVID=hop+20id+09t", body("hop"),
		[]string{"RCPT TO:<h@dsnhop.test> notify=success ORCPT=utf-8;j\u00f6rg@list.test", "RCPT TO:<i@dsnhop.test> ORCPT=rfc822;i+2Bj@list.test"}})
	send(msg{"MAIL FROM:<utf@sender.test> SMTPUTF8 RET=FULL", body("utf"),
		[]string{"RCPT TO:<nobody@reject.test> ORCPT=utf-8;j\u00f6rg@list.test"}})
	send(msg{"MAIL FROM:<hopref@sender.test> ENVID=hopref", body("hopref"),
		[]string{"RCPT TO:<r@dsnreject.test> NOTIFY=FAILURE,DELAY"}})

	// Expected notifications, by recipient (the original sender).
	const wantN = 5 // full, hdrs, relayed, utf, hopref
	deadline := time.Now().Add(30 * time.Second)
	for len(w.sink.Captured("sender.test")) < wantN && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(2 * time.Second) // an extra one (never, fonly, hop) would come now
	caps := w.sink.Captured("sender.test")
	byRcpt := map[string][]byte{}
	var raws [][]byte
	var who []string
	for _, c := range caps {
		if c.From != "" {
			t.Errorf("notification from <%s>, want <>", c.From)
		}
		for _, r := range c.Rcpts {
			if _, dup := byRcpt[r]; dup {
				t.Errorf("two notifications to %s", r)
			}
			byRcpt[r] = c.Raw
			raws = append(raws, c.Raw)
			who = append(who, r)
		}
	}
	for _, r := range []string{"never@sender.test", "fonly@sender.test", "hop@sender.test"} {
		if b, ok := byRcpt[r]; ok {
			t.Errorf("unwanted notification to %s:\n%s", r, b)
		}
	}
	if len(caps) != wantN {
		_, q := d.get("/api/queue")
		t.Fatalf("%d notifications, want %d (to %v)\nqueue: %.2000s\nlog: %.3000s", len(caps), wantN, who, q, d.log.String())
	}
	if os.Getenv("AUDIT_DUMP") != "" {
		for i, r := range raws {
			t.Logf("notification to %s:\n%s", who[i], r)
		}
	}
	parsed := parseDSNs(t, raws)
	got := map[string]dsnParsed{}
	for i, p := range parsed {
		got[who[i]] = p
		if len(p.Defects) > 0 {
			t.Errorf("%s: MIME defects %v", who[i], p.Defects)
		}
		if p.Type != "multipart/report" || !strings.Contains(p.From, "MAILER-DAEMON@mx.e2e.test") ||
			p.ToAddr != who[i] || p.Auto != "auto-replied" || len(p.Parts) != 3 || len(p.PerRcpt) != 1 {
			t.Errorf("%s: %+v", who[i], p)
		}
		if rm := p.PerMessage["reporting-mta"]; rm != "dns; mx.e2e.test" {
			t.Errorf("%s: Reporting-MTA %q", who[i], rm)
		}
	}
	status5 := regexp.MustCompile(`^5\.\d{1,3}\.\d{1,3}$`)
	check := func(rcpt, reportType string, parts []string, envid, orcpt, final, action string, status *regexp.Regexp, origSubj string) {
		t.Helper()
		p, ok := got[rcpt]
		if !ok {
			t.Errorf("no notification to %s", rcpt)
			return
		}
		if p.ReportType != reportType || strings.Join(p.Parts, " ") != strings.Join(parts, " ") {
			t.Errorf("%s: report-type %q parts %v, want %q %v", rcpt, p.ReportType, p.Parts, reportType, parts)
		}
		if len(p.PerRcpt) != 1 {
			return
		}
		f := p.PerRcpt[0]
		if p.PerMessage["original-envelope-id"] != envid {
			t.Errorf("%s: Original-Envelope-Id %q, want %q", rcpt, p.PerMessage["original-envelope-id"], envid)
		}
		if f["original-recipient"] != orcpt || f["final-recipient"] != final || f["action"] != action || !status.MatchString(f["status"]) {
			t.Errorf("%s: recipient fields %q", rcpt, f)
		}
		if p.OrigSubj != origSubj {
			t.Errorf("%s: returned original's Subject %q, want %q", rcpt, p.OrigSubj, origSubj)
		}
	}
	check("full@sender.test", "delivery-status", []string{"text/plain", "message/delivery-status", "message/rfc822"},
		"audit+1 x", "rfc822; orig+fail@list.test", "rfc822; nobody@reject.test", "failed", status5, "full")
	if p := got["full@sender.test"]; !strings.Contains(p.OrigBody, "the body of full") {
		t.Errorf("RET=FULL: the body is not returned: %q", p.OrigBody)
	}
	check("hdrs@sender.test", "delivery-status", []string{"text/plain", "message/delivery-status", "text/rfc822-headers"},
		"", "", "rfc822; nobody@reject.test", "failed", status5, "hdrs")
	check("relayed@sender.test", "delivery-status", []string{"text/plain", "message/delivery-status", "text/rfc822-headers"},
		"rel=1", "rfc822; u@plain.test", "rfc822; u@plain.test", "relayed", regexp.MustCompile(`^2\.\d{1,3}\.\d{1,3}$`), "relayed")
	check("utf@sender.test", "global-delivery-status", []string{"text/plain", "message/global-delivery-status", "message/global"},
		"", "utf-8; j\u00f6rg@list.test", "rfc822; nobody@reject.test", "failed", status5, "utf")
	check("hopref@sender.test", "delivery-status", []string{"text/plain", "message/delivery-status", "text/rfc822-headers"},
		"hopref", "", "rfc822; r@dsnreject.test", "failed", status5, "hopref")
	if f := got["relayed@sender.test"].PerRcpt; len(f) == 1 && !strings.HasPrefix(f[0]["remote-mta"], "dns; ") {
		t.Errorf("relayed: Remote-MTA %q", f[0]["remote-mta"])
	}
	if f := got["full@sender.test"].PerRcpt; len(f) == 1 && !strings.HasPrefix(f[0]["diagnostic-code"], "smtp; 550") {
		t.Errorf("bounce: Diagnostic-Code %q", f[0]["diagnostic-code"])
	}

	// What went on to the next hop that offers DSN (smtp-sink's dump).
	deadline = time.Now().Add(10 * time.Second)
	var dumps [][]byte
	for len(dumps) == 0 && time.Now().Before(deadline) {
		dumps = w.hop.dumps(t)
		time.Sleep(50 * time.Millisecond)
	}
	if len(dumps) != 1 {
		t.Fatalf("smtp-sink got %d transactions, want 1", len(dumps))
	}
	for _, want := range []string{
		"X-Mail-Args: <hop@sender.test> RET=HDRS ENVID=hop+20id+09t\n",
		"X-Rcpt-Args: <h@dsnhop.test> NOTIFY=SUCCESS ORCPT=utf-8;j\\x{F6}rg@list.test\n",
		"X-Rcpt-Args: <i@dsnhop.test> ORCPT=rfc822;i+2Bj@list.test\n",
	} {
		if !bytes.Contains(dumps[0], []byte(want)) {
			t.Errorf("next hop did not get %q:\n%s", want, dumps[0])
		}
	}
}

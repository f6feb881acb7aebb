package engine

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/mail"
	"net/textproto"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/spool"
)

var dsnUpdate = flag.Bool("dsn-update", false, "rewrite the DSN golden files in testdata/dsn")

var (
	dsnTestNow      = time.Date(2026, 11, 24, 10, 30, 0, 0, time.UTC)
	dsnTestReceived = dsnTestNow.Add(-2 * time.Hour)
)

const dsnTestHeaders = "Received: from client.example.org ([192.0.2.7])\r\n" +
	"\tby mx.hermod.test (Hermod) with ESMTP id 01abcdefghjkmnpq; Tue, 24 Nov 2026 08:30:00 +0000\r\n" +
	"From: Alice <alice@example.org>\r\n" +
	"To: Bob <bob@example.com>, carol@example.net\r\n" +
	"Subject: Quarterly figures\r\n" +
	"Message-ID: <q3@example.org>\r\n" +
	"Date: Tue, 24 Nov 2026 08:29:58 +0000\r\n"

const dsnTestBody = dsnTestHeaders + "\r\nHello Bob,\r\n\r\nthe figures are attached.\r\n"

// dsnTestInput returns a canonical input: two recipients, one failed.
func dsnTestInput() DSNInput {
	return DSNInput{
		ReportingMTA: "mx.hermod.test",
		Msg: &spool.Message{
			ID:       spool.MakeID(dsnTestReceived.UnixMicro(), 1),
			From:     "alice@example.org",
			Received: dsnTestReceived,
			EnvID:    "QQ314159",
			Rcpts: []spool.Recipient{
				{Index: 0, Addr: "bob@example.com", ORcpt: "rfc822;Bob+2Bfigures@example.com", Notify: spool.NotifyFailure | spool.NotifyDelay},
				{Index: 1, Addr: "carol@example.net"},
			},
		},
		Body: []byte(dsnTestBody),
		Rcpts: []DSNRecipient{{
			Addr: "bob@example.com", Action: DSNFailed, RemoteMTA: "mx1.example.com",
			Diagnostic:  "550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown in virtual mailbox table",
			LastAttempt: dsnTestNow.Add(-time.Minute),
		}},
		Now: dsnTestNow,
	}
}

// dsnParsed is a DSN taken apart by the standard library.
type dsnParsed struct {
	hdr      mail.Header
	boundary string
	parts    []dsnPart
	text     string                 // part 1, transfer-decoded
	perMsg   textproto.MIMEHeader   // part 2, first block
	perRcpt  []textproto.MIMEHeader // part 2, the other blocks
	original []byte                 // part 3, raw
}

type dsnPart struct {
	hdr textproto.MIMEHeader
	raw []byte
}

// dsnCheckWire checks the framing rules every DSN must keep: CRLF line
// ends only, no line over 998 octets, a final CRLF.
func dsnCheckWire(t testing.TB, b []byte) {
	t.Helper()
	if !bytes.HasSuffix(b, []byte("\r\n")) {
		t.Fatalf("message does not end in CRLF")
	}
	line := 0
	for i, c := range b {
		switch c {
		case '\r':
			if i+1 >= len(b) || b[i+1] != '\n' {
				t.Fatalf("bare CR at offset %d", i)
			}
		case '\n':
			if i == 0 || b[i-1] != '\r' {
				t.Fatalf("bare LF at offset %d", i)
			}
			if line-1 > 998 {
				t.Fatalf("line of %d octets ends at offset %d", line-1, i)
			}
			line = 0
			continue
		}
		line++
	}
}

// dsnParse checks the structure every DSN must have (RFC 3464 §2, RFC
// 6522) and returns its pieces.
func dsnParse(t testing.TB, b []byte) *dsnParsed {
	t.Helper()
	dsnCheckWire(t, b)
	msg, err := mail.ReadMessage(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("net/mail: %v", err)
	}
	p := &dsnParsed{hdr: msg.Header}
	for _, h := range []string{"From", "To", "Subject", "Date", "Message-Id", "Auto-Submitted", "Mime-Version", "Content-Type"} {
		if len(msg.Header[h]) != 1 {
			t.Fatalf("header %s appears %d times, want once", h, len(msg.Header[h]))
		}
	}
	if _, err := msg.Header.Date(); err != nil {
		t.Fatalf("Date: %v", err)
	}
	if a, err := msg.Header.AddressList("From"); err != nil || len(a) != 1 || !strings.HasPrefix(a[0].Address, "MAILER-DAEMON@") {
		t.Fatalf("From: %v %v", a, err)
	}
	if got := msg.Header.Get("Auto-Submitted"); got != "auto-replied" {
		t.Fatalf("Auto-Submitted: %q", got)
	}
	if id := msg.Header.Get("Message-Id"); !strings.HasPrefix(id, "<") || !strings.HasSuffix(id, ">") || !strings.Contains(id, "@") {
		t.Fatalf("Message-ID: %q", id)
	}
	mt, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/report" {
		t.Fatalf("Content-Type: %q %v", mt, err)
	}
	p.boundary = params["boundary"]
	if p.boundary == "" || len(p.boundary) > 70 {
		t.Fatalf("boundary %q", p.boundary)
	}
	mr := multipart.NewReader(msg.Body, p.boundary)
	for {
		part, err := mr.NextRawPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("part %d: %v", len(p.parts), err)
		}
		raw, err := io.ReadAll(part)
		if err != nil {
			t.Fatalf("part %d: %v", len(p.parts), err)
		}
		if bytes.Contains(raw, []byte(p.boundary)) {
			t.Fatalf("part %d contains the boundary", len(p.parts))
		}
		p.parts = append(p.parts, dsnPart{hdr: part.Header, raw: raw})
	}
	if len(p.parts) != 3 {
		t.Fatalf("%d parts, want 3", len(p.parts))
	}
	// Part 1: human-readable.
	if mt, _, _ := mime.ParseMediaType(p.parts[0].hdr.Get("Content-Type")); mt != "text/plain" {
		t.Fatalf("part 1 is %q", mt)
	}
	text := p.parts[0].raw
	if p.parts[0].hdr.Get("Content-Transfer-Encoding") == "quoted-printable" {
		text, err = io.ReadAll(quotedprintable.NewReader(bytes.NewReader(text)))
		if err != nil {
			t.Fatalf("part 1 QP: %v", err)
		}
	}
	if !isASCII(p.parts[0].raw) {
		t.Fatalf("part 1 is not 7-bit")
	}
	p.text = string(text)
	// Part 2: the report; its type matches report-type.
	mt2, _, _ := mime.ParseMediaType(p.parts[1].hdr.Get("Content-Type"))
	if mt2 != "message/"+params["report-type"] {
		t.Fatalf("part 2 is %q, report-type %q", mt2, params["report-type"])
	}
	tr := textproto.NewReader(bufio.NewReader(bytes.NewReader(p.parts[1].raw)))
	for {
		h, err := tr.ReadMIMEHeader()
		if len(h) > 0 {
			if p.perMsg == nil {
				p.perMsg = h
			} else {
				p.perRcpt = append(p.perRcpt, h)
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("delivery-status: %v", err)
		}
	}
	if rm := p.perMsg.Get("Reporting-Mta"); !strings.HasPrefix(rm, "dns; ") {
		t.Fatalf("Reporting-MTA: %q", rm)
	}
	if len(p.perRcpt) == 0 {
		t.Fatalf("no per-recipient fields")
	}
	for i, r := range p.perRcpt {
		for _, f := range []string{"Final-Recipient", "Action", "Status"} {
			if len(r[f]) != 1 {
				t.Fatalf("recipient %d: %s appears %d times", i, f, len(r[f]))
			}
		}
		if typ, _, ok := strings.Cut(r.Get("Final-Recipient"), "; "); !ok || (typ != "rfc822" && typ != "utf-8") {
			t.Fatalf("recipient %d: Final-Recipient %q", i, r.Get("Final-Recipient"))
		}
		if _, ok := dsnActionNotify(r.Get("Action")); !ok {
			t.Fatalf("recipient %d: Action %q", i, r.Get("Action"))
		}
		if !dsnValidStatus(r.Get("Status")) {
			t.Fatalf("recipient %d: Status %q", i, r.Get("Status"))
		}
		for _, f := range []string{"Last-Attempt-Date", "Will-Retry-Until"} {
			if v := r.Get(f); v != "" {
				if _, err := mail.ParseDate(v); err != nil {
					t.Fatalf("recipient %d: %s %q: %v", i, f, v, err)
				}
			}
		}
	}
	p.original = p.parts[2].raw
	return p
}

func isASCII(b []byte) bool { return dsnASCIIBytes(b) }

func (p *dsnParsed) partType(i int) string {
	mt, _, _ := mime.ParseMediaType(p.parts[i].hdr.Get("Content-Type"))
	return mt
}

// build runs BuildDSN and expects a DSN.
func dsnBuild(t *testing.T, in DSNInput) (DSN, *dsnParsed) {
	t.Helper()
	d, ok, err := BuildDSN(in)
	if err != nil || !ok {
		t.Fatalf("BuildDSN: ok=%v err=%v", ok, err)
	}
	if d.Rcpt != in.Msg.From {
		t.Fatalf("envelope recipient %q, want %q", d.Rcpt, in.Msg.From)
	}
	if got := !isASCII(d.Body); got != d.Body8Bit {
		t.Fatalf("Body8Bit = %v, but body has 8-bit octets: %v", d.Body8Bit, got)
	}
	return d, dsnParse(t, d.Body)
}

func TestBuildDSN(t *testing.T) {
	big := dsnTestHeaders + "\r\n" + strings.Repeat("0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n", 2000)
	cases := []struct {
		name  string
		edit  func(in *DSNInput)
		check func(t *testing.T, d DSN, p *dsnParsed)
	}{
		{"failed", nil, func(t *testing.T, d DSN, p *dsnParsed) {
			if got := p.hdr.Get("Subject"); got != "Undelivered Mail Returned to Sender" {
				t.Errorf("Subject %q", got)
			}
			if a, err := p.hdr.AddressList("To"); err != nil || len(a) != 1 || a[0].Address != "alice@example.org" {
				t.Errorf("To: %v %v", a, err)
			}
			if p.hdr.Get("Content-Type") != `multipart/report; report-type=delivery-status; boundary="`+p.boundary+`"` {
				t.Errorf("Content-Type %q", p.hdr.Get("Content-Type"))
			}
			m := p.perMsg
			if m.Get("Reporting-Mta") != "dns; mx.hermod.test" || m.Get("Original-Envelope-Id") != "QQ314159" ||
				m.Get("Arrival-Date") != dsnTestReceived.Format(time.RFC1123Z) {
				t.Errorf("per-message fields %v", m)
			}
			if len(p.perRcpt) != 1 {
				t.Fatalf("%d recipients", len(p.perRcpt))
			}
			r := p.perRcpt[0]
			want := map[string]string{
				"Original-Recipient": "rfc822; Bob+figures@example.com",
				"Final-Recipient":    "rfc822; bob@example.com",
				"Action":             "failed",
				"Status":             "5.1.1",
				"Remote-Mta":         "dns; mx1.example.com",
				"Diagnostic-Code":    "smtp; 550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown in virtual mailbox table",
				"Last-Attempt-Date":  dsnTestNow.Add(-time.Minute).Format(time.RFC1123Z),
			}
			for k, v := range want {
				if got := r.Get(k); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
			if r.Get("Will-Retry-Until") != "" {
				t.Errorf("Will-Retry-Until in a failed report")
			}
			if p.partType(1) != "message/delivery-status" || p.partType(2) != "text/rfc822-headers" {
				t.Errorf("parts %s %s", p.partType(1), p.partType(2))
			}
			if string(p.original) != dsnTestHeaders {
				t.Errorf("returned headers:\n%q\nwant\n%q", p.original, dsnTestHeaders)
			}
			if !strings.Contains(p.text, "<bob@example.com>: delivery failed (5.1.1)") ||
				!strings.Contains(p.text, "mx1.example.com said: 550 5.1.1") {
				t.Errorf("text part:\n%s", p.text)
			}
			if d.Body8Bit || d.SMTPUTF8 || len(d.Reported) != 1 || d.Reported[0] != 0 {
				t.Errorf("DSN %+v", d)
			}
			if p.hdr.Get("Content-Transfer-Encoding") != "7bit" {
				t.Errorf("top-level CTE %q", p.hdr.Get("Content-Transfer-Encoding"))
			}
		}},
		{"delayed", func(in *DSNInput) {
			in.Msg.Ret = "FULL" // RET applies to failed DSNs only
			in.Rcpts[0] = DSNRecipient{Addr: "bob@example.com", Action: DSNDelayed, Diagnostic: "451 4.7.1 greylisted, try again later",
				RemoteMTA: "mx1.example.com", LastAttempt: dsnTestNow, WillRetryUntil: dsnTestNow.Add(72 * time.Hour)}
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if got := p.hdr.Get("Subject"); got != "Delayed Mail (still being retried)" {
				t.Errorf("Subject %q", got)
			}
			r := p.perRcpt[0]
			if r.Get("Action") != "delayed" || r.Get("Status") != "4.7.1" ||
				r.Get("Will-Retry-Until") != dsnTestNow.Add(72*time.Hour).Format(time.RFC1123Z) {
				t.Errorf("recipient fields %v", r)
			}
			if p.partType(2) != "text/rfc822-headers" {
				t.Errorf("delayed DSN returns %s", p.partType(2))
			}
			if !strings.Contains(p.text, "still being retried") || !strings.Contains(p.text, "Will retry until") {
				t.Errorf("text part:\n%s", p.text)
			}
		}},
		{"mixed", func(in *DSNInput) {
			in.Rcpts = append(in.Rcpts, DSNRecipient{Addr: "carol@example.net", Action: DSNDelayed, Diagnostic: "connect to mx.example.net: connection refused"})
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if got := p.hdr.Get("Subject"); got != "Undelivered Mail Returned to Sender" {
				t.Errorf("Subject %q", got)
			}
			if len(p.perRcpt) != 2 || p.perRcpt[0].Get("Action") != "failed" || p.perRcpt[1].Get("Action") != "delayed" {
				t.Fatalf("recipients %v", p.perRcpt)
			}
			c := p.perRcpt[1]
			if c.Get("Final-Recipient") != "rfc822; carol@example.net" || c.Get("Status") != "4.0.0" ||
				c.Get("Diagnostic-Code") != "X-Hermod; connect to mx.example.net: connection refused" ||
				c.Get("Original-Recipient") != "" || c.Get("Remote-Mta") != "" || c.Get("Last-Attempt-Date") != "" {
				t.Errorf("carol: %v", c)
			}
			if len(d.Reported) != 2 {
				t.Errorf("Reported %v", d.Reported)
			}
		}},
		{"ret-full", func(in *DSNInput) { in.Msg.Ret = "FULL" }, func(t *testing.T, d DSN, p *dsnParsed) {
			if p.partType(2) != "message/rfc822" || string(p.original) != dsnTestBody {
				t.Errorf("part 3 %s:\n%q", p.partType(2), p.original)
			}
			if p.parts[2].hdr.Get("Content-Description") != "Undelivered Message" {
				t.Errorf("part 3 description %q", p.parts[2].hdr.Get("Content-Description"))
			}
		}},
		{"ret-hdrs", func(in *DSNInput) { in.Msg.Ret = "HDRS" }, func(t *testing.T, d DSN, p *dsnParsed) {
			if p.partType(2) != "text/rfc822-headers" || string(p.original) != dsnTestHeaders {
				t.Errorf("part 3 %s:\n%q", p.partType(2), p.original)
			}
		}},
		{"ret-full-too-big", func(in *DSNInput) {
			in.Msg.Ret = "full"
			in.Body = []byte(big)
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if len(big) <= DefaultDSNMaxReturn {
				t.Fatalf("test body too small")
			}
			if p.partType(2) != "text/rfc822-headers" || string(p.original) != dsnTestHeaders {
				t.Errorf("part 3 %s, %d octets", p.partType(2), len(p.original))
			}
			if len(d.Body) > 8<<10 {
				t.Errorf("DSN of %d octets", len(d.Body))
			}
		}},
		{"ret-full-raised-limit", func(in *DSNInput) {
			in.Msg.Ret = "FULL"
			in.Body = []byte(big)
			in.MaxReturn = len(big)
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if p.partType(2) != "message/rfc822" || string(p.original) != big {
				t.Errorf("part 3 %s, %d octets", p.partType(2), len(p.original))
			}
		}},
		{"ret-full-disabled", func(in *DSNInput) {
			in.Msg.Ret = "FULL"
			in.MaxReturn = -1
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if p.partType(2) != "text/rfc822-headers" {
				t.Errorf("part 3 %s", p.partType(2))
			}
		}},
		{"ret-full-8bit", func(in *DSNInput) {
			in.Msg.Ret = "FULL"
			in.Msg.Body8Bit = true
			in.Body = []byte(dsnTestHeaders + "Content-Type: text/plain; charset=iso-8859-1\r\n\r\nGr\xfc\xdfe\r\n")
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if p.partType(2) != "message/rfc822" || p.parts[2].hdr.Get("Content-Transfer-Encoding") != "8bit" {
				t.Errorf("part 3 %s %v", p.partType(2), p.parts[2].hdr)
			}
			if !d.Body8Bit || d.SMTPUTF8 || p.hdr.Get("Content-Transfer-Encoding") != "8bit" {
				t.Errorf("DSN Body8Bit=%v SMTPUTF8=%v CTE=%q", d.Body8Bit, d.SMTPUTF8, p.hdr.Get("Content-Transfer-Encoding"))
			}
			if p.parts[1].hdr.Get("Content-Transfer-Encoding") != "7bit" {
				t.Errorf("report is not 7bit")
			}
		}},
		{"smtputf8", func(in *DSNInput) {
			in.Msg.SMTPUTF8 = true
			in.Msg.Rcpts[0].Addr = "jürgen@bücher.example"
			in.Msg.Rcpts[0].ORcpt = `utf-8;j\x{FC}rgen@b\x{FC}cher.example`
			in.Rcpts[0].Addr = "jürgen@bücher.example"
			in.Rcpts[0].Diagnostic = "550 5.1.1 Empfänger unbekannt"
			in.Body = []byte("Received: by mx.hermod.test\r\nSubject: Grüße\r\n\r\nHallo\r\n")
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if !strings.Contains(p.hdr.Get("Content-Type"), "report-type=global-delivery-status;") {
				t.Errorf("Content-Type %q", p.hdr.Get("Content-Type"))
			}
			if p.partType(1) != "message/global-delivery-status" || p.partType(2) != "message/global-headers" {
				t.Errorf("parts %s %s", p.partType(1), p.partType(2))
			}
			r := p.perRcpt[0]
			if r.Get("Final-Recipient") != "utf-8; jürgen@bücher.example" || r.Get("Original-Recipient") != "utf-8; jürgen@bücher.example" ||
				r.Get("Diagnostic-Code") != "smtp; 550 5.1.1 Empfänger unbekannt" {
				t.Errorf("recipient %v", r)
			}
			if string(p.original) != "Received: by mx.hermod.test\r\nSubject: Grüße\r\n" {
				t.Errorf("original %q", p.original)
			}
			if p.parts[0].hdr.Get("Content-Transfer-Encoding") != "quoted-printable" || !strings.Contains(p.text, "<jürgen@bücher.example>: delivery failed") {
				t.Errorf("text part %v:\n%s", p.parts[0].hdr, p.text)
			}
			if !d.Body8Bit || d.SMTPUTF8 {
				t.Errorf("Body8Bit=%v SMTPUTF8=%v, want true false (the sender is ASCII)", d.Body8Bit, d.SMTPUTF8)
			}
		}},
		{"utf8-sender", func(in *DSNInput) {
			in.Msg.From = "алиса@пример.рф"
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if !d.SMTPUTF8 || d.Rcpt != "алиса@пример.рф" || p.partType(1) != "message/global-delivery-status" {
				t.Errorf("SMTPUTF8=%v Rcpt=%q part 2 %s", d.SMTPUTF8, d.Rcpt, p.partType(1))
			}
			if got := p.hdr.Get("To"); got != "<алиса@пример.рф>" {
				t.Errorf("To %q", got)
			}
		}},
		{"non-ascii-diagnostic-without-smtputf8", func(in *DSNInput) {
			in.Rcpts[0].Diagnostic = "550 5.1.1 Empfänger\x00 unbekannt"
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if p.partType(1) != "message/delivery-status" || !isASCII(p.parts[1].raw) {
				t.Errorf("report %s not 7-bit", p.partType(1))
			}
			if got := p.perRcpt[0].Get("Diagnostic-Code"); got != "smtp; 550 5.1.1 Empf?nger? unbekannt" {
				t.Errorf("Diagnostic-Code %q", got)
			}
			if !strings.Contains(p.text, "Empfänger? unbekannt") {
				t.Errorf("text part:\n%s", p.text)
			}
		}},
		{"long-diagnostic", func(in *DSNInput) {
			in.Rcpts[0].Diagnostic = "550-5.7.1 [192.0.2.7] The IP you're using to send mail is not authorized to send\r\n" +
				"550-5.7.1 email directly to our servers. Please use the SMTP relay at your service provider instead.\r\n" +
				"550 5.7.1 " + strings.Repeat("x", 1500) + " end"
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			r := p.perRcpt[0]
			if r.Get("Status") != "5.7.1" {
				t.Errorf("Status %q", r.Get("Status"))
			}
			got := r.Get("Diagnostic-Code")
			want := "smtp; 550-5.7.1 [192.0.2.7] The IP you're using to send mail is not authorized to send " +
				"550-5.7.1 email directly to our servers. Please use the SMTP relay at your service provider instead. " +
				"550 5.7.1 " + strings.Repeat("x", 1500) + " end"
			if strings.ReplaceAll(got, " ", "") != strings.ReplaceAll(want, " ", "") || !strings.HasPrefix(got, want[:100]) {
				t.Errorf("Diagnostic-Code %q", got)
			}
			i := bytes.Index(p.parts[1].raw, []byte("Diagnostic-Code:"))
			field := p.parts[1].raw[i:]
			field = field[:bytes.Index(field, []byte("\r\nLast-Attempt-Date"))]
			lines := strings.Split(string(field), "\r\n")
			if len(lines) < 3 {
				t.Errorf("diagnostic not folded: %q", field)
			}
			for _, l := range lines[1:] {
				if l[0] != ' ' {
					t.Errorf("continuation line %q", l)
				}
				if len(l) > 78 && strings.Contains(strings.TrimSpace(l), " ") {
					t.Errorf("line of %d octets folded badly: %q", len(l), l)
				}
			}
		}},
		{"bare-lf-original", func(in *DSNInput) {
			in.Msg.Ret = "FULL"
			in.Body = []byte("Received: x\nSubject: lf\r\rbody\nline")
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if p.partType(2) != "message/rfc822" || string(p.original) != "Received: x\r\nSubject: lf\r\n\r\nbody\r\nline\r\n" {
				t.Errorf("part 3 %s %q", p.partType(2), p.original)
			}
		}},
		{"long-header-line", func(in *DSNInput) {
			in.Msg.Ret = "FULL"
			in.Body = []byte("Received: x\r\nX-Long: " + strings.Repeat("y", 2500) + "\r\n\r\nbody\r\n")
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			// The original cannot go whole; its header section is split.
			if p.partType(2) != "text/rfc822-headers" {
				t.Errorf("part 3 %s", p.partType(2))
			}
			h, err := textproto.NewReader(bufio.NewReader(bytes.NewReader(append(p.original, "\r\n"...)))).ReadMIMEHeader()
			if err != nil || strings.ReplaceAll(h.Get("X-Long"), " ", "") != strings.Repeat("y", 2500) {
				t.Errorf("X-Long: %v %q", err, h.Get("X-Long"))
			}
		}},
		{"no-header-section", func(in *DSNInput) { in.Body = []byte("\r\njust a body\r\n") }, func(t *testing.T, d DSN, p *dsnParsed) {
			if len(p.original) != 0 {
				t.Errorf("part 3 %q", p.original)
			}
		}},
		{"status-derived", func(in *DSNInput) {
			in.Rcpts[0].Diagnostic = "554 transaction failed"
			in.Rcpts[0].Status = "5.x"
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if p.perRcpt[0].Get("Status") != "5.0.0" {
				t.Errorf("Status %q", p.perRcpt[0].Get("Status"))
			}
		}},
		{"status-given", func(in *DSNInput) {
			in.Rcpts[0].Diagnostic = "timed out after 5 days"
			in.Rcpts[0].Status = "4.4.7"
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if r := p.perRcpt[0]; r.Get("Status") != "4.4.7" || r.Get("Diagnostic-Code") != "X-Hermod; timed out after 5 days" {
				t.Errorf("recipient %v", r)
			}
		}},
		{"success-requested", func(in *DSNInput) {
			in.Msg.Rcpts[1].Notify = spool.NotifySuccess
			in.Rcpts = []DSNRecipient{{Addr: "carol@example.net", Action: DSNRelayed, RemoteMTA: "mx.example.net", Diagnostic: "250 2.0.0 ok"}}
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if p.hdr.Get("Subject") != "Successful Mail Delivery Report" || p.perRcpt[0].Get("Status") != "2.0.0" ||
				p.perRcpt[0].Get("Action") != "relayed" || d.Reported[0] != 0 {
				t.Errorf("Subject %q recipient %v", p.hdr.Get("Subject"), p.perRcpt[0])
			}
		}},
		{"notify-filters-some", func(in *DSNInput) {
			in.Msg.Rcpts[1].Notify = spool.NotifyNever
			in.Rcpts = append([]DSNRecipient{{Addr: "Carol@Example.NET", Action: DSNFailed}}, in.Rcpts...)
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if len(p.perRcpt) != 1 || p.perRcpt[0].Get("Final-Recipient") != "rfc822; bob@example.com" || len(d.Reported) != 1 || d.Reported[0] != 1 {
				t.Errorf("recipients %v, Reported %v", p.perRcpt, d.Reported)
			}
		}},
		{"boundary-in-original", func(in *DSNInput) {
			in.Msg.Ret = "FULL"
			b := "=_hermod_" + in.Msg.ID.String() + "_00000000"
			in.Body = []byte(dsnTestHeaders + "\r\n--" + b + "\r\n--" + b + "--\r\n")
		}, func(t *testing.T, d DSN, p *dsnParsed) {
			if p.partType(2) != "message/rfc822" || !strings.HasSuffix(p.boundary, "_00000001") {
				t.Errorf("part 3 %s, boundary %q", p.partType(2), p.boundary)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			in := dsnTestInput()
			if c.edit != nil {
				c.edit(&in)
			}
			d, p := dsnBuild(t, in)
			c.check(t, d, p)
		})
	}
}

func TestBuildDSNSuppressed(t *testing.T) {
	cases := []struct {
		name string
		edit func(in *DSNInput)
	}{
		{"null-sender", func(in *DSNInput) { in.Msg.From = "" }},
		{"bounce", func(in *DSNInput) { in.Msg.Bounce = true }},
		{"notify-never", func(in *DSNInput) { in.Msg.Rcpts[0].Notify = spool.NotifyNever }},
		{"never-wins", func(in *DSNInput) { in.Msg.Rcpts[0].Notify = spool.NotifyNever | spool.NotifyFailure }},
		{"success-only", func(in *DSNInput) { in.Msg.Rcpts[0].Notify = spool.NotifySuccess }},
		{"delay-not-asked", func(in *DSNInput) {
			in.Msg.Rcpts[0].Notify = spool.NotifyFailure
			in.Rcpts[0].Action = DSNDelayed
		}},
		{"success-by-default", func(in *DSNInput) {
			in.Rcpts = []DSNRecipient{{Addr: "carol@example.net", Action: DSNDelivered}}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			in := dsnTestInput()
			c.edit(&in)
			d, ok, err := BuildDSN(in)
			if ok || err != nil || d.Body != nil || d.Rcpt != "" {
				t.Fatalf("BuildDSN = %+v, %v, %v; want nothing", d, ok, err)
			}
		})
	}
	// The counterparts that do produce a DSN, so the cases above fail for
	// the right reason.
	in := dsnTestInput()
	in.Rcpts[0].Action = DSNDelayed
	if _, ok, err := BuildDSN(in); !ok || err != nil {
		t.Errorf("delayed with NOTIFY=FAILURE,DELAY: ok=%v err=%v", ok, err)
	}
	in = dsnTestInput()
	in.Rcpts = []DSNRecipient{{Addr: "carol@example.net", Action: DSNDelayed}}
	if _, ok, err := BuildDSN(in); !ok || err != nil {
		t.Errorf("delayed without NOTIFY: ok=%v err=%v", ok, err)
	}
}

func TestBuildDSNErrors(t *testing.T) {
	cases := []struct {
		name string
		edit func(in *DSNInput)
	}{
		{"no-message", func(in *DSNInput) { in.Msg = nil }},
		{"no-reporting-mta", func(in *DSNInput) { in.ReportingMTA = "" }},
		{"bad-reporting-mta", func(in *DSNInput) { in.ReportingMTA = "mx.test\r\nBcc: x@y" }},
		{"sender-injection", func(in *DSNInput) { in.Msg.From = "a@b.test>\r\nBcc: <x@y.test" }},
		{"no-recipients", func(in *DSNInput) { in.Rcpts = nil }},
		{"bad-action", func(in *DSNInput) { in.Rcpts[0].Action = "bounced" }},
		{"no-address", func(in *DSNInput) { in.Rcpts[0].Addr = "" }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			in := dsnTestInput()
			c.edit(&in)
			d, ok, err := BuildDSN(in)
			if !errors.Is(err, ErrDSNInput) || ok || d.Body != nil {
				t.Fatalf("BuildDSN = ok=%v err=%v, want ErrDSNInput", ok, err)
			}
		})
	}
}

func TestBuildDSNDeterministic(t *testing.T) {
	a, _, _ := BuildDSN(dsnTestInput())
	b, _, _ := BuildDSN(dsnTestInput())
	if !bytes.Equal(a.Body, b.Body) {
		t.Fatal("two builds of the same input differ")
	}
	in := dsnTestInput()
	in.Now = in.Now.Add(time.Second)
	c, _, _ := BuildDSN(in)
	if bytes.Equal(a.Body, c.Body) {
		t.Fatal("builds at different times are identical (Message-ID must differ)")
	}
}

func TestDSNXtextDecode(t *testing.T) {
	cases := []struct{ in, typ, addr string }{
		{"rfc822;a+2Bb@example.org", "rfc822", "a+b@example.org"},
		{"RFC822;a+3Db+@example.org", "rfc822", "a=b+@example.org"},
		{"rfc822;caf+C3+A9@example.org", "utf-8", "café@example.org"},
		{`utf-8;j\x{FC}rgen@example.org`, "utf-8", "jürgen@example.org"},
		{`utf-8;bad\x{110000}@example.org`, "utf-8", `bad\x{110000}@example.org`},
		{"plain@example.org", "rfc822", "plain@example.org"},
		{"x400;/G=A/S=B/", "x400", "/G=A/S=B/"},
	}
	for _, c := range cases {
		typ, addr := dsnParseORcpt(c.in)
		if typ != c.typ || addr != c.addr {
			t.Errorf("dsnParseORcpt(%q) = %q, %q; want %q, %q", c.in, typ, addr, c.typ, c.addr)
		}
	}
}

func TestDSNDiagnosticAndStatus(t *testing.T) {
	cases := []struct{ action, diag, code, status string }{
		{DSNFailed, "550 5.1.1 user unknown", "smtp; 550 5.1.1 user unknown", "5.1.1"},
		{DSNFailed, "550-5.7.1 first\r\n550 5.7.1 second", "smtp; 550-5.7.1 first 550 5.7.1 second", "5.7.1"},
		{DSNFailed, "554 no enhanced code", "smtp; 554 no enhanced code", "5.0.0"},
		{DSNFailed, "550 4.1.1 class mismatch", "smtp; 550 4.1.1 class mismatch", "5.0.0"},
		{DSNDelayed, "421", "smtp; 421", "4.0.0"},
		{DSNFailed, "smtp; 550 5.2.2 mailbox full", "smtp; 550 5.2.2 mailbox full", "5.0.0"},
		{DSNFailed, "X-Other; something", "X-Other; something", "5.0.0"},
		{DSNFailed, "lookup failed; no MX", "X-Hermod; lookup failed; no MX", "5.0.0"},
		{DSNDelayed, "dial tcp: i/o timeout", "X-Hermod; dial tcp: i/o timeout", "4.0.0"},
		{DSNDelivered, "250 2.0.0 ok", "smtp; 250 2.0.0 ok", "2.0.0"},
		{DSNRelayed, "", "", "2.0.0"},
	}
	for _, c := range cases {
		code := ""
		if d := dsnClean(c.diag, false); d != "" {
			code = dsnDiagnostic(d)
		}
		st := dsnRcptStatus(&DSNRecipient{Action: c.action, Diagnostic: c.diag})
		if code != c.code || st != c.status {
			t.Errorf("%s %q: Diagnostic-Code %q Status %q; want %q %q", c.action, c.diag, code, st, c.code, c.status)
		}
	}
}

func TestDSNEnvelope(t *testing.T) {
	in := dsnTestInput()
	in.Msg.From = "алиса@пример.рф"
	d, _, err := BuildDSN(in)
	if err != nil {
		t.Fatal(err)
	}
	e := d.Envelope()
	if e.From != "" || !e.Bounce || len(e.Rcpts) != 1 || e.Rcpts[0].Addr != d.Rcpt || !e.SMTPUTF8 || e.Body8Bit != d.Body8Bit {
		t.Fatalf("Envelope %+v", e)
	}
	// A DSN about the DSN is never made.
	if _, ok, _ := BuildDSN(DSNInput{ReportingMTA: "mx.hermod.test", Msg: e, Rcpts: in.Rcpts, Now: dsnTestNow}); ok {
		t.Fatal("bounced a bounce")
	}
	r := DSNRecipientFor(&spool.Recipient{Addr: "a@b.test", ORcpt: "rfc822;a@b.test", LastReply: "550 5.1.1 no", LastAttempt: dsnTestNow}, DSNFailed)
	if r.Addr != "a@b.test" || r.ORcpt != "rfc822;a@b.test" || r.Diagnostic != "550 5.1.1 no" || !r.LastAttempt.Equal(dsnTestNow) || r.Action != DSNFailed {
		t.Fatalf("DSNRecipientFor = %+v", r)
	}
}

// TestBuildDSNGolden compares the canonical DSN with
// testdata/dsn/canonical.eml (rewrite it with -dsn-update).
func TestBuildDSNGolden(t *testing.T) {
	in := dsnTestInput()
	in.Rcpts = append(in.Rcpts, DSNRecipient{Addr: "carol@example.net", Action: DSNDelayed, RemoteMTA: "mx.example.net",
		Diagnostic: "421 4.7.0 Try again later, closing connection.", LastAttempt: dsnTestNow, WillRetryUntil: dsnTestReceived.Add(5 * 24 * time.Hour)})
	d, _ := dsnBuild(t, in)
	path := filepath.Join("testdata", "dsn", "canonical.eml")
	if *dsnUpdate {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, d.Body, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -dsn-update to create it)", err)
	}
	if !bytes.Equal(d.Body, want) {
		t.Errorf("DSN differs from %s (run with -dsn-update to accept):\n%s", path, d.Body)
	}
}

func FuzzBuildDSN(f *testing.F) {
	f.Add([]byte(dsnTestBody), "550 5.1.1 user unknown", "FULL", "", false)
	f.Add([]byte("Subject: x\n\nbody\rmore"), "451-4.7.1 a\r\n451 4.7.1 b", "HDRS", "rfc822;a+0D+0Ab@x", true)
	f.Add([]byte("\x00\xff\r\n\r\n--=_hermod"), strings.Repeat("z", 3000), "FULL", `utf-8;\x{E9}+C3`, true)
	f.Add([]byte("X: "+strings.Repeat("\xc3\xa9", 800)+"\r\n\r\n"), "550 \xc3\xa9\xff\x00", "", "plain@x", false)
	f.Fuzz(func(t *testing.T, body []byte, diag, ret, orcpt string, utf8 bool) {
		in := dsnTestInput()
		in.Body = body
		in.Msg.Ret = ret
		in.Msg.SMTPUTF8 = utf8
		in.Rcpts[0].Diagnostic = diag
		in.Rcpts[0].ORcpt = orcpt
		in.Rcpts = append(in.Rcpts, DSNRecipient{Addr: "carol@example.net", Action: DSNDelayed, Diagnostic: diag, RemoteMTA: diag})
		in.MaxReturn = 4 << 10
		d, ok, err := BuildDSN(in)
		if err != nil || !ok {
			t.Fatalf("BuildDSN: ok=%v err=%v", ok, err)
		}
		p := dsnParse(t, d.Body)
		if len(p.perRcpt) != 2 {
			t.Fatalf("%d recipients", len(p.perRcpt))
		}
		global := p.partType(1) == "message/global-delivery-status"
		if utf8 && !global || !isASCII(p.parts[1].raw) && !global {
			t.Fatalf("report is %s (SMTPUTF8 %v)", p.partType(1), utf8)
		}
		// An ORCPT whose address is empty ("type;") names nobody: no field.
		if _, a := dsnParseORcpt(orcpt); a != "" && p.perRcpt[0].Get("Original-Recipient") == "" {
			t.Fatalf("no Original-Recipient")
		}
		if d.Body8Bit != !isASCII(d.Body) {
			t.Fatalf("Body8Bit = %v", d.Body8Bit)
		}
		// The diagnostic survives folding: only whitespace may differ.
		want := dsnClean(diag, global)
		if want != "" {
			got := p.perRcpt[0].Get("Diagnostic-Code")
			if strip := func(s string) string { return strings.Join(strings.Fields(s), "") }; !strings.HasSuffix(strip(got), strip(want)) {
				t.Fatalf("Diagnostic-Code %q does not end with %q", got, want)
			}
		}
		// A whole original is returned unchanged but for line ends.
		if p.partType(2) == "message/rfc822" || p.partType(2) == "message/global" {
			norm := strings.NewReplacer("\r\n", "\n", "\r", "\n").Replace(string(body))
			if got := strings.ReplaceAll(string(p.original), "\r\n", "\n"); strings.TrimSuffix(got, "\n") != strings.TrimSuffix(norm, "\n") {
				t.Fatalf("returned original differs")
			}
		}
	})
}

func BenchmarkBuildDSN(b *testing.B) {
	in := dsnTestInput()
	in.Msg.Ret = "FULL"
	in.Body = []byte(dsnTestHeaders + "\r\n" + strings.Repeat("a line of a message body of ordinary length, as mail has\r\n", 300))
	b.ReportAllocs()
	b.SetBytes(int64(len(in.Body)))
	for b.Loop() {
		if _, ok, err := BuildDSN(in); !ok || err != nil {
			b.Fatal(ok, err)
		}
	}
}

package netio

import (
	"bytes"
	"strings"
	"testing"
)

// FuzzSession feeds arbitrary client input to the session state machine
// and checks its invariants: it never panics, the replies and committed
// messages do not depend on how the input was split into reads, and no
// committed message contains a bare CR or LF or a line over 1000 octets.
func FuzzSession(f *testing.F) {
	seeds := []string{
		hello + tx + "DATA\r\nSubject: x\r\n\r\nbody\r\n..dot\r\n.\r\nQUIT\r\n",
		hello + tx + "DATA\r\nx\n.\nMAIL FROM:<e@x.test>\r\nRCPT TO:<v@y.test>\r\nDATA\r\nevil\r\n.\r\n",
		hello + tx + "DATA\r\nx\r\n.\nMAIL FROM:<e@x.test>\r\n.\r\n",
		hello + tx + "DATA\r\nx\r.\rMAIL FROM:<e@x.test>\r\n.\r\n",
		hello + tx + "DATA\r\nx\r\r\n.\r\n",
		hello + tx + "BDAT 5\r\nhelloBDAT 8 LAST\r\n world\r\n",
		hello + tx + "BDAT 2\r\na\rBDAT 2 LAST\r\n\nb",
		"HELO x\r\nMAIL FROM:<@a,@b:c@d> SIZE=10 BODY=8BITMIME\r\nRCPT TO:<\"q\\\"x\"@y>\r\nDATA\r\n.\r\n",
		strings.Repeat("A", 1100) + "\r\nNOOP\r\n",
		hello + tx + "DATA\r\n" + strings.Repeat("z", 1200) + "\r\n.\r\n",
		hello + "MAIL FROM:<a@x.test> RET=FULL ENVID=a+2Bb SMTPUTF8\r\nRCPT TO:<b@y.test> NOTIFY=SUCCESS,DELAY ORCPT=utf-8;\xc3\xbc+2B@y\r\nRCPT TO:<c@y.test> NOTIFY=NEVER\r\nDATA\r\nx\r\n.\r\n",
	}
	for _, s := range seeds {
		f.Add([]byte(s), uint8(3))
	}
	f.Fuzz(func(t *testing.T, in []byte, chunk uint8) {
		cfg := testConfig()
		b1, b2 := &fakeBackend{}, &fakeBackend{}
		out1, act1 := runSession(t, cfg, b1, string(in), 0)
		out2, act2 := runSession(t, cfg, b2, string(in), int(chunk%16)+1)
		if !bytes.Contains(bytes.ToUpper(in), []byte("STARTTLS")) {
			if out1 != out2 || act1 != act2 {
				t.Fatalf("split changes the outcome:\nwhole: %q %v\nsplit: %q %v", out1, act1, out2, act2)
			}
			if len(b1.msgs) != len(b2.msgs) {
				t.Fatalf("split changes the messages: %d vs %d", len(b1.msgs), len(b2.msgs))
			}
		}
		for _, m := range append(b1.msgs, b2.msgs...) {
			body := []byte(m.body)
			for i, c := range body {
				if c == '\n' && (i == 0 || body[i-1] != '\r') {
					t.Fatalf("committed body has a bare LF: %q", body)
				}
				if c == '\r' && (i+1 == len(body) || body[i+1] != '\n') {
					t.Fatalf("committed body has a bare CR: %q", body)
				}
			}
			for _, line := range bytes.Split(body, []byte("\r\n")) {
				if len(line)+2 > maxTextLine+1 { // +1: an unstuffed dot
					t.Fatalf("committed body has a %d-octet line", len(line))
				}
			}
			if len(m.env.Rcpts) == 0 {
				t.Fatalf("message committed without recipients")
			}
			if m.env.RcptDSN != nil && len(m.env.RcptDSN) != len(m.env.Rcpts) {
				t.Fatalf("%d recipients, %d DSN parameter sets", len(m.env.Rcpts), len(m.env.RcptDSN))
			}
			for _, d := range m.env.RcptDSN {
				if d.Notify&NotifyNever != 0 && d.Notify != NotifyNever {
					t.Fatalf("NOTIFY=NEVER combined with other flags: %b", d.Notify)
				}
			}
		}
	})
}

package netio

// Regression tests from an audit of the inbound server against RFC 5321,
// 3030, 2920 and 3207 and the behaviour of real clients. Each test names
// the case and the section it enforces.

import (
	"fmt"
	"strings"
	"testing"
)

// TestAuditTextLineDotStuffed: RFC 5321 §4.5.3.1.6 limits a text line to
// 1000 octets with its CRLF, "not counting the leading dot duplicated for
// transparency". A 1000-octet line that starts with a dot travels as 1001
// octets and must be accepted; one octet more is over-long. The reply must
// not depend on how the line is split into reads.
func TestAuditTextLineDotStuffed(t *testing.T) {
	cases := []struct {
		name, line string // the line on the wire, without its CRLF
		ok         bool
	}{
		{"plain 1000", strings.Repeat("a", 998), true},
		{"plain 1001", strings.Repeat("a", 999), false},
		{"stuffed 1000", ".." + strings.Repeat("a", 997), true},
		{"stuffed 1001", ".." + strings.Repeat("a", 998), false},
		{"stuffed dots 1000", strings.Repeat(".", 999), true},
	}
	for _, c := range cases {
		for _, chunk := range []int{0, 1, 7, 999, 1000, 1001} {
			t.Run(fmt.Sprintf("%s/chunk%d", c.name, chunk), func(t *testing.T) {
				b := &fakeBackend{}
				in := hello + tx + "DATA\r\nSubject: t\r\n\r\n" + c.line + "\r\n.\r\nNOOP\r\n"
				out, _ := runSession(t, testConfig(), b, in, chunk)
				checkReplies(t, out)
				if !c.ok {
					if len(b.msgs) != 0 || !strings.Contains(out, "554 5.6.0") {
						t.Fatalf("over-long line accepted: %d messages, %q", len(b.msgs), out)
					}
					return
				}
				if len(b.msgs) != 1 {
					t.Fatalf("legal line refused: %q", out)
				}
				want := "Subject: t\r\n\r\n" + c.line[1:] + "\r\n"
				if c.line[0] != '.' {
					want = "Subject: t\r\n\r\n" + c.line + "\r\n"
				}
				if b.msgs[0].body != want {
					t.Fatalf("body %q, want %q", b.msgs[0].body, want)
				}
				checkBody(t, b.msgs[0].body)
				if !strings.HasSuffix(out, "250 2.0.0 Ok\r\n") {
					t.Fatalf("session out of step: %q", out)
				}
			})
		}
	}
}

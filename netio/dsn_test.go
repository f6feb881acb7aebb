package netio

import (
	"reflect"
	"strings"
	"testing"
)

// TestSessionDSNParams: the RFC 3461 parameters of MAIL and RCPT, accepted
// and refused, and what reaches the backend.
func TestSessionDSNParams(t *testing.T) {
	const m = "MAIL FROM:<a@x.test>"
	tests := []struct {
		name    string
		in      string // after EHLO
		replies string
		envID   string
		ret     string
		dsn     []RcptDSN // nil: none recorded
	}{
		{"none", m + "\r\nRCPT TO:<b@y.test>\r\n", "250 250", "", "", nil},
		{"ret full envid", m + " RET=FULL ENVID=QQ+2B1+3D2\r\nRCPT TO:<b@y.test>\r\n", "250 250", "QQ+1=2", "FULL", nil},
		{"ret hdrs lower case", m + " ret=hdrs\r\nRCPT TO:<b@y.test>\r\n", "250 250", "", "HDRS", nil},
		{"ret bad", m + " RET=ALL\r\n", "501", "", "", nil},
		{"ret twice", m + " RET=FULL RET=HDRS\r\n", "501", "", "", nil},
		{"envid twice", m + " ENVID=a ENVID=b\r\n", "501", "", "", nil},
		{"envid empty", m + " ENVID=\r\n", "501", "", "", nil},
		{"envid bad hex", m + " ENVID=a+4\r\n", "501", "", "", nil},
		{"envid equals sign", m + " ENVID=a=b\r\n", "501", "", "", nil},
		{"envid decodes to a control", m + " ENVID=a+0D+0A\r\n", "501", "", "", nil},
		{"envid too long", m + " ENVID=" + strings.Repeat("e", 101) + "\r\n", "501", "", "", nil},
		{"envid 100", m + " ENVID=" + strings.Repeat("e", 100) + "\r\nRCPT TO:<b@y.test>\r\n", "250 250", strings.Repeat("e", 100), "", nil},
		{"notify never", m + "\r\nRCPT TO:<b@y.test> NOTIFY=NEVER\r\n", "250 250", "", "", []RcptDSN{{Notify: NotifyNever}}},
		{"notify list and orcpt", m + "\r\nRCPT TO:<b@y.test> notify=success,Delay ORCPT=rfc822;b+2Bx@y.test\r\n", "250 250", "", "",
			[]RcptDSN{{Notify: NotifySuccess | NotifyDelay, ORcpt: "rfc822;b+2Bx@y.test"}}},
		{"second rcpt only", m + "\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test> NOTIFY=FAILURE\r\n", "250 250 250", "", "",
			[]RcptDSN{{}, {Notify: NotifyFailure}}},
		{"refused rcpt keeps alignment", m + "\r\nRCPT TO:<b@elsewhere.test> NOTIFY=SUCCESS\r\nRCPT TO:<c@y.test> NOTIFY=DELAY\r\nRCPT TO:<d@y.test>\r\n", "250 554 250 250", "", "",
			[]RcptDSN{{Notify: NotifyDelay}, {}}},
		{"notify never with others", m + "\r\nRCPT TO:<b@y.test> NOTIFY=NEVER,FAILURE\r\n", "250 501", "", "", nil},
		{"notify repeated item", m + "\r\nRCPT TO:<b@y.test> NOTIFY=FAILURE,FAILURE\r\n", "250 501", "", "", nil},
		{"notify trailing comma", m + "\r\nRCPT TO:<b@y.test> NOTIFY=FAILURE,\r\n", "250 501", "", "", nil},
		{"notify empty", m + "\r\nRCPT TO:<b@y.test> NOTIFY=\r\n", "250 501", "", "", nil},
		{"notify unknown", m + "\r\nRCPT TO:<b@y.test> NOTIFY=ALWAYS\r\n", "250 501", "", "", nil},
		{"notify twice", m + "\r\nRCPT TO:<b@y.test> NOTIFY=FAILURE NOTIFY=DELAY\r\n", "250 501", "", "", nil},
		{"orcpt without type", m + "\r\nRCPT TO:<b@y.test> ORCPT=b@y.test\r\n", "250 501", "", "", nil},
		{"orcpt empty address", m + "\r\nRCPT TO:<b@y.test> ORCPT=rfc822;\r\n", "250 501", "", "", nil},
		{"orcpt bad type", m + "\r\nRCPT TO:<b@y.test> ORCPT=rfc(822);b@y.test\r\n", "250 501", "", "", nil},
		{"orcpt x400 type", m + "\r\nRCPT TO:<b@y.test> ORCPT=x-400;c+3Dus+3Ba+3Dx\r\n", "250 250", "", "", []RcptDSN{{ORcpt: "x-400;c+3Dus+3Ba+3Dx"}}},
		{"envid with a tab", m + " ENVID=a+09b\r\nRCPT TO:<b@y.test>\r\n", "250 250", "a\tb", "", nil},
		{"orcpt too long", m + "\r\nRCPT TO:<b@y.test> ORCPT=rfc822;" + strings.Repeat("o", 500) + "\r\n", "250 501", "", "", nil},
		{"orcpt utf8 without smtputf8", m + "\r\nRCPT TO:<b@y.test> ORCPT=utf-8;ü@y.test\r\n", "250 501", "", "", nil},
		{"orcpt utf8 with smtputf8", m + " SMTPUTF8\r\nRCPT TO:<b@y.test> ORCPT=utf-8;ü@y.test\r\n", "250 250", "", "",
			[]RcptDSN{{ORcpt: "utf-8;ü@y.test"}}},
		{"orcpt utf8 escape", m + "\r\nRCPT TO:<b@y.test> ORCPT=utf-8;\\x{FC}@y.test\r\n", "250 250", "", "",
			[]RcptDSN{{ORcpt: `utf-8;\x{FC}@y.test`}}},
		{"parameters are case-insensitive", m + " Ret=Full EnvId=x\r\nRCPT TO:<b@y.test> Notify=Failure Orcpt=RFC822;b@y.test\r\n", "250 250", "x", "FULL",
			[]RcptDSN{{Notify: NotifyFailure, ORcpt: "RFC822;b@y.test"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := &fakeBackend{}
			in := hello + tt.in + "DATA\r\nx\r\n.\r\n"
			out, _ := runSession(t, testConfig(), b, in, 0)
			got := codes(out[strings.Index(out, "\r\n")+2:])
			want := "250 " + tt.replies
			if !strings.HasPrefix(got, want+" ") {
				t.Fatalf("replies %q, want %q then DATA's\n%s", got, want, out)
			}
			if strings.HasSuffix(tt.replies, "501") && !strings.Contains(out, "501 5.5.4 Error: Bad ") {
				t.Errorf("a refusal does not name the parameter:\n%s", out)
			}
			if len(b.msgs) == 0 {
				return // the transaction never started, or had no recipient
			}
			env := b.msgs[0].env
			if env.EnvID != tt.envID || env.Ret != tt.ret {
				t.Errorf("ENVID %q RET %q, want %q %q", env.EnvID, env.Ret, tt.envID, tt.ret)
			}
			if !reflect.DeepEqual(env.RcptDSN, tt.dsn) {
				t.Errorf("RcptDSN %+v, want %+v", env.RcptDSN, tt.dsn)
			}
			if env.RcptDSN != nil && len(env.RcptDSN) != len(env.Rcpts) {
				t.Errorf("%d RcptDSN for %d recipients", len(env.RcptDSN), len(env.Rcpts))
			}
		})
	}
}

func TestDecodeXtext(t *testing.T) {
	tests := []struct {
		in     string
		utf8OK bool
		want   string
		ok     bool
	}{
		{"abc", false, "abc", true},
		{"a+2Bb+3d", false, "a+b=", true},
		{"+", false, "", false},
		{"+4", false, "", false},
		{"+4G", false, "", false},
		{"a b", false, "", false},
		{"a=b", false, "", false},
		{"ü", false, "", false},
		{"ü", true, "ü", true},
		{"\xff", true, "", false},
		{"", false, "", true},
	}
	for _, tt := range tests {
		got, ok := decodeXtext([]byte(tt.in), tt.utf8OK)
		if ok != tt.ok || ok && string(got) != tt.want {
			t.Errorf("decodeXtext(%q, %v) = %q, %v; want %q, %v", tt.in, tt.utf8OK, got, ok, tt.want, tt.ok)
		}
	}
}

package netio

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

func TestClientParseReply(t *testing.T) {
	long := strings.Repeat("x", clientMaxReplyLine)
	many := strings.Repeat("250-x\r\n", clientMaxReplyLines) + "250 x\r\n"
	cases := []struct {
		in       string
		code     int
		enhanced string
		msg      string
		err      error // nil: success
	}{
		{"250 ok\r\n", 250, "", "ok", nil},
		{"250 2.1.5 ok\r\n", 250, "2.1.5", "ok", nil},
		{"250\r\n", 250, "", "", nil},
		{"250 \r\n", 250, "", "", nil},
		{"220 mx ready\n", 220, "", "mx ready", nil}, // bare LF accepted
		{"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n", 250, "", "mx.test\nPIPELINING\nSIZE 10", nil},
		{"550-5.1.1 no such\r\n550-5.1.1 user here\r\n550 5.1.1 sorry\r\n", 550, "5.1.1", "no such\nuser here\nsorry", nil},
		{"550-5.1.1 first\r\n550 second\r\n", 550, "5.1.1", "first\nsecond", nil},
		{"550-5.1.1 first\r\n550 5.7.1 other\r\n", 550, "5.1.1", "first\n5.7.1 other", nil},
		{"451 4.3.0\r\n", 451, "4.3.0", "", nil},
		{"451 4.123.456 odd\r\n", 451, "4.123.456", "odd", nil},
		{"250 5.0.0 class mismatch\r\n", 250, "", "5.0.0 class mismatch", nil},
		{"250 2.0.0x not enhanced\r\n", 250, "", "2.0.0x not enhanced", nil},
		{"250 2.0 short\r\n", 250, "", "2.0 short", nil},
		{"250 2.1234.0 too long\r\n", 250, "", "2.1234.0 too long", nil},
		{"354 go ahead\r\n", 354, "", "go ahead", nil},
		{"221-a\r\n221 " + long[:clientMaxReplyLine-6] + "\r\n", 221, "", "a\n" + long[:clientMaxReplyLine-6], nil},

		{"", 0, "", "", io.EOF},
		{"250-more\r\n", 0, "", "", io.ErrUnexpectedEOF},
		{"250 no end", 0, "", "", io.ErrUnexpectedEOF},
		{"25\r\n", 0, "", "", ErrClientProtocol},
		{"2500 x\r\n", 0, "", "", ErrClientProtocol},
		{"150 x\r\n", 0, "", "", ErrClientProtocol},
		{"650 x\r\n", 0, "", "", ErrClientProtocol},
		{"25x x\r\n", 0, "", "", ErrClientProtocol},
		{"250_x\r\n", 0, "", "", ErrClientProtocol},
		{"250-a\r\n251 b\r\n", 0, "", "", ErrClientProtocol},
		{"250 " + long + "\r\n", 0, "", "", ErrClientProtocol},
		{many, 0, "", "", ErrClientProtocol},
	}
	for _, bufSize := range []int{16, 4096} {
		for _, tc := range cases {
			in := tc.in
			if tc.err == nil {
				in += "NEXT"
			}
			r := bufio.NewReaderSize(strings.NewReader(in), bufSize)
			got, err := ParseReply(r)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Errorf("%.40q (buffer %d): err %v, want %v", tc.in, bufSize, err, tc.err)
				}
				continue
			}
			if err != nil {
				t.Errorf("%.40q (buffer %d): %v", tc.in, bufSize, err)
				continue
			}
			if got.Code != tc.code || got.Enhanced != tc.enhanced || got.Message != tc.msg {
				t.Errorf("%.40q (buffer %d): got %d %q %.40q, want %d %q %.40q", tc.in, bufSize,
					got.Code, got.Enhanced, got.Message, tc.code, tc.enhanced, tc.msg)
			}
			if rest, _ := io.ReadAll(r); string(rest) != "NEXT" {
				t.Errorf("%.40q: left %q, want only the next reply", tc.in, rest)
			}
		}
	}
}

// TestClientReplyCache checks that equal replies share one *smtperr.Error
// and different ones do not.
func TestClientReplyCache(t *testing.T) {
	var p clientReplyReader
	r := bufio.NewReader(strings.NewReader("250 2.1.5 ok\r\n250 2.1.5 ok\r\n250 2.1.5 OK\r\n251 2.1.5 ok\r\n"))
	var prev *smtperr.Error
	for i, wantSame := range []bool{false, true, false, false} {
		code, err := p.read(r)
		if err != nil {
			t.Fatal(err)
		}
		if got := p.same(code, prev); got != wantSame {
			t.Errorf("reply %d: same = %v, want %v", i, got, wantSame)
		}
		prev = p.reply(code)
	}
}

func FuzzParseReply(f *testing.F) {
	for _, s := range []string{
		"250 ok\r\n",
		"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n",
		"550-5.1.1 a\r\n550 5.1.1 b\r\n",
		"451 4.3.0\r\n",
		"250-2.0.0\r\n250 x\n",
		"220 x\r\r\n",
		"250 2.1.5 ok\r\n250 next\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		rd := bytes.NewReader(in)
		r := bufio.NewReaderSize(rd, 16)
		e, err := ParseReply(r)
		if err != nil {
			if e != nil {
				t.Fatal("reply and error")
			}
			return
		}
		if e.Code < 200 || e.Code > 599 {
			t.Fatalf("code %d", e.Code)
		}
		// The reply is a prefix of the input ending in LF.
		used := len(in) - r.Buffered() - rd.Len()
		if used <= 0 || in[used-1] != '\n' {
			t.Fatalf("consumed %d octets of %q", used, in)
		}
		// Writing the reply and parsing it again gives the same reply.
		out := e.AppendReply(nil)
		for _, l := range bytes.SplitAfter(out, []byte("\n")) {
			if len(l) > clientMaxReplyLine {
				return // re-encoding repeated the enhanced code: too long
			}
		}
		e2, err := ParseReply(bufio.NewReader(bytes.NewReader(out)))
		if err != nil {
			t.Fatalf("%q parsed as %#v, re-encoded %q fails: %v", in, e, out, err)
		}
		if *e2 != *e {
			t.Fatalf("%q parsed as %#v, re-encoded %q parses as %#v", in, e, out, e2)
		}
	})
}

func BenchmarkClientParseReply(b *testing.B) {
	in := []byte("250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10\r\n250 2.1.5 ok\r\n")
	rd := bytes.NewReader(in)
	r := bufio.NewReader(rd)
	var p clientReplyReader
	b.ReportAllocs()
	b.SetBytes(int64(len(in)))
	for b.Loop() {
		rd.Reset(in)
		r.Reset(rd)
		if _, err := p.read(r); err != nil {
			b.Fatal(err)
		}
	}
}

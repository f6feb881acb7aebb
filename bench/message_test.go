package bench

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"strconv"
	"testing"
	"time"
)

// unstuff undoes AppendDotStuffed the way an SMTP server reads DATA: it
// returns the message and whether the terminator was found.
func unstuff(wire []byte) ([]byte, bool) {
	var out []byte
	for len(wire) > 0 {
		i := bytes.IndexByte(wire, '\n')
		if i < 0 {
			return nil, false
		}
		line := wire[:i+1]
		wire = wire[i+1:]
		if string(line) == ".\r\n" {
			return out, len(wire) == 0
		}
		if line[0] == '.' {
			line = line[1:]
		}
		out = append(out, line...)
	}
	return nil, false
}

func TestGeneratorMessages(t *testing.T) {
	g := NewGenerator(7)
	r := rand.New(rand.NewPCG(1, 2))
	sent := time.Unix(1700000000, 123456789)
	var buf []byte
	sawDotLine := false
	for _, size := range []int{0, 1, 100, 300, 301, 302, 303, 999, 1024, 4096, 10000, 65536, 200000, 1 << 20} {
		for rep := 0; rep < 5; rep++ {
			id := "tag-" + strconv.Itoa(size) + "-" + strconv.Itoa(rep)
			buf = g.Append(buf[:0], MessageSpec{ID: id, From: "a@s.test", To: []string{"b@d.test"}, Size: size, Sent: sent}, r)
			if size >= 400 && len(buf) != size {
				t.Errorf("size %d: message is %d bytes", size, len(buf))
			}
			if size >= 400 && len(buf) > size+1 {
				t.Errorf("size %d: message is %d bytes", size, len(buf))
			}
			st, err := CheckMessage(buf)
			if err != nil {
				t.Fatalf("size %d: %v\n%s", size, err, buf[:min(len(buf), 600)])
			}
			if st.ID != id || !st.Sent.Equal(sent) {
				t.Errorf("stamp %+v", st)
			}
			for i, ln := range bytes.SplitAfter(buf, []byte("\r\n")) {
				if len(ln) == 0 {
					continue
				}
				if len(ln) > 1000 || !bytes.HasSuffix(ln, []byte("\r\n")) || bytes.Count(ln, []byte("\n")) != 1 ||
					bytes.Count(ln, []byte("\r")) != 1 {
					t.Fatalf("size %d line %d is not a valid CRLF line of <= 998 octets: %q", size, i, ln)
				}
				if ln[0] == '.' {
					sawDotLine = true
				}
			}
			wire := AppendDotStuffed(nil, buf)
			back, ok := unstuff(wire)
			if !ok || !bytes.Equal(back, buf) {
				t.Fatalf("size %d: dot-stuffing does not round-trip", size)
			}
		}
	}
	if !sawDotLine {
		t.Error("bodies never start a line with a dot: dot-stuffing is not exercised")
	}
}

func TestCheckMessageDetects(t *testing.T) {
	g := NewGenerator(1)
	r := rand.New(rand.NewPCG(3, 4))
	msg := g.Append(nil, MessageSpec{ID: "x-1", From: "a@s.test", To: []string{"b@d.test"}, Size: 2048,
		Sent: time.Now()}, r)
	body := bytes.Index(msg, []byte("\r\n\r\n")) + 4

	// What an MTA may do to the header is fine.
	withReceived := append([]byte("Received: from load.test by mx.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"+
		"DKIM-Signature: v=1; a=ed25519-sha256;\r\n\tb=abc\r\n"), msg...)
	if _, err := CheckMessage(withReceived); err != nil {
		t.Errorf("with Received: %v", err)
	}
	lower := bytes.Replace(msg, []byte("X-Bench-Sum:"), []byte("x-bench-sum:"), 1)
	if _, err := CheckMessage(lower); err != nil {
		t.Errorf("lower-case header name: %v", err)
	}

	// Every single flipped body byte is caught.
	for i := body; i < len(msg); i += 7 {
		bad := bytes.Clone(msg)
		bad[i] ^= 0x20
		if _, err := CheckMessage(bad); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("flip at %d: err %v", i, err)
		}
	}
	cases := map[string][]byte{
		"truncated":     msg[:len(msg)-5],
		"extra line":    append(bytes.Clone(msg), "more\r\n"...),
		"not unstuffed": append(append(bytes.Clone(msg[:body]), '.'), msg[body:]...),
		"bad sum":       bytes.Replace(msg, []byte("X-Bench-Sum: "), []byte("X-Bench-Sum: zz"), 1),
		"no sent":       bytes.Replace(msg, []byte("X-Bench-Sent:"), []byte("X-Other:"), 1),
		"no body":       msg[:body-2],
	}
	for name, m := range cases {
		if bytes.Equal(m, msg) {
			t.Fatalf("%s: case does not change the message", name)
		}
		if _, err := CheckMessage(m); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: err %v, want ErrCorrupt", name, err)
		}
	}
	if _, err := CheckMessage([]byte("Subject: bounce\r\n\r\nX-Bench-Id: in-body\r\n")); !errors.Is(err, ErrNoStamp) {
		t.Errorf("unstamped: %v", err)
	}
}

func FuzzCheckMessage(f *testing.F) {
	g := NewGenerator(1)
	r := rand.New(rand.NewPCG(3, 4))
	f.Add(g.Append(nil, MessageSpec{ID: "f-1", Size: 500, Sent: time.Unix(1, 0)}, r))
	f.Add([]byte("X-Bench-Id: a\r\nX-Bench-Sum: 00000000/0\r\nX-Bench-Sent: 1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, msg []byte) {
		st, err := CheckMessage(msg)
		if err == nil {
			// A message that verifies has a body of the stamped length.
			if i := bytes.Index(msg, []byte("\n\r\n")); i < 0 && !bytes.Contains(msg, []byte("\n\n")) &&
				!bytes.HasPrefix(msg, []byte("\r\n")) && !bytes.HasPrefix(msg, []byte("\n")) {
				t.Fatalf("verified without end of header: %q", msg)
			}
			if st.ID == "" {
				t.Fatal("verified without id")
			}
		}
	})
}

func BenchmarkGenerate1K(b *testing.B) {
	g := NewGenerator(1)
	r := rand.New(rand.NewPCG(1, 1))
	var buf, wire []byte
	now := time.Now()
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		buf = g.Append(buf[:0], MessageSpec{ID: "abcd1234-123456", From: "bench@sender.test",
			To: []string{"u1@d0001.test"}, Size: 1024, Sent: now}, r)
		wire = AppendDotStuffed(wire[:0], buf)
	}
	b.SetBytes(1024)
}

func BenchmarkCheckMessage1K(b *testing.B) {
	g := NewGenerator(1)
	r := rand.New(rand.NewPCG(1, 1))
	msg := g.Append(nil, MessageSpec{ID: "abcd1234-123456", Size: 1024, Sent: time.Now()}, r)
	b.ReportAllocs()
	b.SetBytes(int64(len(msg)))
	for i := 0; i < b.N; i++ {
		if _, err := CheckMessage(msg); err != nil {
			b.Fatal(err)
		}
	}
}

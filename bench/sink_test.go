package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func newTestSink(t *testing.T, cfg SinkConfig) *Sink {
	t.Helper()
	if len(cfg.Listen) == 0 {
		cfg.Listen = []string{"127.0.0.1:0"}
	}
	s, err := NewSink(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// client is a line-level SMTP test client.
type client struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func dialSink(t *testing.T, addr string) *client {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return &client{t: t, c: c, r: bufio.NewReader(c)}
}

// send writes the lines, each with CRLF, in one write.
func (c *client) send(lines ...string) {
	c.t.Helper()
	if _, err := io.WriteString(c.c, strings.Join(lines, "\r\n")+"\r\n"); err != nil {
		c.t.Fatal(err)
	}
}

// reply reads one reply and returns its code and text (lines joined by
// "\n", enhanced code included).
func (c *client) reply() (int, string, error) {
	var text []string
	for {
		line, err := c.r.ReadString('\n')
		if err != nil {
			return 0, strings.Join(text, "\n"), err
		}
		line = strings.TrimRight(line, "\r\n")
		if len(line) < 3 {
			return 0, line, fmt.Errorf("short reply line %q", line)
		}
		code, err := strconv.Atoi(line[:3])
		if err != nil {
			return 0, line, err
		}
		text = append(text, strings.TrimLeft(line[3:], " -"))
		if len(line) == 3 || line[3] == ' ' {
			return code, strings.Join(text, "\n"), nil
		}
	}
}

// expect reads a reply and fails unless its code is code; it returns the
// text.
func (c *client) expect(code int) string {
	c.t.Helper()
	got, text, err := c.reply()
	if err != nil {
		c.t.Fatalf("want %d, got error %v", code, err)
	}
	if got != code {
		c.t.Fatalf("want %d, got %d %s", code, got, text)
	}
	return text
}

// cmd sends one line and expects code.
func (c *client) cmd(line string, code int) string {
	c.t.Helper()
	c.send(line)
	return c.expect(code)
}

// greet reads the banner and says EHLO.
func (c *client) greet() string {
	c.t.Helper()
	c.expect(220)
	return c.cmd("EHLO client.test", 250)
}

// data sends msg (not dot-stuffed) after a 354 and expects code.
func (c *client) data(msg []byte, code int) string {
	c.t.Helper()
	c.cmd("DATA", 354)
	if _, err := c.c.Write(AppendDotStuffed(nil, msg)); err != nil {
		c.t.Fatal(err)
	}
	return c.expect(code)
}

// expectClosed fails unless the server closes the connection.
func (c *client) expectClosed() {
	c.t.Helper()
	_ = c.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := c.r.ReadByte(); err == nil {
		c.t.Fatalf("connection still open (read %q)", b)
	} else if ne := (net.Error)(nil); errors.As(err, &ne) && ne.Timeout() {
		c.t.Fatal("connection still open (timeout)")
	}
}

// expectSilent fails unless nothing arrives within d.
func (c *client) expectSilent(d time.Duration) {
	c.t.Helper()
	_ = c.c.SetReadDeadline(time.Now().Add(d))
	b, err := c.r.ReadByte()
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		c.t.Fatalf("want silence, got %q %v", b, err)
	}
	_ = c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
}

// testGen holds the body text for test messages (built once: it is
// slow under -race).
var testGen = sync.OnceValue(func() *Generator { return NewGenerator(1) })

func stamped(t *testing.T, id string, rcpts ...string) []byte {
	t.Helper()
	g := testGen().Clone()
	return g.Append(nil, MessageSpec{ID: id, From: "a@sender.test", To: rcpts, Size: 1500, Sent: time.Now()},
		rand.New(rand.NewPCG(uint64(len(id)), 9)))
}

func TestSinkDialog(t *testing.T) {
	s := newTestSink(t, SinkConfig{MaxSize: 4000})
	c := dialSink(t, s.Addrs()[0])
	if banner := c.expect(220); !strings.Contains(banner, "sink.test") {
		t.Errorf("banner %q", banner)
	}
	c.cmd("MAIL FROM:<a@b.test>", 503) // before EHLO
	ehlo := c.cmd("EHLO client.test", 250)
	for _, ext := range []string{"PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 4000", "ENHANCEDSTATUSCODES"} {
		if !strings.Contains(ehlo, "\n"+ext) {
			t.Errorf("EHLO lacks %s: %q", ext, ehlo)
		}
	}
	for _, ext := range []string{"STARTTLS", "CHUNKING"} {
		if strings.Contains(ehlo, ext) {
			t.Errorf("EHLO offers %s, which is off", ext)
		}
	}
	c.cmd("EHLO", 501)
	c.cmd("RCPT TO:<x@d.test>", 503)
	c.cmd("DATA", 503)
	c.cmd("MAIL FROM:a@b.test", 501)
	c.cmd("MAIL FROM:<a@b.test> SIZE=5000", 552)
	c.cmd("MAIL FROM:<a@b.test> FOO=1", 555)
	c.cmd("MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME SMTPUTF8", 250)
	c.cmd("MAIL FROM:<a@b.test>", 503) // nested
	c.cmd("DATA", 554)                 // no recipients
	c.cmd("RCPT TO:<>", 501)
	c.cmd("RCPT TO:<x@d.test> NOTIFY=NEVER", 250)
	if got := c.data([]byte("Subject: x\r\n\r\nhello\r\n"), 250); !strings.HasPrefix(got, "2.0.0") {
		t.Errorf("end of data: %q", got)
	}
	// Too big: refused at the end, and the session goes on.
	c.cmd("MAIL FROM:<>", 250)
	c.cmd("RCPT TO:<x@d.test>", 250)
	c.data(bytes.Repeat([]byte("0123456789012345678\r\n"), 300), 552)
	c.cmd("RSET", 250)
	c.cmd("NOOP", 250)
	c.cmd("VRFY x", 252)
	c.cmd("HELP", 214)
	c.cmd("STARTTLS", 500)
	c.cmd("XYZZY", 500)
	c.cmd(strings.Repeat("A", 70000), 500)
	c.cmd("HELO client.test", 250)
	c.cmd("QUIT", 221)
	c.expectClosed()

	st := s.Stats()
	if st.Messages != 1 || st.Recipients != 1 || st.Unstamped != 1 || st.Connections != 1 {
		t.Errorf("stats %+v", st)
	}
	if st.Replies[503] != 4 || st.Replies[552] != 2 || st.Replies[500] != 3 {
		t.Errorf("replies %v", st.Replies)
	}
}

func TestSinkPipelining(t *testing.T) {
	s := newTestSink(t, SinkConfig{})
	c := dialSink(t, s.Addrs()[0])
	c.greet()
	msg := stamped(t, "p-1", "a@d1.test")
	// The whole transaction and the next envelope in one write.
	wire := "MAIL FROM:<a@sender.test>\r\nRCPT TO:<a@d1.test>\r\nRCPT TO:<b@d2.test>\r\nDATA\r\n"
	if _, err := io.WriteString(c.c, wire); err != nil {
		t.Fatal(err)
	}
	for _, want := range []int{250, 250, 250, 354} {
		c.expect(want)
	}
	tail := string(AppendDotStuffed(nil, msg)) + "MAIL FROM:<a@sender.test>\r\nRCPT TO:<c@d3.test>\r\nDATA\r\n"
	if _, err := io.WriteString(c.c, tail); err != nil {
		t.Fatal(err)
	}
	for _, want := range []int{250, 250, 250, 354} {
		c.expect(want)
	}
	if _, err := c.c.Write(AppendDotStuffed(nil, stamped(t, "p-2", "c@d3.test"))); err != nil {
		t.Fatal(err)
	}
	c.expect(250)
	st := s.Stats()
	if st.Messages != 2 || st.Unique != 3 || st.Corrupted != 0 || st.Domains["d2.test"] != 1 {
		t.Errorf("stats %+v", st)
	}
}

func TestSinkVerifyAndDuplicates(t *testing.T) {
	s := newTestSink(t, SinkConfig{})
	c := dialSink(t, s.Addrs()[0])
	c.greet()
	send := func(msg []byte, rcpts ...string) {
		t.Helper()
		c.cmd("MAIL FROM:<a@sender.test>", 250)
		for _, r := range rcpts {
			c.cmd("RCPT TO:<"+r+">", 250)
		}
		c.data(msg, 250)
	}
	good := stamped(t, "v-1", "a@d1.test")
	send(good, "a@d1.test", "b@D2.test")
	send(good, "b@d2.test") // duplicate for b only
	send(good, "c@d2.test") // same id, new recipient: not a duplicate
	bad := bytes.Clone(stamped(t, "v-2", "a@d1.test"))
	bad[len(bad)-10] ^= 1
	send(bad, "a@d1.test")
	send([]byte("Subject: bounce\r\n\r\nbody\r\n"), "postmaster@sender.test")

	st := s.Stats()
	want := SinkStats{Messages: 5, Recipients: 6, Unique: 4, Duplicates: 1, Corrupted: 1, Unstamped: 1}
	if st.Messages != want.Messages || st.Recipients != want.Recipients || st.Unique != want.Unique ||
		st.Duplicates != want.Duplicates || st.Corrupted != want.Corrupted || st.Unstamped != want.Unstamped {
		t.Errorf("stats %+v, want %+v", st, want)
	}
	if st.E2E.Count != 3 {
		t.Errorf("e2e samples %d, want 3 (first deliveries of verified messages)", st.E2E.Count)
	}
	if n, first := s.Seen("v-1", "B@d2.test"); n != 2 || first.IsZero() {
		t.Errorf("Seen v-1 b: %d %v", n, first)
	}
	if n, _ := s.Seen("v-1", "zz@d2.test"); n != 0 {
		t.Errorf("Seen unknown: %d", n)
	}
	if st.Domains["d2.test"] != 3 || st.Domains["d1.test"] != 2 || st.Domains["sender.test"] != 1 {
		t.Errorf("domains %v", st.Domains)
	}
	list, next, dropped := s.Arrivals(0, 100)
	if len(list) != 5 || next != 5 || dropped != 0 {
		t.Fatalf("arrivals %d next %d dropped %d", len(list), next, dropped)
	}
	var statuses []string
	for _, a := range list {
		statuses = append(statuses, a.Status+"/"+strconv.Itoa(a.Dups))
	}
	if got := strings.Join(statuses, " "); got != "ok/0 ok/1 ok/0 corrupt/0 unstamped/0" {
		t.Errorf("statuses %q", got)
	}
	if list[0].ID != "v-1" || list[0].Sent == 0 || list[0].Arrived < list[0].Sent || list[0].MX != s.Addrs()[0] ||
		list[0].Size != len(good) || strings.Join(list[0].Rcpts, ",") != "a@d1.test,b@D2.test" {
		t.Errorf("arrival %+v", list[0])
	}
	if l, n, _ := s.Arrivals(3, 1); len(l) != 1 || l[0].Seq != 3 || n != 4 {
		t.Errorf("Arrivals(3,1): %+v next %d", l, n)
	}
}

func TestSinkArrivalRing(t *testing.T) {
	s := newTestSink(t, SinkConfig{ArrivalLog: 3})
	c := dialSink(t, s.Addrs()[0])
	c.greet()
	for i := 0; i < 5; i++ {
		c.cmd("MAIL FROM:<a@sender.test>", 250)
		c.cmd("RCPT TO:<r@d.test>", 250)
		c.data(stamped(t, "ring-"+strconv.Itoa(i)), 250)
	}
	list, next, dropped := s.Arrivals(0, 10)
	if dropped != 2 || next != 5 || len(list) != 3 || list[0].ID != "ring-2" || list[2].ID != "ring-4" {
		t.Errorf("dropped %d next %d list %+v", dropped, next, list)
	}
}

func TestSinkChunking(t *testing.T) {
	s := newTestSink(t, SinkConfig{Chunking: true})
	c := dialSink(t, s.Addrs()[0])
	if ehlo := c.greet(); !strings.Contains(ehlo, "CHUNKING") {
		t.Fatalf("no CHUNKING: %q", ehlo)
	}
	// BDAT without a transaction: the chunk is consumed, the stream stays in step.
	c.send("BDAT 5 LAST")
	if _, err := io.WriteString(c.c, "hello"); err != nil {
		t.Fatal(err)
	}
	c.expect(503)
	c.cmd("NOOP", 250)

	msg := stamped(t, "b-1", "a@d1.test")
	c.cmd("MAIL FROM:<a@sender.test>", 250)
	c.cmd("RCPT TO:<a@d1.test>", 250)
	half := len(msg) / 2
	if _, err := io.WriteString(c.c, "BDAT "+strconv.Itoa(half)+"\r\n"+string(msg[:half])); err != nil {
		t.Fatal(err)
	}
	c.expect(250)
	if _, err := io.WriteString(c.c, "BDAT "+strconv.Itoa(len(msg)-half)+" LAST\r\n"+string(msg[half:])); err != nil {
		t.Fatal(err)
	}
	c.expect(250)
	c.cmd("BDAT x", 501)
	c.expectClosed()
	if st := s.Stats(); st.Messages != 1 || st.Unique != 1 || st.Corrupted != 0 {
		t.Errorf("stats %+v", st)
	}
}

func TestSinkStartTLS(t *testing.T) {
	s := newTestSink(t, SinkConfig{StartTLS: true})
	c := dialSink(t, s.Addrs()[0])
	if ehlo := c.greet(); !strings.Contains(ehlo, "STARTTLS") {
		t.Fatalf("no STARTTLS: %q", ehlo)
	}
	c.cmd("STARTTLS", 220)
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(s.CertPEM()) {
		t.Fatal("bad CertPEM")
	}
	tc := tls.Client(c.c, &tls.Config{ServerName: "sink.test", RootCAs: pool})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	c.c, c.r = tc, bufio.NewReader(tc)
	c.cmd("MAIL FROM:<a@sender.test>", 503) // EHLO is needed again
	if ehlo := c.cmd("EHLO client.test", 250); strings.Contains(ehlo, "STARTTLS") {
		t.Errorf("STARTTLS offered inside TLS: %q", ehlo)
	}
	c.cmd("MAIL FROM:<a@sender.test>", 250)
	c.cmd("RCPT TO:<a@d1.test>", 250)
	c.data(stamped(t, "tls-1"), 250)
	c.cmd("QUIT", 221)

	// Commands pipelined after STARTTLS are refused (RFC 3207 §4).
	c2 := dialSink(t, s.Addrs()[0])
	c2.greet()
	c2.send("STARTTLS", "NOOP")
	c2.expect(503)
	c2.expectClosed()
	if st := s.Stats(); st.TLS != 1 || st.Unique != 1 {
		t.Errorf("stats %+v", st)
	}
}

// transcript runs n transactions over one connection and returns the
// sequence of reply codes.
func transcript(t *testing.T, s *Sink, n int) string {
	t.Helper()
	c := dialSink(t, s.Addrs()[0])
	c.greet()
	var codes []string
	for i := 0; i < n; i++ {
		c.send("MAIL FROM:<a@sender.test>", "RCPT TO:<a@d1.test>", "RCPT TO:<b@d2.test>", "DATA")
		var got [4]int
		for j := range got {
			code, _, err := c.reply()
			if err != nil {
				t.Fatal(err)
			}
			got[j] = code
		}
		if got[3] == 354 {
			if _, err := c.c.Write(AppendDotStuffed(nil, stamped(t, "d-"+strconv.Itoa(i)))); err != nil {
				t.Fatal(err)
			}
			code, _, err := c.reply()
			if err != nil {
				t.Fatal(err)
			}
			codes = append(codes, fmt.Sprint(got[0], got[1], got[2], code))
		} else {
			codes = append(codes, fmt.Sprint(got[0], got[1], got[2], got[3]))
			c.cmd("RSET", 250)
		}
	}
	return strings.Join(codes, ";")
}

func TestSinkFaultsDeterministic(t *testing.T) {
	faults := Faults{Default: FaultRule{
		Mail: map[string]float64{"452": 0.05},
		Rcpt: map[string]float64{"451": 0.2, "550": 0.1},
		Data: map[string]float64{"554": 0.1},
	}}
	const n = 300
	a := transcript(t, newTestSink(t, SinkConfig{Seed: 42, Faults: faults}), n)
	b := transcript(t, newTestSink(t, SinkConfig{Seed: 42, Faults: faults}), n)
	c := transcript(t, newTestSink(t, SinkConfig{Seed: 43, Faults: faults}), n)
	if a != b {
		t.Error("same seed, different replies")
	}
	if a == c {
		t.Error("different seeds, same replies")
	}
	// The rates hold: 2n RCPTs (less those after a failed MAIL) at 20% 451.
	s := newTestSink(t, SinkConfig{Seed: 7, Faults: faults})
	transcript(t, s, n)
	st := s.Stats()
	rcpts := float64(2 * (n - int(st.Replies[452])))
	check := func(name string, got uint64, p, trials float64) {
		mean := p * trials
		sd := mathSqrt(trials * p * (1 - p))
		if float64(got) < mean-6*sd || float64(got) > mean+6*sd {
			t.Errorf("%s: %d, want about %.0f", name, got, mean)
		}
	}
	check("MAIL 452", st.Replies[452], 0.05, n)
	check("RCPT 451", st.Replies[451], 0.2, rcpts)
	check("RCPT 550", st.Replies[550], 0.1, rcpts)
	if st.Replies[554] == 0 || st.Messages == 0 || st.Messages+st.Replies[554] > n {
		t.Errorf("data replies: 554 %d, messages %d", st.Replies[554], st.Messages)
	}
}

func mathSqrt(x float64) float64 {
	z := x / 2
	for i := 0; i < 50 && z > 0; i++ {
		z = (z + x/z) / 2
	}
	return z
}

func TestSinkConnectFaults(t *testing.T) {
	s := newTestSink(t, SinkConfig{Faults: Faults{Default: FaultRule{Connect: map[string]float64{"421": 1}}}})
	c := dialSink(t, s.Addrs()[0])
	if text := c.expect(421); !strings.Contains(text, "4.3.2") {
		t.Errorf("421 text %q", text)
	}
	c.expectClosed()

	s = newTestSink(t, SinkConfig{Faults: Faults{Default: FaultRule{Connect: map[string]float64{"554": 1}}}})
	c = dialSink(t, s.Addrs()[0])
	c.expect(554)
	c.cmd("EHLO client.test", 503)
	c.cmd("MAIL FROM:<a@b.test>", 503)
	c.cmd("QUIT", 221)
	c.expectClosed()
}

func TestSinkRulesByDomainAndAddr(t *testing.T) {
	s := newTestSink(t, SinkConfig{
		Listen: []string{"127.0.0.1:0", "127.0.0.2:0"},
		Faults: Faults{
			Domain: map[string]FaultRule{
				"D0001.test": {Rcpt: map[string]float64{"550": 1}},
				"d0002.test": {Data: map[string]float64{"421": 1}},
			},
			Addr: map[string]FaultRule{"127.0.0.2": {Hang: true}},
		},
	})
	c := dialSink(t, s.Addrs()[0])
	c.greet()
	c.cmd("MAIL FROM:<a@sender.test>", 250)
	if text := c.cmd("RCPT TO:<x@d0001.TEST>", 550); !strings.HasPrefix(text, "5.1.1") {
		t.Errorf("550 text %q", text)
	}
	c.cmd("RCPT TO:<x@d0003.test>", 250)
	c.data(stamped(t, "r-1"), 250)
	// The d0002 rule governs the transaction its recipient opened.
	c.cmd("MAIL FROM:<a@sender.test>", 250)
	c.cmd("RCPT TO:<x@d0002.test>", 250)
	c.cmd("RCPT TO:<x@d0003.test>", 250)
	c.data(stamped(t, "r-2"), 421)
	c.expectClosed()

	h := dialSink(t, s.Addrs()[1])
	h.expectSilent(200 * time.Millisecond)
	if st := s.Stats(); st.Hung != 1 || st.Messages != 1 {
		t.Errorf("stats %+v", st)
	}
}

func TestSinkHangDomain(t *testing.T) {
	s := newTestSink(t, SinkConfig{Faults: Faults{Domain: map[string]FaultRule{"black.test": {Hang: true}}}})
	c := dialSink(t, s.Addrs()[0])
	c.greet()
	c.send("MAIL FROM:<a@sender.test>", "RCPT TO:<x@black.test>")
	c.expect(250) // MAIL's reply is flushed before the hang
	c.expectSilent(200 * time.Millisecond)
	// Close ends hung connections promptly.
	done := make(chan struct{})
	go func() { _ = s.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close blocked on a hung connection")
	}
	c.expectClosed()
}

func TestSinkDropMidData(t *testing.T) {
	s := newTestSink(t, SinkConfig{Faults: Faults{Default: FaultRule{DropMidData: 1}}})
	c := dialSink(t, s.Addrs()[0])
	c.greet()
	c.cmd("MAIL FROM:<a@sender.test>", 250)
	c.cmd("RCPT TO:<x@d.test>", 250)
	c.cmd("DATA", 354)
	c.send("Subject: first line")
	c.expectClosed()
	if st := s.Stats(); st.Dropped != 1 || st.Messages != 0 {
		t.Errorf("stats %+v", st)
	}
}

func TestSinkGreylist(t *testing.T) {
	s := newTestSink(t, SinkConfig{Faults: Faults{Domain: map[string]FaultRule{
		"grey.test": {Greylist: true},
		"slow.test": {Greylist: true, GreylistDelay: time.Hour},
	}}})
	c := dialSink(t, s.Addrs()[0])
	c.greet()
	c.cmd("MAIL FROM:<a@sender.test>", 250)
	if text := c.cmd("RCPT TO:<x@grey.test>", 451); !strings.HasPrefix(text, "4.7.1") {
		t.Errorf("greylist text %q", text)
	}
	c.cmd("RCPT TO:<x@grey.test>", 250)  // retry passes
	c.cmd("RCPT TO:<y@grey.test>", 451)  // another pair
	c.cmd("RCPT TO:<x@other.test>", 250) // not greylisted
	c.cmd("RCPT TO:<x@slow.test>", 451)  // first
	c.cmd("RCPT TO:<x@slow.test>", 451)  // too early
	c.cmd("RSET", 250)
	c.cmd("MAIL FROM:<b@sender.test>", 250)
	c.cmd("RCPT TO:<x@grey.test>", 451) // another sender: another pair
	if st := s.Stats(); st.Greylisted != 5 {
		t.Errorf("greylisted %d", st.Greylisted)
	}
}

func TestSinkConnCap(t *testing.T) {
	s := newTestSink(t, SinkConfig{Faults: Faults{Default: FaultRule{MaxConnsPerIP: 2}}})
	a := dialSink(t, s.Addrs()[0])
	a.expect(220)
	b := dialSink(t, s.Addrs()[0])
	b.expect(220)
	c := dialSink(t, s.Addrs()[0])
	if text := c.expect(421); !strings.HasPrefix(text, "4.7.0") {
		t.Errorf("cap text %q", text)
	}
	c.expectClosed()
	a.cmd("QUIT", 221)
	a.expectClosed()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Wait(ctx, func(st SinkStats) bool { return st.Active == 1 }); err != nil {
		t.Fatal(err)
	}
	d := dialSink(t, s.Addrs()[0])
	d.expect(220)
	if st := s.Stats(); st.ConnCapped != 1 || st.Connections != 4 {
		t.Errorf("stats %+v", st)
	}
}

func TestSinkDelay(t *testing.T) {
	const delay = 80 * time.Millisecond
	s := newTestSink(t, SinkConfig{Faults: Faults{Default: FaultRule{DataDelay: FixedDelay(delay)},
		Domain: map[string]FaultRule{"slow.test": {Delay: FixedDelay(delay)}}}})
	c := dialSink(t, s.Addrs()[0])
	c.greet()
	start := time.Now()
	c.cmd("MAIL FROM:<a@sender.test>", 250)
	c.cmd("RCPT TO:<x@fast.test>", 250)
	if d := time.Since(start); d >= delay {
		t.Logf("undelayed commands took %v (slow machine?)", d)
	}
	start = time.Now()
	c.cmd("RCPT TO:<x@slow.test>", 250)
	if d := time.Since(start); d < delay {
		t.Errorf("delayed RCPT answered after %v, want >= %v", d, delay)
	}
	start = time.Now()
	c.data(stamped(t, "delay-1"), 250)
	if d := time.Since(start); d < delay {
		t.Errorf("end of data answered after %v, want >= %v", d, delay)
	}
}

func TestSinkCapture(t *testing.T) {
	s := newTestSink(t, SinkConfig{Capture: []string{"Sender.test"}})
	s.CaptureDomain("other.test")
	c := dialSink(t, s.Addrs()[0])
	c.greet()
	bounce := []byte("Subject: Undelivered Mail\r\n\r\n.leading dot\r\nbody\r\n")
	c.cmd("MAIL FROM:<>", 250)
	c.cmd("RCPT TO:<bench@sender.test>", 250)
	c.data(bounce, 250)
	c.cmd("MAIL FROM:<a@sender.test>", 250)
	c.cmd("RCPT TO:<x@d1.test>", 250)
	c.data(stamped(t, "cap-1"), 250)
	got := s.Captured("SENDER.test")
	if len(got) != 1 || !bytes.Equal(got[0].Raw, bounce) || got[0].From != "" ||
		strings.Join(got[0].Rcpts, ",") != "bench@sender.test" || got[0].MX != s.Addrs()[0] {
		t.Fatalf("captured %+v", got)
	}
	if n := len(s.Captured("d1.test")); n != 0 {
		t.Errorf("d1.test captured %d", n)
	}
}

func TestSinkHTTP(t *testing.T) {
	s := newTestSink(t, SinkConfig{HTTP: "127.0.0.1:0"})
	c := dialSink(t, s.Addrs()[0])
	c.greet()
	for i := 0; i < 3; i++ {
		c.cmd("MAIL FROM:<a@sender.test>", 250)
		c.cmd("RCPT TO:<x@cap.test>", 250)
		c.data(stamped(t, "h-"+strconv.Itoa(i)), 250)
	}
	base := "http://" + s.HTTPAddr()
	getJSON := func(path string, v any) {
		t.Helper()
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("%s: %s", path, resp.Status)
		}
		if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
			t.Fatal(err)
		}
	}
	post := func(path string, want int) {
		t.Helper()
		resp, err := http.Post(base+path, "", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("POST %s: %s", path, resp.Status)
		}
	}
	var st SinkStats
	getJSON("/stats", &st)
	if st.Messages != 3 || st.Unique != 3 || st.Replies[250] == 0 || st.Domains["cap.test"] != 3 || st.E2E.Count != 3 {
		t.Errorf("/stats %+v", st)
	}
	var page MessagesPage
	getJSON("/messages?since=1&limit=1", &page)
	if page.Next != 2 || len(page.Arrivals) != 1 || page.Arrivals[0].ID != "h-1" {
		t.Errorf("/messages %+v", page)
	}
	getJSON("/messages?since=3", &page)
	if page.Next != 3 || len(page.Arrivals) != 0 {
		t.Errorf("/messages at end %+v", page)
	}
	if resp, err := http.Get(base + "/messages?since=x"); err != nil || resp.StatusCode != 400 {
		t.Errorf("bad since: %v %v", resp, err)
	}
	post("/capture?domain=cap.test", 204)
	post("/capture", 400)
	c.cmd("MAIL FROM:<a@sender.test>", 250)
	c.cmd("RCPT TO:<x@cap.test>", 250)
	msg := stamped(t, "h-cap")
	c.data(msg, 250)
	var caps []Captured
	getJSON("/captured?domain=cap.test", &caps)
	if len(caps) != 1 || !bytes.Equal(caps[0].Raw, msg) {
		t.Errorf("/captured %d", len(caps))
	}
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, m := range []string{"hermod_bench_sink_messages_total 4", `hermod_bench_sink_replies_total{code="354"} 4`} {
		if !strings.Contains(string(body), m) {
			t.Errorf("/metrics lacks %q", m)
		}
	}
	post("/reset", 204)
	st = SinkStats{}
	getJSON("/stats", &st)
	if st.Messages != 0 || st.Unique != 0 || len(st.Domains) != 0 || st.E2E.Count != 0 {
		t.Errorf("after reset %+v", st)
	}
	if n, _ := s.Seen("h-1", "x@cap.test"); n != 0 {
		t.Error("reset kept seen ids")
	}
}

func TestSinkCollector(t *testing.T) {
	s := newTestSink(t, SinkConfig{})
	c := dialSink(t, s.Addrs()[0])
	c.greet()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(s.Collector())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			v := m.GetCounter().GetValue() + m.GetGauge().GetValue()
			found[mf.GetName()] += v
		}
	}
	if found["hermod_bench_sink_connections_total"] != 1 || found["hermod_bench_sink_replies_total"] != 2 {
		t.Errorf("gathered %v", found)
	}
}

func TestSinkConfigValidate(t *testing.T) {
	c := SinkConfig{Listen: []string{"x"}, HTTP: "y", MaxSize: -1, MaxRcpts: -1, IdleTimeout: -1, TLSCert: "a",
		ArrivalLog: -1, Faults: Faults{
			Default: FaultRule{Rcpt: map[string]float64{"250": 0.5, "451": 2}, DropMidData: 3, MaxConnsPerIP: -1},
			Domain:  map[string]FaultRule{"a.test": {Mail: map[string]float64{"451": 0.6, "452": 0.6}}},
			Addr:    map[string]FaultRule{"127.0.0.2": {GreylistDelay: -1}},
		}}
	err := c.Validate()
	if err == nil {
		t.Fatal("no error")
	}
	for _, key := range []string{"sink.listen[0]", "sink.http", "sink.max_size", "sink.max_rcpts", "sink.idle_timeout",
		"sink.tls_cert", "sink.arrival_log", "sink.faults.default.rcpt.250", "sink.faults.default.rcpt.451",
		"sink.faults.default.drop_mid_data", "sink.faults.default.max_conns_per_ip", `sink.faults.domain."a.test".mail`,
		`sink.faults.addr."127.0.0.2".greylist_delay`} {
		if !strings.Contains(err.Error(), key+":") {
			t.Errorf("error does not name %s:\n%v", key, err)
		}
	}
	if err := DefaultSinkConfig().Validate(); err != nil {
		t.Errorf("defaults: %v", err)
	}
}

func TestLoadFaults(t *testing.T) {
	dir := t.TempDir()
	tomlPath := filepath.Join(dir, "f.toml")
	if err := os.WriteFile(tomlPath, []byte(`
[default]
rcpt = { "451" = 0.01 }
delay = "uniform(1ms, 2ms)"
max_conns_per_ip = 20
[domain."d0001.test"]
data = { "421" = 1.0 }
greylist = true
greylist_delay = "5m"
[addr."127.0.0.3"]
hang = true
`), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := LoadFaults(tomlPath)
	if err != nil {
		t.Fatal(err)
	}
	if f.Default.Rcpt["451"] != 0.01 || f.Default.Delay.String() != "uniform(1ms,2ms)" || f.Default.MaxConnsPerIP != 20 ||
		f.Domain["d0001.test"].Data["421"] != 1 || f.Domain["d0001.test"].GreylistDelay != 5*time.Minute ||
		!f.Addr["127.0.0.3"].Hang {
		t.Errorf("decoded %+v", f)
	}
	jsonPath := filepath.Join(dir, "f.json")
	if err := os.WriteFile(jsonPath, []byte(`{"default": {"mail": {"452": 0.5}, "delay": "lognormal(1ms,0.5)"}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if f, err := LoadFaults(jsonPath); err != nil || f.Default.Mail["452"] != 0.5 {
		t.Errorf("json: %+v %v", f, err)
	}
	for name, body := range map[string]string{
		"unknown.toml": "[default]\nrcpt_typo = 1\n",
		"unknown.json": `{"default": {"nope": 1}}`,
		"invalid.toml": "[default]\nrcpt = { \"451\" = 1.5 }\n",
		"baddist.toml": "[default]\ndelay = \"soon\"\n",
	} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadFaults(p); err == nil {
			t.Errorf("%s: no error", name)
		} else if name == "unknown.toml" && !strings.Contains(err.Error(), "default.rcpt_typo") {
			t.Errorf("%s: error does not name the key: %v", name, err)
		}
	}
}

// TestSinkSMTPLib checks interoperation with an independent client:
// Python's smtplib, with and without STARTTLS.
func TestSinkSMTPLib(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed")
	}
	s := newTestSink(t, SinkConfig{StartTLS: true})
	dir := t.TempDir()
	msgPath := filepath.Join(dir, "msg.eml")
	msg := stamped(t, "py-1", "a@d1.test")
	if err := os.WriteFile(msgPath, msg, 0o600); err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(s.Addrs()[0])
	script := `
import smtplib, ssl, sys
port, path = int(sys.argv[1]), sys.argv[2]
msg = open(path, 'rb').read()
for tls in (False, True):
    s = smtplib.SMTP('127.0.0.1', port, timeout=10)
    s.ehlo('py.test')
    assert s.has_extn('pipelining') and s.has_extn('smtputf8') and s.has_extn('starttls')
    if tls:
        s.starttls(context=ssl._create_unverified_context())
        s.ehlo('py.test')
    refused = s.sendmail('a@sender.test', ['a@d1.test', 'b@d2.test'] if not tls else ['c@d3.test'], msg)
    assert refused == {}, refused
    s.quit()
print('ok')
`
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, py, "-c", script, port, msgPath).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Fatalf("smtplib: %v\n%s", err, out)
	}
	st := s.Stats()
	if st.Messages != 2 || st.Unique != 3 || st.Corrupted != 0 || st.Unstamped != 0 || st.TLS != 1 {
		t.Errorf("stats %+v", st)
	}
}

func TestSinkNoRecords(t *testing.T) {
	s := newTestSink(t, SinkConfig{NoRecords: true, NoPipelining: true})
	c := dialSink(t, s.Addrs()[0])
	if ehlo := c.greet(); strings.Contains(ehlo, "PIPELINING") {
		t.Errorf("PIPELINING offered: %q", ehlo)
	}
	msg := stamped(t, "nr-1")
	for i := 0; i < 2; i++ {
		c.cmd("MAIL FROM:<a@sender.test>", 250)
		c.cmd("RCPT TO:<x@d.test>", 250)
		c.data(msg, 250)
	}
	st := s.Stats()
	if st.Unique != 2 || st.Duplicates != 0 || st.E2E.Count != 2 || s.Count("nr-1", "x@d.test") != 0 {
		t.Errorf("stats %+v", st)
	}
	// A client that pipelines anyway is still answered in order, and the
	// load falls back to one command at a time.
	res := runLoad(t, LoadConfig{Targets: s.Addrs(), Sessions: 2, Messages: 50})
	if res.Accepted != 50 {
		t.Errorf("load without PIPELINING: %+v", res)
	}
}

// FuzzSinkSession feeds arbitrary client bytes to a sink connection: it
// must neither panic nor hang, and must answer within its limits.
func FuzzSinkSession(f *testing.F) {
	for _, seed := range []string{
		"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nSubject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
		"EHLO x\r\nMAIL FROM:<a@b> SIZE=10\r\nRCPT TO:<c@d>\r\nBDAT 3 LAST\r\nabcQUIT\r\n",
		"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n.\r\nRSET\r\nNOOP\r\n",
		"EHLO x\r\nBDAT 99999999999\r\n",
		"EHLO\r\nMAIL\r\nRCPT\r\nDATA\r\n\x00\xff\r\n",
	} {
		f.Add([]byte(seed))
	}
	s, err := NewSink(SinkConfig{Listen: []string{"127.0.0.1:0"}, Chunking: true, MaxSize: 1 << 16,
		IdleTimeout: 5 * time.Second})
	if err != nil {
		f.Fatal(err)
	}
	defer s.Close()
	f.Fuzz(func(t *testing.T, in []byte) {
		client, server := net.Pipe()
		s.wg.Add(1)
		done := make(chan struct{})
		go func() {
			s.serve(server)
			close(done)
		}()
		go func() { _, _ = io.Copy(io.Discard, client) }()
		_ = client.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_, _ = client.Write(in)
		_ = client.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("session did not end")
		}
	})
}

package main

import (
	"context"
	"fmt"
	"net"
	"net/mail"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/bench"
)

// relayEnv is a loopback world for delivery tests: an authoritative DNS
// server and sink MX hosts on 127.0.0.x, all on one port (the daemon's
// [delivery] port).
type relayEnv struct {
	t    *testing.T
	dns  *bench.DNS
	sink *bench.Sink
	port int
}

var captureDomains = []string{"good.test", "fallback.test", "implicit.test", "retry.test", "reject.test", "sender.test", "expire.test", "later.test", "mixed.test"}

func newRelayEnv(t *testing.T) *relayEnv {
	t.Helper()
	// A port free on every sink address.
	port := freePortOn(t, "127.0.0.2")
	mx := func(host, ip string, pref uint16) bench.MX {
		return bench.MX{Host: host, Pref: pref, Addrs: []string{ip}}
	}
	dcfg := bench.DNSConfig{
		Listen:  "127.0.0.1:0",
		Domains: 1,
		MX:      []string{"127.0.0.2"},
		Extra:   []string{},
		TTL:     60,
		Zones: []bench.Zone{
			// Preference 10 is on 127.0.0.2, 20 on 127.0.0.3: mail must go to .2.
			{Name: "good.test", MX: []bench.MX{mx("mx2.good.test", "127.0.0.3", 20), mx("mx1.good.test", "127.0.0.2", 10)}},
			// The preferred MX refuses connections (nothing on 127.0.0.4).
			{Name: "fallback.test", MX: []bench.MX{mx("mx1.fallback.test", "127.0.0.4", 10), mx("mx2.fallback.test", "127.0.0.3", 20)}},
			{Name: "implicit.test", A: []string{"127.0.0.2"}},
			{Name: "null.test", NullMX: true},
			{Name: "retry.test", MX: []bench.MX{mx("mx.retry.test", "127.0.0.2", 10)}},
			{Name: "reject.test", MX: []bench.MX{mx("mx.reject.test", "127.0.0.2", 10)}},
			{Name: "expire.test", MX: []bench.MX{mx("mx.expire.test", "127.0.0.2", 10)}},
			{Name: "mixed.test", MX: []bench.MX{mx("mx.mixed.test", "127.0.0.2", 10)}},
			{Name: "sender.test", MX: []bench.MX{mx("mx.sender.test", "127.0.0.2", 10)}},
			// Its MX accepts connections and never answers.
			{Name: "hang.test", MX: []bench.MX{mx("mx.hang.test", "127.0.0.6", 10)}},
			// Its MX is down until the test starts one.
			{Name: "later.test", MX: []bench.MX{mx("mx.later.test", "127.0.0.5", 10)}},
		},
	}
	d, err := bench.NewDNS(dcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	scfg := bench.SinkConfig{
		Listen:   []string{fmt.Sprintf("127.0.0.2:%d", port), fmt.Sprintf("127.0.0.3:%d", port), fmt.Sprintf("127.0.0.6:%d", port)},
		Hostname: "sink.test",
		Capture:  captureDomains,
		// Shorter than the daemon's idle_timeout: cached connections go
		// stale under it.
		IdleTimeout: 500 * time.Millisecond,
		Seed:        1,
		Faults: bench.Faults{
			Domain: map[string]bench.FaultRule{
				"retry.test":  {Greylist: true},
				"reject.test": {Rcpt: map[string]float64{"550": 1}},
				"expire.test": {Rcpt: map[string]float64{"451": 1}},
			},
			Addr: map[string]bench.FaultRule{
				fmt.Sprintf("127.0.0.6:%d", port): {Hang: true},
			},
		},
	}
	s, err := bench.NewSink(scfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return &relayEnv{t: t, dns: d, sink: s, port: port}
}

func (e *relayEnv) config() string {
	return fmt.Sprintf(`[dns]
resolvers = [%q]
min_ttl = "1s"
[delivery]
port = %d
tls = "disabled"
retry = ["1s"]
max_queue_lifetime = "5s"
idle_timeout = "1s"
greeting_timeout = "30s"
connect_timeout = "2s"
scan_interval = "200ms"
`, e.dns.Addr(), e.port)
}

// waitCaptured waits until the sink has n messages for domain.
func (e *relayEnv) waitCaptured(domain string, n int, within time.Duration) []bench.Captured {
	e.t.Helper()
	deadline := time.Now().Add(within)
	for {
		got := e.sink.Captured(domain)
		if len(got) >= n {
			return got
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s: %d message(s) arrived, want %d (sink stats %+v)", domain, len(got), n, e.sink.Stats())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// sendMsg submits one message and returns the queue id.
func sendMsg(t *testing.T, addr, from string, rcpts []string, subject string) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var b strings.Builder
	fmt.Fprintf(&b, "EHLO client.test\r\nMAIL FROM:<%s>\r\n", from)
	for _, r := range rcpts {
		fmt.Fprintf(&b, "RCPT TO:<%s>\r\n", r)
	}
	fmt.Fprintf(&b, "DATA\r\nFrom: <%s>\r\nSubject: %s\r\nMessage-ID: <%s@client.test>\r\n\r\nbody of %s\r\n.\r\nQUIT\r\n", from, subject, strings.ReplaceAll(subject, " ", "-"), subject)
	c.Write([]byte(b.String()))
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 0, 4096)
	tmp := make([]byte, 4096)
	for {
		n, err := c.Read(tmp)
		buf = append(buf, tmp[:n]...)
		if err != nil {
			break
		}
	}
	m := queuedRE.FindStringSubmatch(string(buf))
	if m == nil {
		t.Fatalf("message %q not queued: %q", subject, buf)
	}
	return m[1]
}

func subjects(msgs []bench.Captured) []string {
	var out []string
	for _, m := range msgs {
		if pm, err := mail.ReadMessage(strings.NewReader(string(m.Raw))); err == nil {
			out = append(out, pm.Header.Get("Subject"))
		}
	}
	return out
}

// TestE2EDelivery runs the real daemon against the loopback DNS and sink
// MX hosts and checks each routing and failure case of a relay.
func TestE2EDelivery(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	env := newRelayEnv(t)
	dir := t.TempDir()
	d := writeConfig(t, dir, "", env.config())
	d.start()

	// A domain whose MX hangs must not delay the others.
	sendMsg(t, d.smtp, "a@sender.test", []string{"x@hang.test"}, "to hang")
	start := time.Now()
	sendMsg(t, d.smtp, "a@sender.test", []string{"u1@good.test"}, "to good")
	got := env.waitCaptured("good.test", 1, 10*time.Second)
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("delivery to good.test took %v behind a hanging domain", el)
	}
	if got[0].MX != fmt.Sprintf("127.0.0.2:%d", env.port) {
		t.Errorf("good.test delivered via %s, want the preference-10 MX 127.0.0.2", got[0].MX)
	}
	if !strings.Contains(string(got[0].Raw), "Received: from client.test") || got[0].From != "a@sender.test" {
		t.Errorf("delivered message: from %q\n%s", got[0].From, got[0].Raw)
	}

	// The sink has closed the idle connection by now: the next message
	// must go out on a new connection at once, not be deferred.
	time.Sleep(800 * time.Millisecond)
	sendMsg(t, d.smtp, "a@sender.test", []string{"u2@good.test"}, "to good again")
	env.waitCaptured("good.test", 2, 10*time.Second)
	if logData, _ := os.ReadFile(filepath.Join(dir, "delivery.log")); strings.Contains(string(logData), `"deferred","msg_id"`) &&
		strings.Contains(string(logData), `"rcpt":"u2@good.test"`) && regexp.MustCompile(`"deferred"[^\n]*u2@good.test`).Match(logData) {
		t.Errorf("a stale cached connection deferred the message:\n%s", logData)
	}

	sendMsg(t, d.smtp, "a@sender.test", []string{"u@fallback.test"}, "fallback")
	if got := env.waitCaptured("fallback.test", 1, 10*time.Second); got[0].MX != fmt.Sprintf("127.0.0.3:%d", env.port) {
		t.Errorf("fallback.test delivered via %s, want the second MX 127.0.0.3", got[0].MX)
	}
	sendMsg(t, d.smtp, "a@sender.test", []string{"u@implicit.test"}, "implicit")
	env.waitCaptured("implicit.test", 1, 10*time.Second)

	// 451 (greylisting) then success on retry.
	sendMsg(t, d.smtp, "a@sender.test", []string{"u@retry.test"}, "greylisted")
	env.waitCaptured("retry.test", 1, 15*time.Second)

	// A 3-recipient message with mixed results: delivered, bounced,
	// deferred then delivered. One DSN, naming only the bounced one.
	sendMsg(t, d.smtp, "mixed@sender.test", []string{"ok@mixed.test", "no@reject.test", "grey@retry.test"}, "mixed results")
	env.waitCaptured("mixed.test", 1, 10*time.Second)
	env.waitCaptured("retry.test", 2, 15*time.Second)

	// 5xx bounce, null MX, NXDOMAIN, expiry: each a DSN to the sender.
	sendMsg(t, d.smtp, "b@sender.test", []string{"nobody@reject.test"}, "rejected")
	sendMsg(t, d.smtp, "c@sender.test", []string{"x@null.test"}, "null mx")
	sendMsg(t, d.smtp, "e@sender.test", []string{"x@nxdomain.test"}, "no such domain")
	sendMsg(t, d.smtp, "f@sender.test", []string{"x@expire.test"}, "expiring")
	// A bounce never bounces: the null sender's failure is dropped.
	sendMsg(t, d.smtp, "", []string{"y@reject.test"}, "null sender")

	dsns := env.waitCaptured("sender.test", 5, 30*time.Second)
	time.Sleep(2 * time.Second) // anything extra (a bounce of the bounce) would arrive now
	dsns = env.sink.Captured("sender.test")
	if len(dsns) != 5 {
		t.Fatalf("%d bounces, want 5", len(dsns))
	}
	want := map[string]string{ // DSN recipient -> failed address
		"mixed@sender.test": "no@reject.test",
		"b@sender.test":     "nobody@reject.test",
		"c@sender.test":     "x@null.test",
		"e@sender.test":     "x@nxdomain.test",
		"f@sender.test":     "x@expire.test",
	}
	for _, m := range dsns {
		if m.From != "" {
			t.Errorf("bounce sent with reverse-path %q, want <>", m.From)
		}
		rcpt := m.Rcpts[0]
		failed, ok := want[rcpt]
		if !ok {
			t.Errorf("unexpected bounce to %s", rcpt)
			continue
		}
		raw := string(m.Raw)
		if !strings.Contains(raw, failed) || !strings.Contains(strings.ToLower(raw), "multipart/report") ||
			!strings.Contains(strings.ToLower(raw), "delivery-status") {
			t.Errorf("bounce to %s does not report %s as a delivery-status report:\n%s", rcpt, failed, raw)
		}
		if rcpt == "mixed@sender.test" && (strings.Contains(raw, "ok@mixed.test") || strings.Contains(raw, "grey@retry.test")) {
			t.Errorf("mixed bounce names recipients that did not fail:\n%s", raw)
		}
		delete(want, rcpt)
	}

	// Restart in the middle of a queue: later.test's MX is down; the
	// messages wait, the daemon is killed, the MX comes up, the restarted
	// daemon delivers them.
	for i := 0; i < 5; i++ {
		sendMsg(t, d.smtp, "a@sender.test", []string{fmt.Sprintf("u%d@later.test", i)}, fmt.Sprintf("later %d", i))
	}
	time.Sleep(300 * time.Millisecond)
	d.kill(syscall.SIGKILL)
	later, err := bench.NewSink(bench.SinkConfig{Listen: []string{fmt.Sprintf("127.0.0.5:%d", env.port)}, Capture: []string{"later.test"}})
	if err != nil {
		t.Fatal(err)
	}
	defer later.Close()
	d.start()
	deadline := time.Now().Add(20 * time.Second)
	for len(later.Captured("later.test")) < 5 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := len(later.Captured("later.test")); n != 5 {
		t.Fatalf("after restart %d of 5 queued messages delivered", n)
	}
	// Nothing else is still queued but the hung one.
	deadline = time.Now().Add(15 * time.Second)
	var list string
	for time.Now().Before(deadline) {
		_, list = d.get("/api/queue")
		if strings.Count(list, `"id"`) <= 1 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n := strings.Count(list, `"id"`); n > 1 {
		t.Errorf("still queued: %s", list)
	}
	// Graceful stop with a hung connection open must not hang.
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	stopped := make(chan struct{})
	go func() { d.kill(syscall.SIGTERM); close(stopped) }()
	select {
	case <-stopped:
	case <-ctx.Done():
		t.Fatal("daemon did not stop")
	}
}

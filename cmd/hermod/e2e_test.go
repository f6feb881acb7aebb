package main

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	gosmtp "github.com/emersion/go-smtp"

	"github.com/hermod-mta/hermod/engine"
)

// The end-to-end tests run the real hermod binary, built once per test run.
var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

func hermodBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "hermod-e2e-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "hermod")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// freePortOn returns a TCP port free on ip (a loopback address) a moment
// ago.
func freePortOn(t *testing.T, ip string) int {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// hermodProc is a running hermod process.
type hermodProc struct {
	t      *testing.T
	cmd    *exec.Cmd
	smtp   string
	http   string
	dir    string
	cfg    string
	log    *syncBuffer
	exited chan struct{}
	netns  string // run inside this network namespace ("": the test's)
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// deadDNS points the daemon's resolver at a loopback port where nothing
// answers: every lookup fails temporarily, so queued mail stays queued and
// nothing ever leaves the machine.
const deadDNS = `[dns]
resolvers = ["127.0.0.1:9"]
timeout = "200ms"
attempts = 1
[delivery]
port = 9
`

// fastDelivery is the [dns] and [delivery] tables of the end-to-end tests
// that deliver to a bench sink: resolver dnsAddr, sink port, plain SMTP,
// retries after 1 s and scans every 200 ms. Tables or keys of [delivery]
// may follow.
func fastDelivery(dnsAddr string, port int) string {
	return fmt.Sprintf(`[dns]
resolvers = [%q]
[delivery]
port = %d
tls = "disabled"
retry = ["1s"]
connect_timeout = "2s"
scan_interval = "200ms"
`, dnsAddr, port)
}

// writeConfig writes a configuration for a daemon in dir and returns it.
// smtpExtra is added to the [smtp] table; tail (deadDNS when empty) ends
// the file.
func writeConfig(t *testing.T, dir, smtpExtra, tail string) *hermodProc {
	t.Helper()
	d := &hermodProc{t: t, smtp: freeAddr(t), http: freeAddr(t), dir: dir, cfg: filepath.Join(dir, "hermod.toml")}
	cfg := fmt.Sprintf(`[server]
hostname = "mx.e2e.test"
[smtp]
listen = [%q]
%s
[spool]
dir = %q
[http]
listen = %q
[log]
delivery_log = %q
level = "debug"
`, d.smtp, smtpExtra, filepath.Join(dir, "spool"), d.http, filepath.Join(dir, "delivery.log"))
	if tail == "" {
		tail = deadDNS
	}
	cfg += tail
	if err := os.WriteFile(d.cfg, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return d
}

func (d *hermodProc) start() {
	t := d.t
	t.Helper()
	d.cmd = exec.Command(hermodBinary(t), "serve", "-config", d.cfg)
	if d.netns != "" {
		d.cmd = exec.Command("ip", "netns", "exec", d.netns, hermodBinary(t), "serve", "-config", d.cfg)
	}
	d.log = &syncBuffer{}
	d.cmd.Stdout, d.cmd.Stderr = d.log, d.log
	d.cmd.Dir = d.dir
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d.exited = make(chan struct{})
	go func() { d.cmd.Wait(); close(d.exited) }()
	t.Cleanup(func() { d.kill(syscall.SIGKILL) })
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get("http://" + d.http + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		select {
		case <-d.exited:
			t.Fatalf("hermod exited during start:\n%s", d.log.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("hermod not healthy in time:\n%s", d.log.String())
}

func (d *hermodProc) kill(sig syscall.Signal) {
	if d.cmd == nil || d.cmd.Process == nil {
		return
	}
	_ = d.cmd.Process.Signal(sig)
	select {
	case <-d.exited:
	case <-time.After(30 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
}

func (d *hermodProc) get(path string) (int, string) {
	d.t.Helper()
	resp, err := http.Get("http://" + d.http + path)
	if err != nil {
		d.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// writeCert writes a self-signed certificate and key for mx.e2e.test.
func writeCert(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "mx.e2e.test"},
		DNSNames:     []string{"mx.e2e.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
	return certFile, keyFile
}

var queuedRE = regexp.MustCompile(`queued as ([0-9a-z]{16})`)

const pythonClient = `
import smtplib, ssl, sys
host, port = sys.argv[1].rsplit(":", 1)
ids = []
def send(s, n):
    s.mail("py-sender@x.test")
    s.rcpt("py-%d@y.test" % n)
    s.rcpt("py-%d@z.test" % n)
    code, msg = s.data(("Subject: python %d\r\n\r\nhello from smtplib\r\n.leading dot\r\n" % n).encode())
    assert code == 250, (code, msg)
    ids.append(msg.decode().rsplit(" ", 1)[1])
s = smtplib.SMTP(host, int(port), local_hostname="py.client.test", timeout=30)
s.ehlo()
assert s.has_extn("starttls"), s.esmtp_features
assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("smtputf8")
send(s, 1)
s.starttls(context=ssl._create_unverified_context())
s.ehlo()
assert not s.has_extn("starttls")
send(s, 2)
send(s, 3)
s.quit()
print(" ".join(ids))
`

// TestE2EClientsAndCrashRecovery sends with Python's smtplib (plain and
// STARTTLS), swaks and a Go client to the real daemon, kills it with
// SIGKILL, restarts it and checks every acknowledged message is queued.
func TestE2EClientsAndCrashRecovery(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	dir := t.TempDir()
	cert, key := writeCert(t, dir)
	d := writeConfig(t, dir, fmt.Sprintf("tls_cert = %q\ntls_key = %q", cert, key), "")
	d.start()

	var ids []string

	// Python smtplib.
	if py, err := exec.LookPath("python3"); err != nil {
		t.Fatal("python3 is required for the end-to-end test")
	} else {
		out, err := exec.Command(py, "-c", pythonClient, d.smtp).CombinedOutput()
		if err != nil {
			t.Fatalf("python smtplib: %v\n%s\ndaemon log:\n%s", err, out, d.log.String())
		}
		pyIDs := strings.Fields(string(out))
		if len(pyIDs) != 3 {
			t.Fatalf("python output %q", out)
		}
		ids = append(ids, pyIDs...)
	}

	// swaks.
	if sw, err := exec.LookPath("swaks"); err == nil {
		out, err := exec.Command(sw, "--server", d.smtp, "--from", "swaks@x.test", "--to", "sw@y.test",
			"--header", "Subject: swaks", "--body", "from swaks", "--pipeline", "--timeout", "30").CombinedOutput()
		m := queuedRE.FindStringSubmatch(string(out))
		if err != nil || m == nil {
			t.Fatalf("swaks: %v\n%s", err, out)
		}
		ids = append(ids, m[1])
	} else if os.Getenv("CI") != "" {
		t.Fatal("swaks missing in CI (.ci/run installs it)")
	} else {
		t.Log("swaks not installed: skipping its part")
	}

	// Go: an independent client library, over STARTTLS.
	c, err := gosmtp.DialStartTLS(d.smtp, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		if err := c.Mail("go@x.test", nil); err != nil {
			t.Fatal(err)
		}
		if err := c.Rcpt(fmt.Sprintf("go%d@y.test", i), nil); err != nil {
			t.Fatal(err)
		}
		w, err := c.Data()
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(w, "Subject: go %d\r\n\r\nbody %d\r\n", i, i)
		resp, err := w.CloseWithResponse()
		if err != nil {
			t.Fatal(err)
		}
		m := queuedRE.FindStringSubmatch(resp.StatusText)
		if m == nil {
			t.Fatalf("no queue id in %q", resp.StatusText)
		}
		ids = append(ids, m[1])
	}
	c.Quit()

	// A message refused for smuggling is not queued.
	raw, err := net.Dial("tcp", d.smtp)
	if err != nil {
		t.Fatal(err)
	}
	raw.Write([]byte("EHLO s\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<s@y.test>\r\nDATA\r\nx\n.\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@y.test>\r\nDATA\r\nsmuggled\r\n.\r\n"))
	rawOut, _ := io.ReadAll(bufio.NewReader(raw))
	raw.Close()
	if !strings.Contains(string(rawOut), "554 5.6.0") || queuedRE.Match(rawOut) {
		t.Fatalf("smuggling attempt: %q", rawOut)
	}

	// Crash: SIGKILL, then restart on the same spool. (Wait out the
	// delivery log's flush interval first: log lines, unlike messages, may
	// be lost in a crash.)
	time.Sleep(3 * engine.FlushInterval)
	d.kill(syscall.SIGKILL)
	d.start()
	for _, id := range ids {
		code, body := d.get("/api/queue/" + id)
		if code != 200 {
			t.Errorf("message %s acknowledged but not queued after kill -9: %d %s", id, code, body)
		}
	}
	_, list := d.get("/api/queue")
	if strings.Contains(list, "evil@x.test") || strings.Contains(list, "v@y.test") {
		t.Fatalf("smuggled message queued: %s", list)
	}
	if n := strings.Count(list, `"id"`); n != len(ids) {
		t.Fatalf("%d messages queued, want %d:\n%s", n, len(ids), list)
	}
	_, metrics := d.get("/metrics")
	for _, want := range []string{"hermod_spool_messages " + fmt.Sprint(len(ids)), "hermod_spool_fsyncs_total", "hermod_smtp_connections_active"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	// Graceful stop.
	d.kill(syscall.SIGTERM)
	if d.cmd.ProcessState == nil || !d.cmd.ProcessState.Success() {
		t.Fatalf("SIGTERM: exit %v\n%s", d.cmd.ProcessState, d.log.String())
	}
	// Offline inspection of the stopped daemon's spool.
	out, err := exec.Command(hermodBinary(t), "queue", "list", "-spool", filepath.Join(dir, "spool")).CombinedOutput()
	if err != nil || !strings.Contains(string(out), fmt.Sprintf("%d message(s)", len(ids))) {
		t.Fatalf("queue list -spool: %v\n%s", err, out)
	}
	logData, _ := os.ReadFile(filepath.Join(dir, "delivery.log"))
	if n := strings.Count(string(logData), `"event":"received"`); n != len(ids) {
		t.Errorf("delivery log has %d received lines, want %d", n, len(ids))
	}
}

// TestE2EReloadAndRelayPolicy checks SIGHUP reload of the relay policy and
// that a bad file is refused while the daemon keeps running.
func TestE2EReloadAndRelayPolicy(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	dir := t.TempDir()
	d := writeConfig(t, dir, `relay_networks = ["192.0.2.0/24"]`, "")
	d.start()
	rcpt := func() string {
		c, err := net.Dial("tcp", d.smtp)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("EHLO t\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nQUIT\r\n"))
		out, _ := io.ReadAll(c)
		return string(out)
	}
	if out := rcpt(); !strings.Contains(out, "554 5.7.1") {
		t.Fatalf("open relay: loopback is not in relay_networks but got %q", out)
	}
	cfg, _ := os.ReadFile(d.cfg)
	os.WriteFile(d.cfg, []byte(strings.Replace(string(cfg), `relay_networks = ["192.0.2.0/24"]`, `relay_domains = ["y.test"]`, 1)), 0o600)
	d.cmd.Process.Signal(syscall.SIGHUP)
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(d.log.String(), "configuration reloaded") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if out := rcpt(); !strings.Contains(out, "250 2.1.5") {
		t.Fatalf("after reload y.test should be accepted: %q", out)
	}
	os.WriteFile(d.cfg, []byte(string(cfg)+"\nnot_a_key = 1\n"), 0o600)
	d.cmd.Process.Signal(syscall.SIGHUP)
	deadline = time.Now().Add(10 * time.Second)
	for !strings.Contains(d.log.String(), "reload refused") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(d.log.String(), "not_a_key") {
		t.Fatalf("bad reload not reported:\n%s", d.log.String())
	}
	if out := rcpt(); !strings.Contains(out, "250 2.1.5") {
		t.Fatalf("a refused reload changed the policy: %q", out)
	}
}

// TestSystemdUnitVerifies runs systemd-analyze verify on dist/hermod.service
// (with ExecStart pointed at the built binary).
func TestSystemdUnitVerifies(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed")
	}
	unit, err := os.ReadFile("../../dist/hermod.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Type=notify", "ExecReload=", "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=", "AmbientCapabilities=CAP_NET_BIND_SERVICE", "User=hermod"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("unit lacks %s", want)
		}
	}
	dir := t.TempDir()
	text := strings.ReplaceAll(string(unit), "/usr/local/bin/hermod", hermodBinary(t))
	path := filepath.Join(dir, "hermod.service")
	os.WriteFile(path, []byte(text), 0o644)
	out, err := exec.Command(sa, "verify", path).CombinedOutput()
	// verify complains about things of the host (no /var/lib/hermod, no
	// user), not the unit, only through these lines; anything else fails.
	var problems []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if l == "" || strings.Contains(l, "hermod.service") && (strings.Contains(l, "WorkingDirectory") || strings.Contains(l, "User")) {
			continue
		}
		problems = append(problems, l)
	}
	if err != nil || len(problems) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

func TestConfigStrictAndValidate(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := filepath.Join(dir, "c.toml")
		os.WriteFile(p, []byte(s), 0o600)
		return p
	}
	cases := []struct {
		name, file string
		want       []string
	}{
		{"unknown keys", "[smtp]\nlisten_addr = 1\n[spool]\ndirectory = \"x\"\n[nope]\na=1\n", []string{"smtp.listen_addr", "spool.directory", "nope"}},
		{"every bad value", "[smtp]\nlisten = [\"x\"]\nmax_recipients = 1\nrelay_networks = [\"1.2.3.4/40\"]\n[spool]\ncompression = \"lz4\"\n[delivery]\nport = 70000\n[log]\nlevel = \"loud\"\n",
			[]string{"smtp.listen", "smtp.max_recipients", "smtp.relay_networks", "spool.compression", "delivery.port", "log.level"}},
		{"bad duration", "[smtp]\ncommand_timeout = \"soon\"\n", []string{"command_timeout"}},
	}
	for _, c := range cases {
		_, err := LoadConfig(write(c.file))
		if err == nil {
			t.Errorf("%s: accepted", c.name)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not name %s", c.name, err, w)
			}
		}
	}
	cfg, err := LoadConfig("")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.SMTP.Listen[0] != "127.0.0.1:2525" || cfg.HTTP.Listen != "127.0.0.1:8025" || cfg.Spool.Compression != "s2" || cfg.Delivery.Port != 25 {
		t.Fatalf("defaults: %+v", cfg)
	}
	if _, err := LoadConfig("../../dist/hermod.toml"); err != nil {
		t.Fatalf("the production sample does not load: %v", err)
	}
}

// TestE2EQueueOperations flushes a deferred message (it is tried again at
// once) and deletes it, through the CLI against the running daemon.
func TestE2EQueueOperations(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	dir := t.TempDir()
	d := writeConfig(t, dir, "", "")
	d.start()
	id := sendMsg(t, d.smtp, "a@x.test", []string{"b@unreachable.test"}, "to flush")
	attempts := func() int {
		code, body := d.get("/api/queue/" + id)
		if code != 200 {
			return -1
		}
		m := regexp.MustCompile(`"attempts": (\d+)`).FindStringSubmatch(body)
		if m == nil {
			return 0
		}
		var n int
		fmt.Sscan(m[1], &n)
		return n
	}
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// The resolver is dead: the first attempt defers it for a minute.
	waitFor("the first attempt", func() bool { return attempts() == 1 })
	time.Sleep(500 * time.Millisecond)
	if n := attempts(); n != 1 {
		t.Fatalf("%d attempts before the flush, want 1", n)
	}
	out, err := exec.Command(hermodBinary(t), "queue", "flush", id, "-http", d.http).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "1 message(s) due now") {
		t.Fatalf("queue flush: %v %s", err, out)
	}
	waitFor("the flushed attempt", func() bool { return attempts() >= 2 })
	out, err = exec.Command(hermodBinary(t), "queue", "delete", id, "-http", d.http).CombinedOutput()
	if err != nil {
		t.Fatalf("queue delete: %v %s", err, out)
	}
	if code, _ := d.get("/api/queue/" + id); code != 404 {
		t.Fatalf("deleted message still there: %d", code)
	}
	out, _ = exec.Command(hermodBinary(t), "queue", "delete", id, "-http", d.http).CombinedOutput()
	if !strings.Contains(string(out), "no such message") {
		t.Fatalf("deleting twice: %s", out)
	}
}

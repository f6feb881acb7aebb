package main

// End-to-end interoperability of hermod's outbound delivery with a real
// Postfix smtpd as the destination MX (the most common receiving MTA), on
// loopback only:
//
//	test client --> hermod --> 127.0.0.23:P private Postfix (pf.test, grey.test)
//	                   \                 \ its DSNs (relayhost)
//	                    \--> 127.0.0.24:P bench.Sink (src.test: the senders)
//
// The Postfix instance is private: its own config_directory,
// queue_directory, data_directory, mailboxes and log in a temporary
// directory, listening on one loopback address on a free port; the system
// instance's configuration and queue are neither used nor touched (only
// the programs and /etc/postfix/postfix-files are shared). It runs as root (master)
// and as mail_owner (its daemons), so the test needs root; without it, or
// without Postfix, it skips (it fails instead when $CI is set, as
// needTool does). Postfix is always stopped in t.Cleanup, by its
// master's pid if "postfix stop" does not end it.
//
// Postfix is set up to exercise the client: smtpd_recipient_limit = 3
// (452 4.5.3 beyond), message_size_limit = 100000 (SIZE 100000; 552 5.3.4
// at MAIL or at the end of the data), a check_recipient_access map
// answering 450 4.7.1 for grey.test (greylisting), virtual mailboxes
// (unknown users 550 5.1.1), and its defaults for CHUNKING, DSN, SMTPUTF8
// and 8BITMIME (Postfix >= 3.4 offers CHUNKING).

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/bench"
	"github.com/hermod-mta/hermod/engine"
)

const (
	pfMXIP      = "127.0.0.23" // the private Postfix's smtpd
	pfSinkIP    = "127.0.0.24" // bench.Sink for the senders' domain
	pfSizeLimit = 100000       // Postfix's message_size_limit
)

// postfixMX is a private Postfix instance run by a test.
type postfixMX struct {
	t    *testing.T
	bin  string // the postfix command
	etc  string // config_directory
	pid  string // master.pid
	log  string // maillog_file
	mail string // virtual_mailbox_base
}

// postfixUnavailable skips the test (fails it in CI) when a private Postfix
// cannot run here.
func postfixUnavailable(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("CI") != "" {
		t.Fatalf("private Postfix cannot run in CI: %s", msg)
	}
	t.Skipf("private Postfix cannot run here: %s", msg)
}

// startPostfixMX starts a private Postfix whose smtpd listens on listen
// (one loopback address and port), takes mail for the virtual mailboxes
// boxes (address -> maildir name, under domains) with the access map
// access (check_recipient_access), and relays what it sends itself (DSNs)
// to relay ("[ip]:port").
func startPostfixMX(t *testing.T, listen, relay string, domains []string, boxes map[string]string, access string) *postfixMX {
	t.Helper()
	bin := needTool(t, "postfix", "postfix")
	postconf := needTool(t, "postconf", "postfix")
	if os.Geteuid() != 0 {
		postfixUnavailable(t, "needs root (its master runs as root, its daemons as mail_owner)")
	}
	if ip, _, err := net.SplitHostPort(listen); err != nil || !net.ParseIP(ip).IsLoopback() {
		t.Fatalf("Postfix must listen on loopback only, not %q", listen)
	}
	out, err := exec.Command(postconf, "-dh", "mail_owner", "mail_version").Output() // stdout: no warnings
	if err != nil {
		postfixUnavailable(t, "postconf: %v: %s", err, out)
	}
	f := strings.Fields(string(out))
	if len(f) != 2 {
		postfixUnavailable(t, "postconf: %q", out)
	}
	if v := strings.Split(f[1], "."); len(v) < 2 || atoi(v[0])*100+atoi(v[1]) < 304 {
		postfixUnavailable(t, "Postfix %s is older than 3.4 (no CHUNKING)", f[1])
	}
	owner, err := user.Lookup(f[0])
	if err != nil {
		postfixUnavailable(t, "mail_owner %q: %v", f[0], err)
	}
	vuid := "65534" // the virtual mailboxes' owner: nobody
	if u, err := user.Lookup("nobody"); err == nil {
		vuid = u.Uid
	}
	// Not t.TempDir: Postfix's daemons run as mail_owner and must
	// traverse the path to its queue.
	root, err := os.MkdirTemp("", "hermod-postfix")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) }) // after stop (cleanups run last first)
	os.Chmod(root, 0o755)
	p := &postfixMX{t: t, bin: bin, etc: filepath.Join(root, "etc"), pid: filepath.Join(root, "queue", "pid", "master.pid"),
		log: filepath.Join(root, "maillog"), mail: filepath.Join(root, "mail")}
	for _, d := range []string{"etc", "queue", "data", "mail"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ouid, _ := strconv.Atoi(owner.Uid)
	ogid, _ := strconv.Atoi(owner.Gid)
	nuid, _ := strconv.Atoi(vuid)
	if err := os.Chown(filepath.Join(root, "data"), ouid, ogid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(p.mail, nuid, nuid); err != nil {
		t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(listen)
	mainCF := fmt.Sprintf(`compatibility_level = 3.6
queue_directory = %[1]s/queue
data_directory = %[1]s/data
maillog_file = %[1]s/maillog
maillog_file_prefixes = %[1]s
myhostname = pf.mx.test
mydomain = mx.test
myorigin = $myhostname
mydestination =
alias_maps =
alias_database =
biff = no
# Listen on %[2]s only (master.cf); inet_interfaces is the default of the
# others and for loop detection: 127.0.0.23 is not an interface address.
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = %[2]s/32
smtpd_peername_lookup = no
smtpd_tls_security_level = none
smtp_tls_security_level = none
smtp_bind_address = %[2]s
relayhost = %[3]s
virtual_mailbox_domains = %[4]s
virtual_mailbox_maps = texthash:%[1]s/etc/vmailbox
virtual_mailbox_base = %[1]s/mail
virtual_uid_maps = static:%[5]s
virtual_gid_maps = static:%[5]s
smtpd_recipient_restrictions = check_recipient_access texthash:%[1]s/etc/access, reject_unauth_destination
smtpd_recipient_limit = 3
message_size_limit = %[6]d
smtputf8_enable = yes
`, root, host, relay, strings.Join(domains, ", "), vuid, pfSizeLimit)
	masterCF := fmt.Sprintf(`%s:%s inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
`, host, port)
	var vmail strings.Builder
	for addr, box := range boxes {
		fmt.Fprintf(&vmail, "%s %s/\n", addr, box)
	}
	for name, content := range map[string]string{"main.cf": mainCF, "master.cf": masterCF, "vmailbox": vmail.String(), "access": access} {
		if err := os.WriteFile(filepath.Join(p.etc, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := p.run("check"); err != nil {
		postfixUnavailable(t, "postfix check: %v\n%s\n%s", err, out, p.maillog())
	}
	t.Cleanup(p.stop)
	if out, err := p.run("start"); err != nil {
		postfixUnavailable(t, "postfix start: %v\n%s\n%s", err, out, p.maillog())
	}
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", listen, time.Second)
		if err == nil {
			c.Close()
			break
		}
		if i >= 100 {
			postfixUnavailable(t, "smtpd not listening on %s: %v\n%s", listen, err, p.maillog())
		}
		time.Sleep(100 * time.Millisecond)
	}
	return p
}

func atoi(s string) int { n, _ := strconv.Atoi(s); return n }

// run runs "postfix -c etc cmd" (bounded in time).
func (p *postfixMX) run(cmd string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return exec.CommandContext(ctx, p.bin, "-c", p.etc, cmd).CombinedOutput()
}

// stop stops Postfix, and kills its master by pid if it is still there.
func (p *postfixMX) stop() {
	b, _ := os.ReadFile(p.pid)
	pid := atoi(strings.TrimSpace(string(b)))
	if out, err := p.run("stop"); err != nil {
		p.t.Logf("postfix stop: %v\n%s", err, out)
	}
	if pid <= 1 {
		return
	}
	for i := 0; i < 100 && syscall.Kill(pid, 0) == nil; i++ {
		time.Sleep(100 * time.Millisecond)
	}
	if syscall.Kill(pid, 0) == nil {
		p.t.Logf("Postfix master %d still running after stop: killed", pid)
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// maillog returns Postfix's log so far.
func (p *postfixMX) maillog() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

// count returns how many lines of the log match re.
func (p *postfixMX) count(re string) int {
	return len(regexp.MustCompile(`(?m)`+re).FindAllStringIndex(p.maillog(), -1))
}

// mailbox returns the messages delivered to the maildir box.
func (p *postfixMX) mailbox(box string) [][]byte {
	var out [][]byte
	for _, sub := range []string{"new", "cur"} {
		dir := filepath.Join(p.mail, box, sub)
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if b, err := os.ReadFile(filepath.Join(dir, e.Name())); err == nil {
				out = append(out, b)
			}
		}
	}
	return out
}

// pfMsg is one message injected into hermod.
type pfMsg struct {
	from, mailArgs string
	rcpts          []string // "addr" or "addr PARAMS"
	body           string   // CRLF lines
}

// inject sends m to hermod at addr and returns its queue id.
func inject(t *testing.T, addr string, m pfMsg) string {
	t.Helper()
	s := dialRaw(t, addr)
	defer s.c.Close()
	expect := func(line, code string) string {
		t.Helper()
		r := s.cmd(line)
		if !strings.HasPrefix(r, code) {
			t.Fatalf("%.80q: %q, want %s", line, r, code)
		}
		return r
	}
	expect("EHLO client.src.test", "250")
	expect(strings.TrimSpace("MAIL FROM:<"+m.from+"> "+m.mailArgs), "250 ")
	for _, r := range m.rcpts {
		a, params, _ := strings.Cut(r, " ")
		expect(strings.TrimSpace("RCPT TO:<"+a+"> "+params), "250 ")
	}
	expect("DATA", "354 ")
	body := strings.ReplaceAll(m.body, "\r\n.", "\r\n..")
	if strings.HasPrefix(body, ".") {
		body = "." + body
	}
	rep := expect(body+".", "250 ")
	id := queuedRE.FindStringSubmatch(rep)
	if id == nil {
		t.Fatalf("no queue id in %q", rep)
	}
	s.cmd("QUIT")
	return id[1]
}

// pfHeader is a complete header section.
func pfHeader(from, to, subject, id string) string {
	return "From: <" + from + ">\r\nTo: <" + to + ">\r\nSubject: " + subject + "\r\nDate: Tue, 24 Nov 2026 05:00:00 +0000\r\nMessage-ID: <" + id + "@src.test>\r\nMIME-Version: 1.0\r\n\r\n"
}

// deliveryRecords reads hermod's delivery log.
func deliveryRecords(t *testing.T, path string) []engine.DeliveryRecord {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []engine.DeliveryRecord
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var r engine.DeliveryRecord
		if json.Unmarshal(sc.Bytes(), &r) == nil && r.Event != "received" {
			out = append(out, r)
		}
	}
	return out
}

// queueEntries reads hermod's /api/queue.
func (d *hermodProc) queueEntries() []QueueEntry {
	d.t.Helper()
	code, body := d.get("/api/queue")
	var list []QueueEntry
	if code != 200 || json.Unmarshal([]byte(body), &list) != nil {
		d.t.Fatalf("/api/queue: %d %.500s", code, body)
	}
	return list
}

// TestE2EPostfixMX delivers through hermod to a private Postfix smtpd as
// the MX and checks what Postfix logged and delivered, what the senders
// got back (bench.Sink for src.test) and hermod's queue and delivery log:
//   - 10 recipients arrive once each, in transactions of at most 3
//     (smtpd_recipient_limit: 452 4.5.3 beyond), with BDAT (CHUNKING);
//   - a message above Postfix's SIZE bounces at once (552 5.3.4, not
//     sent), and so does one under SIZE that Postfix refuses at the end
//     of its data (552 5.3.4 "message file too big"); neither is retried;
//   - an unknown recipient bounces with 550 5.1.1, its co-recipient
//     arrives;
//   - a greylisted recipient (450 4.7.1) stays queued, is retried on
//     hermod's schedule, and arrives once Postfix lets it in;
//   - an 8-bit (BODY=8BITMIME) and an SMTPUTF8 message arrive intact;
//   - NOTIFY, ORCPT, RET and ENVID reach Postfix: its success DSN to the
//     sender carries them.
func TestE2EPostfixMX(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	needTool(t, "python3", "python3") // parseDSNs
	t0 := time.Now()

	// One port, free on both loopback addresses ([delivery] port is
	// every MX's).
	var sink *bench.Sink
	var port int
	for try := 0; sink == nil; try++ {
		port = freePortOn(t, pfMXIP)
		var err error
		sink, err = bench.NewSink(bench.SinkConfig{Listen: []string{fmt.Sprintf("%s:%d", pfSinkIP, port)},
			Hostname: "mx.src.test", Capture: []string{"src.test"}, Seed: 1})
		if err != nil && try >= 5 {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { sink.Close() })

	boxes := map[string]string{"k1@pf.test": "k1", "e8@pf.test": "e8", "j\u00f6rg@pf.test": "jorg", "d1@pf.test": "d1",
		"big@pf.test": "big", "edge@pf.test": "edge", "g@grey.test": "g"}
	var ten []string
	for i := 1; i <= 10; i++ {
		a := fmt.Sprintf("u%02d@pf.test", i)
		boxes[a] = a[:3]
		ten = append(ten, a)
	}
	pf := startPostfixMX(t, fmt.Sprintf("%s:%d", pfMXIP, port), fmt.Sprintf("[%s]:%d", pfSinkIP, port),
		[]string{"pf.test", "grey.test"}, boxes, "grey.test 450 4.7.1 Greylisted, try again later\n")

	t.Logf("%v: Postfix started", time.Since(t0).Round(time.Millisecond))
	mx := func(host, ip string) []bench.MX { return []bench.MX{{Host: host, Pref: 10, Addrs: []string{ip}}} }
	dns, err := bench.NewDNS(bench.DNSConfig{Listen: "127.0.0.1:0", Domains: 1, MX: []string{pfSinkIP}, Extra: []string{}, TTL: 60,
		Zones: []bench.Zone{
			{Name: "pf.test", MX: mx("mx.pf.test", pfMXIP)},
			{Name: "grey.test", MX: mx("mx.pf.test", pfMXIP)},
			{Name: "src.test", MX: mx("mx.src.test", pfSinkIP)},
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dns.Close() })
	dir := t.TempDir()
	d := writeConfig(t, dir, "", fmt.Sprintf(`[dns]
resolvers = [%q]
[delivery]
port = %d
retry = ["2s", "4s"]
connect_timeout = "2s"
idle_timeout = "1s"
scan_interval = "200ms"
`, dns.Addr(), port))
	d.start()
	t.Cleanup(func() {
		if t.Failed() {
			dl, _ := os.ReadFile(filepath.Join(dir, "delivery.log"))
			t.Logf("Postfix's log:\n%s\nhermod's delivery log:\n%s", pf.maillog(), dl)
		}
	})

	line := strings.Repeat("x", 78) + "\r\n"
	bigBody := pfHeader("big@src.test", "big@pf.test", "big", "big") + strings.Repeat(line, 3*pfSizeLimit/len(line))
	// Under Postfix's SIZE with hermod's Received field (about 150
	// octets), over its limit with Postfix's own and its queue file's
	// record overhead (about 900 octets at 80-octet lines).
	edgeBody := pfHeader("edge@src.test", "edge@pf.test", "edge", "edge")
	edgeBody += strings.Repeat(line, (pfSizeLimit-650-len(edgeBody))/len(line))
	eightBody := pfHeader("eight@src.test", "e8@pf.test", "eight", "eight") +
		"caf\xe9 na\xefve (Latin-1), \xc3\xa9t\xc3\xa9 (UTF-8), \x80\xff\r\n" + strings.Repeat("\xe9", 990) + "\r\nend\r\n"
	utfBody := "From: Andr\u00e9 <andr\u00e9@src.test>\r\nTo: J\u00f6rg <j\u00f6rg@pf.test>\r\nSubject: Gr\u00fc\u00dfe aus K\u00f6ln\r\n" +
		"Date: Tue, 24 Nov 2026 05:00:00 +0000\r\nMessage-ID: <utf@src.test>\r\nMIME-Version: 1.0\r\n" +
		"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\u65e5\u672c\u8a9e \u00e9t\u00e9 \U0001F4E8\r\n"
	msgs := map[string]pfMsg{
		"ten":     {from: "multi@src.test", rcpts: ten, body: pfHeader("multi@src.test", "list@pf.test", "ten", "ten") + "ten recipients\r\n"},
		"big":     {from: "big@src.test", rcpts: []string{"big@pf.test"}, body: bigBody},
		"edge":    {from: "edge@src.test", rcpts: []string{"edge@pf.test"}, body: edgeBody},
		"grey":    {from: "grey@src.test", rcpts: []string{"g@grey.test"}, body: pfHeader("grey@src.test", "g@grey.test", "grey", "grey") + "greylisted\r\n"},
		"unknown": {from: "unknown@src.test", rcpts: []string{"nobody@pf.test", "k1@pf.test"}, body: pfHeader("unknown@src.test", "nobody@pf.test", "unknown", "unknown") + "one unknown\r\n"},
		"eight":   {from: "eight@src.test", mailArgs: "BODY=8BITMIME", rcpts: []string{"e8@pf.test"}, body: eightBody},
		"utf8":    {from: "andr\u00e9@src.test", mailArgs: "SMTPUTF8 BODY=8BITMIME", rcpts: []string{"j\u00f6rg@pf.test"}, body: utfBody},
		"dsn": {from: "dsn@src.test", mailArgs: "RET=HDRS ENVID=pf+2Benv+201", rcpts: []string{"d1@pf.test NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+2Bd1@list.test"},
			body: pfHeader("dsn@src.test", "d1@pf.test", "dsn", "dsn") + "with DSN parameters\r\n"},
	}
	ids := map[string]string{}
	for _, name := range []string{"ten", "big", "edge", "grey", "unknown", "eight", "utf8", "dsn"} {
		ids[name] = inject(t, d.smtp, msgs[name])
	}

	// Everything but the greylisted message is done: delivered into its
	// maildir or bounced to the sender.
	delivered := append([]string{"k1", "e8", "jorg", "d1"}, func() []string {
		var b []string
		for _, a := range ten {
			b = append(b, a[:3])
		}
		return b
	}()...)
	notices := []string{"big@src.test", "edge@src.test", "unknown@src.test", "dsn@src.test"}
	deadline := time.Now().Add(30 * time.Second)
	for {
		waiting := []string{}
		for _, e := range d.queueEntries() {
			if e.ID != ids["grey"] {
				waiting = append(waiting, "queued "+e.ID)
			}
		}
		for _, b := range delivered {
			if len(pf.mailbox(b)) == 0 {
				waiting = append(waiting, "mailbox "+b)
			}
		}
		if n := len(sink.Captured("src.test")); n < len(notices) {
			waiting = append(waiting, fmt.Sprintf("%d notices", n))
		}
		if len(waiting) == 0 {
			break
		}
		if time.Now().After(deadline) {
			_, q := d.get("/api/queue")
			t.Fatalf("still waiting for %v\nqueue: %.3000s\nhermod: %.4000s\npostfix: %s", waiting, q, d.log.String(), pf.maillog())
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(time.Second) // a duplicate would come now
	t.Logf("%v: all but the greylisted message done; hermod ids %v", time.Since(t0).Round(time.Millisecond), ids)

	// 10 recipients: each arrives once, in transactions of at most 3.
	for _, b := range delivered {
		if n := len(pf.mailbox(b)); n != 1 {
			t.Errorf("mailbox %s holds %d messages, want 1", b, n)
		}
	}
	for _, a := range ten {
		if n := pf.count(`to=<` + regexp.QuoteMeta(a) + `>, relay=virtual, .*status=sent`); n != 1 {
			t.Errorf("Postfix delivered %s %d times, want 1", a, n)
		}
	}
	qmgr := regexp.MustCompile(`(?m)qmgr\[\d+\]: ([0-9A-F]+): from=<multi@src\.test>, size=\d+, nrcpt=(\d+)`).FindAllStringSubmatch(pf.maillog(), -1)
	seen, sum := map[string]bool{}, 0
	for _, m := range qmgr {
		if seen[m[1]] {
			continue
		}
		seen[m[1]] = true
		n := atoi(m[2])
		sum += n
		if n > 3 {
			t.Errorf("Postfix queued %s with %d recipients, over smtpd_recipient_limit", m[1], n)
		}
	}
	if len(seen) < 4 || sum != 10 {
		t.Errorf("the 10 recipients went in %d transactions with %d recipients in all, want >= 4 and 10", len(seen), sum)
	}
	// CHUNKING: every session of hermod sent BDAT, none DATA (Postfix
	// counts the commands of each session when it ends).
	disc := regexp.MustCompile(`(?m)smtpd\[\d+\]: disconnect from \S+ (.*)$`).FindAllStringSubmatch(pf.maillog(), -1)
	chunked := 0
	for _, m := range disc {
		// Sessions without MAIL: the test's probe of the listener, and
		// hermod's EHLO that learns SIZE and refuses the big message.
		if !strings.Contains(m[1], " mail=") {
			continue
		}
		chunked++
		if !strings.Contains(m[1], " bdat=") || strings.Contains(m[1], " data=") {
			t.Errorf("session without BDAT or with DATA: %s", m[1])
		}
	}
	if chunked == 0 {
		t.Errorf("no transaction in Postfix's log: %s", pf.maillog())
	}

	// The notices: hermod's bounces and Postfix's success DSN.
	byRcpt := map[string][]byte{}
	for _, c := range sink.Captured("src.test") {
		if c.From != "" {
			t.Errorf("notice to %v from <%s>, want <>", c.Rcpts, c.From)
		}
		for _, r := range c.Rcpts {
			if byRcpt[r] != nil {
				t.Errorf("two notices to %s", r)
			}
			byRcpt[r] = c.Raw
		}
	}
	var raws [][]byte
	for _, r := range notices {
		if byRcpt[r] == nil {
			t.Fatalf("no notice to %s; got %d notices", r, len(byRcpt))
		}
		raws = append(raws, byRcpt[r])
	}
	if len(byRcpt) != len(notices) {
		t.Errorf("%d notices, want %d (%v)", len(byRcpt), len(notices), notices)
	}
	parsed := parseDSNs(t, raws)
	got := map[string]dsnParsed{}
	for i, p := range parsed {
		got[notices[i]] = p
		if len(p.Defects) > 0 || p.Type != "multipart/report" || p.ReportType != "delivery-status" || len(p.PerRcpt) != 1 {
			t.Errorf("notice to %s: %+v", notices[i], p)
		}
	}
	bounce := func(to, final, status, diag string) {
		t.Helper()
		p := got[to]
		if !strings.Contains(p.From, "MAILER-DAEMON@mx.e2e.test") || len(p.PerRcpt) != 1 {
			t.Errorf("bounce to %s: %+v", to, p)
			return
		}
		f := p.PerRcpt[0]
		if f["action"] != "failed" || f["final-recipient"] != "rfc822; "+final || f["status"] != status ||
			!strings.Contains(f["diagnostic-code"], diag) {
			t.Errorf("bounce to %s: %q, want failed %s %s %q", to, f, final, status, diag)
		}
	}
	bounce("big@src.test", "big@pf.test", "5.3.4", "552 5.3.4")
	bounce("edge@src.test", "edge@pf.test", "5.3.4", "552 5.3.4")
	bounce("unknown@src.test", "nobody@pf.test", "5.1.1", "550 5.1.1")
	if n := pf.count(`queue file size limit exceeded`); n != 1 {
		t.Errorf("Postfix refused the message at its limit %d times, want 1 (hermod sent it once)", n)
	}
	if n := pf.count(`552 5\.3\.4 Message size exceeds fixed limit`); n > 1 {
		t.Errorf("Postfix refused MAIL for size %d times, want at most 1", n)
	}
	recs := deliveryRecords(t, filepath.Join(dir, "delivery.log"))
	for _, name := range []string{"big", "edge"} {
		var evs []string
		for _, r := range recs {
			if r.MsgID == ids[name] {
				evs = append(evs, fmt.Sprintf("%s#%d", r.Event, r.Attempt))
			}
		}
		if len(evs) != 1 || !strings.HasPrefix(evs[0], "bounced#") {
			t.Errorf("%s message: delivery log %v, want one bounce (not retried)", name, evs)
		}
	}

	// DSN parameters reached Postfix: its "delivered" notice carries
	// ENVID, ORCPT and NOTIFY=SUCCESS, and RET=HDRS returns the header.
	if p := got["dsn@src.test"]; len(p.PerRcpt) == 1 {
		f := p.PerRcpt[0]
		if !strings.Contains(p.From, "MAILER-DAEMON@pf.mx.test") || p.PerMessage["original-envelope-id"] != "pf+env 1" ||
			f["original-recipient"] != "rfc822;orig+d1@list.test" || f["final-recipient"] != "rfc822; d1@pf.test" ||
			f["action"] != "delivered" || !strings.HasPrefix(f["status"], "2.") ||
			strings.Join(p.Parts, " ") != "text/plain message/delivery-status text/rfc822-headers" || p.OrigSubj != "dsn" {
			t.Errorf("Postfix's DSN: %+v", p)
		}
	}

	// 8-bit and SMTPUTF8 content arrives intact (maildir lines end in LF).
	intact := func(box string, body string, headers ...string) {
		t.Helper()
		mb := pf.mailbox(box)
		if len(mb) != 1 {
			return
		}
		got := string(mb[0])
		want := strings.ReplaceAll(body, "\r\n", "\n")
		_, wantBody, _ := strings.Cut(want, "\n\n")
		_, gotBody, _ := strings.Cut(got, "\n\n")
		if gotBody != wantBody {
			t.Errorf("mailbox %s: body changed:\n got %q\nwant %q", box, gotBody, wantBody)
		}
		for _, h := range headers {
			if !strings.Contains(got, h+"\n") {
				t.Errorf("mailbox %s: no %q in\n%s", box, h, got)
			}
		}
	}
	intact("e8", eightBody, "Subject: eight")
	intact("jorg", utfBody, "Return-Path: <andr\u00e9@src.test>", "Delivered-To: j\u00f6rg@pf.test",
		"Subject: Gr\u00fc\u00dfe aus K\u00f6ln", "From: Andr\u00e9 <andr\u00e9@src.test>")
	intact("k1", msgs["unknown"].body, "Subject: unknown")

	// Greylisted: queued, retried on the schedule (2s, then 4s, ±20%),
	// then delivered once Postfix lets it in.
	deadline = time.Now().Add(15 * time.Second)
	for {
		var e *QueueEntry
		for _, q := range d.queueEntries() {
			if q.ID == ids["grey"] {
				e = &q
			}
		}
		if e == nil || len(e.Rcpts) != 1 || e.Rcpts[0].State != "pending" {
			t.Fatalf("greylisted message not queued: %+v", e)
		}
		r := e.Rcpts[0]
		if r.Attempts >= 3 {
			if !strings.Contains(r.LastReply, "450 4.7.1") || r.NextAttempt.IsZero() {
				t.Errorf("greylisted recipient: %+v", r)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("greylisted recipient not retried in time: %+v", r)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("%v: greylisted recipient retried", time.Since(t0).Round(time.Millisecond))
	if n := pf.count(`450 4\.7\.1 <g@grey\.test>`); n < 3 {
		t.Errorf("Postfix refused the greylisted recipient %d times, want >= 3", n)
	}
	var steps []time.Duration
	for _, r := range deliveryRecords(t, filepath.Join(dir, "delivery.log")) {
		if r.MsgID == ids["grey"] && r.Event == "deferred" {
			steps = append(steps, r.NextAttempt.Sub(r.Time))
		}
	}
	for i, s := range steps {
		want := 2 * time.Second
		if i > 0 {
			want = 4 * time.Second
		}
		if s < want*8/10-50*time.Millisecond || s > want*12/10+50*time.Millisecond {
			t.Errorf("deferral %d: next attempt in %v, want %v ±20%%", i+1, s, want)
		}
	}
	if len(steps) < 2 {
		t.Errorf("delivery log: %d deferrals of the greylisted recipient, want >= 2", len(steps))
	}
	if err := os.WriteFile(filepath.Join(pf.etc, "access"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := pf.run("reload"); err != nil {
		t.Fatalf("postfix reload: %v\n%s", err, out)
	}
	deadline = time.Now().Add(15 * time.Second)
	for len(pf.mailbox("g")) == 0 || len(d.queueEntries()) > 0 {
		if time.Now().After(deadline) {
			_, q := d.get("/api/queue")
			t.Fatalf("greylisted message not delivered after the greylisting ended\nqueue: %s\npostfix: %s", q, pf.maillog())
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("%v: greylisted message delivered", time.Since(t0).Round(time.Millisecond))
	if n := len(sink.Captured("src.test")); n != len(notices) {
		t.Errorf("%d notices at the end, want %d", n, len(notices))
	}
}

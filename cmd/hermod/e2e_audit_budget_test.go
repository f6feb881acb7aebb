package main

// Black-box audit of [smtp] max_buffered_bytes (the content budget all
// sessions share) and of [spool] min_free, against the real daemon.
//
// The budget's arithmetic, as documented in netio (budget.go,
// Session.appendBody): a DATA body is kept line by line and reserved in
// steps of 4, 4, 8, 16, 32 KiB, then 64 KiB; a BDAT read larger than the
// step is reserved whole. So a DATA body of n octets holds the first of
// 4K, 8K, 16K, 32K, 64K, 128K, 192K, 256K, ... that is >= n.

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// budgetConn is a client connection for the budget probes.
type budgetConn struct {
	c net.Conn
	r *bufio.Reader
}

// mailReply opens a session to d, says EHLO and returns the reply to
// MAIL FROM:<s@x.test> with param.
func mailReply(t *testing.T, d *hermodProc, param string) string {
	t.Helper()
	b, err := dialBudget(d.smtp)
	if err != nil {
		t.Fatal(err)
	}
	defer b.c.Close()
	r, _ := b.cmd("MAIL FROM:<s@x.test>" + param)
	return r
}

func dialBudget(addr string) (*budgetConn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(45 * time.Second))
	b := &budgetConn{c: c, r: bufio.NewReader(c)}
	if g, err := b.reply(); err != nil || !strings.HasPrefix(g, "220 ") {
		c.Close()
		return nil, fmt.Errorf("greeting %q: %v", g, err)
	}
	if r, err := b.cmd("EHLO budget.test"); err != nil || !strings.HasPrefix(r, "250") {
		c.Close()
		return nil, fmt.Errorf("EHLO %q: %v", r, err)
	}
	return b, nil
}

func (b *budgetConn) reply() (string, error) {
	var all strings.Builder
	for {
		line, err := b.r.ReadString('\n')
		all.WriteString(line)
		if err != nil {
			return all.String(), err
		}
		if len(line) < 4 || line[3] != '-' {
			return all.String(), nil
		}
	}
}

// replies reads n replies.
func (b *budgetConn) replies(n int) ([]string, error) {
	var out []string
	for i := 0; i < n; i++ {
		r, err := b.reply()
		if err != nil {
			return out, err
		}
		out = append(out, r)
	}
	return out, nil
}

func (b *budgetConn) cmd(line string) (string, error) {
	if _, err := b.c.Write([]byte(line + "\r\n")); err != nil {
		return "", err
	}
	return b.reply()
}

func (b *budgetConn) startTLS() error {
	if r, err := b.cmd("STARTTLS"); err != nil || !strings.HasPrefix(r, "220") {
		return fmt.Errorf("STARTTLS %q: %v", r, err)
	}
	tc := tls.Client(b.c, &tls.Config{InsecureSkipVerify: true})
	if err := tc.Handshake(); err != nil {
		return err
	}
	b.c, b.r = tc, bufio.NewReader(tc)
	_ = b.c.SetDeadline(time.Now().Add(45 * time.Second))
	if r, err := b.cmd("EHLO budget.test"); err != nil || !strings.HasPrefix(r, "250") {
		return fmt.Errorf("EHLO after STARTTLS %q: %v", r, err)
	}
	return nil
}

// budgetBody returns a message of about n octets in 100-octet lines.
func budgetBody(tag string, n int) string {
	var b strings.Builder
	b.WriteString("Subject: " + tag + "\r\n\r\n")
	line := strings.Repeat("b", 98) + "\r\n"
	for b.Len() < n {
		b.WriteString(line)
	}
	return b.String()
}

// hold opens a transaction and sends n octets of DATA content without the
// end of data: the session keeps them (and their budget) until it ends.
func holdData(t *testing.T, addr string, n int) *budgetConn {
	t.Helper()
	b, err := dialBudget(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.c.Close() })
	for _, l := range []string{"MAIL FROM:<hold@x.test>", "RCPT TO:<hold@y.test>", "DATA"} {
		if r, err := b.cmd(l); err != nil || (r[0] != '2' && r[0] != '3') {
			t.Fatalf("%s: %q %v", l, r, err)
		}
	}
	if _, err := b.c.Write([]byte(budgetBody("held", n))); err != nil {
		t.Fatal(err)
	}
	return b
}

// waitMetric waits until the unlabelled metric name equals want, and
// returns its last value.
func waitMetric(d *hermodProc, name string, want float64) float64 {
	deadline := time.Now().Add(10 * time.Second)
	for {
		v := d.metric(name)
		if v == want || time.Now().After(deadline) {
			return v
		}
		time.Sleep(20 * time.Millisecond)
	}
}

const budgetConfig = "max_message_size = 1048576\nmax_buffered_bytes = 1048576"

// TestE2EAuditBudgetSpent fills the budget with sessions holding DATA
// content and checks MAIL is refused 452 4.3.1 while it is spent, accepted
// again once a holder goes, and that the gauge returns to 0. Then it leaves
// less room than any message needs (a BDAT chunk read whole reserves an
// octet count that is not a multiple of 4 KiB, the rest in DATA steps):
// MAIL must be refused then too, not accepted for a message that is
// certain to be refused at its end.
func TestE2EAuditBudgetSpent(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	d := writeConfig(t, t.TempDir(), budgetConfig, "")
	d.start()
	const budgetMax = 1 << 20
	const gauge = "hermod_smtp_buffered_bytes"
	mailReply := func() string {
		b, err := dialBudget(d.smtp)
		if err != nil {
			t.Fatal(err)
		}
		defer b.c.Close()
		r, _ := b.cmd("MAIL FROM:<probe@x.test>")
		return r
	}

	// Four sessions of 200 KiB each hold 256 KiB: the budget is spent.
	var holders []*budgetConn
	for i := 0; i < 4; i++ {
		holders = append(holders, holdData(t, d.smtp, 200<<10))
		if v := waitMetric(d, gauge, float64((i+1)*256<<10)); v != float64((i+1)*256<<10) {
			t.Fatalf("after %d holders the gauge is %v, want %d", i+1, v, (i+1)*256<<10)
		}
	}
	if r := mailReply(); !strings.HasPrefix(r, "452 4.3.1") {
		t.Errorf("MAIL with the budget spent: %q, want 452 4.3.1", r)
	}
	// A held message whose end comes now is queued: its content is kept
	// already.
	if _, err := holders[3].c.Write([]byte(".\r\n")); err != nil {
		t.Fatal(err)
	}
	if r, err := holders[3].reply(); err != nil || !queuedRE.MatchString(r) {
		t.Errorf("a held message ending: %q %v, want queued", r, err)
	}
	if v := waitMetric(d, gauge, 3*256<<10); v != 3*256<<10 {
		t.Fatalf("after one message ended the gauge is %v", v)
	}
	if r := mailReply(); !strings.HasPrefix(r, "250 ") {
		t.Errorf("MAIL with room again: %q, want 250", r)
	}

	// Less room than a message's first step (4 KiB): a BDAT chunk of 5000
	// octets read in one piece reserves 5000, then DATA holders of 128,
	// 64, 32, 16 and 8 KiB leave 3192 octets.
	b, err := dialBudget(d.smtp)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.c.Close() })
	b.cmd("MAIL FROM:<bdat@x.test>")
	b.cmd("RCPT TO:<bdat@y.test>")
	if _, err := b.c.Write([]byte("BDAT 5000\r\n" + strings.Repeat(strings.Repeat("z", 98)+"\r\n", 50))); err != nil {
		t.Fatal(err)
	}
	if r, err := b.reply(); err != nil || !strings.HasPrefix(r, "250") {
		t.Fatalf("BDAT chunk: %q %v", r, err)
	}
	used := waitMetric(d, gauge, 3*256<<10+5000)
	if used != 3*256<<10+5000 {
		t.Skipf("the BDAT chunk was not read in one piece (gauge %v): cannot set up the probe", used)
	}
	for _, n := range []int{100 << 10, 40 << 10, 20 << 10, 10 << 10, 6 << 10} {
		holders = append(holders, holdData(t, d.smtp, n))
	}
	used = waitMetric(d, gauge, budgetMax-3192)
	if used != budgetMax-3192 {
		t.Fatalf("gauge %v, want %d", used, budgetMax-3192)
	}
	tiny, err := dialBudget(d.smtp)
	if err != nil {
		t.Fatal(err)
	}
	defer tiny.c.Close()
	r, _ := tiny.cmd("MAIL FROM:<tiny@x.test>")
	if !strings.HasPrefix(r, "452 4.3.1") {
		tiny.cmd("RCPT TO:<tiny@y.test>")
		tiny.cmd("DATA")
		end, _ := tiny.cmd("Subject: tiny\r\n\r\nhi\r\n.")
		t.Errorf("MAIL accepted with %d octets of room, when any message needs 4096: %q; a 25-octet message then got %q",
			budgetMax-int(used), r, end)
	}

	// Everything goes: the gauge returns to 0.
	for _, h := range holders {
		h.c.Close()
	}
	b.c.Close()
	tiny.c.Close()
	if v := waitMetric(d, gauge, 0); v != 0 {
		t.Errorf("hermod_smtp_buffered_bytes is %v once every client has gone, want 0", v)
	}
}

// TestE2EAuditBudgetConcurrent runs concurrent clients against a 1 MiB
// budget: DATA and BDAT, plain and STARTTLS, pipelined transactions,
// connections dropped mid-DATA and mid-BDAT, messages that end just after
// the client vanished. Every acknowledged message must be queued, nothing
// interrupted may be, the 452 refusals must be 452 4.3.1, and the gauge
// hermod_smtp_buffered_bytes must return to 0.
func TestE2EAuditBudgetConcurrent(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	dir := t.TempDir()
	cert, key := writeCert(t, dir)
	d := writeConfig(t, dir, budgetConfig+fmt.Sprintf("\ntls_cert = %q\ntls_key = %q", cert, key), "")
	d.start()

	var mu sync.Mutex
	acked := map[string]bool{}
	maybe := 0 // messages whose end was sent but whose reply was not read
	refused, otherRefusals := 0, []string{}
	note := func(r string) {
		mu.Lock()
		defer mu.Unlock()
		if m := queuedRE.FindStringSubmatch(r); m != nil {
			acked[m[1]] = true
			return
		}
		if strings.HasPrefix(r, "452 4.3.1") {
			refused++
			return
		}
		otherRefusals = append(otherRefusals, r)
	}
	kinds := []string{"data", "bdat", "tls", "pipelined", "drop-data", "drop-bdat", "vanish", "bdat-nosize"}
	const workers, rounds = 10, 8
	var wg sync.WaitGroup
	errs := make(chan error, workers*rounds)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rnd := rand.New(rand.NewSource(int64(w)))
			for i := 0; i < rounds; i++ {
				kind := kinds[(w+i)%len(kinds)]
				size := 20<<10 + rnd.Intn(380<<10)
				if err := budgetClient(d.smtp, kind, size, fmt.Sprintf("w%d-%d", w, i), note, func() { mu.Lock(); maybe++; mu.Unlock() }); err != nil {
					errs <- fmt.Errorf("worker %d round %d (%s, %d octets): %w", w, i, kind, size, err)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if v := waitMetric(d, "hermod_smtp_buffered_bytes", 0); v != 0 {
		t.Errorf("hermod_smtp_buffered_bytes is %v once every client has gone, want 0", v)
	}
	for _, r := range otherRefusals {
		t.Errorf("unexpected reply: %q", r)
	}
	t.Logf("%d messages acknowledged, %d refused 452 4.3.1 (metric %v), %d ended unread",
		len(acked), refused, d.metric("hermod_smtp_buffer_refused_total"), maybe)
	for id := range acked {
		if code, _ := d.get("/api/queue/" + id); code != 200 {
			t.Errorf("acknowledged message %s is not queued (%d)", id, code)
		}
	}
	_, list := d.get("/api/queue")
	if n := strings.Count(list, `"id"`); n < len(acked) || n > len(acked)+maybe {
		t.Errorf("%d messages queued, %d acknowledged and %d unread", n, len(acked), maybe)
	}
	if strings.Contains(list, "dropped@") {
		t.Errorf("a message interrupted mid-content was queued:\n%.2000s", list)
	}
	if code, _ := d.get("/healthz"); code != 200 {
		t.Errorf("/healthz %d", code)
	}
}

// budgetClient runs one client of kind against addr with a body of about
// size octets, reporting the replies to end of data through note; vanished
// is called for a message whose end was sent and reply not read.
func budgetClient(addr, kind string, size int, tag string, note func(string), vanished func()) error {
	b, err := dialBudget(addr)
	if err != nil {
		return err
	}
	defer b.c.Close()
	body := budgetBody(tag, size)
	envelope := func(from string, sizeParam bool) error {
		m := "MAIL FROM:<" + from + ">"
		if sizeParam {
			m += fmt.Sprintf(" SIZE=%d", len(body))
		}
		r, err := b.cmd(m)
		if err != nil {
			return err
		}
		if !strings.HasPrefix(r, "250") {
			note(r)
			return errRefusedAtMail
		}
		if r, err := b.cmd("RCPT TO:<" + tag + "@y.test>"); err != nil || !strings.HasPrefix(r, "250") {
			return fmt.Errorf("RCPT %q: %v", r, err)
		}
		return nil
	}
	data := func() error {
		if r, err := b.cmd("DATA"); err != nil || !strings.HasPrefix(r, "354") {
			return fmt.Errorf("DATA %q: %v", r, err)
		}
		r, err := b.cmd(body + ".")
		if err != nil {
			return err
		}
		note(r)
		return nil
	}
	bdat := func() error {
		// Chunks of 64 KiB, pipelined, then LAST.
		rest, n := body, 0
		var w strings.Builder
		for len(rest) > 64<<10 {
			fmt.Fprintf(&w, "BDAT %d\r\n%s", 64<<10, rest[:64<<10])
			rest, n = rest[64<<10:], n+1
		}
		fmt.Fprintf(&w, "BDAT %d LAST\r\n%s", len(rest), rest)
		if _, err := b.c.Write([]byte(w.String())); err != nil {
			return err
		}
		reps, err := b.replies(n + 1)
		if err != nil {
			return err
		}
		note(reps[len(reps)-1])
		return nil
	}
	switch kind {
	case "data", "tls":
		if kind == "tls" {
			if err := b.startTLS(); err != nil {
				return err
			}
		}
		if err := envelope("s@x.test", true); err != nil {
			return ignoreMailRefusal(err)
		}
		return data()
	case "bdat", "bdat-nosize":
		if err := envelope("s@x.test", kind == "bdat"); err != nil {
			return ignoreMailRefusal(err)
		}
		return bdat()
	case "pipelined":
		// Two transactions, each envelope sent with the previous end of
		// data (RFC 2920 §3.1), QUIT after the last.
		tx := "MAIL FROM:<p@x.test>\r\nRCPT TO:<" + tag + "@y.test>\r\nDATA\r\n"
		if _, err := b.c.Write([]byte(tx)); err != nil {
			return err
		}
		reps, err := b.replies(3)
		if err != nil {
			return err
		}
		if !strings.HasPrefix(reps[2], "354") {
			note(reps[0])
			return nil
		}
		if _, err := b.c.Write([]byte(body + ".\r\n" + tx)); err != nil {
			return err
		}
		if reps, err = b.replies(4); err != nil {
			return err
		}
		note(reps[0])
		if !strings.HasPrefix(reps[3], "354") {
			if strings.HasPrefix(reps[1], "452") {
				note(reps[1])
			}
			return nil
		}
		if _, err := b.c.Write([]byte(body + ".\r\nQUIT\r\n")); err != nil {
			return err
		}
		if reps, err = b.replies(2); err != nil {
			return err
		}
		note(reps[0])
		return nil
	case "drop-data", "drop-bdat":
		if err := envelope("dropped@x.test", false); err != nil {
			return ignoreMailRefusal(err)
		}
		cut := body[:len(body)/2]
		if kind == "drop-data" {
			b.cmd("DATA")
			b.c.Write([]byte(cut))
		} else {
			fmt.Fprintf(b.c, "BDAT %d LAST\r\n%s", len(body), cut)
		}
		time.Sleep(20 * time.Millisecond)
		if tc, ok := b.c.(*net.TCPConn); ok && len(body)%2 == 0 {
			tc.SetLinger(0) // a reset rather than a close, half of the time
		}
		return nil
	case "vanish":
		// The whole message, then gone before the reply.
		if err := envelope("s@x.test", true); err != nil {
			return ignoreMailRefusal(err)
		}
		b.cmd("DATA")
		b.c.Write([]byte(body + ".\r\n"))
		vanished()
		return nil
	}
	return fmt.Errorf("unknown kind %q", kind)
}

var errRefusedAtMail = fmt.Errorf("refused at MAIL")

func ignoreMailRefusal(err error) error {
	if err == errRefusedAtMail {
		return nil
	}
	return err
}

// TestE2EAuditFullDiskGaps probes spool.min_free beyond TestE2EFullDisk, on
// a real tmpfs: a SIZE= that would not leave min_free is refused 452 4.3.1
// (RFC 1870 §6.1) while a small one is taken; /healthz and /metrics while
// refusing; a BDAT message without SIZE once below the guard; and a
// restart on a filesystem still short of space: the daemon starts (it can
// still deliver and so free space), refuses MAIL, and takes mail again
// once space is freed.
func TestE2EAuditFullDiskGaps(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	dir := t.TempDir()
	mnt := mountTmpfs(t, dir, "64m")
	d := spoolOn(t, dir, mnt, "max_message_size = 67108864\nmax_buffered_bytes = 134217728", "memtable_size = 4194304\nmin_free = 16777216")
	d.start()
	mailWith := func(param string) string { return mailReply(t, d, param) }
	// About 60 MiB free: 50 MiB would leave less than 16 MiB.
	if r := mailWith(" SIZE=52428800"); !strings.HasPrefix(r, "452 4.3.1") {
		t.Errorf("MAIL SIZE=50MiB on a 64 MiB filesystem with min_free 16 MiB: %q, want 452 4.3.1", r)
	}
	if r := mailWith(" SIZE=1048576"); !strings.HasPrefix(r, "250 ") {
		t.Errorf("MAIL SIZE=1MiB: %q, want 250", r)
	}
	// Fill the filesystem beside the spool (another tenant) to below the
	// guard.
	filler := filepath.Join(mnt, "filler")
	if out, err := exec.Command("dd", "if=/dev/zero", "of="+filler, "bs=1M", "count=52").CombinedOutput(); err != nil {
		t.Fatalf("dd: %v %s", err, out)
	}
	time.Sleep(300 * time.Millisecond) // the free space reading is cached for 250 ms
	if r := mailWith(""); !strings.HasPrefix(r, "452 4.3.1") {
		t.Errorf("MAIL below min_free: %q, want 452 4.3.1", r)
	}
	if r := mailWith(" BODY=8BITMIME"); !strings.HasPrefix(r, "452 4.3.1") {
		t.Errorf("MAIL (for BDAT, no SIZE) below min_free: %q, want 452 4.3.1", r)
	}
	// A BDAT-only client that skips MAIL's answer gets nothing queued.
	if b, err := dialBudget(d.smtp); err == nil {
		b.c.Write([]byte("MAIL FROM:<s@x.test>\r\nRCPT TO:<r@y.test>\r\nBDAT 4 LAST\r\nbody"))
		reps, _ := b.replies(3)
		b.c.Close()
		if len(reps) == 3 && queuedRE.MatchString(reps[2]) {
			t.Errorf("a BDAT message was queued below min_free: %q", reps)
		}
	}
	if code, body := d.get("/healthz"); code != 200 {
		t.Errorf("/healthz %d %q while refusing for space, want 200 (the daemon still delivers)", code, body)
	}
	if v := d.metric("hermod_smtp_insufficient_storage_total"); v < 3 {
		t.Errorf("hermod_smtp_insufficient_storage_total = %v, want >= 3", v)
	}
	_, m := d.get("/metrics")
	if !regexp.MustCompile(`(?m)^hermod_spool_filesystem_free_bytes [0-9.e+]+$`).MatchString(m) {
		t.Errorf("no free space gauge:\n%s", grepLines(m, "free"))
	}

	// Restart on the filesystem still short of space.
	d.kill(syscall.SIGTERM)
	d.start()
	if r := mailWith(""); !strings.HasPrefix(r, "452 4.3.1") {
		t.Errorf("MAIL after a restart below min_free: %q, want 452 4.3.1", r)
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if r := mailWith(""); !strings.HasPrefix(r, "250 ") {
		t.Errorf("MAIL once space is freed: %q, want 250", r)
	}

}

// TestE2EAuditFullDiskStart starts the daemon on a spool filesystem with no
// space at all (after a stop, as systemd restarts it after the exit for
// ENOSPC): it must either run, refusing MAIL with 452 4.3.1, or exit 1
// with a log line naming the cause, not crash; once space is freed it
// starts and takes mail.
func TestE2EAuditFullDiskStart(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	dir := t.TempDir()
	mnt := mountTmpfs(t, dir, "32m")
	d := spoolOn(t, dir, mnt, "", "min_free = 8388608")
	d.start()
	mailWith := func(param string) string { return mailReply(t, d, param) }
	sendMsg(t, d.smtp, "a@x.test", []string{"b@y.test"}, "before the disk filled")
	filler := filepath.Join(mnt, "filler")
	// A start on a filesystem with no space at all: the daemon either
	// runs (refusing MAIL) or exits non-zero saying why; once space is
	// freed it starts and takes mail.
	d.kill(syscall.SIGTERM)
	_ = exec.Command("dd", "if=/dev/zero", "of="+filler, "bs=1M", "count=64").Run() // until ENOSPC
	cmd := exec.Command(hermodBinary(t), "serve", "-config", d.cfg)
	var log syncBuffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		t.Logf("start on a full filesystem: exited (%v):\n%s", err, log.String())
		if cmd.ProcessState.ExitCode() != 1 || strings.Contains(log.String(), "panic:") || !strings.Contains(log.String(), "no space left on device") {
			t.Errorf("exit on a full filesystem: status %v, want 1 with a log line naming the cause and no panic:\n%s", err, log.String())
		}
	case <-time.After(5 * time.Second):
		b, err := dialBudget(d.smtp)
		if err != nil {
			t.Fatalf("start on a full filesystem: running 5 s later but not serving SMTP (%v):\n%s", err, log.String())
		}
		r, _ := b.cmd("MAIL FROM:<s@x.test>")
		b.c.Close()
		t.Logf("start on a full filesystem: running; MAIL %q", strings.TrimSpace(r))
		if !strings.HasPrefix(r, "452 4.3.1") {
			t.Errorf("MAIL on a full filesystem: %q, want 452 4.3.1", r)
		}
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	d.start()
	if r := mailWith(""); !strings.HasPrefix(r, "250 ") {
		t.Errorf("MAIL after a restart with space again: %q, want 250", r)
	}
}

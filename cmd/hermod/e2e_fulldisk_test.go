package main

import (
	"bufio"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// mountTmpfs mounts a tmpfs of size (as mount(8) takes it, e.g. "96m") on
// a new directory under dir, unmounted when the test ends. The test is
// skipped where mounting is not allowed (not root, or no CAP_SYS_ADMIN).
func mountTmpfs(t *testing.T, dir, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	mnt := filepath.Join(dir, "fs")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs here: %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", mnt).Run() })
	return mnt
}

// spoolOn writes the configuration of a daemon in dir (writeConfig, with
// deadDNS) whose spool is on mnt, spoolExtra added to its [spool] table.
func spoolOn(t *testing.T, dir, mnt, smtpExtra, spoolExtra string) *hermodProc {
	t.Helper()
	d := writeConfig(t, dir, smtpExtra, deadDNS)
	cfg, err := os.ReadFile(d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	s := strings.Replace(string(cfg), fmt.Sprintf("dir = %q", filepath.Join(dir, "spool")),
		fmt.Sprintf("dir = %q\n%s", filepath.Join(mnt, "spool"), spoolExtra), 1)
	if err := os.WriteFile(d.cfg, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	return d
}

// incompressible returns a message of about n octets whose body s2 cannot
// shrink (base64 of random octets, 76-character lines).
func incompressible(t *testing.T, n int) string {
	raw := make([]byte, n*3/4)
	if _, err := rand.Read(raw); err != nil {
		t.Fatal(err)
	}
	enc := base64.StdEncoding.EncodeToString(raw)
	var b strings.Builder
	b.WriteString("Subject: full disk\r\n\r\n")
	for len(enc) > 0 {
		k := min(76, len(enc))
		b.WriteString(enc[:k])
		b.WriteString("\r\n")
		enc = enc[k:]
	}
	return b.String()
}

var queuedIDRE = regexp.MustCompile(`^250 2\.0\.0 Ok: queued as (\S+)`)

// sendOne runs one transaction on c and returns the reply to the first
// command refused, or to the end of data; err when the connection failed.
func sendOne(c net.Conn, r *bufio.Reader, body string) (string, error) {
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	read := func() (string, error) {
		var all strings.Builder
		for {
			line, err := r.ReadString('\n')
			all.WriteString(line)
			if err != nil {
				return all.String(), err
			}
			if len(line) < 4 || line[3] != '-' {
				return all.String(), nil
			}
		}
	}
	for _, cmd := range []string{"MAIL FROM:<s@src.test> SIZE=" + fmt.Sprint(len(body)), "RCPT TO:<r@dest.test>", "DATA"} {
		if _, err := c.Write([]byte(cmd + "\r\n")); err != nil {
			return "", err
		}
		rep, err := read()
		if err != nil {
			return rep, err
		}
		if rep[0] != '2' && rep[0] != '3' {
			return rep, nil
		}
	}
	if _, err := c.Write([]byte(body + ".\r\n")); err != nil {
		return "", err
	}
	return read()
}

// TestE2EFullDisk fills the spool's filesystem (a real tmpfs) with queued
// mail that cannot leave. With spool.min_free, MAIL gets 452 4.3.1 before
// the disk is full and the daemon stays healthy. Without it, pebble hits
// ENOSPC: the daemon refuses the message it was writing, stops by itself
// (for systemd to restart it) and, restarted on a filesystem with room
// again, still holds every message it acknowledged, intact.
func TestE2EFullDisk(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	dir := t.TempDir()
	mnt := mountTmpfs(t, dir, "64m")
	body := incompressible(t, 1<<20)
	config := func(minFree string) *hermodProc {
		// Small memtables: flushes and the WAL run into the full disk soon.
		return spoolOn(t, dir, mnt, "max_message_size = 4194304", "memtable_size = 4194304\nmin_free = "+minFree)
	}

	// 1. min_free = 16 MiB (plus half the spool's size): refused with 452
	// 4.3.1 before the disk fills, compactions included.
	d := config("16777216")
	d.start()
	c, err := net.Dial("tcp", d.smtp)
	if err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(c)
	r.ReadString('\n')
	c.Write([]byte("EHLO client.test\r\n"))
	for l, _ := r.ReadString('\n'); strings.HasPrefix(l, "250-"); l, _ = r.ReadString('\n') {
	}
	acked := map[string]bool{}
	refused := ""
	for i := 0; i < 80 && refused == ""; i++ {
		rep, err := sendOne(c, r, body)
		if err != nil {
			t.Fatalf("message %d: connection failed (%v) before any 452: %q\n%s", i, err, rep, d.log.String())
		}
		if m := queuedIDRE.FindStringSubmatch(rep); m != nil {
			acked[m[1]] = true
			continue
		}
		refused = rep
	}
	c.Close()
	if !strings.HasPrefix(refused, "452 4.3.1 ") {
		t.Fatalf("after %d messages: %q, want 452 4.3.1 (free space guard)\n%s", len(acked), refused, d.log.String())
	}
	if code, _ := d.get("/healthz"); code != 200 {
		t.Errorf("/healthz %d while refusing for lack of space, want 200", code)
	}
	if _, m := d.get("/metrics"); !strings.Contains(m, "hermod_smtp_insufficient_storage_total 1") ||
		!strings.Contains(m, "hermod_spool_filesystem_free_bytes ") {
		t.Errorf("metrics lack the refusal or the free space:\n%s", grepLines(m, "insufficient|free_bytes"))
	}
	d.kill(syscall.SIGTERM)
	if len(acked) < 10 {
		t.Fatalf("only %d messages accepted on a 64 MiB filesystem", len(acked))
	}
	t.Logf("phase 1: %d messages of 1 MiB accepted, then %q", len(acked), strings.TrimSpace(refused))

	// 2. min_free disabled: the next messages run into ENOSPC.
	d = config("-1")
	d.start()
	c, err = net.Dial("tcp", d.smtp)
	if err != nil {
		t.Fatal(err)
	}
	r = bufio.NewReader(c)
	r.ReadString('\n')
	c.Write([]byte("EHLO client.test\r\n"))
	for l, _ := r.ReadString('\n'); strings.HasPrefix(l, "250-"); l, _ = r.ReadString('\n') {
	}
	var last string
	for i := 0; i < 80; i++ {
		rep, err := sendOne(c, r, body)
		if m := queuedIDRE.FindStringSubmatch(rep); m != nil {
			acked[m[1]] = true
			continue
		}
		last = fmt.Sprintf("%q (%v)", rep, err)
		break
	}
	c.Close()
	select {
	case <-d.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("hermod still running 30 s after the spool filled up (last reply %s):\n%s", last, d.log.String())
	}
	if code := d.cmd.ProcessState.ExitCode(); code == 0 {
		t.Errorf("hermod exited with status 0 after its spool failed")
	}
	if !strings.Contains(d.log.String(), "spool failed: stopping for a restart") {
		t.Errorf("no log line for the stop:\n%s", d.log.String())
	}
	t.Logf("phase 2: %d messages acknowledged in all; the last transaction got %s; hermod exited %d",
		len(acked), last, d.cmd.ProcessState.ExitCode())

	// 3. Room again (as an operator would make): every acknowledged
	// message is still queued, intact.
	if out, err := exec.Command("mount", "-o", "remount,size=512m", mnt).CombinedOutput(); err != nil {
		t.Fatalf("remount: %v %s", err, out)
	}
	d = config("16777216")
	d.start()
	d.kill(syscall.SIGTERM)
	queued := map[string]bool{}
	st := readSpoolDir(t, filepath.Join(mnt, "spool"))
	for _, m := range st {
		queued[m.msg.ID.String()] = true
		if got := string(bodyAfterTrace(t, m.body)); got != body {
			t.Errorf("message %s: body changed (%d octets, want %d)", m.msg.ID, len(got), len(body))
		}
	}
	for id := range acked {
		if !queued[id] {
			t.Errorf("acknowledged message %s lost", id)
		}
	}
}

// grepLines returns the lines of s matching the regular expression re.
func grepLines(s, re string) string {
	var out []string
	rx := regexp.MustCompile(re)
	for _, l := range strings.Split(s, "\n") {
		if rx.MatchString(l) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

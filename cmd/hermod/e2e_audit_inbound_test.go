package main

// Daemon-level regression tests from an audit of the inbound SMTP server:
// what a client is told about its message must match what the spool holds.

import (
	"bufio"
	"io"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestE2EAuditHalfCloseQueued: clients that pipeline a whole session and
// shut down their sending side (nc -N, scripts) are told the queue ID of
// each message the daemon queued (RFC 5321 §4.1.1.10, RFC 2920 §3.1), and
// sessions interrupted or refused before the end of data queue nothing.
func TestE2EAuditHalfCloseQueued(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	d := writeConfig(t, t.TempDir(), "", "")
	d.start()
	const ehlo = "EHLO c.test\r\n"
	const tx = "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@unreachable.test>\r\n"
	cases := []struct {
		name, in string
		queued   int // "queued as" replies expected, each followed by its message in the spool
		bye      bool
	}{
		{"data quit", ehlo + tx + "DATA\r\nSubject: one\r\n\r\nbody\r\n.\r\nQUIT\r\n", 1, true},
		{"bdat", ehlo + tx + "BDAT 6 LAST\r\nbody\r\n", 1, false},
		{"two messages", ehlo + tx + "DATA\r\nSubject: a\r\n\r\na\r\n.\r\n" + tx + "DATA\r\nSubject: b\r\n\r\nb\r\n.\r\nQUIT\r\n", 2, true},
		{"interrupted data", ehlo + tx + "DATA\r\nSubject: cut\r\n\r\npartial\r\n", 0, false},
		{"interrupted bdat", ehlo + tx + "BDAT 4\r\nbodyBDAT 10 LAST\r\nbo", 0, false},
		{"bare LF refused", ehlo + tx + "DATA\r\nSubject: bad\r\n\r\nbad\nline\r\n.\r\nQUIT\r\n", 0, true},
	}
	idRE := regexp.MustCompile(`250 2\.0\.0 Ok: queued as (\S+)\r\n`)
	total := 0
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", d.smtp)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			r := bufio.NewReader(conn)
			_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
			if l, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(l, "220 ") {
				t.Fatalf("greeting %q %v", l, err)
			}
			if _, err := conn.Write([]byte(c.in)); err != nil {
				t.Fatal(err)
			}
			if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			all, err := io.ReadAll(r)
			if err != nil {
				t.Fatalf("replies: %v (got %q)", err, all)
			}
			ids := idRE.FindAllStringSubmatch(string(all), -1)
			if len(ids) != c.queued {
				t.Fatalf("%d messages acknowledged, want %d: %q", len(ids), c.queued, all)
			}
			if c.bye != strings.HasSuffix(string(all), "221 2.0.0 Bye\r\n") {
				t.Fatalf("QUIT answered: %v, want %v: %q", !c.bye, c.bye, all)
			}
			for _, m := range ids {
				if code, body := d.get("/api/queue/" + m[1]); code != 200 {
					t.Fatalf("acknowledged message %s not queued: %d %s", m[1], code, body)
				}
			}
			total += c.queued
		})
	}
	// Nothing but the acknowledged messages is queued.
	time.Sleep(200 * time.Millisecond)
	if _, list := d.get("/api/queue"); strings.Count(list, `"id"`) != total {
		t.Fatalf("%d messages queued, %d acknowledged:\n%s", strings.Count(list, `"id"`), total, list)
	}
}

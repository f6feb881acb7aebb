package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/hermod-mta/hermod/bench"
)

func writeFile(t *testing.T, name, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadCommand(t *testing.T) {
	s, err := bench.NewSink(bench.SinkConfig{Listen: []string{"127.0.0.1:0"}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	out := filepath.Join(t.TempDir(), "res.json")
	cfg := writeFile(t, "load.toml", "messages = 50\nsessions = 2\nsize = \"uniform(500,2KiB)\"\nrcpts = 2\n")
	var stdout, stderr bytes.Buffer
	err = cmdLoad(ctx, []string{"-config", cfg, "-target", s.Addrs()[0], "-messages", "30", "-out", out, "-quiet"},
		&stdout, &stderr)
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr.String())
	}
	var res bench.LoadResult
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatal(err)
	}
	// -messages overrides the file; the rest comes from the file.
	if res.Accepted != 30 || res.Delivered != 60 || res.Connections != 2 {
		t.Errorf("result %+v", res)
	}
	if !strings.Contains(stdout.String(), "30 accepted") || !strings.Contains(stderr.String(), "uniform(500,2KiB)") {
		t.Errorf("stdout %q\nstderr %q", stdout.String(), stderr.String())
	}
	if st := s.Stats(); st.Unique != 60 || st.Corrupted != 0 {
		t.Errorf("sink %+v", st)
	}

	for _, args := range [][]string{
		{"-config", writeFile(t, "bad.toml", "mesages = 5\n")},
		{"-sessions", "-1"},
		{"-size", "huge"},
		{"stray"},
	} {
		if err := cmdLoad(ctx, args, io.Discard, io.Discard); err == nil {
			t.Errorf("%v: no error", args)
		}
	}
}

func TestSinkCommand(t *testing.T) {
	faults := writeFile(t, "faults.toml", "[domain.\"d0002.test\"]\nrcpt = { \"550\" = 1.0 }\n")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pr, pw := io.Pipe()
	out := filepath.Join(t.TempDir(), "stats.json")
	done := make(chan error, 1)
	go func() {
		done <- cmdSink(ctx, []string{"-listen", "127.0.0.1:0", "-faults", faults, "-out", out, "-for", "30s"},
			io.Discard, pw)
		pw.Close()
	}()
	line, err := bufio.NewReader(pr).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, pr)
	addr := strings.TrimSpace(strings.TrimPrefix(line, "sink: SMTP on "))
	l, err := bench.NewLoad(bench.LoadConfig{Targets: []string{addr}, Sessions: 1, Messages: 20, Domains: 2,
		Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	res, err := l.Run(ctx)
	if err != nil || res.Accepted+res.Rejected != 20 || res.Rejected == 0 || res.Accepted == 0 {
		t.Fatalf("load %+v %v", res, err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("sink did not stop")
	}
	var st bench.SinkStats
	b, _ := os.ReadFile(out)
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	if st.Messages != res.Accepted || st.Replies[550] != res.Rejected {
		t.Errorf("stats %+v", st)
	}
	if err := cmdSink(context.Background(), []string{"-faults", writeFile(t, "f.toml", "[default]\nnope = 1\n")},
		io.Discard, io.Discard); err == nil {
		t.Error("bad fault profile accepted")
	}
}

func TestDNSCommand(t *testing.T) {
	zones := writeFile(t, "zones.toml", `
[[zone]]
name = "null.test"
null_mx = true

[[zone]]
name = "multi.test"
mx = [ { host = "a.multi.test", pref = 10, addrs = ["127.0.0.2"] }, { host = "b.multi.test", pref = 20 } ]
`)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pr, pw := io.Pipe()
	var stdout bytes.Buffer
	done := make(chan error, 1)
	go func() {
		done <- cmdDNS(ctx, []string{"-listen", "127.0.0.1:0", "-domains", "5", "-zones", zones, "-ttl", "42",
			"-for", "30s"}, &stdout, pw)
		pw.Close()
	}()
	line, err := bufio.NewReader(pr).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, pr)
	fields := strings.Fields(line)
	addr := strings.TrimSpace(fields[len(fields)-2])
	c := &dns.Client{Timeout: 5 * time.Second}
	for name, want := range map[string]int{"multi.test.": 2, "null.test.": 1, "d0005.test.": 1} {
		m := new(dns.Msg)
		m.SetQuestion(name, dns.TypeMX)
		r, _, err := c.Exchange(m, addr)
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Answer) != want || r.Answer[0].Header().Ttl != 42 {
			t.Errorf("%s: %v", name, r.Answer)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var st bench.DNSStats
	if err := json.Unmarshal(stdout.Bytes(), &st); err != nil || st.MX != 3 {
		t.Errorf("stats %+v %v", st, err)
	}
	if err := cmdDNS(context.Background(), []string{"-zones", writeFile(t, "z.toml", "[[zone]]\nnam = \"x\"\n")},
		io.Discard, io.Discard); err == nil {
		t.Error("bad zones file accepted")
	}
}

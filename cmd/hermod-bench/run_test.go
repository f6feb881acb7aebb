package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/bench"
)

// TestRunSmokeHermod builds hermod from this tree and runs the smoke
// scenario through it end to end (hermod-bench run → bench.Run): real
// sockets on loopback, a real spool on disk, the test DNS and the sink.
// It asserts correctness only — every accepted pair delivered once and
// intact — never a timing.
func TestRunSmokeHermod(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs hermod")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "hermod")
	if out, err := exec.Command("go", "build", "-o", bin, "../hermod").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	jsonPath, htmlPath := filepath.Join(dir, "smoke.json"), filepath.Join(dir, "smoke.html")
	var stdout, stderr bytes.Buffer
	err := cmdRun(ctx, []string{"smoke", "--hermod", bin, "--json", jsonPath, "--html", htmlPath, "--quiet",
		"--work-dir", dir, "--sample", "100ms"}, &stdout, &stderr)
	if err != nil {
		t.Fatalf("%v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	b, err := os.ReadFile(jsonPath)
	if err != nil {
		t.Fatal(err)
	}
	var rep bench.Report
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	a := rep.Accounting
	if rep.Target != "hermod" || rep.Scenario != "smoke" || !rep.Complete {
		t.Errorf("target %q scenario %q complete %v", rep.Target, rep.Scenario, rep.Complete)
	}
	if rep.Load.Accepted == 0 || a.Expected != rep.Load.Delivered || a.Delivered != a.Expected || a.Lost != 0 ||
		a.Duplicates != 0 || rep.Sink.Corrupted != 0 || rep.Sink.Unique != a.Expected {
		t.Errorf("accepted %d, accounting %+v, sink %d unique %d corrupted", rep.Load.Accepted, a, rep.Sink.Unique,
			rep.Sink.Corrupted)
	}
	// What hermod's side of the report is made of was measured.
	if !rep.MeasuredProcess || !rep.MeasuredSpool || rep.Fsyncs == 0 || rep.PeakRSS == 0 {
		t.Errorf("measured process %v spool %v, fsyncs %d, rss %d", rep.MeasuredProcess, rep.MeasuredSpool,
			rep.Fsyncs, rep.PeakRSS)
	}
	if !strings.Contains(stdout.String(), "lost 0, duplicates 0, corrupted 0") {
		t.Errorf("table:\n%s", stdout.String())
	}
	page, err := os.ReadFile(htmlPath)
	if err != nil || !bytes.Contains(page, []byte("<svg")) {
		t.Errorf("html report: %v", err)
	}
	// The run's work directory (config, spool) is gone.
	if m, _ := filepath.Glob(filepath.Join(dir, "hermod-bench-*")); len(m) != 0 {
		t.Errorf("left behind: %v", m)
	}
}

func TestRunCompareArgs(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		cmd  func(context.Context, []string, io.Writer, io.Writer) error
		args []string
		want string
	}{
		{cmdRun, nil, "exactly one SCENARIO"},
		{cmdRun, []string{"nope"}, "unknown scenario"},
		{cmdRun, []string{"smoke", "steady-1k"}, "exactly one SCENARIO"},
		{cmdRun, []string{"smoke", "--target-pid", "1"}, "go with --target"},
		{cmdRun, []string{"smoke", "--hermod-config", "/nonexistent.toml", "--hermod", "/bin/true"}, "nonexistent"},
		{cmdCompare, []string{"smoke", "--hermod", "/bin/true"}, "--peer is required"},
		{cmdCompare, []string{"smoke", "--peer", "exim", "--hermod", "/bin/true"}, "unknown peer"},
		{cmdCompare, []string{"--peer", "direct"}, "exactly one SCENARIO"},
	} {
		err := tc.cmd(ctx, tc.args, io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: err = %v, want %q", tc.args, err, tc.want)
		}
	}
}

func TestParseInterleaved(t *testing.T) {
	var f runFlags
	fs := newFlagSetForTest(&f)
	pos, err := parseInterleaved(fs, []string{"--quiet", "steady-1k", "--messages", "7", "extra", "--keep"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(pos, ",") != "steady-1k,extra" || !f.quiet || f.messages != 7 || !f.keep {
		t.Errorf("pos %v flags %+v", pos, f)
	}
}

func TestScenariosCommand(t *testing.T) {
	var out bytes.Buffer
	if err := cmdScenarios(nil, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	for _, name := range bench.Scenarios() {
		if !strings.Contains(out.String(), name+" ") {
			t.Errorf("%s missing:\n%s", name, out.String())
		}
	}
}

func newFlagSetForTest(f *runFlags) *flag.FlagSet {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	f.bind(fs)
	return fs
}

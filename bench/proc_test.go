package bench

import (
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestParseProcStat(t *testing.T) {
	// The command name may hold spaces and parentheses.
	line := "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 130 7 3 20 0 1 0 100 1000 10 " +
		"18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n"
	st, err := parseProcStat([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	if st.ppid != 1 || st.cpu != 3800*time.Millisecond || st.child != 100*time.Millisecond {
		t.Errorf("%+v", st)
	}
	for _, bad := range []string{"", "1234 (x", "1 (x) S 1 2"} {
		if _, err := parseProcStat([]byte(bad)); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func TestParseProcStatusAndMachine(t *testing.T) {
	rss, hwm, err := parseProcStatus(strings.NewReader("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n"))
	if err != nil || rss != 1<<20 || hwm != 2<<20 {
		t.Errorf("rss %d hwm %d err %v", rss, hwm, err)
	}
	m, err := parseMachineCPU("cpu  100 5 50 800 40 1 2 3 9 9")
	if err != nil {
		t.Fatal(err)
	}
	// busy = user+nice+system+irq+softirq+steal; guest (already in user)
	// and idle/iowait are not.
	if m.busy != 161*clockTick || m.total != 1001*clockTick {
		t.Errorf("%+v", m)
	}
	if _, err := parseMachineCPU("intr 1 2 3"); err == nil {
		t.Error("no error for a line that is not cpu")
	}
}

func TestProcessTree(t *testing.T) {
	if _, err := os.Stat("/proc/self/stat"); err != nil {
		t.Skip("no /proc")
	}
	// A child that burns CPU for a while: the tree of this process must
	// count it, and its memory.
	cmd := exec.Command("sh", "-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; sleep 5")
	if err := cmd.Start(); err != nil {
		t.Skip(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	before, err := processTree(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	var u TreeUsage
	for time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		u, err = processTree(os.Getpid())
		if err != nil {
			t.Fatal(err)
		}
		child, _ := processTree(cmd.Process.Pid)
		if child.CPU >= 100*time.Millisecond {
			break
		}
	}
	if u.Procs < 2 || u.CPU <= before.CPU || u.RSS == 0 || u.HWM == 0 || u.Memory() == 0 {
		t.Errorf("tree %+v (before %+v)", u, before)
	}
	if _, err := processTree(1 << 30); err == nil {
		t.Error("no error for a process that does not exist")
	}
	var p Probe
	probeProcess(&p, cmd.Process.Pid)
	if !p.Process || p.RSS == 0 || p.PeakRSS < p.RSS {
		t.Errorf("probe %+v", p)
	}
}

func TestHost(t *testing.T) {
	h := Host()
	if h.CPUs < 1 || h.Go == "" {
		t.Errorf("%+v", h)
	}
}

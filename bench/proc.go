package bench

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// ErrNoProc means a figure that comes from /proc could not be read (not
// Linux, or the process is gone).
var ErrNoProc = errors.New("bench: /proc figure unavailable")

// clockTick is the unit of the CPU times in /proc/PID/stat (USER_HZ, which
// Linux fixes at 100 on every architecture Go supports).
const clockTick = 10 * time.Millisecond

// procStat is what a run reads from /proc/PID/stat.
type procStat struct {
	ppid int
	// cpu is utime+stime; child is cutime+cstime (children already
	// waited for).
	cpu, child time.Duration
}

// readProcStat parses /proc/PID/stat (pid 0: this process).
func readProcStat(pid int) (procStat, error) {
	b, err := os.ReadFile(procPath(pid, "stat"))
	if err != nil {
		return procStat{}, fmt.Errorf("%w: %v", ErrNoProc, err)
	}
	return parseProcStat(b)
}

// parseProcStat parses the text of /proc/PID/stat. The command name (field
// 2) may hold spaces and parentheses, so fields are counted after its last
// ')'.
func parseProcStat(b []byte) (procStat, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("%w: malformed stat", ErrNoProc)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); ppid is field 4, utime..cstime 14..17.
	if len(f) < 15 {
		return procStat{}, fmt.Errorf("%w: short stat", ErrNoProc)
	}
	n := func(k int) int64 { v, _ := strconv.ParseInt(f[k-3], 10, 64); return v }
	return procStat{
		ppid:  int(n(4)),
		cpu:   time.Duration(n(14)+n(15)) * clockTick,
		child: time.Duration(n(16)+n(17)) * clockTick,
	}, nil
}

func procPath(pid int, name string) string {
	if pid == 0 {
		return filepath.Join("/proc/self", name)
	}
	return filepath.Join("/proc", strconv.Itoa(pid), name)
}

// procMem returns VmRSS and VmHWM of pid in bytes.
func procMem(pid int) (rss, hwm uint64, err error) {
	f, err := os.Open(procPath(pid, "status"))
	if err != nil {
		return 0, 0, fmt.Errorf("%w: %v", ErrNoProc, err)
	}
	defer f.Close()
	return parseProcStatus(f)
}

func parseProcStatus(f io.Reader) (rss, hwm uint64, err error) {
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		var dst *uint64
		switch {
		case strings.HasPrefix(line, "VmRSS:"):
			dst = &rss
		case strings.HasPrefix(line, "VmHWM:"):
			dst = &hwm
		default:
			continue
		}
		fs := strings.Fields(line)
		if len(fs) >= 2 {
			v, _ := strconv.ParseUint(fs[1], 10, 64)
			*dst = v << 10 // kB
		}
	}
	return rss, hwm, sc.Err()
}

// procWriteBytes returns write_bytes of /proc/PID/io: bytes this process
// caused to be sent to storage.
func procWriteBytes(pid int) (uint64, error) {
	b, err := os.ReadFile(procPath(pid, "io"))
	if err != nil {
		return 0, fmt.Errorf("%w: %v", ErrNoProc, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "write_bytes:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("%w: no write_bytes", ErrNoProc)
}

// TreeUsage is the resource use of a process and all its descendants.
type TreeUsage struct {
	// CPU is user+system time of the processes alive now plus the children
	// they have already waited for (so a forking server such as Postfix is
	// counted whole: exited workers are in their master's child time).
	CPU time.Duration
	// RSS is the sum of the resident sizes of the processes alive now
	// (pages shared between them counted in each); PSS the sum of their
	// proportional set sizes (shared pages divided among the sharers),
	// read only when there are several processes (0 otherwise, or when
	// the kernel does not have smaps_rollup). HWM is the root process's
	// own peak resident size.
	RSS, PSS, HWM uint64
	// WriteBytes is the storage writes (/proc/PID/io write_bytes) of the
	// processes alive now, which include those of the children they have
	// waited for.
	WriteBytes uint64
	// Procs is the number of processes counted.
	Procs int
}

// Memory returns the figure to report for the tree's memory now: PSS for
// several processes (RSS would count shared pages many times), else RSS.
func (u TreeUsage) Memory() uint64 {
	if u.Procs > 1 && u.PSS > 0 {
		return u.PSS
	}
	return u.RSS
}

// processTree measures pid and its descendants. Processes that vanish
// while it reads are skipped.
func processTree(pid int) (TreeUsage, error) {
	root, err := readProcStat(pid)
	if err != nil {
		return TreeUsage{}, err
	}
	u := TreeUsage{CPU: root.cpu + root.child, Procs: 1}
	u.RSS, u.HWM, _ = procMem(pid)
	u.WriteBytes, _ = procWriteBytes(pid)
	pids := []int{pid}
	kids := childrenOf(pid)
	for len(kids) > 0 {
		k := kids[len(kids)-1]
		kids = kids[:len(kids)-1]
		st, err := readProcStat(k)
		if err != nil {
			continue
		}
		u.CPU += st.cpu + st.child
		u.Procs++
		pids = append(pids, k)
		if rss, _, err := procMem(k); err == nil {
			u.RSS += rss
		}
		if wb, err := procWriteBytes(k); err == nil {
			u.WriteBytes += wb
		}
		kids = append(kids, childrenOf(k)...)
	}
	if len(pids) > 1 {
		for _, p := range pids {
			u.PSS += procPSS(p)
		}
	}
	return u, nil
}

// procPSS returns the Pss of /proc/PID/smaps_rollup in bytes (0 if
// unavailable).
func procPSS(pid int) uint64 {
	b, err := os.ReadFile(procPath(pid, "smaps_rollup"))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Pss:"); ok {
			fs := strings.Fields(v)
			if len(fs) > 0 {
				n, _ := strconv.ParseUint(fs[0], 10, 64)
				return n << 10
			}
		}
	}
	return 0
}

// childrenOf lists the children of pid, from
// /proc/PID/task/*/children when the kernel has it, else by scanning /proc.
func childrenOf(pid int) []int {
	var out []int
	tasks, err := os.ReadDir(procPath(pid, "task"))
	if err == nil {
		found := false
		for _, t := range tasks {
			b, err := os.ReadFile(filepath.Join(procPath(pid, "task"), t.Name(), "children"))
			if err != nil {
				continue
			}
			found = true
			for _, f := range strings.Fields(string(b)) {
				if n, err := strconv.Atoi(f); err == nil {
					out = append(out, n)
				}
			}
		}
		if found {
			return out
		}
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := readProcStat(n); err == nil && st.ppid == pid {
			out = append(out, n)
		}
	}
	return out
}

// machineCPU is a snapshot of /proc/stat's first line.
type machineCPU struct {
	busy, total time.Duration
}

func readMachineCPU() (machineCPU, error) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return machineCPU{}, fmt.Errorf("%w: %v", ErrNoProc, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return machineCPU{}, fmt.Errorf("%w: empty /proc/stat", ErrNoProc)
	}
	return parseMachineCPU(sc.Text())
}

// parseMachineCPU parses "cpu user nice system idle iowait irq softirq
// steal …": busy is everything but idle and iowait.
func parseMachineCPU(line string) (machineCPU, error) {
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return machineCPU{}, fmt.Errorf("%w: malformed /proc/stat", ErrNoProc)
	}
	var m machineCPU
	for i, s := range f[1:] {
		if i >= 8 { // guest times are already in user and nice
			break
		}
		v, _ := strconv.ParseInt(s, 10, 64)
		d := time.Duration(v) * clockTick
		m.total += d
		if i != 3 && i != 4 {
			m.busy += d
		}
	}
	return m, nil
}

// diskFlushes returns the flush requests completed by whole disks since
// boot (/proc/diskstats field 19; 0 on kernels without it). They are
// machine-wide: every process's fsyncs end up there.
func diskFlushes() uint64 {
	b, err := os.ReadFile("/proc/diskstats")
	if err != nil {
		return 0
	}
	var n uint64
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 19 {
			continue
		}
		if _, err := os.Stat(filepath.Join("/sys/block", f[2])); err != nil {
			continue // a partition, or an unknown device
		}
		v, _ := strconv.ParseUint(f[18], 10, 64)
		n += v
	}
	return n
}

// HostInfo describes the machine a run was made on.
type HostInfo struct {
	Hostname string `json:"hostname"`
	CPUs     int    `json:"cpus"`
	CPUModel string `json:"cpu_model,omitempty"`
	Kernel   string `json:"kernel,omitempty"`
	MemTotal uint64 `json:"mem_total,omitempty"`
	Go       string `json:"go"`
}

// Host returns what can be learnt about this machine.
func Host() HostInfo {
	h := HostInfo{CPUs: runtime.NumCPU(), Go: runtime.Version()}
	h.Hostname, _ = os.Hostname()
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		h.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				h.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				fs := strings.Fields(v)
				if len(fs) > 0 {
					n, _ := strconv.ParseUint(fs[0], 10, 64)
					h.MemTotal = n << 10
				}
			}
		}
	}
	return h
}

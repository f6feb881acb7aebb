package bench

import (
	"context"
	"maps"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func runLoad(t *testing.T, cfg LoadConfig) LoadResult {
	t.Helper()
	if cfg.Timeout == 0 {
		cfg.Timeout = 10 * time.Second
	}
	if cfg.Duration == 0 {
		cfg.Duration = 30 * time.Second
	}
	l, err := NewLoad(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	res, err := l.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Attempted != res.Accepted+res.Rejected+res.TempFailed+res.Failed {
		t.Errorf("classes do not add up: %+v", res)
	}
	var byCode uint64
	for _, n := range res.Codes {
		byCode += n
	}
	if byCode != res.Attempted {
		t.Errorf("codes %v do not add up to %d", res.Codes, res.Attempted)
	}
	return res
}

func TestLoadToSink(t *testing.T) {
	size, err := ParseSizeDist("lognormal(2KiB,1,100,64KiB)")
	if err != nil {
		t.Fatal(err)
	}
	for _, np := range []bool{false, true} {
		name := "pipelining"
		if np {
			name = "stepwise"
		}
		t.Run(name, func(t *testing.T) {
			s := newTestSink(t, SinkConfig{Listen: []string{"127.0.0.1:0", "127.0.0.2:0"}})
			var mu sync.Mutex
			accepted := map[string][]string{}
			res := runLoad(t, LoadConfig{
				Targets: s.Addrs(), Sessions: 8, Messages: 1500, Rcpts: 3, Domains: 20, Size: size,
				NoPipelining: np, Seed: 5,
				OnAccepted: func(id string, rcpts []string) {
					mu.Lock()
					accepted[id] = rcpts
					mu.Unlock()
				},
			})
			if res.Accepted != 1500 || res.Delivered != 4500 || res.RcptAccepted != 4500 || res.Codes[250] != 1500 ||
				res.Connections != 8 || res.Latency.Count != 1500 || res.Rate <= 0 || res.Sojourn.Count != 0 {
				t.Errorf("result %+v", res)
			}
			st := s.Stats()
			if st.Messages != 1500 || st.Unique != 4500 || st.Corrupted != 0 || st.Duplicates != 0 ||
				st.Unstamped != 0 || st.E2E.Count != 4500 || st.Bytes != res.Bytes {
				t.Errorf("sink %+v", st)
			}
			var perDomain uint64
			for _, n := range st.Domains {
				perDomain += n
			}
			if perDomain != 4500 || len(st.Domains) != 20 {
				t.Errorf("domains %v", st.Domains)
			}
			if len(accepted) != 1500 {
				t.Fatalf("OnAccepted saw %d messages", len(accepted))
			}
			for id, rcpts := range accepted {
				if !strings.HasPrefix(id, res.RunTag+"-") || len(rcpts) != 3 {
					t.Fatalf("accepted %s %v", id, rcpts)
				}
				for _, r := range rcpts {
					if n, _ := s.Seen(id, r); n != 1 {
						t.Fatalf("(%s, %s) seen %d times", id, r, n)
					}
				}
			}
			// Both listen addresses got mail.
			list, _, _ := s.Arrivals(0, 2000)
			mx := map[string]int{}
			for _, a := range list {
				mx[a.MX]++
			}
			if len(mx) != 2 {
				t.Errorf("arrivals by MX %v", mx)
			}
		})
	}
}

// TestLoadFaultsDeterministic runs the same faulty exchange twice over one
// session and checks that the outcome is identical and agrees with the
// sink's counts.
func TestLoadFaultsDeterministic(t *testing.T) {
	faults := Faults{Default: FaultRule{
		Mail: map[string]float64{"452": 0.05},
		Rcpt: map[string]float64{"451": 0.1, "550": 0.1},
		Data: map[string]float64{"554": 0.05, "451": 0.05},
	}}
	run := func(np bool) (LoadResult, SinkStats) {
		s := newTestSink(t, SinkConfig{Seed: 9, Faults: faults})
		res := runLoad(t, LoadConfig{Targets: s.Addrs(), Sessions: 1, Messages: 400, Rcpts: 2, Seed: 3,
			NoPipelining: np})
		return res, s.Stats()
	}
	for _, np := range []bool{false, true} {
		a, sa := run(np)
		b, _ := run(np)
		if !maps.Equal(a.Codes, b.Codes) || a.Accepted != b.Accepted || a.RcptRejected != b.RcptRejected {
			t.Errorf("np=%v: runs differ:\n%+v\n%+v", np, a, b)
		}
		if a.Accepted == 0 || a.Rejected == 0 || a.TempFailed == 0 || a.Failed != 0 {
			t.Errorf("np=%v: want a mix of outcomes: %+v", np, a)
		}
		if sa.Messages != a.Accepted || sa.Unique != a.Delivered || sa.Recipients != a.Delivered {
			t.Errorf("np=%v: sink %+v disagrees with load %+v", np, sa, a)
		}
		if sa.Replies[550] != a.RcptRejected || sa.Replies[452] != a.Codes[452] || sa.Replies[554] < a.Codes[554] {
			t.Errorf("np=%v: sink replies %v, load codes %v rcpt rejected %d", np, sa.Replies, a.Codes, a.RcptRejected)
		}
	}
}

// TestLoadDeferral has one domain answer 421 after every message: the
// session reconnects, and mail to the other domains goes on.
func TestLoadDeferral(t *testing.T) {
	s := newTestSink(t, SinkConfig{Faults: Faults{Domain: map[string]FaultRule{
		"d0001.test": {Data: map[string]float64{"421": 1}}}}})
	res := runLoad(t, LoadConfig{Targets: s.Addrs(), Sessions: 4, Messages: 600, Domains: 5})
	st := s.Stats()
	if res.Accepted+res.TempFailed != 600 || res.Failed != 0 || res.Codes[421] != res.TempFailed ||
		st.Replies[421] != res.TempFailed || res.TempFailed < 60 || st.Messages != res.Accepted {
		t.Errorf("result %+v\nsink %+v", res, st)
	}
	if res.Connections < res.TempFailed { // each 421 costs a connection
		t.Errorf("%d connections for %d 421s", res.Connections, res.TempFailed)
	}
	if st.Domains["d0001.test"] != 0 || st.Unique != res.Delivered {
		t.Errorf("sink domains %v", st.Domains)
	}
}

func TestLoadOpenLoop(t *testing.T) {
	s := newTestSink(t, SinkConfig{})
	for _, arr := range []string{"poisson", "uniform"} {
		res := runLoad(t, LoadConfig{Targets: s.Addrs(), Sessions: 4, Messages: 100000, Rate: 1000,
			Duration: 500 * time.Millisecond, Arrivals: arr, Timeout: 5 * time.Second})
		// About 500 due in 0.5 s (Poisson: sd 22).
		if res.Attempted < 380 || res.Attempted > 620 || res.Accepted != res.Attempted {
			t.Errorf("%s: %+v", arr, res)
		}
		if res.Sojourn.Count != res.Accepted || res.Sojourn.Max < res.Latency.P50 {
			t.Errorf("%s: sojourn %v latency %v", arr, res.Sojourn, res.Latency)
		}
		if res.Elapsed > 500*time.Millisecond+5*time.Second {
			t.Errorf("%s: ran %v", arr, res.Elapsed)
		}
	}
}

func TestLoadPerConn(t *testing.T) {
	s := newTestSink(t, SinkConfig{})
	res := runLoad(t, LoadConfig{Targets: s.Addrs(), Sessions: 2, Messages: 100, PerConn: 5})
	st := s.Stats()
	if res.Accepted != 100 || st.Connections < 20 || st.Connections > 22 || res.Connections != st.Connections {
		t.Errorf("result %+v, sink connections %d", res, st.Connections)
	}
	if st.Replies[221] != st.Connections {
		t.Errorf("%d QUITs for %d connections", st.Replies[221], st.Connections)
	}
}

func TestLoadStartTLS(t *testing.T) {
	s := newTestSink(t, SinkConfig{StartTLS: true})
	res := runLoad(t, LoadConfig{Targets: s.Addrs(), Sessions: 3, Messages: 60, StartTLS: true, PerConn: 10})
	st := s.Stats()
	if res.Accepted != 60 || st.TLS != st.Connections || st.TLS < 6 || st.Unique != 60 {
		t.Errorf("result %+v sink %+v", res, st)
	}
}

func TestLoadGreylist(t *testing.T) {
	s := newTestSink(t, SinkConfig{Faults: Faults{Default: FaultRule{Greylist: true}}})
	res := runLoad(t, LoadConfig{Targets: s.Addrs(), Sessions: 1, Messages: 10, Domains: 1, Users: 1})
	if res.Accepted != 9 || res.TempFailed != 1 || res.Codes[451] != 1 || res.RcptTempFailed != 1 {
		t.Errorf("result %+v", res)
	}
}

func TestLoadConnCapAndSources(t *testing.T) {
	s := newTestSink(t, SinkConfig{Faults: Faults{Default: FaultRule{MaxConnsPerIP: 1}}})
	res := runLoad(t, LoadConfig{Targets: s.Addrs(), Sessions: 3, Messages: 90,
		SourceAddrs: []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"}})
	if res.Accepted != 90 || res.ConnFailures != 0 {
		t.Errorf("with 3 sources: %+v", res)
	}
	// Six sessions from one address: five are refused at each attempt.
	s2 := newTestSink(t, SinkConfig{Faults: Faults{Default: FaultRule{MaxConnsPerIP: 1}}})
	res = runLoad(t, LoadConfig{Targets: s2.Addrs(), Sessions: 6, Messages: 200})
	if res.ConnFailures == 0 || res.Codes[421] == 0 || res.Accepted == 0 || s2.Stats().ConnCapped != res.ConnFailures {
		t.Errorf("one source: %+v, sink capped %d", res, s2.Stats().ConnCapped)
	}
}

// TestLoadBounded checks that a run stops by itself when nothing answers,
// when the server hangs, and when Duration runs out.
func TestLoadBounded(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	_ = ln.Close()
	res := runLoad(t, LoadConfig{Targets: []string{dead}, Sessions: 5, Messages: 50})
	if res.Failed != 50 || res.ConnFailures != 50 || res.Connections != 50 || res.Codes[0] != 50 {
		t.Errorf("refused: %+v", res)
	}

	s := newTestSink(t, SinkConfig{Faults: Faults{Domain: map[string]FaultRule{"d0001.test": {Hang: true}}}})
	start := time.Now()
	res = runLoad(t, LoadConfig{Targets: s.Addrs(), Sessions: 2, Messages: 4, Domains: 1,
		Timeout: 300 * time.Millisecond})
	if res.Failed != 4 || s.Stats().Hung != 4 {
		t.Errorf("hang: %+v", res)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("hang: took %v", took)
	}

	s = newTestSink(t, SinkConfig{Faults: Faults{Default: FaultRule{DataDelay: FixedDelay(20 * time.Millisecond)}}})
	start = time.Now()
	res = runLoad(t, LoadConfig{Targets: s.Addrs(), Sessions: 2, Messages: 1 << 30, Duration: 300 * time.Millisecond,
		Timeout: 2 * time.Second})
	if res.Attempted == 0 || res.Attempted > 100 || res.Accepted != res.Attempted {
		t.Errorf("duration: %+v", res)
	}
	if took := time.Since(start); took > 300*time.Millisecond+2*time.Second {
		t.Errorf("duration: took %v", took)
	}

	// Cancelling the context ends the run early with its error.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	l, err := NewLoad(LoadConfig{Targets: s.Addrs(), Sessions: 2, Messages: 1 << 30, Duration: time.Hour,
		OnAccepted: func(string, []string) { cancel() }})
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	res, err = l.Run(ctx)
	if err == nil || res.Accepted == 0 || res.Attempted > 10 || res.ConnFailures != 0 {
		t.Errorf("cancel: %v %+v", err, res)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("cancel: took %v", took)
	}
	if _, err := l.Run(context.Background()); err == nil {
		t.Error("second Run did not fail")
	}
}

func TestLoadDomainMix(t *testing.T) {
	share := func(mix string) float64 {
		s := newTestSink(t, SinkConfig{})
		runLoad(t, LoadConfig{Targets: s.Addrs(), Sessions: 4, Messages: 2000, Domains: 100, Mix: mix, Seed: 1})
		st := s.Stats()
		top3 := st.Domains[TestDomain(1)] + st.Domains[TestDomain(2)] + st.Domains[TestDomain(3)]
		return float64(top3) / float64(st.Unique)
	}
	if z := share("zipf"); z < 0.5 {
		t.Errorf("zipf: the three largest domains take %.2f of the mail", z)
	}
	if u := share("uniform"); u > 0.1 {
		t.Errorf("uniform: the first three domains take %.2f of the mail", u)
	}
}

func TestLoadConfigValidate(t *testing.T) {
	c := LoadConfig{Targets: []string{"x"}, Sessions: -1, Messages: -1, Duration: -1, PerConn: -1, Rate: -1,
		Arrivals: "bursty", Rcpts: -1, Domains: -1, Mix: "pareto", ZipfS: -1, Users: -1, Timeout: -1,
		SourceAddrs: []string{"me"}, RunTag: "a b", From: "<x>"}
	err := c.Validate()
	if err == nil {
		t.Fatal("no error")
	}
	for _, key := range []string{"targets[0]", "sessions", "messages", "duration", "per_conn", "rate", "arrivals",
		"rcpts", "domains", "mix", "zipf_s", "users", "timeout", "source_addrs[0]", "run_tag", "from"} {
		if !strings.Contains(err.Error(), "load."+key+":") {
			t.Errorf("error does not name load.%s: %v", key, err)
		}
	}
	if err := DefaultLoadConfig().Validate(); err != nil {
		t.Errorf("defaults: %v", err)
	}
	if TestDomain(7) != "d0007.test" || TestDomain(12345) != "d12345.test" {
		t.Error("TestDomain")
	}
}

// BenchmarkLoadToSink measures the harness's own ceiling: load straight
// into the sink over loopback, 1 KiB messages, 50 sessions reusing their
// connections. b.N messages per run; msg/s is the figure to read.
func BenchmarkLoadToSink(b *testing.B) {
	for _, c := range []struct {
		name string
		np   bool
	}{{"pipelining", false}, {"stepwise", true}} {
		b.Run(c.name, func(b *testing.B) {
			s, err := NewSink(SinkConfig{Listen: []string{"127.0.0.1:0"}})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			l, err := NewLoad(LoadConfig{Targets: s.Addrs(), Sessions: 50, Messages: b.N, NoPipelining: c.np,
				Duration: 5 * time.Minute, Timeout: 10 * time.Second})
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			cpu0 := cpuTime()
			b.ResetTimer()
			res, err := l.Run(context.Background())
			b.StopTimer()
			// CPU per message (load and sink together, this process): on a
			// shared machine it is steadier than the rate.
			b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/float64(b.N), "cpu-µs/msg")
			if err != nil || res.Accepted != uint64(b.N) {
				b.Fatalf("%v: accepted %d of %d", err, res.Accepted, b.N)
			}
			b.ReportMetric(res.Rate, "msg/s")
			b.ReportMetric(float64(res.Latency.P99.Microseconds()), "p99-µs")
		})
	}
}

// cpuTime returns the user+system CPU time of this process.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func TestLoadProgress(t *testing.T) {
	s := newTestSink(t, SinkConfig{Faults: Faults{Default: FaultRule{DataDelay: FixedDelay(time.Millisecond)}}})
	l, err := NewLoad(LoadConfig{Targets: s.Addrs(), Sessions: 2, Messages: 200, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	type out struct {
		res LoadResult
		err error
	}
	done := make(chan out, 1)
	go func() {
		res, err := l.Run(context.Background())
		done <- out{res, err}
	}()
	var last LoadProgress
	deadline := time.After(30 * time.Second)
	for running := true; running; {
		select {
		case o := <-done:
			running = false
			if o.err != nil {
				t.Fatal(o.err)
			}
			if p := l.Progress(); p.Attempted != o.res.Attempted || p.Accepted != o.res.Accepted {
				t.Errorf("final progress %+v, result %+v", p, o.res)
			}
		case <-deadline:
			t.Fatal("run did not end")
		case <-time.After(5 * time.Millisecond):
			p := l.Progress()
			if p.Attempted < last.Attempted || p.Accepted < last.Accepted || p.Accepted > p.Attempted {
				t.Fatalf("progress went from %+v to %+v", last, p)
			}
			last = p
		}
	}
}

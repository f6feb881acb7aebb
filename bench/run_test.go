package bench

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"net"
	"net/smtp"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// testRelay is a Target for tests: a tiny store-and-forward MTA made of a
// Sink that keeps every message (the front) and a goroutine that forwards
// each to the route the test DNS gives (TargetEnv.Routes), retrying
// temporary failures every 50 ms. dropEvery > 0 silently drops every
// dropEvery-th message (a lossy MTA); dup > 0 delivers the first dup
// messages twice.
type testRelay struct {
	dropEvery int
	dup       int
	released  chan struct{}

	front *Sink
	stop  chan struct{}
	done  chan struct{}
}

func (r *testRelay) Name() string { return "test-relay" }

func (r *testRelay) Start(ctx context.Context, env TargetEnv) ([]string, error) {
	routes, err := env.Routes(ctx)
	if err != nil {
		return nil, err
	}
	r.front, err = NewSink(SinkConfig{Listen: []string{"127.0.0.1:0"}, Capture: env.Domains()})
	if err != nil {
		return nil, err
	}
	r.stop, r.done = make(chan struct{}), make(chan struct{})
	r.released = make(chan struct{}, 1)
	go r.forward(env, routes)
	return r.front.Addrs(), nil
}

func (r *testRelay) forward(env TargetEnv, routes map[string]string) {
	defer close(r.done)
	next := map[string]int{} // per domain: captured messages forwarded
	n := 0
	for {
		progress := false
		for _, d := range env.Domains() {
			msgs := r.front.Captured(d)
			for i := next[d]; i < len(msgs); i++ {
				m := msgs[i]
				if domainOf(m.Rcpts[0]) != d {
					next[d] = i + 1
					continue
				}
				n++
				if r.dropEvery > 0 && n%r.dropEvery == 0 {
					next[d] = i + 1
					continue
				}
				addr := net.JoinHostPort(routes[d], strconv.Itoa(env.SinkPort))
				if err := smtp.SendMail(addr, nil, m.From, m.Rcpts, m.Raw); err != nil {
					break // temporary: retry later, in order
				}
				if n <= r.dup {
					_ = smtp.SendMail(addr, nil, m.From, m.Rcpts, m.Raw)
				}
				next[d] = i + 1
				progress = true
			}
		}
		if !progress {
			select {
			case <-r.stop:
				return
			case <-r.released:
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
}

func (r *testRelay) Probe(context.Context) Probe {
	return Probe{Process: true, CPU: time.Duration(r.front.Stats().Messages) * time.Millisecond, Queue: true}
}

func (r *testRelay) Released(context.Context) error {
	select {
	case r.released <- struct{}{}:
	default:
	}
	return nil
}

func (r *testRelay) Stop() error {
	if r.front == nil {
		return nil
	}
	close(r.stop)
	<-r.done
	return r.front.Close()
}

func testScenario(t *testing.T, toml string) Scenario {
	t.Helper()
	p := filepath.Join(t.TempDir(), "s.toml")
	if err := os.WriteFile(p, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}
	sc, err := LoadScenario(p)
	if err != nil {
		t.Fatal(err)
	}
	return sc
}

const smallScenario = `
description = "test"
delivery_wait = "20s"
[load]
sessions = 4
messages = 300
size = "uniform(300,3KiB)"
rcpts = 1
domains = 5
seed = 7
[sink]
listen = ["127.0.0.2:2526", "127.0.0.3:2526"]
`

func runIt(t *testing.T, cfg RunConfig) Report {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	if cfg.WorkDir == "" {
		cfg.WorkDir = t.TempDir()
	}
	if cfg.SampleInterval == 0 {
		cfg.SampleInterval = 50 * time.Millisecond
	}
	rep, err := Run(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

func TestRunDirect(t *testing.T) {
	var prog bytes.Buffer
	rep := runIt(t, RunConfig{Scenario: testScenario(t, smallScenario), Target: DirectTarget{}, Progress: &prog})
	a := rep.Accounting
	if !rep.Complete || a.Expected != 300 || a.Delivered != 300 || a.Lost != 0 || a.Duplicates != 0 ||
		rep.Sink.Corrupted != 0 || len(rep.Problems()) != 0 {
		t.Fatalf("report %+v", a)
	}
	if rep.Target != "direct" || rep.Load.Accepted != 300 || rep.InjectionRate <= 0 || rep.DeliveryRate <= 0 ||
		rep.E2E.Count != 300 || rep.Accept.Count != 300 || rep.MeasuredProcess || rep.MeasuredSpool {
		t.Errorf("report %+v", rep)
	}
	if len(rep.Timeline) == 0 || rep.Timeline[len(rep.Timeline)-1].Delivered != 300 {
		t.Errorf("timeline %+v", rep.Timeline)
	}
	if !strings.Contains(prog.String(), "direct: 300 accepted") {
		t.Errorf("progress output %q", prog.String())
	}
	var txt bytes.Buffer
	if err := rep.WriteText(&txt); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"complete: 300 of 300 accepted pairs delivered; lost 0", "not measured",
		"e2e latency", "msg/s end to end"} {
		if !strings.Contains(txt.String(), want) {
			t.Errorf("text lacks %q:\n%s", want, txt.String())
		}
	}
	// The report survives JSON.
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Accounting.Delivered != 300 || len(back.Timeline) != len(rep.Timeline) {
		t.Errorf("after JSON: %+v", back.Accounting)
	}
}

func TestRunRelayLossAndDuplicates(t *testing.T) {
	sc := testScenario(t, strings.Replace(smallScenario, `"20s"`, `"3s"`, 1))
	rep := runIt(t, RunConfig{Scenario: sc, Target: &testRelay{dropEvery: 10, dup: 5}})
	a := rep.Accounting
	if rep.Complete || a.Expected != 300 || a.Lost != 30 || a.Delivered != 270 || a.Duplicates != 5 {
		t.Fatalf("accounting %+v", a)
	}
	if len(a.LostSample) == 0 || len(rep.Problems()) != 2 {
		t.Errorf("problems %v", rep.Problems())
	}
	if !rep.MeasuredProcess || rep.CPUPerMsg != time.Millisecond {
		t.Errorf("probe figures: measured %v, cpu/msg %v", rep.MeasuredProcess, rep.CPUPerMsg)
	}
}

const backlogScenario = `
description = "test backlog"
delivery_wait = "20s"
undeliverable = ["d0003.test"]
[release]
after = "300ms"
[load]
sessions = 4
messages = 200
size = "1KiB"
domains = 3
seed = 3
[sink]
listen = ["127.0.0.2:2526"]
[sink.faults.domain."d0001.test"]
rcpt = { "451" = 1.0 }
[sink.faults.domain."d0003.test"]
rcpt = { "451" = 1.0 }
[release.faults.domain."d0003.test"]
rcpt = { "451" = 1.0 }
`

func TestRunReleaseAndUndeliverable(t *testing.T) {
	relay := &testRelay{}
	rep := runIt(t, RunConfig{Scenario: testScenario(t, backlogScenario), Target: relay})
	a := rep.Accounting
	if !rep.Complete || a.Lost != 0 || a.Excluded == 0 || a.Expected+a.Excluded != 200 {
		t.Fatalf("accounting %+v", a)
	}
	if rep.Released < 300*time.Millisecond || rep.DrainRate <= 0 {
		t.Errorf("released %v, drain %v", rep.Released, rep.DrainRate)
	}
	// d0001 could only arrive after the release.
	if n := rep.Sink.Domains["d0001.test"]; n == 0 || n > a.Expected {
		t.Errorf("d0001 deliveries %d", n)
	}
	if rep.Sink.Domains["d0003.test"] != 0 {
		t.Errorf("undeliverable domain delivered: %v", rep.Sink.Domains)
	}
	var txt bytes.Buffer
	_ = rep.WriteText(&txt)
	if !strings.Contains(txt.String(), "after the release") || !strings.Contains(txt.String(), "not waited for") {
		t.Errorf("text:\n%s", txt.String())
	}
}

func TestRunTargetFails(t *testing.T) {
	sc := testScenario(t, smallScenario)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Nothing listens there: the external target never becomes ready.
	port, err := freePort("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	_, err = Run(ctx, RunConfig{Scenario: sc, WorkDir: t.TempDir(),
		Target: &ExternalTarget{Addr: "127.0.0.1:" + strconv.Itoa(port), StartTimeout: 300 * time.Millisecond}})
	if !errors.Is(err, ErrTargetNotReady) {
		t.Errorf("err = %v", err)
	}
	// A binary that exits at once.
	_, err = Run(ctx, RunConfig{Scenario: sc, WorkDir: t.TempDir(), Target: &HermodTarget{Binary: "/bin/false"}})
	if !errors.Is(err, ErrTargetExited) {
		t.Errorf("err = %v", err)
	}
	if _, err := Run(ctx, RunConfig{}); err == nil {
		t.Error("Run without a scenario: no error")
	}
	// The sink cannot listen where the scenario says: an error, and what
	// was started (the DNS) is closed again.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	sc2 := sc
	sc2.DNS.Listen = "127.0.0.1:0"
	sc2.Sink.Listen = []string{busy.Addr().String()}
	if _, err := Run(ctx, RunConfig{Scenario: sc2, KeepPorts: true, WorkDir: t.TempDir(), Target: DirectTarget{}}); err == nil ||
		!strings.Contains(err.Error(), "sink listen") {
		t.Errorf("err = %v", err)
	}
}

func TestRunCanceled(t *testing.T) {
	sc := testScenario(t, strings.Replace(smallScenario, "messages = 300", "messages = 1000000\nrate = 100.0", 1))
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	rep, err := Run(ctx, RunConfig{Scenario: sc, Target: DirectTarget{}, WorkDir: t.TempDir()})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v", err)
	}
	if time.Since(start) > 10*time.Second || rep.Complete {
		t.Errorf("took %v, complete %v", time.Since(start), rep.Complete)
	}
}

func TestSinkCertCoversMXHosts(t *testing.T) {
	sc := testScenario(t, smallScenario+`
starttls = true
[[dns.zone]]
name = "big.test"
mx = [{ host = "mx.provider.example", pref = 10, addrs = ["127.0.0.2"] }]
`)
	cfg := RunConfig{Scenario: sc, WorkDir: t.TempDir()}
	cfg.EnsureDefaults()
	r, err := newRig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer r.close()
	if r.caFile == "" {
		t.Fatal("no CA file")
	}
	pemBytes, err := os.ReadFile(r.caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemBytes) {
		t.Fatal("bad PEM")
	}
	cert, err := x509.ParseCertificate(r.sink.tlsConf.Certificates[0].Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"mx1.d0005.test", "mx.provider.example", "mx1.sender.test"} {
		if _, err := cert.Verify(x509.VerifyOptions{DNSName: name, Roots: pool}); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := cert.Verify(x509.VerifyOptions{DNSName: "mx1.d0006.test", Roots: pool}); err == nil {
		t.Error("certificate valid for a domain the DNS does not serve")
	}
}

func TestRoutes(t *testing.T) {
	sc := testScenario(t, smallScenario+`
[dns]
mx_per_domain = 2
[[dns.zone]]
name = "d0002.test"
null_mx = true
[[dns.zone]]
name = "d0003.test"
nxdomain = true
[[dns.zone]]
name = "d0004.test"
a = ["127.0.0.9"]
`)
	d := newTestDNS(t, sc.DNS)
	env := TargetEnv{Scenario: sc, DNS: d.Addr()}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	routes, err := env.Routes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"d0001.test": "127.0.0.2", "d0005.test": "127.0.0.2", "d0004.test": "127.0.0.9",
		"sender.test": "127.0.0.3"}
	for dom, ip := range want {
		if routes[dom] != ip {
			t.Errorf("%s: %q, want %q (all: %v)", dom, routes[dom], ip, routes)
		}
	}
	for _, dom := range []string{"d0002.test", "d0003.test"} {
		if _, ok := routes[dom]; ok {
			t.Errorf("%s routed: %v", dom, routes)
		}
	}
}

func TestRunDirectTLS(t *testing.T) {
	sc := testScenario(t, strings.Replace(smallScenario, "seed = 7", "seed = 7\nstarttls = true", 1)+
		"starttls = true\n")
	rep := runIt(t, RunConfig{Scenario: sc, Target: DirectTarget{}})
	if !rep.Complete || rep.Load.TLSConnections != 4 || rep.Sink.TLS != 4 {
		t.Errorf("complete %v, load TLS %d, sink TLS %d", rep.Complete, rep.Load.TLSConnections, rep.Sink.TLS)
	}
	var txt bytes.Buffer
	_ = rep.WriteText(&txt)
	if !strings.Contains(txt.String(), "load→target 4 of 4 connections") {
		t.Errorf("text:\n%s", txt.String())
	}
}

func TestWaitQuiet(t *testing.T) {
	var prog bytes.Buffer
	cfg := RunConfig{Scenario: testScenario(t, smallScenario), WorkDir: t.TempDir(), QuietWait: time.Nanosecond,
		QuietBusy: 1e-12, Progress: &prog}
	cfg.EnsureDefaults()
	r, err := newRig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer r.close()
	r.quietSample = 100 * time.Millisecond
	// This test itself keeps a CPU busy, so the machine is never that
	// quiet: one sample, then it gives up and says so.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
		}
	}()
	start := time.Now()
	busy := r.waitQuiet(context.Background(), "x")
	if busy <= 0 || time.Since(start) > 5*time.Second || !strings.Contains(prog.String(), "running anyway") {
		t.Errorf("busy %v after %v, progress %q", busy, time.Since(start), prog.String())
	}
	r.cfg.QuietBusy, r.cfg.QuietWait = 1.01, time.Minute
	if busy := r.waitQuiet(context.Background(), "x"); busy <= 0 || busy >= 1.01 {
		t.Errorf("busy %v", busy)
	}
}

package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// Errors of targets.
var (
	// ErrTargetNotReady means a target did not become ready (its SMTP port
	// or health check did not answer) within its start timeout.
	ErrTargetNotReady = errors.New("bench: target not ready")
	// ErrTargetExited means a target process ended while it was needed.
	ErrTargetExited = errors.New("bench: target exited")
)

// Target is an MTA under test as a run sees it: something that, once
// started, accepts SMTP on some addresses and relays the scenario's mail
// to the sink (or, for DirectTarget, the sink itself).
//
// A run calls Start once, then Probe from one goroutine any number of
// times, Released at most once (when the scenario's release happens) and
// Stop once, even after a failed Start. Implementations need not be safe
// for concurrent use beyond that.
type Target interface {
	// Name is a short label for reports: "hermod", "postfix", "direct"…
	Name() string
	// Start makes the target ready to relay per env and returns the SMTP
	// addresses the load should use.
	Start(ctx context.Context, env TargetEnv) ([]string, error)
	// Probe reads the target's resource counters now. It must return
	// within a few seconds; what it cannot measure stays zero (see the
	// Known flags of Probe).
	Probe(ctx context.Context) Probe
	// Released is called when the sink's faults are released (the
	// backlog scenario), for targets that must be told to retry now.
	Released(ctx context.Context) error
	// Stop stops what Start started and releases its resources.
	Stop() error
}

// TargetEnv is what a target needs to know to relay a scenario's mail to
// the sink.
type TargetEnv struct {
	// Scenario is the scenario being run (defaults filled in).
	Scenario Scenario
	// DNS is the address (UDP and TCP) of the test DNS server.
	DNS string
	// SinkAddrs are the sink's SMTP addresses; SinkPort their common port.
	SinkAddrs []string
	SinkPort  int
	// CAFile is a PEM file holding the sink's STARTTLS certificate (valid
	// for every MX host name of the test DNS); "" when the sink has no
	// STARTTLS.
	CAFile string
	// WorkDir is a directory the target may use for this run (config,
	// spool, logs); the run removes it afterwards.
	WorkDir string
	// Logger receives the target's notes. Never nil.
	Logger *slog.Logger
	// Note, when set, receives one-line human notes ("postfix: started").
	Note func(string)
}

func (e TargetEnv) note(format string, args ...any) {
	if e.Note != nil {
		e.Note(fmt.Sprintf(format, args...))
	}
}

// Domains returns every domain the scenario's mail can go to: the load's
// recipient domains and the DNS's extra domains (the sender's, for
// bounces).
func (e TargetEnv) Domains() []string {
	var out []string
	if len(e.Scenario.Load.DomainList) > 0 {
		out = append(out, e.Scenario.Load.DomainList...)
	} else {
		for i := 1; i <= e.Scenario.Load.Domains; i++ {
			out = append(out, TestDomain(i))
		}
	}
	for _, d := range e.Scenario.DNS.Extra {
		if !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	return out
}

// Routes asks the test DNS, for every domain of Domains, for the address
// of its most preferred MX host (or of the domain itself when it has no
// MX), the way an MTA would. Domains without an address (NXDOMAIN, null
// MX, SERVFAIL) are left out. It is for targets that cannot be pointed at
// the test DNS and take a static route table instead.
func (e TargetEnv) Routes(ctx context.Context) (map[string]string, error) {
	c := &dns.Client{Timeout: 2 * time.Second}
	ask := func(name string, t uint16) (*dns.Msg, error) {
		m := new(dns.Msg)
		m.SetQuestion(dns.Fqdn(name), t)
		r, _, err := c.ExchangeContext(ctx, m, e.DNS)
		if err != nil {
			return nil, fmt.Errorf("bench: routes: %s %s: %w", name, dns.TypeToString[t], err)
		}
		return r, nil
	}
	addrOf := func(host string, extra []dns.RR) (string, error) {
		for _, rr := range extra {
			if a, ok := rr.(*dns.A); ok && strings.EqualFold(a.Hdr.Name, dns.Fqdn(host)) {
				return a.A.String(), nil
			}
		}
		r, err := ask(host, dns.TypeA)
		if err != nil {
			return "", err
		}
		for _, rr := range r.Answer {
			if a, ok := rr.(*dns.A); ok {
				return a.A.String(), nil
			}
		}
		return "", nil
	}
	out := map[string]string{}
	for _, d := range e.Domains() {
		r, err := ask(d, dns.TypeMX)
		if err != nil {
			return nil, err
		}
		if r.Rcode != dns.RcodeSuccess {
			continue
		}
		var mxs []*dns.MX
		for _, rr := range r.Answer {
			if mx, ok := rr.(*dns.MX); ok {
				mxs = append(mxs, mx)
			}
		}
		host := d
		if len(mxs) > 0 {
			sort.SliceStable(mxs, func(i, j int) bool { return mxs[i].Preference < mxs[j].Preference })
			if mxs[0].Mx == "." {
				continue // null MX
			}
			host = mxs[0].Mx
		}
		a, err := addrOf(host, r.Extra)
		if err != nil {
			return nil, err
		}
		if a != "" {
			out[d] = a
		}
	}
	return out, nil
}

// Probe is a snapshot of a target's resource counters. Counters are
// cumulative; a run reports the difference between two probes.
type Probe struct {
	// Process says CPU, RSS, PeakRSS and WriteBytes were read from /proc.
	Process bool `json:"process"`
	// CPU is the user+system time of the target's processes (see
	// TreeUsage).
	CPU time.Duration `json:"cpu_ns"`
	// RSS is the resident size now (for several processes, the sum of
	// their proportional set sizes: see TreeUsage.Memory); PeakRSS the
	// largest known (a lone process's VmHWM, or RSS when larger).
	RSS     uint64 `json:"rss"`
	PeakRSS uint64 `json:"peak_rss"`
	// WriteBytes is what the target's processes sent to storage.
	WriteBytes uint64 `json:"write_bytes"`
	// Spool says Fsyncs, SpoolBytes and Queued were read from the
	// target's metrics (Hermod's /metrics).
	Spool bool `json:"spool"`
	// Fsyncs counts syncs of the spool's write-ahead log: what makes an
	// accepted message durable.
	Fsyncs uint64 `json:"fsyncs"`
	// SpoolBytes is the spool's size on disk now.
	SpoolBytes uint64 `json:"spool_bytes"`
	// Queue says Queued was measured; Queued is the number of messages in
	// the target's queue now.
	Queue  bool  `json:"queue"`
	Queued int64 `json:"queued"`
}

// probeProcess fills the process figures of p from pid's process tree.
func probeProcess(p *Probe, pid int) {
	if pid <= 0 {
		return
	}
	u, err := processTree(pid)
	if err != nil {
		return
	}
	p.Process = true
	p.CPU, p.RSS, p.WriteBytes = u.CPU, u.Memory(), u.WriteBytes
	p.PeakRSS = p.RSS
	if u.Procs == 1 {
		p.PeakRSS = max(u.HWM, p.RSS)
	}
}

// DirectTarget is no MTA at all: the load goes straight into the sink, at
// the addresses the test DNS gives as MX hosts. It measures the harness's
// own ceiling on this machine; there is no target process to probe.
type DirectTarget struct{}

// Name returns "direct".
func (DirectTarget) Name() string { return "direct" }

// Start returns the sink's MX addresses.
func (DirectTarget) Start(_ context.Context, env TargetEnv) ([]string, error) {
	var out []string
	for _, ip := range env.Scenario.DNS.MX {
		out = append(out, net.JoinHostPort(ip, strconv.Itoa(env.SinkPort)))
	}
	if len(out) == 0 {
		out = env.SinkAddrs
	}
	return out, nil
}

// Probe measures nothing: the sink is part of the harness.
func (DirectTarget) Probe(context.Context) Probe { return Probe{} }

// Released does nothing.
func (DirectTarget) Released(context.Context) error { return nil }

// Stop does nothing.
func (DirectTarget) Stop() error { return nil }

// ExternalTarget is an MTA already running, configured by hand to resolve
// through the run's test DNS (or to route the scenario's domains to the
// sink) and to deliver on the sink's port; run it with
// RunConfig.KeepPorts so that those stay where the scenario says.
type ExternalTarget struct {
	// Addr is its SMTP address (host:port). Required.
	Addr string
	// Label names it in reports. Default: "external".
	Label string
	// PID, when > 0, is the process whose tree's CPU and memory are
	// measured. Default: 0 (not measured).
	PID int
	// HTTP, when set, is the address of a Hermod-style HTTP endpoint:
	// /healthz is awaited at start and /metrics read for fsyncs and spool
	// size. Default: "".
	HTTP string
	// StartTimeout bounds the wait for the target to answer. Default: 30s.
	StartTimeout time.Duration
}

// Name returns Label or "external".
func (t *ExternalTarget) Name() string {
	if t.Label != "" {
		return t.Label
	}
	return "external"
}

// Start waits until the target accepts TCP connections (and /healthz
// answers 200 when HTTP is set).
func (t *ExternalTarget) Start(ctx context.Context, env TargetEnv) ([]string, error) {
	if _, _, err := net.SplitHostPort(t.Addr); err != nil {
		return nil, fmt.Errorf("bench: external target %q: %w", t.Addr, err)
	}
	timeout := t.StartTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := waitTCP(ctx, t.Addr); err != nil {
		return nil, err
	}
	if t.HTTP != "" {
		if err := waitHealthy(ctx, "http://"+t.HTTP+"/healthz", nil); err != nil {
			return nil, err
		}
	}
	return []string{t.Addr}, nil
}

// Probe reads /proc for PID and /metrics for HTTP.
func (t *ExternalTarget) Probe(ctx context.Context) Probe {
	var p Probe
	probeProcess(&p, t.PID)
	if t.HTTP != "" {
		scrapeHermod(ctx, &p, "http://"+t.HTTP+"/metrics")
	}
	return p
}

// Released does nothing.
func (t *ExternalTarget) Released(context.Context) error { return nil }

// Stop does nothing: the target was running before and keeps running.
func (t *ExternalTarget) Stop() error { return nil }

// waitTCP waits until addr accepts a connection or ctx ends.
func waitTCP(ctx context.Context, addr string) error {
	var last error
	for {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			_ = c.Close()
			return nil
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %s: %v", ErrTargetNotReady, addr, last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// waitHealthy polls url until it answers 200, ctx ends or exited (when
// not nil) is closed.
func waitHealthy(ctx context.Context, url string, exited <-chan struct{}) error {
	hc := &http.Client{Timeout: 2 * time.Second}
	var last error
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := hc.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = errors.New(resp.Status)
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %s: %v", ErrTargetNotReady, url, last)
		case <-exited:
			return ErrTargetExited
		case <-time.After(50 * time.Millisecond):
		}
	}
}

package bench

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// RunConfig configures Run.
type RunConfig struct {
	// Scenario is what to run (see LoadScenario). Required.
	Scenario Scenario
	// Target is the MTA under test. Default: a HermodTarget on the binary
	// FindHermod returns.
	Target Target
	// Messages, when > 0, replaces the scenario's load.messages.
	// Default: 0.
	Messages int
	// KeepPorts runs the test DNS and the sink on the scenario's addresses
	// exactly as written, for a target configured by hand (ExternalTarget).
	// Otherwise they listen on the same IPs with free ports, so that runs
	// never collide with something already listening. Default: false.
	KeepPorts bool
	// WorkDir is where each run makes its temporary directory (target
	// configuration, spool, logs). Default: os.TempDir().
	WorkDir string
	// KeepWorkDir leaves that directory in place after the run.
	// Default: false.
	KeepWorkDir bool
	// SampleInterval is the period of the timeline samples and of the
	// progress line. Default: 500ms.
	SampleInterval time.Duration
	// QuietWait, when > 0, makes each run first wait (at most this long)
	// until the machine is quiet: less than QuietBusy of all CPUs busy
	// over a 2 s sample. Other work on a shared machine otherwise
	// contaminates the figures. Default: 0 (do not wait).
	QuietWait time.Duration
	// QuietBusy is the busy share under which the machine counts as
	// quiet. Default: 0.15.
	QuietBusy float64
	// Progress receives a progress line (rewritten in place on a
	// terminal, a plain line every 5 s otherwise) and notes. Default: nil
	// (silent).
	Progress io.Writer
	// Logger receives debug details of the load and the sink. Default: nil
	// (discard).
	Logger *slog.Logger
}

// EnsureDefaults fills zero fields with their defaults.
func (c *RunConfig) EnsureDefaults() {
	if c.Target == nil {
		c.Target = &HermodTarget{}
	}
	if c.WorkDir == "" {
		c.WorkDir = os.TempDir()
	}
	if c.SampleInterval == 0 {
		c.SampleInterval = 500 * time.Millisecond
	}
	if c.QuietBusy == 0 {
		c.QuietBusy = 0.15
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Validate reports every problem at once.
func (c RunConfig) Validate() error {
	var errs []error
	if c.Scenario.Name == "" {
		errs = append(errs, errors.New("scenario: required (see LoadScenario)"))
	} else if err := c.Scenario.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.Messages < 0 {
		errs = append(errs, errors.New("messages: must be >= 0"))
	}
	if c.SampleInterval < 10*time.Millisecond {
		errs = append(errs, errors.New("sample_interval: must be >= 10ms"))
	}
	if c.QuietWait < 0 {
		errs = append(errs, errors.New("quiet_wait: must be >= 0"))
	}
	if c.QuietBusy <= 0 || c.QuietBusy > 1 {
		errs = append(errs, errors.New("quiet_busy: must be in (0, 1]"))
	}
	return errors.Join(errs...)
}

// Report is the outcome of one run of a scenario against one target.
//
// Figures the run could not measure are zero, and the Measured flags say
// which groups were measured. Per-message figures divide by the messages
// the target accepted.
type Report struct {
	Scenario    string `json:"scenario"`
	Description string `json:"description,omitempty"`
	Target      string `json:"target"`
	// Role is RoleTarget or RolePeer in a Comparison, "" in a single run.
	Role   string    `json:"role,omitempty"`
	RunTag string    `json:"run_tag"`
	Start  time.Time `json:"start"`
	Host   HostInfo  `json:"host"`
	// Notes are remarks about the run (scaled message counts, errors while
	// stopping the target…).
	Notes []string `json:"notes,omitempty"`

	// The load as run.
	Sessions int    `json:"sessions"`
	Messages int    `json:"messages"`
	Rcpts    int    `json:"rcpts"`
	Size     string `json:"size"`
	OpenLoop bool   `json:"open_loop"`
	// Rate is the open loop's arrival rate (msg/s), 0 in a closed loop.
	Rate float64 `json:"rate,omitempty"`

	// Complete says every accepted pair (Undeliverable domains aside)
	// reached the sink before the scenario's delivery_wait ran out.
	Complete bool `json:"complete"`
	// Load is the load generator's result, Sink the sink's counters and
	// Accounting the ledger's check of one against the other.
	Load       LoadResult `json:"load"`
	Sink       SinkStats  `json:"sink"`
	Accounting Accounting `json:"accounting"`

	// InjectionRate is messages accepted per second of the load.
	InjectionRate float64 `json:"injection_rate"`
	// DeliveryRate is accepted pairs delivered per second, from the start
	// of the load to the last first delivery (DeliverySpan): the
	// end-to-end rate. With one recipient per message it is in msg/s.
	DeliveryRate float64       `json:"delivery_rate"`
	DeliverySpan time.Duration `json:"delivery_span_ns"`
	// Released is when the sink's faults were released, after the start
	// of the load (0: no release); DrainRate is pairs first delivered from
	// then on per second, until the last delivery.
	Released  time.Duration `json:"released_ns,omitempty"`
	DrainRate float64       `json:"drain_rate,omitempty"`
	// E2E is the sink's arrival time minus X-Bench-Sent, per accepted
	// pair at its first delivery; Accept is the load's MAIL-to-250 time
	// per accepted message.
	E2E    Latency `json:"e2e_latency"`
	Accept Latency `json:"accept_latency"`

	// Target resources over the run (start of the load to the last
	// delivery or the end of the wait).
	MeasuredProcess bool          `json:"measured_process"`
	TargetCPU       time.Duration `json:"target_cpu_ns"`
	CPUPerMsg       time.Duration `json:"cpu_per_msg_ns"`
	PeakRSS         uint64        `json:"peak_rss"`
	// DiskWritePerMsg is bytes the target's processes sent to storage per
	// message (/proc/PID/io write_bytes, exited children included).
	DiskWritePerMsg float64 `json:"disk_write_per_msg"`
	MeasuredSpool   bool    `json:"measured_spool"`
	Fsyncs          uint64  `json:"fsyncs"`
	FsyncsPerMsg    float64 `json:"fsyncs_per_msg"`
	SpoolPeakBytes  uint64  `json:"spool_peak_bytes"`
	// SpoolBytesPerMsg is the spool's size when the queue was longest
	// over the number of messages queued then (QueuePeak): what a queued
	// message costs on disk, WAL and compaction debt included. It is left
	// 0 when the queue never reached 1000 messages (the spool's fixed
	// overhead would dominate).
	SpoolBytesPerMsg float64 `json:"spool_bytes_per_msg"`
	QueuePeak        int64   `json:"queue_peak"`
	// QueuedAtEnd is the target's queue when the run ended (-1 when not
	// measured): pairs not delivered by then may still be queued (late)
	// rather than lost.
	QueuedAtEnd int64 `json:"queued_at_end"`

	// The machine during the run: CPU time of the harness itself (load
	// generator, sink and DNS), the share of all CPUs busy, the CPU time
	// of everything that is neither target nor harness (noise from other
	// work on a shared machine), and disk flush requests per message
	// (whole disks, machine-wide).
	HarnessCPU       time.Duration `json:"harness_cpu_ns"`
	HarnessCPUPerMsg time.Duration `json:"harness_cpu_per_msg_ns"`
	MachineBusy      float64       `json:"machine_busy"`
	// BusyBefore is the busy share of the machine just before the run
	// (measured when RunConfig.QuietWait > 0, else 0).
	BusyBefore        float64       `json:"busy_before,omitempty"`
	OtherCPU          time.Duration `json:"other_cpu_ns"`
	DiskFlushesPerMsg float64       `json:"disk_flushes_per_msg"`

	// Timeline holds one sample per SampleInterval.
	Timeline []Sample `json:"timeline"`
}

// minQueueForSpoolPerMsg is the queue length from which
// Report.SpoolBytesPerMsg is computed.
const minQueueForSpoolPerMsg = 1000

// Lost is the number of accepted pairs never delivered.
func (r Report) Lost() uint64 { return r.Accounting.Lost }

// Problems lists what went wrong for correctness: pairs lost, corrupted
// messages, duplicates. Empty means the target delivered every accepted
// pair once and intact.
func (r Report) Problems() []string {
	var out []string
	if r.Accounting.Lost > 0 {
		eg := strings.Join(r.Accounting.LostSample[:min(3, len(r.Accounting.LostSample))], ", ")
		if r.QueuedAtEnd > 0 {
			out = append(out, fmt.Sprintf("%d accepted pairs not delivered before the end of the run, while the "+
				"target still queued %d messages (late or lost), e.g. %s", r.Accounting.Lost, r.QueuedAtEnd, eg))
		} else {
			out = append(out, fmt.Sprintf("%d accepted pairs never delivered (lost), e.g. %s", r.Accounting.Lost, eg))
		}
	}
	if r.Sink.Corrupted > 0 {
		out = append(out, fmt.Sprintf("%d messages arrived corrupted", r.Sink.Corrupted))
	}
	if r.Accounting.Duplicates > 0 {
		out = append(out, fmt.Sprintf("%d duplicate deliveries", r.Accounting.Duplicates))
	}
	return out
}

// Sample is one point of a run's timeline.
type Sample struct {
	// T is seconds since the start of the load.
	T float64 `json:"t"`
	// Accepted messages and Delivered distinct pairs so far.
	Accepted  uint64 `json:"accepted"`
	Delivered uint64 `json:"delivered"`
	// AcceptRate and DeliveryRate are per second since the previous
	// sample.
	AcceptRate   float64 `json:"accept_rate"`
	DeliveryRate float64 `json:"delivery_rate"`
	// E2E percentiles of the messages that arrived since the previous
	// sample, in milliseconds (0 when none arrived).
	E2EP50 float64 `json:"e2e_p50_ms"`
	E2EP99 float64 `json:"e2e_p99_ms"`
	E2EMax float64 `json:"e2e_max_ms"`
	// CPU is the target's CPU use since the previous sample (1 = one
	// core); RSS, Queued and SpoolBytes are the target's now (0 when not
	// measured).
	CPU        float64 `json:"cpu"`
	RSS        uint64  `json:"rss"`
	Queued     int64   `json:"queued"`
	SpoolBytes uint64  `json:"spool_bytes"`
}

// Run runs cfg.Scenario once against cfg.Target: it starts the test DNS
// and the sink, starts the target, sends the load (each accepted pair
// recorded in a Ledger), applies the scenario's release, waits until
// every accepted pair has arrived or delivery_wait has passed, stops the
// target and reports.
//
// Everything is bounded: the load by its message count and duration, the
// wait by delivery_wait, target start and stop by their timeouts. When ctx
// ends, Run stops early and returns what it measured with ctx's error. A
// target that fails to start is an error; lost or corrupted mail is not
// (see Report.Problems).
func Run(ctx context.Context, cfg RunConfig) (Report, error) {
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return Report{}, err
	}
	r, err := newRig(cfg)
	if err != nil {
		return Report{}, err
	}
	defer r.close()
	return r.run(ctx, cfg.Target, cfg.Messages, nil)
}

// rig is a scenario's test DNS and sink, started once for one or several
// runs (Compare alternates targets on one rig).
type rig struct {
	cfg      RunConfig
	sc       Scenario
	dir      string // for the sink's certificate
	dns      *DNS
	sink     *Sink
	sinkPort int
	caFile   string
	prog     *progress
	host     HostInfo
	// quietSample is the sample of waitQuiet (2 s; shorter in tests).
	quietSample time.Duration
}

func newRig(cfg RunConfig) (_ *rig, err error) {
	r := &rig{cfg: cfg, sc: cfg.Scenario, prog: newProgress(cfg.Progress), host: Host(), quietSample: 2 * time.Second}
	r.dir, err = os.MkdirTemp(cfg.WorkDir, "hermod-bench-rig-")
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			r.close() // what was started before the failure
		}
	}()
	dcfg := r.sc.DNS
	dcfg.Logger = cfg.Logger
	if !cfg.KeepPorts {
		h, _, _ := net.SplitHostPort(dcfg.Listen)
		dcfg.Listen = net.JoinHostPort(h, "0")
	}
	if r.dns, err = NewDNS(dcfg); err != nil {
		return nil, err
	}
	scfg := r.sc.Sink
	scfg.Logger = cfg.Logger
	if scfg.StartTLS && scfg.TLSCert == "" {
		if scfg.TLSCert, scfg.TLSKey, err = r.sinkCert(); err != nil {
			return nil, err
		}
	}
	if cfg.KeepPorts {
		r.sink, err = NewSink(scfg)
	} else {
		r.sink, err = newSinkFreePort(scfg)
	}
	if err != nil {
		return nil, err
	}
	_, p, _ := net.SplitHostPort(r.sink.Addrs()[0])
	r.sinkPort, _ = strconv.Atoi(p)
	if pem := r.sink.CertPEM(); pem != nil {
		r.caFile = filepath.Join(r.dir, "sink-ca.pem")
		if err := os.WriteFile(r.caFile, pem, 0o644); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// newSinkFreePort starts the sink on its listen IPs with one port free on
// all of them (every MX is dialled on the same port), trying a few.
func newSinkFreePort(cfg SinkConfig) (*Sink, error) {
	var ips []string
	for _, a := range cfg.Listen {
		h, _, err := net.SplitHostPort(a)
		if err != nil {
			return nil, err
		}
		ips = append(ips, h)
	}
	var last error
	for range 10 {
		port, err := freePort(ips[0])
		if err != nil {
			return nil, fmt.Errorf("bench: sink: %w", err)
		}
		c := cfg
		c.Listen = nil
		for _, ip := range ips {
			c.Listen = append(c.Listen, net.JoinHostPort(ip, strconv.Itoa(port)))
		}
		s, err := NewSink(c)
		if err == nil {
			return s, nil
		}
		last = err
	}
	return nil, last
}

// sinkCert makes a self-signed certificate valid for every MX host name
// the test DNS serves (so that a target verifying STARTTLS against the
// sink's CA accepts it) and writes it and its key to the rig's directory.
func (r *rig) sinkCert() (certFile, keyFile string, err error) {
	names := []string{r.sc.Sink.Hostname, "localhost"}
	add := func(d string) {
		d = strings.TrimSuffix(strings.ToLower(d), ".")
		for _, n := range []string{d, "*." + d} {
			if !slices.Contains(names, n) {
				names = append(names, n)
			}
		}
	}
	for i := 1; i <= r.sc.DNS.Domains; i++ {
		add(TestDomain(i))
	}
	for _, d := range append(append([]string(nil), r.sc.DNS.Extra...), r.sc.Load.DomainList...) {
		add(d)
	}
	for _, z := range r.sc.DNS.Zones {
		add(z.Name)
		for _, mx := range z.MX {
			add(mx.Host)
		}
	}
	var ips []net.IP
	for _, a := range r.sc.Sink.Listen {
		if h, _, err := net.SplitHostPort(a); err == nil {
			if ip := net.ParseIP(h); ip != nil {
				ips = append(ips, ip)
			}
		}
	}
	cert, certPEM, err := selfSigned(names, ips)
	if err != nil {
		return "", "", err
	}
	keyPEM, err := pemKey(cert.PrivateKey)
	if err != nil {
		return "", "", err
	}
	certFile, keyFile = filepath.Join(r.dir, "sink-cert.pem"), filepath.Join(r.dir, "sink-key.pem")
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		return "", "", err
	}
	return certFile, keyFile, nil
}

// pemKey returns key in PKCS #8 PEM.
func pemKey(key crypto.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func (r *rig) close() {
	if r.sink != nil {
		_ = r.sink.Close()
	}
	if r.dns != nil {
		_ = r.dns.Close()
	}
	if r.dir != "" {
		_ = os.RemoveAll(r.dir)
	}
}

// run runs the scenario once against t with a fresh sink state and run
// tag. messages > 0 replaces the load's message count; notes are added to
// the report.
func (r *rig) run(ctx context.Context, t Target, messages int, notes []string) (rep Report, err error) {
	sc := r.sc
	r.sink.Reset()
	if err := r.sink.SetFaults(sc.Sink.Faults); err != nil {
		return Report{}, err
	}
	busyBefore := 0.0
	if r.cfg.QuietWait > 0 {
		busyBefore = r.waitQuiet(ctx, t.Name())
	}
	dir, err := os.MkdirTemp(r.cfg.WorkDir, "hermod-bench-"+t.Name()+"-")
	if err != nil {
		return Report{}, err
	}
	if r.cfg.KeepWorkDir {
		r.prog.note(t.Name() + ": work dir " + dir + " (kept)")
	} else {
		defer os.RemoveAll(dir)
	}
	env := TargetEnv{
		Scenario: sc, DNS: r.dns.Addr(), SinkAddrs: r.sink.Addrs(), SinkPort: r.sinkPort, CAFile: r.caFile,
		WorkDir: dir, Logger: r.cfg.Logger, Note: r.prog.note,
	}
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		if serr := t.Stop(); serr != nil {
			rep.Notes = append(rep.Notes, "stopping the target: "+serr.Error())
			if err == nil {
				err = serr
			}
		}
	}
	defer stop()
	addrs, err := t.Start(ctx, env)
	if err != nil {
		return Report{}, fmt.Errorf("bench: start %s: %w", t.Name(), err)
	}

	lc := sc.Load
	lc.Targets = addrs
	lc.RunTag = ""
	if messages > 0 {
		lc.Messages = messages
	}
	ledger := NewLedger()
	lc.OnAccepted = ledger.Record
	lc.Logger = r.cfg.Logger
	load, err := NewLoad(lc)
	if err != nil {
		return Report{}, err
	}
	lc = load.Config()
	rep = Report{
		Scenario: sc.Name, Description: sc.Description, Target: t.Name(), RunTag: lc.RunTag, Host: r.host,
		Notes: notes, Sessions: lc.Sessions, Messages: lc.Messages, Rcpts: lc.Rcpts, Size: lc.Size.String(),
		OpenLoop: lc.Rate > 0, Rate: lc.Rate, BusyBefore: busyBefore,
	}

	p0 := t.Probe(ctx)
	self0, _ := readProcStat(0)
	m0, _ := readMachineCPU()
	f0 := diskFlushes()
	start := time.Now()
	smp := &sampler{r: r, t: t, load: load, start: start, prev: p0, prevAt: start, label: t.Name() + " " + sc.Name}
	smpCtx, smpCancel := context.WithCancel(ctx)
	smpDone := make(chan struct{})
	go func() {
		defer close(smpDone)
		smp.loop(smpCtx, r.cfg.SampleInterval)
	}()
	stopSampler := func() {
		smpCancel()
		<-smpDone
	}

	res, lerr := load.Run(ctx)
	loadEnd := time.Now()
	rep.Start = res.Start
	rep.Load = res
	var expect Accounting
	if lerr == nil {
		expect = ledger.Check(func(string, string) int { return 1 }, sc.Undeliverable...)
		smp.expected.Store(expect.Expected)
		smp.phase.Store(1)
	}

	// The release, if any, happens while we wait.
	var releasedAt atomic.Int64
	stopRelease := func() {}
	if lerr == nil && sc.Release.After > 0 {
		relDone := make(chan struct{})
		timer := time.AfterFunc(sc.Release.After, func() {
			defer close(relDone)
			if err := r.sink.SetFaults(sc.Release.Faults); err != nil {
				r.prog.note("release: " + err.Error())
				return
			}
			releasedAt.Store(time.Now().UnixNano())
			r.prog.note(fmt.Sprintf("%s: sink faults released %v after the load", t.Name(), sc.Release.After))
			if err := t.Released(ctx); err != nil {
				r.prog.note("release: " + t.Name() + ": " + err.Error())
			}
		})
		stopRelease = func() {
			if !timer.Stop() {
				<-relDone // it fired: let it finish
			}
		}
	}

	var last time.Time
	var afterRelease uint64
	check := func() Accounting {
		last, afterRelease = time.Time{}, 0
		rel := releasedAt.Load()
		return ledger.Check(func(id, rcpt string) int {
			n, first := r.sink.Seen(id, rcpt)
			if n > 0 {
				if first.After(last) {
					last = first
				}
				if rel != 0 && first.UnixNano() >= rel {
					afterRelease++
				}
			}
			return n
		}, sc.Undeliverable...)
	}
	var acct Accounting
	complete := false
	if lerr == nil {
		deadline := loadEnd.Add(sc.DeliveryWait)
		var lastFull time.Time
		for !complete {
			now := time.Now()
			if r.sink.unique.Load() >= expect.Expected && now.Sub(lastFull) >= 200*time.Millisecond {
				acct, lastFull = check(), now
				complete = acct.Lost == 0
				if complete {
					break
				}
			}
			if now.After(deadline) {
				break
			}
			select {
			case <-ctx.Done():
			case <-time.After(10 * time.Millisecond):
			}
			if ctx.Err() != nil {
				break
			}
		}
	}
	stopRelease()
	stopSampler() // its last sample is now; then Probe is ours alone
	end := time.Now()
	p1 := t.Probe(context.WithoutCancel(ctx))
	self1, _ := readProcStat(0)
	m1, _ := readMachineCPU()
	f1 := diskFlushes()
	stop()

	acct = check()
	rep.Complete = complete && lerr == nil
	rep.Accounting = acct
	rep.Sink = r.sink.Stats()
	rep.InjectionRate = res.Rate
	if !last.IsZero() {
		rep.DeliverySpan = last.Sub(res.Start)
		if s := rep.DeliverySpan.Seconds(); s > 0 {
			rep.DeliveryRate = float64(acct.Delivered) / s
		}
	}
	if rel := releasedAt.Load(); rel != 0 {
		rep.Released = time.Unix(0, rel).Sub(res.Start)
		if span := last.Sub(time.Unix(0, rel)).Seconds(); afterRelease > 0 && span > 0 {
			rep.DrainRate = float64(afterRelease) / span
		}
	}
	rep.E2E = rep.Sink.E2E
	rep.Accept = res.Latency

	msgs := float64(res.Accepted)
	perMsg := func(d time.Duration) time.Duration {
		if msgs == 0 {
			return 0
		}
		return time.Duration(float64(d) / msgs)
	}
	ratio := func(a, b uint64) float64 {
		if msgs == 0 || b > a {
			return 0
		}
		return float64(a-b) / msgs
	}
	if p0.Process && p1.Process {
		rep.MeasuredProcess = true
		rep.TargetCPU = p1.CPU - p0.CPU
		rep.CPUPerMsg = perMsg(rep.TargetCPU)
		rep.PeakRSS = max(p1.PeakRSS, smp.peakRSS)
		rep.DiskWritePerMsg = ratio(p1.WriteBytes, p0.WriteBytes)
	}
	if p0.Spool && p1.Spool {
		rep.MeasuredSpool = true
		rep.Fsyncs = p1.Fsyncs - p0.Fsyncs
		rep.FsyncsPerMsg = ratio(p1.Fsyncs, p0.Fsyncs)
		rep.SpoolPeakBytes = max(p1.SpoolBytes, smp.peakSpool)
		rep.QueuePeak = max(p1.Queued, smp.peakQueue)
		if rep.QueuePeak >= minQueueForSpoolPerMsg {
			rep.SpoolBytesPerMsg = float64(smp.spoolAtPeakQueue) / float64(rep.QueuePeak)
		}
	}
	rep.QueuedAtEnd = -1
	if p1.Queue {
		rep.QueuedAtEnd = p1.Queued
	}
	rep.HarnessCPU = self1.cpu - self0.cpu
	rep.HarnessCPUPerMsg = perMsg(rep.HarnessCPU)
	if tot := m1.total - m0.total; tot > 0 {
		busy := m1.busy - m0.busy
		rep.MachineBusy = float64(busy) / float64(tot)
		rep.OtherCPU = max(busy-rep.HarnessCPU-rep.TargetCPU, 0)
	}
	rep.DiskFlushesPerMsg = ratio(f1, f0)
	rep.Timeline = smp.samples

	summary := fmt.Sprintf("%s: %d accepted (%.0f msg/s), %d/%d pairs delivered (%.0f/s) in %v, e2e p99 %v",
		rep.Target, res.Accepted, rep.InjectionRate, acct.Delivered, acct.Expected, rep.DeliveryRate,
		end.Sub(start).Round(time.Millisecond), rep.E2E.P99.Round(time.Microsecond))
	if !rep.Complete && lerr == nil {
		summary += fmt.Sprintf(" — INCOMPLETE: %d pairs not delivered within %v", acct.Lost, sc.DeliveryWait)
	}
	r.prog.done(summary)
	if lerr != nil {
		return rep, lerr
	}
	return rep, err
}

// waitQuiet waits until the machine's busy share over quietSample is under
// QuietBusy, at most QuietWait, and returns the last share measured.
func (r *rig) waitQuiet(ctx context.Context, name string) float64 {
	deadline := time.Now().Add(r.cfg.QuietWait)
	for {
		a, err := readMachineCPU()
		if err != nil {
			return 0
		}
		select {
		case <-ctx.Done():
			return 0
		case <-time.After(r.quietSample):
		}
		b, err := readMachineCPU()
		if err != nil || b.total <= a.total {
			return 0
		}
		busy := float64(b.busy-a.busy) / float64(b.total-a.total)
		if busy < r.cfg.QuietBusy {
			return busy
		}
		if time.Now().After(deadline) {
			r.prog.note(fmt.Sprintf("%s: machine still %.0f%% busy after waiting %v: running anyway", name,
				100*busy, r.cfg.QuietWait))
			return busy
		}
		r.prog.update(fmt.Sprintf("%s: waiting for a quiet machine (%.0f%% busy)", name, 100*busy))
	}
}

// sampler records a run's timeline and drives the progress line.
type sampler struct {
	r     *rig
	t     Target
	load  *Load
	label string
	start time.Time

	phase    atomic.Int32 // 0 load, 1 waiting for deliveries
	expected atomic.Uint64

	// Owned by the loop goroutine until it ends.
	samples          []Sample
	prev             Probe
	prevAt           time.Time
	prevAcc, prevDlv uint64
	since            uint64 // next sink arrival to read
	lat              []int64
	peakRSS          uint64
	peakSpool        uint64
	peakQueue        int64
	spoolAtPeakQueue uint64
}

func (s *sampler) loop(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			s.sample(context.WithoutCancel(ctx))
			return
		case <-t.C:
			s.sample(ctx)
		}
	}
}

func (s *sampler) sample(ctx context.Context) {
	now := time.Now()
	dt := now.Sub(s.prevAt).Seconds()
	if dt <= 0 {
		return
	}
	lp := s.load.Progress()
	smp := Sample{T: now.Sub(s.start).Seconds(), Accepted: lp.Accepted, Delivered: s.r.sink.unique.Load()}
	smp.AcceptRate = float64(smp.Accepted-min(s.prevAcc, smp.Accepted)) / dt
	smp.DeliveryRate = float64(smp.Delivered-min(s.prevDlv, smp.Delivered)) / dt
	arr, next, _ := s.r.sink.Arrivals(s.since, 1<<20)
	s.since = next
	s.lat = s.lat[:0]
	for _, a := range arr {
		if a.Status == "ok" && a.Sent != 0 {
			s.lat = append(s.lat, a.Arrived-a.Sent)
		}
	}
	if len(s.lat) > 0 {
		slices.Sort(s.lat)
		q := func(p float64) float64 {
			i := int(p * float64(len(s.lat)-1))
			return float64(s.lat[i]) / 1e6
		}
		smp.E2EP50, smp.E2EP99, smp.E2EMax = q(0.5), q(0.99), q(1)
	}
	p := s.t.Probe(ctx)
	if p.Process && s.prev.Process {
		smp.CPU = (p.CPU - s.prev.CPU).Seconds() / dt
		smp.RSS = p.RSS
		s.peakRSS = max(s.peakRSS, p.PeakRSS)
	}
	if p.Spool {
		smp.SpoolBytes = p.SpoolBytes
		s.peakSpool = max(s.peakSpool, p.SpoolBytes)
	}
	if p.Queue {
		smp.Queued = p.Queued
		if p.Queued > s.peakQueue {
			s.peakQueue, s.spoolAtPeakQueue = p.Queued, p.SpoolBytes
		}
	}
	if p.Process || p.Spool {
		s.prev = p
	}
	s.prevAt, s.prevAcc, s.prevDlv = now, smp.Accepted, smp.Delivered
	s.samples = append(s.samples, smp)
	s.r.prog.update(s.line(smp, lp))
}

// line formats the progress line.
func (s *sampler) line(smp Sample, lp LoadProgress) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %5.1fs ", s.label, smp.T)
	if s.phase.Load() == 0 {
		fmt.Fprintf(&b, "load %d/%d acc %.0f/s", lp.Attempted, s.load.Config().Messages, smp.AcceptRate)
	} else {
		fmt.Fprintf(&b, "waiting: %d/%d delivered", smp.Delivered, s.expected.Load())
	}
	fmt.Fprintf(&b, " | dlv %d %.0f/s", smp.Delivered, smp.DeliveryRate)
	if smp.E2EP99 > 0 {
		fmt.Fprintf(&b, " p99 %s", fmtMillis(smp.E2EP99))
	}
	if smp.CPU > 0 || smp.RSS > 0 {
		fmt.Fprintf(&b, " | cpu %.0f%% rss %s", 100*smp.CPU, fmtBytes(float64(smp.RSS)))
	}
	if smp.Queued > 0 {
		fmt.Fprintf(&b, " q %d", smp.Queued)
	}
	return b.String()
}

func fmtMillis(ms float64) string {
	switch {
	case ms >= 10000:
		return strconv.FormatFloat(ms/1000, 'f', 1, 64) + "s"
	case ms >= 100:
		return strconv.FormatFloat(ms, 'f', 0, 64) + "ms"
	default:
		return strconv.FormatFloat(ms, 'f', 1, 64) + "ms"
	}
}

// fmtBytes formats a byte count with a binary unit.
func fmtBytes(n float64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB"}
	i := 0
	for n >= 1024 && i < len(units)-1 {
		n /= 1024
		i++
	}
	if i == 0 {
		return strconv.FormatFloat(n, 'f', 0, 64) + " B"
	}
	return strconv.FormatFloat(n, 'f', 1, 64) + " " + units[i]
}

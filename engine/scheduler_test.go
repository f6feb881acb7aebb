package engine

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"

	"github.com/hermod-mta/hermod/dnscache"
	"github.com/hermod-mta/hermod/internal/smtperr"
	"github.com/hermod-mta/hermod/spool"
)

// schedHarness drives a Scheduler's loop by hand with a fake clock: no
// loop goroutine, no network. Agents are recorded when the scheduler
// starts them and finish when the script says so, through the real
// outcome code (spool writes, bounces).
type schedHarness struct {
	copies []string // messages handed to SchedulerOptions.Replicate
	t      *testing.T
	s      *Scheduler
	st     *spool.Store
	now    time.Time
	t0     time.Time
	ids    map[string]spool.ID
	names  map[spool.ID]string
	msgs   map[string]*spool.Message
	agents map[string]*fakeAgent
	order  []string
	nconn  int
}

type fakeAgent struct {
	name string
	a    *agent
	jobs []*job // current batch, nil when idle
}

type noResolver struct{}

func (noResolver) Resolve(context.Context, string) (*dnscache.Route, error) {
	return nil, fmt.Errorf("not used")
}

func newSchedHarness(t *testing.T, args []datadriven.CmdArg) *schedHarness {
	cfg := DeliveryConfig{}
	cfg.Hostname = "mx.test"
	cfg.Retry = []time.Duration{10 * time.Second, time.Minute}
	cfg.MaxQueueLifetime = time.Hour
	cfg.ScanInterval = time.Second
	var outside *staticLimits
	replicate := false
	scanBudgetOverride := 0
	for _, a := range args {
		v := a.Vals[0]
		n, _ := strconv.Atoi(v)
		switch a.Key {
		case "per_domain":
			cfg.MaxConnectionsPerDomain = n
		case "global":
			cfg.MaxConnections = n
		case "per_conn":
			cfg.MaxMessagesPerConnection = n
		case "batch":
			cfg.PipelineTransactions = n
		case "destq":
			cfg.DestinationQueueLimit = n
		case "active":
			cfg.ActiveLimit = n
		case "jitter":
			cfg.Jitter, _ = strconv.ParseFloat(v, 64)
		case "idle":
			cfg.IdleTimeout, _ = time.ParseDuration(v)
		case "lifetime":
			cfg.MaxQueueLifetime, _ = time.ParseDuration(v)
		case "retry":
			cfg.Retry = nil
			for _, r := range strings.Split(strings.Join(a.Vals, ","), ",") {
				d, _ := time.ParseDuration(r)
				cfg.Retry = append(cfg.Retry, d)
			}
		case "replicate":
			replicate = true
		case "scan_budget":
			scanBudgetOverride = n
		case "outside_conns", "outside_rate":
			// domain:value — a fixed outside limit (cluster share).
			if outside == nil {
				outside = &staticLimits{conns: map[string]int{}, rates: map[string]float64{}, open: map[string]int{}}
			}
			dom, val, _ := strings.Cut(v, ":")
			if a.Key == "outside_conns" {
				outside.conns[dom], _ = strconv.Atoi(val)
			} else {
				outside.rates[dom], _ = strconv.ParseFloat(val, 64)
			}
		default:
			t.Fatalf("unknown config %s", a.Key)
		}
	}
	scfg := spool.DefaultConfig()
	scfg.Dir = t.TempDir()
	h := &schedHarness{t: t, ids: map[string]spool.ID{}, names: map[spool.ID]string{}, msgs: map[string]*spool.Message{}, agents: map[string]*fakeAgent{}}
	h.t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	h.now = h.t0
	scfg.Clock = func() time.Time { return h.now }
	st, err := spool.Open(scfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	h.st = st
	opt := SchedulerOptions{Store: st, Resolver: noResolver{}, Now: func() time.Time { return h.now }, Seed: 42}
	if outside != nil {
		opt.Limits = outside
	}
	if replicate {
		// Bounces are copied to cluster peers before they are queued: the
		// copy is recorded (with the peers the replicator sets) and only
		// then does the commit go ahead.
		opt.Replicate = func(msg *spool.Message, body []byte, done func(error)) {
			msg.Peers = []string{"self", "peer"}
			h.copies = append(h.copies, fmt.Sprintf("copy bounce=%v to=%s peers=%v body=%v", msg.Bounce, msg.Rcpts[0].Addr,
				msg.Peers, bytes.Contains(body, []byte("Content-Type: multipart/report"))))
			done(nil)
		}
	}
	s, err := NewScheduler(cfg, opt)
	if err != nil {
		t.Fatal(err)
	}
	s.spawn = func(a *agent, jobs []*job) {
		h.nconn++
		name := fmt.Sprintf("c%d", h.nconn)
		h.agents[name] = &fakeAgent{name: name, a: a, jobs: jobs}
		h.order = append(h.order, name)
	}
	if scanBudgetOverride > 0 {
		s.scanBudget = scanBudgetOverride
	}
	h.s = s
	return h
}

// settle waits for the suspension goroutines and feeds their events (and
// any other queued event) to the loop.
func (h *schedHarness) settle(out *strings.Builder) {
	h.s.agentWG.Wait()
	for {
		select {
		case ev := <-h.s.events:
			h.s.handle(ev)
		default:
			return
		}
	}
}

func (h *schedHarness) jobString(jobs []*job) string {
	var out []string
	for _, j := range jobs {
		var rs []string
		for _, i := range j.rcpts {
			rs = append(rs, j.e.msg.Rcpts[i].Addr)
		}
		out = append(out, fmt.Sprintf("%s[%s]", h.names[j.e.msg.ID], strings.Join(rs, ",")))
	}
	return strings.Join(out, " ")
}

// dispatch runs tick+dispatch, as the loop does after every event, and
// reports new agents, hand-overs and closed connections.
func (h *schedHarness) dispatch(out *strings.Builder) {
	h.s.tick(h.now)
	h.settle(out)
	for round := 0; round < 3; round++ {
		before := h.nconn
		idle := map[*agent]bool{}
		for _, d := range h.s.dests {
			for _, a := range d.idle {
				idle[a] = true
			}
		}
		h.s.dispatch(h.now)
		for _, name := range h.order[before:] {
			fa := h.agents[name]
			fmt.Fprintf(out, "start %s %s %s\n", name, fa.a.d.name, h.jobString(fa.jobs))
		}
		closed := h.collect(out, "")
		if !closed {
			return
		}
	}
}

// collect reports what the loop told idle agents.
func (h *schedHarness) collect(out *strings.Builder, why string) bool {
	closed := false
	for _, name := range h.order {
		fa := h.agents[name]
		if fa == nil || fa.jobs != nil {
			continue
		}
		select {
		case jobs := <-fa.a.next:
			if jobs == nil {
				fmt.Fprintf(out, "close %s%s\n", name, why)
				delete(h.agents, name)
				h.agentExit(fa)
				closed = true
			} else {
				fa.jobs = jobs
				fmt.Fprintf(out, "reuse %s %s\n", name, h.jobString(jobs))
			}
		default:
		}
	}
	return closed
}

func (h *schedHarness) agentExit(fa *fakeAgent) {
	h.s.handle(evAgentExit{fa.a})
}

func (h *schedHarness) run(t *testing.T, d *datadriven.TestData) string {
	var out strings.Builder
	switch d.Cmd {
	case "enqueue":
		// enqueue name=m1 rcpts=a@x.test,b@y.test [from=s@z.test] [hot=false|arriving]
		// hot=arriving commits after Arriving and leaves the hand-over
		// (Enqueue) to the handover command.
		var name, from string = "", "sender@origin.test"
		var rcpts []string
		hot, arriving := true, false
		for _, a := range d.CmdArgs {
			switch a.Key {
			case "name":
				name = a.Vals[0]
			case "rcpts":
				rcpts = strings.Split(strings.Join(a.Vals, ","), ",")
			case "from":
				from = a.Vals[0]
				if from == "<>" {
					from = ""
				}
			case "hot":
				hot = a.Vals[0] == "true"
				arriving = a.Vals[0] == "arriving"
			}
		}
		msg := &spool.Message{From: from, Received: h.now}
		for i, r := range rcpts {
			msg.Rcpts = append(msg.Rcpts, spool.Recipient{Index: uint16(i), Addr: r, NextAttempt: h.now})
		}
		msg.ID = h.st.NewID()
		if arriving {
			h.s.Arriving(msg.ID)
		}
		if err := h.st.CommitWait(msg, []byte("Subject: test\r\n\r\nbody\r\n")); err != nil {
			t.Fatal(err)
		}
		h.ids[name] = msg.ID
		h.names[msg.ID] = name
		h.msgs[name] = msg
		switch {
		case arriving:
			fmt.Fprintf(&out, "%s arriving\n", name)
		case hot:
			h.s.handle(evEnqueue{msg: msg})
			if h.s.active[msg.ID] != nil {
				fmt.Fprintf(&out, "%s admitted\n", name)
			} else {
				fmt.Fprintf(&out, "%s left in the spool\n", name)
			}
		default:
			fmt.Fprintf(&out, "%s spooled\n", name)
		}
	case "handover", "abandon":
		// handover name=m1: Enqueue of an arriving message, as the loop
		// takes it; abandon name=m1: its commit failed after all.
		msg := h.msgs[d.CmdArgs[0].Vals[0]]
		if d.Cmd == "abandon" {
			h.s.Abandon(msg.ID)
			fmt.Fprintf(&out, "%s abandoned\n", h.names[msg.ID])
			break
		}
		before := h.s.active[msg.ID]
		h.s.Enqueue(msg, nil)
		h.settle(&out)
		switch e := h.s.active[msg.ID]; {
		case e == nil:
			fmt.Fprintf(&out, "%s not admitted\n", h.names[msg.ID])
		case e == before:
			fmt.Fprintf(&out, "%s already active\n", h.names[msg.ID])
		default:
			fmt.Fprintf(&out, "%s admitted\n", h.names[msg.ID])
		}
	case "dispatch":
		h.dispatch(&out)
	case "advance":
		dur, err := time.ParseDuration(d.CmdArgs[0].Key)
		if err != nil {
			t.Fatal(err)
		}
		h.now = h.now.Add(dur)
		fmt.Fprintf(&out, "now +%v\n", h.now.Sub(h.t0))
		h.dispatch(&out)
	case "result":
		// result c1 codes=250,451 | result c1 destfail | result c1 code=550 [drop]
		name := d.CmdArgs[0].Key
		fa := h.agents[name]
		if fa == nil || fa.jobs == nil {
			t.Fatalf("no busy agent %s", name)
		}
		var codes []int
		destFail, drop, requeue := false, false, false
		for _, a := range d.CmdArgs[1:] {
			switch a.Key {
			case "requeue":
				requeue = true
			case "code", "codes":
				for _, v := range strings.Split(strings.Join(a.Vals, ","), ",") {
					c, _ := strconv.Atoi(v)
					codes = append(codes, c)
				}
			case "destfail":
				destFail = true
			case "drop":
				drop = true
			}
		}
		jobs := fa.jobs
		res := make([]*attemptResult, len(jobs))
		for n, j := range jobs {
			if requeue {
				res[n] = &attemptResult{requeue: true, lastReply: "421 4.7.0 too many connections from your IP"}
				continue
			}
			outs := make([]rcptOutcome, len(j.rcpts))
			for k := range outs {
				var reply *smtperr.Error
				if destFail {
					reply = smtperr.New(451, "4.4.1", "connection refused")
				} else {
					c := codes[min(k, len(codes)-1)]
					reply = smtperr.New(c, fmt.Sprintf("%d.0.0", c/100), "reply %d", c)
				}
				outs[k].class, outs[k].reply = classify(reply, nil)
			}
			fa.a.sent++
			res[n] = h.s.record(j, fa.a, outs, destFail, &delivery{})
		}
		fa.a.usable = !drop && !destFail
		fa.jobs = nil
		h.s.handle(evDone{a: fa.a, jobs: jobs, res: res})
		select {
		case next := <-fa.a.next:
			if next == nil {
				fmt.Fprintf(&out, "close %s\n", name)
				delete(h.agents, name)
				h.agentExit(fa)
			} else {
				fa.jobs = next
				fmt.Fprintf(&out, "reuse %s %s\n", name, h.jobString(next))
			}
		default:
			fmt.Fprintf(&out, "idle %s\n", name)
		}
		h.settle(&out)
		h.dispatch(&out) // as the loop does after every event
	case "copies":
		for _, c := range h.copies {
			fmt.Fprintln(&out, c)
		}
		h.copies = nil
	case "show":
		h.show(&out)
	case "spool":
		h.showSpool(&out)
	default:
		t.Fatalf("unknown command %s", d.Cmd)
	}
	return out.String()
}

func (h *schedHarness) show(out *strings.Builder) {
	var names []string
	for n := range h.s.dests {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		d := h.s.dests[n]
		backoff := "-"
		if h.now.Before(d.backoffUntil) {
			backoff = "+" + d.backoffUntil.Sub(h.now).Round(time.Second).String()
		}
		limit := ""
		if d.limit > 0 {
			limit = fmt.Sprintf(" limit=%d", d.limit)
		}
		fmt.Fprintf(out, "%s: ready=%d conns=%d idle=%d backoff=%s delivered=%d deferred=%d bounced=%d%s\n",
			n, len(d.ready), d.conns, len(d.idle), backoff, d.stat.Delivered, d.stat.Deferred, d.stat.Bounced, limit)
	}
	fmt.Fprintf(out, "active=%d conns=%d\n", len(h.s.active), h.s.conns)
}

func (h *schedHarness) showSpool(out *strings.Builder) {
	var lines []string
	_ = h.st.Walk(func(m *spool.Message) bool {
		name := h.names[m.ID]
		if name == "" {
			name = "bounce"
			if m.From != "" || !m.Bounce {
				name = "?" + m.ID.String()
			}
		}
		var rs []string
		for _, r := range m.Rcpts {
			s := fmt.Sprintf("%s %s attempts=%d", r.Addr, r.State, r.Attempts)
			if r.State == spool.Pending {
				s += " next=+" + r.NextAttempt.Sub(h.t0).Round(time.Second).String()
			}
			rs = append(rs, s)
		}
		line := fmt.Sprintf("%s: %s", name, strings.Join(rs, "; "))
		if len(m.Peers) > 0 {
			line += fmt.Sprintf(" peers=%v", m.Peers)
		}
		lines = append(lines, line)
		return true
	})
	sort.Strings(lines)
	if len(lines) == 0 {
		out.WriteString("(empty)\n")
	}
	for _, l := range lines {
		out.WriteString(l + "\n")
	}
}

// TestSchedulerDatadriven runs the scripts in testdata/scheduler: backoff
// and jitter, per-domain and global connection limits, reuse, idle
// timeout, destination backoff, fairness between destinations, bounces
// and expiry, all on a fake clock.
func TestSchedulerDatadriven(t *testing.T) {
	datadriven.Walk(t, "testdata/scheduler", func(t *testing.T, path string) {
		var h *schedHarness
		datadriven.RunTest(t, path, func(t *testing.T, d *datadriven.TestData) string {
			if d.Cmd == "config" {
				h = newSchedHarness(t, d.CmdArgs)
				return ""
			}
			if h == nil {
				t.Fatal("config first")
			}
			return h.run(t, d)
		})
	})
}

func TestRetryDelayJitterBounds(t *testing.T) {
	cfg := DeliveryConfig{Retry: []time.Duration{time.Minute, 5 * time.Minute}, Jitter: 0.2}
	for n := 1; n <= 4; n++ {
		step := cfg.Retry[min(n, len(cfg.Retry))-1]
		lo, hi := time.Duration(float64(step)*0.8), time.Duration(float64(step)*1.2)
		for i := 0; i <= 100; i++ {
			u := float64(i) / 101
			if d := cfg.retryDelay(n, u); d < lo || d > hi {
				t.Fatalf("retry %d, u=%v: %v outside [%v, %v]", n, u, d, lo, hi)
			}
		}
		if cfg.retryDelay(n, 0) >= cfg.retryDelay(n, 0.99) {
			t.Fatalf("jitter does not spread retry %d", n)
		}
	}
}

func TestTransition(t *testing.T) {
	cfg := DeliveryConfig{Retry: []time.Duration{time.Minute}, Jitter: 0, MaxQueueLifetime: time.Hour}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	msg := &spool.Message{Received: t0}
	r := spool.Recipient{Addr: "a@x.test"}
	cases := []struct {
		name    string
		class   outcomeClass
		now     time.Time
		state   spool.RcptState
		next    time.Time
		expired bool
	}{
		{"delivered", outDelivered, t0, spool.Delivered, time.Time{}, false},
		{"bounced", outBounced, t0, spool.Bounced, time.Time{}, false},
		{"deferred", outDeferred, t0, spool.Pending, t0.Add(time.Minute), false},
		{"deferred near the end retries at the end", outDeferred, t0.Add(59*time.Minute + 30*time.Second), spool.Pending, t0.Add(time.Hour), false},
		{"deferred after the lifetime expires", outDeferred, t0.Add(time.Hour), spool.Expired, time.Time{}, true},
		{"resent for the recipient limit: at once, not an attempt", outMore, t0.Add(time.Minute), spool.Pending, t0.Add(time.Minute), false},
	}
	for _, c := range cases {
		nr, class, exp := transition(&cfg, msg, r, c.class, "reply", c.now, 0.5)
		attempts := uint32(1)
		if c.class == outMore {
			attempts = 0
			if class != outMore {
				t.Errorf("%s: class %v", c.name, class)
			}
		}
		if nr.State != c.state || exp != c.expired || (c.state == spool.Pending && !nr.NextAttempt.Equal(c.next)) || nr.Attempts != attempts {
			t.Errorf("%s: got state %v next %v expired %v attempts %d", c.name, nr.State, nr.NextAttempt, exp, nr.Attempts)
		}
	}
}

var _ = netip.Addr{}

// staticLimits is a fixed ConnLimits (the cluster's share, frozen).
type staticLimits struct {
	conns map[string]int
	rates map[string]float64
	open  map[string]int
}

func (l *staticLimits) Allowance(d string) (int, bool) { n, ok := l.conns[d]; return n, ok }
func (l *staticLimits) Opened(d string)                { l.open[d]++ }
func (l *staticLimits) Closed(d string)                { l.open[d]-- }
func (l *staticLimits) Rate(d string) (float64, bool)  { r, ok := l.rates[d]; return r, ok }

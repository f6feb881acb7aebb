package cluster

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// simLarge adds the 50- and 200-node runs to TestSim (two minutes; run
// alone: go test -run TestSim -v ./cluster/ -args -sim.large). The
// 200-node run stretches its timers 4× unless -sim.scale says otherwise.
var simLarge = flag.Bool("sim.large", false, "TestSim: also simulate 50 and 200 nodes")

// simN runs TestSim for this one size instead.
var simN = flag.Int("sim.n", 0, "TestSim: simulate only this many nodes")

// simScale stretches every gossip timer (probe, gossip, push/pull and
// count intervals) by this factor; the figures are scaled back (times
// divided, bandwidth multiplied). 200 members at production timers need
// more CPU than two cores have; at 4× they fit, and the protocol runs in
// the same proportions.
var simScale = flag.Int("sim.scale", 1, "TestSim: stretch the gossip timers by this factor (figures scaled back)")

// TestSim runs many gossip members in one process on an in-memory network
// (simNet) with the production Node and Limits, and measures
//   - convergence of the shared connection counts: from a node changing
//     its count for a limited domain until every other node's
//     Limits.ClusterHeld(domain) shows the new total;
//   - gossip bandwidth per node, with membership alone and with the counts;
//   - failure detection: from cutting one node off the network until
//     every other node has reported it failed.
//
// The figures are logged (t.Logf) and written up in docs/CLUSTER-SCALING.md;
// the only assertions are that 10 nodes converge and detect the failure
// within generous bounds.
func TestSim(t *testing.T) {
	sizes := []int{10}
	if *simN > 0 {
		sizes = []int{*simN}
	} else if *simLarge {
		sizes = append(sizes, 50, 200)
	} else if testing.Short() {
		t.Skip("simulation skipped in -short mode")
	}
	for _, n := range sizes {
		t.Run(fmt.Sprintf("N=%d", n), func(t *testing.T) {
			p := simParams{nodes: n, domains: 20, rounds: 8, window: 2 * time.Second, scale: max(*simScale, 1)}
			if n >= 200 && *simScale == 1 {
				p.scale = 4 // 200 members at production timers need more than 2 cores
			}
			if n > 10 {
				p.rounds, p.window = 3, 3*time.Second
			}
			p.window *= time.Duration(p.scale)
			r := runSim(t, p)
			t.Logf("N=%d: %s", n, r)
			if n == 10 {
				if r.unconverged > 0 {
					t.Errorf("%d of %d count changes did not reach every node within %v", r.unconverged, r.probes, simProbeBound)
				}
				if r.detectAll <= 0 {
					t.Errorf("the failed node was not reported failed by every other node within %v", simDetectBound)
				}
			}
		})
	}
}

const (
	simProbeBound  = 10 * time.Second
	simDetectBound = 20 * time.Second
)

type simParams struct {
	nodes   int
	domains int
	rounds  int           // rounds of probes, one per domain each round
	window  time.Duration // bandwidth measurement without counts
	scale   int           // timer stretch (simScale)
}

type simResult struct {
	nodes, probes, unconverged int
	// conv: from the change to the last other node showing it; delay:
	// from the origin's first gossip of it to the same moment.
	convP50, convP99, convMax, delayP50, delayP99 time.Duration
	// detectFirst/All: from the cut to the first/last other node
	// reporting the failure (0: not all did within simDetectBound).
	detectFirst, detectAll time.Duration
	// Bytes per second per node, mean over nodes and max over nodes.
	memberSent, memberRecv, countSent, countRecv, countSentMax float64
	dropped                                                    int64
	falseFailed                                                int     // failure reports of nodes that were not cut
	cpu                                                        float64 // CPU seconds per second during the probes (at the stretched timers)
	scale                                                      int
	joinTime                                                   time.Duration
}

func (r simResult) String() string {
	return fmt.Sprintf("joined in %v; counts converge p50 %v p99 %v max %v (after first send: p50 %v p99 %v), %d/%d not within %v; "+
		"failure seen first %v, by all %v; bytes/s per node: membership only sent %.0f recv %.0f, with counts sent %.0f recv %.0f (max node sent %.0f); "+
		"packets dropped %d; live nodes reported failed %d times; process CPU %.2f cores (timers stretched %d×; figures scaled back)",
		r.joinTime.Round(time.Millisecond), r.convP50.Round(time.Millisecond), r.convP99.Round(time.Millisecond), r.convMax.Round(time.Millisecond),
		r.delayP50.Round(time.Millisecond), r.delayP99.Round(time.Millisecond), r.unconverged, r.probes, simProbeBound,
		r.detectFirst.Round(time.Millisecond), r.detectAll.Round(time.Millisecond),
		r.memberSent, r.memberRecv, r.countSent, r.countRecv, r.countSentMax, r.dropped, r.falseFailed, r.cpu, r.scale)
}

// simNode is one member of the simulation.
type simNode struct {
	idx    int
	name   string
	node   *Node
	tr     *simTransport
	lim    *Limits
	killed bool
	inbox  chan []byte // count reports, handled in order by one goroutine (as one connection's reader would)

	// sendMu orders a probe's change against the node's own gossip, so
	// the probe knows which gossip round first carried it.
	sendMu  sync.Mutex
	pending atomic.Int32 // probes whose origin's count arrived but ClusterHeld disagreed

	directSent, directRecv atomic.Int64 // count reports sent straight to members
}

// simProbe is one count change being followed through the cluster.
type simProbe struct {
	origin int
	domain string
	want   int
	t0     time.Time
	sentAt time.Time // first gossip of the origin after the change (under origin's sendMu)

	mu    sync.Mutex
	seen  []time.Time // per node; zero until it shows want
	stale []bool      // origin's count arrived but ClusterHeld disagreed
	left  int
	done  chan struct{}
}

type simCluster struct {
	t       *testing.T
	nodes   []*simNode
	byName  map[string]*simNode
	domains []string

	mu       sync.Mutex
	probes   map[string]*simProbe         // active, by domain
	failed   map[string]map[int]time.Time // member → observer → when it last reported it failed (deleted when alive again)
	failures map[string]int               // member → failure reports
}

func simAddr(i int) string { return fmt.Sprintf("127.0.%d.%d:7946", i/200, i%200+1) }

func runSim(t *testing.T, p simParams) simResult {
	c := &simCluster{t: t, probes: map[string]*simProbe{}, failed: map[string]map[int]time.Time{}, failures: map[string]int{}, byName: map[string]*simNode{}}
	limits := map[string]int{}
	for i := range p.domains {
		d := fmt.Sprintf("d%02d.example.net", i)
		c.domains = append(c.domains, d)
		limits[d] = 10 * p.nodes
	}
	network := newSimNet()
	stop := make(chan struct{})
	var gossip sync.WaitGroup
	t.Cleanup(func() {
		close(stop)
		gossip.Wait()
		var wg sync.WaitGroup
		for _, sn := range c.nodes {
			if sn.killed {
				continue
			}
			wg.Add(1)
			go func() { defer wg.Done(); _ = sn.node.Kill() }()
		}
		wg.Wait()
	})
	var interval time.Duration
	for i := range p.nodes {
		sn := &simNode{idx: i, name: fmt.Sprintf("sim%03d", i)}
		cfg := Config{Bind: simAddr(i), NodeName: sn.name}
		if i > 0 {
			cfg.Join = []string{simAddr(0)}
		}
		cfg.EnsureDefaults("")
		k := time.Duration(p.scale)
		cfg.ProbeInterval *= k
		cfg.CountInterval *= k
		interval = cfg.CountInterval
		tr, err := network.add(cfg.Bind)
		if err != nil {
			t.Fatal(err)
		}
		node, err := NewNode(cfg, Options{Transport: tr, timeScale: p.scale})
		if err != nil {
			t.Fatal(err)
		}
		sn.tr, sn.node = tr, node
		sn.inbox = make(chan []byte, 4096)
		gossip.Add(1)
		go func() {
			defer gossip.Done()
			for {
				select {
				case <-stop:
					return
				case b := <-sn.inbox:
					c.received(sn, b)
				}
			}
		}()
		sn.lim = NewLimits(sn.name, limits, cfg.CountInterval, func() int { return len(node.Alive()) }, func([]byte) error { return nil })
		node.OnMemberChange(func(ch MemberChange) {
			now := time.Now()
			c.mu.Lock()
			defer c.mu.Unlock()
			for _, m := range ch.Members {
				seen := c.failed[m.Name]
				if seen == nil {
					seen = map[int]time.Time{}
					c.failed[m.Name] = seen
				}
				switch ch.Status {
				case "failed":
					seen[sn.idx] = now
					c.failures[m.Name]++
				case "alive":
					delete(seen, sn.idx)
				}
			}
		})
		c.nodes = append(c.nodes, sn)
		c.byName[sn.name] = sn
	}
	var r simResult
	r.nodes, r.scale = p.nodes, p.scale
	start := time.Now()
	for _, sn := range c.nodes {
		if err := sn.node.Start(); err != nil {
			t.Fatal(err)
		}
	}
	k := time.Duration(p.scale)
	joinBound := 30 * time.Second * k
	if p.nodes <= 10 {
		joinBound = 10 * time.Second * k
	}
	if !simWait(joinBound, func() bool {
		for _, sn := range c.nodes {
			if len(sn.node.Alive()) != p.nodes {
				return false
			}
		}
		return true
	}) {
		var seen []int
		for _, sn := range c.nodes {
			seen = append(seen, len(sn.node.Alive()))
			if len(sn.node.Alive()) == p.nodes {
				continue
			}
			var serfAlive int
			for _, m := range sn.node.serf.Members() {
				if m.Status.String() == "alive" {
					serfAlive++
				}
			}
			t.Logf("%s: Node.Alive %d of %d known; serf alive %d of %d known", sn.name, len(sn.node.Alive()), len(sn.node.Members()), serfAlive, len(sn.node.serf.Members()))
		}
		t.Logf("%d nodes did not all see each other within %v: alive members seen by each: %v", p.nodes, joinBound, seen)
	}
	r.joinTime = time.Since(start)

	// Membership gossip alone.
	time.Sleep(time.Second)
	s0, r0 := c.bytes()
	time.Sleep(p.window)
	s1, r1 := c.bytes()
	r.memberSent, r.memberRecv = c.rate(s0, s1, p.window), c.rate(r0, r1, p.window)

	// Counts: a few connections everywhere, then every node gossips its
	// counts for every limited domain each CountInterval (what
	// Limits.Start does, done here so the probe knows the round that
	// carried its change).
	rng := rand.New(rand.NewPCG(uint64(p.nodes), 6))
	truth := map[string]int{}
	for _, sn := range c.nodes {
		for _, d := range c.domains {
			for range rng.IntN(4) {
				sn.lim.Opened(d)
				truth[d]++
			}
		}
	}
	for _, sn := range c.nodes {
		// Nodes start at different moments in production too.
		phase := time.NewTimer(time.Duration(rng.Int64N(int64(interval))))
		gossip.Add(1)
		go func() {
			defer gossip.Done()
			defer phase.Stop()
			select {
			case <-stop:
				return
			case <-phase.C:
			}
			tick := time.NewTicker(interval)
			defer tick.Stop()
			for {
				c.gossip(sn)
				select {
				case <-stop:
					return
				case <-tick.C:
				}
			}
		}()
	}
	if !simWait(15*time.Second*k, func() bool {
		for _, sn := range c.nodes {
			for _, d := range c.domains {
				if sn.lim.ClusterHeld(d) != truth[d] {
					return false
				}
			}
		}
		return true
	}) {
		t.Logf("initial counts not converged on every node within %v", 15*time.Second*k)
	}

	// Probes: each round changes one count per domain, each at a random
	// node, and waits for all of them (or simProbeBound).
	s0, r0 = c.bytes()
	perNode0 := c.sentPerNode()
	cpu0 := cpuTime()
	t0 := time.Now()
	var conv, delay []time.Duration
	for round := range p.rounds {
		var ps []*simProbe
		for _, d := range c.domains {
			origin := c.nodes[rng.IntN(p.nodes)]
			delta := 1
			if round%2 == 1 && origin.lim.Held(d) > 0 {
				delta = -1
			}
			truth[d] += delta
			ps = append(ps, c.change(origin, d, delta, truth[d]))
		}
		deadline := time.NewTimer(simProbeBound * k)
	wait:
		for _, pr := range ps {
			select {
			case <-pr.done:
			case <-deadline.C:
				break wait
			}
		}
		deadline.Stop()
		c.mu.Lock()
		clear(c.probes)
		c.mu.Unlock()
		for _, pr := range ps {
			r.probes++
			pr.mu.Lock()
			for idx, st := range pr.stale {
				if st {
					c.nodes[idx].pending.Add(-1)
				}
			}
			if pr.left > 0 {
				if r.unconverged == 0 {
					var missing []string
					for idx, at := range pr.seen {
						if at.IsZero() && idx != pr.origin {
							sn := c.nodes[idx]
							missing = append(missing, fmt.Sprintf("%s (ClusterHeld %d, sees %d alive)", sn.name, sn.lim.ClusterHeld(pr.domain), len(sn.node.Alive())))
						}
					}
					t.Logf("first change not everywhere: %s on %s, want %d, missing at %v", pr.domain, c.nodes[pr.origin].name, pr.want, missing)
				}
				r.unconverged++
				pr.mu.Unlock()
				continue
			}
			last := slices.MaxFunc(pr.seen, func(a, b time.Time) int { return a.Compare(b) })
			pr.mu.Unlock()
			conv = append(conv, last.Sub(pr.t0))
			if !pr.sentAt.IsZero() {
				delay = append(delay, last.Sub(pr.sentAt))
			}
		}
	}
	elapsed := time.Since(t0)
	s1, r1 = c.bytes()
	r.cpu = (cpuTime() - cpu0).Seconds() / elapsed.Seconds()
	r.countSent, r.countRecv = c.rate(s0, s1, elapsed), c.rate(r0, r1, elapsed)
	for i, b := range c.sentPerNode() {
		r.countSentMax = max(r.countSentMax, float64(b-perNode0[i])/elapsed.Seconds())
	}
	r.convP50, r.convP99, r.convMax = quantile(conv, 0.5), quantile(conv, 0.99), quantile(conv, 1)
	r.delayP50, r.delayP99 = quantile(delay, 0.5), quantile(delay, 0.99)

	for _, sn := range c.nodes {
		r.dropped += sn.tr.dropped.Load()
	}

	// Failure detection: cut the last node off and stop it.
	victim := c.nodes[p.nodes-1]
	c.mu.Lock()
	for _, n := range c.failures {
		r.falseFailed += n
	}
	c.mu.Unlock()
	cut := time.Now()
	victim.tr.setCut(true)
	victim.killed = true
	go func() { _ = victim.node.Kill() }()
	others := p.nodes - 1
	if simWait(simDetectBound*k, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		n := 0
		for _, at := range c.failed[victim.name] {
			if !at.Before(cut) {
				n++
			}
		}
		return n >= others
	}) {
		c.mu.Lock()
		var first, last time.Time
		for _, at := range c.failed[victim.name] {
			if at.Before(cut) {
				continue
			}
			if first.IsZero() || at.Before(first) {
				first = at
			}
			last = later(last, at)
		}
		c.mu.Unlock()
		r.detectFirst, r.detectAll = first.Sub(cut), last.Sub(cut)
	}
	if p.scale > 1 {
		// Back to production timers: the protocol ran k times slower.
		for _, d := range []*time.Duration{&r.joinTime, &r.convP50, &r.convP99, &r.convMax, &r.delayP50, &r.delayP99, &r.detectFirst, &r.detectAll} {
			*d /= k
		}
		for _, b := range []*float64{&r.memberSent, &r.memberRecv, &r.countSent, &r.countRecv, &r.countSentMax} {
			*b *= float64(p.scale)
		}
	}
	return r
}

// gossip sends sn's counts, as Limits.Start does each interval, and stamps
// the probes of sn that this round is the first to carry.
func (c *simCluster) gossip(sn *simNode) {
	sn.sendMu.Lock()
	payloads := sn.lim.Report()
	if payloads == nil {
		sn.sendMu.Unlock()
		return // unchanged and not due for a refresh
	}
	now := time.Now()
	c.mu.Lock()
	for _, pr := range c.probes {
		if pr.origin == sn.idx && pr.sentAt.IsZero() {
			pr.sentAt = now
		}
	}
	c.mu.Unlock()
	sn.sendMu.Unlock()
	// As Service.report does: straight to every member alive in the
	// sender's view, one hop (the replication connections; modelled here
	// as a direct hand-off whose bytes are counted with framing).
	if !sn.tr.reachable() {
		return
	}
	for _, m := range sn.node.Alive() {
		if m.Name == sn.name {
			continue
		}
		other := c.byName[m.Name]
		if other == nil || !other.tr.reachable() {
			continue
		}
		for _, b := range payloads {
			n := int64(len(b) + 5) // frame header
			sn.directSent.Add(n)
			other.directRecv.Add(n)
			select {
			case other.inbox <- b:
			default:
				sn.tr.dropped.Add(1) // a connection this far behind would be cut too
			}
		}
	}
}

// change opens or closes one connection at origin and follows it.
func (c *simCluster) change(origin *simNode, domain string, delta, want int) *simProbe {
	pr := &simProbe{
		origin: origin.idx, domain: domain, want: want,
		seen: make([]time.Time, len(c.nodes)), stale: make([]bool, len(c.nodes)),
		left: len(c.nodes) - 1, done: make(chan struct{}),
	}
	origin.sendMu.Lock()
	if delta > 0 {
		origin.lim.Opened(domain)
	} else {
		origin.lim.Closed(domain)
	}
	pr.t0 = time.Now()
	c.mu.Lock()
	c.probes[domain] = pr
	c.mu.Unlock()
	origin.sendMu.Unlock()
	return pr
}

// received is sn's handler of count events: Limits.HandleEvent, then the
// check of the probes the event may complete.
func (c *simCluster) received(sn *simNode, b []byte) {
	sn.lim.HandleEvent(b)
	from, _, err := decodeCounts(b)
	if err != nil {
		return
	}
	recheck := sn.pending.Load() > 0
	c.mu.Lock()
	var check []*simProbe
	for _, pr := range c.probes {
		if pr.origin != sn.idx && (recheck || c.nodes[pr.origin].name == from) {
			check = append(check, pr)
		}
	}
	c.mu.Unlock()
	now := time.Now()
	for _, pr := range check {
		held := sn.lim.ClusterHeld(pr.domain)
		fromOrigin := c.nodes[pr.origin].name == from
		pr.mu.Lock()
		if pr.seen[sn.idx].IsZero() && (fromOrigin || pr.stale[sn.idx]) {
			switch {
			case held == pr.want:
				pr.seen[sn.idx] = now
				if pr.stale[sn.idx] {
					pr.stale[sn.idx] = false
					sn.pending.Add(-1)
				}
				pr.left--
				if pr.left == 0 {
					close(pr.done)
				}
			case fromOrigin && !pr.stale[sn.idx]:
				// The origin's count is here but another node's has
				// expired or lags: wait for any event to fix it.
				pr.stale[sn.idx] = true
				sn.pending.Add(1)
			}
		}
		pr.mu.Unlock()
	}
}

func (c *simCluster) bytes() (sent, received int64) {
	for _, sn := range c.nodes {
		sent += sn.tr.sent.Load() + sn.directSent.Load()
		received += sn.tr.received.Load() + sn.directRecv.Load()
	}
	return sent, received
}

func (c *simCluster) sentPerNode() []int64 {
	out := make([]int64, len(c.nodes))
	for i, sn := range c.nodes {
		out[i] = sn.tr.sent.Load() + sn.directSent.Load()
	}
	return out
}

// rate is bytes per second per node.
func (c *simCluster) rate(from, to int64, d time.Duration) float64 {
	return float64(to-from) / d.Seconds() / float64(len(c.nodes))
}

func simWait(limit time.Duration, ok func() bool) bool {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if ok() {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return ok()
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// quantile returns the q-quantile of ds (nearest rank), 0 for none.
func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(q*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

package cluster

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"strings"
	"sync"
	"time"
)

// Limits shares per-domain outbound connection counts across the cluster
// and enforces cluster-wide limits (Config.DomainLimits). It implements
// engine.ConnLimits.
//
// Rule. With L the cluster limit of a domain and N the alive nodes, each
// node has a fair share S = L/N. A node may hold
//
//	L − Σ over the other alive nodes of: their gossiped count, raised to
//	S if they want the domain; S for a node not heard from lately
//
// so a node that wants connections always gets its share, and shares
// that others report unused are borrowed. A node wants a domain when it
// asked for its allowance within the last demandWindow. While its own
// demand is newer than 2.5 × CountInterval (the others may not know it
// yet and may be borrowing its share), a node takes at most S. Every
// CountInterval each node whose report changed sends every other member,
// directly, a report of the limited keys it holds connections to or
// wants (an empty report says it uses none); an unchanged report is sent
// again every refreshIntervals × CountInterval. A node not heard from for
// staleAfter (two refreshes and an interval) is assumed to want its
// share, and all counts of a failed or departed node are dropped.
//
// Overshoot. A borrower learns of a new demand up to CountInterval plus
// the gossip delay late, and gives connections back as each finishes its
// current batch (the scheduler closes connections over the allowance).
// Meanwhile the newcomer holds its share: the cluster exceeds L by at
// most S per node whose demand is new, for at most CountInterval + gossip
// delay + one batch. When L < N, S is 0 and nodes that start wanting at
// the same moment may together open up to N−1 more than L before they
// see each other. docs/CLUSTER.md has the measured figures.
type Limits struct {
	self     string
	interval time.Duration
	now      func() time.Time
	alive    func() int
	send     func(payload []byte) error

	mu     sync.Mutex
	limits map[string]int
	rates  map[string]float64 // messages per second, cluster-wide
	local  map[string]*localCount
	peers  map[string]map[string]peerCount // node → domain (or site key) → count
	heard  map[string]time.Time            // node → when its last report came
	sent   map[string]bool                 // keys in our last report (sent once more as zero when idle)

	// The last report sent (concatenated payloads) and when: an
	// unchanged report waits for the refresh.
	lastReport []byte
	lastSentAt time.Time

	// Sites: connection limits shared by all domains whose MX hosts end
	// in a suffix (site_limits); counted under the key "site:" + suffix.
	sites     []string             // suffixes, longest first
	siteOf    map[string]siteEntry // domain → its site ("" none), cached
	lookupMX  func(domain string) ([]string, error)
	resolving map[string]bool
	openSite  map[string]string // domain → site its open connections count under

	stop chan struct{}
	done chan struct{}
}

type localCount struct {
	conns      int
	wanted     time.Time // last allowance request
	wantedFrom time.Time // start of the current run of requests
}

type peerCount struct {
	conns  int
	demand bool
	at     time.Time
}

// refreshIntervals is how many count intervals an unchanged report
// waits before it is sent again. Changes go out at the next interval;
// the refresh only tells the others this node is alive and its counts
// are current, so sending it every interval (as before) made the
// cluster's report traffic N² × 2/s for nothing (the 200-node
// simulation).
const refreshIntervals = 4

// staleAfter is how long a node's report counts once it stops coming:
// two missed refreshes and one interval of delay.
func (l *Limits) staleAfter() time.Duration {
	return (2*refreshIntervals + 1) * l.interval
}

// demandWindow is how long an allowance request counts as demand.
const demandWindow = 2 * time.Second

// countEvent is the user event carrying connection counts.
const countEvent = "hermod-counts"

// NewLimits returns the limits of node self. alive counts the alive
// members; send broadcasts a payload to every member (Node.Broadcast).
func NewLimits(self string, limits map[string]int, interval time.Duration, alive func() int, send func([]byte) error) *Limits {
	l := &Limits{
		self: self, interval: interval, now: time.Now, alive: alive, send: send,
		limits: map[string]int{}, rates: map[string]float64{}, local: map[string]*localCount{},
		peers: map[string]map[string]peerCount{}, siteOf: map[string]siteEntry{},
		heard: map[string]time.Time{}, sent: map[string]bool{},
		resolving: map[string]bool{}, openSite: map[string]string{},
		stop: make(chan struct{}), done: make(chan struct{}),
	}
	l.SetLimits(limits)
	return l
}

// SetLimits replaces the cluster-wide limits (configuration reload).
func (l *Limits) SetLimits(limits map[string]int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	keep := map[string]int{}
	for k, n := range l.limits {
		if strings.HasPrefix(k, sitePrefix) {
			keep[k] = n
		}
	}
	l.limits = keep
	for d, n := range limits {
		l.limits[d] = n
	}
}

const (
	sitePrefix = "site:"
	siteTTL    = 10 * time.Minute
)

type siteEntry struct {
	site string
	at   time.Time
}

// SetSiteLimits replaces the per-site limits: suffix of MX host names →
// connections all nodes together hold to the domains served there.
// lookupMX returns a domain's MX host names, most preferred first; it
// may block (it runs on its own goroutine) and is cached for 10 minutes.
func (l *Limits) SetSiteLimits(sites map[string]int, lookupMX func(domain string) ([]string, error)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for k := range l.limits {
		if strings.HasPrefix(k, sitePrefix) {
			delete(l.limits, k)
		}
	}
	l.sites = l.sites[:0]
	for suffix, n := range sites {
		suffix = strings.ToLower(strings.TrimSuffix(strings.TrimPrefix(suffix, "."), "."))
		l.limits[sitePrefix+suffix] = n
		l.sites = append(l.sites, suffix)
	}
	slices.SortFunc(l.sites, func(a, b string) int { return len(b) - len(a) })
	l.siteOf = map[string]siteEntry{}
	if lookupMX != nil {
		l.lookupMX = lookupMX
	}
}

// siteKey returns the site key of domain, "" when it has none or is not
// known yet (a lookup is then started).
func (l *Limits) siteKey(domain string, now time.Time) string {
	if len(l.sites) == 0 || l.lookupMX == nil {
		return ""
	}
	if e, ok := l.siteOf[domain]; ok && now.Sub(e.at) < siteTTL {
		if e.site == "" {
			return ""
		}
		return sitePrefix + e.site
	}
	if !l.resolving[domain] {
		l.resolving[domain] = true
		go l.resolveSite(domain)
	}
	if e, ok := l.siteOf[domain]; ok && e.site != "" {
		return sitePrefix + e.site // stale but better than none
	}
	return ""
}

func (l *Limits) resolveSite(domain string) {
	hosts, err := l.lookupMX(domain)
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.resolving, domain)
	if err != nil {
		return // tried again at the next allowance request
	}
	site := ""
	for _, h := range hosts {
		h = strings.ToLower(strings.TrimSuffix(h, "."))
		for _, suf := range l.sites {
			if h == suf || strings.HasSuffix(h, "."+suf) {
				site = suf
				break
			}
		}
		if site != "" {
			break
		}
	}
	l.siteOf[domain] = siteEntry{site: site, at: l.now()}
}

// Allowance implements engine.ConnLimits: the smaller of the domain's
// allowance and its site's, each by the rule in the type's comment.
func (l *Limits) Allowance(domain string) (int, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	n, ok := 0, false
	if _, lim := l.limits[domain]; lim {
		n, ok = l.allowanceKey(domain, l.want(domain, now).conns, now), true
	}
	if sk := l.siteKey(domain, now); sk != "" {
		l.want(domain, now) // the domain's count feeds the site's
		held := l.siteHeld(sk)
		l.want(sk, now).conns = held
		if a := l.allowanceKey(sk, held, now); !ok || a < n {
			n, ok = a, true
		}
	}
	return n, ok
}

// siteHeld sums this node's connections counted under site key sk.
func (l *Limits) siteHeld(sk string) int {
	n := 0
	for d, s := range l.openSite {
		if s == sk {
			if lc := l.local[d]; lc != nil {
				n += lc.conns
			}
		}
	}
	return n
}

// allowanceKey applies the rule to one key (a domain or a site) given
// this node's count held for it.
func (l *Limits) allowanceKey(key string, held int, now time.Time) int {
	limit := l.limits[key]
	lc := l.local[key]
	n := max(l.alive(), 1)
	share := limit / n
	others, heard := 0, 0
	stale := now.Add(-l.staleAfter())
	for node, counts := range l.peers {
		if l.heard[node].Before(stale) {
			continue // not heard from lately: assumed to want its share below
		}
		heard++
		c, ok := counts[key]
		if !ok || c.at.Before(stale) {
			continue // heard, and not using the key
		}
		h := c.conns
		if c.demand && h < share {
			h = share
		}
		others += h
	}
	// Alive nodes not heard from lately may want their share.
	others += max(n-1-heard, 0) * share
	allowed := max(limit-others, 0)
	if lc != nil && now.Sub(lc.wantedFrom) < 2*l.interval+l.interval/2 {
		// Our demand is new: the others have not seen it yet and may be
		// borrowing our share. Take at most the share until they have.
		allowed = min(allowed, max(share, held))
	}
	return allowed
}

// want records local demand for domain and returns its count.
func (l *Limits) want(domain string, now time.Time) *localCount {
	lc := l.local[domain]
	if lc == nil {
		lc = &localCount{}
		l.local[domain] = lc
	}
	if lc.wantedFrom.IsZero() || now.Sub(lc.wanted) >= demandWindow {
		lc.wantedFrom = now
	}
	lc.wanted = now
	return lc
}

// SetRates replaces the cluster-wide message rates (per second).
func (l *Limits) SetRates(rates map[string]float64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.rates = make(map[string]float64, len(rates))
	for d, r := range rates {
		l.rates[d] = r
	}
}

// Rate implements engine.ConnLimits: the cluster rate R of domain is
// split evenly among the nodes that want the domain — this one, those
// that reported demand, and alive nodes not heard from lately (they may
// want it). A node learns of another's demand within a count interval,
// so the cluster exceeds R by at most R/k × (k−1)/k for about that long
// when k nodes start at once.
func (l *Limits) Rate(domain string) (float64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	rate, ok := l.rates[domain]
	if !ok {
		return 0, false
	}
	now := l.now()
	l.want(domain, now)
	n := max(l.alive(), 1)
	wanting, heard := 1, 0
	stale := now.Add(-l.staleAfter())
	for node, counts := range l.peers {
		if l.heard[node].Before(stale) {
			continue
		}
		heard++
		if c, ok := counts[domain]; ok && !c.at.Before(stale) && c.demand {
			wanting++
		}
	}
	wanting += max(n-1-heard, 0)
	return rate / float64(wanting), true
}

// Opened implements engine.ConnLimits.
func (l *Limits) Opened(domain string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, lim := l.limits[domain]
	_, rated := l.rates[domain]
	sk := ""
	if lc := l.local[domain]; lc != nil && lc.conns > 0 {
		sk = l.openSite[domain] // keep counting under the site of the open ones
	} else {
		sk = l.siteKey(domain, l.now())
	}
	if !lim && !rated && sk == "" {
		return
	}
	lc := l.local[domain]
	if lc == nil {
		lc = &localCount{}
		l.local[domain] = lc
	}
	lc.conns++
	if sk != "" {
		l.openSite[domain] = sk
	}
}

// Closed implements engine.ConnLimits.
func (l *Limits) Closed(domain string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if lc := l.local[domain]; lc != nil && lc.conns > 0 {
		lc.conns--
		if lc.conns == 0 {
			delete(l.openSite, domain)
		}
	}
}

// Held returns this node's connection count for domain (tests, stats).
func (l *Limits) Held(domain string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	if lc := l.local[domain]; lc != nil {
		return lc.conns
	}
	return 0
}

// Start sends the local counts (Report) every interval until Stop.
func (l *Limits) Start() {
	go func() {
		defer close(l.done)
		t := time.NewTicker(l.interval)
		defer t.Stop()
		for {
			select {
			case <-l.stop:
				return
			case <-t.C:
				for _, p := range l.Report() {
					_ = l.send(p)
				}
			}
		}
	}()
}

// Stop ends the gossip started by Start.
func (l *Limits) Stop() {
	close(l.stop)
	<-l.done
}

// Report returns the payloads to send now: this node's report when it
// differs from the last one sent or when the last one is a refresh
// interval old; nil otherwise.
func (l *Limits) Report() [][]byte {
	ps := l.payloads()
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	n := 0
	for _, p := range ps {
		n += len(p)
	}
	cur := make([]byte, 0, n)
	for _, p := range ps {
		cur = append(cur, p...)
	}
	// A refresh is due a little early (half an interval), so that ticker
	// jitter cannot push it a whole interval late.
	if bytes.Equal(cur, l.lastReport) && now.Sub(l.lastSentAt) < refreshIntervals*l.interval-l.interval/2 {
		return nil
	}
	l.lastReport, l.lastSentAt = cur, now
	return ps
}

// maxCountPayload keeps each event under serf's user event limit (set to
// 9 KiB by Node; the name and framing take the rest).
const maxCountPayload = 8 * 1024

// payloads encodes this node's report: the limited keys (domains,
// sites) it holds connections to or wants, plus, once, those it stopped
// using (as zero). A report is sent every interval even when empty: it
// tells the others this node is alive and using nothing else. Format:
// version 1, sender, then entries of key, conns (uvarint), demand
// (byte); split into several payloads when large.
func (l *Limits) payloads() [][]byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	var out [][]byte
	var cur []byte
	start := func() {
		cur = append(cur[:0:0], 1)
		cur = appendStr(cur, l.self)
	}
	start()
	domains := make(map[string]bool, len(l.limits)+len(l.rates))
	for d := range l.limits {
		domains[d] = true
	}
	for d := range l.rates {
		domains[d] = true
	}
	// Forget idle domains counted only for their site.
	for d, lc := range l.local {
		if lc.conns == 0 && !domains[d] && now.Sub(lc.wanted) >= demandWindow {
			delete(l.local, d)
		}
	}
	sent := map[string]bool{}
	// In a fixed order, so that an unchanged report encodes the same
	// bytes (Report compares them).
	keys := make([]string, 0, len(domains))
	for d := range domains {
		keys = append(keys, d)
	}
	slices.Sort(keys)
	for _, d := range keys {
		demand, conns := false, 0
		if lc := l.local[d]; lc != nil {
			demand = now.Sub(lc.wanted) < demandWindow
			conns = lc.conns
		}
		if strings.HasPrefix(d, sitePrefix) {
			conns = l.siteHeld(d)
		}
		if conns == 0 && !demand {
			if !l.sent[d] {
				continue
			}
		} else {
			sent[d] = true
		}
		cur = appendStr(cur, d)
		cur = binary.AppendUvarint(cur, uint64(conns))
		if demand {
			cur = append(cur, 1)
		} else {
			cur = append(cur, 0)
		}
		if len(cur) > maxCountPayload-300 {
			out = append(out, cur)
			start()
		}
	}
	out = append(out, cur)
	l.sent = sent
	return out
}

// HandleEvent merges another node's counts (the countEvent handler).
func (l *Limits) HandleEvent(payload []byte) {
	node, entries, err := decodeCounts(payload)
	if err != nil || node == l.self {
		return
	}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.heard[node] = now
	m := l.peers[node]
	if m == nil {
		m = map[string]peerCount{}
		l.peers[node] = m
	}
	for _, e := range entries {
		m[e.domain] = peerCount{conns: e.conns, demand: e.demand, at: now}
	}
}

// Forget drops the counts of a node that failed or left.
func (l *Limits) Forget(node string) {
	l.mu.Lock()
	delete(l.peers, node)
	delete(l.heard, node)
	l.mu.Unlock()
}

// ClusterHeld returns the connections the cluster holds to domain as this
// node sees it (its own exact, the others' as last gossiped).
func (l *Limits) ClusterHeld(domain string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	if lc := l.local[domain]; lc != nil {
		n = lc.conns
	}
	if strings.HasPrefix(domain, sitePrefix) {
		n = l.siteHeld(domain)
	}
	stale := l.now().Add(-l.staleAfter())
	for _, counts := range l.peers {
		if c, ok := counts[domain]; ok && !c.at.Before(stale) {
			n += c.conns
		}
	}
	return n
}

type countEntry struct {
	domain string
	conns  int
	demand bool
}

var errBadCounts = errors.New("cluster: malformed counts event")

func decodeCounts(b []byte) (string, []countEntry, error) {
	if len(b) < 1 || b[0] != 1 {
		return "", nil, errBadCounts
	}
	b = b[1:]
	node, b, ok := readStr(b)
	if !ok {
		return "", nil, errBadCounts
	}
	var out []countEntry
	for len(b) > 0 {
		var e countEntry
		e.domain, b, ok = readStr(b)
		if !ok {
			return "", nil, errBadCounts
		}
		v, k := binary.Uvarint(b)
		if k <= 0 || v > 1<<20 || len(b) < k+1 {
			return "", nil, errBadCounts
		}
		e.conns, e.demand = int(v), b[k] == 1
		b = b[k+1:]
		out = append(out, e)
	}
	return node, out, nil
}

func appendStr(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func readStr(b []byte) (string, []byte, bool) {
	n, k := binary.Uvarint(b)
	if k <= 0 || n > uint64(len(b)-k) {
		return "", nil, false
	}
	return string(b[k : k+int(n)]), b[k+int(n):], true
}

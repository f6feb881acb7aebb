package cluster

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// Inbound shares per-client connection counts and connection rates
// across the cluster, and the blocklist, so that a client spreading its
// connections over the nodes meets the cluster-wide limits. It
// implements engine.ConnGuard. A client is an IPv4 address or an IPv6
// /64.
//
// Each node gossips, every CountInterval, the clients it holds at least
// T = max(1, limit/(2N)) connections from or that connected at least
// max(1, rate/(2N)) times in the last minute (at most maxIPEntries, the
// busiest first). A node refuses a connection with 421 4.7.0 when its own
// count plus the others' last reports reaches the limit. Overshoot: each
// node may hold up to T−1 unreported connections of a client, plus what
// arrives within one interval and the gossip delay: at most about
// limit/2 + (connections per interval) over the limit.
//
// Blocks (prefix, expiry, reason) are broadcast to every node, applied
// within the gossip delay, kept on disk, and re-broadcast to a node that
// joins. A blocked client is refused with 554 5.7.1.
type Inbound struct {
	self      string
	interval  time.Duration
	now       func() time.Time
	alive     func() int
	send      func(event string, payload []byte) error
	blockFile string

	mu       sync.Mutex
	maxConns int
	maxRate  int
	local    map[netip.Prefix]*clientCount
	peers    map[string]map[netip.Prefix]peerClient
	blocks   map[netip.Prefix]Block

	stop chan struct{}
	done chan struct{}
}

// Block is one blocked network.
type Block struct {
	Prefix string    `json:"prefix"`
	Until  time.Time `json:"until,omitzero"`
	Reason string    `json:"reason,omitempty"`
	By     string    `json:"by,omitempty"`
}

type clientCount struct {
	conns     int
	minute    int64 // unix minute of cur
	cur, prev int   // arrivals this minute and the previous one
}

// rate estimates arrivals over the last 60 s (sliding window).
func (c *clientCount) rate(now time.Time) int {
	m := now.Unix() / 60
	cur, prev := c.cur, c.prev
	switch {
	case m == c.minute+1:
		cur, prev = 0, c.cur
	case m > c.minute+1:
		cur, prev = 0, 0
	}
	frac := float64(now.Unix()%60) / 60
	return cur + int(float64(prev)*(1-frac))
}

func (c *clientCount) arrive(now time.Time) {
	m := now.Unix() / 60
	switch {
	case m == c.minute:
	case m == c.minute+1:
		c.prev, c.cur = c.cur, 0
	default:
		c.prev, c.cur = 0, 0
	}
	c.minute = m
	c.cur++
}

type peerClient struct {
	conns, rate int
	at          time.Time
}

const (
	ipEvent      = "hermod-ips"
	blockEvent   = "hermod-block"
	maxIPEntries = 400
)

// NewInbound returns the guard of node self. maxConns and maxRate
// (connections per minute) are cluster-wide per client; 0 disables each.
func NewInbound(self string, maxConns, maxRate int, interval time.Duration, stateDir string,
	alive func() int, send func(string, []byte) error) (*Inbound, error) {
	in := &Inbound{
		self: self, interval: interval, now: time.Now, alive: alive, send: send,
		maxConns: maxConns, maxRate: maxRate,
		local: map[netip.Prefix]*clientCount{}, peers: map[string]map[netip.Prefix]peerClient{},
		blocks: map[netip.Prefix]Block{}, stop: make(chan struct{}), done: make(chan struct{}),
	}
	if stateDir != "" {
		in.blockFile = filepath.Join(stateDir, "blocks.json")
		if err := in.loadBlocks(); err != nil {
			return nil, err
		}
	}
	return in, nil
}

// clientOf maps an address to its client key.
func clientOf(ip netip.Addr) netip.Prefix {
	ip = ip.Unmap()
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, _ := ip.Prefix(bits)
	return p
}

var (
	errClusterConns = smtperr.New(421, "4.7.0", "Error: too many connections from your address (cluster-wide limit), try again later")
	errClusterRate  = smtperr.New(421, "4.7.0", "Error: too many connections from your address per minute (cluster-wide limit), slow down")
)

// Admit implements engine.ConnGuard.
func (in *Inbound) Admit(ip netip.Addr) *smtperr.Error {
	now := in.now()
	in.mu.Lock()
	defer in.mu.Unlock()
	if len(in.blocks) > 0 {
		ip := ip.Unmap()
		for p, b := range in.blocks {
			if p.Contains(ip) && (b.Until.IsZero() || now.Before(b.Until)) {
				return smtperr.New(554, "5.7.1", "Error: connections from %s are blocked by policy", ip)
			}
		}
	}
	if in.maxConns == 0 && in.maxRate == 0 {
		return nil
	}
	key := clientOf(ip)
	c := in.local[key]
	if c == nil {
		c = &clientCount{minute: now.Unix() / 60}
		in.local[key] = c
	}
	conns, rate := c.conns, c.rate(now)
	stale := now.Add(-3 * in.interval)
	for _, m := range in.peers {
		if p, ok := m[key]; ok && !p.at.Before(stale) {
			conns += p.conns
			rate += p.rate
		}
	}
	if in.maxConns > 0 && conns >= in.maxConns {
		return errClusterConns
	}
	if in.maxRate > 0 && rate >= in.maxRate {
		return errClusterRate
	}
	c.conns++
	c.arrive(now)
	return nil
}

// Release implements engine.ConnGuard.
func (in *Inbound) Release(ip netip.Addr) {
	if in.maxConns == 0 && in.maxRate == 0 {
		return
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if c := in.local[clientOf(ip)]; c != nil && c.conns > 0 {
		c.conns--
	}
}

// Start gossips the counts every interval until Stop.
func (in *Inbound) Start() {
	go func() {
		defer close(in.done)
		t := time.NewTicker(in.interval)
		defer t.Stop()
		for {
			select {
			case <-in.stop:
				return
			case <-t.C:
				if p := in.payload(); p != nil {
					_ = in.send(ipEvent, p)
				}
			}
		}
	}()
}

// Stop ends the gossip.
func (in *Inbound) Stop() {
	close(in.stop)
	<-in.done
}

// payload encodes the clients worth reporting: version 1, sender, then
// entries of prefix (string), conns, rate (uvarints).
func (in *Inbound) payload() []byte {
	if in.maxConns == 0 && in.maxRate == 0 {
		return nil
	}
	now := in.now()
	in.mu.Lock()
	defer in.mu.Unlock()
	n := max(in.alive(), 1)
	tc, tr := max(1, in.maxConns/(2*n)), max(1, in.maxRate/(2*n))
	type ent struct {
		p           netip.Prefix
		conns, rate int
	}
	var ents []ent
	for p, c := range in.local {
		r := c.rate(now)
		if c.conns == 0 && r == 0 {
			delete(in.local, p)
			continue
		}
		if (in.maxConns > 0 && c.conns >= tc) || (in.maxRate > 0 && r >= tr) {
			ents = append(ents, ent{p, c.conns, r})
		}
	}
	if len(ents) == 0 {
		return nil
	}
	sort.Slice(ents, func(i, j int) bool { return ents[i].conns+ents[i].rate > ents[j].conns+ents[j].rate })
	if len(ents) > maxIPEntries {
		ents = ents[:maxIPEntries]
	}
	b := []byte{1}
	b = appendStr(b, in.self)
	for _, e := range ents {
		b = appendStr(b, e.p.String())
		b = binary.AppendUvarint(b, uint64(e.conns))
		b = binary.AppendUvarint(b, uint64(e.rate))
	}
	return b
}

// HandleIPs merges another node's report (the ipEvent handler). A report
// replaces that node's previous one.
func (in *Inbound) HandleIPs(payload []byte) {
	if len(payload) < 1 || payload[0] != 1 {
		return
	}
	r := reader{b: payload[1:]}
	node := r.str()
	if r.bad || node == in.self {
		return
	}
	now := in.now()
	m := map[netip.Prefix]peerClient{}
	for len(r.b) > 0 && !r.bad {
		ps := r.str()
		conns, rate := r.uvarint(), r.uvarint()
		p, err := netip.ParsePrefix(ps)
		if r.bad || err != nil || conns > 1<<20 || rate > 1<<30 {
			return
		}
		m[p] = peerClient{conns: int(conns), rate: int(rate), at: now}
	}
	in.mu.Lock()
	in.peers[node] = m
	in.mu.Unlock()
}

// Forget drops the reports of a node that failed or left.
func (in *Inbound) Forget(node string) {
	in.mu.Lock()
	delete(in.peers, node)
	in.mu.Unlock()
}

// Block blocks a network on every node (until zero: for ever).
func (in *Inbound) Block(b Block) error {
	p, err := netip.ParsePrefix(b.Prefix)
	if err != nil {
		if ip, err2 := netip.ParseAddr(b.Prefix); err2 == nil {
			p = netip.PrefixFrom(ip, ip.BitLen())
		} else {
			return fmt.Errorf("cluster: %q is not an address or CIDR prefix", b.Prefix)
		}
	}
	b.Prefix = p.Masked().String()
	if b.By == "" {
		b.By = in.self
	}
	in.apply(true, b)
	return in.send(blockEvent, encodeBlock(true, b))
}

// Unblock removes a block on every node.
func (in *Inbound) Unblock(prefix string) error {
	p, err := netip.ParsePrefix(prefix)
	if err != nil {
		ip, err2 := netip.ParseAddr(prefix)
		if err2 != nil {
			return fmt.Errorf("cluster: %q is not an address or CIDR prefix", prefix)
		}
		p = netip.PrefixFrom(ip, ip.BitLen())
	}
	b := Block{Prefix: p.Masked().String(), By: in.self}
	in.apply(false, b)
	return in.send(blockEvent, encodeBlock(false, b))
}

// Blocks lists the blocks in force.
func (in *Inbound) Blocks() []Block {
	now := in.now()
	in.mu.Lock()
	defer in.mu.Unlock()
	out := []Block{}
	for _, b := range in.blocks {
		if b.Until.IsZero() || now.Before(b.Until) {
			out = append(out, b)
		}
	}
	slices.SortFunc(out, func(a, b Block) int { return cmpStr(a.Prefix, b.Prefix) })
	return out
}

func cmpStr(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Rebroadcast sends every block in force again (to a node that joined).
func (in *Inbound) Rebroadcast() {
	for _, b := range in.Blocks() {
		_ = in.send(blockEvent, encodeBlock(true, b))
	}
}

// HandleBlock applies a block event.
func (in *Inbound) HandleBlock(payload []byte) {
	add, b, err := decodeBlock(payload)
	if err != nil {
		return
	}
	in.apply(add, b)
}

func (in *Inbound) apply(add bool, b Block) {
	p, err := netip.ParsePrefix(b.Prefix)
	if err != nil {
		return
	}
	in.mu.Lock()
	old, had := in.blocks[p]
	if add {
		in.blocks[p] = b
	} else {
		delete(in.blocks, p)
	}
	changed := add != had || (add && old != b)
	in.mu.Unlock()
	if changed {
		_ = in.saveBlocks()
	}
}

func encodeBlock(add bool, b Block) []byte {
	out := []byte{1, 0}
	if add {
		out[1] = 1
	}
	out = appendStr(out, b.Prefix)
	out = binary.AppendVarint(out, nanos(b.Until))
	out = appendStr(out, b.Reason)
	return appendStr(out, b.By)
}

func decodeBlock(p []byte) (bool, Block, error) {
	if len(p) < 2 || p[0] != 1 {
		return false, Block{}, errors.New("cluster: malformed block event")
	}
	r := reader{b: p[2:]}
	b := Block{Prefix: r.str()}
	b.Until = fromNanos(r.varint())
	b.Reason = r.str()
	b.By = r.str()
	if r.bad || len(r.b) != 0 {
		return false, Block{}, errors.New("cluster: malformed block event")
	}
	return p[1] == 1, b, nil
}

func (in *Inbound) saveBlocks() error {
	if in.blockFile == "" {
		return nil
	}
	data, err := json.MarshalIndent(in.Blocks(), "", "  ")
	if err != nil {
		return err
	}
	tmp := in.blockFile + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, in.blockFile)
}

func (in *Inbound) loadBlocks() error {
	data, err := os.ReadFile(in.blockFile)
	if os.IsNotExist(err) {
		return nil
	} else if err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	var list []Block
	if err := json.Unmarshal(data, &list); err != nil {
		return fmt.Errorf("cluster: %s: %w", in.blockFile, err)
	}
	for _, b := range list {
		if p, err := netip.ParsePrefix(b.Prefix); err == nil {
			in.blocks[p] = b
		}
	}
	return nil
}

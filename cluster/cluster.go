package cluster

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hermod-mta/hermod/spool"
)

// ServiceOptions are the collaborators of a Service.
type ServiceOptions struct {
	// Logger gets operational messages; nil discards them.
	Logger *slog.Logger
	// Store is this node's spool (taken-over mail is committed to it, and
	// messages other nodes delivered are removed from it on reconcile).
	Store *spool.Store
	// ReplicaSpool configures the replica store (its Dir is used as is).
	ReplicaSpool spool.Config
	// StateDir keeps the gossip snapshot and the taken-over log.
	StateDir string
	// SMTP and HTTP are this node's listen addresses (published in tags).
	SMTP []string
	HTTP string
	// LookupMX returns a domain's MX host names, most preferred first
	// (site limits). nil disables site limits.
	LookupMX func(domain string) ([]string, error)
	// Listen starts an SMTP listener on a failed peer's address and
	// returns the function that stops it. nil disables address takeover.
	Listen func(addr string) (stop func(), err error)
	// Transport replaces memberlist's network (tests, simulations).
	Node Options
}

// Service is a node's whole cluster side: membership, shared limits,
// replication to peers, holding peers' replicas, taking over a failed
// peer's mail and addresses.
type Service struct {
	cfg  Config
	opt  ServiceOptions
	log  *slog.Logger
	node *Node

	limits   *Limits
	inbound  *Inbound
	repl     *replicator
	hold     *holder
	replicas *spool.Store
	taken    *takenLog

	kick chan struct{}
	stop chan struct{}
	wg   sync.WaitGroup

	addrMu sync.Mutex
	held   map[string][]func() // failed node → stops of its addresses held here
	away   map[string]away     // peers seen failed or gone, not yet back

	takenOver  atomic.Int64
	reconciled atomic.Int64
}

// NewService opens the replica store and prepares the node; Start joins.
func NewService(cfg Config, opt ServiceOptions) (*Service, error) {
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.DiscardHandler)
	}
	if opt.Store == nil {
		return nil, errors.New("cluster: a spool is required")
	}
	nopt := opt.Node
	nopt.Logger = opt.Logger.With("component", "gossip")
	nopt.SMTP, nopt.HTTP, nopt.Dir = opt.SMTP, opt.HTTP, opt.StateDir
	node, err := NewNode(cfg, nopt)
	if err != nil {
		return nil, err
	}
	s := &Service{
		cfg: node.Config(), opt: opt, log: opt.Logger, node: node,
		kick: make(chan struct{}, 1), stop: make(chan struct{}), held: map[string][]func(){}, away: map[string]away{},
	}
	s.limits = NewLimits(cfg.NodeName, cfg.DomainLimits, cfg.CountInterval,
		func() int { return len(node.Alive()) },
		func(p []byte) error { s.report(frameCounts, p); return nil })
	s.limits.SetRates(cfg.DomainRates)
	s.limits.SetSiteLimits(cfg.SiteLimits, opt.LookupMX)
	if err := os.MkdirAll(opt.StateDir, 0o750); err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	s.inbound, err = NewInbound(cfg.NodeName, cfg.MaxConnectionsPerIP, cfg.MaxConnectionRatePerIP, cfg.CountInterval, opt.StateDir,
		func() int { return len(node.Alive()) },
		func(event string, p []byte) error {
			if event == ipEvent {
				s.report(frameClients, p) // frequent: straight to each member
				return nil
			}
			return node.Broadcast(event, p) // blocks: rare, gossiped to all
		})
	if err != nil {
		return nil, err
	}
	s.repl = newReplicator(cfg.NodeName, s.secretKey(), cfg.ReplicationTimeout, opt.Logger.With("component", "replication"))
	return s, nil
}

// report sends a counts report straight to every other alive member, on
// the replication connections: one hop, no retransmission, so the cost
// per node grows with the number of nodes and not with its square (serf
// user events, which every node re-broadcasts, saturated the gossip at
// 10 nodes in the simulation: docs/CLUSTER-SCALING.md). Members not
// connected yet are dialled on their own goroutine.
func (s *Service) report(typ byte, p []byte) {
	for _, m := range s.node.Alive() {
		if m.Name == s.node.Name() || m.Repl == "" {
			continue
		}
		pc := s.repl.peer(m)
		if pc.connected() {
			_ = pc.send(typ, p, false, nil, nil)
			continue
		}
		go func() { _ = pc.send(typ, p, false, nil, nil) }()
	}
}

// secretKey is the decoded cluster key (nil without one).
func (s *Service) secretKey() []byte {
	if s.cfg.SecretKey == "" {
		return nil
	}
	k, _ := base64.StdEncoding.DecodeString(s.cfg.SecretKey) // validated
	return k
}

// isMemberAt reports whether name is a known member (not departed) and,
// without a secret key (which authenticates it instead), whether ip is
// one of its addresses (gossip or replication).
func (s *Service) isMemberAt(name string, ip netip.Addr) bool {
	m, ok := s.node.Member(name)
	if !ok || m.Status == "left" {
		return false
	}
	if s.cfg.SecretKey != "" {
		return true
	}
	for _, a := range []string{m.Gossip, m.Repl} {
		if ap, err := netip.ParseAddrPort(a); err == nil && ap.Addr().Unmap() == ip {
			return true
		}
	}
	return false
}

// Node returns the membership.
func (s *Service) Node() *Node { return s.node }

// Inbound returns the cluster-wide client limits and blocklist
// (engine.ConnGuard).
func (s *Service) Inbound() *Inbound { return s.inbound }

// Limits returns the cluster-wide connection limits (engine.ConnLimits).
func (s *Service) Limits() *Limits { return s.limits }

// Start opens the replica store, listens for replicas, joins the cluster
// and starts the background work (count gossip, takeover checks).
func (s *Service) Start() error {
	if err := os.MkdirAll(s.opt.StateDir, 0o750); err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	if err := os.MkdirAll(s.opt.ReplicaSpool.Dir, 0o750); err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	rs, err := spool.Open(s.opt.ReplicaSpool, s.log.With("component", "replica-spool"))
	if err != nil {
		return fmt.Errorf("cluster: replica store: %w", err)
	}
	s.replicas = rs
	s.taken, err = openTakenLog(filepath.Join(s.opt.StateDir, "taken.log"))
	if err != nil {
		rs.Close()
		return err
	}
	ln, err := net.Listen("tcp", s.cfg.ReplicationListen)
	if err != nil {
		rs.Close()
		return fmt.Errorf("cluster.replication_listen: %w", err)
	}
	s.hold = newHolder(s.log.With("component", "replica-holder"), rs, s.opt.Store, s.taken, ln, s.secretKey(), s.isMemberAt)
	s.hold.reports = map[byte]func([]byte){frameCounts: s.limits.HandleEvent, frameClients: s.inbound.HandleIPs}
	go s.hold.serve()
	s.node.HandleUserEvent(blockEvent, s.inbound.HandleBlock)
	s.node.OnMemberChange(s.memberChange)
	if err := s.node.Start(); err != nil {
		s.hold.close()
		rs.Close()
		return err
	}
	s.limits.Start()
	s.inbound.Start()
	s.wg.Add(1)
	go s.background()
	return nil
}

func (s *Service) memberChange(ch MemberChange) {
	for _, m := range ch.Members {
		if m.Name == s.node.Name() {
			continue
		}
		switch ch.Status {
		case "failed", "left":
			s.limits.Forget(m.Name)
			s.inbound.Forget(m.Name)
			s.repl.forget(m.Name)
			s.addrMu.Lock()
			if _, ok := s.away[m.Name]; !ok || ch.Status == "left" {
				s.away[m.Name] = away{since: time.Now(), left: ch.Status == "left"}
			}
			s.addrMu.Unlock()
			time.AfterFunc(s.takeoverAfter(ch.Status == "left")+50*time.Millisecond, func() {
				select {
				case s.kick <- struct{}{}:
				default:
				}
			})
		case "alive":
			// A peer seen failed is back (it restarted, or a partition
			// healed): ask it what of ours it took over meanwhile.
			s.addrMu.Lock()
			_, back := s.away[m.Name]
			delete(s.away, m.Name)
			s.addrMu.Unlock()
			if back {
				go s.reconcileWith(m)
			}
			// The first alive node by name tells a newcomer the blocks.
			if alive := s.node.Alive(); len(alive) > 0 && alive[0].Name == s.node.Name() {
				go s.inbound.Rebroadcast()
			}
		}
	}
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// background runs takeover and address checks after membership changes
// and every few seconds (to catch what a change missed).
func (s *Service) background() {
	defer s.wg.Done()
	t := time.NewTicker(3 * time.Second)
	defer t.Stop()
	lastCheck := time.Now()
	for {
		select {
		case <-s.stop:
			return
		case <-s.kick:
		case <-t.C:
		}
		if s.cfg.TakeoverEnabled() {
			s.takeoverPass()
			s.addressPass()
		}
		if time.Since(lastCheck) >= checkEvery {
			lastCheck = time.Now()
			s.checkCopies(lastCheck.Add(-copyCheckAge))
		}
	}
}

type away struct {
	since time.Time
	left  bool // left gracefully (rather than failed)
}

func (s *Service) takeoverAfter(left bool) time.Duration {
	if left {
		return max(s.cfg.TakeoverDelay, 5*time.Minute)
	}
	return s.cfg.TakeoverDelay
}

// alive returns the names of the members that count as alive for
// takeover: those alive, and those gone for less than the takeover
// delay (their mail and addresses are left alone for now).
func (s *Service) alive() map[string]bool {
	out := map[string]bool{}
	for _, m := range s.node.Alive() {
		out[m.Name] = true
	}
	now := time.Now()
	s.addrMu.Lock()
	defer s.addrMu.Unlock()
	for name, a := range s.away {
		if now.Sub(a.since) < s.takeoverAfter(a.left) {
			out[name] = true
		}
	}
	return out
}

// Replicate sends copies of msg to Replicas peers and calls done once
// they are durable there (or have failed). It sets msg.Peers (this node,
// then the holders) before returning, so call it before committing msg
// locally. done(nil) means the copies are durable, or that fewer copies
// are allowed (RequireReplicas off; the shortfall is counted).
func (s *Service) Replicate(msg *spool.Message, body []byte, done func(error)) {
	want := s.cfg.ReplicaCount()
	if want == 0 {
		done(nil)
		return
	}
	holders, members := s.chooseHolders(msg.ID, want, nil)
	if len(holders) < want && s.cfg.RequireReplicas {
		done(ErrNoReplicas)
		return
	}
	if len(holders) == 0 {
		s.repl.short.Add(1)
		done(nil)
		return
	}
	msg.Peers = append([]string{s.node.Name()}, holders...)
	s.sendCopies(msg, body, holders, members, want, done)
}

// chooseHolders ranks the alive peers (except those in exclude) for id
// and returns the first want of them.
func (s *Service) chooseHolders(id spool.ID, want int, exclude map[string]bool) ([]string, map[string]Member) {
	var names []string
	members := map[string]Member{}
	for _, m := range s.node.Alive() {
		if m.Name != s.node.Name() && m.Repl != "" && !exclude[m.Name] {
			names = append(names, m.Name)
			members[m.Name] = m
		}
	}
	holders := rank(id, names)
	if len(holders) > want {
		holders = holders[:want]
	}
	return holders, members
}

// sendCopies sends msg (with its Peers already set) to holders and calls
// done when all have answered or ReplicationTimeout has passed; with
// RequireReplicas, fewer than want acknowledgements is ErrNoReplicas.
func (s *Service) sendCopies(msg *spool.Message, body []byte, holders []string, members map[string]Member, want int, done func(error)) {
	payload := appendMessage(nil, msg)
	payload = append(payload, body...)
	var (
		mu       sync.Mutex
		left     = len(holders)
		ok       int
		finished bool
		timer    *time.Timer
	)
	end := func(n int) {
		s.repl.replicated.Add(int64(n))
		if n < want {
			s.repl.short.Add(1)
		}
		if n < want && s.cfg.RequireReplicas {
			done(ErrNoReplicas)
			return
		}
		done(nil)
	}
	finish := func(err error) {
		mu.Lock()
		if finished {
			mu.Unlock()
			return
		}
		if err == nil {
			ok++
		}
		left--
		if left > 0 {
			mu.Unlock()
			return
		}
		finished = true
		if timer != nil {
			timer.Stop()
		}
		n := ok
		mu.Unlock()
		end(n)
	}
	mu.Lock()
	timer = time.AfterFunc(s.cfg.ReplicationTimeout, func() {
		mu.Lock()
		if finished {
			mu.Unlock()
			return
		}
		finished = true
		n := ok
		mu.Unlock()
		end(n)
	})
	mu.Unlock()
	for _, h := range holders {
		p := s.repl.peer(members[h])
		if err := p.send(frameReplicate, payload, true, func(err error) {
			if err != nil {
				s.log.Debug("replica not stored", "peer", h, "msg_id", msg.ID.String(), "err", err)
			}
			finish(err)
		}, nil); err != nil {
			finish(err)
		}
	}
}

// Recorded forwards a delivery outcome to the holders of msg's copies
// (engine.SchedulerOptions.Recorded). Best effort: an outcome that does
// not arrive only means a holder taking over would retry recipients
// already delivered.
func (s *Service) Recorded(msg *spool.Message, updates []spool.Recipient, removed bool) {
	if len(msg.Peers) < 2 || msg.Peers[0] != s.node.Name() {
		return
	}
	var payload []byte
	for _, h := range msg.Peers[1:] {
		m, ok := s.node.Member(h)
		if !ok || !m.Alive() {
			continue
		}
		if payload == nil {
			payload = appendOutcome(nil, msg.ID, updates, removed)
		}
		_ = s.repl.peer(m).send(frameOutcome, payload, false, nil, nil)
	}
}

// takeoverPass delivers, from here, the copies of failed nodes' messages
// this node owns: for each copy whose origin is not alive, the owner is
// the first alive holder in the message's peers list.
func (s *Service) takeoverPass() {
	alive := s.alive()
	self := s.node.Name()
	type item struct {
		origin string
		msg    *spool.Message
	}
	var items []item
	err := s.replicas.Walk(func(m *spool.Message) bool {
		if len(m.Peers) < 2 || alive[m.Peers[0]] {
			return true
		}
		for _, h := range m.Peers[1:] {
			if alive[h] {
				if h == self {
					items = append(items, item{m.Peers[0], m})
				}
				break
			}
		}
		return true
	})
	if err != nil {
		s.log.Error("walking the replica store", "err", err)
		return
	}
	if len(items) == 0 {
		return
	}
	byOrigin := map[string][]spool.ID{}
	for _, it := range items {
		byOrigin[it.origin] = append(byOrigin[it.origin], it.msg.ID)
	}
	for o, ids := range byOrigin {
		if err := s.taken.add(o, ids); err != nil {
			s.log.Error("recording taken-over mail", "err", err)
			return
		}
	}
	var wg sync.WaitGroup
	var n atomic.Int64
	want := s.cfg.ReplicaCount()
	for _, it := range items {
		m := it.msg
		body, err := s.replicas.Body(m.ID)
		if err != nil {
			s.log.Error("reading a replica", "msg_id", m.ID.String(), "err", err)
			continue
		}
		pending := false
		var final []spool.Recipient
		for _, r := range m.Rcpts {
			if r.State == spool.Pending {
				pending = true
			} else {
				final = append(final, r)
			}
		}
		if !pending {
			_ = s.replicas.Delete(m.ID)
			continue
		}
		// The message keeps all its recipients (their indexes are those
		// of the other copies) and is copied again up to Replicas: the
		// other old holders still alive keep their copies (they are
		// replicas of it now, and take over should this node fail too),
		// new holders make up the rest.
		nm := *m
		nm.Rcpts = append([]spool.Recipient(nil), m.Rcpts...)
		nm.Peers = []string{self}
		exclude := map[string]bool{}
		for _, h := range m.Peers {
			exclude[h] = true
			if h != self && h != it.origin && alive[h] {
				nm.Peers = append(nm.Peers, h)
			}
		}
		var fresh []string
		var members map[string]Member
		if need := want - (len(nm.Peers) - 1); need > 0 {
			fresh, members = s.chooseHolders(m.ID, need, exclude)
			nm.Peers = append(nm.Peers, fresh...)
		}
		wg.Add(1)
		var copied chan error
		if len(fresh) > 0 {
			copied = make(chan error, 1)
			s.sendCopies(&nm, body, fresh, members, len(fresh), func(err error) { copied <- err })
		}
		committed := make(chan error, 1)
		s.opt.Store.Commit(&nm, body, func(err error) { committed <- err }) // done must not block
		go func() {
			defer wg.Done()
			err := <-committed
			if copied != nil {
				<-copied
			}
			if err != nil {
				s.log.Error("taking over a message", "msg_id", m.ID.String(), "err", err)
				return
			}
			if len(final) > 0 {
				// Recipients already finished stay finished.
				removed, err := s.opt.Store.Update(nm.ID, final)
				if err != nil {
					s.log.Error("taking over a message", "msg_id", m.ID.String(), "err", err)
				}
				s.Recorded(&nm, final, removed)
			}
			n.Add(1)
			_ = s.replicas.Delete(m.ID)
		}()
	}
	wg.Wait()
	s.takenOver.Add(n.Load())
	s.log.Warn("took over a failed node's mail", "messages", n.Load(), "origins", len(byOrigin))
}

// Copies are checked with their origins every checkEvery, once older
// than copyCheckAge (so that the origin's own commit, which runs beside
// the copy, is surely done, whatever the clocks' skew).
const (
	checkEvery   = time.Minute
	copyCheckAge = 5 * time.Minute
)

// checkCopies asks each alive origin which of the messages this node
// holds copies of (received before cutoff) are gone from its spool, and
// drops those copies: they were delivered and the outcome was lost, or
// the origin's own commit failed. Without it such copies would linger
// and be delivered again if the origin ever failed.
func (s *Service) checkCopies(cutoff time.Time) int {
	alive := map[string]Member{}
	for _, m := range s.node.Alive() {
		alive[m.Name] = m
	}
	byOrigin := map[string][]spool.ID{}
	err := s.replicas.Walk(func(m *spool.Message) bool {
		if len(m.Peers) > 0 && m.Received.Before(cutoff) {
			if _, ok := alive[m.Peers[0]]; ok && m.Peers[0] != s.node.Name() {
				byOrigin[m.Peers[0]] = append(byOrigin[m.Peers[0]], m.ID)
			}
		}
		return true
	})
	if err != nil {
		s.log.Error("walking the replica store", "err", err)
		return 0
	}
	dropped := 0
	for origin, ids := range byOrigin {
		for len(ids) > 0 {
			chunk := ids[:min(len(ids), 2000)]
			ids = ids[len(chunk):]
			ans := make(chan []byte, 1)
			if err := s.repl.peer(alive[origin]).send(frameCheck, appendIDs(nil, chunk), true, nil, ans); err != nil {
				break
			}
			var b []byte
			select {
			case b = <-ans:
			case <-time.After(10 * time.Second):
			}
			gone, err := decodeIDs(b)
			if b == nil || err != nil {
				break
			}
			for _, id := range gone {
				if s.replicas.Delete(id) == nil {
					dropped++
				}
			}
		}
	}
	if dropped > 0 {
		s.hold.dropped.Add(int64(dropped))
		s.log.Info("dropped copies whose origin no longer has the message", "copies", dropped)
	}
	return dropped
}

// addressPass answers on failed nodes' SMTP addresses: the owner of a
// failed node's addresses is the alive node ranked first for its name.
// Addresses are released when the node is alive again (or another node
// ranks first).
func (s *Service) addressPass() {
	if s.opt.Listen == nil {
		return
	}
	alive := s.alive()
	var names []string // candidates: members really alive
	for _, m := range s.node.Alive() {
		names = append(names, m.Name)
	}
	self := s.node.Name()
	want := map[string]Member{}
	for _, m := range s.node.Members() {
		if m.Status != "failed" || len(m.SMTP) == 0 || alive[m.Name] {
			continue
		}
		if r := rankKey([]byte(m.Name), names); len(r) > 0 && r[0] == self {
			want[m.Name] = m
		}
	}
	s.addrMu.Lock()
	defer s.addrMu.Unlock()
	for name, stops := range s.held {
		if _, ok := want[name]; ok {
			continue
		}
		for _, stop := range stops {
			stop()
		}
		delete(s.held, name)
		s.log.Info("released a peer's SMTP addresses", "peer", name)
	}
	for name, m := range want {
		if _, ok := s.held[name]; ok {
			continue
		}
		var stops []func()
		for _, a := range m.SMTP {
			if err := s.runHook("add", a); err != nil {
				s.log.Error("address hook", "addr", a, "err", err)
				continue
			}
			stop, err := s.opt.Listen(a)
			if err != nil {
				s.log.Error("taking over a peer's SMTP address", "peer", name, "addr", a, "err", err)
				_ = s.runHook("del", a)
				continue
			}
			addr := a
			stops = append(stops, func() { stop(); _ = s.runHook("del", addr) })
			s.log.Warn("answering on a failed peer's SMTP address", "peer", name, "addr", a)
		}
		if len(stops) > 0 {
			s.held[name] = stops
		}
	}
}

func (s *Service) runHook(op, addr string) error {
	if s.cfg.AddressHook == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, s.cfg.AddressHook, op, addr).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s %s: %w: %s", s.cfg.AddressHook, op, addr, err, out)
	}
	return nil
}

// reconcileWith asks peer m which of this node's messages it took over
// and removes them from the spool. It returns how many were removed.
func (s *Service) reconcileWith(m Member) (int, error) {
	if m.Repl == "" {
		return 0, nil
	}
	ans := make(chan []byte, 1)
	payload := appendStr(nil, s.node.Name())
	if err := s.repl.peer(m).send(frameReconcile, payload, true, nil, ans); err != nil {
		return 0, err
	}
	var b []byte
	select {
	case b = <-ans:
	case <-time.After(s.cfg.ReconcileTimeout):
		return 0, fmt.Errorf("cluster: %s did not answer the reconciliation", m.Name)
	}
	if b == nil {
		return 0, fmt.Errorf("cluster: connection to %s lost during reconciliation", m.Name)
	}
	ids, err := decodeIDs(b)
	if err != nil {
		return 0, err
	}
	removed := 0
	for _, id := range ids {
		if err := s.opt.Store.Delete(id); err == nil {
			removed++
		}
	}
	if removed > 0 {
		s.reconciled.Add(int64(removed))
		s.log.Warn("dropped mail a peer delivered while this node was away", "peer", m.Name, "messages", removed)
	}
	return removed, nil
}

// Reconcile runs before delivery starts: it waits (up to
// ReconcileTimeout) to see the cluster, then asks every alive peer which
// of this node's messages it took over, and removes them from the spool.
func (s *Service) Reconcile() int {
	deadline := time.Now().Add(s.cfg.ReconcileTimeout)
	if len(s.cfg.Join) > 0 {
		for len(s.node.Alive()) < 2 && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
	}
	total := 0
	for _, m := range s.node.Alive() {
		if m.Name == s.node.Name() {
			continue
		}
		n, err := s.reconcileWith(m)
		if err != nil {
			s.log.Warn("reconciliation", "peer", m.Name, "err", err)
		}
		total += n
	}
	return total
}

// Stats are the service's counters.
type Stats struct {
	Members          []Member `json:"members"`
	ReplicasSent     int64    `json:"replicas_acknowledged"`
	ReplicationShort int64    `json:"messages_with_fewer_replicas"`
	ReplicasStored   int64    `json:"replicas_stored"`
	ReplicasHeld     int64    `json:"replicas_held"`
	ReplicasDropped  int64    `json:"replicas_dropped"`
	// ReplicasRefused counts copies this node could not store (replica
	// spool short of space, or failed); ReplicaSpoolFailed is the replica
	// spool's failure, "" while it works.
	ReplicasRefused    int64    `json:"replicas_refused"`
	ReplicaSpoolFailed string   `json:"replica_spool_failed,omitempty"`
	TakenOver          int64    `json:"taken_over"`
	Reconciled         int64    `json:"reconciled"`
	AddressesHeld      []string `json:"addresses_held_for"`
}

// Stats returns the counters.
func (s *Service) Stats() Stats {
	st := Stats{
		Members: s.node.Members(), ReplicasSent: s.repl.replicated.Load(), ReplicationShort: s.repl.short.Load(),
		TakenOver: s.takenOver.Load(), Reconciled: s.reconciled.Load(),
	}
	if s.hold != nil {
		st.ReplicasStored, st.ReplicasDropped = s.hold.stored.Load(), s.hold.dropped.Load()
		st.ReplicasRefused = s.hold.failed.Load()
	}
	if s.replicas != nil {
		st.ReplicasHeld = s.replicas.Stats().Messages
		if err := s.replicas.Err(); err != nil {
			st.ReplicaSpoolFailed = err.Error()
		}
	}
	s.addrMu.Lock()
	for n := range s.held {
		st.AddressesHeld = append(st.AddressesHeld, n)
	}
	s.addrMu.Unlock()
	return st
}

// Close leaves the cluster (gracefully: peers do not take over), releases
// held addresses and closes the replica store.
func (s *Service) Close(ctx context.Context) error {
	close(s.stop)
	s.wg.Wait()
	s.limits.Stop()
	s.inbound.Stop()
	s.addrMu.Lock()
	for _, stops := range s.held {
		for _, stop := range stops {
			stop()
		}
	}
	s.held = map[string][]func(){}
	s.addrMu.Unlock()
	err := s.node.Close(ctx)
	s.repl.closeAll()
	s.hold.close()
	if e := s.replicas.Close(); err == nil {
		err = e
	}
	if e := s.taken.close(); err == nil {
		err = e
	}
	return err
}

package cluster

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/serf/serf"
)

// Member is one node of the cluster as gossip sees it.
type Member struct {
	Name   string `json:"name"`
	ID     int    `json:"node_id"`
	Gossip string `json:"gossip"`
	// SMTP are the node's own SMTP listen addresses.
	SMTP []string `json:"smtp"`
	// HTTP is its admin API address ("" when off).
	HTTP string `json:"http,omitempty"`
	// Repl is its replication address.
	Repl string `json:"replication,omitempty"`
	// ConfigVersion is the version of the cluster configuration it runs.
	ConfigVersion uint64 `json:"config_version"`
	// Status is alive, leaving, left or failed.
	Status string `json:"status"`
}

// Alive reports whether the member is up.
func (m *Member) Alive() bool { return m.Status == "alive" }

// Tags, kept within serf's 512-byte limit.
const (
	tagID     = "id"
	tagSMTP   = "smtp"
	tagHTTP   = "http"
	tagRepl   = "repl"
	tagConfig = "cv"
)

// MemberChange is a membership event: Members changed to Status.
type MemberChange struct {
	Status  string // "alive" (joined or returned), "failed", "left", "update"
	Members []Member
}

// Options are a Node's collaborators.
type Options struct {
	// Logger gets operational messages; nil discards them.
	Logger *slog.Logger
	// SMTP are this node's SMTP listen addresses, published to the others
	// (address takeover).
	SMTP []string
	// HTTP is this node's admin API address ("" or "off": none).
	HTTP string
	// Dir keeps the gossip snapshot (known members, for rejoining after a
	// restart). "" keeps none.
	Dir string
	// Transport replaces memberlist's network transport (simulations and
	// partition tests). nil uses UDP and TCP on Config.Bind.
	Transport memberlist.Transport

	// timeScale (simulations only) stretches every gossip timer that is
	// not in Config by this factor (> 1), to go with a probe interval
	// stretched by the same factor: the protocol then runs k times slower
	// in the same proportions, so that hundreds of members fit in one
	// process. 0 or 1: production timers.
	timeScale int
}

// Node is this process's membership in the cluster.
type Node struct {
	cfg Config
	opt Options
	log *slog.Logger

	serf   *serf.Serf
	events chan serf.Event
	stop   chan struct{}
	wg     sync.WaitGroup

	mu            sync.RWMutex
	members       map[string]*Member
	userHandlers  map[string]func(payload []byte)
	memberHooks   []func(MemberChange)
	configVersion uint64
}

// NewNode validates cfg; Start joins the cluster.
func NewNode(cfg Config, opt Options) (*Node, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if !cfg.Enabled() {
		return nil, errors.New("cluster: bind is not set")
	}
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.DiscardHandler)
	}
	return &Node{
		cfg:          cfg,
		opt:          opt,
		log:          opt.Logger,
		events:       make(chan serf.Event, 1024),
		stop:         make(chan struct{}),
		members:      make(map[string]*Member),
		userHandlers: make(map[string]func([]byte)),
	}, nil
}

// Name is this node's name.
func (n *Node) Name() string { return n.cfg.NodeName }

// ID is this node's id (the one in its queue ids).
func (n *Node) ID() int { return n.cfg.NodeID }

// Config is the node's cluster configuration (defaults applied).
func (n *Node) Config() Config { return n.cfg }

// HandleUserEvent registers fn for user events named name. Register
// before Start; fn runs on the event goroutine and must not block long.
func (n *Node) HandleUserEvent(name string, fn func(payload []byte)) {
	n.mu.Lock()
	n.userHandlers[name] = fn
	n.mu.Unlock()
}

// OnMemberChange registers fn for membership changes. Register before
// Start; fn runs on the event goroutine.
func (n *Node) OnMemberChange(fn func(MemberChange)) {
	n.mu.Lock()
	n.memberHooks = append(n.memberHooks, fn)
	n.mu.Unlock()
}

func hostPort(addr string) (string, int, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return "", 0, fmt.Errorf("port %q: %w", port, err)
	}
	return host, p, nil
}

// Start creates the gossip member and tries to join the cluster in the
// background (Join is retried until a member answers).
func (n *Node) Start() error {
	sc := serf.DefaultConfig()
	sc.NodeName = n.cfg.NodeName
	sc.EventCh = n.events
	sc.Tags = n.tags()
	sc.UserEventSizeLimit = 9 * 1024
	sc.UserCoalescePeriod = 0
	sc.CoalescePeriod = 0
	sc.ReconnectTimeout = 24 * time.Hour
	sc.ReconnectInterval = 2 * time.Second // find a failed peer again soon after a partition heals
	sc.TombstoneTimeout = 24 * time.Hour
	sc.EventBuffer = 4096
	sc.Logger = slog.NewLogLogger(n.log.Handler(), slog.LevelDebug)
	sc.EnableNameConflictResolution = true
	if n.opt.Dir != "" {
		sc.SnapshotPath = filepath.Join(n.opt.Dir, "serf.snapshot")
		sc.RejoinAfterLeave = true
	}
	mc := memberlist.DefaultLANConfig()
	mc.Name = n.cfg.NodeName
	host, port, err := hostPort(n.cfg.Bind)
	if err != nil {
		return fmt.Errorf("cluster.bind: %w", err)
	}
	mc.BindAddr, mc.BindPort = host, port
	ahost, aport, err := hostPort(n.cfg.Advertise)
	if err != nil {
		return fmt.Errorf("cluster.advertise: %w", err)
	}
	mc.AdvertiseAddr, mc.AdvertisePort = ahost, aport
	mc.ProbeInterval = n.cfg.ProbeInterval
	mc.ProbeTimeout = n.cfg.ProbeInterval / 2
	mc.SuspicionMult = n.cfg.SuspicionMult
	mc.GossipInterval = min(mc.GossipInterval, max(n.cfg.ProbeInterval/2, 20*time.Millisecond))
	mc.TCPTimeout = 2 * time.Second
	// Full state exchange with one random member every 5 s (30 s by
	// default) repairs a member list that missed a join quickly; the
	// simulation saw lists missing a member for up to 30 s.
	mc.PushPullInterval = 5 * time.Second
	mc.Logger = sc.Logger
	if n.cfg.SecretKey != "" {
		key, _ := base64.StdEncoding.DecodeString(n.cfg.SecretKey)
		mc.SecretKey = key
	}
	if n.opt.Transport != nil {
		mc.Transport = n.opt.Transport
	}
	if k := time.Duration(n.opt.timeScale); k > 1 {
		// Config's own timers (probe interval, count interval) are
		// stretched by the caller.
		mc.GossipInterval = min(200*time.Millisecond*k, max(n.cfg.ProbeInterval/2, 20*time.Millisecond))
		mc.PushPullInterval *= k
		mc.TCPTimeout *= k
		mc.GossipToTheDeadTime *= k
		sc.ReconnectInterval *= k
	}
	sc.MemberlistConfig = mc
	s, err := serf.Create(sc)
	if err != nil {
		return fmt.Errorf("cluster: starting gossip on %s: %w", n.cfg.Bind, err)
	}
	n.serf = s
	n.refreshMembers()
	n.wg.Add(2)
	go n.eventLoop()
	go n.joinLoop()
	n.log.Info("cluster member started", "node", n.cfg.NodeName, "node_id", n.cfg.NodeID, "gossip", n.cfg.Bind, "join", n.cfg.Join)
	return nil
}

func (n *Node) tags() map[string]string {
	t := map[string]string{
		tagID:     strconv.Itoa(n.cfg.NodeID),
		tagSMTP:   strings.Join(n.opt.SMTP, ","),
		tagRepl:   n.cfg.ReplicationListen,
		tagConfig: strconv.FormatUint(n.configVersion, 10),
	}
	if n.opt.HTTP != "" && n.opt.HTTP != "off" {
		t[tagHTTP] = n.opt.HTTP
	}
	return t
}

// SetConfigVersion publishes the cluster configuration version this node
// runs.
func (n *Node) SetConfigVersion(v uint64) error {
	n.mu.Lock()
	n.configVersion = v
	t := n.tags()
	n.mu.Unlock()
	if n.serf == nil {
		return nil
	}
	return n.serf.SetTags(t)
}

// joinLoop joins the configured peers, retrying every 2 seconds until one
// answers (a node started before its peers joins them when they come).
func (n *Node) joinLoop() {
	defer n.wg.Done()
	if len(n.cfg.Join) == 0 {
		return
	}
	for {
		if len(n.serf.Members()) > 1 {
			return
		}
		if k, err := n.serf.Join(n.cfg.Join, true); err == nil && k > 0 {
			n.log.Info("joined the cluster", "contacted", k)
			return
		} else if err != nil {
			n.log.Debug("join attempt failed", "err", err)
		}
		select {
		case <-n.stop:
			return
		case <-time.After(2 * time.Second):
		}
	}
}

func (n *Node) eventLoop() {
	defer n.wg.Done()
	for {
		select {
		case <-n.stop:
			return
		case ev := <-n.events:
			n.handle(ev)
		}
	}
}

func (n *Node) handle(ev serf.Event) {
	switch e := ev.(type) {
	case serf.MemberEvent:
		n.refreshMembers()
		ch := MemberChange{}
		switch e.Type {
		case serf.EventMemberJoin:
			ch.Status = "alive"
		case serf.EventMemberFailed:
			ch.Status = "failed"
		case serf.EventMemberLeave, serf.EventMemberReap:
			ch.Status = "left"
		case serf.EventMemberUpdate:
			ch.Status = "update"
		default:
			return
		}
		for _, m := range e.Members {
			ch.Members = append(ch.Members, toMember(m))
		}
		n.log.Info("cluster membership", "event", ch.Status, "members", memberNames(ch.Members))
		n.mu.RLock()
		hooks := slices.Clone(n.memberHooks)
		n.mu.RUnlock()
		for _, h := range hooks {
			h(ch)
		}
	case serf.UserEvent:
		n.mu.RLock()
		fn := n.userHandlers[e.Name]
		n.mu.RUnlock()
		if fn != nil {
			fn(e.Payload)
		}
	}
}

func memberNames(ms []Member) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.Name
	}
	return out
}

func toMember(m serf.Member) Member {
	id, _ := strconv.Atoi(m.Tags[tagID])
	cv, _ := strconv.ParseUint(m.Tags[tagConfig], 10, 64)
	var smtp []string
	if s := m.Tags[tagSMTP]; s != "" {
		smtp = strings.Split(s, ",")
	}
	return Member{
		Name: m.Name, ID: id, Gossip: net.JoinHostPort(m.Addr.String(), strconv.Itoa(int(m.Port))),
		SMTP: smtp, HTTP: m.Tags[tagHTTP], Repl: m.Tags[tagRepl], ConfigVersion: cv, Status: m.Status.String(),
	}
}

func (n *Node) refreshMembers() {
	ms := n.serf.Members()
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, m := range ms {
		mm := toMember(m)
		n.members[m.Name] = &mm
	}
}

// Members returns every known member (this node included), by name.
func (n *Node) Members() []Member {
	n.mu.RLock()
	defer n.mu.RUnlock()
	out := make([]Member, 0, len(n.members))
	for _, m := range n.members {
		out = append(out, *m)
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Alive returns the alive members (this node included), by name.
func (n *Node) Alive() []Member {
	all := n.Members()
	out := all[:0]
	for _, m := range all {
		if m.Alive() {
			out = append(out, m)
		}
	}
	return out
}

// Member returns the member named name.
func (n *Node) Member(name string) (Member, bool) {
	n.mu.RLock()
	defer n.mu.RUnlock()
	m, ok := n.members[name]
	if !ok {
		return Member{}, false
	}
	return *m, true
}

// Broadcast sends a user event to every member (this one included).
func (n *Node) Broadcast(name string, payload []byte) error {
	if n.serf == nil {
		return errors.New("cluster: not started")
	}
	return n.serf.UserEvent(name, payload, false)
}

// Close leaves the cluster gracefully (others see "left", not "failed",
// and do not take over) and stops gossip.
func (n *Node) Close(ctx context.Context) error {
	if n.serf == nil {
		return nil
	}
	done := make(chan error, 1)
	go func() { done <- n.serf.Leave() }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		err = ctx.Err()
	}
	close(n.stop)
	if e := n.serf.Shutdown(); err == nil {
		err = e
	}
	n.wg.Wait()
	return err
}

// Kill stops gossip without leaving (tests: the others see a failure).
func (n *Node) Kill() error {
	close(n.stop)
	err := n.serf.Shutdown()
	n.wg.Wait()
	return err
}

// stateDir returns the directory for cluster state files.
func (n *Node) stateDir() string {
	if n.opt.Dir == "" {
		return os.TempDir()
	}
	return n.opt.Dir
}

package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/spool"
)

// freePort returns a port free for both TCP and UDP on host, with the
// next port free for TCP too (replication listens on gossip port + 1).
func freePort(t *testing.T, host string) int {
	t.Helper()
	for i := 0; i < 100; i++ {
		l, err := net.Listen("tcp", host+":0")
		if err != nil {
			t.Fatal(err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if p > 65000 {
			continue
		}
		u, err := net.ListenPacket("udp", fmt.Sprintf("%s:%d", host, p))
		if err != nil {
			continue
		}
		u.Close()
		l2, err := net.Listen("tcp", fmt.Sprintf("%s:%d", host, p+1))
		if err != nil {
			continue
		}
		l2.Close()
		return p
	}
	t.Fatal("no free port")
	return 0
}

type testNode struct {
	name  string
	dir   string
	cfg   Config
	store *spool.Store
	svc   *Service
}

func startNode(t *testing.T, name, dir string, bind string, join []string, limits map[string]int) *testNode {
	return startNodeR(t, name, dir, bind, join, limits, 1)
}

func startNodeR(t *testing.T, name, dir string, bind string, join []string, limits map[string]int, replicas int) *testNode {
	t.Helper()
	return startNodeRC(t, name, dir, bind, join, limits, replicas, nil)
}

// startNodeRC is startNodeR with editReplica (nil: none) applied to the
// replica spool's configuration.
func startNodeRC(t *testing.T, name, dir string, bind string, join []string, limits map[string]int, replicas int, editReplica func(*spool.Config)) *testNode {
	t.Helper()
	cfg := Config{Bind: bind, Join: join, NodeName: name, DomainLimits: limits, ProbeInterval: 100 * time.Millisecond,
		ReconcileTimeout: 3 * time.Second, CountInterval: 100 * time.Millisecond, Replicas: &replicas, TakeoverDelay: time.Second}
	cfg.EnsureDefaults(name)
	scfg := spool.DefaultConfig()
	scfg.Dir = filepath.Join(dir, "spool")
	scfg.NodeID = uint16(cfg.NodeID)
	st, err := spool.Open(scfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	rcfg := spool.DefaultConfig()
	rcfg.Dir = filepath.Join(dir, "replicas")
	if editReplica != nil {
		editReplica(&rcfg)
	}
	svc, err := NewService(cfg, ServiceOptions{Logger: testLogger(), Store: st, ReplicaSpool: rcfg, StateDir: filepath.Join(dir, "cluster"),
		SMTP: []string{"127.0.0.1:1"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Start(); err != nil {
		t.Fatal(err)
	}
	return &testNode{name: name, dir: dir, cfg: cfg, store: st, svc: svc}
}

func (n *testNode) close(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := n.svc.Close(ctx); err != nil {
		t.Logf("close %s: %v", n.name, err)
	}
	n.store.Close()
}

// kill stops the node without leaving: the others see it fail.
func (n *testNode) kill() {
	n.svc.node.Kill()
	close(n.svc.stop)
	n.svc.wg.Wait()
	n.svc.limits.Stop()
	n.svc.inbound.Stop()
	n.svc.repl.closeAll()
	n.svc.hold.close()
	n.svc.replicas.Close()
	n.svc.taken.close()
	n.store.Close()
}

func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func accept(t *testing.T, n *testNode, rcpts ...string) *spool.Message {
	t.Helper()
	msg := &spool.Message{ID: n.store.NewID(), From: "s@example.test"}
	for _, r := range rcpts {
		msg.Rcpts = append(msg.Rcpts, spool.Recipient{Addr: r})
	}
	body := []byte("Subject: t\r\n\r\nhello\r\n")
	errc := make(chan error, 1)
	n.svc.Replicate(msg, body, func(err error) { errc <- err })
	if err := n.store.CommitWait(msg, body); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	return msg
}

// waitCopy waits until holder's replica store has id (and check, when
// not nil, holds for the copy).
func waitCopy(t *testing.T, holder *testNode, id spool.ID, check func(*spool.Message) bool) {
	t.Helper()
	waitFor(t, "copy of "+id.String()+" on "+holder.name, 10*time.Second, func() bool {
		cp, err := holder.svc.replicas.Load(id)
		return err == nil && (check == nil || check(cp))
	})
}

func TestReplicationTakeoverReconcile(t *testing.T) {
	hosts := []string{"127.0.0.1", "127.0.0.1", "127.0.0.1"}
	var binds []string
	for _, h := range hosts {
		binds = append(binds, fmt.Sprintf("%s:%d", h, freePort(t, h)))
	}
	root := t.TempDir()
	a := startNode(t, "a", filepath.Join(root, "a"), binds[0], nil, nil)
	b := startNode(t, "b", filepath.Join(root, "b"), binds[1], binds[:1], nil)
	c := startNode(t, "c", filepath.Join(root, "c"), binds[2], binds[:1], nil)
	defer b.close(t)
	defer c.close(t)
	waitFor(t, "3 members", 10*time.Second, func() bool {
		return len(a.svc.node.Alive()) == 3 && len(b.svc.node.Alive()) == 3 && len(c.svc.node.Alive()) == 3
	})

	// Replicated, then finished: the holder drops its copy.
	m1 := accept(t, a, "x@one.test")
	if len(m1.Peers) != 2 || m1.Peers[0] != "a" {
		t.Fatalf("peers = %q", m1.Peers)
	}
	holder := map[string]*testNode{"b": b, "c": c}[m1.Peers[1]]
	waitCopy(t, holder, m1.ID, nil)
	up := []spool.Recipient{{Index: 0, State: spool.Delivered, Attempts: 1, LastReply: "250 ok"}}
	removed, err := a.store.Update(m1.ID, up)
	if err != nil || !removed {
		t.Fatalf("update: %v %v", removed, err)
	}
	a.svc.Recorded(m1, up, true)
	waitFor(t, "copy dropped", 5*time.Second, func() bool {
		_, err := holder.svc.replicas.Load(m1.ID)
		return errors.Is(err, spool.ErrNotFound)
	})

	// Several messages, one recipient of one already delivered; then a dies.
	var msgs []*spool.Message
	for i := 0; i < 20; i++ {
		msgs = append(msgs, accept(t, a, fmt.Sprintf("r%d@two.test", i), fmt.Sprintf("q%d@three.test", i)))
	}
	up = []spool.Recipient{{Index: 0, State: spool.Delivered, Attempts: 1, LastReply: "250 ok"}}
	if _, err := a.store.Update(msgs[0].ID, up); err != nil {
		t.Fatal(err)
	}
	a.svc.Recorded(msgs[0], up, false)
	// Every copy is stored and the outcome reached its holder before a
	// dies (on a loaded machine a copy can outlast the replication
	// timeout, which accepts with fewer copies, and the outcome travels in
	// a batch; losing either is a documented window, not what this tests).
	peers := map[string]*testNode{"b": b, "c": c}
	for i, m := range msgs {
		var check func(*spool.Message) bool
		if i == 0 {
			check = func(cp *spool.Message) bool { return cp.Rcpts[0].State == spool.Delivered }
		}
		waitCopy(t, peers[m.Peers[1]], m.ID, check)
	}
	a.kill()

	// Every message is now queued on exactly one survivor, the recipient
	// delivered before the failure still delivered, and copied again to
	// the other survivor (replicas = 1).
	waitFor(t, "takeover", 15*time.Second, func() bool {
		return b.store.Stats().Messages+c.store.Stats().Messages == 20
	})
	// The taker commits a message, then records its finished recipients
	// (Commit makes every recipient pending): wait for that second write.
	waitFor(t, "finished recipient recorded by the taker", 5*time.Second, func() bool {
		for _, n := range []*testNode{b, c} {
			if got, err := n.store.Load(msgs[0].ID); err == nil && got.Rcpts[0].State == spool.Delivered {
				return true
			}
		}
		return false
	})
	byName := map[string]*testNode{"b": b, "c": c}
	for _, m := range msgs {
		var found []string
		for _, n := range []*testNode{b, c} {
			got, err := n.store.Load(m.ID)
			if err != nil {
				continue
			}
			found = append(found, n.name)
			pending := 0
			for _, r := range got.Rcpts {
				if r.State == spool.Pending {
					pending++
				}
			}
			want := 2
			if m.ID == msgs[0].ID {
				want = 1
				if got.Rcpts[0].State != spool.Delivered {
					t.Errorf("%s: the recipient delivered before the failure is %v on %s", m.ID, got.Rcpts[0].State, n.name)
				}
			}
			if pending != want {
				t.Errorf("%s on %s has %d pending recipients, want %d", m.ID, n.name, pending, want)
			}
			if len(got.Peers) != 2 || got.Peers[0] != n.name {
				t.Errorf("%s on %s: peers %q, want itself and a new holder", m.ID, n.name, got.Peers)
				continue
			}
			copyOn := byName[got.Peers[1]]
			waitFor(t, "new copy", 5*time.Second, func() bool {
				cp, err := copyOn.svc.replicas.Load(m.ID)
				return err == nil && len(cp.Peers) == 2 && cp.Peers[0] == n.name
			})
		}
		if len(found) != 1 {
			t.Errorf("%s queued on %v", m.ID, found)
		}
	}
	waitFor(t, "one copy per message in the replica stores", 10*time.Second, func() bool {
		return b.svc.replicas.Stats().Messages+c.svc.replicas.Stats().Messages == 20
	})

	// a returns with its disk: it drops what the others took over.
	a2 := startNode(t, "a", a.dir, binds[0], binds[1:2], nil)
	defer a2.close(t)
	if n := a2.svc.Reconcile(); n != 20 {
		t.Errorf("reconcile dropped %d, want 20", n)
	}
	if n := a2.store.Stats().Messages; n != 0 {
		t.Errorf("%d messages left on the returning node", n)
	}
}

func TestLimitsShareAndBorrow(t *testing.T) {
	alive := 2
	iv := 100 * time.Millisecond
	now := time.Unix(1e9, 0)
	clock := func() time.Time { return now }
	a := NewLimits("a", map[string]int{"big.test": 10}, iv, func() int { return alive }, func([]byte) error { return nil })
	b := NewLimits("b", map[string]int{"big.test": 10}, iv, func() int { return alive }, func([]byte) error { return nil })
	a.now, b.now = clock, clock
	gossip := func() {
		for _, p := range a.payloads() {
			b.HandleEvent(p)
		}
		for _, p := range b.payloads() {
			a.HandleEvent(p)
		}
	}
	allow := func(l *Limits) int {
		n, ok := l.Allowance("big.test")
		if !ok {
			t.Fatal("limited domain reported as unlimited")
		}
		return n
	}
	if _, ok := a.Allowance("other.test"); ok {
		t.Fatal("unlimited domain reported as limited")
	}
	// Nothing heard from b yet: a takes its share only.
	if n := allow(a); n != 5 {
		t.Fatalf("a, b unheard: %d, want 5", n)
	}
	gossip() // b wants nothing
	if n := allow(a); n != 5 {
		t.Fatalf("a, demand still new: %d, want 5", n)
	}
	now = now.Add(3 * iv)
	gossip()
	if n := allow(a); n != 10 {
		t.Fatalf("a borrowing b's unused share: %d, want 10", n)
	}
	for i := 0; i < 10; i++ {
		a.Opened("big.test")
	}
	gossip()
	// b starts wanting: a holds everything, b gets nothing until a gives back.
	if n := allow(b); n != 0 {
		t.Fatalf("b while a holds 10: %d", n)
	}
	if got := b.ClusterHeld("big.test"); got != 10 {
		t.Fatalf("b sees %d held cluster-wide, want 10", got)
	}
	now = now.Add(iv)
	gossip()
	// a hears b's demand: a's allowance drops to its share.
	if n := allow(a); n != 5 {
		t.Fatalf("a after b's demand: %d, want 5", n)
	}
	for i := 0; i < 5; i++ {
		a.Closed("big.test")
	}
	now = now.Add(2 * iv)
	gossip()
	if n := allow(b); n != 5 {
		t.Fatalf("b after a gave back: %d, want 5", n)
	}
	// A failed node's counts are forgotten.
	alive = 1
	b.Forget("a")
	if n := allow(b); n != 10 {
		t.Fatalf("b after a failed: %d, want 10", n)
	}
	// Malformed events are ignored.
	b.HandleEvent([]byte{1, 200})
	b.HandleEvent(nil)
}

// TestTwoReplicasSurviveTwoFailures: with replicas = 2, losing the
// origin and one holder of each message loses nothing: the remaining
// holder delivers it, and only one node takes each message.
func TestTwoReplicasSurviveTwoFailures(t *testing.T) {
	var binds []string
	for i := 0; i < 4; i++ {
		binds = append(binds, fmt.Sprintf("127.0.0.1:%d", freePort(t, "127.0.0.1")))
	}
	root := t.TempDir()
	var nodes []*testNode
	for i, name := range []string{"a", "b", "c", "d"} {
		var join []string
		if i > 0 {
			join = binds[:1]
		}
		nodes = append(nodes, startNodeR(t, name, filepath.Join(root, name), binds[i], join, nil, 2))
	}
	waitFor(t, "4 members", 10*time.Second, func() bool {
		for _, n := range nodes {
			if len(n.svc.node.Alive()) != 4 {
				return false
			}
		}
		return true
	})
	a := nodes[0]
	var msgs []*spool.Message
	for i := 0; i < 30; i++ {
		m := accept(t, a, fmt.Sprintf("r%d@x.test", i))
		if len(m.Peers) != 3 {
			t.Fatalf("peers %q, want origin and two holders", m.Peers)
		}
		msgs = append(msgs, m)
	}
	// Kill a and the holder that is first on most lists.
	first := map[string]int{}
	for _, m := range msgs {
		first[m.Peers[1]]++
	}
	victim := "b"
	for n, k := range first {
		if k > first[victim] {
			victim = n
		}
	}
	byName := map[string]*testNode{"b": nodes[1], "c": nodes[2], "d": nodes[3]}
	a.kill()
	byName[victim].kill()
	var rest []*testNode
	for n, tn := range byName {
		if n != victim {
			rest = append(rest, tn)
			defer tn.close(t)
		}
	}
	waitFor(t, "takeover by the last holders", 20*time.Second, func() bool {
		var n int64
		for _, tn := range rest {
			n += tn.store.Stats().Messages
		}
		return n == int64(len(msgs))
	})
	for _, m := range msgs {
		k := 0
		for _, tn := range rest {
			if _, err := tn.store.Load(m.ID); err == nil {
				k++
			}
		}
		if k != 1 {
			t.Errorf("%s queued on %d survivors", m.ID, k)
		}
	}
	// The taken-over mail is copied again to the one other survivor (the
	// takers drop their old copies just after their commits).
	var copies int64
	waitFor(t, "one copy of each taken-over message", 10*time.Second, func() bool {
		copies = 0
		for _, tn := range rest {
			copies += tn.svc.replicas.Stats().Messages
		}
		return copies == int64(len(msgs))
	})
}

func TestLimitsRateSplit(t *testing.T) {
	iv := 100 * time.Millisecond
	now := time.Unix(1e9, 0)
	a := NewLimits("a", nil, iv, func() int { return 2 }, func([]byte) error { return nil })
	b := NewLimits("b", nil, iv, func() int { return 2 }, func([]byte) error { return nil })
	a.now = func() time.Time { return now }
	b.now = a.now
	a.SetRates(map[string]float64{"r.test": 10})
	b.SetRates(map[string]float64{"r.test": 10})
	if _, ok := a.Rate("other.test"); ok {
		t.Fatal("unlimited domain rate-limited")
	}
	if r, _ := a.Rate("r.test"); r != 5 {
		t.Fatalf("b unheard: %v, want 5", r)
	}
	for _, p := range b.payloads() {
		a.HandleEvent(p) // b reports no demand
	}
	if r, _ := a.Rate("r.test"); r != 10 {
		t.Fatalf("b idle: %v, want 10", r)
	}
	b.Rate("r.test") // b wants it now
	for _, p := range b.payloads() {
		a.HandleEvent(p)
	}
	if r, _ := a.Rate("r.test"); r != 5 {
		t.Fatalf("both want it: %v, want 5", r)
	}
}

// TestCheckCopies: a copy whose origin no longer has the message (the
// outcome frame was lost) is dropped after a check with the origin; a
// copy of a message still queued there stays.
func TestCheckCopies(t *testing.T) {
	binds := []string{fmt.Sprintf("127.0.0.1:%d", freePort(t, "127.0.0.1")), fmt.Sprintf("127.0.0.1:%d", freePort(t, "127.0.0.1"))}
	root := t.TempDir()
	a := startNode(t, "a", filepath.Join(root, "a"), binds[0], nil, nil)
	b := startNode(t, "b", filepath.Join(root, "b"), binds[1], binds[:1], nil)
	defer a.close(t)
	defer b.close(t)
	waitFor(t, "2 members", 10*time.Second, func() bool { return len(a.svc.node.Alive()) == 2 && len(b.svc.node.Alive()) == 2 })
	done := accept(t, a, "x@one.test")
	kept := accept(t, a, "y@one.test")
	// Delivered on a, but the outcome never reaches b.
	if _, err := a.store.Update(done.ID, []spool.Recipient{{Index: 0, State: spool.Delivered}}); err != nil {
		t.Fatal(err)
	}
	if n := b.svc.checkCopies(time.Now().Add(time.Hour)); n != 1 {
		t.Fatalf("dropped %d copies, want 1", n)
	}
	if _, err := b.svc.replicas.Load(done.ID); !errors.Is(err, spool.ErrNotFound) {
		t.Fatalf("copy of the delivered message: %v", err)
	}
	if _, err := b.svc.replicas.Load(kept.ID); err != nil {
		t.Fatalf("copy of the queued message: %v", err)
	}
	// Copies newer than the cutoff are not checked.
	if n := b.svc.checkCopies(time.Now().Add(-time.Hour)); n != 0 {
		t.Fatalf("dropped %d recent copies", n)
	}
}

// TestLimitsSite: domains whose MX hosts share a suffix share the site's
// cluster-wide limit.
func TestLimitsSite(t *testing.T) {
	iv := 100 * time.Millisecond
	now := time.Unix(1e9, 0)
	mx := map[string][]string{
		"a.test": {"mx1.big.example", "backup.elsewhere.test"},
		"b.test": {"MX2.Big.Example."},
		"c.test": {"mx.other.test"},
	}
	lookup := func(d string) ([]string, error) { return mx[d], nil }
	newL := func(name string) *Limits {
		l := NewLimits(name, nil, iv, func() int { return 2 }, func([]byte) error { return nil })
		l.now = func() time.Time { return now }
		l.SetSiteLimits(map[string]int{"big.example": 4}, lookup)
		return l
	}
	a, b := newL("a"), newL("b")
	allow := func(l *Limits, d string) (int, bool) {
		t.Helper()
		var n int
		var ok bool
		waitFor(t, "site lookup of "+d, 5*time.Second, func() bool {
			l.Allowance(d) // starts the lookup
			l.mu.Lock()
			defer l.mu.Unlock()
			_, known := l.siteOf[d]
			return known
		})
		n, ok = l.Allowance(d)
		return n, ok
	}
	if _, ok := allow(a, "c.test"); ok {
		t.Fatal("a domain of another site is limited")
	}
	if n, ok := allow(a, "a.test"); !ok || n != 2 {
		t.Fatalf("a.test on a, b unheard: %d %v, want the share 2", n, ok)
	}
	now = now.Add(3 * iv)
	for _, p := range b.payloads() {
		a.HandleEvent(p) // b wants nothing
	}
	if n, _ := allow(a, "b.test"); n != 4 {
		t.Fatalf("b.test on a, b idle: %d, want 4", n)
	}
	a.Opened("a.test")
	a.Opened("a.test")
	a.Opened("b.test")
	a.Opened("b.test")
	if got := a.ClusterHeld("site:big.example"); got != 4 {
		t.Fatalf("site held on a: %d", got)
	}
	for _, p := range a.payloads() {
		b.HandleEvent(p)
	}
	if n, ok := allow(b, "a.test"); !ok || n != 0 {
		t.Fatalf("a.test on b while a holds the site's 4: %d %v", n, ok)
	}
	a.Closed("a.test")
	a.Closed("b.test")
	now = now.Add(3 * iv)
	for _, p := range a.payloads() {
		b.HandleEvent(p)
	}
	if n, _ := allow(b, "b.test"); n != 2 {
		t.Fatalf("b.test on b after a gave 2 back: %d, want 2", n)
	}
}

// testLogger discards logs unless HERMOD_TEST_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("HERMOD_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// TestAddressHook: the hook runs as HOOK add|del ADDRESS and its failure
// is reported with its output.
func TestAddressHook(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "calls")
	hook := filepath.Join(dir, "hook.sh")
	script := "#!/bin/sh\necho \"$1 $2\" >> " + out + "\n[ \"$2\" = 192.0.2.99:25 ] && { echo no such address; exit 3; }\nexit 0\n"
	if err := os.WriteFile(hook, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	s := &Service{cfg: Config{AddressHook: hook}}
	if err := s.runHook("add", "192.0.2.10:25"); err != nil {
		t.Fatal(err)
	}
	if err := s.runHook("del", "192.0.2.10:25"); err != nil {
		t.Fatal(err)
	}
	err := s.runHook("add", "192.0.2.99:25")
	if err == nil || !strings.Contains(err.Error(), "no such address") {
		t.Fatalf("failing hook: %v", err)
	}
	got, _ := os.ReadFile(out)
	if string(got) != "add 192.0.2.10:25\ndel 192.0.2.10:25\nadd 192.0.2.99:25\n" {
		t.Fatalf("hook calls:\n%s", got)
	}
	if err := (&Service{}).runHook("add", "x"); err != nil {
		t.Fatalf("no hook: %v", err)
	}
}

// TestReplicationRefusesStrangers: the replication port answers only
// cluster members, and with a secret key only those who know it.
func TestReplicationRefusesStrangers(t *testing.T) {
	for _, keyed := range []bool{false, true} {
		t.Run(fmt.Sprintf("keyed=%v", keyed), func(t *testing.T) {
			root := t.TempDir()
			bind := fmt.Sprintf("127.0.0.1:%d", freePort(t, "127.0.0.1"))
			a := startNode(t, "a", filepath.Join(root, "a"), bind, nil, nil)
			defer a.close(t)
			key := []byte("0123456789abcdef")
			if keyed {
				a.svc.hold.key = key
			}
			try := func(name string, key []byte) error {
				p := &peerConn{self: name, key: key, name: "a", addr: a.cfg.ReplicationListen, log: testLogger()}
				p.mu.Lock()
				err := p.dialLocked()
				p.mu.Unlock()
				if err != nil {
					return err
				}
				defer p.fail(errors.New("test done"))
				ans := make(chan []byte, 1)
				if err := p.send(frameReconcile, appendStr(nil, name), true, nil, ans); err != nil {
					return err
				}
				select {
				case b := <-ans:
					if b == nil {
						return errors.New("closed")
					}
					return nil
				case <-time.After(3 * time.Second):
					return errors.New("no answer")
				}
			}
			if err := try("mallory", nil); err == nil {
				t.Fatal("a stranger was answered")
			}
			if keyed {
				if err := try("a", []byte("wrong key 012345")); err == nil {
					t.Fatal("a wrong key was answered")
				}
				if err := try("a", key); err != nil {
					t.Fatalf("member with the key: %v", err)
				}
			} else if err := try("a", nil); err != nil {
				t.Fatalf("member: %v", err)
			}
		})
	}
}

// TestReplicaRefusedWhenShortOfSpace: a holder whose replica spool's
// filesystem is below min_free refuses copies instead of filling its
// disk: the origin counts the message as short of copies (and, with
// require_replicas, would answer 451).
func TestReplicaRefusedWhenShortOfSpace(t *testing.T) {
	root := t.TempDir()
	binds := []string{fmt.Sprintf("127.0.0.1:%d", freePort(t, "127.0.0.1")), fmt.Sprintf("127.0.0.1:%d", freePort(t, "127.0.0.1"))}
	a := startNode(t, "a", filepath.Join(root, "a"), binds[0], nil, nil)
	defer a.close(t)
	full := func(c *spool.Config) { c.MinFree = 1 << 62 }
	b := startNodeRC(t, "b", filepath.Join(root, "b"), binds[1], binds[:1], nil, 1, full)
	defer b.close(t)
	waitFor(t, "2 members", 10*time.Second, func() bool {
		return len(a.svc.node.Alive()) == 2 && len(b.svc.node.Alive()) == 2
	})
	msg := &spool.Message{ID: a.store.NewID(), From: "s@example.test", Rcpts: []spool.Recipient{{Addr: "x@one.test"}}}
	short := a.svc.repl.short.Load()
	errc := make(chan error, 1)
	a.svc.Replicate(msg, []byte("Subject: t\r\n\r\nhello\r\n"), func(err error) { errc <- err })
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("Replicate: %v (require_replicas is off)", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no answer from Replicate")
	}
	if a.svc.repl.short.Load() != short+1 {
		t.Errorf("the origin did not count the refused copy as missing")
	}
	if _, err := b.svc.replicas.Load(msg.ID); !errors.Is(err, spool.ErrNotFound) {
		t.Errorf("the full holder stored the copy anyway: %v", err)
	}
	if st := b.svc.Stats(); st.ReplicasRefused == 0 || st.ReplicaSpoolFailed != "" {
		t.Errorf("holder's stats: %d copies refused (want 1), replica spool failure %q (want none)", st.ReplicasRefused, st.ReplicaSpoolFailed)
	}
}

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/bench"
	"github.com/hermod-mta/hermod/cluster"
)

// netLab is three network namespaces on a bridge the test creates: node
// i has 10.213.S.i, the bridge (sink and DNS, in the test's namespace)
// 10.213.S.254. Nothing leaves the machine.
type netLab struct {
	t      *testing.T
	tag    string
	subnet string
	ns     []string
}

func run(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func newNetLab(t *testing.T, n int) *netLab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network namespaces need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("iproute2 not installed")
	}
	pid := os.Getpid()
	l := &netLab{t: t, tag: fmt.Sprintf("%x", pid%0xfffff), subnet: fmt.Sprintf("10.213.%d", pid%250)}
	br := "hbr" + l.tag
	if out, err := exec.Command("ip", "link", "add", br, "type", "bridge").CombinedOutput(); err != nil {
		t.Skipf("cannot create a bridge here: %v: %s", err, out)
	}
	t.Cleanup(func() {
		for _, ns := range l.ns {
			exec.Command("ip", "netns", "del", ns).Run()
		}
		exec.Command("ip", "link", "del", br).Run()
	})
	run(t, "ip", "addr", "add", l.subnet+".254/24", "dev", br)
	run(t, "ip", "link", "set", br, "up")
	for i := 1; i <= n; i++ {
		ns := fmt.Sprintf("hns%s-%d", l.tag, i)
		veth := fmt.Sprintf("hv%s-%d", l.tag, i)
		run(t, "ip", "netns", "add", ns)
		l.ns = append(l.ns, ns)
		run(t, "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
		run(t, "ip", "link", "set", veth, "master", br, "up")
		run(t, "ip", "netns", "exec", ns, "ip", "addr", "add", fmt.Sprintf("%s.%d/24", l.subnet, i), "dev", "eth0")
		run(t, "ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
		run(t, "ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
	}
	return l
}

func (l *netLab) ip(i int) string { return fmt.Sprintf("%s.%d", l.subnet, i) }

// cut (or heal) the links between node a and node b with blackhole
// routes on both sides; both keep reaching the bridge (sink, DNS, test).
func (l *netLab) cut(a, b int, on bool) {
	op := "add"
	if !on {
		op = "del"
	}
	run(l.t, "ip", "netns", "exec", l.ns[a-1], "ip", "route", op, "blackhole", l.ip(b)+"/32")
	run(l.t, "ip", "netns", "exec", l.ns[b-1], "ip", "route", op, "blackhole", l.ip(a)+"/32")
}

// TestE2EClusterPartition splits a 3-node cluster into {n1} and {n2, n3}
// with mail flowing into both sides, then heals it. Both sides keep
// accepting and delivering (n1 without copies: counted), the majority
// takes over n1's replicated mail (duplicates, never loss), and after the
// heal n1 drops what the others delivered. Nothing acknowledged is lost.
func TestE2EClusterPartition(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	lab := newNetLab(t, 3)
	hub := lab.subnet + ".254"
	dnsSrv, err := bench.NewDNS(bench.DNSConfig{Listen: hub + ":5300", Domains: 10, MX: []string{hub}, TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	defer dnsSrv.Close()
	sink, err := bench.NewSink(bench.SinkConfig{Listen: []string{hub + ":2526"},
		Faults: bench.Faults{Default: bench.FaultRule{DataDelay: mustDelay(t, "2ms")},
			// One domain greylists for 6 s: its mail is still queued on
			// n1 (with copies on n2/n3) when the partition comes.
			Domain: map[string]bench.FaultRule{bench.TestDomain(1): {Greylist: true, GreylistDelay: 6 * time.Second}}}})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()

	root := t.TempDir()
	nodes := make([]*hermodProc, 3)
	for i := range nodes {
		ip := lab.ip(i + 1)
		dir := filepath.Join(root, fmt.Sprintf("n%d", i+1))
		if err := mkdir(dir); err != nil {
			t.Fatal(err)
		}
		d := &hermodProc{t: t, smtp: ip + ":2525", http: ip + ":8025", dir: dir, cfg: filepath.Join(dir, "hermod.toml"), netns: lab.ns[i]}
		cfg := fmt.Sprintf(`[server]
hostname = "n%d.e2e.test"
[smtp]
listen = [%q]
max_connections_per_ip = 500
relay_networks = ["127.0.0.0/8", "%s.0/24"]
[spool]
dir = %q
[http]
listen = %q
[log]
delivery_log = %q
level = "info"
[dns]
resolvers = ["%s:5300"]
[delivery]
port = 2526
tls = "disabled"
retry = ["1s"]
connect_timeout = "2s"
scan_interval = "200ms"
[cluster]
bind = "%s:7946"
join = ["%s:7946", "%s:7946"]
node_name = "n%d"
probe_interval = "100ms"
reconcile_timeout = "3s"
replication_timeout = "500ms"
`, i+1, d.smtp, lab.subnet, filepath.Join(dir, "spool"), d.http, filepath.Join(dir, "delivery.log"), hub,
			ip, lab.ip((i+1)%3+1), lab.ip((i+2)%3+1), i+1)
		if err := os.WriteFile(d.cfg, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		nodes[i] = d
		d.start()
	}
	alive := func(n *hermodProc) int {
		_, body := n.get("/api/cluster/members")
		var ms []cluster.Member
		_ = json.Unmarshal([]byte(body), &ms)
		k := 0
		for _, m := range ms {
			if m.Alive() {
				k++
			}
		}
		return k
	}
	waitUntil := func(what string, d time.Duration, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(d)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out: %s", what)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	for _, n := range nodes {
		waitUntil("3 members", 20*time.Second, func() bool { return alive(n) == 3 })
	}

	ledger := bench.NewLedger()
	// Mail into n1 while whole, so copies of it sit on n2/n3; the sink is
	// slow enough that some is still queued when the partition comes.
	load := func(target string, msgs int, seed uint64) {
		t.Helper()
		l, err := bench.NewLoad(bench.LoadConfig{Targets: []string{target}, Sessions: 10, Messages: msgs, Duration: 20 * time.Second,
			Domains: 10, Rcpts: 1, Timeout: 5 * time.Second, Seed: seed, OnAccepted: ledger.Record})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := l.Run(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	load(nodes[0].smtp, 500, 1)

	lab.cut(1, 2, true)
	lab.cut(1, 3, true)
	cutAt := time.Now()
	waitUntil("n1 alone", 15*time.Second, func() bool { return alive(nodes[0]) == 1 })
	waitUntil("n2 sees n1 failed", 15*time.Second, func() bool { return alive(nodes[1]) == 2 })
	t.Logf("partition seen on both sides %v after the cut", time.Since(cutAt).Round(10*time.Millisecond))
	// Both sides accept.
	load(nodes[0].smtp, 300, 2)
	load(nodes[1].smtp, 300, 3)
	waitUntil("everything delivered during the partition", 60*time.Second, func() bool { return ledger.Check(sink.Count).Lost == 0 })
	during := ledger.Check(sink.Count)
	var st1, st2 cluster.Stats
	_, b1 := nodes[0].get("/api/cluster")
	_, b2 := nodes[1].get("/api/cluster")
	json.Unmarshal([]byte(b1), &st1)
	json.Unmarshal([]byte(b2), &st2)
	var st3 cluster.Stats
	_, b3 := nodes[2].get("/api/cluster")
	json.Unmarshal([]byte(b3), &st3)
	taken := st2.TakenOver + st3.TakenOver
	t.Logf("during the partition: %+v; n1 accepted %d without enough copies; the majority took over %d of n1's messages",
		during, st1.ReplicationShort, taken)
	if taken == 0 {
		t.Errorf("the majority took over none of n1's queued mail")
	}
	if st1.ReplicationShort == 0 {
		t.Errorf("n1 alone reported no message accepted without copies")
	}

	lab.cut(1, 2, false)
	lab.cut(1, 3, false)
	healAt := time.Now()
	for _, n := range nodes {
		waitUntil("healed: 3 members", 30*time.Second, func() bool { return alive(n) == 3 })
	}
	t.Logf("healed %v after the routes came back", time.Since(healAt).Round(10*time.Millisecond))
	// Mail after the heal flows with copies again.
	load(nodes[0].smtp, 200, 4)
	waitUntil("everything delivered after the heal", 60*time.Second, func() bool { return ledger.Check(sink.Count).Lost == 0 })
	time.Sleep(time.Second)
	acct := ledger.Check(sink.Count)
	_, b1 = nodes[0].get("/api/cluster")
	json.Unmarshal([]byte(b1), &st1)
	t.Logf("after the heal: %+v; n1 reconciled %d", acct, st1.Reconciled)
	if acct.Lost != 0 {
		t.Fatalf("%d acknowledged deliveries lost", acct.Lost)
	}
	if sink.Stats().Corrupted != 0 {
		t.Fatal("corrupted messages")
	}
	for _, n := range nodes {
		_, body := n.get("/api/stats")
		var s struct {
			Spool struct{ Messages int64 } `json:"spool"`
		}
		json.Unmarshal([]byte(body), &s)
		if s.Spool.Messages != 0 {
			t.Errorf("%s still has %d messages queued", n.smtp, s.Spool.Messages)
		}
	}
	fmt.Printf("partition test: expected %d, lost %d, duplicates %d, taken over by the majority %d, n1 reconciled %d\n",
		acct.Expected, acct.Lost, acct.Duplicates, taken, st1.Reconciled)
}

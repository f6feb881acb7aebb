package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/bench"
	"github.com/hermod-mta/hermod/cluster"
)

// freeGossipAddr returns host:port free for TCP and UDP, with port+1
// free for TCP (replication).
func freeGossipAddr(t *testing.T) string {
	t.Helper()
	for i := 0; i < 100; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if p > 65000 {
			continue
		}
		a := fmt.Sprintf("127.0.0.1:%d", p)
		u, err := net.ListenPacket("udp", a)
		if err != nil {
			continue
		}
		u.Close()
		l2, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p+1))
		if err != nil {
			continue
		}
		l2.Close()
		return a
	}
	t.Fatal("no free gossip port")
	return ""
}

func bannerWithin(addr string, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", addr, 500*time.Millisecond)
		if err == nil {
			c.SetDeadline(time.Now().Add(2 * time.Second))
			line, _ := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if strings.HasPrefix(line, "220") {
				return true
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return false
}

// TestE2ECluster runs three hermod processes as one cluster in front of
// the bench sink and DNS:
//   - a cluster-wide connection limit holds (within the documented
//     overshoot) where each node alone would open far more;
//   - the cluster-wide deliverability report adds up to the sink's count;
//   - kill -9 of a node under load loses nothing it acknowledged (its
//     replicas are delivered by the others), its SMTP address answers
//     again within seconds, and when it returns it reconciles: what the
//     others delivered is not delivered again beyond what was in flight.
func TestE2ECluster(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	port := freePortOn(t, "127.0.0.2")
	dnsSrv, err := bench.NewDNS(bench.DNSConfig{Listen: "127.0.0.1:0", Domains: 1, MX: []string{"127.0.0.2"}, TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	defer dnsSrv.Close()
	sink, err := bench.NewSink(bench.SinkConfig{
		Listen: []string{fmt.Sprintf("127.0.0.2:%d", port)},
		Faults: bench.Faults{Default: bench.FaultRule{DataDelay: mustDelay(t, "3ms")}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()

	const limit = 6
	names := []string{"n1", "n2", "n3"}
	gossip := []string{freeGossipAddr(t), freeGossipAddr(t), freeGossipAddr(t)}
	root := t.TempDir()
	nodes := make([]*hermodProc, 3)
	for i, name := range names {
		dir := filepath.Join(root, name)
		if err := mkdir(dir); err != nil {
			t.Fatal(err)
		}
		nodes[i] = writeConfig(t, dir, "max_connections_per_ip = 500", fastDelivery(dnsSrv.Addr(), port)+fmt.Sprintf(`max_connections_per_domain = 20
[cluster]
bind = %q
join = [%q, %q]
node_name = %q
probe_interval = "100ms"
reconcile_timeout = "5s"
count_interval = "100ms"
domain_limits = { %q = %d }
`, gossip[i], gossip[(i+1)%3], gossip[(i+2)%3], name, bench.TestDomain(1), limit))
	}
	for _, n := range nodes {
		n.start()
	}
	waitMembers := func(n *hermodProc, want int) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			_, body := n.get("/api/cluster/members")
			var ms []cluster.Member
			_ = json.Unmarshal([]byte(body), &ms)
			alive := 0
			for _, m := range ms {
				if m.Alive() {
					alive++
				}
			}
			if alive == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s sees %d alive members, want %d: %s", n.smtp, alive, want, body)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	for _, n := range nodes {
		waitMembers(n, 3)
	}

	// Peak connections at the sink, sampled.
	var peak atomic.Int64
	stopSample := make(chan struct{})
	go func() {
		for {
			select {
			case <-stopSample:
				return
			case <-time.After(time.Millisecond):
			}
			if a := sink.Stats().Active; a > peak.Load() {
				peak.Store(a)
			}
		}
	}()

	// Phase 1: load through all three, everything delivered.
	ledger := bench.NewLedger()
	targets := []string{nodes[0].smtp, nodes[1].smtp, nodes[2].smtp}
	load, err := bench.NewLoad(bench.LoadConfig{Targets: targets, Sessions: 30, Messages: 1500, Duration: 20 * time.Second,
		Domains: 1, Rcpts: 1, Timeout: 5 * time.Second, Seed: 3, OnAccepted: ledger.Record})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := load.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	waitNoLoss := func(what string) bench.Accounting {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for {
			acct := ledger.Check(sink.Count)
			if acct.Lost == 0 {
				return acct
			}
			if time.Now().After(deadline) {
				for _, n := range nodes {
					_, body := n.get("/api/cluster")
					t.Logf("%s: %s", n.smtp, body)
				}
				t.Fatalf("%s: %+v", what, acct)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	acct := waitNoLoss("phase 1")
	close(stopSample)
	st := sink.Stats()
	t.Logf("phase 1: %+v; sink peak connections %d (cluster limit %d, 3 nodes × 20 without it)", acct, peak.Load(), limit)
	if p := peak.Load(); p > limit+limit/3 { // the stated bound: L + one share
		t.Errorf("cluster-wide limit %d exceeded: %d connections at the sink", limit, p)
	}
	// The cluster's report adds up to the sink's count.
	time.Sleep(300 * time.Millisecond)
	_, body := nodes[1].get("/api/cluster/stats?minutes=10")
	var cs cluster.ClusterStats
	if err := json.Unmarshal([]byte(body), &cs); err != nil {
		t.Fatalf("cluster stats: %v: %s", err, body)
	}
	if got := cs.Report.Total.Delivered; got != st.Recipients {
		t.Errorf("cluster stats: %d delivered, sink received %d recipients (%s)", got, st.Recipients, body)
	}

	// The cluster-wide log holds every delivery, from the node that made it.
	_, body = nodes[2].get("/api/cluster/log?limit=10000&event=delivered")
	var lg struct {
		Records []clusterLogRecord `json:"records"`
		Missing map[string]string  `json:"missing"`
	}
	if err := json.Unmarshal([]byte(body), &lg); err != nil {
		t.Fatalf("cluster log: %v", err)
	}
	perNode := map[string]int{}
	for _, r := range lg.Records {
		perNode[r.Node]++
	}
	if uint64(len(lg.Records)) != st.Recipients || len(lg.Missing) != 0 {
		t.Errorf("cluster log: %d delivered records (%v), sink got %d; missing %v", len(lg.Records), perNode, st.Recipients, lg.Missing)
	}
	t.Logf("cluster log: %d delivered records by node %v", len(lg.Records), perNode)

	// A master configuration pushed from one node reaches all three (it
	// carries every shared key: what it leaves out takes its default).
	master := `[smtp]
max_connections_per_ip = 500
max_hops = 60
` + fastDelivery(dnsSrv.Addr(), port) + fmt.Sprintf(`max_connections_per_domain = 20
[cluster]
probe_interval = "100ms"
reconcile_timeout = "5s"
count_interval = "100ms"
domain_limits = { %q = %d }
[log]
level = "debug"
[node.n2.log]
level = "info"
`, bench.TestDomain(1), limit)
	resp, err := http.Post("http://"+nodes[1].http+"/api/cluster/config", "application/toml", strings.NewReader(master))
	if err != nil {
		t.Fatal(err)
	}
	var push cluster.PushResult
	err = json.NewDecoder(resp.Body).Decode(&push)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 || !push.Complete() || len(push.Nodes) != 3 {
		t.Fatalf("push-config: %v %d %+v", err, resp.StatusCode, push)
	}
	for _, n := range nodes {
		_, body := n.get("/api/cluster/config/status")
		var cst struct {
			Version uint64 `json:"version"`
		}
		if err := json.Unmarshal([]byte(body), &cst); err != nil || cst.Version != push.Version {
			t.Errorf("%s after the push: %s", n.smtp, body)
		}
	}
	t.Logf("config version %d applied on all %d nodes", push.Version, len(push.Nodes))

	// Phase 2: load into n1 only; kill -9 it mid-way.
	var accepted atomic.Int64
	killed := make(chan struct{})
	load, err = bench.NewLoad(bench.LoadConfig{Targets: targets[:1], Sessions: 20, Messages: 4000, Duration: 10 * time.Second,
		Domains: 1, Rcpts: 2, Timeout: 5 * time.Second, Seed: 9, OnAccepted: func(id string, rcpts []string) {
			ledger.Record(id, rcpts)
			if accepted.Add(1) == 800 {
				close(killed)
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { load.Run(context.Background()); close(done) }()
	select {
	case <-killed:
	case <-time.After(60 * time.Second):
		t.Fatalf("load reached only %d accepted", accepted.Load())
	}
	nodes[0].kill(syscall.SIGKILL)
	killedAt := time.Now()
	<-done
	if !bannerWithin(nodes[0].smtp, 15*time.Second) {
		t.Fatalf("the dead node's SMTP address %s did not answer again", nodes[0].smtp)
	}
	t.Logf("dead node's address answered again %v after the kill", time.Since(killedAt).Round(10*time.Millisecond))
	acct = waitNoLoss("after kill -9")
	t.Logf("after kill -9: %+v, all delivered %v after the kill", acct, time.Since(killedAt).Round(10*time.Millisecond))

	// n1 returns with its disk: it binds its address again (the survivor
	// lets go) and drops what the others delivered.
	nodes[0].start()
	waitMembers(nodes[0], 3)
	time.Sleep(2 * time.Second) // let it deliver whatever is left
	acct = waitNoLoss("after return")
	_, body = nodes[0].get("/api/cluster")
	var cst cluster.Stats
	_ = json.Unmarshal([]byte(body), &cst)
	t.Logf("after return: %+v; n1: reconciled %d", acct, cst.Reconciled)
	// Duplicates: deliveries in flight at the kill (20 connections of n1,
	// up to 16 transactions pipelined each, 2 recipients).
	if acct.Duplicates > 20*16*2 {
		t.Errorf("%d duplicates: more than were in flight", acct.Duplicates)
	}
	if st := sink.Stats(); st.Corrupted != 0 {
		t.Errorf("%d corrupted", st.Corrupted)
	}
	fmt.Printf("cluster test: limit %d peak %d; kill -9: lost %d, duplicates %d, reconciled %d\n",
		limit, peak.Load(), acct.Lost, acct.Duplicates, cst.Reconciled)
}

func mkdir(dir string) error { return os.MkdirAll(dir, 0o750) }

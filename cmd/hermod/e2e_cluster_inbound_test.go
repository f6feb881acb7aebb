package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/smtp"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// greetFrom connects to addr from source and returns the greeting line
// (the connection stays open until the test ends).
func greetFrom(t *testing.T, source, addr string) string {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(source)}, Timeout: 2 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, _ := bufio.NewReader(c).ReadString('\n')
	return line
}

// TestE2EClusterInbound: a client spreading connections over two nodes
// meets the cluster-wide per-client limit (421), and a block added on one
// node is enforced by the other within seconds (554), then lifted.
func TestE2EClusterInbound(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	gossip := []string{freeGossipAddr(t), freeGossipAddr(t)}
	root := t.TempDir()
	var nodes []*hermodProc
	for i, name := range []string{"i1", "i2"} {
		dir := filepath.Join(root, name)
		if err := mkdir(dir); err != nil {
			t.Fatal(err)
		}
		n := writeConfig(t, dir, "max_connections_per_ip = 100", deadDNS+fmt.Sprintf(`[cluster]
bind = %q
join = [%q]
node_name = %q
probe_interval = "100ms"
count_interval = "100ms"
reconcile_timeout = "2s"
replicas = 0
max_connections_per_ip = 4
`, gossip[i], gossip[1-i], name))
		nodes = append(nodes, n)
		n.start()
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out: %s", what)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitFor("both members alive", func() bool {
		_, b := nodes[0].get("/api/cluster/members")
		return strings.Count(b, `"status": "alive"`) == 2
	})

	// Two connections to each node from one client: 4, the cluster limit.
	for _, n := range nodes {
		for i := 0; i < 2; i++ {
			if g := greetFrom(t, "127.0.0.9", n.smtp); !strings.HasPrefix(g, "220") {
				t.Fatalf("connection under the limit refused: %q", g)
			}
		}
	}
	time.Sleep(500 * time.Millisecond) // a few count intervals
	if g := greetFrom(t, "127.0.0.9", nodes[0].smtp); !strings.HasPrefix(g, "421 4.7.0") {
		t.Fatalf("5th connection cluster-wide: %q", g)
	}
	if g := greetFrom(t, "127.0.0.8", nodes[0].smtp); !strings.HasPrefix(g, "220") {
		t.Fatalf("another client refused: %q", g)
	}

	// A block added on i2 is enforced by i1.
	req, _ := http.NewRequest(http.MethodPost, "http://"+nodes[1].http+"/api/cluster/blocks?prefix=127.0.0.10/32&reason=test", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("block: %v %v", err, resp)
	}
	resp.Body.Close()
	start := time.Now()
	waitFor("block enforced on the other node", func() bool {
		return strings.HasPrefix(greetFrom(t, "127.0.0.10", nodes[0].smtp), "554 5.7.1")
	})
	t.Logf("block enforced by the other node %v after it was added", time.Since(start).Round(time.Millisecond))
	req, _ = http.NewRequest(http.MethodDelete, "http://"+nodes[0].http+"/api/cluster/blocks?prefix=127.0.0.10/32", nil)
	if resp, err = http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Fatalf("unblock: %v %v", err, resp)
	}
	resp.Body.Close()
	waitFor("unblock reached the other node", func() bool {
		return strings.HasPrefix(greetFrom(t, "127.0.0.10", nodes[1].smtp), "220")
	})

	// One message queued on each node (no DNS: it stays): the cluster-wide
	// queue lists both, each with its node.
	for i, n := range nodes {
		msg := fmt.Sprintf("Subject: q%d\r\n\r\nhello\r\n", i)
		if err := smtp.SendMail(n.smtp, nil, "s@sender.test", []string{fmt.Sprintf("r%d@example.test", i)}, []byte(msg)); err != nil {
			t.Fatalf("send to %s: %v", n.smtp, err)
		}
	}
	_, body := nodes[0].get("/api/cluster/queue")
	var q struct {
		Messages []QueueEntry      `json:"messages"`
		Missing  map[string]string `json:"missing"`
	}
	if err := json.Unmarshal([]byte(body), &q); err != nil {
		t.Fatal(err)
	}
	got := map[string]int{}
	for _, m := range q.Messages {
		got[m.Node]++
	}
	if len(q.Messages) != 2 || got["i1"] != 1 || got["i2"] != 1 || len(q.Missing) != 0 {
		t.Fatalf("cluster queue: %s", body)
	}
}

package cluster

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/engine"
)

var statsNow = time.Date(2030, 1, 2, 3, 4, 30, 0, time.UTC)

// statsNode is a node's admin endpoint serving real engine.DomainStats
// snapshots, answering minutes=, domain= and top= like the daemon.
type statsNode struct {
	stats *engine.DomainStats
	srv   *httptest.Server
	mu    sync.Mutex
	query []string // raw queries received
}

func newStatsNode(t *testing.T) *statsNode {
	n := &statsNode{stats: engine.NewDomainStats(engine.DomainStatsOptions{})}
	n.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != StatsPath {
			http.NotFound(w, r)
			return
		}
		n.mu.Lock()
		n.query = append(n.query, r.URL.RawQuery)
		n.mu.Unlock()
		q := r.URL.Query()
		minutes, _ := strconv.Atoi(q.Get("minutes"))
		rep := n.stats.Snapshot(statsNow.Add(-time.Duration(minutes)*time.Minute), statsNow)
		if d := q.Get("domain"); d != "" {
			rep = rep.Only(d)
		}
		if top, _ := strconv.Atoi(q.Get("top")); top > 0 {
			rep = rep.Top(top)
		}
		json.NewEncoder(w).Encode(rep)
	}))
	t.Cleanup(n.srv.Close)
	return n
}

func (n *statsNode) addr() string { return strings.TrimPrefix(n.srv.URL, "http://") }

// observe records count outcomes of ev for domain at the given age,
// on the node and on the reference recorder all.
func statsObserve(all *engine.DomainStats, n *statsNode, domain, ev string, count int, age time.Duration, delay float64) {
	for range count {
		rec := &engine.DeliveryRecord{Time: statsNow.Add(-age), Event: ev, Domain: domain, Delay: delay}
		n.stats.Observe(rec)
		all.Observe(rec)
	}
}

func TestFetchClusterStats(t *testing.T) {
	all := engine.NewDomainStats(engine.DomainStatsOptions{})
	a, b, c := newStatsNode(t), newStatsNode(t), newStatsNode(t)
	// Each node's busiest domain is its own, the cluster's is b.test.
	statsObserve(all, a, "a.test", "delivered", 5, time.Minute, 0.2)
	statsObserve(all, a, "b.test", "delivered", 4, 2*time.Minute, 3)
	statsObserve(all, c, "c.test", "deferred", 5, time.Minute, 0)
	statsObserve(all, c, "b.test", "bounced", 4, time.Minute, 0)
	statsObserve(all, b, "a.test", "expired", 1, 10*time.Minute, 0)
	statsObserve(all, b, "a.test", "delivered", 2, 2*time.Hour, 1) // outside a 60-minute window

	// A dead node: an address that refuses connections.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	// A node that answers 500.
	broken := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "spool on fire", http.StatusInternalServerError)
	}))
	defer broken.Close()
	// A node that answers garbage.
	garbage := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"domains": 7}`))
	}))
	defer garbage.Close()

	addrs := map[string]string{
		"n1": a.addr(), "n2": b.addr(), "n3": c.addr(),
		"n4-dead": dead, "n5-broken": strings.TrimPrefix(broken.URL, "http://"),
		"n6-garbage": strings.TrimPrefix(garbage.URL, "http://"), "n7-noaddr": "",
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	want := all.Snapshot(statsNow.Add(-60*time.Minute), statsNow)
	for _, tc := range []struct {
		name    string
		query   url.Values
		want    engine.Report
		domains []string
	}{
		{"all", url.Values{"minutes": {"60"}}, want, []string{"b.test", "a.test", "c.test"}},
		{"top is applied after the merge", url.Values{"minutes": {"60"}, "top": {"1"}}, want.Top(1), []string{"b.test"}},
		{"domain", url.Values{"minutes": {"60"}, "domain": {"a.test"}}, want.Only("a.test"), []string{"a.test"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := FetchClusterStats(ctx, nil, addrs, tc.query)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got.Report, tc.want) {
				t.Errorf("report:\n%+v\nwant\n%+v", got.Report, tc.want)
			}
			var domains []string
			for _, d := range got.Report.Domains {
				domains = append(domains, d.Domain)
			}
			if !reflect.DeepEqual(domains, tc.domains) {
				t.Errorf("domains %v, want %v", domains, tc.domains)
			}
			if miss := got.Missing(); !reflect.DeepEqual(miss, []string{"n4-dead", "n5-broken", "n6-garbage", "n7-noaddr"}) {
				t.Errorf("missing %v", miss)
			}
			for _, n := range got.Nodes {
				if n.OK != (n.Error == "") || n.Addr != addrs[n.Name] {
					t.Errorf("node %+v", n)
				}
			}
			if e := got.Nodes[4].Error; !strings.Contains(e, "500") || !strings.Contains(e, "spool on fire") {
				t.Errorf("broken node's error: %q", e)
			}
		})
	}
	// The nodes were never asked to cut their reports.
	for _, n := range []*statsNode{a, b, c} {
		for _, q := range n.query {
			if strings.Contains(q, "top") {
				t.Errorf("a node got top: %q", q)
			}
		}
	}
	// Spot checks against the records themselves.
	total := want.Total
	if total.Delivered != 9 || total.Deferred != 5 || total.Bounced != 4 || total.Expired != 1 {
		t.Errorf("total %+v", total)
	}
	// 5 of 9 deliveries at 0.2 s, 4 at 3 s: p50 is in 0.2 s's bucket
	// [2^7.5, 2^8) ms, p90 in 3 s's [2^11.5, 2^12) ms.
	if total.P50 < 0.181 || total.P50 > 0.256 || total.P90 < 2.896 || total.P90 > 4.096 {
		t.Errorf("p50 %v, p90 %v", total.P50, total.P90)
	}
}

func TestFetchClusterStatsNoAnswer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	// A node that hangs until the caller gives up.
	release := make(chan struct{})
	hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}))
	defer hang.Close()
	defer close(release)

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	got, err := FetchClusterStats(ctx, nil, map[string]string{"dead": dead, "hang": strings.TrimPrefix(hang.URL, "http://")}, nil)
	if err == nil {
		t.Fatal("no error with no node answering")
	}
	if len(got.Nodes) != 2 || got.Nodes[0].OK || got.Nodes[1].OK || !strings.Contains(got.Nodes[1].Error, "deadline") {
		t.Errorf("nodes %+v", got.Nodes)
	}
	if got.Report.Domains == nil || got.Report.Total.Delivered != 0 {
		t.Errorf("report %+v", got.Report)
	}
	if _, err := FetchClusterStats(context.Background(), nil, nil, nil); err == nil {
		t.Error("no error with no nodes")
	}
	if _, err := FetchClusterStats(context.Background(), nil, map[string]string{"x": dead}, url.Values{"top": {"many"}}); err == nil {
		t.Error("no error for top=many")
	}
}

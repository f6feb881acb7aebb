package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/hermod-mta/hermod/cluster"
)

// clusterRoutes adds the cluster's admin API: members, counters and the
// cluster-wide deliverability report (gathered from every alive node's
// /api/stats/domains).
func (d *daemonState) clusterRoutes(mux *http.ServeMux) {
	notClustered := func(w http.ResponseWriter) bool {
		if d.cluster == nil {
			http.Error(w, "this node is not part of a cluster ([cluster] bind is not set)", http.StatusNotFound)
			return true
		}
		return false
	}
	mux.HandleFunc("GET /api/cluster/members", func(w http.ResponseWriter, r *http.Request) {
		if notClustered(w) {
			return
		}
		writeJSON(w, d.cluster.Node().Members())
	})
	mux.HandleFunc("GET /api/cluster", func(w http.ResponseWriter, r *http.Request) {
		if notClustered(w) {
			return
		}
		writeJSON(w, d.cluster.Stats())
	})
	// The queues of every alive node, merged oldest first (limit per node
	// and in all).
	mux.HandleFunc("GET /api/cluster/queue", func(w http.ResponseWriter, r *http.Request) {
		if notClustered(w) {
			return
		}
		limit := 1000
		if v, err := strconv.Atoi(r.URL.Query().Get("limit")); err == nil && v > 0 {
			limit = v
		}
		ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		defer cancel()
		lists, missing := gatherFromNodes[[]QueueEntry](ctx, d.cluster.Node().Alive(), fmt.Sprintf("/api/queue?limit=%d", limit))
		var all []QueueEntry
		for node, list := range lists {
			for _, e := range list {
				e.Node = node
				all = append(all, e)
			}
		}
		slices.SortStableFunc(all, func(a, b QueueEntry) int { return a.Received.Compare(b.Received) })
		if len(all) > limit {
			all = all[:limit]
		}
		writeJSON(w, map[string]any{"messages": all, "missing": missing})
	})
	mux.HandleFunc("GET /api/cluster/blocks", func(w http.ResponseWriter, r *http.Request) {
		if notClustered(w) {
			return
		}
		writeJSON(w, d.cluster.Inbound().Blocks())
	})
	// POST /api/cluster/blocks?prefix=CIDR&for=DURATION&reason=TEXT blocks
	// a network on every node; DELETE ...?prefix=CIDR lifts it.
	mux.HandleFunc("POST /api/cluster/blocks", func(w http.ResponseWriter, r *http.Request) {
		if notClustered(w) {
			return
		}
		q := r.URL.Query()
		b := cluster.Block{Prefix: q.Get("prefix"), Reason: q.Get("reason")}
		if f := q.Get("for"); f != "" {
			dur, err := time.ParseDuration(f)
			if err != nil || dur <= 0 {
				http.Error(w, "for: not a positive duration", http.StatusBadRequest)
				return
			}
			b.Until = time.Now().Add(dur).UTC()
		}
		if err := d.cluster.Inbound().Block(b); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		d.log.Warn("network blocked cluster-wide", "prefix", b.Prefix, "until", b.Until, "reason", b.Reason)
		writeJSON(w, d.cluster.Inbound().Blocks())
	})
	mux.HandleFunc("DELETE /api/cluster/blocks", func(w http.ResponseWriter, r *http.Request) {
		if notClustered(w) {
			return
		}
		if err := d.cluster.Inbound().Unblock(r.URL.Query().Get("prefix")); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		writeJSON(w, d.cluster.Inbound().Blocks())
	})
	mux.HandleFunc("GET /api/cluster/stats", func(w http.ResponseWriter, r *http.Request) {
		if notClustered(w) {
			return
		}
		if _, err := parseStatsQuery(r.URL.Query()); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		addrs := map[string]string{}
		for _, m := range d.cluster.Node().Members() {
			if m.HTTP != "" && m.Status != "left" {
				addrs[m.Name] = m.HTTP
			}
		}
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		cs, err := cluster.FetchClusterStats(ctx, nil, addrs, r.URL.Query())
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		writeJSON(w, cs)
	})
}

// cmdCluster is `hermod cluster members|stats`.
func cmdCluster(args []string) error {
	if len(args) > 0 && args[0] == "push-config" {
		return cmdClusterPushConfig(args[1:])
	}
	if len(args) == 0 {
		return fmt.Errorf("cluster: want members, stats, push-config, block, unblock or blocks")
	}
	fs := flag.NewFlagSet("cluster "+args[0], flag.ExitOnError)
	admin := fs.String("http", "127.0.0.1:8025", "admin address (host:port) of any running node")
	minutes := fs.Int("minutes", 0, "stats: the last N minutes (default 60)")
	hours := fs.Int("hours", 0, "stats: the last N hours")
	domain := fs.String("domain", "", "stats: only this destination domain")
	top := fs.Int("top", 0, "stats: only the N busiest domains")
	asJSON := fs.Bool("json", false, "print JSON")
	blockFor := fs.Duration("for", 0, "block: for this long (0: until unblocked)")
	reason := fs.String("reason", "", "block: why (shown in the list)")
	fs.Parse(args[1:])
	switch args[0] {
	case "block", "unblock":
		if fs.NArg() != 1 {
			return fmt.Errorf("cluster %s: want one CIDR prefix or address", args[0])
		}
		q := url.Values{"prefix": {fs.Arg(0)}}
		method := http.MethodDelete
		if args[0] == "block" {
			method = http.MethodPost
			if *reason != "" {
				q.Set("reason", *reason)
			}
			if *blockFor > 0 {
				q.Set("for", blockFor.String())
			}
		}
		var list []cluster.Block
		if err := doJSON(method, "http://"+*admin+"/api/cluster/blocks?"+q.Encode(), &list); err != nil {
			return err
		}
		return printBlocks(list)
	case "blocks":
		var list []cluster.Block
		if err := getJSON("http://"+*admin+"/api/cluster/blocks", &list); err != nil {
			return err
		}
		return printBlocks(list)
	case "members":
		var ms []cluster.Member
		if err := getJSON("http://"+*admin+"/api/cluster/members", &ms); err != nil {
			return err
		}
		if *asJSON {
			return json.NewEncoder(os.Stdout).Encode(ms)
		}
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tID\tSTATUS\tGOSSIP\tSMTP\tADMIN\tREPLICATION\tCONFIG")
		for _, m := range ms {
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\t%d\n", m.Name, m.ID, m.Status, m.Gossip,
				strings.Join(m.SMTP, ","), m.HTTP, m.Repl, m.ConfigVersion)
		}
		return tw.Flush()
	case "stats":
		q := url.Values{}
		if *minutes > 0 {
			q.Set("minutes", strconv.Itoa(*minutes))
		}
		if *hours > 0 {
			q.Set("hours", strconv.Itoa(*hours))
		}
		if *domain != "" {
			q.Set("domain", *domain)
		}
		if *top > 0 {
			q.Set("top", strconv.Itoa(*top))
		}
		var cs cluster.ClusterStats
		if err := getJSON("http://"+*admin+"/api/cluster/stats?"+q.Encode(), &cs); err != nil {
			return err
		}
		if *asJSON {
			enc := json.NewEncoder(os.Stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(cs)
		}
		printStatsReport(os.Stdout, cs.Report)
		for _, n := range cs.Nodes {
			if !n.OK {
				fmt.Printf("missing: %s (%s): %s\n", n.Name, n.Addr, n.Error)
			}
		}
		return nil
	}
	return fmt.Errorf("cluster: unknown subcommand %q (members, stats, block, unblock, blocks)", args[0])
}

func printBlocks(list []cluster.Block) error {
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PREFIX	UNTIL	BY	REASON")
	for _, b := range list {
		until := "-"
		if !b.Until.IsZero() {
			until = b.Until.Local().Format(time.DateTime)
		}
		fmt.Fprintf(tw, "%s	%s	%s	%s\n", b.Prefix, until, b.By, b.Reason)
	}
	return tw.Flush()
}

// gatherFromNodes GETs path from the admin API of every member given (that
// has one) at once and returns each one's decoded answer by node name,
// and why the others did not answer.
func gatherFromNodes[T any](ctx context.Context, members []cluster.Member, path string) (map[string]T, map[string]string) {
	var (
		mu      sync.Mutex
		wg      sync.WaitGroup
		got     = map[string]T{}
		missing = map[string]string{}
	)
	for _, m := range members {
		if m.HTTP == "" {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var v T
			err := getJSONCtx(ctx, "http://"+m.HTTP+path, &v)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				missing[m.Name] = err.Error()
				return
			}
			got[m.Name] = v
		}()
	}
	wg.Wait()
	return got, missing
}

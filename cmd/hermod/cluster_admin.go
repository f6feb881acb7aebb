package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
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
	if len(args) == 0 {
		return fmt.Errorf("cluster: want members or stats")
	}
	fs := flag.NewFlagSet("cluster "+args[0], flag.ExitOnError)
	admin := fs.String("http", "127.0.0.1:8025", "admin address (host:port) of any running node")
	minutes := fs.Int("minutes", 0, "stats: the last N minutes (default 60)")
	hours := fs.Int("hours", 0, "stats: the last N hours")
	domain := fs.String("domain", "", "stats: only this destination domain")
	top := fs.Int("top", 0, "stats: only the N busiest domains")
	asJSON := fs.Bool("json", false, "print JSON")
	fs.Parse(args[1:])
	switch args[0] {
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
	return fmt.Errorf("cluster: unknown subcommand %q (members, stats)", args[0])
}

package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/hermod-mta/hermod/engine"
)

// StatsPath is the admin API path of a node's per-domain deliverability
// report (an engine.Report in JSON).
const StatsPath = "/api/stats/domains"

// maxStatsBody bounds the size of one node's answer.
const maxStatsBody = 64 << 20

// ClusterStats is the deliverability report of the whole cluster: the
// merged reports of the nodes that answered, and how each node answered.
type ClusterStats struct {
	Report engine.Report `json:"report"`
	// Nodes are all nodes asked, sorted by name; those not OK are missing
	// from Report.
	Nodes []NodeStats `json:"nodes"`
}

// NodeStats says whether one node's report is part of a ClusterStats.
type NodeStats struct {
	Name  string `json:"name"`
	Addr  string `json:"addr"`
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// Missing returns the names of the nodes whose report is not included.
func (c *ClusterStats) Missing() []string {
	var out []string
	for _, n := range c.Nodes {
		if !n.OK {
			out = append(out, n.Name)
		}
	}
	return out
}

// FetchClusterStats asks every node (name → admin host:port) for its
// report, GET http://ADDR/api/stats/domains?QUERY, all at once and until
// ctx ends, and merges the answers with engine.MergeReports. A node that
// fails (unreachable, timed out, not 200, bad JSON) is listed with its
// error and left out of the report, so one dead node does not hide the
// others; the error is non-nil only when no node answered.
//
// query is passed on as is except for "top": cutting each node's report
// to its own busiest domains before merging would lose counts, so the
// nodes send all domains and the merged report is cut here. client nil
// means http.DefaultClient.
func FetchClusterStats(ctx context.Context, client *http.Client, adminAddrs map[string]string, query url.Values) (ClusterStats, error) {
	if client == nil {
		client = http.DefaultClient
	}
	top := 0
	q := url.Values{}
	for k, v := range query {
		if k == "top" {
			if len(v) > 0 {
				n, err := strconv.Atoi(v[0])
				if err != nil || n < 0 {
					return ClusterStats{}, fmt.Errorf("cluster stats: top=%q is not a count", v[0])
				}
				top = n
			}
			continue
		}
		q[k] = v
	}
	rawQuery := q.Encode()

	names := make([]string, 0, len(adminAddrs))
	for name := range adminAddrs {
		names = append(names, name)
	}
	slices.Sort(names)
	out := ClusterStats{Nodes: make([]NodeStats, len(names))}
	reports := make([]engine.Report, len(names))
	var wg sync.WaitGroup
	for i, name := range names {
		addr := adminAddrs[name]
		out.Nodes[i] = NodeStats{Name: name, Addr: addr}
		wg.Go(func() {
			var err error
			reports[i], err = fetchNodeStats(ctx, client, addr, rawQuery)
			if err != nil {
				out.Nodes[i].Error = err.Error()
			} else {
				out.Nodes[i].OK = true
			}
		})
	}
	wg.Wait()

	var ok []engine.Report
	var errs []error
	for i, n := range out.Nodes {
		if n.OK {
			ok = append(ok, reports[i])
		} else {
			errs = append(errs, fmt.Errorf("%s: %s", n.Name, n.Error))
		}
	}
	out.Report = engine.MergeReports(ok...).Top(top)
	switch {
	case len(names) == 0:
		return out, errors.New("cluster stats: no nodes to ask")
	case len(ok) == 0:
		return out, fmt.Errorf("cluster stats: no node answered: %w", errors.Join(errs...))
	}
	return out, nil
}

func fetchNodeStats(ctx context.Context, client *http.Client, addr, rawQuery string) (engine.Report, error) {
	var r engine.Report
	if addr == "" {
		return r, errors.New("no admin address")
	}
	u := "http://" + addr + StatsPath
	if rawQuery != "" {
		u += "?" + rawQuery
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return r, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return r, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return r, fmt.Errorf("GET %s: %s: %s", u, resp.Status, strings.TrimSpace(string(b)))
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxStatsBody)).Decode(&r); err != nil {
		return r, fmt.Errorf("GET %s: decoding the report: %w", u, err)
	}
	return r, nil
}

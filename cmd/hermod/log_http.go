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
	"text/tabwriter"
	"time"

	"github.com/hermod-mta/hermod/engine"
)

// parseLogQuery reads domain, event, msg_id, rcpt, minutes and limit.
func parseLogQuery(v url.Values, now time.Time) (engine.LogQuery, error) {
	q := engine.LogQuery{Domain: v.Get("domain"), Event: v.Get("event"), MsgID: v.Get("msg_id"), Rcpt: v.Get("rcpt")}
	if s := v.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 10000 {
			return q, fmt.Errorf("limit: %q is not in 1–10000", s)
		}
		q.Limit = n
	}
	if s := v.Get("minutes"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			return q, fmt.Errorf("minutes: %q is not a positive number", s)
		}
		q.Since = now.Add(-time.Duration(n) * time.Minute)
	}
	switch q.Event {
	case "", "delivered", "deferred", "bounced", "expired":
	default:
		return q, fmt.Errorf("event: %q is not delivered, deferred, bounced or expired", q.Event)
	}
	return q, nil
}

// clusterLogRecord is a delivery record and the node that made it.
type clusterLogRecord struct {
	Node string `json:"node"`
	engine.DeliveryRecord
}

// logRoutes adds GET /api/log (this node's recent delivery records) and
// GET /api/cluster/log (every alive node's, merged newest first).
func (d *daemonState) logRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /api/log", func(w http.ResponseWriter, r *http.Request) {
		q, err := parseLogQuery(r.URL.Query(), time.Now())
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		writeJSON(w, d.recent.Query(q))
	})
	mux.HandleFunc("GET /api/cluster/log", func(w http.ResponseWriter, r *http.Request) {
		if d.cluster == nil {
			http.Error(w, "this node is not part of a cluster", http.StatusNotFound)
			return
		}
		q, err := parseLogQuery(r.URL.Query(), time.Now())
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if q.Limit == 0 {
			q.Limit = 100
		}
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		lists, missing := gatherFromNodes[[]engine.DeliveryRecord](ctx, d.cluster.Node().Alive(), "/api/log?"+r.URL.RawQuery)
		var all []clusterLogRecord
		for node, recs := range lists {
			for _, rec := range recs {
				all = append(all, clusterLogRecord{Node: node, DeliveryRecord: rec})
			}
		}
		slices.SortStableFunc(all, func(a, b clusterLogRecord) int { return b.Time.Compare(a.Time) })
		if len(all) > q.Limit {
			all = all[:q.Limit]
		}
		writeJSON(w, map[string]any{"records": all, "missing": missing})
	})
}

func getJSONCtx(ctx context.Context, u string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", u, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// cmdLog is `hermod log`.
func cmdLog(args []string) error {
	fs := flag.NewFlagSet("log", flag.ExitOnError)
	admin := fs.String("http", "127.0.0.1:8025", "admin address (host:port) of the running daemon")
	all := fs.Bool("cluster", false, "every node of the cluster, merged")
	domain := fs.String("domain", "", "only this destination domain")
	event := fs.String("event", "", "only delivered, deferred, bounced or expired")
	msg := fs.String("msg", "", "only this queue id")
	rcpt := fs.String("rcpt", "", "only this recipient")
	minutes := fs.Int("minutes", 0, "only the last N minutes")
	n := fs.Int("n", 50, "at most N records")
	asJSON := fs.Bool("json", false, "print JSON")
	fs.Parse(args)
	q := url.Values{"limit": {strconv.Itoa(*n)}}
	for k, v := range map[string]string{"domain": *domain, "event": *event, "msg_id": *msg, "rcpt": *rcpt} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if *minutes > 0 {
		q.Set("minutes", strconv.Itoa(*minutes))
	}
	var recs []clusterLogRecord
	if *all {
		var res struct {
			Records []clusterLogRecord `json:"records"`
			Missing map[string]string  `json:"missing"`
		}
		if err := getJSON("http://"+*admin+"/api/cluster/log?"+q.Encode(), &res); err != nil {
			return err
		}
		recs = res.Records
		for node, e := range res.Missing {
			fmt.Fprintf(os.Stderr, "missing: %s: %s\n", node, e)
		}
	} else {
		var rs []engine.DeliveryRecord
		if err := getJSON("http://"+*admin+"/api/log?"+q.Encode(), &rs); err != nil {
			return err
		}
		for _, r := range rs {
			recs = append(recs, clusterLogRecord{DeliveryRecord: r})
		}
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(recs)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TIME\tNODE\tEVENT\tMSG\tRCPT\tMX\tDELAY\tREPLY")
	for _, r := range recs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%.3fs\t%s\n", r.Time.Local().Format(time.DateTime+".000"), r.Node, r.Event,
			r.MsgID, r.Rcpt, r.MX, r.Delay, r.Reply)
	}
	return tw.Flush()
}

package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hermod-mta/hermod/engine"
)

// defaultStatsWindow is the window of /api/stats/domains and `hermod
// stats` without minutes or hours.
const defaultStatsWindow = 60 * time.Minute

// statsQuery is the parsed query of /api/stats/domains.
type statsQuery struct {
	window time.Duration
	domain string // only this domain's row; "" for all
	top    int    // only the busiest top domains; 0 for all
}

// parseStatsQuery reads minutes=N or hours=N (not both; default 60
// minutes), domain=D and top=N.
func parseStatsQuery(v url.Values) (statsQuery, error) {
	q := statsQuery{window: defaultStatsWindow, domain: strings.TrimSpace(v.Get("domain"))}
	var errs []error
	count := func(name string) (int, bool) {
		s := v.Get(name)
		if s == "" {
			return 0, false
		}
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 {
			errs = append(errs, fmt.Errorf("%s=%q: want a whole number ≥ 0", name, s))
			return 0, false
		}
		return n, true
	}
	minutes, hasMin := count("minutes")
	hours, hasHours := count("hours")
	switch {
	case hasMin && hasHours:
		errs = append(errs, errors.New("give minutes or hours, not both"))
	case hasMin:
		q.window = time.Duration(minutes) * time.Minute
	case hasHours:
		q.window = time.Duration(hours) * time.Hour
	}
	if (hasMin || hasHours) && q.window <= 0 {
		errs = append(errs, errors.New("the window must be at least a minute"))
	}
	q.top, _ = count("top")
	return q, errors.Join(errs...)
}

// statsDomainsHandler serves GET /api/stats/domains: the engine.Report of
// the last minutes=N (default 60) or hours=N, widened to whole minutes and
// cut to the recorder's retention; domain=D keeps only D's row and top=N
// the N busiest domains (the total always counts all of them).
func statsDomainsHandler(stats *engine.DomainStats, now func() time.Time) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		q, err := parseStatsQuery(r.URL.Query())
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		t := now()
		rep := stats.Snapshot(t.Add(-q.window), t)
		if q.domain != "" {
			rep = rep.Only(q.domain)
		}
		writeJSON(w, rep.Top(q.top))
	}
}

// cmdStats is `hermod stats`: a running daemon's deliverability per
// destination domain, as a table or JSON.
func cmdStats(args []string) error { return runStats(args, os.Stdout) }

func runStats(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("stats", flag.ContinueOnError)
	fs.SetOutput(out)
	var admin string
	fs.StringVar(&admin, "admin", "127.0.0.1:8025", "admin address (host:port) of the running daemon")
	fs.StringVar(&admin, "http", "127.0.0.1:8025", "same as -admin")
	minutes := fs.Int("minutes", 0, "report the last N minutes (default 60)")
	hours := fs.Int("hours", 0, "report the last N hours")
	domain := fs.String("domain", "", "only this destination domain")
	top := fs.Int("top", 0, "only the N busiest domains (0: all)")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("stats: unexpected argument %q", fs.Arg(0))
	}
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
	u := "http://" + admin + "/api/stats/domains"
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	var rep engine.Report
	if err := getJSON(u, &rep); err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	printStatsReport(out, rep)
	return nil
}

// printStatsReport writes a report as a table: one row per domain, then
// the total of all domains.
func printStatsReport(out io.Writer, rep engine.Report) {
	fmt.Fprintf(out, "window %s … %s (%s)", rep.Since.Local().Format(time.DateTime), rep.Until.Local().Format(time.DateTime),
		rep.Until.Sub(rep.Since).Round(time.Second))
	if rep.Partial {
		fmt.Fprint(out, "; PARTIAL: older buckets were dropped for memory, counts are too low")
	}
	fmt.Fprintln(out)
	tw := tabwriter.NewWriter(out, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "DOMAIN\tDELIVERED\tDEFERRED\tBOUNCED\tEXPIRED\tP50\tP90\tP99")
	row := func(name string, d engine.DomainReport) {
		p := func(v float64) string {
			if d.Delivered == 0 {
				return "-"
			}
			return formatLatency(v)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%s\t%s\t%s\n", name, d.Delivered, d.Deferred, d.Bounced, d.Expired,
			p(d.P50), p(d.P90), p(d.P99))
	}
	for _, d := range rep.Domains {
		row(d.Domain, d)
	}
	row("TOTAL (all domains)", rep.Total)
	tw.Flush()
}

// formatLatency writes seconds with a unit that keeps about three digits.
func formatLatency(sec float64) string {
	switch {
	case math.IsNaN(sec) || sec < 0:
		return "?"
	case sec < 0.01:
		return fmt.Sprintf("%.1fms", sec*1000)
	case sec < 1:
		return fmt.Sprintf("%.0fms", sec*1000)
	case sec < 60:
		return fmt.Sprintf("%.2gs", sec)
	case sec < 3600:
		return fmt.Sprintf("%.1fm", sec/60)
	case sec < 48*3600:
		return fmt.Sprintf("%.1fh", sec/3600)
	}
	return fmt.Sprintf("%.1fd", sec/86400)
}

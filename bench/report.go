package bench

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// WriteText writes r as a readable table.
func (r LoadResult) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(k string, v ...any) { fmt.Fprintf(tw, "%s\t%s\n", k, fmt.Sprint(v...)) }
	row("run", r.RunTag)
	row("elapsed", r.Elapsed.Round(time.Millisecond))
	row("messages", fmt.Sprintf("%d attempted, %d accepted, %d rejected, %d tempfailed, %d failed",
		r.Attempted, r.Accepted, r.Rejected, r.TempFailed, r.Failed))
	row("recipients", fmt.Sprintf("%d accepted, %d rejected, %d tempfailed; %d delivered",
		r.RcptAccepted, r.RcptRejected, r.RcptTempFailed, r.Delivered))
	row("reply codes", formatCodes(r.Codes))
	row("connections", fmt.Sprintf("%d (%d failed, %d with TLS)", r.Connections, r.ConnFailures, r.TLSConnections))
	row("rate", fmt.Sprintf("%.0f msg/s accepted, %.1f MiB/s", r.Rate, float64(r.Bytes)/(1<<20)/max(r.Elapsed.Seconds(), 1e-9)))
	row("latency", r.Latency)
	if r.Sojourn.Count > 0 {
		row("sojourn", r.Sojourn)
	}
	return tw.Flush()
}

// WriteText writes s as a readable table.
func (s SinkStats) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(k string, v ...any) { fmt.Fprintf(tw, "%s\t%s\n", k, fmt.Sprint(v...)) }
	row("uptime", s.Uptime.Round(time.Millisecond))
	row("connections", fmt.Sprintf("%d (%d open, %d TLS, %d over the per-IP cap)", s.Connections, s.Active, s.TLS,
		s.ConnCapped))
	row("messages", fmt.Sprintf("%d (%d recipients, %d bytes)", s.Messages, s.Recipients, s.Bytes))
	row("deliveries", fmt.Sprintf("%d unique, %d duplicates, %d corrupted, %d unstamped", s.Unique, s.Duplicates,
		s.Corrupted, s.Unstamped))
	row("faults", fmt.Sprintf("%d dropped, %d hung, %d greylisted", s.Dropped, s.Hung, s.Greylisted))
	row("reply codes", formatCodes(s.Replies))
	row("end to end", s.E2E)
	type dn struct {
		d string
		n uint64
	}
	var top []dn
	for d, n := range s.Domains {
		top = append(top, dn{d, n})
	}
	slices.SortFunc(top, func(a, b dn) int {
		if a.n != b.n {
			if a.n > b.n {
				return -1
			}
			return 1
		}
		return strings.Compare(a.d, b.d)
	})
	var parts []string
	for i, x := range top {
		if i == 5 {
			parts = append(parts, fmt.Sprintf("… (%d domains)", len(top)))
			break
		}
		parts = append(parts, x.d+"="+strconv.FormatUint(x.n, 10))
	}
	row("top domains", strings.Join(parts, " "))
	return tw.Flush()
}

func formatCodes(m map[int]uint64) string {
	codes := slices.Sorted(maps.Keys(m))
	var parts []string
	for _, c := range codes {
		name := strconv.Itoa(c)
		if c == 0 {
			name = "none"
		}
		parts = append(parts, name+"="+strconv.FormatUint(m[c], 10))
	}
	return strings.Join(parts, " ")
}

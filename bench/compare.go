package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"
)

// The roles of a run in a Comparison (Report.Role).
const (
	RoleTarget = "target"
	RolePeer   = "peer"
)

// CompareConfig configures Compare.
type CompareConfig struct {
	// RunConfig holds the scenario and the target measured (Target,
	// default: Hermod) and how each run is made.
	RunConfig
	// Peer is the target compared with. Required.
	Peer Target
	// PeerMessages, when > 0, replaces load.messages in the peer's runs: a
	// slow peer (Postfix relays a few hundred messages per second here)
	// gets fewer messages so that its runs take as long as the target's.
	// Rates stay comparable; counts do not. Default: 0 (as the target).
	PeerMessages int
	// Rounds is the number of (target, peer) pairs of runs, alternated:
	// target, peer, target, peer… Default: 2.
	Rounds int
}

// EnsureDefaults fills zero fields with their defaults.
func (c *CompareConfig) EnsureDefaults() {
	c.RunConfig.EnsureDefaults()
	if c.Rounds == 0 {
		c.Rounds = 2
	}
}

// Validate reports every problem at once.
func (c CompareConfig) Validate() error {
	errs := []error{c.RunConfig.Validate()}
	if c.Peer == nil {
		errs = append(errs, errors.New("peer: required"))
	}
	if c.Rounds < 1 {
		errs = append(errs, errors.New("rounds: must be >= 1"))
	}
	if c.PeerMessages < 0 {
		errs = append(errs, errors.New("peer_messages: must be >= 0"))
	}
	return errors.Join(errs...)
}

// Comparison is the outcome of Compare: every run in the order made, and
// each figure's median per side with the ratio target/peer.
type Comparison struct {
	Scenario    string       `json:"scenario"`
	Description string       `json:"description,omitempty"`
	Target      string       `json:"target"`
	Peer        string       `json:"peer"`
	Rounds      int          `json:"rounds"`
	Start       time.Time    `json:"start"`
	Host        HostInfo     `json:"host"`
	Notes       []string     `json:"notes,omitempty"`
	Rows        []CompareRow `json:"rows"`
	Runs        []Report     `json:"runs"`
}

// CompareRow is one figure side by side.
type CompareRow struct {
	Figure string `json:"figure"`
	Unit   string `json:"unit"`
	// Target and Peer are medians over the rounds; Known says both sides
	// measured the figure.
	Target float64 `json:"target"`
	Peer   float64 `json:"peer"`
	Known  bool    `json:"known"`
	// TargetKnown and PeerKnown say each side measured it.
	TargetKnown bool `json:"target_known"`
	PeerKnown   bool `json:"peer_known"`
	// Ratio is Target/Peer (0 when not both known or Peer is 0).
	Ratio float64 `json:"ratio"`
	// Better is "higher" or "lower" (which way is better), or "" for
	// counts that must be zero.
	Better string `json:"better"`
}

// Compare runs cfg.Scenario against cfg.Target and cfg.Peer alternately
// on one test DNS and sink (reset between runs, each run with a fresh run
// tag), Rounds times each, and compares the figures. When a run fails,
// Compare returns the runs made so far with the error.
func Compare(ctx context.Context, cfg CompareConfig) (Comparison, error) {
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return Comparison{}, err
	}
	r, err := newRig(cfg.RunConfig)
	if err != nil {
		return Comparison{}, err
	}
	defer r.close()
	c := Comparison{
		Scenario: cfg.Scenario.Name, Description: cfg.Scenario.Description, Target: cfg.Target.Name(),
		Peer: cfg.Peer.Name(), Rounds: cfg.Rounds, Start: time.Now(), Host: r.host,
	}
	tMsgs := cfg.Scenario.Load.Messages
	if cfg.Messages > 0 {
		tMsgs = cfg.Messages
	}
	pMsgs := tMsgs
	if cfg.PeerMessages > 0 {
		pMsgs = cfg.PeerMessages
	}
	var peerNotes []string
	if pMsgs != tMsgs {
		n := fmt.Sprintf("%s ran %d messages per round, %s %d: rates and latencies are comparable, counts are not",
			c.Peer, pMsgs, c.Target, tMsgs)
		c.Notes = append(c.Notes, n)
		peerNotes = append(peerNotes, n)
	}
	for round := 1; round <= cfg.Rounds; round++ {
		for _, side := range []struct {
			role  string
			t     Target
			msgs  int
			notes []string
		}{{RoleTarget, cfg.Target, cfg.Messages, nil}, {RolePeer, cfg.Peer, cfg.PeerMessages, peerNotes}} {
			r.prog.note(fmt.Sprintf("round %d/%d: %s", round, cfg.Rounds, side.t.Name()))
			rep, err := r.run(ctx, side.t, side.msgs, side.notes)
			rep.Role = side.role
			if rep.RunTag != "" {
				c.Runs = append(c.Runs, rep)
			}
			if err != nil {
				c.Rows = compareRows(c.Runs)
				return c, fmt.Errorf("bench: round %d, %s: %w", round, side.t.Name(), err)
			}
		}
	}
	c.Rows = compareRows(c.Runs)
	for _, rep := range c.Runs {
		if !rep.Complete {
			c.Notes = append(c.Notes, fmt.Sprintf("a %s run (%s) did not deliver everything in time: its delivery "+
				"rate covers only what arrived", rep.Target, rep.RunTag))
		}
	}
	return c, nil
}

// figure is one compared figure: how to read it from a report.
type figure struct {
	name, unit, better string
	get                func(Report) (float64, bool)
	sum                bool // counts: summed over rounds, no ratio
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

var figures = []figure{
	{name: "injection rate", unit: "msg/s", better: "higher",
		get: func(r Report) (float64, bool) { return r.InjectionRate, r.Load.Accepted > 0 }},
	{name: "delivery rate", unit: "msg/s", better: "higher",
		get: func(r Report) (float64, bool) { return r.DeliveryRate, r.Accounting.Delivered > 0 }},
	{name: "e2e latency p50", unit: "ms", better: "lower",
		get: func(r Report) (float64, bool) { return ms(r.E2E.P50), r.E2E.Count > 0 }},
	{name: "e2e latency p90", unit: "ms", better: "lower",
		get: func(r Report) (float64, bool) { return ms(r.E2E.P90), r.E2E.Count > 0 }},
	{name: "e2e latency p99", unit: "ms", better: "lower",
		get: func(r Report) (float64, bool) { return ms(r.E2E.P99), r.E2E.Count > 0 }},
	{name: "e2e latency max", unit: "ms", better: "lower",
		get: func(r Report) (float64, bool) { return ms(r.E2E.Max), r.E2E.Count > 0 }},
	{name: "accept latency p99", unit: "ms", better: "lower",
		get: func(r Report) (float64, bool) { return ms(r.Accept.P99), r.Accept.Count > 0 }},
	{name: "target CPU per message", unit: "µs", better: "lower",
		get: func(r Report) (float64, bool) { return float64(r.CPUPerMsg) / 1e3, r.MeasuredProcess }},
	{name: "target peak RSS", unit: "MiB", better: "lower",
		get: func(r Report) (float64, bool) { return float64(r.PeakRSS) / (1 << 20), r.MeasuredProcess }},
	{name: "fsyncs per message", unit: "", better: "lower",
		get: func(r Report) (float64, bool) { return r.FsyncsPerMsg, r.MeasuredSpool }},
	{name: "disk writes per message", unit: "KiB", better: "lower",
		get: func(r Report) (float64, bool) { return r.DiskWritePerMsg / 1024, r.MeasuredProcess }},
	{name: "disk flushes per message", unit: "", better: "lower",
		get: func(r Report) (float64, bool) { return r.DiskFlushesPerMsg, r.DiskFlushesPerMsg > 0 }},
	{name: "harness CPU per message", unit: "µs", better: "lower",
		get: func(r Report) (float64, bool) { return float64(r.HarnessCPUPerMsg) / 1e3, r.Load.Accepted > 0 }},
	{name: "machine busy", unit: "%", better: "",
		get: func(r Report) (float64, bool) { return 100 * r.MachineBusy, r.MachineBusy > 0 }},
	{name: "messages accepted", unit: "", sum: true,
		get: func(r Report) (float64, bool) { return float64(r.Load.Accepted), true }},
	{name: "lost", unit: "", sum: true,
		get: func(r Report) (float64, bool) { return float64(r.Accounting.Lost), true }},
	{name: "duplicates", unit: "", sum: true,
		get: func(r Report) (float64, bool) { return float64(r.Accounting.Duplicates), true }},
	{name: "corrupted", unit: "", sum: true,
		get: func(r Report) (float64, bool) { return float64(r.Sink.Corrupted), true }},
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// compareRows computes the rows from the runs of both sides.
func compareRows(runs []Report) []CompareRow {
	var rows []CompareRow
	unit := "msg/s"
	for _, r := range runs {
		if r.Rcpts > 1 {
			unit = "rcpt/s"
		}
	}
	for _, f := range figures {
		var tv, pv []float64
		for _, r := range runs {
			v, ok := f.get(r)
			if !ok {
				continue
			}
			if r.Role == RolePeer {
				pv = append(pv, v)
			} else {
				tv = append(tv, v)
			}
		}
		row := CompareRow{Figure: f.name, Unit: f.unit, Better: f.better,
			TargetKnown: len(tv) > 0, PeerKnown: len(pv) > 0}
		if f.name == "delivery rate" {
			row.Unit = unit
		}
		if f.sum {
			for _, v := range tv {
				row.Target += v
			}
			for _, v := range pv {
				row.Peer += v
			}
			row.Better = ""
		} else {
			row.Target, row.Peer = median(tv), median(pv)
		}
		row.Known = row.TargetKnown && row.PeerKnown
		if row.Known && !f.sum && row.Peer != 0 {
			row.Ratio = row.Target / row.Peer
		}
		rows = append(rows, row)
	}
	return rows
}

// Row returns the row of the named figure.
func (c Comparison) Row(name string) (CompareRow, bool) {
	for _, r := range c.Rows {
		if r.Figure == name {
			return r, true
		}
	}
	return CompareRow{}, false
}

func fmtFigure(v float64, known bool) string {
	if !known {
		return "-"
	}
	switch a := math.Abs(v); {
	case a == 0:
		return "0"
	case a >= 1000:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 0.1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.4f", v)
	}
}

// fmtRatio formats a ratio with about three significant digits ("-" for
// none).
func fmtRatio(r float64) string {
	switch {
	case r == 0:
		return "-"
	case r >= 10:
		return fmt.Sprintf("%.1f×", r)
	case r >= 0.1:
		return fmt.Sprintf("%.2f×", r)
	default:
		return fmt.Sprintf("%.2g×", r)
	}
}

// writeTable writes rows with the first column left-aligned and the others
// right-aligned, two spaces apart.
func writeTable(w io.Writer, rows [][]string) {
	var widths []int
	for _, row := range rows {
		for i, cell := range row {
			if i >= len(widths) {
				widths = append(widths, 0)
			}
			widths[i] = max(widths[i], utf8.RuneCountInString(cell))
		}
	}
	for _, row := range rows {
		var b strings.Builder
		for i, cell := range row {
			pad := strings.Repeat(" ", widths[i]-utf8.RuneCountInString(cell))
			if i == 0 {
				b.WriteString(cell + pad)
			} else {
				b.WriteString("  " + pad + cell)
			}
		}
		fmt.Fprintln(w, b.String())
	}
}

// WriteText writes the comparison as a table: one line per run, then each
// figure side by side with the ratio.
func (c Comparison) WriteText(w io.Writer) error {
	fmt.Fprintf(w, "scenario %s: %s vs %s, %d round(s), %s\n", c.Scenario, c.Target, c.Peer, c.Rounds,
		c.Start.UTC().Format("2006-01-02 15:04 UTC"))
	if c.Description != "" {
		fmt.Fprintf(w, "  %s\n", c.Description)
	}
	fmt.Fprintf(w, "machine %s: %d CPUs %s, kernel %s (shared machines are noisy: compare runs of one invocation)\n\n",
		c.Host.Hostname, c.Host.CPUs, c.Host.CPUModel, c.Host.Kernel)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "run\ttarget\tmessages\tinjection\tdelivery\te2e p99\tCPU/msg\tlost\tcomplete\n")
	for i, r := range c.Runs {
		cpu := "-"
		if r.MeasuredProcess {
			cpu = fmtMicros(r.CPUPerMsg)
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%.0f msg/s\t%.0f %s\t%s\t%s\t%d\t%v\n", i+1, r.Target, r.Load.Accepted,
			r.InjectionRate, r.DeliveryRate, r.rateUnit(), fmtDur(r.E2E.P99), cpu, r.Accounting.Lost, r.Complete)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	table := [][]string{{"figure (median of rounds)", c.Target, c.Peer, c.Target + "/" + c.Peer}}
	for _, r := range c.Rows {
		name := r.Figure
		if r.Unit != "" {
			name += " (" + r.Unit + ")"
		}
		table = append(table, []string{name, fmtFigure(r.Target, r.TargetKnown), fmtFigure(r.Peer, r.PeerKnown),
			fmtRatio(r.Ratio)})
	}
	writeTable(w, table)
	for _, n := range c.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
	for _, r := range c.Runs {
		for _, p := range r.Problems() {
			fmt.Fprintf(w, "PROBLEM (%s, run %s): %s\n", r.Target, r.RunTag, p)
		}
	}
	return nil
}

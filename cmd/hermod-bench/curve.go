package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/hermod-mta/hermod/bench"
)

// fractionsFlag is a comma-separated list of fractions ("0.5,0.9" or
// "50%,90%").
type fractionsFlag struct{ p *[]float64 }

func (f fractionsFlag) String() string {
	if f.p == nil {
		return ""
	}
	parts := make([]string, len(*f.p))
	for i, v := range *f.p {
		parts[i] = strconv.FormatFloat(v, 'f', -1, 64)
	}
	return strings.Join(parts, ",")
}

func (f fractionsFlag) Set(s string) error {
	var out []float64
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		pct := strings.HasSuffix(part, "%")
		v, err := strconv.ParseFloat(strings.TrimSuffix(part, "%"), 64)
		if err != nil {
			return fmt.Errorf("fraction %q: %w", part, err)
		}
		if pct {
			v /= 100
		}
		out = append(out, v)
	}
	if len(out) == 0 {
		return errors.New("no fraction given")
	}
	*f.p = out
	return nil
}

func cmdLatencyCurve(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f runFlags
	fs := flag.NewFlagSet("latency-curve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: hermod-bench latency-curve [SCENARIO] [flags]\n\n"+
			"Measure hermod's maximum rate (the delivery rate of --max-scenario, a closed loop), then run SCENARIO "+
			"(default latency) as an open loop at each --fractions of it for --step, and print one table.\n\n")
		fs.PrintDefaults()
	}
	f.bind(fs)
	maxScenario := fs.String("max-scenario", "steady-1k", "closed-loop scenario whose delivery rate is the maximum")
	maxRate := fs.Float64("max-rate", 0, "take this as the maximum rate (msg/s) instead of measuring it")
	fractions := []float64{0.5, 0.9}
	fs.Var(fractionsFlag{&fractions}, "fractions", "comma-separated shares of the maximum rate (0.5,0.9 or 50%,90%)")
	step := fs.Duration("step", 45*time.Second, "how long each open-loop step sends for")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if f.htmlOut != "" {
		return errors.New("latency-curve: --html is not supported (use --json)")
	}
	if len(pos) == 0 {
		pos = []string{"latency"}
	}
	sc, err := scenarioArg("latency-curve", pos)
	if err != nil {
		return err
	}
	cfg := bench.CurveConfig{RunConfig: f.runConfig(sc, stderr), MaxRate: *maxRate, Fractions: fractions,
		StepDuration: *step}
	if *maxRate == 0 {
		if cfg.MaxScenario, err = bench.LoadScenario(*maxScenario); err != nil {
			return err
		}
	}
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("latency-curve: %w", err)
	}
	ht, err := f.hermodTarget()
	if err != nil {
		return err
	}
	cfg.Target = ht
	c, curveErr := bench.LatencyCurve(ctx, cfg)
	if c.Max == nil && len(c.Steps) == 0 {
		return curveErr
	}
	if err := c.WriteText(stdout); err != nil {
		return err
	}
	if f.jsonOut != "" {
		if err := writeJSON(f.jsonOut, stdout, c); err != nil {
			return err
		}
	}
	return curveErr
}

// openLoopFlags applies run's --rate and --for to sc: with --rate, the
// scenario's load becomes an open loop at that rate for --for
// (bench.OpenLoopAt); --for without --rate is an error.
func openLoopFlags(fs *flag.FlagSet, sc bench.Scenario, rate float64, d time.Duration) (bench.Scenario, error) {
	set := map[string]bool{}
	fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	if !set["rate"] {
		if set["for"] {
			return sc, errors.New("--for goes with --rate")
		}
		return sc, nil
	}
	return bench.OpenLoopAt(sc, rate, d)
}

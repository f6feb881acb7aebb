package main

import (
	"context"
	"flag"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/bench"
)

func TestFractionsFlag(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []float64
		err  string
	}{
		{in: "0.5,0.9", want: []float64{0.5, 0.9}},
		{in: "50%, 90%", want: []float64{0.5, 0.9}},
		{in: "0.25", want: []float64{0.25}},
		{in: "75%,1", want: []float64{0.75, 1}},
		{in: "half", err: "fraction \"half\""},
		{in: " , ", err: "no fraction"},
	} {
		var got []float64
		err := fractionsFlag{&got}.Set(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: err = %v, want %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("%q: got %v, %v", tc.in, got, err)
		}
	}
	v := []float64{0.5, 0.9}
	if s := (fractionsFlag{&v}).String(); s != "0.5,0.9" {
		t.Errorf("String() = %q", s)
	}
}

// TestLatencyCurveArgs checks the flags are validated before anything
// runs (no hermod binary is needed to fail these).
func TestLatencyCurveArgs(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--html", "x.html"}, "--html is not supported"},
		{[]string{"nope"}, "unknown scenario"},
		{[]string{"latency", "smoke"}, "exactly one SCENARIO"},
		{[]string{"--max-scenario", "nope"}, "unknown scenario"},
		{[]string{"--max-scenario", "latency"}, "must be a closed loop"},
		{[]string{"--fractions", "0.5,3"}, "3 is not in (0, 1.5]"},
		{[]string{"--fractions", "x"}, "fraction \"x\""},
		{[]string{"--step", "10ms"}, "step_duration"},
		{[]string{"--max-rate", "-3"}, "max_rate"},
		{[]string{"--hermod-config", "/nonexistent.toml", "--hermod", "/bin/true"}, "nonexistent"},
	} {
		err := cmdLatencyCurve(ctx, tc.args, io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: err = %v, want %q", tc.args, err, tc.want)
		}
	}
}

func TestRunRateFlags(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"latency", "--for", "30s"}, "--for goes with --rate"},
		{[]string{"latency", "--rate", "0"}, "rate: must be > 0"},
		{[]string{"latency", "--rate", "-1"}, "rate: must be > 0"},
		{[]string{"latency", "--rate", "100", "--for", "100ms"}, "duration: must be >= 1s"},
		{[]string{"latency", "--rate", "1e9", "--for", "1m"}, "more than 2000000"},
	} {
		err := cmdRun(ctx, tc.args, io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: err = %v, want %q", tc.args, err, tc.want)
		}
	}

	sc, err := bench.LoadScenario("latency")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args     []string
		rate     float64
		messages int
	}{
		{nil, 200, 12000}, // the scenario as written
		{[]string{"--rate", "3000", "--for", "45s"}, 3000, 135000},
		{[]string{"--rate", "2500"}, 2500, 150000}, // --for defaults to a minute
	} {
		fs := flag.NewFlagSet("run", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		rate := fs.Float64("rate", 0, "")
		rateFor := fs.Duration("for", time.Minute, "")
		if err := fs.Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		got, err := openLoopFlags(fs, sc, *rate, *rateFor)
		if err != nil || got.Load.Rate != tc.rate || got.Load.Messages != tc.messages {
			t.Errorf("%v: rate %v messages %d, %v", tc.args, got.Load.Rate, got.Load.Messages, err)
		}
	}
}

package bench

import (
	"bytes"
	"context"
	"math"
	"strings"
	"testing"
	"time"
)

func TestOpenLoopAt(t *testing.T) {
	closed := testScenario(t, smallScenario)
	for _, tc := range []struct {
		name     string
		rate     float64
		d        time.Duration
		messages int
		duration time.Duration
		err      string
	}{
		{name: "whole", rate: 100, d: 10 * time.Second, messages: 1000, duration: 11 * time.Second},
		{name: "rounded up", rate: 0.5, d: 3 * time.Second, messages: 2, duration: 3300 * time.Millisecond},
		{name: "fraction of max", rate: 0.9 * 6011, d: 45 * time.Second, messages: 243446,
			duration: 49500 * time.Millisecond},
		{name: "zero rate", rate: 0, d: time.Second, err: "rate: must be > 0"},
		{name: "negative rate", rate: -5, d: time.Second, err: "rate: must be > 0"},
		{name: "NaN rate", rate: math.NaN(), d: time.Second, err: "rate: must be > 0"},
		{name: "infinite rate", rate: math.Inf(1), d: time.Second, err: "rate: must be > 0"},
		{name: "short", rate: 10, d: 500 * time.Millisecond, err: "duration: must be >= 1s"},
		{name: "too many", rate: 100000, d: 30 * time.Second, err: "more than 2000000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sc, err := OpenLoopAt(closed, tc.rate, tc.d)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if sc.Load.Rate != tc.rate || sc.Load.Messages != tc.messages || sc.Load.Duration != tc.duration {
				t.Errorf("rate %v messages %d duration %v", sc.Load.Rate, sc.Load.Messages, sc.Load.Duration)
			}
			// Everything else is the scenario's, and it is still valid.
			if sc.Name != closed.Name || sc.Load.Sessions != closed.Load.Sessions || sc.Load.Size != closed.Load.Size ||
				sc.Load.Arrivals != "poisson" || !strings.Contains(sc.Description, "open loop at") {
				t.Errorf("scenario %+v", sc)
			}
			if err := sc.Validate(); err != nil {
				t.Error(err)
			}
			if closed.Load.Rate != 0 || closed.Load.Messages != 300 {
				t.Error("the original scenario changed")
			}
		})
	}
}

func TestCurveConfigValidate(t *testing.T) {
	sc := testScenario(t, smallScenario)
	open, err := OpenLoopAt(sc, 10, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		mod  func(*CurveConfig)
		err  string
	}{
		{name: "ok", mod: func(*CurveConfig) {}},
		{name: "given max", mod: func(c *CurveConfig) { c.MaxScenario, c.MaxRate = Scenario{}, 1000 }},
		{name: "no max", mod: func(c *CurveConfig) { c.MaxScenario = Scenario{} }, err: "max_scenario: required"},
		{name: "open max", mod: func(c *CurveConfig) { c.MaxScenario = open }, err: "must be a closed loop"},
		{name: "negative max", mod: func(c *CurveConfig) { c.MaxRate = -1 }, err: "max_rate"},
		{name: "zero fraction", mod: func(c *CurveConfig) { c.Fractions = []float64{0.5, 0} }, err: "0 is not in"},
		{name: "big fraction", mod: func(c *CurveConfig) { c.Fractions = []float64{2} }, err: "2 is not in"},
		{name: "short step", mod: func(c *CurveConfig) { c.StepDuration = time.Millisecond }, err: "step_duration"},
		{name: "long step", mod: func(c *CurveConfig) { c.StepDuration = time.Hour }, err: "step_duration"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := CurveConfig{RunConfig: RunConfig{Scenario: sc, Target: DirectTarget{}}, MaxScenario: sc}
			c.EnsureDefaults()
			tc.mod(&c)
			err := c.Validate()
			if tc.err == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("err = %v, want %q", err, tc.err)
			}
		})
	}
	var c CurveConfig
	c.EnsureDefaults()
	if len(c.Fractions) != 2 || c.Fractions[0] != 0.5 || c.Fractions[1] != 0.9 || c.StepDuration != 45*time.Second {
		t.Errorf("defaults %v %v", c.Fractions, c.StepDuration)
	}
}

// TestLatencyCurveDirect runs a whole curve against the harness itself:
// the max run, then open-loop steps at a small share of it. It checks the
// wiring and the arithmetic (each step's rate and count follow from the
// measured maximum), never a timing.
func TestLatencyCurveDirect(t *testing.T) {
	sc := testScenario(t, smallScenario)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := LatencyCurve(ctx, CurveConfig{
		RunConfig: RunConfig{Scenario: sc, Target: DirectTarget{}, WorkDir: t.TempDir(),
			SampleInterval: 50 * time.Millisecond},
		MaxScenario: sc, Fractions: []float64{0.01, 0.02}, StepDuration: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	if c.Max == nil || !c.Max.Complete || c.Max.OpenLoop || c.MaxRate != c.Max.DeliveryRate || c.MaxRate <= 0 {
		t.Fatalf("max %+v rate %v", c.Max, c.MaxRate)
	}
	if len(c.Steps) != 2 {
		t.Fatalf("%d steps", len(c.Steps))
	}
	for i, s := range c.Steps {
		r := s.Report
		want := int(math.Ceil(s.Offered))
		if s.Fraction != []float64{0.01, 0.02}[i] || s.Offered != s.Fraction*c.MaxRate || !r.OpenLoop ||
			r.Rate != s.Offered || r.Messages != want || r.Load.Accepted != uint64(want) || !r.Complete ||
			r.Accounting.Lost != 0 || r.Load.Sojourn.Count != uint64(want) {
			t.Errorf("step %d: fraction %v offered %v rate %v messages %d accepted %d complete %v", i, s.Fraction,
				s.Offered, r.Rate, r.Messages, r.Load.Accepted, r.Complete)
		}
	}
	var txt bytes.Buffer
	if err := c.WriteText(&txt); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"latency curve: direct", "max (" + sc.Name + ")", "\n1%", "\n2%", "sojourn p99"} {
		if !strings.Contains(txt.String(), want) {
			t.Errorf("text lacks %q:\n%s", want, txt.String())
		}
	}

	// A given maximum skips the max run.
	c, err = LatencyCurve(ctx, CurveConfig{
		RunConfig: RunConfig{Scenario: sc, Target: DirectTarget{}, WorkDir: t.TempDir(),
			SampleInterval: 50 * time.Millisecond},
		MaxRate: 200, Fractions: []float64{0.5}, StepDuration: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	if c.Max != nil || len(c.Steps) != 1 || c.Steps[0].Offered != 100 || c.Steps[0].Report.Load.Accepted != 100 {
		t.Errorf("curve %+v", c)
	}
}

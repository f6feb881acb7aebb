package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"time"
)

// maxOpenLoopMessages bounds the message count OpenLoopAt may give a load
// (rate × duration): a typo in a rate must not become a run of hours.
const maxOpenLoopMessages = 2_000_000

// OpenLoopAt returns sc with its load turned into an open loop at rate
// messages per second for about d: load.rate = rate, load.messages =
// ceil(rate × d) and load.duration = d + d/10 (the count ends the load
// first unless the Poisson arrivals run late; the duration bounds it
// anyway). The arrival law, sessions, sizes and domains stay the
// scenario's; a closed-loop scenario becomes an open one. The description
// says the rate. It fails for a rate or a duration that is not positive
// and finite, or when rate × d exceeds 2,000,000 messages.
func OpenLoopAt(sc Scenario, rate float64, d time.Duration) (Scenario, error) {
	var errs []error
	if !(rate > 0) || math.IsInf(rate, 0) {
		errs = append(errs, fmt.Errorf("rate: must be > 0 msg/s and finite, not %v", rate))
	}
	if d < time.Second {
		errs = append(errs, fmt.Errorf("duration: must be >= 1s, not %v", d))
	}
	if len(errs) > 0 {
		return Scenario{}, fmt.Errorf("bench: open loop: %w", errors.Join(errs...))
	}
	n := math.Ceil(rate * d.Seconds())
	if n > maxOpenLoopMessages {
		return Scenario{}, fmt.Errorf("bench: open loop: %v msg/s for %v is %.0f messages, more than %d", rate, d, n,
			maxOpenLoopMessages)
	}
	sc.Load.Rate = rate
	sc.Load.Messages = int(n)
	sc.Load.Duration = d + d/10
	if sc.Load.Arrivals == "" {
		sc.Load.Arrivals = "poisson"
	}
	sc.Description = fmt.Sprintf("open loop at %s msg/s (%s) for %v: %d messages. %s",
		strconv.FormatFloat(rate, 'f', -1, 64), sc.Load.Arrivals, d, sc.Load.Messages, sc.Description)
	return sc, nil
}

// CurveConfig configures LatencyCurve.
type CurveConfig struct {
	// RunConfig holds the open-loop scenario (Scenario, run at each
	// fraction of the maximum rate by OpenLoopAt), the target and how each
	// run is made. Messages, when > 0, replaces the count of the max run
	// only.
	RunConfig
	// MaxScenario is the closed-loop scenario whose delivery rate is the
	// maximum rate (steady-1k). Required unless MaxRate > 0.
	MaxScenario Scenario
	// MaxRate, when > 0, is taken as the maximum rate and MaxScenario is
	// not run. Default: 0 (measure it).
	MaxRate float64
	// Fractions are the shares of the maximum rate the open loop runs
	// at, in order. Each in (0, 1.5]. Default: [0.5, 0.9].
	Fractions []float64
	// StepDuration is how long each open-loop step sends for. Between 1s
	// and 10m. Default: 45s.
	StepDuration time.Duration
}

// EnsureDefaults fills zero fields with their defaults.
func (c *CurveConfig) EnsureDefaults() {
	c.RunConfig.EnsureDefaults()
	if len(c.Fractions) == 0 {
		c.Fractions = []float64{0.5, 0.9}
	}
	if c.StepDuration == 0 {
		c.StepDuration = 45 * time.Second
	}
}

// Validate reports every problem at once.
func (c CurveConfig) Validate() error {
	errs := []error{c.RunConfig.Validate()}
	if c.MaxRate < 0 || math.IsNaN(c.MaxRate) || math.IsInf(c.MaxRate, 0) {
		errs = append(errs, errors.New("max_rate: must be >= 0 and finite"))
	}
	if c.MaxRate == 0 {
		if c.MaxScenario.Name == "" {
			errs = append(errs, errors.New("max_scenario: required when max_rate is 0"))
		} else if err := c.MaxScenario.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("max_scenario: %w", err))
		} else if c.MaxScenario.Load.Rate > 0 {
			errs = append(errs, errors.New("max_scenario: must be a closed loop (load.rate = 0)"))
		}
	}
	if len(c.Fractions) == 0 {
		errs = append(errs, errors.New("fractions: at least one"))
	}
	for _, f := range c.Fractions {
		if !(f > 0 && f <= 1.5) {
			errs = append(errs, fmt.Errorf("fractions: %v is not in (0, 1.5]", f))
		}
	}
	if c.StepDuration < time.Second || c.StepDuration > 10*time.Minute {
		errs = append(errs, errors.New("step_duration: must be between 1s and 10m"))
	}
	return errors.Join(errs...)
}

// Curve is the outcome of LatencyCurve: the maximum rate and one open-loop
// run per fraction of it.
type Curve struct {
	Scenario    string    `json:"scenario"`
	MaxScenario string    `json:"max_scenario,omitempty"`
	Target      string    `json:"target"`
	Start       time.Time `json:"start"`
	Host        HostInfo  `json:"host"`
	// MaxRate is the maximum rate (msg/s): the max run's delivery rate,
	// or CurveConfig.MaxRate when given (Max is then nil).
	MaxRate float64 `json:"max_rate"`
	Max     *Report `json:"max,omitempty"`
	// Steps are the open-loop runs, in the order of the fractions.
	Steps []CurveStep `json:"steps"`
}

// CurveStep is one open-loop run of a Curve.
type CurveStep struct {
	// Fraction of the maximum rate, and Offered = Fraction × MaxRate, the
	// open loop's mean arrival rate (msg/s).
	Fraction float64 `json:"fraction"`
	Offered  float64 `json:"offered"`
	Report   Report  `json:"report"`
}

// LatencyCurve measures end-to-end latency against the target's own
// maximum rate: it runs MaxScenario (a closed loop) and takes its delivery
// rate as the maximum, unless MaxRate is given, then runs Scenario as an
// open loop (OpenLoopAt) at each fraction of that rate for StepDuration.
// Every run is one Run: bounded in count and time, on its own DNS and
// sink. When a run fails, LatencyCurve returns what it measured so far
// with the error.
func LatencyCurve(ctx context.Context, cfg CurveConfig) (Curve, error) {
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return Curve{}, err
	}
	c := Curve{Scenario: cfg.Scenario.Name, Target: cfg.Target.Name(), Start: time.Now(), Host: Host(),
		MaxRate: cfg.MaxRate}
	if cfg.MaxRate == 0 {
		c.MaxScenario = cfg.MaxScenario.Name
		mc := cfg.RunConfig
		mc.Scenario = cfg.MaxScenario
		rep, err := runOnce(ctx, mc, cfg.Messages, nil)
		if rep.RunTag != "" {
			c.Max = &rep
		}
		if err != nil {
			return c, fmt.Errorf("bench: max run (%s): %w", cfg.MaxScenario.Name, err)
		}
		if rep.DeliveryRate <= 0 {
			return c, fmt.Errorf("bench: max run (%s) delivered nothing", cfg.MaxScenario.Name)
		}
		c.MaxRate = rep.DeliveryRate
	}
	for _, f := range cfg.Fractions {
		offered := f * c.MaxRate
		sc, err := OpenLoopAt(cfg.Scenario, offered, cfg.StepDuration)
		if err != nil {
			return c, err
		}
		sc.Description = fmt.Sprintf("%.0f%% of %.0f msg/s, ", 100*f, c.MaxRate) + sc.Description
		rc := cfg.RunConfig
		rc.Scenario = sc
		note := fmt.Sprintf("latency curve: %.0f%% of the maximum rate %.0f msg/s", 100*f, c.MaxRate)
		rep, err := runOnce(ctx, rc, 0, []string{note})
		if rep.RunTag != "" {
			c.Steps = append(c.Steps, CurveStep{Fraction: f, Offered: offered, Report: rep})
		}
		if err != nil {
			return c, fmt.Errorf("bench: open loop at %.0f%%: %w", 100*f, err)
		}
	}
	return c, nil
}

// runOnce runs cfg.Scenario once on a rig of its own.
func runOnce(ctx context.Context, cfg RunConfig, messages int, notes []string) (Report, error) {
	r, err := newRig(cfg)
	if err != nil {
		return Report{}, err
	}
	defer r.close()
	return r.run(ctx, cfg.Target, messages, notes)
}

// WriteText writes the curve as one table: the max run, then each step
// with its offered and achieved rates, latencies, losses and the machine's
// other work during the run.
func (c Curve) WriteText(w io.Writer) error {
	fmt.Fprintf(w, "latency curve: %s, open loop %s at fractions of the maximum rate, %s\n", c.Target, c.Scenario,
		c.Start.UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(w, "machine %s: %d CPUs %s, kernel %s (shared machines are noisy: see other CPU per run)\n",
		c.Host.Hostname, c.Host.CPUs, c.Host.CPUModel, c.Host.Kernel)
	if c.Max != nil {
		fmt.Fprintf(w, "maximum rate: %.0f msg/s delivered by %s (closed loop, %d messages accepted)\n\n", c.MaxRate,
			c.MaxScenario, c.Max.Load.Accepted)
	} else {
		fmt.Fprintf(w, "maximum rate: %.0f msg/s (given, not measured)\n\n", c.MaxRate)
	}
	table := [][]string{{"run", "offered", "injection", "delivery", "e2e p50", "e2e p99", "e2e max", "accept p99",
		"sojourn p99", "lost", "complete", "busy", "other CPU"}}
	row := func(name, offered string, r Report) {
		table = append(table, []string{name, offered, fmt.Sprintf("%.0f", r.InjectionRate),
			fmt.Sprintf("%.0f", r.DeliveryRate), fmtDur(r.E2E.P50), fmtDur(r.E2E.P99), fmtDur(r.E2E.Max),
			fmtDur(r.Accept.P99), fmtLatencyOr(r.Load.Sojourn.P99, r.Load.Sojourn.Count),
			strconv.FormatUint(r.Accounting.Lost, 10), strconv.FormatBool(r.Complete),
			fmt.Sprintf("%.0f%%", 100*r.MachineBusy), fmt.Sprintf("%.1f s", r.OtherCPU.Seconds())})
	}
	if c.Max != nil {
		row("max ("+c.MaxScenario+")", "closed", *c.Max)
	}
	for _, s := range c.Steps {
		row(fmt.Sprintf("%.0f%%", 100*s.Fraction), fmt.Sprintf("%.0f", s.Offered), s.Report)
	}
	writeTable(w, table)
	fmt.Fprintln(w, "(rates in msg/s; e2e = sink arrival − the load's envelope write; sojourn = due time → 250, "+
		"waiting for a free session included)")
	runs := slices.Clone(c.Steps)
	if c.Max != nil {
		runs = append([]CurveStep{{Report: *c.Max}}, runs...)
	}
	for _, s := range runs {
		for _, p := range s.Report.Problems() {
			fmt.Fprintf(w, "PROBLEM (%s, run %s): %s\n", s.Report.Target, s.Report.RunTag, p)
		}
	}
	return nil
}

func fmtLatencyOr(d time.Duration, n uint64) string {
	if n == 0 {
		return "-"
	}
	return fmtDur(d)
}

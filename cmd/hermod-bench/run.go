package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/hermod-mta/hermod/bench"
)

// parseInterleaved parses args in which flags and positional arguments
// may be mixed ("run steady-1k --json out.json") and returns the
// positional ones.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// scenarioArg loads the one scenario named in pos.
func scenarioArg(cmd string, pos []string) (bench.Scenario, error) {
	if len(pos) != 1 {
		return bench.Scenario{}, fmt.Errorf("%s: want exactly one SCENARIO (built in: %s, or a .toml file)", cmd,
			strings.Join(bench.Scenarios(), ", "))
	}
	return bench.LoadScenario(pos[0])
}

// runFlags are the flags common to run and compare.
type runFlags struct {
	hermod, hermodConfig string
	messages             int
	jsonOut, htmlOut     string
	quiet, keep          bool
	workDir              string
	sample               time.Duration
	quietWait            time.Duration
}

func (f *runFlags) bind(fs *flag.FlagSet) {
	fs.StringVar(&f.hermod, "hermod", "", "hermod binary (default: ./bin/hermod, else next to hermod-bench, else $PATH)")
	fs.StringVar(&f.hermodConfig, "hermod-config", "", "TOML file of hermod configuration keys merged into the generated config")
	fs.IntVar(&f.messages, "messages", 0, "messages to send (default: the scenario's)")
	fs.StringVar(&f.jsonOut, "json", "", "write the report as JSON to this file")
	fs.StringVar(&f.htmlOut, "html", "", "write a self-contained HTML report with charts to this file")
	fs.BoolVar(&f.quiet, "quiet", false, "no progress on stderr")
	fs.BoolVar(&f.keep, "keep", false, "keep the work directory (target config, spool, logs)")
	fs.StringVar(&f.workDir, "work-dir", "", "where to make temporary directories (default: $TMPDIR)")
	fs.DurationVar(&f.sample, "sample", 500*time.Millisecond, "timeline sample and progress interval")
	fs.DurationVar(&f.quietWait, "wait-quiet", 0,
		"before each run, wait up to this long for the machine to be under 15% busy (0: do not wait)")
}

// hermodTarget returns the Hermod target the flags describe.
func (f *runFlags) hermodTarget() (*bench.HermodTarget, error) {
	t := &bench.HermodTarget{Binary: f.hermod}
	if t.Binary == "" {
		var err error
		if t.Binary, err = bench.FindHermod(); err != nil {
			return nil, err
		}
	}
	if f.hermodConfig != "" {
		var m map[string]any
		if _, err := toml.DecodeFile(f.hermodConfig, &m); err != nil {
			return nil, fmt.Errorf("%s: %w", f.hermodConfig, err)
		}
		t.Config = m
	}
	return t, nil
}

func (f *runFlags) runConfig(sc bench.Scenario, stderr io.Writer) bench.RunConfig {
	cfg := bench.RunConfig{Scenario: sc, Messages: f.messages, WorkDir: f.workDir, KeepWorkDir: f.keep,
		SampleInterval: f.sample, QuietWait: f.quietWait}
	if !f.quiet {
		cfg.Progress = stderr
	}
	return cfg
}

// writeOutputs writes the JSON and HTML files asked for.
func (f *runFlags) writeOutputs(stdout io.Writer, v any, html func(io.Writer) error) error {
	if f.jsonOut != "" {
		if err := writeJSON(f.jsonOut, stdout, v); err != nil {
			return err
		}
	}
	if f.htmlOut != "" {
		fh, err := os.Create(f.htmlOut)
		if err != nil {
			return err
		}
		if err := html(fh); err != nil {
			fh.Close()
			return err
		}
		if err := fh.Close(); err != nil {
			return err
		}
	}
	return nil
}

func cmdRun(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f runFlags
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: hermod-bench run SCENARIO [flags]\n\nRun a scenario (built in: %s, or a .toml file) "+
			"against hermod (default) or an MTA already running (--target).\n\n", strings.Join(bench.Scenarios(), ", "))
		fs.PrintDefaults()
	}
	f.bind(fs)
	target := fs.String("target", "", "SMTP address of an MTA already running (host:port) instead of starting hermod")
	targetPID := fs.Int("target-pid", 0, "with --target: process whose CPU and memory (with its children) are measured")
	targetHTTP := fs.String("target-http", "", "with --target: its hermod-style HTTP address (/healthz, /metrics)")
	rate := fs.Float64("rate", 0, "open loop at this many msg/s instead of the scenario's load (messages = rate × --for)")
	rateFor := fs.Duration("for", time.Minute, "with --rate: how long the open loop sends for")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	sc, err := scenarioArg("run", pos)
	if err != nil {
		return err
	}
	if sc, err = openLoopFlags(fs, sc, *rate, *rateFor); err != nil {
		return fmt.Errorf("run: %w", err)
	}
	cfg := f.runConfig(sc, stderr)
	if *target != "" {
		cfg.Target = &bench.ExternalTarget{Addr: *target, PID: *targetPID, HTTP: *targetHTTP}
		cfg.KeepPorts = true
		fmt.Fprintf(stderr, "run: test DNS on %s (udp+tcp) serving %d domains; sink MX on %s.\n"+
			"run: point %s's resolver at the DNS (or route the domains to the sink) and its delivery port at %s.\n",
			sc.DNS.Listen, sc.DNS.Domains, strings.Join(sc.Sink.Listen, ", "), *target, sc.SinkPort())
	} else {
		if *targetPID != 0 || *targetHTTP != "" {
			return errors.New("run: --target-pid and --target-http go with --target")
		}
		ht, err := f.hermodTarget()
		if err != nil {
			return err
		}
		cfg.Target = ht
	}
	rep, runErr := bench.Run(ctx, cfg)
	if rep.RunTag == "" {
		return runErr
	}
	if err := rep.WriteText(stdout); err != nil {
		return err
	}
	if err := f.writeOutputs(stdout, rep, rep.WriteHTML); err != nil {
		return err
	}
	if runErr != nil {
		return runErr
	}
	if p := rep.Problems(); len(p) > 0 {
		return fmt.Errorf("run: %s", strings.Join(p, "; "))
	}
	return nil
}

// defaultPostfixMessages is the message count of Postfix's runs unless
// --peer-messages says otherwise: at its 200–300 msg/s it takes about as
// long as Hermod's run of the scenario's count.
const defaultPostfixMessages = 5000

func cmdCompare(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f runFlags
	fs := flag.NewFlagSet("compare", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: hermod-bench compare SCENARIO --peer postfix|direct [flags]\n\n"+
			"Run a scenario against hermod and a peer, alternated, and print each figure side by side with the "+
			"ratio hermod/peer.\n  --peer direct   the load straight into the sink: the harness's own ceiling\n"+
			"  --peer postfix  the system's Postfix as a loopback relay (installed with apt-get if missing; root)\n\n")
		fs.PrintDefaults()
	}
	f.bind(fs)
	peer := fs.String("peer", "", "postfix or direct")
	rounds := fs.Int("rounds", 2, "rounds of (hermod, peer) runs")
	peerMessages := fs.Int("peer-messages", -1,
		fmt.Sprintf("messages per peer run (default: %d for postfix, capped at the scenario's; as hermod for direct)",
			defaultPostfixMessages))
	peerListen := fs.String("peer-listen", "127.0.0.1:2625", "SMTP address of the postfix peer")
	noInstall := fs.Bool("no-install", false, "do not install postfix with apt-get when it is missing")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	sc, err := scenarioArg("compare", pos)
	if err != nil {
		return err
	}
	ht, err := f.hermodTarget()
	if err != nil {
		return err
	}
	cfg := bench.CompareConfig{RunConfig: f.runConfig(sc, stderr), Rounds: *rounds, PeerMessages: *peerMessages}
	cfg.Target = ht
	switch *peer {
	case "postfix":
		cfg.Peer = &bench.PostfixTarget{Listen: *peerListen, Install: !*noInstall}
		if cfg.PeerMessages < 0 {
			cfg.PeerMessages = min(defaultPostfixMessages, sc.Load.Messages)
			if f.messages > 0 {
				cfg.PeerMessages = min(defaultPostfixMessages, f.messages)
			}
		}
	case "direct":
		cfg.Peer = bench.DirectTarget{}
	case "":
		return errors.New("compare: --peer is required (postfix or direct)")
	default:
		return fmt.Errorf("compare: unknown peer %q (want postfix or direct)", *peer)
	}
	if cfg.PeerMessages < 0 {
		cfg.PeerMessages = 0
	}
	c, cmpErr := bench.Compare(ctx, cfg)
	if len(c.Runs) == 0 {
		return cmpErr
	}
	if err := c.WriteText(stdout); err != nil {
		return err
	}
	if err := f.writeOutputs(stdout, c, c.WriteHTML); err != nil {
		return err
	}
	return cmpErr
}

func cmdScenarios(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("scenarios", flag.ContinueOnError)
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	for _, name := range bench.Scenarios() {
		sc, err := bench.LoadScenario(name)
		if err != nil {
			return err
		}
		fmt.Fprintf(tw, "%s\t%s\n", name, sc.Description)
	}
	return tw.Flush()
}

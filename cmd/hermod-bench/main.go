// Command hermod-bench drives any SMTP server for load tests: a sink MX, a
// test DNS server, a load generator, and whole scenario runs that put them
// together around Hermod, Postfix or any MTA (see package bench, which does
// the work; this command only binds flags). See BENCH.md.
//
//	hermod-bench run SCENARIO [flags]       start DNS, sink and hermod (or --target), run, report
//	hermod-bench compare SCENARIO --peer P  hermod vs postfix or direct, alternated, with ratios
//	hermod-bench latency-curve [SCENARIO]   open-loop latency at fractions of hermod's maximum rate
//	hermod-bench scenarios                  list the built-in scenarios
//	hermod-bench sink [flags]               SMTP sink MX with fault injection and a JSON endpoint
//	hermod-bench dns  [flags]               authoritative DNS for d0001.test… pointing at the sink
//	hermod-bench load [flags]               send load to an SMTP server and report
//	hermod-bench version
//
// sink, dns and load take -config FILE (TOML, the matching bench config
// struct); flags given on the command line override the file. run and
// compare take a scenario name or file.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/hermod-mta/hermod/bench"
)

// version is set by the Makefile with -ldflags.
var version = "dev"

const usage = `usage: hermod-bench <command> [flags]

commands:
  run        run a scenario against hermod (or --target host:port) and report
  compare    run a scenario against hermod and a peer (--peer postfix|direct), alternated, with ratios
  latency-curve  measure hermod's maximum rate, then open-loop latency at 50% and 90% of it
  scenarios  list the built-in scenarios
  sink       run an SMTP sink MX (fault injection, checksums, /stats JSON) until interrupted
  dns        run an authoritative DNS server for the test domains until interrupted
  load       send load to an SMTP server and print the result
  version    print the version

Run "hermod-bench <command> -h" for the flags of a command.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "sink":
		err = cmdSink(ctx, os.Args[2:], os.Stdout, os.Stderr)
	case "dns":
		err = cmdDNS(ctx, os.Args[2:], os.Stdout, os.Stderr)
	case "load":
		err = cmdLoad(ctx, os.Args[2:], os.Stdout, os.Stderr)
	case "run":
		err = cmdRun(ctx, os.Args[2:], os.Stdout, os.Stderr)
	case "compare":
		err = cmdCompare(ctx, os.Args[2:], os.Stdout, os.Stderr)
	case "latency-curve":
		err = cmdLatencyCurve(ctx, os.Args[2:], os.Stdout, os.Stderr)
	case "scenarios":
		err = cmdScenarios(os.Args[2:], os.Stdout, os.Stderr)
	case "version", "-version", "--version":
		fmt.Println("hermod-bench", version)
	case "help", "-h", "-help", "--help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "hermod-bench: unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "hermod-bench:", err)
		os.Exit(1)
	}
}

// listFlag is a comma-separated list flag that replaces the whole list.
type listFlag struct{ p *[]string }

func (l listFlag) String() string {
	if l.p == nil {
		return ""
	}
	return strings.Join(*l.p, ",")
}

func (l listFlag) Set(s string) error {
	*l.p = nil
	for _, part := range strings.Split(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			*l.p = append(*l.p, part)
		}
	}
	return nil
}

// uint32Flag binds a uint32.
type uint32Flag struct{ p *uint32 }

func (u uint32Flag) String() string {
	if u.p == nil {
		return "0"
	}
	return strconv.FormatUint(uint64(*u.p), 10)
}

func (u uint32Flag) Set(s string) error {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return err
	}
	*u.p = uint32(n)
	return nil
}

// parse parses args into fs; when -config names a file, the file is decoded
// into cfg (strictly: unknown keys are errors) and then the flags given on
// the command line are applied again on top of it.
func parse(fs *flag.FlagSet, args []string, configPath *string, cfg any) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%s: unexpected argument %q", fs.Name(), fs.Arg(0))
	}
	if *configPath == "" {
		return nil
	}
	set := map[string]string{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = f.Value.String() })
	md, err := toml.DecodeFile(*configPath, cfg)
	if err != nil {
		return fmt.Errorf("%s: %w", *configPath, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return fmt.Errorf("%s: unknown keys: %s", *configPath, strings.Join(keys, ", "))
	}
	for name, v := range set {
		if err := fs.Set(name, v); err != nil {
			return fmt.Errorf("-%s: %w", name, err)
		}
	}
	return nil
}

func writeJSON(path string, stdout io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if path == "" || path == "-" {
		_, err = stdout.Write(b)
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

func cmdSink(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg := bench.DefaultSinkConfig()
	fs := flag.NewFlagSet("sink", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "TOML file with the sink configuration (bench.SinkConfig)")
	faultsPath := fs.String("faults", "", "fault profile, TOML or .json (bench.Faults)")
	out := fs.String("out", "", "write the final stats as JSON to this file at exit (default: a table on stdout)")
	report := fs.Duration("report", 0, "print a line of counters to stderr at this interval (0: never)")
	runFor := fs.Duration("for", 0, "exit after this long (0: run until interrupted)")
	fs.Var(listFlag{&cfg.Listen}, "listen", "comma-separated SMTP listen addresses")
	fs.StringVar(&cfg.HTTP, "http", cfg.HTTP, "address of the JSON endpoint (/stats, /messages, /captured, /metrics)")
	fs.StringVar(&cfg.Hostname, "hostname", cfg.Hostname, "name in the greeting")
	fs.Int64Var(&cfg.MaxSize, "max-size", cfg.MaxSize, "SIZE limit in bytes")
	fs.IntVar(&cfg.MaxRcpts, "max-rcpts", cfg.MaxRcpts, "recipients per transaction")
	fs.BoolVar(&cfg.NoPipelining, "no-pipelining", cfg.NoPipelining, "do not advertise PIPELINING")
	fs.BoolVar(&cfg.Chunking, "chunking", cfg.Chunking, "advertise CHUNKING (BDAT)")
	fs.BoolVar(&cfg.StartTLS, "starttls", cfg.StartTLS, "advertise STARTTLS (self-signed unless -tls-cert/-tls-key)")
	fs.StringVar(&cfg.TLSCert, "tls-cert", cfg.TLSCert, "PEM certificate for STARTTLS")
	fs.StringVar(&cfg.TLSKey, "tls-key", cfg.TLSKey, "PEM key for STARTTLS")
	fs.Uint64Var(&cfg.Seed, "seed", cfg.Seed, "seed of the fault draws")
	fs.Var(listFlag{&cfg.Capture}, "capture", "comma-separated recipient domains whose messages are kept whole")
	if err := parse(fs, args, configPath, &cfg); err != nil {
		return err
	}
	if *faultsPath != "" {
		f, err := bench.LoadFaults(*faultsPath)
		if err != nil {
			return err
		}
		cfg.Faults = f
	}
	s, err := bench.NewSink(cfg)
	if err != nil {
		return err
	}
	defer s.Close()
	fmt.Fprintf(stderr, "sink: SMTP on %s", strings.Join(s.Addrs(), " "))
	if a := s.HTTPAddr(); a != "" {
		fmt.Fprintf(stderr, ", stats on http://%s/stats", a)
	}
	fmt.Fprintln(stderr)
	if *runFor > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *runFor)
		defer cancel()
	}
	var tick <-chan time.Time
	if *report > 0 {
		t := time.NewTicker(*report)
		defer t.Stop()
		tick = t.C
	}
	var last bench.SinkStats
	for done := false; !done; {
		select {
		case <-ctx.Done():
			done = true
		case <-tick:
			st := s.Stats()
			rate := float64(st.Messages-last.Messages) / report.Seconds()
			fmt.Fprintf(stderr, "sink: %s messages=%d (%.0f/s) unique=%d dup=%d corrupt=%d conns=%d e2e.p99=%v\n",
				st.Uptime.Round(time.Second), st.Messages, rate, st.Unique, st.Duplicates, st.Corrupted, st.Active,
				st.E2E.P99)
			last = st
		}
	}
	st := s.Stats()
	if *out != "" {
		return writeJSON(*out, stdout, st)
	}
	return st.WriteText(stdout)
}

// zonesFile is the layout of the -zones file.
type zonesFile struct {
	Zone []bench.Zone `toml:"zone"`
}

func cmdDNS(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg := bench.DefaultDNSConfig()
	fs := flag.NewFlagSet("dns", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "TOML file with the DNS configuration (bench.DNSConfig)")
	zonesPath := fs.String("zones", "", "TOML file of extra [[zone]] entries (bench.Zone)")
	runFor := fs.Duration("for", 0, "exit after this long (0: run until interrupted)")
	fs.StringVar(&cfg.Listen, "listen", cfg.Listen, "UDP and TCP address")
	fs.IntVar(&cfg.Domains, "domains", cfg.Domains, "number of generated domains d0001.test…")
	fs.Var(listFlag{&cfg.MX}, "mx", "comma-separated sink addresses the MX hosts point at")
	fs.IntVar(&cfg.MXPerDomain, "mx-per-domain", cfg.MXPerDomain, "MX hosts per generated domain")
	fs.Var(listFlag{&cfg.Extra}, "extra", "comma-separated extra domains served like the generated ones")
	fs.Var(uint32Flag{&cfg.TTL}, "ttl", "TTL of the records")
	if err := parse(fs, args, configPath, &cfg); err != nil {
		return err
	}
	if *zonesPath != "" {
		var zf zonesFile
		md, err := toml.DecodeFile(*zonesPath, &zf)
		if err != nil {
			return fmt.Errorf("%s: %w", *zonesPath, err)
		}
		if und := md.Undecoded(); len(und) > 0 {
			return fmt.Errorf("%s: unknown key %s", *zonesPath, und[0])
		}
		cfg.Zones = append(cfg.Zones, zf.Zone...)
	}
	d, err := bench.NewDNS(cfg)
	if err != nil {
		return err
	}
	defer d.Close()
	fmt.Fprintf(stderr, "dns: serving %d generated domains, %d zones on %s (udp+tcp)\n", cfg.Domains,
		len(cfg.Zones), d.Addr())
	if *runFor > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *runFor)
		defer cancel()
	}
	<-ctx.Done()
	return writeJSON("", stdout, d.Stats())
}

func cmdLoad(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg := bench.DefaultLoadConfig()
	cfg.RunTag = "" // a fresh one per run unless given
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "TOML file with the load configuration (bench.LoadConfig)")
	out := fs.String("out", "", "write the result as JSON to this file (\"-\": stdout instead of the table)")
	quiet := fs.Bool("quiet", false, "no progress lines on stderr")
	fs.Var(listFlag{&cfg.Targets}, "target", "comma-separated SMTP servers (host:port)")
	fs.IntVar(&cfg.Sessions, "sessions", cfg.Sessions, "concurrent connections")
	fs.IntVar(&cfg.Messages, "messages", cfg.Messages, "messages to send at most")
	fs.DurationVar(&cfg.Duration, "duration", cfg.Duration, "time to start messages in at most")
	fs.IntVar(&cfg.PerConn, "per-conn", cfg.PerConn, "messages per connection (0: reuse until the end)")
	fs.Float64Var(&cfg.Rate, "rate", cfg.Rate, "open loop at this many messages/s (0: closed loop)")
	fs.StringVar(&cfg.Arrivals, "arrivals", cfg.Arrivals, "open-loop arrivals: poisson or uniform")
	fs.IntVar(&cfg.Rcpts, "rcpts", cfg.Rcpts, "recipients per message")
	fs.IntVar(&cfg.Domains, "domains", cfg.Domains, "number of recipient domains d0001.test…")
	fs.Var(listFlag{&cfg.DomainList}, "domain-list", "comma-separated recipient domains (instead of d0001.test…)")
	fs.StringVar(&cfg.Mix, "mix", cfg.Mix, "domain mix: uniform or zipf")
	fs.Float64Var(&cfg.ZipfS, "zipf-s", cfg.ZipfS, "exponent of the zipf mix")
	fs.IntVar(&cfg.Users, "users", cfg.Users, "local parts per domain")
	fs.TextVar(&cfg.Size, "size", cfg.Size, "message size: 1KiB, uniform(1KiB,100KiB), lognormal(8KiB,1,1KiB,1MiB)")
	fs.BoolVar(&cfg.NoPipelining, "no-pipelining", cfg.NoPipelining, "one command at a time")
	fs.BoolVar(&cfg.StartTLS, "starttls", cfg.StartTLS, "use STARTTLS when offered")
	fs.StringVar(&cfg.From, "from", cfg.From, "envelope sender")
	fs.StringVar(&cfg.Helo, "helo", cfg.Helo, "EHLO name")
	fs.Var(listFlag{&cfg.SourceAddrs}, "source-addrs", "comma-separated local IPs to send from")
	fs.DurationVar(&cfg.Timeout, "timeout", cfg.Timeout, "wait for each reply at most")
	fs.Uint64Var(&cfg.Seed, "seed", cfg.Seed, "seed of sizes, recipients and bodies")
	fs.StringVar(&cfg.RunTag, "run-tag", cfg.RunTag, "message id prefix (default: random)")
	if err := parse(fs, args, configPath, &cfg); err != nil {
		return err
	}
	l, err := bench.NewLoad(cfg)
	if err != nil {
		return err
	}
	c := l.Config()
	mode := "closed loop"
	if c.Rate > 0 {
		mode = fmt.Sprintf("open loop at %g msg/s (%s)", c.Rate, c.Arrivals)
	}
	fmt.Fprintf(stderr, "load: %s to %s, %d sessions, up to %d messages in %v, size %s, run %s\n", mode,
		strings.Join(c.Targets, ","), c.Sessions, c.Messages, c.Duration, c.Size, c.RunTag)
	if !*quiet {
		stopProgress := make(chan struct{})
		defer close(stopProgress)
		go func() {
			t := time.NewTicker(time.Second)
			defer t.Stop()
			var last bench.LoadProgress
			for {
				select {
				case <-stopProgress:
					return
				case <-t.C:
					p := l.Progress()
					fmt.Fprintf(stderr, "load: %v %d done, %d accepted (%.0f/s)\n", p.Elapsed.Round(time.Second),
						p.Attempted, p.Accepted, float64(p.Accepted-last.Accepted)/max(p.Elapsed.Seconds()-
							last.Elapsed.Seconds(), 1e-9))
					last = p
				}
			}
		}()
	}
	res, runErr := l.Run(ctx)
	if *out != "" {
		if err := writeJSON(*out, stdout, res); err != nil {
			return err
		}
	}
	if *out != "-" {
		if err := res.WriteText(stdout); err != nil {
			return err
		}
	}
	return runErr
}

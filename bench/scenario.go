package bench

import (
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path"
	"slices"
	"strings"
	"time"
)

// ErrUnknownScenario is returned by LoadScenario for a name that is neither a
// built-in scenario nor a readable file.
var ErrUnknownScenario = errors.New("bench: unknown scenario")

//go:embed scenarios/*.toml
var builtinScenarios embed.FS

// Scenario is a named benchmark: the load, the sink and test DNS it runs
// against, and the rules of the run. A run (hermod-bench run) starts the
// DNS and the sink, points the target's resolver at the DNS and its
// delivery port at the sink's port, sends the load to the target, waits up
// to DeliveryWait for the sink to receive every accepted (message,
// recipient) pair, and reports.
//
// The built-in scenarios are TOML files in bench/scenarios, embedded in
// the binary; any other TOML file of the same shape can be run by path.
type Scenario struct {
	// Name identifies the scenario. Default: the file name without
	// ".toml".
	Name string `toml:"name"`
	// Description says what the scenario shows, in a sentence or two.
	// Default: "".
	Description string `toml:"description"`
	// DeliveryWait bounds the wait, after the load ends, for the sink to
	// receive every accepted pair; what has not arrived by then is counted
	// lost. Default: 2m.
	DeliveryWait time.Duration `toml:"delivery_wait"`
	// Release, when Release.After > 0, replaces the sink's fault profile
	// with Release.Faults that long after the load ends (the backlog
	// scenario: a deferring domain is let through, and the drain rate is
	// measured). Default: no release.
	Release Release `toml:"release"`
	// Undeliverable lists recipient domains the sink refuses for the whole
	// run (a deferral storm): their pairs are neither waited for nor
	// counted lost, but reported as deferred. Default: none.
	Undeliverable []string `toml:"undeliverable"`
	// Hermod holds configuration keys merged into the hermod target's
	// generated configuration (for example [hermod.delivery] tls =
	// "required"); other targets ignore it. Default: none.
	Hermod map[string]any `toml:"hermod"`
	// Load is the load; its targets are set by the run. Defaults: see
	// LoadConfig.
	Load LoadConfig `toml:"load"`
	// Sink is the sink MX. Default listen: ["127.0.0.2:2526"].
	Sink SinkConfig `toml:"sink"`
	// DNS is the test DNS. Default domains: load.domains; default mx: the
	// IPs the sink listens on.
	DNS DNSConfig `toml:"dns"`
}

// Release describes the change of the sink's faults after the load.
type Release struct {
	// After is the wait after the end of the load. Default: 0 (never).
	After time.Duration `toml:"after"`
	// Faults is the new profile. Default: no faults.
	Faults Faults `toml:"faults"`
}

// EnsureDefaults fills zero fields with their defaults and ties the parts
// together (DNS domains and MX addresses from the load and the sink).
func (s *Scenario) EnsureDefaults() {
	if s.DeliveryWait == 0 {
		s.DeliveryWait = 2 * time.Minute
	}
	if len(s.Sink.Listen) == 0 {
		s.Sink.Listen = []string{"127.0.0.2:2526"}
	}
	tag := s.Load.RunTag // each run needs its own: leave it to the run
	s.Load.EnsureDefaults()
	s.Load.RunTag = tag
	s.Sink.EnsureDefaults()
	if s.DNS.Domains == 0 {
		s.DNS.Domains = s.Load.Domains
	}
	if len(s.DNS.MX) == 0 {
		for _, a := range s.Sink.Listen {
			if h, _, err := net.SplitHostPort(a); err == nil && !slices.Contains(s.DNS.MX, h) {
				s.DNS.MX = append(s.DNS.MX, h)
			}
		}
	}
	s.DNS.EnsureDefaults()
}

// Validate reports every problem at once (keys under load., sink., dns.).
func (s Scenario) Validate() error {
	var errs []error
	if s.Name == "" {
		errs = append(errs, errors.New("name: must be set"))
	}
	if s.DeliveryWait < 0 {
		errs = append(errs, errors.New("delivery_wait: must be >= 0"))
	}
	if s.Release.After < 0 {
		errs = append(errs, errors.New("release.after: must be >= 0"))
	}
	errs = s.Release.Faults.validate("release.faults.", errs)
	for _, err := range []error{s.Load.Validate(), s.Sink.Validate(), s.DNS.Validate()} {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if len(s.Load.DomainList) == 0 && s.Load.Domains > s.DNS.Domains {
		errs = append(errs, fmt.Errorf("load.domains: %d domains, but dns.domains serves only %d",
			s.Load.Domains, s.DNS.Domains))
	}
	ports := map[string]bool{}
	for _, a := range s.Sink.Listen {
		if _, p, err := net.SplitHostPort(a); err == nil {
			ports[p] = true
		}
	}
	if len(ports) > 1 {
		errs = append(errs, errors.New("sink.listen: every address must use the same port (the target's delivery port)"))
	}
	return errors.Join(errs...)
}

// SinkPort returns the port the sink listens on, which the target must
// deliver to.
func (s Scenario) SinkPort() string {
	if len(s.Sink.Listen) == 0 {
		return ""
	}
	_, p, _ := net.SplitHostPort(s.Sink.Listen[0])
	return p
}

// Scenarios returns the names of the built-in scenarios, sorted.
func Scenarios() []string {
	ents, _ := fs.ReadDir(builtinScenarios, "scenarios")
	var names []string
	for _, e := range ents {
		names = append(names, strings.TrimSuffix(e.Name(), ".toml"))
	}
	slices.Sort(names)
	return names
}

// LoadScenario returns the built-in scenario called name, or reads the TOML
// file at name (a path containing "/" or ending in ".toml"), strictly:
// unknown keys are errors. The scenario is validated after EnsureDefaults.
func LoadScenario(name string) (Scenario, error) {
	var data []byte
	var err error
	base := strings.TrimSuffix(path.Base(name), ".toml")
	if strings.Contains(name, "/") || strings.HasSuffix(name, ".toml") {
		data, err = os.ReadFile(name)
	} else {
		data, err = builtinScenarios.ReadFile("scenarios/" + name + ".toml")
		if errors.Is(err, fs.ErrNotExist) {
			return Scenario{}, fmt.Errorf("%w %q (built in: %s)", ErrUnknownScenario, name,
				strings.Join(Scenarios(), ", "))
		}
	}
	if err != nil {
		return Scenario{}, fmt.Errorf("bench: scenario: %w", err)
	}
	var s Scenario
	if err := decodeTOMLStrict(data, &s, "hermod"); err != nil {
		return Scenario{}, fmt.Errorf("bench: scenario %s: %w", name, err)
	}
	if s.Name == "" {
		s.Name = base
	}
	s.EnsureDefaults()
	if err := s.Validate(); err != nil {
		return Scenario{}, fmt.Errorf("bench: scenario %s: %w", name, err)
	}
	return s, nil
}

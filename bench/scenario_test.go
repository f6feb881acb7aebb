package bench

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestBuiltinScenarios(t *testing.T) {
	names := Scenarios()
	for _, want := range []string{"steady-1k", "mixed-sizes", "zipf-providers", "latency", "deferral-storm", "backlog",
		"tls", "smoke"} {
		if !slices.Contains(names, want) {
			t.Errorf("no built-in scenario %q (have %v)", want, names)
		}
	}
	for _, name := range names {
		s, err := LoadScenario(name)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if s.Name != name || s.Description == "" || s.Load.RunTag != "" || s.SinkPort() != "2526" {
			t.Errorf("%s: name %q, description %q, run tag %q, port %q", name, s.Name, s.Description, s.Load.RunTag,
				s.SinkPort())
		}
		// The DNS must point every MX at an address the sink listens on.
		ips := map[string]bool{}
		for _, a := range s.Sink.Listen {
			ips[strings.Split(a, ":")[0]] = true
		}
		for _, mx := range s.DNS.MX {
			if !ips[mx] {
				t.Errorf("%s: dns.mx %s is not a sink address", name, mx)
			}
		}
		for _, z := range s.DNS.Zones {
			for _, mx := range z.MX {
				for _, a := range mx.Addrs {
					if !ips[a] {
						t.Errorf("%s: zone %s MX %s at %s is not a sink address", name, z.Name, mx.Host, a)
					}
				}
			}
		}
	}
	s, _ := LoadScenario("steady-1k")
	if s.Load.Sessions != 50 || s.Load.Size.String() != "1KiB" || s.Load.Domains != 100 || s.DNS.Domains != 100 ||
		strings.Join(s.DNS.MX, ",") != "127.0.0.2,127.0.0.3" || s.DeliveryWait != 2*time.Minute {
		t.Errorf("steady-1k: %+v", s)
	}
	b, _ := LoadScenario("backlog")
	if b.Release.After != 5*time.Second || b.Hermod["delivery"] == nil {
		t.Errorf("backlog: release %+v hermod %v", b.Release, b.Hermod)
	}
}

func TestLoadScenarioFile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "mine.toml")
	if err := os.WriteFile(good, []byte("[load]\nmessages = 10\ndomains = 5\n[sink]\nlisten = [\"127.0.0.9:2600\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := LoadScenario(good)
	if err != nil {
		t.Fatal(err)
	}
	if s.Name != "mine" || s.Load.Messages != 10 || s.DNS.Domains != 5 || strings.Join(s.DNS.MX, ",") != "127.0.0.9" {
		t.Errorf("%+v", s)
	}
	if _, err := LoadScenario("no-such-scenario"); !errors.Is(err, ErrUnknownScenario) {
		t.Errorf("unknown: %v", err)
	}
	for name, body := range map[string]string{
		"typo.toml":    "[load]\nmesages = 10\n",
		"ports.toml":   "[sink]\nlisten = [\"127.0.0.2:1\", \"127.0.0.3:2\"]\n",
		"domains.toml": "[load]\ndomains = 50\n[dns]\ndomains = 10\n",
		"release.toml": "[release]\nafter = \"-1s\"\n[release.faults.default]\nrcpt = { \"451\" = 2.0 }\n",
	} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadScenario(p); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

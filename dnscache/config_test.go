package dnscache

import (
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
)

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*Config)
		want []string // substrings of the error; none means valid
	}{
		{"zero", func(*Config) {}, nil},
		{"defaults", func(c *Config) { *c = DefaultConfig() }, nil},
		{"resolvers", func(c *Config) { c.Resolvers = []string{"192.0.2.1", "[2001:db8::1]:5353", "::1", "192.0.2.2:53"} }, nil},
		{"disabled", func(c *Config) { c.StaleTTL = -1; c.PrefetchFraction = -1 }, nil},
		{"bad resolvers", func(c *Config) { c.Resolvers = []string{"ns.example.org", "192.0.2.1:0", "192.0.2.1:99999"} },
			[]string{"dns.resolvers[0]:", "dns.resolvers[1]: \"192.0.2.1:0\": port must not be 0", "dns.resolvers[2]:"}},
		{"negatives", func(c *Config) {
			c.Timeout = -1
			c.Attempts = -1
			c.MinTTL = -time.Second
			c.MaxTTL = -time.Second
			c.NegativeTTL = -1
			c.MaxEntries = -1
			c.MaxHosts = -1
			c.ResolverHoldDown = -1
		}, []string{"dns.timeout: must be > 0", "dns.attempts: must be >= 1", "dns.min_ttl: must be >= 0",
			"dns.max_ttl: must be >= 0", "dns.negative_ttl: must be >= 0", "dns.max_entries: must be >= 1",
			"dns.max_hosts: must be >= 1", "dns.resolver_hold_down: must be >= 0"}},
		{"max below min", func(c *Config) { c.MinTTL = time.Minute; c.MaxTTL = time.Second },
			[]string{"dns.max_ttl: must be >= min_ttl (1m0s)"}},
		{"max below default min", func(c *Config) { c.MaxTTL = time.Second }, []string{"dns.max_ttl: must be >= min_ttl (5s)"}},
		{"prefetch", func(c *Config) { c.PrefetchFraction = 1 }, []string{"dns.prefetch_fraction: must be < 1"}},
		{"prefetch NaN", func(c *Config) { c.PrefetchFraction = math.NaN() }, []string{"dns.prefetch_fraction"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var c Config
			tc.mod(&c)
			err := c.Validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error, want %q", tc.want)
			}
			if !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("%v does not wrap ErrInvalidConfig", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if n := strings.Count(err.Error(), "dns."); n != len(tc.want) {
				t.Errorf("error reports %d problems, want %d: %v", n, len(tc.want), err)
			}
			if _, nerr := New(c, nil); !errors.Is(nerr, ErrInvalidConfig) {
				t.Errorf("New accepted an invalid config: %v", nerr)
			}
		})
	}
}

func TestDefaultConfig(t *testing.T) {
	c := DefaultConfig()
	if c.Timeout != 2*time.Second || c.Attempts != 2 || c.MinTTL != 5*time.Second || c.MaxTTL != time.Hour ||
		c.NegativeTTL != 5*time.Minute || c.StaleTTL != time.Hour || c.PrefetchFraction != 0.1 ||
		c.MaxEntries != 100000 || c.MaxHosts != 10 || c.ResolvConf != "/etc/resolv.conf" || c.Now == nil ||
		len(c.Resolvers) != 0 {
		t.Fatalf("DefaultConfig() = %+v", c)
	}
	// EnsureDefaults keeps what is set.
	c = Config{Timeout: time.Second, StaleTTL: -1}
	c.EnsureDefaults()
	if c.Timeout != time.Second || c.StaleTTL != -1 || c.Attempts != 2 {
		t.Fatalf("EnsureDefaults: %+v", c)
	}
}

func TestConfigTOML(t *testing.T) {
	const doc = `
[dns]
resolvers = ["192.0.2.1:53", "2001:db8::53"]
timeout = "1500ms"
attempts = 3
min_ttl = "10s"
max_ttl = "2h"
negative_ttl = "1m"
stale_ttl = "30m"
prefetch_fraction = 0.2
max_entries = 5000
max_hosts = 4
resolver_hold_down = "1m"
`
	var file struct {
		DNS Config `toml:"dns"`
	}
	file.DNS = DefaultConfig()
	md, err := toml.Decode(doc, &file)
	if err != nil {
		t.Fatal(err)
	}
	if u := md.Undecoded(); len(u) != 0 {
		t.Fatalf("undecoded keys %v", u)
	}
	c := file.DNS
	if len(c.Resolvers) != 2 || c.Timeout != 1500*time.Millisecond || c.Attempts != 3 || c.MinTTL != 10*time.Second ||
		c.MaxTTL != 2*time.Hour || c.NegativeTTL != time.Minute || c.StaleTTL != 30*time.Minute ||
		c.PrefetchFraction != 0.2 || c.MaxEntries != 5000 || c.MaxHosts != 4 || c.ResolverHoldDown != time.Minute {
		t.Fatalf("decoded %+v", c)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}

	md, err = toml.Decode("[dns]\nmin_tll = \"1s\"\nresolv_conf = \"/x\"\n", &file)
	if err != nil {
		t.Fatal(err)
	}
	if u := md.Undecoded(); len(u) != 2 {
		t.Fatalf("unknown keys not reported: %v", u)
	}
}

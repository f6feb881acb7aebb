package dnscache

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// Defaults for Config.
const (
	DefaultTimeout          = 2 * time.Second
	DefaultAttempts         = 2
	DefaultMinTTL           = 5 * time.Second
	DefaultMaxTTL           = time.Hour
	DefaultNegativeTTL      = 5 * time.Minute
	DefaultStaleTTL         = time.Hour
	DefaultPrefetchFraction = 0.1
	DefaultMaxEntries       = 100000
	DefaultMaxHosts         = 10
	DefaultResolverHoldDown = 30 * time.Second
	DefaultResolvConf       = "/etc/resolv.conf"
)

// Config configures a Cache. It is the [dns] table of the daemon's
// configuration file. Zero values mean "use the default".
type Config struct {
	// Resolvers are the recursive resolvers to ask, as "ip:port" (or a bare
	// IP, meaning port 53). Names are not allowed: resolving the resolver
	// would need a resolver. Empty means the nameservers of ResolvConf.
	// Default: empty.
	Resolvers []string `toml:"resolvers"`
	// Timeout bounds one query to one resolver (a TCP retry after
	// truncation gets its own Timeout). Default: 2s.
	Timeout time.Duration `toml:"timeout"`
	// Attempts is the number of rounds over all resolvers before a lookup
	// fails temporarily. Default: 2.
	Attempts int `toml:"attempts"`
	// MinTTL is the shortest time an answer is cached, whatever its TTL.
	// Default: 5s.
	MinTTL time.Duration `toml:"min_ttl"`
	// MaxTTL is the longest time a positive answer is cached. Default: 1h.
	MaxTTL time.Duration `toml:"max_ttl"`
	// NegativeTTL caps how long NXDOMAIN and NODATA answers are cached
	// (their own TTL comes from the SOA record, RFC 2308). Default: 5m.
	NegativeTTL time.Duration `toml:"negative_ttl"`
	// StaleTTL is how long past its expiry a positive answer may still be
	// served when every resolver fails (RFC 8767). Negative disables
	// serving stale answers. Default: 1h.
	StaleTTL time.Duration `toml:"stale_ttl"`
	// PrefetchFraction: a hit on an entry with less than this fraction of
	// its lifetime left refreshes the entry in the background. Negative
	// disables prefetching. Default: 0.1.
	PrefetchFraction float64 `toml:"prefetch_fraction"`
	// MaxEntries bounds the number of cached entries (one per name and
	// lookup kind). Default: 100000.
	MaxEntries int `toml:"max_entries"`
	// MaxHosts is the number of MX hosts, best preference first, that
	// Resolve resolves and returns. Default: 10.
	MaxHosts int `toml:"max_hosts"`
	// ResolverHoldDown is how long a resolver that timed out, was
	// unreachable or refused is skipped. Default: 30s.
	ResolverHoldDown time.Duration `toml:"resolver_hold_down"`
	// ResolvConf is the resolv.conf(5) file read when Resolvers is empty.
	// Only its nameserver lines are used. Default: /etc/resolv.conf.
	ResolvConf string `toml:"-"`
	// Now is the clock for TTLs (tests inject a fake one). Timeouts of
	// network operations always use the real clock. Default: time.Now.
	Now func() time.Time `toml:"-"`
}

// DefaultConfig returns the default configuration.
func DefaultConfig() Config {
	var c Config
	c.EnsureDefaults()
	return c
}

// EnsureDefaults replaces zero values with their defaults.
func (c *Config) EnsureDefaults() {
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.Attempts == 0 {
		c.Attempts = DefaultAttempts
	}
	if c.MinTTL == 0 {
		c.MinTTL = DefaultMinTTL
	}
	if c.MaxTTL == 0 {
		c.MaxTTL = DefaultMaxTTL
	}
	if c.NegativeTTL == 0 {
		c.NegativeTTL = DefaultNegativeTTL
	}
	if c.StaleTTL == 0 {
		c.StaleTTL = DefaultStaleTTL
	}
	if c.PrefetchFraction == 0 {
		c.PrefetchFraction = DefaultPrefetchFraction
	}
	if c.MaxEntries == 0 {
		c.MaxEntries = DefaultMaxEntries
	}
	if c.MaxHosts == 0 {
		c.MaxHosts = DefaultMaxHosts
	}
	if c.ResolverHoldDown == 0 {
		c.ResolverHoldDown = DefaultResolverHoldDown
	}
	if c.ResolvConf == "" {
		c.ResolvConf = DefaultResolvConf
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// Validate reports every problem of c (after defaults are applied) in one
// error wrapping ErrInvalidConfig. Problems name the TOML key, e.g.
// "dns.min_ttl: must be >= 0".
func (c Config) Validate() error {
	c.EnsureDefaults()
	var probs []string
	add := func(key, format string, args ...any) {
		probs = append(probs, "dns."+key+": "+fmt.Sprintf(format, args...))
	}
	for i, r := range c.Resolvers {
		if _, err := parseResolver(r); err != nil {
			add("resolvers["+strconv.Itoa(i)+"]", "%v", err)
		}
	}
	if c.Timeout < 0 {
		add("timeout", "must be > 0")
	}
	if c.Attempts < 0 {
		add("attempts", "must be >= 1")
	}
	if c.MinTTL < 0 {
		add("min_ttl", "must be >= 0")
	}
	if c.MaxTTL < 0 {
		add("max_ttl", "must be >= 0")
	} else if c.MinTTL >= 0 && c.MaxTTL < c.MinTTL {
		add("max_ttl", "must be >= min_ttl (%v)", c.MinTTL)
	}
	if c.NegativeTTL < 0 {
		add("negative_ttl", "must be >= 0")
	}
	if c.PrefetchFraction >= 1 || c.PrefetchFraction != c.PrefetchFraction {
		add("prefetch_fraction", "must be < 1 (negative disables prefetching)")
	}
	if c.MaxEntries < 0 {
		add("max_entries", "must be >= 1")
	}
	if c.MaxHosts < 0 {
		add("max_hosts", "must be >= 1")
	}
	if c.ResolverHoldDown < 0 {
		add("resolver_hold_down", "must be >= 0")
	}
	if len(probs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s", ErrInvalidConfig, strings.Join(probs, "; "))
}

// parseResolver turns "ip:port" or "ip" into the address form the client
// dials ("1.2.3.4:53", "[::1]:53").
func parseResolver(s string) (string, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		if ap.Port() == 0 {
			return "", fmt.Errorf("%q: port must not be 0", s)
		}
		return ap.String(), nil
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return netip.AddrPortFrom(a, 53).String(), nil
	}
	return "", fmt.Errorf("%q is not an IP address with optional :port", s)
}

// resolvers returns the resolver addresses to use: the configured ones, or
// the nameservers of c.ResolvConf on port 53. Unusable resolv.conf lines are
// returned as warnings.
func (c *Config) resolvers() (addrs []string, warnings []string, err error) {
	if len(c.Resolvers) > 0 {
		for _, r := range c.Resolvers {
			a, err := parseResolver(r)
			if err != nil {
				return nil, nil, err
			}
			addrs = append(addrs, a)
		}
		return addrs, nil, nil
	}
	rc, err := dns.ClientConfigFromFile(c.ResolvConf)
	if err != nil {
		return nil, nil, fmt.Errorf("dnscache: reading %s: %w", c.ResolvConf, err)
	}
	for _, s := range rc.Servers {
		a, err := netip.ParseAddr(s)
		if err != nil {
			warnings = append(warnings, fmt.Sprintf("%s: nameserver %q is not an IP address", c.ResolvConf, s))
			continue
		}
		addrs = append(addrs, netip.AddrPortFrom(a, 53).String())
	}
	if len(addrs) == 0 {
		return nil, warnings, fmt.Errorf("%w in %s", ErrNoResolvers, c.ResolvConf)
	}
	return addrs, warnings, nil
}

// ErrInvalidConfig is wrapped by the error Validate returns.
var ErrInvalidConfig = errors.New("dnscache: invalid configuration")

// ErrNoResolvers is returned by New when no resolver is configured and the
// resolv.conf file names none.
var ErrNoResolvers = errors.New("dnscache: no usable nameserver")

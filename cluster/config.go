package cluster

import (
	"encoding/base64"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// Config is the [cluster] table. A node with an empty Bind runs alone:
// no gossip, no replication, no takeover.
type Config struct {
	// Bind is the host:port of the gossip protocol (serf/memberlist, TCP
	// and UDP). Default: "" (clustering off).
	Bind string `toml:"bind"`
	// Advertise is the gossip address other nodes use to reach this one.
	// Default: Bind.
	Advertise string `toml:"advertise"`
	// Join lists gossip addresses of existing members tried at startup
	// (and again every few seconds until one answers). Default: [].
	Join []string `toml:"join"`
	// NodeName names this node in the cluster; unique. Default: the
	// server's hostname.
	NodeName string `toml:"node_name"`
	// NodeID (1–65535) is written into every queue id this node makes, so
	// ids are unique cluster-wide and a replica's origin is known from its
	// id. Unique. Default: a hash of NodeName.
	NodeID int `toml:"node_id"`
	// SecretKey, base64 of 16, 24 or 32 bytes, encrypts the gossip
	// (AES-GCM). Every node needs the same key. Default: "" (plain).
	SecretKey string `toml:"secret_key"`

	// Replicas is how many other nodes hold a fsynced copy of each message
	// before it is acknowledged with 250. Default: 1. 0 disables
	// replication (a dead node's queue then waits for it).
	Replicas *int `toml:"replicas"`
	// ReplicationListen is the host:port peers send replicas to. Default:
	// Bind's host, Bind's port + 1.
	ReplicationListen string `toml:"replication_listen"`
	// ReplicationTimeout bounds the wait for a peer's acknowledgement; a
	// peer slower than this is dropped from the message's holders (the
	// message is acknowledged with the replicas that answered, and the
	// shortfall counted). Default: 2s.
	ReplicationTimeout time.Duration `toml:"replication_timeout"`
	// RequireReplicas refuses mail (451 4.3.0) while fewer than Replicas
	// peers can take copies, instead of accepting it with fewer copies.
	// Default: false.
	RequireReplicas bool `toml:"require_replicas"`

	// Takeover makes survivors deliver a failed node's replicated mail and
	// answer on its SMTP addresses. Default: true.
	Takeover *bool `toml:"takeover"`
	// TakeoverDelay is how long a node must stay failed before the others
	// take over its mail and addresses: a node that was only slow (a GC
	// pause, a busy machine) and comes back within it costs nothing. A
	// node that left gracefully is taken over after 5 minutes (or this,
	// if longer). Default: 3s.
	TakeoverDelay time.Duration `toml:"takeover_delay"`
	// AddressHook, when set, is run as `HOOK add|del ADDRESS` before this
	// node starts or after it stops listening on a failed peer's SMTP
	// address (to add the address to an interface and announce it). On
	// loopback no hook is needed. Default: "".
	AddressHook string `toml:"address_hook"`
	// ReconcileTimeout bounds how long a restarting node waits to hear
	// from the peers that may have taken over its mail before it delivers
	// from its own spool. Default: 10s.
	ReconcileTimeout time.Duration `toml:"reconcile_timeout"`

	// DomainLimits are cluster-wide connection limits per destination
	// domain: all nodes together hold at most this many connections to it
	// (within the overshoot documented in docs/CLUSTER.md). Default: {}.
	DomainLimits map[string]int `toml:"domain_limits"`
	// MaxConnectionsPerIP bounds the connections one client (an IPv4
	// address or an IPv6 /64) holds to all nodes together; beyond it new
	// ones get 421 4.7.0. 0 disables it (each node's smtp limit still
	// applies). Default: 0.
	MaxConnectionsPerIP int `toml:"max_connections_per_ip"`
	// MaxConnectionRatePerIP bounds the connections per minute one client
	// opens to all nodes together (421 4.7.0 beyond). 0 disables it.
	// Default: 0.
	MaxConnectionRatePerIP int `toml:"max_connection_rate_per_ip"`

	// SiteLimits are cluster-wide connection limits per site: all domains
	// whose most preferred MX host matching a key ends in that key (e.g.
	// "google.com" for aspmx.l.google.com) share the limit. Default: {}.
	SiteLimits map[string]int `toml:"site_limits"`
	// DomainRates are cluster-wide message rates per destination domain
	// (messages per second, all nodes together), split among the nodes
	// that have mail for it. Default: {}.
	DomainRates map[string]float64 `toml:"domain_rates"`
	// CountInterval is how often each node sends its connection counts
	// for limited domains to the others when they changed (unchanged
	// ones every 4 intervals). Default: 500ms.
	CountInterval time.Duration `toml:"count_interval"`

	// ProbeInterval and SuspicionMult tune failure detection (memberlist):
	// a dead node is declared failed after about SuspicionMult ×
	// log10(nodes+1) × ProbeInterval. Defaults: 250ms and 3 (LAN).
	ProbeInterval time.Duration `toml:"probe_interval"`
	SuspicionMult int           `toml:"suspicion_mult"`
}

// Enabled reports whether the node is part of a cluster.
func (c *Config) Enabled() bool { return c.Bind != "" }

// ReplicaCount is Replicas (1 when unset).
func (c *Config) ReplicaCount() int {
	if c.Replicas == nil {
		return 1
	}
	return *c.Replicas
}

// TakeoverEnabled reports whether Takeover is on (the default).
func (c *Config) TakeoverEnabled() bool { return c.Takeover == nil || *c.Takeover }

// EnsureDefaults fills zero fields with their defaults; hostname is the
// server's name.
func (c *Config) EnsureDefaults(hostname string) {
	if c.Join == nil {
		c.Join = []string{}
	}
	if c.NodeName == "" {
		c.NodeName = hostname
		if c.NodeName == "" {
			c.NodeName, _ = os.Hostname()
		}
	}
	if c.NodeID == 0 {
		c.NodeID = DefaultNodeID(c.NodeName)
	}
	if c.Advertise == "" {
		c.Advertise = c.Bind
	}
	if c.Replicas == nil {
		one := 1
		c.Replicas = &one
	}
	if c.ReplicationListen == "" && c.Bind != "" {
		if host, port, err := net.SplitHostPort(c.Bind); err == nil {
			if p, err := strconv.Atoi(port); err == nil {
				c.ReplicationListen = net.JoinHostPort(host, strconv.Itoa(p+1))
			}
		}
	}
	if c.ReplicationTimeout == 0 {
		c.ReplicationTimeout = 2 * time.Second
	}
	if c.TakeoverDelay == 0 {
		c.TakeoverDelay = 3 * time.Second
	}
	if c.ReconcileTimeout == 0 {
		c.ReconcileTimeout = 10 * time.Second
	}
	if c.DomainLimits == nil {
		c.DomainLimits = map[string]int{}
	}
	if c.DomainRates == nil {
		c.DomainRates = map[string]float64{}
	}
	if c.SiteLimits == nil {
		c.SiteLimits = map[string]int{}
	}
	if c.CountInterval == 0 {
		c.CountInterval = 500 * time.Millisecond
	}
	if c.ProbeInterval == 0 {
		c.ProbeInterval = 250 * time.Millisecond
	}
	if c.SuspicionMult == 0 {
		c.SuspicionMult = 3
	}
}

// DefaultNodeID derives a node id (1–65535) from a node name.
func DefaultNodeID(name string) int {
	h := fnv.New32a()
	h.Write([]byte(name))
	v := int(h.Sum32() % 65535)
	return v + 1
}

// Validate reports every invalid field.
func (c *Config) Validate() error {
	if !c.Enabled() {
		return nil
	}
	var errs []error
	addr := func(key, v string) {
		if _, port, err := net.SplitHostPort(v); err != nil || port == "0" || port == "" {
			errs = append(errs, fmt.Errorf("cluster.%s: %q is not host:port", key, v))
		}
	}
	addr("bind", c.Bind)
	addr("advertise", c.Advertise)
	addr("replication_listen", c.ReplicationListen)
	for _, j := range c.Join {
		if _, _, err := net.SplitHostPort(j); err != nil {
			errs = append(errs, fmt.Errorf("cluster.join: %q is not host:port", j))
		}
	}
	if c.NodeName == "" || strings.ContainsAny(c.NodeName, " ,\t\r\n") || len(c.NodeName) > 64 {
		errs = append(errs, fmt.Errorf("cluster.node_name: %q must be 1–64 characters without spaces or commas", c.NodeName))
	}
	if c.NodeID < 1 || c.NodeID > 65535 {
		errs = append(errs, fmt.Errorf("cluster.node_id: %d is not in 1–65535", c.NodeID))
	}
	if c.SecretKey != "" {
		k, err := base64.StdEncoding.DecodeString(c.SecretKey)
		if err != nil || (len(k) != 16 && len(k) != 24 && len(k) != 32) {
			errs = append(errs, errors.New("cluster.secret_key: must be base64 of 16, 24 or 32 bytes"))
		}
	}
	if n := c.ReplicaCount(); n < 0 || n > 8 {
		errs = append(errs, fmt.Errorf("cluster.replicas: %d is not in 0–8", n))
	}
	if c.ReplicationTimeout < 10*time.Millisecond {
		errs = append(errs, fmt.Errorf("cluster.replication_timeout: %v is too short", c.ReplicationTimeout))
	}
	for d, n := range c.DomainLimits {
		if n < 1 {
			errs = append(errs, fmt.Errorf("cluster.domain_limits: %q = %d must be at least 1", d, n))
		}
		if d != strings.ToLower(d) || strings.ContainsAny(d, " @[]") || d == "" {
			errs = append(errs, fmt.Errorf("cluster.domain_limits: %q must be a lower-case domain", d))
		}
	}
	for site, n := range c.SiteLimits {
		if n < 1 {
			errs = append(errs, fmt.Errorf("cluster.site_limits: %q = %d must be at least 1", site, n))
		}
		if site != strings.ToLower(site) || strings.ContainsAny(site, " @[]") || strings.Trim(site, ".") == "" {
			errs = append(errs, fmt.Errorf("cluster.site_limits: %q must be a lower-case host name suffix", site))
		}
	}
	for d, r := range c.DomainRates {
		if !(r > 0) || r > 1e6 {
			errs = append(errs, fmt.Errorf("cluster.domain_rates: %q = %v must be a positive number of messages per second", d, r))
		}
		if d != strings.ToLower(d) || strings.ContainsAny(d, " @[]") || d == "" {
			errs = append(errs, fmt.Errorf("cluster.domain_rates: %q must be a lower-case domain", d))
		}
	}
	if c.MaxConnectionsPerIP < 0 || c.MaxConnectionRatePerIP < 0 {
		errs = append(errs, errors.New("cluster.max_connections_per_ip and max_connection_rate_per_ip must not be negative"))
	}
	if c.CountInterval < 50*time.Millisecond || c.CountInterval > 5*time.Second {
		errs = append(errs, fmt.Errorf("cluster.count_interval: %v is not in 50ms–5s", c.CountInterval))
	}
	if c.ProbeInterval < 10*time.Millisecond {
		errs = append(errs, fmt.Errorf("cluster.probe_interval: %v is too short", c.ProbeInterval))
	}
	if c.SuspicionMult < 1 {
		errs = append(errs, fmt.Errorf("cluster.suspicion_mult: %d must be at least 1", c.SuspicionMult))
	}
	return errors.Join(errs...)
}

package engine

import (
	"errors"
	"fmt"
	"time"

	"github.com/hermod-mta/hermod/netio"
)

// DeliveryConfig is the [delivery] table: how the scheduler delivers
// queued mail. The outbound client's keys (port, tls, hostname, timeouts,
// local_addr) are part of the same table.
type DeliveryConfig struct {
	netio.ClientConfig

	// MaxConnectionsPerDomain bounds simultaneous connections to one
	// destination domain. Default: 20.
	MaxConnectionsPerDomain int `toml:"max_connections_per_domain"`

	// MaxConnections bounds all outbound connections. Default: 1000.
	MaxConnections int `toml:"max_connections"`

	// MaxMessagesPerConnection is how many transactions one connection
	// carries (RSET between) before it is closed. Default: 100.
	MaxMessagesPerConnection int `toml:"max_messages_per_connection"`

	// PipelineTransactions is the most transactions one connection sends in
	// one round trip (MAIL, RCPT and BDAT of several messages in one write,
	// when the server offers PIPELINING and CHUNKING) while more mail for
	// the destination is waiting than connections can take. 1 disables it.
	// Default: 16.
	PipelineTransactions int `toml:"pipeline_transactions"`

	// IdleTimeout is how long an idle connection waits for more mail to
	// its destination before QUIT. Default: 5s.
	IdleTimeout time.Duration `toml:"idle_timeout"`

	// Retry is the backoff schedule after a temporary failure: the n-th
	// retry waits Retry[n-1] (the last step repeats), with ±Jitter.
	// Default: ["1m", "5m", "15m", "30m", "1h", "2h", "4h"].
	Retry []time.Duration `toml:"retry"`

	// Jitter is the relative spread applied to every retry delay, so that
	// mail deferred together does not return together. Default: 0.2.
	Jitter float64 `toml:"jitter"`

	// MaxQueueLifetime is how long a message is retried before it expires
	// and bounces. Default: 120h (5 days).
	MaxQueueLifetime time.Duration `toml:"max_queue_lifetime"`

	// DelayWarning is how long a message may wait before its sender gets
	// a "delayed" notification (RFC 3464) for the recipients still
	// pending: once, at the first failed attempt after it, for the
	// recipients whose NOTIFY allows it (none given, or one with DELAY;
	// RFC 3461 §4.1). 0 sends none, as Postfix's delay_warning_time.
	// Below max_queue_lifetime. Default: 0.
	DelayWarning time.Duration `toml:"delay_warning"`

	// ActiveLimit bounds the messages held in memory for delivery; the rest
	// wait in the spool. Default: 20000.
	ActiveLimit int `toml:"active_limit"`

	// DestinationQueueLimit bounds the deliveries waiting in memory for
	// one destination, so one backlogged domain cannot fill the active set.
	// Default: 2000.
	DestinationQueueLimit int `toml:"destination_queue_limit"`

	// TLSCAFile is a PEM bundle of certificate authorities trusted, in
	// addition to the system's, when verifying MX certificates (tls =
	// "required"; opportunistic TLS does not verify). Default: "" (system
	// roots only).
	TLSCAFile string `toml:"tls_ca_file"`

	// ScanInterval is the longest wait between two scans of the spool's
	// due index (mail whose retry time has come). Default: 1s.
	ScanInterval time.Duration `toml:"scan_interval"`
}

// EnsureDefaults fills zero fields with their defaults.
func (c *DeliveryConfig) EnsureDefaults() {
	c.ClientConfig.EnsureDefaults()
	if c.MaxConnectionsPerDomain == 0 {
		c.MaxConnectionsPerDomain = 20
	}
	if c.MaxConnections == 0 {
		c.MaxConnections = 1000
	}
	if c.MaxMessagesPerConnection == 0 {
		c.MaxMessagesPerConnection = 100
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = 5 * time.Second
	}
	if c.PipelineTransactions == 0 {
		c.PipelineTransactions = 16
	}
	if len(c.Retry) == 0 {
		c.Retry = []time.Duration{time.Minute, 5 * time.Minute, 15 * time.Minute, 30 * time.Minute, time.Hour, 2 * time.Hour, 4 * time.Hour}
	}
	if c.Jitter == 0 {
		c.Jitter = 0.2
	}
	if c.MaxQueueLifetime == 0 {
		c.MaxQueueLifetime = 120 * time.Hour
	}
	if c.ActiveLimit == 0 {
		c.ActiveLimit = 20000
	}
	if c.DestinationQueueLimit == 0 {
		c.DestinationQueueLimit = 2000
	}
	if c.ScanInterval == 0 {
		c.ScanInterval = time.Second
	}
}

// Validate reports every invalid field.
func (c DeliveryConfig) Validate() error {
	var errs []error
	if err := c.ClientConfig.Validate(); err != nil {
		errs = append(errs, err)
	}
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("delivery.%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if c.MaxConnectionsPerDomain < 1 {
		bad("max_connections_per_domain", "must be at least 1, got %d", c.MaxConnectionsPerDomain)
	}
	if c.MaxConnections < 1 {
		bad("max_connections", "must be at least 1, got %d", c.MaxConnections)
	}
	if c.MaxMessagesPerConnection < 1 {
		bad("max_messages_per_connection", "must be at least 1, got %d", c.MaxMessagesPerConnection)
	}
	if c.PipelineTransactions < 1 || c.PipelineTransactions > 1000 {
		bad("pipeline_transactions", "must be between 1 and 1000, got %d", c.PipelineTransactions)
	}
	if c.IdleTimeout < 0 {
		bad("idle_timeout", "must not be negative, got %v", c.IdleTimeout)
	}
	for i, r := range c.Retry {
		if r <= 0 {
			bad("retry", "step %d is %v; every step must be positive", i+1, r)
		}
	}
	if c.Jitter < 0 || c.Jitter >= 1 {
		bad("jitter", "must be in [0, 1), got %v", c.Jitter)
	}
	if c.MaxQueueLifetime <= 0 {
		bad("max_queue_lifetime", "must be positive, got %v", c.MaxQueueLifetime)
	}
	if c.DelayWarning < 0 || c.DelayWarning > 0 && c.DelayWarning >= c.MaxQueueLifetime {
		bad("delay_warning", "must be 0 (none) or between 0 and max_queue_lifetime (%v), got %v", c.MaxQueueLifetime, c.DelayWarning)
	}
	if c.ActiveLimit < 1 {
		bad("active_limit", "must be at least 1, got %d", c.ActiveLimit)
	}
	if c.DestinationQueueLimit < 1 {
		bad("destination_queue_limit", "must be at least 1, got %d", c.DestinationQueueLimit)
	}
	if c.ScanInterval <= 0 {
		bad("scan_interval", "must be positive, got %v", c.ScanInterval)
	}
	return errors.Join(errs...)
}

// retryDelay returns the wait before retry number n (n >= 1) with jitter
// applied from u in [0, 1).
func (c *DeliveryConfig) retryDelay(n int, u float64) time.Duration {
	if n < 1 {
		n = 1
	}
	step := c.Retry[len(c.Retry)-1]
	if n <= len(c.Retry) {
		step = c.Retry[n-1]
	}
	f := 1 + c.Jitter*(2*u-1)
	return time.Duration(float64(step) * f)
}

package netio

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"
)

// ServerConfig configures the inbound SMTP server. It is the [smtp] table of
// the daemon's configuration file (the relay policy keys of that table belong
// to the engine).
type ServerConfig struct {
	// Hostname is the name the server announces in its greeting and EHLO
	// reply. It is set from [server] hostname. Default: os.Hostname().
	Hostname string `toml:"-"`

	// Listen lists the addresses the server accepts connections on, as
	// host:port. Several are allowed. Default: ["127.0.0.1:2525"].
	Listen []string `toml:"listen"`

	// MaxBufferedBytes bounds the message content all sessions hold in
	// memory at once: bodies being received and bodies waiting for their
	// commit. A message whose content would go beyond it is read to its
	// end, dropped and refused with 452 4.3.1 (the client tries again
	// later), and MAIL is refused with 452 4.3.1 while it is spent. It
	// keeps many clients sending large messages at once from exhausting
	// memory. At least max_message_size. Default: 1 GiB.
	MaxBufferedBytes int64 `toml:"max_buffered_bytes"`

	// budget counts the content held against MaxBufferedBytes; NewServer
	// makes it, and the sessions share it through their *ServerConfig.
	// nil (sessions made without a server): unlimited.
	budget *contentBudget

	// MaxMessageSize is the largest message accepted, in octets, announced
	// with SIZE and enforced while the message streams in. Default: 26214400.
	MaxMessageSize int64 `toml:"max_message_size"`

	// MaxRecipients is the most RCPT commands accepted per transaction;
	// beyond it the server answers 452 4.5.3. Default: 1000.
	MaxRecipients int `toml:"max_recipients"`

	// MaxConnections is the most simultaneous client connections; beyond it
	// new connections get 421 4.7.0 and are closed. Default: 10000.
	MaxConnections int `toml:"max_connections"`

	// MaxConnectionsPerIP is the most simultaneous connections from one
	// client address. Default: 50.
	MaxConnectionsPerIP int `toml:"max_connections_per_ip"`

	// TLSCert and TLSKey are PEM files. STARTTLS is offered when both are
	// set. Default: "" (no STARTTLS).
	TLSCert string `toml:"tls_cert"`
	TLSKey  string `toml:"tls_key"`

	// CommandTimeout is how long the server waits for the next command line
	// (RFC 5321 §4.5.3.2.7: at least 5 minutes). Default: 5m.
	CommandTimeout time.Duration `toml:"command_timeout"`

	// DataTimeout is how long the server waits for the next chunk of message
	// data during DATA or BDAT. Default: 5m.
	DataTimeout time.Duration `toml:"data_timeout"`

	// MinDataRate is the lowest average rate, in octets per second, a client
	// may send message data at once DataRateGrace has passed in a DATA
	// phase; slower clients get 421 4.4.2 and are disconnected. 0 disables
	// the check. Default: 1024.
	MinDataRate int64 `toml:"min_data_rate"`

	// DataRateGrace is the time a client has at the start of DATA before
	// MinDataRate applies. Default: 30s.
	DataRateGrace time.Duration `toml:"data_rate_grace"`

	// MaxErrors is the number of error replies after which the server sends
	// 421 4.7.0 and closes the connection. Default: 20.
	MaxErrors int `toml:"max_errors"`

	// EventLoops is the number of gnet event loops. 0 means half of
	// GOMAXPROCS, at least one (a loop blocked in epoll_wait holds its
	// processor until sysmon takes it back). Default: 0.
	EventLoops int `toml:"event_loops"`
}

// DefaultServerConfig returns the configuration used when nothing is set.
func DefaultServerConfig() ServerConfig {
	var c ServerConfig
	c.EnsureDefaults()
	return c
}

// EnsureDefaults fills zero fields with their defaults.
func (c *ServerConfig) EnsureDefaults() {
	if c.Hostname == "" {
		c.Hostname = defaultHostname()
	}
	if len(c.Listen) == 0 {
		c.Listen = []string{"127.0.0.1:2525"}
	}
	if c.MaxMessageSize == 0 {
		c.MaxMessageSize = 26214400
	}
	if c.MaxBufferedBytes == 0 {
		c.MaxBufferedBytes = 1 << 30
	}
	if c.MaxRecipients == 0 {
		c.MaxRecipients = 1000
	}
	if c.MaxConnections == 0 {
		c.MaxConnections = 10000
	}
	if c.MaxConnectionsPerIP == 0 {
		c.MaxConnectionsPerIP = 50
	}
	if c.CommandTimeout == 0 {
		c.CommandTimeout = 5 * time.Minute
	}
	if c.DataTimeout == 0 {
		c.DataTimeout = 5 * time.Minute
	}
	if c.MinDataRate == 0 {
		c.MinDataRate = 1024
	}
	if c.DataRateGrace == 0 {
		c.DataRateGrace = 30 * time.Second
	}
	if c.MaxErrors == 0 {
		c.MaxErrors = 20
	}
}

// Validate reports every invalid field at once. Key names are those of the
// [smtp] table.
func (c ServerConfig) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("smtp.%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if len(c.Listen) == 0 {
		bad("listen", "at least one address is required")
	}
	seen := map[string]bool{}
	for _, l := range c.Listen {
		if _, err := netip.ParseAddrPort(l); err != nil {
			bad("listen", "%q is not an IP:port address (%v)", l, err)
		}
		if seen[l] {
			bad("listen", "%q is listed twice", l)
		}
		seen[l] = true
	}
	if c.MaxMessageSize < 1024 {
		bad("max_message_size", "%d is below the minimum of 1024 octets", c.MaxMessageSize)
	}
	if c.MaxBufferedBytes < c.MaxMessageSize {
		bad("max_buffered_bytes", "%d is below max_message_size (%d)", c.MaxBufferedBytes, c.MaxMessageSize)
	}
	if c.MaxRecipients < 100 {
		// RFC 5321 §4.5.3.1.8: a server must accept at least 100 recipients.
		bad("max_recipients", "%d is below RFC 5321's minimum of 100", c.MaxRecipients)
	}
	if c.MaxConnections < 1 {
		bad("max_connections", "must be at least 1, got %d", c.MaxConnections)
	}
	if c.MaxConnectionsPerIP < 1 {
		bad("max_connections_per_ip", "must be at least 1, got %d", c.MaxConnectionsPerIP)
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		bad("tls_cert", "tls_cert and tls_key must be set together")
	}
	if c.CommandTimeout < time.Second {
		bad("command_timeout", "must be at least 1s, got %v", c.CommandTimeout)
	}
	if c.DataTimeout < time.Second {
		bad("data_timeout", "must be at least 1s, got %v", c.DataTimeout)
	}
	if c.MinDataRate < 0 {
		bad("min_data_rate", "must not be negative, got %d", c.MinDataRate)
	}
	if c.DataRateGrace < 0 {
		bad("data_rate_grace", "must not be negative, got %v", c.DataRateGrace)
	}
	if c.MaxErrors < 1 {
		bad("max_errors", "must be at least 1, got %d", c.MaxErrors)
	}
	if c.EventLoops < 0 {
		bad("event_loops", "must not be negative, got %d", c.EventLoops)
	}
	if strings.ContainsAny(c.Hostname, " \t\r\n") {
		errs = append(errs, fmt.Errorf("server.hostname: %q contains white space", c.Hostname))
	}
	return errors.Join(errs...)
}

func defaultHostname() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "localhost"
	}
	return h
}

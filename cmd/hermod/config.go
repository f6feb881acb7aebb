package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sort"
	"strings"

	"github.com/BurntSushi/toml"

	"github.com/hermod-mta/hermod/cluster"
	"github.com/hermod-mta/hermod/dnscache"
	"github.com/hermod-mta/hermod/engine"
	"github.com/hermod-mta/hermod/netio"
	"github.com/hermod-mta/hermod/spool"
)

// Config is the daemon's configuration file. Each table belongs to one
// package; this file only nests them.
type Config struct {
	Server   ServerSection         `toml:"server"`
	SMTP     SMTPSection           `toml:"smtp"`
	Spool    spool.Config          `toml:"spool"`
	DNS      dnscache.Config       `toml:"dns"`
	Delivery engine.DeliveryConfig `toml:"delivery"`
	HTTP     HTTPSection           `toml:"http"`
	Log      LogSection            `toml:"log"`
	Cluster  cluster.Config        `toml:"cluster"`
}

// ServerSection is the [server] table.
type ServerSection struct {
	// Hostname is this server's name in greetings, EHLO and Received:
	// headers. Default: the machine's host name.
	Hostname string `toml:"hostname"`
}

// SMTPSection is the [smtp] table: the server's listeners and limits
// (netio) and its relay policy (engine).
type SMTPSection struct {
	netio.ServerConfig
	engine.RelayConfig
}

// HTTPSection is the [http] table.
type HTTPSection struct {
	// Listen is the address of /metrics, /debug/pprof, /healthz and the
	// admin API. "off" disables it. Default: "127.0.0.1:8025".
	Listen string `toml:"listen"`
}

// LogSection is the [log] table.
type LogSection struct {
	// Level is debug, info, warn or error. Default: "info".
	Level string `toml:"level"`
	// Format is text or json (of the operational log on standard error).
	// Default: "text".
	Format string `toml:"format"`
	// DeliveryLog is the file receiving one JSON line per reception,
	// delivery, deferral and bounce; "-" is standard output, "off"
	// disables it. Default: "data/delivery.log".
	DeliveryLog string `toml:"delivery_log"`
}

// DefaultConfig is the configuration without a file: it runs on a laptop,
// listening on loopback only.
func DefaultConfig() Config {
	var c Config
	c.EnsureDefaults()
	return c
}

// EnsureDefaults fills every unset key with its default.
func (c *Config) EnsureDefaults() {
	if c.Server.Hostname == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			h = "localhost"
		}
		c.Server.Hostname = h
	}
	c.SMTP.ServerConfig.Hostname = c.Server.Hostname
	c.SMTP.ServerConfig.EnsureDefaults()
	c.SMTP.RelayConfig.EnsureDefaults()
	c.Spool.EnsureDefaults()
	c.DNS.EnsureDefaults()
	if c.Delivery.Hostname == "" {
		c.Delivery.Hostname = c.Server.Hostname
	}
	c.Delivery.EnsureDefaults()
	if c.HTTP.Listen == "" {
		c.HTTP.Listen = "127.0.0.1:8025"
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	if c.Log.Format == "" {
		c.Log.Format = "text"
	}
	if c.Log.DeliveryLog == "" {
		c.Log.DeliveryLog = "data/delivery.log"
	}
	if c.Cluster.Enabled() {
		c.Cluster.EnsureDefaults(c.Server.Hostname)
		c.Spool.NodeID = uint16(c.Cluster.NodeID)
	}
}

// Validate reports every invalid key at once.
func (c Config) Validate() error {
	errs := []error{
		c.SMTP.ServerConfig.Validate(),
		c.SMTP.RelayConfig.Validate(),
		c.Spool.Validate(),
		c.DNS.Validate(),
		c.Delivery.Validate(),
		c.Cluster.Validate(),
	}
	if c.HTTP.Listen != "off" {
		if _, err := netip.ParseAddrPort(c.HTTP.Listen); err != nil {
			errs = append(errs, fmt.Errorf("http.listen: %q is not an IP:port address (or \"off\")", c.HTTP.Listen))
		}
	}
	if _, err := parseLevel(c.Log.Level); err != nil {
		errs = append(errs, fmt.Errorf("log.level: %w", err))
	}
	if c.Log.Format != "text" && c.Log.Format != "json" {
		errs = append(errs, fmt.Errorf("log.format: %q is not text or json", c.Log.Format))
	}
	return errors.Join(errs...)
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("%q is not debug, info, warn or error", s)
	}
	return l, nil
}

// LoadConfig reads a TOML file strictly: an unknown key is an error naming
// it. Missing keys take their defaults. The result is validated.
func LoadConfig(path string) (Config, error) {
	var c Config
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return c, fmt.Errorf("config: %w", err)
		}
		md, err := toml.Decode(string(data), &c)
		if err != nil {
			return c, fmt.Errorf("config %s: %w", path, err)
		}
		if und := md.Undecoded(); len(und) > 0 {
			keys := make([]string, len(und))
			for i, k := range und {
				keys[i] = k.String()
			}
			sort.Strings(keys)
			return c, fmt.Errorf("config %s: unknown key(s): %s", path, strings.Join(keys, ", "))
		}
	}
	c.EnsureDefaults()
	if err := c.Validate(); err != nil {
		if path == "" {
			path = "(defaults)"
		}
		return c, fmt.Errorf("config %s:\n%w", path, err)
	}
	return c, nil
}

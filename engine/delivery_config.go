package engine

import (
	"errors"
	"fmt"
)

// DeliveryConfig is the [delivery] table: how the scheduler delivers
// queued mail.
type DeliveryConfig struct {
	// Port is the destination TCP port of every MX (25 in production; tests
	// point it at a sink). Default: 25.
	Port int `toml:"port"`
}

// EnsureDefaults fills zero fields with their defaults.
func (c *DeliveryConfig) EnsureDefaults() {
	if c.Port == 0 {
		c.Port = 25
	}
}

// Validate reports every invalid field.
func (c DeliveryConfig) Validate() error {
	var errs []error
	if c.Port < 1 || c.Port > 65535 {
		errs = append(errs, fmt.Errorf("delivery.port: %d is not a TCP port", c.Port))
	}
	return errors.Join(errs...)
}

package netio

import (
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
)

func TestClientConfigDefaults(t *testing.T) {
	c := DefaultClientConfig()
	if c.Hostname == "" || c.Port != 25 || c.TLS != TLSOpportunistic || c.Logger == nil {
		t.Errorf("defaults: %+v", c)
	}
	for _, d := range []struct {
		got, want time.Duration
	}{
		{c.ConnectTimeout, 30 * time.Second},
		{c.GreetingTimeout, 5 * time.Minute},
		{c.MailTimeout, 5 * time.Minute},
		{c.RcptTimeout, 5 * time.Minute},
		{c.DataInitTimeout, 2 * time.Minute},
		{c.DataBlockTimeout, 3 * time.Minute},
		{c.DataTermTimeout, 10 * time.Minute},
	} {
		if d.got != d.want {
			t.Errorf("timeout %v, want %v", d.got, d.want)
		}
	}
	if err := c.Validate(); err != nil {
		t.Errorf("defaults do not validate: %v", err)
	}
}

func TestClientConfigValidate(t *testing.T) {
	c := DefaultClientConfig()
	c.Hostname = "bad host"
	c.Port = 70000
	c.TLS = 9
	c.MailTimeout = -time.Second
	c.DataTermTimeout = 0
	err := c.Validate()
	if err == nil {
		t.Fatal("no error")
	}
	for _, key := range []string{"delivery.hostname", "delivery.port", "delivery.tls", "delivery.mail_timeout", "delivery.data_term_timeout"} {
		if !strings.Contains(err.Error(), key) {
			t.Errorf("error does not mention %s: %v", key, err)
		}
	}
	if strings.Contains(err.Error(), "delivery.rcpt_timeout") {
		t.Errorf("error mentions a valid key: %v", err)
	}
}

func TestClientConfigTOML(t *testing.T) {
	var c ClientConfig
	md, err := toml.Decode(`
hostname = "mta.example.org"
port = 2525
tls = "required"
connect_timeout = "10s"
data_term_timeout = "15m"
local_addr = "192.0.2.7"
`, &c)
	if err != nil {
		t.Fatal(err)
	}
	if u := md.Undecoded(); len(u) != 0 {
		t.Errorf("undecoded keys %v", u)
	}
	if c.Hostname != "mta.example.org" || c.Port != 2525 || c.TLS != TLSRequired || c.ConnectTimeout != 10*time.Second ||
		c.DataTermTimeout != 15*time.Minute || c.LocalAddr.String() != "192.0.2.7" {
		t.Errorf("decoded %+v", c)
	}
	if _, err := toml.Decode(`tls = "sometimes"`, &c); err == nil {
		t.Error("unknown TLS mode accepted")
	}
}

func TestClientTLSMode(t *testing.T) {
	for _, m := range []TLSMode{TLSOpportunistic, TLSRequired, TLSDisabled} {
		b, err := m.MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		got, err := ParseTLSMode(strings.ToUpper(string(b)))
		if err != nil || got != m {
			t.Errorf("%v: round trip gives %v, %v", m, got, err)
		}
	}
	if m, err := ParseTLSMode(""); err != nil || m != TLSOpportunistic {
		t.Errorf("empty mode: %v, %v", m, err)
	}
	if _, err := ParseTLSMode("yes"); err == nil {
		t.Error("unknown mode accepted")
	}
	if s := TLSMode(7).String(); s != "TLSMode(7)" {
		t.Errorf("String = %q", s)
	}
	if _, err := TLSMode(7).MarshalText(); err == nil {
		t.Error("invalid mode marshalled")
	}
}

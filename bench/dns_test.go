package bench

import (
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func newTestDNS(t *testing.T, cfg DNSConfig) *DNS {
	t.Helper()
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	d, err := NewDNS(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	return d
}

func query(t *testing.T, d *DNS, network, name string, qtype uint16) *dns.Msg {
	t.Helper()
	c := &dns.Client{Net: network, Timeout: 5 * time.Second}
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	r, _, err := c.Exchange(m, d.Addr())
	if err != nil {
		t.Fatalf("%s %s %s: %v", network, name, dns.TypeToString[qtype], err)
	}
	return r
}

// answers renders the answer section as "type value" strings.
func answers(rrs []dns.RR) []string {
	var out []string
	for _, rr := range rrs {
		switch v := rr.(type) {
		case *dns.MX:
			out = append(out, "MX "+itoaU(uint64(v.Preference))+" "+v.Mx)
		case *dns.A:
			out = append(out, "A "+v.A.String())
		case *dns.AAAA:
			out = append(out, "AAAA "+v.AAAA.String())
		default:
			out = append(out, rr.String())
		}
	}
	return out
}

func itoaU(n uint64) string {
	if n == 0 {
		return "0"
	}
	var b []byte
	for n > 0 {
		b = append([]byte{byte('0' + n%10)}, b...)
		n /= 10
	}
	return string(b)
}

func TestDNSGenerated(t *testing.T) {
	d := newTestDNS(t, DNSConfig{Domains: 12, MX: []string{"127.0.0.2", "127.0.0.3"}, MXPerDomain: 2, TTL: 60})
	for _, network := range []string{"udp", "tcp"} {
		r := query(t, d, network, "d0001.test", dns.TypeMX)
		if r.Rcode != dns.RcodeSuccess || !r.Authoritative {
			t.Fatalf("%s: rcode %s aa %v", network, dns.RcodeToString[r.Rcode], r.Authoritative)
		}
		got := strings.Join(answers(r.Answer), ", ")
		if want := "MX 10 mx1.d0001.test., MX 20 mx2.d0001.test."; got != want {
			t.Errorf("%s MX d0001: got %q, want %q", network, got, want)
		}
		if got, want := strings.Join(answers(r.Extra), ", "), "A 127.0.0.2, A 127.0.0.3"; got != want {
			t.Errorf("%s additional: got %q, want %q", network, got, want)
		}
		if r.Answer[0].Header().Ttl != 60 {
			t.Errorf("ttl %d, want 60", r.Answer[0].Header().Ttl)
		}
	}
	// Domain 2's first host takes the second address.
	r := query(t, d, "udp", "MX1.D0002.test", dns.TypeA)
	if got := strings.Join(answers(r.Answer), ","); got != "A 127.0.0.3" {
		t.Errorf("A mx1.d0002: %q", got)
	}
	// d0012 exists, d0013 does not; sender.test is an extra domain.
	if r := query(t, d, "udp", "d0012.test", dns.TypeMX); len(r.Answer) != 2 {
		t.Errorf("d0012: %v", r)
	}
	if r := query(t, d, "udp", "sender.test", dns.TypeMX); len(r.Answer) != 2 {
		t.Errorf("sender.test: %v", r)
	}
	r = query(t, d, "udp", "d0013.test", dns.TypeMX)
	if r.Rcode != dns.RcodeNameError || len(r.Ns) != 1 || r.Ns[0].Header().Rrtype != dns.TypeSOA {
		t.Errorf("d0013: want NXDOMAIN with SOA, got %v", r)
	}
	// A domain with MX but no A: NODATA.
	r = query(t, d, "udp", "d0001.test", dns.TypeA)
	if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 || len(r.Ns) != 1 {
		t.Errorf("A d0001: want NODATA, got %v", r)
	}
	st := d.Stats()
	if st.Queries != 7 || st.TCP != 1 || st.UDP != 6 || st.MX != 5 || st.A != 2 || st.NXDomain != 1 || st.NoError != 6 {
		t.Errorf("stats %+v", st)
	}
}

func TestDNSZones(t *testing.T) {
	d := newTestDNS(t, DNSConfig{Domains: 3, Zones: []Zone{
		{Name: "multi.test", MX: []MX{
			{Host: "b.multi.test", Pref: 20, Addrs: []string{"127.0.0.3"}},
			{Host: "a.multi.test", Pref: 10, Addrs: []string{"127.0.0.2", "::1"}},
		}},
		{Name: "null.test", NullMX: true},
		{Name: "implicit.test", A: []string{"127.0.0.4"}},
		{Name: "d0002.test", NXDomain: true},
		{Name: "broken.test", ServFail: true},
		{Name: "short.test", MX: []MX{{Host: "mx.short.test", Pref: 5}}, ZeroTTL: true},
	}})
	cases := []struct {
		name  string
		qtype uint16
		rcode int
		want  string
	}{
		{"multi.test", dns.TypeMX, dns.RcodeSuccess, "MX 20 b.multi.test., MX 10 a.multi.test."},
		{"a.multi.test", dns.TypeA, dns.RcodeSuccess, "A 127.0.0.2"},
		{"a.multi.test", dns.TypeAAAA, dns.RcodeSuccess, "AAAA ::1"},
		{"null.test", dns.TypeMX, dns.RcodeSuccess, "MX 0 ."},
		{"implicit.test", dns.TypeMX, dns.RcodeSuccess, ""},
		{"implicit.test", dns.TypeA, dns.RcodeSuccess, "A 127.0.0.4"},
		{"d0002.test", dns.TypeMX, dns.RcodeNameError, ""},
		{"d0003.test", dns.TypeMX, dns.RcodeSuccess, "MX 10 mx1.d0003.test."},
		{"broken.test", dns.TypeMX, dns.RcodeServerFailure, ""},
		{"short.test", dns.TypeMX, dns.RcodeSuccess, "MX 5 mx.short.test."},
		{"example.com", dns.TypeMX, dns.RcodeNameError, ""},
	}
	for _, c := range cases {
		r := query(t, d, "udp", c.name, c.qtype)
		if r.Rcode != c.rcode {
			t.Errorf("%s %s: rcode %s, want %s", c.name, dns.TypeToString[c.qtype], dns.RcodeToString[r.Rcode],
				dns.RcodeToString[c.rcode])
		}
		if got := strings.Join(answers(r.Answer), ", "); got != c.want {
			t.Errorf("%s %s: got %q, want %q", c.name, dns.TypeToString[c.qtype], got, c.want)
		}
	}
	if r := query(t, d, "udp", "short.test", dns.TypeMX); r.Answer[0].Header().Ttl != 0 {
		t.Errorf("zero_ttl: ttl %d", r.Answer[0].Header().Ttl)
	}
	if st := d.Stats(); st.ServFail != 1 || st.NXDomain != 2 {
		t.Errorf("stats %+v", st)
	}

	// Zones change while serving.
	if err := d.SetZone(Zone{Name: "null.test", A: []string{"127.0.0.9"}, TTL: 7}); err != nil {
		t.Fatal(err)
	}
	if r := query(t, d, "udp", "null.test", dns.TypeA); strings.Join(answers(r.Answer), "") != "A 127.0.0.9" ||
		r.Answer[0].Header().Ttl != 7 {
		t.Errorf("after SetZone: %v", r)
	}
	d.RemoveZone("multi.test")
	if r := query(t, d, "udp", "multi.test", dns.TypeMX); r.Rcode != dns.RcodeNameError {
		t.Errorf("after RemoveZone: %v", r)
	}
	if err := d.SetHost("new.test", 0, "127.0.0.5", "::2"); err != nil {
		t.Fatal(err)
	}
	if r := query(t, d, "tcp", "new.test", dns.TypeAAAA); strings.Join(answers(r.Answer), "") != "AAAA ::2" {
		t.Errorf("SetHost: %v", r)
	}
	if err := d.SetZone(Zone{Name: "bad..test", NullMX: true, MX: []MX{{Host: "x.test"}}}); err == nil {
		t.Error("SetZone accepted an invalid zone")
	}
}

func TestDNSDelay(t *testing.T) {
	const delay = 150 * time.Millisecond
	d := newTestDNS(t, DNSConfig{Domains: 1, Zones: []Zone{{Name: "slow.test", Delay: delay, A: []string{"127.0.0.2"}}}})
	start := time.Now()
	r := query(t, d, "udp", "slow.test", dns.TypeA)
	if took := time.Since(start); took < delay {
		t.Errorf("slow answer came after %v, want >= %v", took, delay)
	}
	if len(r.Answer) != 1 {
		t.Errorf("slow answer: %v", r)
	}
	// A slow zone does not hold up others: start a slow query, then a fast one.
	done := make(chan time.Duration, 1)
	go func() {
		c := &dns.Client{Net: "udp", Timeout: 5 * time.Second}
		m := new(dns.Msg)
		m.SetQuestion("slow.test.", dns.TypeA)
		s := time.Now()
		_, _, _ = c.Exchange(m, d.Addr())
		done <- time.Since(s)
	}()
	time.Sleep(10 * time.Millisecond)
	s := time.Now()
	query(t, d, "udp", "d0001.test", dns.TypeMX)
	fast := time.Since(s)
	slow := <-done
	if fast >= slow {
		t.Errorf("fast query took %v, not less than the slow one (%v)", fast, slow)
	}
}

func TestDNSTruncation(t *testing.T) {
	var mxs []MX
	for i := 0; i < 40; i++ {
		mxs = append(mxs, MX{Host: "a-rather-long-exchange-name-" + itoaU(uint64(i)) + ".big.test", Pref: uint16(i)})
	}
	d := newTestDNS(t, DNSConfig{Domains: 1, Zones: []Zone{{Name: "big.test", MX: mxs}}})
	r := query(t, d, "udp", "big.test", dns.TypeMX)
	if !r.Truncated || len(r.Answer) >= 40 {
		t.Errorf("udp: truncated %v with %d answers", r.Truncated, len(r.Answer))
	}
	if r := query(t, d, "tcp", "big.test", dns.TypeMX); r.Truncated || len(r.Answer) != 40 {
		t.Errorf("tcp: truncated %v with %d answers", r.Truncated, len(r.Answer))
	}
}

func TestDNSConfigValidate(t *testing.T) {
	c := DNSConfig{Listen: "nope", Domains: -1, MX: []string{"x"}, MXPerDomain: -1, Extra: []string{""},
		Zones: []Zone{{Name: "", NXDomain: true, ServFail: true, Delay: -1, A: []string{"y"}, NullMX: true,
			MX: []MX{{Host: "", Addrs: []string{"z"}}}}}}
	err := c.Validate()
	if err == nil {
		t.Fatal("no error")
	}
	for _, key := range []string{"dns.listen", "dns.domains", "dns.mx[0]", "dns.mx_per_domain", "dns.extra[0]",
		"dns.zone[0].name", "dns.zone[0].null_mx", "dns.zone[0].nxdomain", "dns.zone[0].delay", "dns.zone[0].a[0]",
		"dns.zone[0].mx[0].host", "dns.zone[0].mx[0].addrs[0]"} {
		if !strings.Contains(err.Error(), key+":") {
			t.Errorf("error does not name %s: %v", key, err)
		}
	}
	if err := DefaultDNSConfig().Validate(); err != nil {
		t.Errorf("defaults: %v", err)
	}
	if _, err := NewDNS(DNSConfig{Listen: "127.0.0.1:0", MX: []string{"bad"}}); err == nil {
		t.Error("NewDNS accepted a bad config")
	}
}

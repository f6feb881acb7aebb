package bench

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// DNSConfig configures a DNS server.
type DNSConfig struct {
	// Listen is the UDP and TCP address to serve on; port 0 picks a port
	// free for both (see DNS.Addr). Default: "127.0.0.1:5353".
	Listen string `toml:"listen"`
	// Domains is the number of generated test domains d0001.test…
	// (TestDomain). Domain i has MXPerDomain MX hosts mx1.<domain>,
	// mx2.<domain>… with preferences 10, 20…, and host k of domain i has
	// the address MX[(i-1+k-1) % len(MX)]. Default: 100.
	Domains int `toml:"domains"`
	// MX are the addresses (IPv4 or IPv6) of the sink MX hosts.
	// Default: ["127.0.0.2"].
	MX []string `toml:"mx"`
	// MXPerDomain is the number of MX hosts per generated domain.
	// Default: 1.
	MXPerDomain int `toml:"mx_per_domain"`
	// Extra are more domains served like the generated ones (numbered
	// after them), e.g. the load's sender domain so that bounces reach the
	// sink. Default: ["sender.test"].
	Extra []string `toml:"extra"`
	// TTL is the TTL of every record unless a zone sets its own.
	// Default: 300.
	TTL uint32 `toml:"ttl"`
	// Zones are explicit zones, installed after (and replacing) generated
	// ones. Default: none.
	Zones []Zone `toml:"zone"`
	// Logger receives serving errors. Default: nil (discard).
	Logger *slog.Logger `toml:"-" json:"-"`
}

// Zone is one name with explicit answers. Names are matched exactly
// (case-insensitively); a name the server does not know is NXDOMAIN.
type Zone struct {
	// Name is the domain, e.g. "multi.test". Required.
	Name string `toml:"name" json:"name"`
	// MX are the MX records (several, with different preferences, for
	// fallback tests). Default: none.
	MX []MX `toml:"mx" json:"mx,omitempty"`
	// NullMX answers the RFC 7505 null MX ("0 .") to MX queries.
	// Default: false.
	NullMX bool `toml:"null_mx" json:"null_mx,omitempty"`
	// A are addresses (IPv4 for A, IPv6 for AAAA) of the name itself: with
	// no MX they make an implicit MX. Default: none.
	A []string `toml:"a" json:"a,omitempty"`
	// NXDomain answers NXDOMAIN to every query for the name.
	// Default: false.
	NXDomain bool `toml:"nxdomain" json:"nxdomain,omitempty"`
	// ServFail answers SERVFAIL to every query for the name.
	// Default: false.
	ServFail bool `toml:"servfail" json:"servfail,omitempty"`
	// Delay is waited before answering queries for the name (MX hosts'
	// addresses are not delayed). Default: 0.
	Delay time.Duration `toml:"delay" json:"delay,omitempty"`
	// TTL of the zone's records (and its MX hosts' addresses); 0 means the
	// server's TTL. Default: 0.
	TTL uint32 `toml:"ttl" json:"ttl,omitempty"`
	// ZeroTTL serves TTL 0 (overrides TTL). Default: false.
	ZeroTTL bool `toml:"zero_ttl" json:"zero_ttl,omitempty"`
}

// MX is one MX record of a Zone.
type MX struct {
	// Host is the exchange's name. Required.
	Host string `toml:"host" json:"host"`
	// Pref is the preference (lower is tried first). Default: 0.
	Pref uint16 `toml:"pref" json:"pref"`
	// Addrs, when set, are served as the A/AAAA records of Host.
	// Default: none.
	Addrs []string `toml:"addrs" json:"addrs,omitempty"`
}

// DefaultDNSConfig returns the defaults.
func DefaultDNSConfig() DNSConfig {
	var c DNSConfig
	c.EnsureDefaults()
	return c
}

// EnsureDefaults fills zero fields with their defaults.
func (c *DNSConfig) EnsureDefaults() {
	if c.Listen == "" {
		c.Listen = "127.0.0.1:5353"
	}
	if c.Domains == 0 {
		c.Domains = 100
	}
	if len(c.MX) == 0 {
		c.MX = []string{"127.0.0.2"}
	}
	if c.MXPerDomain == 0 {
		c.MXPerDomain = 1
	}
	if c.Extra == nil {
		c.Extra = []string{"sender.test"}
	}
	if c.TTL == 0 {
		c.TTL = 300
	}
}

// Validate reports every problem at once.
func (c DNSConfig) Validate() error {
	var errs []error
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		errs = append(errs, fmt.Errorf("dns.listen: %q: %v", c.Listen, err))
	}
	if c.Domains < 0 {
		errs = append(errs, errors.New("dns.domains: must be >= 0"))
	}
	if len(c.MX) == 0 && (c.Domains > 0 || len(c.Extra) > 0) {
		errs = append(errs, errors.New("dns.mx: at least one address is required"))
	}
	for i, a := range c.MX {
		if net.ParseIP(a) == nil {
			errs = append(errs, fmt.Errorf("dns.mx[%d]: %q is not an IP address", i, a))
		}
	}
	if c.MXPerDomain < 1 {
		errs = append(errs, errors.New("dns.mx_per_domain: must be >= 1"))
	}
	for i, d := range c.Extra {
		if _, ok := dns.IsDomainName(d); !ok || d == "" {
			errs = append(errs, fmt.Errorf("dns.extra[%d]: %q is not a domain name", i, d))
		}
	}
	for i, z := range c.Zones {
		errs = z.validate(fmt.Sprintf("dns.zone[%d].", i), errs)
	}
	return errors.Join(errs...)
}

func (z *Zone) validate(prefix string, errs []error) []error {
	if _, ok := dns.IsDomainName(z.Name); !ok || z.Name == "" {
		errs = append(errs, fmt.Errorf("%sname: %q is not a domain name", prefix, z.Name))
	}
	if z.NullMX && len(z.MX) > 0 {
		errs = append(errs, fmt.Errorf("%snull_mx: a null MX cannot have other MX records", prefix))
	}
	if z.NXDomain && z.ServFail {
		errs = append(errs, fmt.Errorf("%snxdomain: cannot be combined with servfail", prefix))
	}
	if z.Delay < 0 {
		errs = append(errs, fmt.Errorf("%sdelay: must be >= 0", prefix))
	}
	for i, a := range z.A {
		if net.ParseIP(a) == nil {
			errs = append(errs, fmt.Errorf("%sa[%d]: %q is not an IP address", prefix, i, a))
		}
	}
	for i, mx := range z.MX {
		if _, ok := dns.IsDomainName(mx.Host); !ok || mx.Host == "" {
			errs = append(errs, fmt.Errorf("%smx[%d].host: %q is not a domain name", prefix, i, mx.Host))
		}
		for j, a := range mx.Addrs {
			if net.ParseIP(a) == nil {
				errs = append(errs, fmt.Errorf("%smx[%d].addrs[%d]: %q is not an IP address", prefix, i, j, a))
			}
		}
	}
	return errs
}

// DNSStats counts the queries a DNS server answered.
type DNSStats struct {
	Queries uint64 `json:"queries"`
	UDP     uint64 `json:"udp"`
	TCP     uint64 `json:"tcp"`
	// By question type.
	MX    uint64 `json:"mx"`
	A     uint64 `json:"a"`
	AAAA  uint64 `json:"aaaa"`
	Other uint64 `json:"other"`
	// By answer code.
	NoError  uint64 `json:"noerror"`
	NXDomain uint64 `json:"nxdomain"`
	ServFail uint64 `json:"servfail"`
	FormErr  uint64 `json:"formerr"`
}

// DNS is an authoritative DNS server (UDP and TCP) for test domains: the
// generated d0001.test… whose MX hosts point at sink addresses, plus
// explicit zones that can be changed while it runs (SetZone, SetHost,
// RemoveZone).
//
// Every name is matched exactly; an unknown name is NXDOMAIN and a known
// name without records of the asked type is NODATA, both with an SOA for
// the name's top-level domain. Answers are authoritative and truncated to
// the client's UDP size. Methods are safe for concurrent use; each query is
// served on its own goroutine (miekg/dns), so a delayed zone does not hold
// up others. Close waits for queries under way (delays end at Close).
type DNS struct {
	cfg     DNSConfig
	log     *slog.Logger
	mu      sync.RWMutex
	names   map[string]*dnsNode
	pc      net.PacketConn
	ln      net.Listener
	udp     *dns.Server
	tcp     *dns.Server
	closing chan struct{}
	closed  atomic.Bool
	wg      sync.WaitGroup

	queries, udpQ, tcpQ, qMX, qA, qAAAA, qOther atomic.Uint64
	noErr, nx, servFail, formErr                atomic.Uint64
}

type dnsNode struct {
	mx       []dns.MX
	nullMX   bool
	a, aaaa  []net.IP
	nx       bool
	servFail bool
	delay    time.Duration
	ttl      uint32
}

// NewDNS validates cfg (after EnsureDefaults), builds the zones, listens
// and starts serving. Close releases everything.
func NewDNS(cfg DNSConfig) (*DNS, error) {
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	d := &DNS{cfg: cfg, log: cfg.Logger, names: map[string]*dnsNode{}, closing: make(chan struct{})}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	gen := make([]string, 0, cfg.Domains+len(cfg.Extra))
	for i := 1; i <= cfg.Domains; i++ {
		gen = append(gen, TestDomain(i))
	}
	gen = append(gen, cfg.Extra...)
	for i, name := range gen {
		z := Zone{Name: name}
		for k := 0; k < cfg.MXPerDomain; k++ {
			z.MX = append(z.MX, MX{
				Host:  fmt.Sprintf("mx%d.%s", k+1, name),
				Pref:  uint16(10 * (k + 1)),
				Addrs: []string{cfg.MX[(i+k)%len(cfg.MX)]},
			})
		}
		d.install(z)
	}
	for _, z := range cfg.Zones {
		d.install(z)
	}
	if err := d.listen(); err != nil {
		return nil, err
	}
	d.udp = &dns.Server{PacketConn: d.pc, Handler: d}
	d.tcp = &dns.Server{Listener: d.ln, Handler: d, ReadTimeout: 10 * time.Second}
	for _, srv := range []*dns.Server{d.udp, d.tcp} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			if err := srv.ActivateAndServe(); err != nil && !d.closed.Load() {
				d.log.Error("dns serve", "err", err)
			}
		}()
		<-started
	}
	return d, nil
}

// listen opens UDP and TCP on the same port.
func (d *DNS) listen() error {
	host, port, _ := net.SplitHostPort(d.cfg.Listen)
	var lastErr error
	for try := 0; try < 20; try++ {
		pc, err := net.ListenPacket("udp", d.cfg.Listen)
		if err != nil {
			return fmt.Errorf("bench: dns listen udp %s: %w", d.cfg.Listen, err)
		}
		addr := d.cfg.Listen
		if port == "0" {
			_, p, _ := net.SplitHostPort(pc.LocalAddr().String())
			addr = net.JoinHostPort(host, p)
		}
		ln, err := net.Listen("tcp", addr)
		if err == nil {
			d.pc, d.ln = pc, ln
			return nil
		}
		_ = pc.Close()
		lastErr = err
		if port != "0" {
			break
		}
	}
	return fmt.Errorf("bench: dns listen tcp %s: %w", d.cfg.Listen, lastErr)
}

// Addr returns the address served on (UDP and TCP).
func (d *DNS) Addr() string { return d.pc.LocalAddr().String() }

// Close stops serving and waits for queries under way.
func (d *DNS) Close() error {
	if d.closed.Swap(true) {
		return nil
	}
	close(d.closing)
	_ = d.udp.Shutdown()
	_ = d.tcp.Shutdown()
	d.wg.Wait()
	return nil
}

// SetZone validates z and installs it, replacing what was served for its
// name (and adding its MX hosts' addresses).
func (d *DNS) SetZone(z Zone) error {
	if err := errors.Join(z.validate("zone.", nil)...); err != nil {
		return err
	}
	d.install(z)
	return nil
}

// RemoveZone stops serving name (it becomes NXDOMAIN). Host addresses added
// for its MX hosts stay.
func (d *DNS) RemoveZone(name string) {
	d.mu.Lock()
	delete(d.names, fqdn(name))
	d.mu.Unlock()
}

// SetHost serves addrs (IPv4 as A, IPv6 as AAAA) for name with ttl (0: the
// server's TTL), replacing its previous addresses.
func (d *DNS) SetHost(name string, ttl uint32, addrs ...string) error {
	var ips []net.IP
	for _, a := range addrs {
		ip := net.ParseIP(a)
		if ip == nil {
			return fmt.Errorf("bench: dns host %s: %q is not an IP address", name, a)
		}
		ips = append(ips, ip)
	}
	if ttl == 0 {
		ttl = d.cfg.TTL
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	n := d.node(fqdn(name), ttl)
	n.a, n.aaaa = nil, nil
	for _, ip := range ips {
		if ip.To4() != nil {
			n.a = append(n.a, ip.To4())
		} else {
			n.aaaa = append(n.aaaa, ip)
		}
	}
	return nil
}

func fqdn(name string) string { return dns.Fqdn(strings.ToLower(name)) }

// node returns the node for name, creating it; d.mu must be held.
func (d *DNS) node(name string, ttl uint32) *dnsNode {
	n := d.names[name]
	if n == nil {
		n = &dnsNode{ttl: ttl}
		d.names[name] = n
	}
	return n
}

// install puts z in place (z is valid).
func (d *DNS) install(z Zone) {
	ttl := z.TTL
	if ttl == 0 {
		ttl = d.cfg.TTL
	}
	if z.ZeroTTL {
		ttl = 0
	}
	n := &dnsNode{nullMX: z.NullMX, nx: z.NXDomain, servFail: z.ServFail, delay: z.Delay, ttl: ttl}
	for _, mx := range z.MX {
		n.mx = append(n.mx, dns.MX{Preference: mx.Pref, Mx: fqdn(mx.Host)})
	}
	for _, a := range z.A {
		if ip := net.ParseIP(a); ip.To4() != nil {
			n.a = append(n.a, ip.To4())
		} else {
			n.aaaa = append(n.aaaa, ip)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.names[fqdn(z.Name)] = n
	for _, mx := range z.MX {
		if len(mx.Addrs) == 0 {
			continue
		}
		h := &dnsNode{ttl: ttl}
		for _, a := range mx.Addrs {
			if ip := net.ParseIP(a); ip.To4() != nil {
				h.a = append(h.a, ip.To4())
			} else {
				h.aaaa = append(h.aaaa, ip)
			}
		}
		d.names[fqdn(mx.Host)] = h
	}
}

// Stats returns the query counters.
func (d *DNS) Stats() DNSStats {
	return DNSStats{
		Queries: d.queries.Load(), UDP: d.udpQ.Load(), TCP: d.tcpQ.Load(),
		MX: d.qMX.Load(), A: d.qA.Load(), AAAA: d.qAAAA.Load(), Other: d.qOther.Load(),
		NoError: d.noErr.Load(), NXDomain: d.nx.Load(), ServFail: d.servFail.Load(), FormErr: d.formErr.Load(),
	}
}

// soa returns the SOA for negative answers about name.
func (d *DNS) soa(name string, ttl uint32) dns.RR {
	labels := dns.SplitDomainName(name)
	apex := "."
	if len(labels) > 0 {
		apex = labels[len(labels)-1] + "."
	}
	return &dns.SOA{
		Hdr:     dns.RR_Header{Name: apex, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: ttl},
		Ns:      "ns." + strings.TrimPrefix(apex, "."),
		Mbox:    "hostmaster." + strings.TrimPrefix(apex, "."),
		Serial:  1,
		Refresh: 3600, Retry: 600, Expire: 86400, Minttl: ttl,
	}
}

// ServeDNS implements dns.Handler.
func (d *DNS) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	d.queries.Add(1)
	if _, ok := w.LocalAddr().(*net.TCPAddr); ok {
		d.tcpQ.Add(1)
	} else {
		d.udpQ.Add(1)
	}
	m := new(dns.Msg)
	if len(r.Question) != 1 || r.Opcode != dns.OpcodeQuery {
		d.formErr.Add(1)
		m.SetRcode(r, dns.RcodeFormatError)
		_ = w.WriteMsg(m)
		return
	}
	m.SetReply(r)
	m.Authoritative = true
	q := r.Question[0]
	switch q.Qtype {
	case dns.TypeMX:
		d.qMX.Add(1)
	case dns.TypeA:
		d.qA.Add(1)
	case dns.TypeAAAA:
		d.qAAAA.Add(1)
	default:
		d.qOther.Add(1)
	}
	name := strings.ToLower(q.Name)
	d.mu.RLock()
	n := d.names[name]
	var nc dnsNode
	if n != nil {
		nc = *n
	}
	d.mu.RUnlock()
	if n != nil && nc.delay > 0 {
		t := time.NewTimer(nc.delay)
		select {
		case <-t.C:
		case <-d.closing:
			t.Stop()
			return
		}
	}
	switch {
	case n == nil || nc.nx:
		m.Rcode = dns.RcodeNameError
		m.Ns = append(m.Ns, d.soa(name, d.cfg.TTL))
		d.nx.Add(1)
	case nc.servFail:
		m.Rcode = dns.RcodeServerFailure
		m.Authoritative = false
		d.servFail.Add(1)
	default:
		hdr := func(t uint16) dns.RR_Header {
			return dns.RR_Header{Name: q.Name, Rrtype: t, Class: dns.ClassINET, Ttl: nc.ttl}
		}
		if q.Qtype == dns.TypeMX || q.Qtype == dns.TypeANY {
			if nc.nullMX {
				m.Answer = append(m.Answer, &dns.MX{Hdr: hdr(dns.TypeMX), Preference: 0, Mx: "."})
			}
			d.mu.RLock()
			for _, mx := range nc.mx {
				m.Answer = append(m.Answer, &dns.MX{Hdr: hdr(dns.TypeMX), Preference: mx.Preference, Mx: mx.Mx})
				if h := d.names[mx.Mx]; h != nil {
					for _, ip := range h.a {
						m.Extra = append(m.Extra, &dns.A{Hdr: dns.RR_Header{Name: mx.Mx, Rrtype: dns.TypeA,
							Class: dns.ClassINET, Ttl: h.ttl}, A: ip})
					}
					for _, ip := range h.aaaa {
						m.Extra = append(m.Extra, &dns.AAAA{Hdr: dns.RR_Header{Name: mx.Mx, Rrtype: dns.TypeAAAA,
							Class: dns.ClassINET, Ttl: h.ttl}, AAAA: ip})
					}
				}
			}
			d.mu.RUnlock()
		}
		if q.Qtype == dns.TypeA || q.Qtype == dns.TypeANY {
			for _, ip := range nc.a {
				m.Answer = append(m.Answer, &dns.A{Hdr: hdr(dns.TypeA), A: ip})
			}
		}
		if q.Qtype == dns.TypeAAAA || q.Qtype == dns.TypeANY {
			for _, ip := range nc.aaaa {
				m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr(dns.TypeAAAA), AAAA: ip})
			}
		}
		if len(m.Answer) == 0 {
			m.Ns = append(m.Ns, d.soa(name, nc.ttl))
		}
		d.noErr.Add(1)
	}
	if _, ok := w.LocalAddr().(*net.UDPAddr); ok {
		size := dns.MinMsgSize
		if o := r.IsEdns0(); o != nil {
			size = max(int(o.UDPSize()), dns.MinMsgSize)
		}
		m.Truncate(size)
	}
	if err := w.WriteMsg(m); err != nil {
		d.log.Debug("dns write", "err", err)
	}
}

// Collector returns a Prometheus collector for the query counters (names
// hermod_bench_dns_*).
func (d *DNS) Collector() prometheus.Collector { return dnsCollector{d} }

type dnsCollector struct{ d *DNS }

var (
	dnsQueriesDesc = prometheus.NewDesc("hermod_bench_dns_queries_total", "DNS queries answered, by type.",
		[]string{"qtype"}, nil)
	dnsRcodeDesc = prometheus.NewDesc("hermod_bench_dns_answers_total", "DNS answers, by response code.",
		[]string{"rcode"}, nil)
)

func (c dnsCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- dnsQueriesDesc
	ch <- dnsRcodeDesc
}

func (c dnsCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.d.Stats()
	for _, v := range []struct {
		l string
		n uint64
	}{{"mx", s.MX}, {"a", s.A}, {"aaaa", s.AAAA}, {"other", s.Other}} {
		ch <- prometheus.MustNewConstMetric(dnsQueriesDesc, prometheus.CounterValue, float64(v.n), v.l)
	}
	for _, v := range []struct {
		l string
		n uint64
	}{{"noerror", s.NoError}, {"nxdomain", s.NXDomain}, {"servfail", s.ServFail}, {"formerr", s.FormErr}} {
		ch <- prometheus.MustNewConstMetric(dnsRcodeDesc, prometheus.CounterValue, float64(v.n), v.l)
	}
}

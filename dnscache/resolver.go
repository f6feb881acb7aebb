package dnscache

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// result is the outcome of one upstream lookup: an answer to cache (positive
// or negative) with its unclamped TTL, or a temporary error.
type result struct {
	ans *answer
	ttl time.Duration
	err *Error
}

// queryMX looks up the MX records of name.
func (c *Cache) queryMX(name string) result {
	resp, srv, err := c.exchange(name, dns.TypeMX)
	if err != nil {
		return result{err: err}
	}
	rrs, ttl, nerr := answerRRs(resp, name, dns.TypeMX, srv)
	if nerr != nil {
		if nerr.Permanent() {
			return result{ans: &answer{err: nerr}, ttl: ttl}
		}
		return result{err: nerr}
	}
	mx := make([]MX, 0, len(rrs))
	var null *MX
	for _, rr := range rrs {
		m, ok := rr.(*dns.MX)
		if !ok {
			continue
		}
		if m.Mx == "." {
			null = &MX{Host: ".", Pref: m.Preference}
			continue
		}
		host, ok := canonical(m.Mx)
		if !ok {
			host = strings.TrimSuffix(m.Mx, ".")
		}
		mx = append(mx, MX{Host: host, Pref: m.Preference})
	}
	switch {
	case len(mx) == 0 && null != nil:
		return result{ans: &answer{mx: []MX{*null}, null: true}, ttl: ttl}
	case len(mx) == 0:
		return result{err: &Error{Kind: KindBadResponse, Name: name, Type: "MX", Server: srv, Err: errors.New("MX records could not be parsed")}}
	}
	// A null MX next to real ones breaks RFC 7505; the real ones are
	// the only ones that can take mail, so they win.
	slices.SortFunc(mx, func(a, b MX) int {
		return cmp.Or(cmp.Compare(a.Pref, b.Pref), strings.Compare(a.Host, b.Host))
	})
	mx = slices.Clip(slices.Compact(mx))
	return result{ans: &answer{mx: mx}, ttl: ttl}
}

// addrPart is the outcome of one of the two queries of queryIP.
type addrPart struct {
	addrs []netip.Addr
	ttl   time.Duration
	neg   *Error // NXDOMAIN or NODATA
	err   *Error // temporary failure
}

// queryIP looks up A and AAAA of name concurrently and merges them.
func (c *Cache) queryIP(name string) result {
	var v6 addrPart
	done := make(chan struct{})
	go func() {
		defer close(done)
		v6 = c.queryAddr(name, dns.TypeAAAA)
	}()
	v4 := c.queryAddr(name, dns.TypeA)
	<-done

	switch {
	case len(v4.addrs)+len(v6.addrs) > 0:
		addrs := make([]netip.Addr, 0, len(v4.addrs)+len(v6.addrs))
		addrs = append(append(addrs, v4.addrs...), v6.addrs...)
		ttl := min(v4.ttl, v6.ttl)
		if v4.err != nil || v6.err != nil {
			// One family is unknown: keep what we have only briefly.
			ttl = 0
		}
		return result{ans: &answer{addrs: addrs}, ttl: ttl}
	case v4.err != nil:
		return result{err: v4.err}
	case v6.err != nil:
		return result{err: v6.err}
	}
	e := &Error{Kind: KindNoData, Name: name, Type: "A/AAAA", Server: v4.neg.Server}
	if v4.neg.Kind == KindNXDomain || v6.neg.Kind == KindNXDomain {
		e.Kind = KindNXDomain
	}
	return result{ans: &answer{err: e}, ttl: min(v4.ttl, v6.ttl)}
}

// queryAddr looks up the A or AAAA records of name.
func (c *Cache) queryAddr(name string, qtype uint16) addrPart {
	resp, srv, err := c.exchange(name, qtype)
	if err != nil {
		return addrPart{err: err}
	}
	rrs, ttl, nerr := answerRRs(resp, name, qtype, srv)
	if nerr != nil {
		if nerr.Permanent() {
			return addrPart{neg: nerr, ttl: ttl}
		}
		return addrPart{err: nerr}
	}
	addrs := make([]netip.Addr, 0, len(rrs))
	for _, rr := range rrs {
		var a netip.Addr
		ok := false
		switch v := rr.(type) {
		case *dns.A:
			a, ok = netip.AddrFromSlice(v.A.To4())
		case *dns.AAAA:
			a, ok = netip.AddrFromSlice(v.AAAA.To16())
		}
		if ok && !slices.Contains(addrs, a) {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		return addrPart{err: &Error{Kind: KindBadResponse, Name: name, Type: dns.TypeToString[qtype], Server: srv, Err: errors.New("address records could not be parsed")}}
	}
	return addrPart{addrs: addrs, ttl: ttl}
}

// answerRRs returns the records of type qtype for name in resp, following
// the CNAME chain the resolver included, and the smallest TTL of the
// records used. For NXDOMAIN and NODATA it returns a permanent *Error and
// the negative TTL of RFC 2308; for a CNAME chain that is too long, a
// temporary one.
func answerRRs(resp *dns.Msg, name string, qtype uint16, srv string) ([]dns.RR, time.Duration, *Error) {
	typ := dns.TypeToString[qtype]
	if resp.Rcode == dns.RcodeNameError {
		return nil, negativeTTL(resp), &Error{Kind: KindNXDomain, Name: name, Type: typ, Server: srv}
	}
	target := resp.Question[0].Name
	ttl := uint32(math.MaxUint32)
	for hops := 0; ; hops++ {
		next := ""
		for _, rr := range resp.Answer {
			h := rr.Header()
			if h.Rrtype == dns.TypeCNAME && h.Class == dns.ClassINET && strings.EqualFold(h.Name, target) {
				if cn, ok := rr.(*dns.CNAME); ok {
					next, ttl = cn.Target, min(ttl, h.Ttl)
					break
				}
			}
		}
		if next == "" {
			break
		}
		if hops == maxCNAMEHops {
			return nil, 0, &Error{Kind: KindBadResponse, Name: name, Type: typ, Server: srv, Err: errors.New("CNAME chain too long")}
		}
		target = next
	}
	var rrs []dns.RR
	for _, rr := range resp.Answer {
		h := rr.Header()
		if h.Rrtype == qtype && h.Class == dns.ClassINET && strings.EqualFold(h.Name, target) {
			rrs = append(rrs, rr)
			ttl = min(ttl, h.Ttl)
		}
	}
	if len(rrs) == 0 {
		return nil, negativeTTL(resp), &Error{Kind: KindNoData, Name: name, Type: typ, Server: srv}
	}
	return rrs, time.Duration(ttl) * time.Second, nil
}

// negativeTTL is the TTL of a negative answer (RFC 2308 §5): the smaller of
// the SOA record's TTL and its MINIMUM field; 0 without an SOA.
func negativeTTL(resp *dns.Msg) time.Duration {
	for _, rr := range resp.Ns {
		if soa, ok := rr.(*dns.SOA); ok {
			return time.Duration(min(soa.Hdr.Ttl, soa.Minttl)) * time.Second
		}
	}
	return 0
}

// exchange sends the question (name, qtype) to the resolvers until one
// gives a usable reply (NOERROR or NXDOMAIN): Attempts rounds, each over
// every resolver not being held down (all of them if all are), starting at
// a rotating position. It returns the reply and the resolver that gave it,
// or the last failure.
func (c *Cache) exchange(name string, qtype uint16) (*dns.Msg, string, *Error) {
	fqdn := name + "."
	n := uint32(len(c.resolvers))
	start := (c.next.Add(1) - 1) % n
	var last *Error
	for round := 0; round < c.cfg.Attempts; round++ {
		tried := false
		for pass := 0; pass < 2 && !tried; pass++ {
			for i := range n {
				r := c.resolvers[(start+i)%n]
				if pass == 0 && c.now().UnixNano() < r.downUntil.Load() {
					continue
				}
				tried = true
				resp, err := c.ask(r, fqdn, name, qtype)
				if err == nil {
					return resp, r.addr, nil
				}
				last = err
				if err.Kind == KindCanceled {
					return nil, "", err
				}
			}
		}
	}
	return nil, "", last
}

// ask sends one question to one resolver, over UDP and then, if the reply
// is truncated, over TCP. It checks the reply and marks the resolver down
// when it is unreachable, slow or refuses.
func (c *Cache) ask(r *resolver, fqdn, name string, qtype uint16) (*dns.Msg, *Error) {
	m := new(dns.Msg)
	m.SetQuestion(fqdn, qtype)
	m.SetEdns0(ednsSize, false)
	resp, kind, err := c.try(c.udp, r.addr, m)
	if err == nil && resp.Truncated {
		m.Id = dns.Id()
		resp, kind, err = c.try(c.tcp, r.addr, m)
	}
	fail := func(kind Kind, cause error) *Error {
		e := &Error{Kind: kind, Name: name, Type: dns.TypeToString[qtype], Server: r.addr, Err: cause}
		if kind == KindTimeout || kind == KindNetwork || kind == KindRefused {
			c.markDown(r, e)
		}
		return e
	}
	if err != nil {
		if kind == KindCanceled {
			return nil, &Error{Kind: KindCanceled, Name: name, Type: dns.TypeToString[qtype], Err: ErrClosed}
		}
		return nil, fail(kind, err)
	}
	if !resp.Response || resp.Opcode != dns.OpcodeQuery || len(resp.Question) != 1 ||
		resp.Question[0].Qtype != qtype || resp.Question[0].Qclass != dns.ClassINET ||
		!strings.EqualFold(resp.Question[0].Name, fqdn) {
		return nil, fail(KindBadResponse, errors.New("reply does not match the question"))
	}
	switch resp.Rcode {
	case dns.RcodeSuccess, dns.RcodeNameError:
		if r.downUntil.Load() != 0 {
			r.downUntil.Store(0)
		}
		return resp, nil
	case dns.RcodeServerFailure:
		return nil, fail(KindServFail, nil)
	case dns.RcodeRefused:
		return nil, fail(KindRefused, nil)
	}
	return nil, fail(KindBadResponse, fmt.Errorf("rcode %s", dns.RcodeToString[resp.Rcode]))
}

// try is one exchange with one resolver, bounded by Timeout and by Close.
func (c *Cache) try(cl *dns.Client, addr string, m *dns.Msg) (*dns.Msg, Kind, error) {
	ctx, cancel := context.WithTimeout(c.ctx, c.cfg.Timeout)
	defer cancel()
	co, err := cl.DialContext(ctx, addr)
	if err == nil {
		// miekg/dns honours only the context's deadline; closing the
		// connection makes Close interrupt a pending read too.
		stop := context.AfterFunc(ctx, func() { co.Close() })
		var resp *dns.Msg
		resp, _, err = cl.ExchangeWithConnContext(ctx, m, co)
		stop()
		co.Close()
		if err == nil {
			return resp, 0, nil
		}
	}
	var ne net.Error
	switch {
	case c.ctx.Err() != nil:
		return nil, KindCanceled, err
	case ctx.Err() != nil || errors.As(err, &ne) && ne.Timeout():
		return nil, KindTimeout, err
	}
	return nil, KindNetwork, err
}

// markDown makes exchange skip r for ResolverHoldDown.
func (c *Cache) markDown(r *resolver, e *Error) {
	now := c.now().UnixNano()
	if prev := r.downUntil.Swap(now + int64(c.cfg.ResolverHoldDown)); prev <= now {
		c.log.Warn("dns: resolver failing, skipping it", "resolver", r.addr,
			"kind", e.Kind.String(), "err", e, "hold_down", c.cfg.ResolverHoldDown)
	}
}

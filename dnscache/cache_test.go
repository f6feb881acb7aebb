package dnscache

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/internal/smtperr"
	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

func newCache(t testing.TB, s *testServer, clk *fakeClock, mod func(*Config)) *Cache {
	t.Helper()
	cfg := Config{
		Resolvers: []string{s.addr},
		Timeout:   time.Second,
		Attempts:  1,
		Now:       clk.Now,
	}
	if mod != nil {
		mod(&cfg)
	}
	c, err := New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func hostNames(hs []Host) []string {
	var out []string
	for _, h := range hs {
		out = append(out, h.Name)
	}
	return out
}

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func wantKind(t *testing.T, err error, kind Kind, permanent bool) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not a *dnscache.Error", err, err)
	}
	if e.Kind != kind {
		t.Fatalf("kind = %v, want %v (err: %v)", e.Kind, kind, err)
	}
	if e.Permanent() != permanent || IsPermanent(err) != permanent {
		t.Fatalf("Permanent() = %v, want %v (err: %v)", e.Permanent(), permanent, err)
	}
	return e
}

func TestResolveMXOrderAndShuffle(t *testing.T) {
	s := newTestServer(t)
	s.add(
		"shuf.test. 300 IN MX 10 A.shuf.test.",
		"shuf.test. 300 IN MX 10 b.shuf.test.",
		"shuf.test. 300 IN MX 10 c.shuf.test.",
		"shuf.test. 300 IN MX 20 d.shuf.test.",
		"shuf.test. 300 IN MX 5 e.shuf.test.",
	)
	for _, h := range []string{"a", "b", "c", "d", "e"} {
		s.add(fmt.Sprintf("%s.shuf.test. 300 IN A 192.0.2.%d", h, h[0]))
	}
	c := newCache(t, s, newFakeClock(), nil)
	ctx := context.Background()

	orders := map[string]bool{}
	for i := 0; i < 200; i++ {
		r, err := c.Resolve(ctx, "Shuf.Test.")
		if err != nil {
			t.Fatal(err)
		}
		if r.Domain != "shuf.test" || r.Implicit || r.NullMX {
			t.Fatalf("route = %+v", r)
		}
		names := hostNames(r.Hosts)
		if len(names) != 5 || names[0] != "e.shuf.test" || names[4] != "d.shuf.test" {
			t.Fatalf("hosts = %v, want e first and d last", names)
		}
		mid := slices.Clone(names[1:4])
		slices.Sort(mid)
		if !slices.Equal(mid, []string{"a.shuf.test", "b.shuf.test", "c.shuf.test"}) {
			t.Fatalf("hosts = %v", names)
		}
		orders[strings.Join(names[1:4], ",")] = true
		for _, h := range r.Hosts {
			if len(h.Addrs) != 1 || h.Err != nil {
				t.Fatalf("host %+v", h)
			}
		}
		if r.Hosts[0].Pref != 5 || r.Hosts[4].Pref != 20 {
			t.Fatalf("prefs %+v", r.Hosts)
		}
	}
	if len(orders) < 2 {
		t.Fatalf("equal preferences never shuffled: %v", orders)
	}
	// The cached slice keeps its sorted order.
	e := c.lookupEntry(key{"shuf.test", dns.TypeMX})
	want := []MX{{"e.shuf.test", 5}, {"a.shuf.test", 10}, {"b.shuf.test", 10}, {"c.shuf.test", 10}, {"d.shuf.test", 20}}
	if got := e.ans.Load().mx; !slices.Equal(got, want) {
		t.Fatalf("cached MX = %v, want %v", got, want)
	}
	mx, err := c.LookupMX(ctx, "shuf.test")
	if err != nil || len(mx) != 5 || mx[0] != want[0] || mx[4] != want[4] {
		t.Fatalf("LookupMX = %v, %v", mx, err)
	}
	if n := s.count("shuf.test", dns.TypeMX); n != 1 {
		t.Fatalf("%d MX queries, want 1", n)
	}
	if n := s.count("a.shuf.test", dns.TypeA); n != 1 {
		t.Fatalf("%d A queries, want 1", n)
	}
}

func TestMaxHosts(t *testing.T) {
	s := newTestServer(t)
	for i := 0; i < 6; i++ {
		s.add(fmt.Sprintf("many.test. 300 IN MX %d mx%d.many.test.", i, i),
			fmt.Sprintf("mx%d.many.test. 300 IN A 192.0.2.%d", i, i))
	}
	c := newCache(t, s, newFakeClock(), func(c *Config) { c.MaxHosts = 3 })
	r, err := c.Resolve(context.Background(), "many.test")
	if err != nil {
		t.Fatal(err)
	}
	if got := hostNames(r.Hosts); !slices.Equal(got, []string{"mx0.many.test", "mx1.many.test", "mx2.many.test"}) {
		t.Fatalf("hosts = %v", got)
	}
	if n := s.count("mx5.many.test", dns.TypeA); n != 0 {
		t.Fatalf("host beyond MaxHosts was resolved")
	}
}

func TestImplicitMX(t *testing.T) {
	s := newTestServer(t)
	s.add("implicit.test. 300 IN A 192.0.2.1", "implicit.test. 300 IN AAAA 2001:db8::1")
	c := newCache(t, s, newFakeClock(), nil)
	r, err := c.Resolve(context.Background(), "implicit.test")
	if err != nil {
		t.Fatal(err)
	}
	if !r.Implicit || r.NullMX || len(r.Hosts) != 1 || r.Hosts[0].Name != "implicit.test" || r.Hosts[0].Pref != 0 {
		t.Fatalf("route = %+v", r)
	}
	if got, want := r.Hosts[0].Addrs, addrs("192.0.2.1", "2001:db8::1"); !slices.Equal(got, want) {
		t.Fatalf("addrs = %v, want %v", got, want)
	}
	_, err = c.LookupMX(context.Background(), "implicit.test")
	wantKind(t, err, KindNoData, true)

	// No MX and no address: permanent.
	s.add("nomail.test. 300 IN TXT \"hello\"")
	_, err = c.Resolve(context.Background(), "nomail.test")
	wantKind(t, err, KindNoAddress, true)
	if !errors.Is(err, ErrNoData) {
		t.Fatalf("%v does not wrap the host's NODATA", err)
	}
}

func TestNullMX(t *testing.T) {
	s := newTestServer(t)
	s.add("null.test. 300 IN MX 0 .", "null.test. 300 IN A 192.0.2.1")
	c := newCache(t, s, newFakeClock(), nil)
	r, err := c.Resolve(context.Background(), "null.test")
	if err != nil {
		t.Fatal(err)
	}
	if !r.NullMX || r.Implicit || len(r.Hosts) != 0 {
		t.Fatalf("route = %+v", r)
	}
	if n := s.count("null.test", dns.TypeA); n != 0 {
		t.Fatalf("null MX domain's address was looked up")
	}
	mx, err := c.LookupMX(context.Background(), "null.test")
	if err != nil || !slices.Equal(mx, []MX{{".", 0}}) {
		t.Fatalf("LookupMX = %v, %v", mx, err)
	}

	// A "." among real MX records is ignored.
	s.add("mixed.test. 300 IN MX 0 .", "mixed.test. 300 IN MX 10 mx.mixed.test.", "mx.mixed.test. 300 IN A 192.0.2.2")
	r, err = c.Resolve(context.Background(), "mixed.test")
	if err != nil || r.NullMX || !slices.Equal(hostNames(r.Hosts), []string{"mx.mixed.test"}) {
		t.Fatalf("route = %+v, %v", r, err)
	}
}

func TestNXDomain(t *testing.T) {
	s := newTestServer(t)
	c := newCache(t, s, newFakeClock(), nil)
	ctx := context.Background()

	_, err := c.Resolve(ctx, "nowhere.test")
	e := wantKind(t, err, KindNXDomain, true)
	if !errors.Is(err, ErrNXDomain) || e.Name != "nowhere.test" || e.Server != s.addr {
		t.Fatalf("err = %#v", e)
	}
	if r := smtperr.Classify(err); r.Code != 550 || r.Enhanced != "5.1.2" {
		t.Fatalf("SMTP reply %v", r)
	}
	_, err = c.LookupMX(ctx, "nowhere.test")
	wantKind(t, err, KindNXDomain, true)
	_, err = c.LookupIP(ctx, "nowhere.test")
	wantKind(t, err, KindNXDomain, true)
	if n := s.count("nowhere.test", dns.TypeMX); n != 1 {
		t.Fatalf("%d MX queries, want 1 (negative answer cached)", n)
	}
	if m := c.Metrics(); m.Errors[KindNXDomain] != 2 || m.Hits != 1 || m.Misses != 2 {
		t.Fatalf("metrics %+v: want 2 nxdomain (the MX and the A+AAAA lookup), 1 hit, 2 misses", m)
	}
}

func TestNoData(t *testing.T) {
	s := newTestServer(t)
	s.add("v4only.test. 300 IN A 192.0.2.7", "txtonly.test. 300 IN TXT \"x\"")
	c := newCache(t, s, newFakeClock(), nil)
	ctx := context.Background()
	_, err := c.LookupMX(ctx, "v4only.test")
	wantKind(t, err, KindNoData, true)
	if !errors.Is(err, ErrNoData) {
		t.Fatal("not ErrNoData")
	}
	ips, err := c.LookupIP(ctx, "v4only.test")
	if err != nil || !slices.Equal(ips, addrs("192.0.2.7")) {
		t.Fatalf("LookupIP = %v, %v", ips, err)
	}
	_, err = c.LookupIP(ctx, "txtonly.test")
	wantKind(t, err, KindNoData, true)
}

func TestCNAMEChase(t *testing.T) {
	s := newTestServer(t)
	s.add(
		"cn.test. 300 IN MX 10 alias.cn.test.",
		"alias.cn.test. 100 IN CNAME mid.cn.test.",
		"mid.cn.test. 300 IN CNAME real.cn.test.",
		"real.cn.test. 300 IN A 192.0.2.9",
		"loop1.test. 300 IN CNAME loop2.test.",
		"loop2.test. 300 IN CNAME loop1.test.",
	)
	clk := newFakeClock()
	c := newCache(t, s, clk, nil)
	r, err := c.Resolve(context.Background(), "cn.test")
	if err != nil {
		t.Fatal(err)
	}
	if got := r.Hosts[0].Addrs; !slices.Equal(got, addrs("192.0.2.9")) {
		t.Fatalf("addrs = %v", got)
	}
	// The chain's smallest TTL (100 s) rules.
	clk.Advance(99 * time.Second)
	c.LookupIP(context.Background(), "alias.cn.test")
	clk.Advance(2 * time.Second)
	c.LookupIP(context.Background(), "alias.cn.test")
	if n := s.count("alias.cn.test", dns.TypeA); n != 2 {
		t.Fatalf("%d A queries, want 2", n)
	}
	_, err = c.LookupIP(context.Background(), "loop1.test")
	wantKind(t, err, KindBadResponse, false)
}

func TestTTLExpiry(t *testing.T) {
	s := newTestServer(t)
	s.add("ttl.test. 60 IN MX 10 mx.ttl.test.")
	clk := newFakeClock()
	c := newCache(t, s, clk, func(c *Config) { c.PrefetchFraction = -1 })
	ctx := context.Background()
	lookup := func() []MX {
		t.Helper()
		mx, err := c.LookupMX(ctx, "ttl.test")
		if err != nil {
			t.Fatal(err)
		}
		return mx
	}
	lookup()
	clk.Advance(59 * time.Second)
	lookup()
	if n := s.count("ttl.test", dns.TypeMX); n != 1 {
		t.Fatalf("%d queries before expiry, want 1", n)
	}
	s.set("ttl.test", dns.TypeMX, "ttl.test. 60 IN MX 20 mx2.ttl.test.")
	clk.Advance(2 * time.Second)
	if mx := lookup(); mx[0].Host != "mx2.ttl.test" {
		t.Fatalf("after expiry got %v", mx)
	}
	if n := s.count("ttl.test", dns.TypeMX); n != 2 {
		t.Fatalf("%d queries after expiry, want 2", n)
	}
	if m := c.Metrics(); m.Hits != 1 || m.Misses != 2 || m.Lookups != 2 {
		t.Fatalf("metrics %+v", m)
	}
}

func TestTTLClamp(t *testing.T) {
	s := newTestServer(t)
	s.add("short.test. 1 IN A 192.0.2.1", "short.test. 1 IN AAAA 2001:db8::1",
		"long.test. 86400 IN A 192.0.2.2", "long.test. 86400 IN AAAA 2001:db8::2")
	clk := newFakeClock()
	c := newCache(t, s, clk, func(c *Config) {
		c.MinTTL = 10 * time.Second
		c.MaxTTL = time.Minute
		c.PrefetchFraction = -1
	})
	ctx := context.Background()
	for _, step := range []struct {
		advance    time.Duration
		short, lng int // expected A query counts after the lookups
	}{
		{0, 1, 1},
		{9 * time.Second, 1, 1},  // 1 s TTL raised to 10 s
		{2 * time.Second, 2, 1},  // t=11: short expired
		{48 * time.Second, 3, 1}, // t=59
		{2 * time.Second, 3, 2},  // t=61: one day lowered to a minute
	} {
		clk.Advance(step.advance)
		for _, n := range []string{"short.test", "long.test"} {
			if _, err := c.LookupIP(ctx, n); err != nil {
				t.Fatal(err)
			}
		}
		if a, b := s.count("short.test", dns.TypeA), s.count("long.test", dns.TypeA); a != step.short || b != step.lng {
			t.Fatalf("after +%v: queries short=%d long=%d, want %d %d", step.advance, a, b, step.short, step.lng)
		}
	}
}

func TestNegativeCache(t *testing.T) {
	s := newTestServer(t)
	clk := newFakeClock()
	c := newCache(t, s, clk, func(c *Config) { c.PrefetchFraction = -1 })
	ctx := context.Background()
	count := func() int { return s.count("neg.test", dns.TypeMX) }
	lookup := func() {
		t.Helper()
		_, err := c.LookupMX(ctx, "neg.test")
		wantKind(t, err, KindNXDomain, true)
	}

	// TTL = min(SOA TTL 3600, MINIMUM 60) = 60 s.
	lookup()
	clk.Advance(59 * time.Second)
	lookup()
	if count() != 1 {
		t.Fatalf("%d queries, want 1", count())
	}
	clk.Advance(2 * time.Second)
	lookup()
	if count() != 2 {
		t.Fatalf("%d queries, want 2", count())
	}

	// SOA TTL smaller than MINIMUM: the TTL wins.
	s.mu.Lock()
	s.soaTTL, s.soaMin = 30, 3000
	s.mu.Unlock()
	clk.Advance(61 * time.Second)
	lookup() // 3: cached for 30 s
	clk.Advance(29 * time.Second)
	lookup()
	clk.Advance(2 * time.Second)
	lookup() // 4
	if count() != 4 {
		t.Fatalf("%d queries, want 4", count())
	}

	// NegativeTTL caps it.
	c2 := newCache(t, s, clk, func(c *Config) { c.NegativeTTL = 10 * time.Second; c.PrefetchFraction = -1 })
	s.mu.Lock()
	s.soaTTL, s.soaMin = 3600, 3600
	s.mu.Unlock()
	_, err := c2.LookupMX(ctx, "neg2.test") // 1
	wantKind(t, err, KindNXDomain, true)
	clk.Advance(9 * time.Second)
	c2.LookupMX(ctx, "neg2.test")
	clk.Advance(2 * time.Second)
	c2.LookupMX(ctx, "neg2.test") // 2
	if n := s.count("neg2.test", dns.TypeMX); n != 2 {
		t.Fatalf("%d queries, want 2", n)
	}

	// No SOA in the reply: MinTTL.
	s.mu.Lock()
	s.noSOA = true
	s.mu.Unlock()
	c2.LookupMX(ctx, "neg3.test")
	clk.Advance(4 * time.Second)
	c2.LookupMX(ctx, "neg3.test")
	clk.Advance(2 * time.Second)
	c2.LookupMX(ctx, "neg3.test")
	if n := s.count("neg3.test", dns.TypeMX); n != 2 {
		t.Fatalf("%d queries, want 2", n)
	}
}

func TestSingleFlight(t *testing.T) {
	s := newTestServer(t)
	s.add("sf.test. 300 IN MX 10 mx.sf.test.")
	gate := make(chan struct{})
	s.mu.Lock()
	s.gate = gate
	s.mu.Unlock()
	c := newCache(t, s, newFakeClock(), func(c *Config) { c.Timeout = 5 * time.Second })

	const n = 50
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Go(func() {
			mx, err := c.LookupMX(context.Background(), "sf.test")
			if err == nil && (len(mx) != 1 || mx[0].Host != "mx.sf.test") {
				err = fmt.Errorf("got %v", mx)
			}
			errs <- err
		})
	}
	// Every caller has joined the one flight, blocked in the server.
	waitFor(t, "all callers to miss", func() bool { return c.Metrics().Misses == n })
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if q := s.count("sf.test", dns.TypeMX); q != 1 {
		t.Fatalf("%d concurrent lookups sent %d queries, want 1", n, q)
	}
}

func TestCallerContextEnds(t *testing.T) {
	s := newTestServer(t)
	s.add("slow.test. 300 IN MX 10 mx.slow.test.")
	gate := make(chan struct{})
	s.mu.Lock()
	s.gate = gate
	s.mu.Unlock()
	c := newCache(t, s, newFakeClock(), func(c *Config) { c.Timeout = 5 * time.Second })

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := c.LookupMX(ctx, "slow.test")
	e := wantKind(t, err, KindCanceled, false)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("%v does not wrap context.Canceled", e)
	}
	// The query runs on and fills the cache.
	close(gate)
	waitFor(t, "the query to be cached", func() bool { return c.Metrics().Entries == 1 })
	if _, err := c.LookupMX(context.Background(), "slow.test"); err != nil {
		t.Fatal(err)
	}
	if q := s.count("slow.test", dns.TypeMX); q != 1 {
		t.Fatalf("%d queries, want 1", q)
	}
}

func TestPrefetch(t *testing.T) {
	s := newTestServer(t)
	s.add("hot.test. 100 IN MX 10 old.hot.test.", "cold.test. 100 IN MX 10 old.cold.test.")
	clk := newFakeClock()
	c := newCache(t, s, clk, nil) // PrefetchFraction 0.1: the last 10 s
	ctx := context.Background()
	first := func(name string) string {
		t.Helper()
		mx, err := c.LookupMX(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		return mx[0].Host
	}
	first("hot.test")
	first("cold.test")
	s.set("hot.test", dns.TypeMX, "hot.test. 100 IN MX 10 new.hot.test.")
	s.set("cold.test", dns.TypeMX, "cold.test. 100 IN MX 10 new.cold.test.")

	clk.Advance(50 * time.Second)
	first("hot.test") // used, but not late in its life: no prefetch
	if q := s.count("hot.test", dns.TypeMX); q != 1 || c.Metrics().Prefetches != 0 {
		t.Fatalf("prefetched too early (%d queries)", q)
	}
	clk.Advance(45 * time.Second) // t=95: 5 s left
	if h := first("hot.test"); h != "old.hot.test" {
		t.Fatalf("hit served %q", h)
	}
	waitFor(t, "the prefetch", func() bool { return first("hot.test") == "new.hot.test" })
	if m := c.Metrics(); m.Prefetches != 1 || m.Misses != 2 {
		t.Fatalf("metrics %+v: want 1 prefetch, 2 misses", m)
	}
	// Past the original expiry, the hot name is still a hit; the cold one,
	// unused since it was fetched, was not refreshed and misses.
	clk.Advance(10 * time.Second) // t=105
	if h := first("hot.test"); h != "new.hot.test" {
		t.Fatalf("got %q", h)
	}
	if q := s.count("hot.test", dns.TypeMX); q != 2 {
		t.Fatalf("%d queries for the hot name, want 2", q)
	}
	if q := s.count("cold.test", dns.TypeMX); q != 1 {
		t.Fatalf("cold name was prefetched")
	}
	if h := first("cold.test"); h != "new.cold.test" {
		t.Fatalf("got %q", h)
	}
	if m := c.Metrics(); m.Prefetches != 1 || m.Misses != 3 {
		t.Fatalf("metrics %+v: want 1 prefetch, 3 misses", m)
	}

	// A failed prefetch keeps the answer and is not retried at once.
	s.setAllRcode(dns.RcodeServerFailure)
	clk.Advance(95 * time.Second) // hot.test: 5 s left
	first("hot.test")
	waitFor(t, "the failed prefetch", func() bool { return s.count("hot.test", dns.TypeMX) == 3 })
	waitFor(t, "the prefetch to end", func() bool {
		return !c.lookupEntry(key{"hot.test", dns.TypeMX}).prefetching.Load()
	})
	for i := 0; i < 10; i++ {
		if h := first("hot.test"); h != "new.hot.test" {
			t.Fatalf("got %q", h)
		}
	}
	if q := s.count("hot.test", dns.TypeMX); q != 3 {
		t.Fatalf("%d queries: failed prefetch retried at once", q)
	}
}

func TestServeStale(t *testing.T) {
	s := newTestServer(t)
	s.add("stale.test. 60 IN MX 10 mx.stale.test.", "mx.stale.test. 60 IN A 192.0.2.5")
	clk := newFakeClock()
	c := newCache(t, s, clk, func(c *Config) {
		c.Timeout = 50 * time.Millisecond
		c.PrefetchFraction = -1
		c.StaleTTL = 10 * time.Minute
	})
	ctx := context.Background()
	if _, err := c.Resolve(ctx, "stale.test"); err != nil {
		t.Fatal(err)
	}
	s.drop.Store(true) // the server stops answering
	clk.Advance(61 * time.Second)
	r, err := c.Resolve(ctx, "stale.test")
	if err != nil {
		t.Fatalf("stale answer not served: %v", err)
	}
	if len(r.Hosts) != 1 || !slices.Equal(r.Hosts[0].Addrs, addrs("192.0.2.5")) {
		t.Fatalf("route %+v", r)
	}
	m := c.Metrics()
	if m.Stale != 2 || m.Errors[KindTimeout] != 2 {
		t.Fatalf("metrics %+v: want 2 stale answers (MX and A), 2 timeouts", m)
	}
	// The stale answer is reused for 30 s without asking again.
	q := s.total.Load()
	clk.Advance(20 * time.Second)
	if _, err := c.Resolve(ctx, "stale.test"); err != nil {
		t.Fatal(err)
	}
	if s.total.Load() != q || c.Metrics().Stale != 4 {
		t.Fatalf("resolvers asked again within 30 s (%d→%d queries), stale=%d", q, s.total.Load(), c.Metrics().Stale)
	}
	// Then asked again (and still failing: still stale).
	clk.Advance(20 * time.Second)
	if _, err := c.Resolve(ctx, "stale.test"); err != nil {
		t.Fatal(err)
	}
	if s.total.Load() == q {
		t.Fatal("resolvers not asked again after 30 s")
	}
	// Past StaleTTL: the failure shows.
	clk.Advance(10 * time.Minute)
	_, err = c.Resolve(ctx, "stale.test")
	wantKind(t, err, KindTimeout, false)
	if r := smtperr.Classify(err); r.Code != 451 {
		t.Fatalf("SMTP reply %v", r)
	}

	// Back to normal: fresh answers again.
	s.drop.Store(false)
	if _, err := c.Resolve(ctx, "stale.test"); err != nil {
		t.Fatal(err)
	}
}

func TestServeStaleLimits(t *testing.T) {
	s := newTestServer(t)
	s.add("pos.test. 60 IN MX 10 mx.pos.test.")
	clk := newFakeClock()
	ctx := context.Background()

	// Disabled.
	c := newCache(t, s, clk, func(c *Config) { c.StaleTTL = -1; c.PrefetchFraction = -1 })
	if _, err := c.LookupMX(ctx, "pos.test"); err != nil {
		t.Fatal(err)
	}
	// Negative answers are never served stale.
	_, err := c.LookupMX(ctx, "gone.test")
	wantKind(t, err, KindNXDomain, true)

	s.setAllRcode(dns.RcodeServerFailure)
	clk.Advance(2 * time.Hour)
	_, err = c.LookupMX(ctx, "pos.test")
	wantKind(t, err, KindServFail, false)

	c2 := newCache(t, s, clk, func(c *Config) { c.PrefetchFraction = -1 })
	s.setAllRcode(0)
	_, err = c2.LookupMX(ctx, "gone.test")
	wantKind(t, err, KindNXDomain, true)
	s.setAllRcode(dns.RcodeServerFailure)
	clk.Advance(2 * time.Hour)
	_, err = c2.LookupMX(ctx, "gone.test")
	wantKind(t, err, KindServFail, false)
	if c2.Metrics().Stale != 0 {
		t.Fatal("negative answer served stale")
	}
}

func TestTruncationFallsBackToTCP(t *testing.T) {
	s := newTestServer(t)
	var lines []string
	for i := 0; i < 40; i++ {
		lines = append(lines, fmt.Sprintf("big.test. 300 IN A 10.0.0.%d", i))
	}
	s.add(lines...)
	s.mu.Lock()
	s.truncate["big.test."] = true
	s.mu.Unlock()
	c := newCache(t, s, newFakeClock(), nil)
	ips, err := c.LookupIP(context.Background(), "big.test")
	if err != nil {
		t.Fatal(err)
	}
	if len(ips) != 40 {
		t.Fatalf("%d addresses, want 40", len(ips))
	}
	if s.tcpN.Load() == 0 {
		t.Fatal("no TCP query after a truncated UDP reply")
	}
	if s.udpN.Load() == 0 {
		t.Fatal("no UDP query")
	}
}

func TestEDNS0(t *testing.T) {
	s := newTestServer(t)
	s.add("edns.test. 300 IN MX 10 mx.edns.test.")
	c := newCache(t, s, newFakeClock(), nil)
	if _, err := c.LookupMX(context.Background(), "edns.test"); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !slices.Equal(s.edns, []uint16{1232}) {
		t.Fatalf("EDNS0 sizes %v, want [1232]", s.edns)
	}
}

// deadResolver is a UDP socket that counts queries and never answers.
func deadResolver(t *testing.T) (addr string, count func() int) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	n := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
			mu.Lock()
			n++
			mu.Unlock()
		}
	}()
	t.Cleanup(func() { pc.Close(); <-done })
	return pc.LocalAddr().String(), func() int { mu.Lock(); defer mu.Unlock(); return n }
}

func TestResolverFailover(t *testing.T) {
	s := newTestServer(t)
	for i := 0; i < 4; i++ {
		s.add(fmt.Sprintf("d%d.test. 300 IN MX 10 mx.d%d.test.", i, i))
	}
	dead, deadCount := deadResolver(t)
	clk := newFakeClock()
	c := newCache(t, s, clk, func(c *Config) {
		c.Resolvers = []string{dead, s.addr}
		c.Timeout = 100 * time.Millisecond
	})
	ctx := context.Background()
	for i := 0; i < 4; i++ {
		if _, err := c.LookupMX(ctx, fmt.Sprintf("d%d.test", i)); err != nil {
			t.Fatal(err)
		}
	}
	// Lookups 0 and 2 start at the dead resolver; after the first timeout
	// it is held down and skipped.
	if n := deadCount(); n != 1 {
		t.Fatalf("dead resolver got %d queries, want 1", n)
	}
	if m := c.Metrics(); m.Errors[KindTimeout] != 0 {
		t.Fatalf("a failover counted as a failed lookup: %+v", m)
	}
	// After the hold-down it is tried again.
	clk.Advance(DefaultResolverHoldDown + time.Second)
	for i := 0; i < 4; i++ {
		c.LookupMX(ctx, fmt.Sprintf("e%d.test", i))
	}
	if n := deadCount(); n != 2 {
		t.Fatalf("dead resolver got %d queries, want 2", n)
	}

	// Every resolver dead: each is still tried, Attempts rounds.
	c2 := newCache(t, s, clk, func(c *Config) {
		c.Resolvers = []string{dead}
		c.Timeout = 50 * time.Millisecond
		c.Attempts = 2
	})
	before := deadCount()
	_, err := c2.LookupMX(ctx, "x.test")
	wantKind(t, err, KindTimeout, false)
	if n := deadCount() - before; n != 2 {
		t.Fatalf("%d tries, want 2", n)
	}
}

func TestServFailAndRefused(t *testing.T) {
	s := newTestServer(t)
	s2 := newTestServer(t)
	s2.add("sf.test. 300 IN MX 10 mx.sf.test.", "ref.test. 300 IN MX 10 mx.ref.test.")
	clk := newFakeClock()
	c := newCache(t, s, clk, func(c *Config) { c.Attempts = 2 })
	ctx := context.Background()

	s.setRcode("sf.test", dns.TypeMX, dns.RcodeServerFailure)
	_, err := c.LookupMX(ctx, "sf.test")
	wantKind(t, err, KindServFail, false)
	if n := s.count("sf.test", dns.TypeMX); n != 2 {
		t.Fatalf("%d queries, want 2 (Attempts)", n)
	}
	// SERVFAIL is not cached.
	if _, err := c.LookupMX(ctx, "sf.test"); err == nil {
		t.Fatal("expected SERVFAIL again")
	}
	if n := s.count("sf.test", dns.TypeMX); n != 4 {
		t.Fatalf("%d queries, want 4", n)
	}

	s.setRcode("ref.test", dns.TypeMX, dns.RcodeRefused)
	_, err = c.LookupMX(ctx, "ref.test")
	wantKind(t, err, KindRefused, false)

	// With a second resolver, SERVFAIL and REFUSED move on to it.
	c2 := newCache(t, s, clk, func(c *Config) { c.Resolvers = []string{s.addr, s2.addr} })
	for _, n := range []string{"sf.test", "ref.test", "sf.test", "ref.test"} {
		if _, err := c2.LookupMX(ctx, n); err != nil {
			t.Fatalf("%s: %v", n, err)
		}
	}
}

func TestHostErrors(t *testing.T) {
	s := newTestServer(t)
	s.add(
		"part.test. 300 IN MX 10 good.part.test.",
		"part.test. 300 IN MX 20 gone.part.test.",
		"good.part.test. 300 IN A 192.0.2.1",
		"dead.test. 300 IN MX 10 gone1.dead.test.",
		"dead.test. 300 IN MX 20 gone2.dead.test.",
		"flaky.test. 300 IN MX 10 gone.flaky.test.",
		"flaky.test. 300 IN MX 20 broken.flaky.test.",
		"broken.flaky.test. 300 IN A 192.0.2.2",
		"bad.test. 300 IN MX 10 bad\\ host.bad.test.",
	)
	s.setRcode("broken.flaky.test", dns.TypeA, dns.RcodeServerFailure)
	c := newCache(t, s, newFakeClock(), nil)
	ctx := context.Background()

	r, err := c.Resolve(ctx, "part.test")
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Hosts) != 2 || len(r.Hosts[0].Addrs) != 1 || r.Hosts[1].Err == nil || len(r.Hosts[1].Addrs) != 0 {
		t.Fatalf("route %+v", r)
	}
	wantKind(t, r.Hosts[1].Err, KindNXDomain, true)

	_, err = c.Resolve(ctx, "dead.test")
	wantKind(t, err, KindNoAddress, true)
	if !errors.Is(err, ErrNXDomain) || !strings.Contains(err.Error(), "gone2.dead.test") {
		t.Fatalf("error does not carry the hosts' errors: %v", err)
	}
	if r := smtperr.Classify(err); r.Code != 550 || r.Enhanced != "5.4.4" {
		t.Fatalf("SMTP reply %v", r)
	}

	_, err = c.Resolve(ctx, "flaky.test")
	wantKind(t, err, KindServFail, false)

	_, err = c.Resolve(ctx, "bad.test")
	wantKind(t, err, KindNoAddress, true)
	if !errors.Is(err, ErrInvalidName) {
		t.Fatalf("err %v", err)
	}
}

func TestLookupIPPartial(t *testing.T) {
	s := newTestServer(t)
	s.add("half.test. 3600 IN A 192.0.2.3", "half.test. 3600 IN AAAA 2001:db8::3")
	s.setRcode("half.test", dns.TypeAAAA, dns.RcodeServerFailure)
	clk := newFakeClock()
	c := newCache(t, s, clk, func(c *Config) { c.PrefetchFraction = -1 })
	ctx := context.Background()
	ips, err := c.LookupIP(ctx, "half.test")
	if err != nil || !slices.Equal(ips, addrs("192.0.2.3")) {
		t.Fatalf("LookupIP = %v, %v", ips, err)
	}
	// Cached only for MinTTL, then both asked again.
	s.mu.Lock()
	delete(s.rcode, qkey{"half.test.", dns.TypeAAAA})
	s.mu.Unlock()
	clk.Advance(DefaultMinTTL + time.Second)
	ips, err = c.LookupIP(ctx, "half.test")
	if err != nil || !slices.Equal(ips, addrs("192.0.2.3", "2001:db8::3")) {
		t.Fatalf("LookupIP = %v, %v", ips, err)
	}
}

func TestInvalidNames(t *testing.T) {
	s := newTestServer(t)
	c := newCache(t, s, newFakeClock(), nil)
	long := strings.Repeat("a", 64)
	tooLong := strings.Repeat("abcdefghi.", 26) // 260
	for _, n := range []string{"", ".", "a..b", ".a", "a b.test", "ex\u00e4mple.test", "[192.0.2.1]", long + ".test", tooLong, "a.test..", "a\\.test"} {
		_, err := c.Resolve(context.Background(), n)
		wantKind(t, err, KindInvalidName, true)
		_, err = c.LookupIP(context.Background(), n)
		wantKind(t, err, KindInvalidName, true)
	}
	if n := s.total.Load(); n != 0 {
		t.Fatalf("%d queries sent for invalid names", n)
	}
}

func TestCanonical(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"example.org", "example.org", true},
		{"Example.ORG.", "example.org", true},
		{"mx-1_x.example.org", "mx-1_x.example.org", true},
		{"localhost", "localhost", true},
		{strings.Repeat("a", 63) + ".org", strings.Repeat("a", 63) + ".org", true},
		{strings.Repeat("a", 64) + ".org", "", false},
		{strings.Repeat("a.", 126) + "ab", "", false}, // 254 characters
		{strings.Repeat("a.", 126) + "a", strings.Repeat("a.", 126) + "a", true},
		{"", "", false},
		{".", "", false},
		{"a..org", "", false},
		{"a.org..", "", false},
		{"a,org", "", false},
		{"a.org\x00", "", false},
		{"bücher.de", "", false},
	} {
		got, ok := canonical(tc.in)
		if got != tc.want || ok != tc.ok {
			t.Errorf("canonical(%q) = %q, %v; want %q, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
	if n := testing.AllocsPerRun(100, func() { canonical("mx1.example.org.") }); n != 0 && !raceEnabled {
		t.Errorf("canonical of a lower-case name allocates %v times", n)
	}
}

func TestEviction(t *testing.T) {
	s := newTestServer(t)
	for i := 0; i < 6; i++ {
		s.add(fmt.Sprintf("n%d.test. 3600 IN MX 10 mx.test.", i))
	}
	clk := newFakeClock()
	c := newCache(t, s, clk, func(c *Config) { c.MaxEntries = 4 })
	if len(c.shards) != 1 {
		t.Fatalf("%d shards for 4 entries", len(c.shards))
	}
	ctx := context.Background()
	look := func(i int) {
		t.Helper()
		if _, err := c.LookupMX(ctx, fmt.Sprintf("n%d.test", i)); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 4; i++ {
		look(i)
		clk.Advance(time.Second)
	}
	look(0) // n0 recently used; n1 is now the least recently used
	clk.Advance(time.Second)
	look(4)
	if m := c.Metrics(); m.Entries != 4 {
		t.Fatalf("%d entries, want 4", m.Entries)
	}
	if c.lookupEntry(key{"n1.test", dns.TypeMX}) != nil {
		t.Fatal("n1 (least recently used) not evicted")
	}
	for _, i := range []int{0, 2, 3, 4} {
		if c.lookupEntry(key{fmt.Sprintf("n%d.test", i), dns.TypeMX}) == nil {
			t.Fatalf("n%d evicted", i)
		}
	}
	// Entries past any use go first, and the sweep removes them all.
	clk.Advance(3*time.Hour + time.Minute)
	look(5)
	if m := c.Metrics(); m.Entries != 4 {
		t.Fatalf("%d entries, want 4", m.Entries)
	}
	c.sweep(clk.Now().UnixNano())
	if m := c.Metrics(); m.Entries != 1 {
		t.Fatalf("%d entries after sweep, want 1", m.Entries)
	}

	// Many names: the bound holds across shards.
	c2 := newCache(t, s, clk, func(c *Config) { c.MaxEntries = 100 })
	for i := 0; i < 300; i++ {
		c2.LookupMX(ctx, fmt.Sprintf("many%d.test", i))
	}
	if m := c2.Metrics(); m.Entries > 100 || m.Entries < 50 {
		t.Fatalf("%d entries for MaxEntries 100", m.Entries)
	}
}

func TestClose(t *testing.T) {
	s := newTestServer(t)
	s.add("c.test. 300 IN MX 10 mx.c.test.")
	c := newCache(t, s, newFakeClock(), nil)
	ctx := context.Background()
	if _, err := c.LookupMX(ctx, "c.test"); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c.Close()
	if _, err := c.LookupMX(ctx, "c.test"); err != nil {
		t.Fatalf("cached answer after Close: %v", err)
	}
	_, err := c.LookupMX(ctx, "other.test")
	wantKind(t, err, KindCanceled, false)
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("%v does not wrap ErrClosed", err)
	}
}

func TestCloseInterruptsQuery(t *testing.T) {
	dead, _ := deadResolver(t)
	c, err := New(Config{Resolvers: []string{dead}, Timeout: time.Minute}, nil)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := c.LookupMX(context.Background(), "x.test")
		done <- err
	}()
	waitFor(t, "the query to start", func() bool { return c.Metrics().Misses == 1 })
	c.Close()
	select {
	case err := <-done:
		wantKind(t, err, KindCanceled, false)
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not interrupt the query")
	}
}

func TestResolvConf(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	p := write("resolv.conf", `# generated
search example.org
nameserver 127.0.0.2
; comment
nameserver ::1
nameserver bogus.example
options ndots:2 timeout:1
nameserver 192.0.2.53 # trailing comment
`)
	c, err := New(Config{ResolvConf: p}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, want := c.Resolvers(), []string{"127.0.0.2:53", "[::1]:53", "192.0.2.53:53"}; !slices.Equal(got, want) {
		t.Fatalf("resolvers = %v, want %v", got, want)
	}

	_, err = New(Config{ResolvConf: write("empty.conf", "search example.org\n")}, nil)
	if !errors.Is(err, ErrNoResolvers) {
		t.Fatalf("err = %v, want ErrNoResolvers", err)
	}
	_, err = New(Config{ResolvConf: filepath.Join(dir, "missing")}, nil)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("err = %v", err)
	}
	// Configured resolvers win over resolv.conf.
	c2, err := New(Config{ResolvConf: filepath.Join(dir, "missing"), Resolvers: []string{"127.0.0.3", "[::1]:5353", "127.0.0.4:54"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if got, want := c2.Resolvers(), []string{"127.0.0.3:53", "[::1]:5353", "127.0.0.4:54"}; !slices.Equal(got, want) {
		t.Fatalf("resolvers = %v, want %v", got, want)
	}
}

func TestCollector(t *testing.T) {
	s := newTestServer(t)
	s.add("m.test. 300 IN MX 10 mx.m.test.", "mx.m.test. 300 IN A 192.0.2.1")
	c := newCache(t, s, newFakeClock(), nil)
	ctx := context.Background()
	c.Resolve(ctx, "m.test")
	c.Resolve(ctx, "m.test")
	c.Resolve(ctx, "nx.test")

	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(c.Collector()); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			name := mf.GetName()
			for _, l := range m.GetLabel() {
				name += "{" + l.GetName() + "=" + l.GetValue() + "}"
			}
			switch {
			case m.Counter != nil:
				got[name] = m.GetCounter().GetValue()
			case m.Gauge != nil:
				got[name] = m.GetGauge().GetValue()
			case m.Histogram != nil:
				got[name+"_count"] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	want := map[string]float64{
		"hermod_dns_cache_hits_total":                     2,
		"hermod_dns_cache_misses_total":                   3,
		"hermod_dns_stale_total":                          0,
		"hermod_dns_prefetch_total":                       0,
		"hermod_dns_lookup_errors_total{kind=nxdomain}":   1,
		"hermod_dns_lookup_errors_total{kind=servfail}":   0,
		"hermod_dns_lookup_duration_seconds_count":        3,
		"hermod_dns_cache_entries":                        3,
		"hermod_dns_lookup_errors_total{kind=no_address}": 0,
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
		}
	}
}

func TestErrorForms(t *testing.T) {
	e := &Error{Kind: KindTimeout, Name: "example.org", Type: "MX", Server: "192.0.2.53:53", Err: context.DeadlineExceeded}
	if got, want := e.Error(), "dnscache: MX example.org: timed out (from 192.0.2.53:53): context deadline exceeded"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	if !errors.Is(e, ErrTimeout) || !errors.Is(e, context.DeadlineExceeded) || errors.Is(e, ErrServFail) {
		t.Error("errors.Is")
	}
	if !smtperr.IsTemporary(e) {
		t.Error("timeout not temporary for smtperr")
	}
	wrapped := fmt.Errorf("delivering: %w", &Error{Kind: KindNXDomain, Name: "nx.example"})
	if smtperr.IsTemporary(wrapped) || !IsPermanent(wrapped) {
		t.Error("wrapped NXDOMAIN not permanent")
	}
	if IsPermanent(errors.New("other")) {
		t.Error("unknown error permanent")
	}
	for k := KindNXDomain; int(k) < numKinds; k++ {
		if k.String() == "unknown" || kindSentinels[k] == nil {
			t.Errorf("kind %d has no name or sentinel", k)
		}
	}
	if Kind(200).String() != "unknown" || Kind(200).Permanent() {
		t.Error("unknown kind")
	}
}

func TestResolveInto(t *testing.T) {
	s := newTestServer(t)
	s.add(
		"into.test. 300 IN MX 10 mx1.into.test.",
		"into.test. 300 IN MX 20 mx2.into.test.",
		"mx1.into.test. 300 IN A 192.0.2.1",
		"mx2.into.test. 300 IN A 192.0.2.2",
		"null.into.test. 300 IN MX 0 .",
	)
	c := newCache(t, s, newFakeClock(), nil)
	ctx := context.Background()
	r := Route{Hosts: make([]Host, 0, 8)}
	backing := &r.Hosts[:1][0]
	if err := c.ResolveInto(ctx, "into.test", &r); err != nil {
		t.Fatal(err)
	}
	if &r.Hosts[0] != backing || !slices.Equal(hostNames(r.Hosts), []string{"mx1.into.test", "mx2.into.test"}) || r.Domain != "into.test" {
		t.Fatalf("route %+v (backing array reused: %v)", r, &r.Hosts[0] == backing)
	}
	if err := c.ResolveInto(ctx, "null.into.test", &r); err != nil || !r.NullMX || len(r.Hosts) != 0 || r.Domain != "null.into.test" {
		t.Fatalf("route %+v, %v", r, err)
	}
	err := c.ResolveInto(ctx, "nx.into.test", &r)
	wantKind(t, err, KindNXDomain, true)
	if r.NullMX || r.Domain != "" || len(r.Hosts) != 0 {
		t.Fatalf("route not reset on error: %+v", r)
	}
	if err := c.ResolveInto(ctx, "into.test", &r); err != nil || len(r.Hosts) != 2 || r.Hosts[1].Err != nil {
		t.Fatalf("route %+v, %v", r, err)
	}
	if n := testing.AllocsPerRun(100, func() { c.ResolveInto(ctx, "into.test", &r) }); n != 0 && !raceEnabled {
		t.Errorf("ResolveInto hit allocates %v times", n)
	}
	if n := testing.AllocsPerRun(100, func() { c.Resolve(ctx, "into.test") }); n != 1 && !raceEnabled {
		t.Errorf("Resolve hit allocates %v times, want 1", n)
	}
}

package dnscache

import (
	"context"
	"errors"
	"hash/maphash"
	"log/slog"
	"math"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sync/singleflight"
)

// MX is one mail exchanger of a domain.
type MX struct {
	// Host is the exchanger's name, normalised (lower case, no trailing
	// dot). It is "." for a null MX (RFC 7505), and left as received
	// (minus the trailing dot) when it is not a valid host name.
	Host string
	// Pref is the MX preference; lower is tried first.
	Pref uint16
}

// Host is one MX host of a Route with its addresses.
type Host struct {
	// Name is the host name, normalised.
	Name string
	// Pref is the MX preference (0 for an implicit MX).
	Pref uint16
	// Addrs are the host's IPv4 then IPv6 addresses. The slice is shared
	// with the cache: read it, never modify it. Empty when Err is set.
	Addrs []netip.Addr
	// Err is why the host has no addresses (a *Error), or nil.
	Err error
}

// Route says where mail for a domain goes.
type Route struct {
	// Domain is the domain resolved, normalised.
	Domain string
	// Hosts are the MX hosts in preference order, hosts of equal
	// preference shuffled anew on every call; at most Config.MaxHosts.
	// Hosts whose address lookup failed are kept, with Err set.
	Hosts []Host
	// Implicit is set when the domain has no MX records and is its own
	// mail host (RFC 5321 §5.1); Hosts then holds just the domain.
	Implicit bool
	// NullMX is set when the domain publishes a null MX (RFC 7505): it
	// accepts no mail and messages to it must bounce. Hosts is empty.
	NullMX bool
}

const (
	typeIP              uint16 = 0xFF00 // pseudo query type: A and AAAA together
	ednsSize                   = 1232
	staleRetry                 = 30 * time.Second // how long a stale answer is reused before asking again (RFC 8767 §5)
	maxShards                  = 64
	evictSample                = 8
	maxPrefetches              = 32
	sweepInterval              = time.Minute
	maxCNAMEHops               = 8
	routeInlineHosts           = 4
	minEntriesPerShards        = 16
)

// key identifies a cache entry: a canonical name and dns.TypeMX or typeIP.
type key struct {
	name  string
	qtype uint16
}

func (k key) flightKey() string {
	if k.qtype == dns.TypeMX {
		return "mx:" + k.name
	}
	return "ip:" + k.name
}

func lookupType(qtype uint16) string {
	if qtype == typeIP {
		return "A/AAAA"
	}
	return dns.TypeToString[qtype]
}

// answer is one cached result. It is never modified once published.
type answer struct {
	mx    []MX         // MX lookups: sorted by preference, then name
	null  bool         // MX lookups: the domain publishes a null MX (mx holds it)
	addrs []netip.Addr // address lookups: IPv4 then IPv6
	err   *Error       // negative answer (NXDOMAIN or NODATA); nil if positive

	expires    int64 // Unix nanoseconds; fresh while now < expires
	prefetchAt int64 // a hit at or after this starts a background refresh
	staleUntil int64 // may be served stale until then; the entry is useless after
	stale      bool  // served past its expiry because every resolver failed
}

// entry is the mutable slot of one key.
type entry struct {
	ans         atomic.Pointer[answer]
	lastUse     atomic.Int64 // Unix seconds of the last hit, for eviction
	prefetching atomic.Bool  // a background refresh is running
	noPrefetch  atomic.Int64 // no background refresh before this (Unix ns), after a failed one
}

type shard struct {
	mu    sync.RWMutex
	m     map[key]*entry
	hits  atomic.Uint64 // counted here: this cache line is written by RLock anyway
	stale atomic.Uint64
	_     [64]byte // keep neighbouring shards' locks off this cache line
}

type resolver struct {
	addr      string       // "ip:port"
	downUntil atomic.Int64 // skip until then (Unix ns; the Config.Now clock)
}

// Cache is a concurrent MX/A/AAAA cache in front of recursive resolvers.
// Create it with New; all methods are safe for concurrent use.
type Cache struct {
	cfg  Config
	log  *slog.Logger
	now  func() time.Time
	seed maphash.Seed

	shards   []shard
	mask     uint64
	shardCap int

	resolvers []*resolver
	next      atomic.Uint32
	udp, tcp  *dns.Client

	flights     singleflight.Group
	prefetchSem chan struct{}

	ctx         context.Context // ends at Close; parent of every upstream query
	cancel      context.CancelFunc
	mu          sync.Mutex // guards closed and wg.Add
	closed      bool
	wg          sync.WaitGroup // refreshes and prefetches
	janitorDone chan struct{}

	misses     atomic.Uint64
	prefetches atomic.Uint64
	entries    atomic.Int64
	errs       [numKinds]atomic.Uint64
	hist       histogram
}

// New returns a Cache using cfg (defaults applied to zero fields). A nil
// logger discards. It fails if cfg is invalid or, when cfg.Resolvers is
// empty, if cfg.ResolvConf cannot be read or names no usable nameserver.
// The Cache runs a janitor goroutine until Close.
func New(cfg Config, logger *slog.Logger) (*Cache, error) {
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	addrs, warnings, err := cfg.resolvers()
	for _, w := range warnings {
		logger.Warn("dns: ignoring nameserver", "err", w)
	}
	if err != nil {
		return nil, err
	}
	nshards := 1
	for nshards < maxShards && nshards*2*minEntriesPerShards <= cfg.MaxEntries {
		nshards *= 2
	}
	c := &Cache{
		cfg:         cfg,
		log:         logger,
		now:         cfg.Now,
		seed:        maphash.MakeSeed(),
		shards:      make([]shard, nshards),
		mask:        uint64(nshards - 1),
		shardCap:    max(1, cfg.MaxEntries/nshards),
		udp:         &dns.Client{Net: "udp", UDPSize: ednsSize, Timeout: cfg.Timeout},
		tcp:         &dns.Client{Net: "tcp", Timeout: cfg.Timeout},
		prefetchSem: make(chan struct{}, maxPrefetches),
		janitorDone: make(chan struct{}),
	}
	for i := range c.shards {
		c.shards[i].m = make(map[key]*entry)
	}
	for _, a := range addrs {
		c.resolvers = append(c.resolvers, &resolver{addr: a})
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	go c.janitor()
	return c, nil
}

// Resolvers returns the resolver addresses in use ("ip:port").
func (c *Cache) Resolvers() []string {
	out := make([]string, len(c.resolvers))
	for i, r := range c.resolvers {
		out[i] = r.addr
	}
	return out
}

// Close stops background work: it cancels upstream queries in flight and
// waits for them and for prefetches to end. Afterwards cached answers are
// still served; lookups that need a resolver fail with a KindCanceled error
// wrapping ErrClosed. Close is idempotent.
func (c *Cache) Close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.cancel()
	c.mu.Unlock()
	c.wg.Wait()
	<-c.janitorDone
}

// LookupMX returns the MX records of domain, by preference, equal
// preferences shuffled; the slice is the caller's. A null MX is returned as
// the single record {".", pref}. A domain without MX records yields a
// KindNoData error (Resolve turns that into an implicit MX).
func (c *Cache) LookupMX(ctx context.Context, domain string) ([]MX, error) {
	name, ok := canonical(domain)
	if !ok {
		return nil, invalidName(domain, "MX")
	}
	a, err := c.get(ctx, key{name, dns.TypeMX})
	if err != nil {
		return nil, err
	}
	if a.err != nil {
		return nil, a.err
	}
	out := make([]MX, len(a.mx))
	copy(out, a.mx)
	shuffleEqual(out, func(m *MX) uint16 { return m.Pref })
	return out, nil
}

// LookupIP returns the IPv4 then IPv6 addresses of host, A and AAAA being
// queried concurrently and cached together. The slice is shared with the
// cache and must not be modified. A host with neither yields KindNoData
// (or KindNXDomain); one family failing temporarily while the other has
// addresses yields those addresses, cached for MinTTL only.
func (c *Cache) LookupIP(ctx context.Context, host string) ([]netip.Addr, error) {
	name, ok := canonical(host)
	if !ok {
		return nil, invalidName(host, "A/AAAA")
	}
	a, err := c.get(ctx, key{name, typeIP})
	if err != nil {
		return nil, err
	}
	if a.err != nil {
		return nil, a.err
	}
	return a.addrs, nil
}

// Resolve returns the route for mail to domain: its MX hosts in preference
// order with their addresses (see Route). It fails with the MX lookup's
// error, or when no host has an address: with KindNoAddress (permanent) if
// every host's lookup failed permanently, else with the first temporary
// host error's kind. Address literals ("[192.0.2.1]") are not domains and
// are rejected as invalid names. On a cache hit the only allocation is the
// returned Route (one allocation for up to four hosts).
func (c *Cache) Resolve(ctx context.Context, domain string) (*Route, error) {
	return c.resolve(ctx, domain, nil)
}

// ResolveInto is Resolve writing into r, reusing r.Hosts' backing array
// when it is large enough: with a reused Route a cache hit does not
// allocate at all. r is overwritten even when an error is returned.
func (c *Cache) ResolveInto(ctx context.Context, domain string, r *Route) error {
	_, err := c.resolve(ctx, domain, r)
	return err
}

func (c *Cache) resolve(ctx context.Context, domain string, r *Route) (*Route, error) {
	if r != nil {
		clear(r.Hosts)
		*r = Route{Hosts: r.Hosts[:0]}
	}
	name, ok := canonical(domain)
	if !ok {
		return nil, invalidName(domain, "MX")
	}
	a, err := c.get(ctx, key{name, dns.TypeMX})
	if err != nil {
		return nil, err
	}
	switch {
	case a.err != nil && a.err.Kind == KindNoData:
		r = routeFor(r, 1)
		r.Implicit = true
		r.Hosts[0] = Host{Name: name}
	case a.err != nil:
		return nil, a.err
	case a.null:
		r = routeFor(r, 0)
		r.Domain = name
		r.NullMX = true
		return r, nil
	default:
		r = routeFor(r, len(a.mx))
		for i, m := range a.mx {
			r.Hosts[i] = Host{Name: m.Host, Pref: m.Pref}
		}
		shuffleEqual(r.Hosts, func(h *Host) uint16 { return h.Pref })
		if n := c.cfg.MaxHosts; len(r.Hosts) > n {
			r.Hosts = r.Hosts[:n:n]
		}
	}
	r.Domain = name
	if err := c.resolveHosts(ctx, r); err != nil {
		return nil, err
	}
	return r, nil
}

// routeBuf lets a Route with few hosts be allocated in one piece.
type routeBuf struct {
	r Route
	h [routeInlineHosts]Host
}

// routeFor returns r (or a new Route if r is nil) with n zero hosts.
func routeFor(r *Route, n int) *Route {
	switch {
	case r == nil && n <= routeInlineHosts:
		b := new(routeBuf)
		b.r.Hosts = b.h[:n:n]
		return &b.r
	case r == nil:
		return &Route{Hosts: make([]Host, n)}
	case cap(r.Hosts) < n:
		r.Hosts = make([]Host, n)
	default:
		r.Hosts = r.Hosts[:n] // cleared by resolve
	}
	return r
}

// resolveHosts fills in the addresses of r's hosts: cached ones first, then
// the rest concurrently.
func (c *Cache) resolveHosts(ctx context.Context, r *Route) error {
	now := c.now().UnixNano()
	pending := 0
	for i := range r.Hosts {
		h := &r.Hosts[i]
		name, ok := canonical(h.Name)
		if !ok {
			h.Err = invalidName(h.Name, "A/AAAA")
			continue
		}
		if a := c.hit(key{name, typeIP}, now); a != nil {
			setHost(h, a, nil)
			continue
		}
		pending++ // Addrs and Err both nil
	}
	if pending > 0 {
		var wg sync.WaitGroup
		for i := range r.Hosts {
			h := &r.Hosts[i]
			if h.Addrs != nil || h.Err != nil {
				continue
			}
			name, _ := canonical(h.Name)
			if pending == 1 {
				a, err := c.miss(ctx, key{name, typeIP})
				setHost(h, a, err)
				break
			}
			wg.Go(func() {
				a, err := c.miss(ctx, key{name, typeIP})
				setHost(h, a, err)
			})
		}
		wg.Wait()
	}
	permanent := true
	var temp *Error
	for i := range r.Hosts {
		h := &r.Hosts[i]
		if len(h.Addrs) > 0 {
			return nil
		}
		var e *Error
		if errors.As(h.Err, &e) && !e.Permanent() && temp == nil {
			temp = e
		}
		permanent = permanent && IsPermanent(h.Err)
	}
	errs := make([]error, 0, len(r.Hosts))
	for i := range r.Hosts {
		errs = append(errs, r.Hosts[i].Err)
	}
	e := &Error{Kind: KindNoAddress, Name: r.Domain, Type: "MX", Err: errors.Join(errs...)}
	if !permanent {
		e.Kind = KindNetwork
		if temp != nil {
			e.Kind = temp.Kind
		}
	}
	return e
}

func setHost(h *Host, a *answer, err *Error) {
	switch {
	case err != nil:
		h.Err = err
	case a.err != nil:
		h.Err = a.err
	default:
		h.Addrs = a.addrs
	}
}

// shuffleEqual shuffles each run of equal preference in s, which is sorted
// by preference.
func shuffleEqual[T any](s []T, pref func(*T) uint16) {
	for i := 0; i < len(s); {
		j := i + 1
		for j < len(s) && pref(&s[j]) == pref(&s[i]) {
			j++
		}
		for k := j - 1; k > i; k-- {
			l := i + rand.IntN(k-i+1)
			s[k], s[l] = s[l], s[k]
		}
		i = j
	}
}

func (c *Cache) shard(name string) *shard {
	return &c.shards[maphash.String(c.seed, name)&c.mask]
}

// get returns the answer for k from the cache or, on a miss, upstream.
func (c *Cache) get(ctx context.Context, k key) (*answer, *Error) {
	if a := c.hit(k, c.now().UnixNano()); a != nil {
		return a, nil
	}
	return c.miss(ctx, k)
}

// hit returns the fresh cached answer for k, or nil. It counts the hit,
// marks the entry used and, late in the entry's life, starts a prefetch.
func (c *Cache) hit(k key, now int64) *answer {
	sh := c.shard(k.name)
	sh.mu.RLock()
	e := sh.m[k]
	sh.mu.RUnlock()
	if e == nil {
		return nil
	}
	a := e.ans.Load()
	if now >= a.expires {
		return nil
	}
	if a.stale {
		sh.stale.Add(1)
	} else {
		sh.hits.Add(1)
	}
	if sec := now / int64(time.Second); e.lastUse.Load() != sec {
		e.lastUse.Store(sec)
	}
	if now >= a.prefetchAt {
		c.prefetch(e, k, now)
	}
	return a
}

// miss waits for the (shared) upstream lookup of k, or for ctx to end.
func (c *Cache) miss(ctx context.Context, k key) (*answer, *Error) {
	ch := c.flights.DoChan(k.flightKey(), func() (any, error) { return c.refresh(k) })
	c.misses.Add(1) // after joining the flight: tests rely on this order
	select {
	case r := <-ch:
		if r.Err != nil {
			return nil, r.Err.(*Error)
		}
		a := r.Val.(*answer)
		if a.stale {
			c.shard(k.name).stale.Add(1)
		}
		return a, nil
	case <-ctx.Done():
		return nil, &Error{Kind: KindCanceled, Name: k.name, Type: lookupType(k.qtype), Err: ctx.Err()}
	}
}

// refresh queries upstream for k and caches the result. When every
// resolver fails it falls back to the current answer if still fresh, or to
// a stale positive answer within StaleTTL. It returns (*answer, nil) or
// (nil, *Error), as singleflight wants them.
func (c *Cache) refresh(k key) (any, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, &Error{Kind: KindCanceled, Name: k.name, Type: lookupType(k.qtype), Err: ErrClosed}
	}
	c.wg.Add(1)
	c.mu.Unlock()
	defer c.wg.Done()

	start := time.Now()
	var res result
	if k.qtype == dns.TypeMX {
		res = c.queryMX(k.name)
	} else {
		res = c.queryIP(k.name)
	}
	c.hist.observe(time.Since(start))
	switch {
	case res.err != nil:
		c.errs[res.err.Kind%Kind(numKinds)].Add(1)
	case res.ans.err != nil:
		c.errs[res.ans.err.Kind%Kind(numKinds)].Add(1)
	}

	now := c.now().UnixNano()
	if res.err == nil {
		c.stamp(res.ans, res.ttl, now)
		c.store(k, res.ans, now)
		return res.ans, nil
	}
	if res.err.Kind == KindCanceled {
		return nil, res.err
	}
	e := c.lookupEntry(k)
	if e == nil {
		return nil, res.err
	}
	old := e.ans.Load()
	if now < old.expires {
		return old, nil // a prefetch failed; the current answer stands
	}
	if old.err != nil || now >= old.staleUntil {
		return nil, res.err
	}
	ext := *old
	ext.stale = true
	ext.expires = min(now+int64(staleRetry), old.staleUntil)
	ext.prefetchAt = math.MaxInt64
	e.ans.CompareAndSwap(old, &ext)
	c.log.Info("dns: serving stale answer", "name", k.name, "type", lookupType(k.qtype), "err", res.err)
	return &ext, nil
}

// stamp sets a's lifetime from its TTL, clamped per the configuration.
func (c *Cache) stamp(a *answer, ttl time.Duration, now int64) {
	hi := c.cfg.MaxTTL
	if a.err != nil {
		hi = c.cfg.NegativeTTL
	}
	d := min(max(ttl, c.cfg.MinTTL), hi)
	a.expires = now + int64(d)
	a.staleUntil = a.expires
	if a.err == nil && c.cfg.StaleTTL > 0 {
		a.staleUntil += int64(c.cfg.StaleTTL)
	}
	a.prefetchAt = math.MaxInt64
	if c.cfg.PrefetchFraction > 0 {
		a.prefetchAt = a.expires - int64(float64(d)*c.cfg.PrefetchFraction)
	}
}

func (c *Cache) lookupEntry(k key) *entry {
	sh := c.shard(k.name)
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	return sh.m[k]
}

// store publishes a as the answer for k, evicting an entry if the shard is
// full.
func (c *Cache) store(k key, a *answer, now int64) {
	sh := c.shard(k.name)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	e := sh.m[k]
	if e == nil {
		if len(sh.m) >= c.shardCap {
			c.evictLocked(sh, now)
		}
		e = new(entry)
		e.lastUse.Store(now / int64(time.Second))
		sh.m[k] = e
		c.entries.Add(1)
	}
	e.ans.Store(a)
}

// evictLocked removes one entry from sh: the first one of a small random
// sample that is past any use, else the least recently used of the sample.
func (c *Cache) evictLocked(sh *shard, now int64) {
	var victim key
	found := false
	oldest := int64(math.MaxInt64)
	n := 0
	for k, e := range sh.m {
		if now >= e.ans.Load().staleUntil {
			victim, found = k, true
			break
		}
		if lu := e.lastUse.Load(); lu < oldest {
			victim, oldest, found = k, lu, true
		}
		if n++; n >= evictSample {
			break
		}
	}
	if found {
		delete(sh.m, victim)
		c.entries.Add(-1)
	}
}

// prefetch starts a background refresh of e unless one is running, one
// failed recently, too many are running, or the cache is closed.
func (c *Cache) prefetch(e *entry, k key, now int64) {
	if e.prefetching.Load() || now < e.noPrefetch.Load() || !e.prefetching.CompareAndSwap(false, true) {
		return
	}
	select {
	case c.prefetchSem <- struct{}{}:
	default:
		e.prefetching.Store(false)
		return
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		<-c.prefetchSem
		e.prefetching.Store(false)
		return
	}
	c.wg.Add(1)
	c.mu.Unlock()
	c.prefetches.Add(1)
	go func() {
		defer c.wg.Done()
		old := e.ans.Load()
		c.flights.Do(k.flightKey(), func() (any, error) { return c.refresh(k) })
		if e.ans.Load() == old {
			e.noPrefetch.Store(c.now().UnixNano() + int64(c.cfg.MinTTL))
		}
		e.prefetching.Store(false)
		<-c.prefetchSem
	}()
}

// sweep removes the entries that are past any use.
func (c *Cache) sweep(now int64) {
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		for k, e := range sh.m {
			if now >= e.ans.Load().staleUntil {
				delete(sh.m, k)
				c.entries.Add(-1)
			}
		}
		sh.mu.Unlock()
	}
}

func (c *Cache) janitor() {
	defer close(c.janitorDone)
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
			c.sweep(c.now().UnixNano())
		}
	}
}

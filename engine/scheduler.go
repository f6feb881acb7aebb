package engine

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hermod-mta/hermod/dnscache"
	"github.com/hermod-mta/hermod/netio"
	"github.com/hermod-mta/hermod/spool"
)

// Resolver finds the mail exchangers of a domain (dnscache.Cache).
type Resolver interface {
	Resolve(ctx context.Context, domain string) (*dnscache.Route, error)
}

// SchedulerOptions are the collaborators of a Scheduler.
type SchedulerOptions struct {
	// Store is the spool. Required.
	Store *spool.Store
	// Resolver resolves MX hosts. Required.
	Resolver Resolver
	// Hostname is the reporting MTA in bounces.
	Hostname string
	// Logger gets operational messages; nil discards them.
	Logger *slog.Logger
	// Log gets one JSON line per delivery, deferral, bounce and expiry.
	Log *EventLog
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Seed seeds the retry jitter; 0 picks a random seed.
	Seed uint64
	// Observe, when set, sees every delivery record (delivered, deferred,
	// bounced, expired) whether or not Log is set: per-domain statistics.
	// It is called from agent goroutines and must not block.
	Observe func(*DeliveryRecord)
	// Recorded, when set, is told of each outcome once it is in the spool:
	// the message, the recipients' new states and whether the message is
	// finished and removed. Cluster replication forwards it to the
	// peers holding copies. Called from agent goroutines; must not block.
	Recorded func(msg *spool.Message, updates []spool.Recipient, removed bool)
	// Replicate, when set, copies each bounce to cluster peers before it
	// is queued (like ReceiverOptions.Replicate; it may set msg.Peers).
	Replicate func(msg *spool.Message, body []byte, done func(error))
	// Limits, when set, bounds connections per destination beyond
	// DeliveryConfig (cluster-wide limits). Called from the loop goroutine.
	Limits ConnLimits
}

// ConnLimits is an outside bound on connections per destination domain
// (the cluster's share of a cluster-wide limit). Every method is called
// from the scheduler's loop goroutine and must be fast and non-blocking.
type ConnLimits interface {
	// Allowance returns how many connections to domain this node may hold
	// now, and false when domain has no outside limit.
	Allowance(domain string) (int, bool)
	// Opened and Closed report a connection to domain opened or closed.
	Opened(domain string)
	Closed(domain string)
	// Rate returns the messages per second this node may send to domain
	// now, and false when domain has no outside rate limit.
	Rate(domain string) (float64, bool)
}

// Scheduler delivers queued mail: per-destination ready queues, bounded
// connections per destination and in total, connection reuse, retries with
// jittered backoff, whole-destination backoff when every MX fails, bounces.
//
// Structure: one loop goroutine owns every queue and counter (no locks on
// the hot path); each outbound connection is an agent goroutine that asks
// the loop for its next job to the same destination and writes outcomes
// to the spool itself (blocking writes, group-committed with everyone
// else's). Messages enter the loop straight from the Receiver (Enqueue) or
// from scans of the spool's due index (retries, restarts, overflow).
//
// Invariants:
//   - The in-memory active set holds at most ActiveLimit messages and at
//     most DestinationQueueLimit waiting jobs per destination; everything
//     else waits in the spool, so memory does not grow with the queue.
//   - A recipient's outcome is in the spool (Update, synced) before the
//     loop hears of it; a bounce is committed before the recipient is
//     marked bounced. A crash at any point repeats at most the deliveries
//     in flight (at least once, never lost).
//   - A destination whose every MX fails is backed off as a whole: while
//     backed off its mail is deferred without connecting.
type Scheduler struct {
	cfg  DeliveryConfig
	opt  SchedulerOptions
	st   *spool.Store
	log  *slog.Logger
	now  func() time.Time
	rand *rand.Rand // loop-owned

	events  chan event
	stop    chan struct{}
	done    chan struct{}
	ctx     context.Context
	cancel  context.CancelFunc
	agentWG sync.WaitGroup

	// arriving holds the messages being committed that Enqueue will hand
	// over (see Arriving).
	arrivingMu sync.Mutex
	arriving   map[spool.ID]struct{}

	// Loop-owned state.
	active   map[spool.ID]*entry
	dests    map[string]*dest
	ring     []*dest // destinations with ready jobs, served round-robin
	conns    int
	closing  bool
	scanAt   time.Time
	lastTick time.Time
	cursorT  time.Time
	cursorID spool.ID
	// scanSlices counts the slices the current scan yielded since the
	// last tick (scanSlicesPerTick).
	scanSlices int
	// scanBudget is scanBudget (tests lower it to split passes).
	scanBudget int
	// refusedRun counts the consecutive due entries the scan stepped
	// over for full destinations (refusedRunMax).
	refusedRun int
	// During a scan: the cursor before the entry being examined.
	inScan     bool
	scanPrevT  time.Time
	scanPrevID spool.ID

	m           schedCounters
	cachedBytes atomic.Int64 // bodies held by the hot path

	// spawn starts an agent; tests replace it to drive agents by hand.
	spawn func(a *agent, jobs []*job)
}

// entry is a message in the active set.
type entry struct {
	msg  *spool.Message
	body []byte     // the spooled message when the hot path brought it, else nil
	jobs int        // jobs not yet finished (loop-owned)
	mu   sync.Mutex // serialises agents updating msg and its spool records
}

// job is one transaction: the due recipients of one message to one domain.
type job struct {
	e     *entry
	d     *dest
	rcpts []int // indexes into e.msg.Rcpts
	ready time.Time
}

// dest is a destination domain's queue and connection state.
type dest struct {
	name         string
	ready        []*job
	conns        int
	idle         []*agent
	backoffUntil time.Time
	fails        int
	open         atomic.Int32 // = conns, readable by agents
	limit        int          // lowered connection limit after refusals (0: configured one)
	lastOK       atomic.Int64 // unix nanos of the last delivery or permanent answer
	lastRefused  atomic.Int64 // unix nanos of the last requeue for a refused connection
	pauseUntil   time.Time    // no new connection before (jobs stay queued in memory)
	tokens       float64      // message budget under an outside rate limit
	tokensAt     time.Time    // when tokens was last refilled
	okSince      int          // deliveries since the limit was last changed
	inRing       bool
	refused      bool // mail was left in the spool because ready was full
	// refusedT/ID: the scan cursor just before the first entry left in
	// the spool for d (zero: from the start); when d drains, the scan
	// rewinds there instead of walking the whole index again.
	refusedT  time.Time
	refusedID spool.ID
	stat      DomainStat
}

// agent is one outbound connection's goroutine.
type agent struct {
	d         *dest
	next      chan []*job
	idleSince time.Time
	conn      *netio.ClientConn
	usable    bool // conn can carry another transaction
	refused   bool // the last connection attempt got a temporary reply (421 at the greeting)
	mx        string
	sent      int
	rand      *rand.Rand
}

type event any

type evEnqueue struct {
	msg  *spool.Message
	body []byte
}
type evDone struct {
	a    *agent
	jobs []*job
	res  []*attemptResult
}
type evSuspended struct{ jobs []*job }
type evAgentExit struct{ a *agent }
type evQuery struct {
	fn   func()
	done chan struct{}
}

// NewScheduler returns a scheduler; Start runs it.
func NewScheduler(cfg DeliveryConfig, opt SchedulerOptions) (*Scheduler, error) {
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if opt.Store == nil || opt.Resolver == nil {
		return nil, errors.New("engine: scheduler needs a spool and a resolver")
	}
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.DiscardHandler)
	}
	if opt.Now == nil {
		opt.Now = time.Now
	}
	if opt.Seed == 0 {
		opt.Seed = rand.Uint64()
	}
	if opt.Hostname == "" {
		opt.Hostname = cfg.Hostname
	}
	if cfg.TLSCAFile != "" {
		pem, err := os.ReadFile(cfg.TLSCAFile)
		if err != nil {
			return nil, fmt.Errorf("delivery.tls_ca_file: %w", err)
		}
		roots, err := x509.SystemCertPool()
		if err != nil || roots == nil {
			roots = x509.NewCertPool()
		}
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("delivery.tls_ca_file: no certificate in %s", cfg.TLSCAFile)
		}
		tc := &tls.Config{}
		if cfg.TLSConfig != nil {
			tc = cfg.TLSConfig.Clone()
		}
		tc.RootCAs = roots
		cfg.TLSConfig = tc
	}
	s := &Scheduler{
		cfg:        cfg,
		opt:        opt,
		scanBudget: scanBudget,
		st:         opt.Store,
		log:        opt.Logger,
		now:        opt.Now,
		rand:       rand.New(rand.NewPCG(opt.Seed, 1)),
		events:     make(chan event, 4096),
		stop:       make(chan struct{}),
		done:       make(chan struct{}),
		active:     make(map[spool.ID]*entry),
		dests:      make(map[string]*dest),
		arriving:   make(map[spool.ID]struct{}),
	}
	s.m.latency = newLatencyHistogram()
	s.spawn = func(a *agent, jobs []*job) {
		s.agentWG.Add(1)
		go s.runAgent(a, jobs)
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// Start runs the scheduler loop. Queued mail found in the spool is picked
// up by the first scan.
func (s *Scheduler) Start() { go s.loop() }

// Stop stops delivering: connections in flight are cancelled (their
// recipients stay pending and are retried at the next start), idle ones
// closed. It returns when every agent has ended or ctx expires.
func (s *Scheduler) Stop(ctx context.Context) error {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	select {
	case <-s.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Enqueue hands a message that was just made durable to the scheduler
// (the hot path: no polling between acceptance and the first attempt).
// It never blocks: when the loop is saturated the message simply waits in
// the spool for the next scan. It ends the message's Arriving.
//
// body, when not nil, is the message as spooled: kept while the message is
// in the active set (within a memory budget) so the first attempt need not
// read it back from the spool. It must not be modified.
func (s *Scheduler) Enqueue(msg *spool.Message, body []byte) {
	if body != nil && (len(body) > maxCachedBody || s.cachedBytes.Add(int64(len(body))) > maxCachedBytes) {
		if len(body) <= maxCachedBody {
			s.cachedBytes.Add(-int64(len(body)))
		}
		body = nil
	}
	select {
	case s.events <- evEnqueue{msg, body}:
	default:
		s.m.overflow.Add(1)
		s.uncache(body)
	}
	// Only now: the event is ahead of any the loop could produce for a
	// scan that finds the message from here on (the loop takes events in
	// order), so the hand-over cannot come after such a delivery.
	s.arrived(msg.ID)
}

// Arriving tells the scheduler that the message id is being committed and
// will be handed over by Enqueue, or given up by Abandon when its commit
// fails. Until then scans leave it in the spool: a message is visible there
// a moment before its commit is acknowledged, and a scan that delivered it
// in that moment would have Enqueue deliver it again.
func (s *Scheduler) Arriving(id spool.ID) {
	s.arrivingMu.Lock()
	s.arriving[id] = struct{}{}
	s.arrivingMu.Unlock()
}

// Abandon ends the Arriving of a message whose commit failed (if it was
// stored after all, a scan delivers it).
func (s *Scheduler) Abandon(id spool.ID) { s.arrived(id) }

func (s *Scheduler) arrived(id spool.ID) {
	s.arrivingMu.Lock()
	delete(s.arriving, id)
	s.arrivingMu.Unlock()
}

// isArriving reports whether id is between Arriving and its hand-over.
func (s *Scheduler) isArriving(id spool.ID) bool {
	s.arrivingMu.Lock()
	_, ok := s.arriving[id]
	s.arrivingMu.Unlock()
	return ok
}

// Bounds of the body cache of the hot path.
const (
	maxCachedBody  = 256 << 10
	maxCachedBytes = 128 << 20
)

func (s *Scheduler) uncache(body []byte) {
	if body != nil {
		s.cachedBytes.Add(-int64(len(body)))
	}
}

// query runs fn on the loop and waits for it.
func (s *Scheduler) query(fn func()) bool {
	q := evQuery{fn: fn, done: make(chan struct{})}
	select {
	case s.events <- q:
	case <-s.done:
		return false
	}
	select {
	case <-q.done:
		return true
	case <-s.done:
		return false
	}
}

const tickEvery = 50 * time.Millisecond

func (s *Scheduler) loop() {
	defer close(s.done)
	t := time.NewTicker(tickEvery)
	defer t.Stop()
	for {
		select {
		case ev := <-s.events:
			s.handle(ev)
			// Drain what else is waiting before dispatching.
			for n := 0; n < 256; n++ {
				select {
				case ev := <-s.events:
					s.handle(ev)
					continue
				default:
				}
				break
			}
		case <-t.C:
		case <-s.stop:
			if !s.closing {
				s.closing = true
				s.cancel()
				for _, d := range s.dests {
					for _, a := range d.idle {
						a.next <- nil
					}
					d.idle = nil
				}
			}
		}
		if s.closing {
			if s.conns == 0 {
				s.drainAndExit()
				return
			}
			continue
		}
		now := s.now()
		if now.Sub(s.lastTick) >= tickEvery {
			s.lastTick = now
			s.tick(now)
		} else if !now.Before(s.scanAt) {
			s.scan(now)
		}
		s.dispatch(now)
	}
}

// drainAndExit keeps answering events until every helper goroutine has
// ended (they report to the loop before they end).
func (s *Scheduler) drainAndExit() {
	ended := make(chan struct{})
	go func() { s.agentWG.Wait(); close(ended) }()
	for {
		select {
		case ev := <-s.events:
			s.handle(ev)
		case <-ended:
			return
		}
	}
}

func (s *Scheduler) handle(ev event) {
	now := s.now()
	switch ev := ev.(type) {
	case evEnqueue:
		if s.closing || len(s.active) >= s.cfg.ActiveLimit || s.active[ev.msg.ID] != nil {
			s.m.overflow.Add(1)
			s.uncache(ev.body)
			return // it is in the spool; a scan will find it
		}
		if !s.admit(ev.msg, now) {
			s.uncache(ev.body)
		} else {
			s.active[ev.msg.ID].body = ev.body
		}
	case evDone:
		destFail := false
		var requeue []*job
		for k, j := range ev.jobs {
			if ev.res[k].requeue {
				requeue = append(requeue, j)
				continue
			}
			s.finishJob(j, ev.res[k], now)
			destFail = destFail || ev.res[k].destFail
		}
		if len(requeue) > 0 {
			s.requeue(ev.a.d, requeue, ev.res[0].lastReply)
			destFail = true // close this connection
		}
		s.m.busy.Add(-1)
		s.nextFor(ev.a, destFail, now)
	case evSuspended:
		for _, j := range ev.jobs {
			s.finishJob(j, nil, now)
		}
	case evAgentExit:
		ev.a.d.conns--
		if s.opt.Limits != nil {
			s.opt.Limits.Closed(ev.a.d.name)
		}
		ev.a.d.open.Add(-1)
		s.conns--
		s.m.conns.Add(-1)
	case evQuery:
		ev.fn()
		close(ev.done)
	}
}

// admit puts a message's due recipients into their destinations' ready
// queues. It returns false (and changes nothing) when a destination's queue
// is full: the message stays in the spool until there is room.
func (s *Scheduler) admit(msg *spool.Message, now time.Time) bool {
	byDomain := map[string][]int{}
	var order []string
	var due time.Time // the message's due entry: its earliest pending attempt
	for i, r := range msg.Rcpts {
		if r.State == spool.Pending && (due.IsZero() || r.NextAttempt.Before(due)) {
			due = r.NextAttempt
		}
		if r.State != spool.Pending || r.NextAttempt.After(now) {
			continue
		}
		if _, ok := byDomain[r.Domain]; !ok {
			order = append(order, r.Domain)
		}
		byDomain[r.Domain] = append(byDomain[r.Domain], i)
	}
	if len(order) == 0 {
		return false
	}
	for _, dom := range order {
		if d := s.dests[dom]; d != nil && len(d.ready) >= s.cfg.DestinationQueueLimit {
			s.m.destFull.Add(1)
			s.markRefused(d, due)
			return false
		}
	}
	e := &entry{msg: msg, jobs: len(order)}
	s.active[msg.ID] = e
	var suspended []*job
	for _, dom := range order {
		d := s.dest(dom)
		j := &job{e: e, d: d, rcpts: byDomain[dom], ready: now}
		if now.Before(d.backoffUntil) {
			suspended = append(suspended, j)
			continue
		}
		d.ready = append(d.ready, j)
		s.m.ready.Add(1)
		if !d.inRing {
			d.inRing = true
			s.ring = append(s.ring, d)
		}
	}
	if len(suspended) > 0 {
		s.suspend(suspended, now)
	}
	s.m.activeMsgs.Store(int64(len(s.active)))
	return true
}

// refusedAll reports whether every domain of a due entry's hint has a
// full ready queue: the message would be refused, so it is not loaded (a
// backlog of a million messages for one domain is stepped over at the
// speed of the index, not of message loads). An empty hint is unknown.
func (s *Scheduler) refusedAll(hint []byte) bool {
	if len(hint) == 0 {
		return false
	}
	for len(hint) > 0 {
		dom := hint
		if i := bytes.IndexByte(hint, ','); i >= 0 {
			dom, hint = hint[:i], hint[i+1:]
		} else {
			hint = nil
		}
		d := s.dests[string(dom)]
		if d == nil || len(d.ready) < s.cfg.DestinationQueueLimit {
			return false
		}
		s.markRefused(d, time.Time{}) // full: rescan when it drains (pop)
	}
	s.m.destFull.Add(1)
	return true
}

// markRefused records that mail for d was left in the spool, and where
// the scan is to resume for it: in a scan, just before the entry being
// examined; outside (the hot path), just before due, the refused
// message's due time (the start of the index when unknown).
func (s *Scheduler) markRefused(d *dest, due time.Time) {
	if d.refused {
		return
	}
	d.refused = true
	switch {
	case s.inScan:
		d.refusedT, d.refusedID = s.scanPrevT, s.scanPrevID
	case !due.IsZero():
		d.refusedT, d.refusedID = due.Add(-time.Nanosecond), maxID()
	default:
		d.refusedT, d.refusedID = time.Time{}, spool.ID{}
	}
}

// maxID sorts after every queue ID: a cursor (t, maxID()) resumes at the
// first entry due after t.
func maxID() (id spool.ID) {
	for i := range id {
		id[i] = 0xff
	}
	return id
}

func (s *Scheduler) dest(name string) *dest {
	d := s.dests[name]
	if d == nil {
		d = &dest{name: name}
		d.stat.Domain = name
		s.dests[name] = d
	}
	return d
}

// finishJob records that a job is over (its outcome is already in the
// spool) and retires its message from the active set when it was the last.
func (s *Scheduler) finishJob(j *job, res *attemptResult, now time.Time) {
	d := j.d
	if res != nil {
		d.stat.Delivered += int64(res.delivered)
		d.stat.Deferred += int64(res.deferred)
		d.stat.Bounced += int64(res.bounced)
		if res.lastReply != "" {
			d.stat.LastReply = res.lastReply
		}
		if res.destFail {
			d.fails++
			d.backoffUntil = now.Add(s.cfg.retryDelay(d.fails, s.rand.Float64()))
			d.stat.BackoffUntil = d.backoffUntil
			s.log.Info("destination backed off", "rcpt_domain", d.name, "until", d.backoffUntil, "fails", d.fails, "reason", res.lastReply)
			if len(d.ready) > 0 {
				s.m.ready.Add(-int64(len(d.ready)))
				s.suspend(d.ready, now)
				d.ready = nil
			}
		} else if res.delivered > 0 || res.bounced > 0 {
			d.lastOK.Store(now.UnixNano())
			d.fails = 0
			d.backoffUntil = time.Time{}
			d.stat.BackoffUntil = time.Time{}
			if d.limit > 0 {
				// Probe upwards again after a run of successes.
				if d.okSince += res.delivered; d.okSince >= limitProbeEvery {
					d.okSince = 0
					if d.limit++; d.limit >= s.cfg.MaxConnectionsPerDomain {
						d.limit = 0
					}
					d.stat.ConnLimit = d.limit
				}
			}
		}
	}
	j.e.jobs--
	if j.e.jobs == 0 {
		j.e.mu.Lock()
		s.uncache(j.e.body)
		j.e.body = nil
		j.e.mu.Unlock()
		delete(s.active, j.e.msg.ID)
		s.m.activeMsgs.Store(int64(len(s.active)))
	}
}

// limitProbeEvery is the number of deliveries after which a lowered
// connection limit is raised by one.
const limitProbeEvery = 50

// requeue puts jobs that were not attempted back at the front of d's queue
// and lowers d's connection limit to the connections that are working:
// the destination caps connections per client (421 at the greeting, or
// refused connections) while it accepts mail on the others.
func (s *Scheduler) requeue(d *dest, jobs []*job, reason string) {
	d.ready = append(append(make([]*job, 0, len(jobs)+len(d.ready)), jobs...), d.ready...)
	s.m.ready.Add(int64(len(jobs)))
	if !d.inRing {
		d.inRing = true
		s.ring = append(s.ring, d)
	}
	d.lastRefused.Store(s.now().UnixNano())
	limit := max(1, d.conns-1) // this connection is closing
	if d.conns <= 1 {
		// No connection of ours is open, yet the server still counts some
		// (closing ones): wait a moment before the next try.
		d.pauseUntil = s.now().Add(limitPause)
	}
	if d.limit == 0 || limit < d.limit {
		d.limit = limit
		d.okSince = 0
		d.stat.ConnLimit = limit
		s.log.Info("destination limits connections: concurrency lowered", "rcpt_domain", d.name, "limit", limit, "reason", reason)
	}
	s.m.requeued.Add(int64(len(jobs)))
}

// limitPause is the wait before reconnecting to a destination that refused
// a connection while none of ours was open.
const limitPause = time.Second

// A destination that accepted mail within recentOKWindow, or refused a
// connection as over its limit within recentRefusedWindow (closing
// connections still count at the server for a moment), and now answers
// 421 at the greeting is limiting connections, not down.
const (
	recentOKWindow      = 30 * time.Second
	recentRefusedWindow = 5 * time.Second
)

// limiting reports whether a temporary refusal of a new connection to d
// at now is the destination's connection cap rather than a failure.
func (d *dest) limiting(now time.Time, refusedBySrv bool) bool {
	if d.open.Load() > 1 {
		return true // other connections of ours to it are open
	}
	if !refusedBySrv {
		return false
	}
	t := now.UnixNano()
	ok, ref := d.lastOK.Load(), d.lastRefused.Load()
	return ok != 0 && t-ok < int64(recentOKWindow) || ref != 0 && t-ref < int64(recentRefusedWindow)
}

// connLimit is d's current connection limit.
func (s *Scheduler) connLimit(d *dest) int {
	n := s.cfg.MaxConnectionsPerDomain
	if d.limit > 0 && d.limit < n {
		n = d.limit
	}
	if s.opt.Limits != nil {
		if c, ok := s.opt.Limits.Allowance(d.name); ok && c < n {
			n = max(c, 0)
		}
	}
	return n
}

// rateBudget returns how many messages d may be sent now under an outside
// rate limit (ConnLimits.Rate), and how long until the next one when
// none; unlimited reports no limit. The budget refills continuously up
// to one second's worth (at least one message).
func (s *Scheduler) rateBudget(d *dest, now time.Time) (n int, wait time.Duration, unlimited bool) {
	if s.opt.Limits == nil {
		return 0, 0, true
	}
	rate, ok := s.opt.Limits.Rate(d.name)
	if !ok {
		return 0, 0, true
	}
	burst := max(rate, 1)
	if d.tokensAt.IsZero() {
		d.tokens = burst
	} else if el := now.Sub(d.tokensAt); el > 0 {
		d.tokens = min(burst, d.tokens+rate*el.Seconds())
	}
	d.tokensAt = now
	if d.tokens >= 1 {
		return int(d.tokens), 0, false
	}
	if rate <= 0 {
		return 0, time.Second, false
	}
	return 0, time.Duration((1 - d.tokens) / rate * float64(time.Second)), false
}

// spend takes n messages from d's rate budget.
func (s *Scheduler) spend(d *dest, n int) {
	if !d.tokensAt.IsZero() {
		d.tokens -= float64(n)
	}
}

// nextFor answers an agent that finished its jobs: more jobs for the same
// destination, idle waiting, or nil (close).
func (s *Scheduler) nextFor(a *agent, destFail bool, now time.Time) {
	d := a.d
	switch {
	case s.closing, destFail, !a.usable, a.sent >= s.cfg.MaxMessagesPerConnection,
		s.opt.Limits != nil && d.conns > s.connLimit(d): // over a lowered (cluster) limit: give the slot back
		a.next <- nil
	case len(d.ready) > 0 && !now.Before(d.backoffUntil) && s.hasBudget(d, now):
		a.next <- s.popBatch(d, a, 1+max(0, s.connLimit(d)-d.conns))
		s.m.busy.Add(1)
	default:
		a.idleSince = now
		d.idle = append(d.idle, a)
		s.m.idle.Add(1)
	}
}

// batchBytes bounds the mail one connection carries in one round trip.
const batchBytes = 1 << 20

// popBatch takes the next jobs of d for agent a: when more is ready than
// the connections that could serve it (free, a included), up to
// PipelineTransactions jobs and batchBytes of mail go out pipelined on one
// connection.
func (s *Scheduler) popBatch(d *dest, a *agent, free int) []*job {
	n := 1
	if free < 1 {
		free = 1
	}
	if len(d.ready) > free {
		n = (len(d.ready) + free - 1) / free
	}
	n = min(n, s.cfg.PipelineTransactions, s.cfg.MaxMessagesPerConnection-a.sent, len(d.ready))
	if budget, _, unlimited := s.rateBudget(d, s.now()); !unlimited {
		n = min(n, budget)
	}
	if n < 1 {
		n = 1
	}
	jobs := make([]*job, 0, n)
	var bytes int64
	for len(jobs) < n {
		j := d.ready[0]
		if len(jobs) > 0 && bytes+j.e.msg.Size > batchBytes {
			break
		}
		bytes += j.e.msg.Size
		jobs = append(jobs, s.pop(d))
	}
	s.spend(d, len(jobs))
	return jobs
}

// hasBudget reports whether d may be sent a message now; when not, new
// connections to it pause until the budget refills.
func (s *Scheduler) hasBudget(d *dest, now time.Time) bool {
	n, wait, unlimited := s.rateBudget(d, now)
	if unlimited || n >= 1 {
		return true
	}
	if until := now.Add(wait); until.After(d.pauseUntil) {
		d.pauseUntil = until
	}
	return false
}

func (s *Scheduler) pop(d *dest) *job {
	j := d.ready[0]
	d.ready[0] = nil
	d.ready = d.ready[1:]
	s.m.ready.Add(-1)
	if d.refused && len(d.ready) <= s.cfg.DestinationQueueLimit/2 {
		// Mail was left in the spool for lack of room: fetch it now,
		// from where the first of it was stepped over (walking a backlog
		// of a million entries from the start at every refill made the
		// drain quadratic).
		d.refused = false
		s.scanAt = time.Time{}
		if d.refusedT.Before(s.cursorT) || d.refusedT.Equal(s.cursorT) && bytes.Compare(d.refusedID[:], s.cursorID[:]) < 0 {
			s.cursorT, s.cursorID = d.refusedT, d.refusedID
		}
	}
	return j
}

// tick closes idle connections past IdleTimeout, returns destinations out
// of backoff to service and scans the spool when it is time.
func (s *Scheduler) tick(now time.Time) {
	for _, d := range s.dests {
		if len(d.idle) > 0 {
			keep := d.idle[:0]
			for _, a := range d.idle {
				if now.Sub(a.idleSince) >= s.cfg.IdleTimeout {
					a.next <- nil
					s.m.idle.Add(-1)
					continue
				}
				keep = append(keep, a)
			}
			clear(d.idle[len(keep):])
			d.idle = keep
		}
		if d.conns == 0 && len(d.ready) == 0 && len(d.idle) == 0 && now.After(d.backoffUntil) &&
			d.stat.Delivered+d.stat.Deferred+d.stat.Bounced == 0 {
			delete(s.dests, d.name) // forget destinations that never did anything
		}
	}
	if !now.Before(s.scanAt) {
		s.scan(now)
	}
}

// scanBudget bounds the due-index entries examined per tick, so a huge
// backlog cannot stall the loop.
const scanBudget = 20000

// scanTime bounds the loop's time in one scan: a huge backlog is walked a
// slice at a time, every tick, while agents keep getting their next jobs
// (one 1M-message backlog starved the other destinations when a scan ran
// to its entry budget on every loop event). A scan yields after
// scanYield as soon as events are waiting (agents asking for work), and
// otherwise uses up to scanTime of the tick.
const (
	scanTime  = 40 * time.Millisecond
	scanYield = time.Millisecond
	// scanSlicesPerTick bounds the yielded slices a scan takes between
	// ticks: with events always waiting (a busy drain) the loop
	// alternates ~1 ms of scanning with a round of events. 40 left the
	// loop half idle in a drain (200k backlog: 4.7-5.5k msg/s against
	// 5.7k with 1000, alternated on a busy machine); the bound only
	// stops a pathological scan from running for ever without a tick.
	scanSlicesPerTick = 1000
	// refusedRunMax consecutive entries for full destinations end a
	// scan's slice and its yielded slices until the next tick.
	refusedRunMax = 4096
)

// scan loads due messages from the spool's due index into the active set,
// resuming where the previous tick stopped; a complete pass waits
// ScanInterval before the next.
func (s *Scheduler) scan(now time.Time) {
	examined, finished, yielded := 0, true, false
	start := time.Now() // real time: the loop's own budget, whatever the clock
	s.inScan = true
	defer func() { s.inScan = false }()
	err := s.st.DueAfterHint(s.cursorT, s.cursorID, now, func(id spool.ID, due time.Time, hint []byte) bool {
		if len(s.active) >= s.cfg.ActiveLimit || examined >= s.scanBudget {
			finished = false
			return false
		}
		if examined&15 == 15 {
			el := time.Since(start)
			if el > scanTime {
				finished = false
				return false
			}
			if el > scanYield && len(s.events) > 0 {
				finished, yielded = false, true
				return false
			}
		}
		if s.refusedRun >= refusedRunMax {
			// A long run of mail for full destinations: go on at one
			// slice per tick (other destinations' mail further on is
			// still found) instead of spending the loop's spare time
			// stepping over a backlog the drain will come back for.
			s.refusedRun = 0
			finished = false
			return false
		}
		examined++
		s.scanPrevT, s.scanPrevID = s.cursorT, s.cursorID
		s.cursorT, s.cursorID = due, id
		if s.active[id] != nil || s.isArriving(id) {
			return true
		}
		if s.refusedAll(hint) {
			s.refusedRun++
			return true
		}
		// The body comes in the same read when the body cache has room
		// (the agent then need not read it again).
		maxBody := int64(-1)
		if s.cachedBytes.Load() < maxCachedBytes {
			maxBody = maxCachedBody
		}
		msg, body, err := s.st.LoadWithBody(id, maxBody)
		if err != nil {
			if !errors.Is(err, spool.ErrNotFound) {
				s.log.Error("loading queued message", "msg_id", id.String(), "err", err)
			}
			return true
		}
		if body != nil && s.cachedBytes.Add(int64(len(body))) > maxCachedBytes {
			s.uncache(body)
			body = nil
		}
		if s.admit(msg, now) {
			s.refusedRun = 0
			s.m.scanned.Add(1)
			s.active[msg.ID].body = body
		} else {
			s.refusedRun++
			s.uncache(body)
		}
		return true
	})
	if err != nil {
		s.log.Error("scanning the due index", "err", err)
	}
	if !finished {
		if yielded && s.scanSlices < scanSlicesPerTick {
			// Events were waiting: go on from the cursor right after
			// them, so that a drain is fed by slices of scanYield
			// between events instead of one slice per tick (which held
			// the drain of a backlog to ~1 ms of loading per 50 ms).
			s.scanSlices++
			s.scanAt = now
			return
		}
		// Go on from the cursor at the next tick, not at every event.
		s.scanSlices = 0
		s.scanAt = now.Add(tickEvery)
		return
	}
	s.scanSlices = 0
	s.cursorT, s.cursorID = time.Time{}, spool.ID{}
	s.scanAt = now.Add(s.cfg.ScanInterval)
	if next, ok := s.st.NextDue(); ok && next.After(now) && next.Before(s.scanAt) {
		s.scanAt = next
	}
}

// dispatch hands ready jobs to idle connections and opens new ones within
// the per-destination and global limits, round-robin over destinations.
func (s *Scheduler) dispatch(now time.Time) {
	keep := s.ring[:0]
	for _, d := range s.ring {
		for len(d.ready) > 0 && !now.Before(d.backoffUntil) {
			if !s.hasBudget(d, now) {
				break
			}
			if n := len(d.idle); n > 0 {
				a := d.idle[n-1]
				d.idle[n-1] = nil
				d.idle = d.idle[:n-1]
				s.m.idle.Add(-1)
				s.m.busy.Add(1)
				a.next <- s.popBatch(d, a, n+max(0, s.connLimit(d)-d.conns))
				continue
			}
			if d.conns >= s.connLimit(d) || now.Before(d.pauseUntil) {
				break
			}
			if s.conns >= s.cfg.MaxConnections {
				// Idle connections elsewhere give way to waiting mail.
				s.closeIdleElsewhere(d)
				break
			}
			d.conns++
			if s.opt.Limits != nil {
				s.opt.Limits.Opened(d.name)
			}
			d.open.Add(1)
			s.conns++
			s.m.conns.Add(1)
			s.m.busy.Add(1)
			a := &agent{d: d, next: make(chan []*job, 1), rand: rand.New(rand.NewPCG(s.rand.Uint64(), 2))}
			s.spawn(a, s.popBatch(d, a, s.connLimit(d)-d.conns+1))
		}
		if len(d.ready) > 0 {
			keep = append(keep, d)
		} else {
			d.inRing = false
		}
	}
	clear(s.ring[len(keep):])
	s.ring = keep
}

// closeIdleElsewhere closes one idle connection of another destination so
// that d can open one (the slot frees when the agent has ended).
func (s *Scheduler) closeIdleElsewhere(d *dest) {
	for _, o := range s.dests {
		if o == d || len(o.idle) == 0 {
			continue
		}
		n := len(o.idle)
		a := o.idle[n-1]
		o.idle[n-1] = nil
		o.idle = o.idle[:n-1]
		s.m.idle.Add(-1)
		a.next <- nil
		return
	}
}

// suspend defers jobs of a backed-off destination without connecting: the
// recipients wait in the spool until the backoff ends.
func (s *Scheduler) suspend(jobs []*job, now time.Time) {
	jobs = append([]*job(nil), jobs...)
	until := jobs[0].d.backoffUntil
	reason := "delivery temporarily suspended: " + jobs[0].d.stat.LastReply
	seed := s.rand.Uint64()
	s.agentWG.Add(1)
	go func() {
		defer s.agentWG.Done()
		r := rand.New(rand.NewPCG(seed, 3))
		for _, j := range jobs {
			// Spread the suspended mail over a fraction of the backoff.
			at := until.Add(time.Duration(r.Float64() * s.cfg.Jitter * float64(until.Sub(now))))
			s.suspendJob(j, now, at, reason)
		}
		s.events <- evSuspended{jobs}
	}()
}

// Flush makes all queued mail due now (Postfix's postqueue -f): every
// destination backoff is lifted and the spool's due index scanned at once.
// The caller has already moved the messages' due times (spool.Reschedule).
func (s *Scheduler) Flush() {
	s.query(func() {
		for _, d := range s.dests {
			d.backoffUntil = time.Time{}
			d.stat.BackoffUntil = time.Time{}
			d.fails = 0
			if len(d.ready) > 0 && !d.inRing {
				d.inRing = true
				s.ring = append(s.ring, d)
			}
		}
		s.scanAt = time.Time{}
		s.cursorT, s.cursorID = time.Time{}, spool.ID{}
	})
}

// DomainStat is the per-destination view of the admin API (top-N domains
// rather than per-domain metric labels).
type DomainStat struct {
	Domain       string    `json:"domain"`
	Ready        int       `json:"ready"`
	Connections  int       `json:"connections"`
	Delivered    int64     `json:"delivered"`
	Deferred     int64     `json:"deferred"`
	Bounced      int64     `json:"bounced"`
	ConnLimit    int       `json:"conn_limit,omitempty"` // lowered connection limit, when the destination caps connections
	BackoffUntil time.Time `json:"backoff_until,omitzero"`
	LastReply    string    `json:"last_reply,omitempty"`
}

// TopDomains returns up to n destinations, busiest first (ready jobs, then
// connections, then deliveries).
func (s *Scheduler) TopDomains(n int) []DomainStat {
	var out []DomainStat
	s.query(func() {
		for _, d := range s.dests {
			st := d.stat
			st.Ready = len(d.ready)
			st.Connections = d.conns
			out = append(out, st)
		}
	})
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Ready != b.Ready {
			return a.Ready > b.Ready
		}
		if a.Connections != b.Connections {
			return a.Connections > b.Connections
		}
		if a.Delivered+a.Deferred+a.Bounced != b.Delivered+b.Deferred+b.Bounced {
			return a.Delivered+a.Deferred+a.Bounced > b.Delivered+b.Deferred+b.Bounced
		}
		return a.Domain < b.Domain
	})
	if n > 0 && len(out) > n {
		out = out[:n]
	}
	return out
}

package engine

import (
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"time"
)

// DomainStats records deliverability per destination domain over a
// sliding window: for every minute and domain, how many recipients were
// delivered, deferred, bounced and expired, and a histogram of the
// delivered ones' latency (time since acceptance). It is fed delivery
// records (SchedulerOptions.Observe) and answers Snapshot for any window
// inside its retention; reports of several nodes add up with MergeReports.
//
// Concurrency: Observe and Snapshot may be called from any goroutine. One
// mutex guards the state; Observe holds it for a map lookup and a few
// increments and allocates nothing for a domain and minute already seen
// (a new minute reuses the memory of expired ones). Snapshot holds it
// while it sums the window's buckets: O(domains × minutes in the window).
//
// Memory is bounded twice: at most MaxDomains domains are tracked (records
// of further domains are counted under OtherDomain until a tracked domain
// has had no record for the whole retention), and at most MaxBuckets
// (domain, minute) buckets of about 270 bytes are held. When the bucket
// budget is used up the oldest bucket is dropped before its time, and a
// report whose window covers a dropped minute says so (Report.Partial).
//
// Time: a record is counted in the minute of its Time. A record older
// than the retention relative to the newest record seen is ignored, so
// record times must come from one clock (the scheduler's): a record far in
// the future would expire everything and make the present look too old.
type DomainStats struct {
	opt    DomainStatsOptions
	retMin int64 // retention in minutes

	mu      sync.Mutex
	index   map[string]int32 // domain name → index into domains
	domains []statsDomain
	freeDom []int32 // indexes of deleted domains, for reuse
	other   int32   // index of OtherDomain (never deleted)
	chunks  [][]statsSlot
	nslots  int32     // slot indexes handed out so far (high-water mark)
	free    []int32   // slot indexes no longer in use
	order   slotQueue // live slots, oldest created first
	newest  int64     // newest minute seen
	evicted int64     // newest minute of a bucket dropped for the budget
	live    int       // live slots
}

// DomainStatsOptions configures a DomainStats. Zero or negative fields
// take their defaults.
type DomainStatsOptions struct {
	// Retention is how far back reports can reach; it is rounded up to
	// whole minutes. Default: 24h.
	Retention time.Duration
	// MaxDomains caps the number of domains tracked at once, OtherDomain
	// included; records of further domains are counted under OtherDomain.
	// Default: 1000.
	MaxDomains int
	// MaxBuckets caps the number of per-domain minute buckets held (about
	// 270 bytes each). Default: 100000 (about 27 MB), enough for 70
	// domains busy in every minute of 24 hours plus many occasional ones.
	MaxBuckets int
	// Now is the clock for records that carry no Time. Default: time.Now.
	Now func() time.Time
}

// Default values of DomainStatsOptions.
const (
	DefaultStatsRetention  = 24 * time.Hour
	DefaultStatsMaxDomains = 1000
	DefaultStatsMaxBuckets = 100000
)

// OtherDomain is the row that counts the records of domains beyond
// DomainStatsOptions.MaxDomains and records without a domain.
const OtherDomain = "(other)"

// EnsureDefaults replaces zero or negative fields by their defaults.
func (o *DomainStatsOptions) EnsureDefaults() {
	if o.Retention <= 0 {
		o.Retention = DefaultStatsRetention
	}
	if o.MaxDomains <= 1 {
		o.MaxDomains = DefaultStatsMaxDomains
	}
	if o.MaxBuckets <= 0 {
		o.MaxBuckets = DefaultStatsMaxBuckets
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

// Outcome indexes of a bucket's counters.
const (
	statDelivered = iota
	statDeferred
	statBounced
	statExpired
	statOutcomes
)

type statsSlot struct {
	minute int64
	dom    int32
	n      [statOutcomes]uint32
	hist   [LatencyBuckets]uint32
}

type statsDomain struct {
	name  string
	slots slotQueue // this domain's slots, oldest minute first
}

const statsChunk = 256 // slots per allocation

// NewDomainStats returns an empty recorder.
func NewDomainStats(opt DomainStatsOptions) *DomainStats {
	opt.EnsureDefaults()
	s := &DomainStats{
		opt:     opt,
		retMin:  int64((opt.Retention + time.Minute - 1) / time.Minute),
		index:   make(map[string]int32),
		newest:  math.MinInt64,
		evicted: math.MinInt64,
	}
	s.domains = append(s.domains, statsDomain{name: OtherDomain})
	s.index[OtherDomain] = 0
	s.other = 0
	return s
}

// Observe counts one delivery record: events "delivered", "deferred",
// "bounced" and "expired"; other events are ignored. It keeps no
// reference to rec.
func (s *DomainStats) Observe(rec *DeliveryRecord) {
	var ev int
	switch rec.Event {
	case "delivered":
		ev = statDelivered
	case "deferred":
		ev = statDeferred
	case "bounced":
		ev = statBounced
	case "expired":
		ev = statExpired
	default:
		return
	}
	t := rec.Time
	if t.IsZero() {
		t = s.opt.Now()
	}
	m := minuteOf(t)
	hb := 0
	if ev == statDelivered {
		hb = latencyBucket(rec.Delay)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if m > s.newest {
		s.newest = m
		s.expireLocked()
	} else if m <= s.newest-s.retMin {
		return // older than the retention
	}
	sl := s.slotLocked(s.domainLocked(rec.Domain), m)
	sl.n[ev]++
	if ev == statDelivered {
		sl.hist[hb]++
	}
}

func minuteOf(t time.Time) int64 {
	u := t.Unix()
	if u < 0 {
		return (u - 59) / 60
	}
	return u / 60
}

func (s *DomainStats) slot(i int32) *statsSlot { return &s.chunks[i/statsChunk][i%statsChunk] }

// domainLocked returns the index of the domain, adding it if there is room.
func (s *DomainStats) domainLocked(name string) int32 {
	if d, ok := s.index[name]; ok {
		return d
	}
	if name == "" || len(s.index) >= s.opt.MaxDomains {
		return s.other
	}
	name = strings.Clone(name)
	var d int32
	if n := len(s.freeDom); n > 0 {
		d = s.freeDom[n-1]
		s.freeDom = s.freeDom[:n-1]
		s.domains[d] = statsDomain{name: name, slots: s.domains[d].slots}
	} else {
		d = int32(len(s.domains))
		s.domains = append(s.domains, statsDomain{name: name})
	}
	s.index[name] = d
	return d
}

// slotLocked returns domain d's bucket of minute m, making it if needed.
func (s *DomainStats) slotLocked(d int32, m int64) *statsSlot {
	q := &s.domains[d].slots
	for k := q.len() - 1; k >= 0; k-- {
		sl := s.slot(q.at(k))
		if sl.minute == m {
			return sl
		}
		if sl.minute < m {
			break
		}
	}
	i := s.allocLocked(d)
	// Allocation may have dropped one of d's buckets: find the place now.
	q = &s.domains[d].slots
	k := q.len()
	for k > 0 && s.slot(q.at(k-1)).minute > m {
		k--
	}
	q.insert(k, i)
	sl := s.slot(i)
	*sl = statsSlot{minute: m, dom: d}
	return sl
}

// allocLocked returns an unused slot index, dropping the oldest bucket if
// the budget is used up; keep is a domain not to delete even if it loses
// its last bucket.
func (s *DomainStats) allocLocked(keep int32) int32 {
	var i int32
	switch {
	case len(s.free) > 0:
		i = s.free[len(s.free)-1]
		s.free = s.free[:len(s.free)-1]
	case int(s.nslots) < s.opt.MaxBuckets:
		i = s.nslots
		s.nslots++
		if int(i/statsChunk) == len(s.chunks) {
			s.chunks = append(s.chunks, make([]statsSlot, statsChunk))
		}
	default:
		if m := s.slot(s.order.at(0)).minute; m > s.evicted {
			s.evicted = m
		}
		s.dropOldestLocked(keep) // frees its slot
		i = s.free[len(s.free)-1]
		s.free = s.free[:len(s.free)-1]
	}
	s.order.push(i)
	s.live++
	return i
}

// expireLocked drops the buckets that have left the retention.
func (s *DomainStats) expireLocked() {
	for s.order.len() > 0 && s.slot(s.order.at(0)).minute <= s.newest-s.retMin {
		s.dropOldestLocked(-1)
	}
}

// dropOldestLocked frees the oldest created bucket and, unless it is keep
// or OtherDomain, deletes a domain left without buckets.
func (s *DomainStats) dropOldestLocked(keep int32) {
	i := s.order.pop()
	s.live--
	s.free = append(s.free, i)
	d := s.slot(i).dom
	q := &s.domains[d].slots
	if q.len() > 0 && q.at(0) == i {
		q.pop()
	} else {
		for k := 0; k < q.len(); k++ {
			if q.at(k) == i {
				q.remove(k)
				break
			}
		}
	}
	if q.len() == 0 && d != keep && d != s.other {
		delete(s.index, s.domains[d].name)
		s.domains[d].name = ""
		s.freeDom = append(s.freeDom, d)
	}
}

// Snapshot reports the window from since to now, widened to whole minutes
// (since is rounded down to its minute, now's minute is included) and cut
// to the retention. Domains are listed busiest first.
func (s *DomainStats) Snapshot(since, now time.Time) Report {
	sm, nm := minuteOf(since), minuteOf(now)
	if lo := nm - s.retMin + 1; sm < lo {
		sm = lo
	}
	r := Report{Since: time.Unix(sm*60, 0).UTC(), Until: now.UTC(), Domains: []DomainReport{}}
	s.mu.Lock()
	r.Partial = s.evicted >= sm
	for d := range s.domains {
		q := &s.domains[d].slots
		if q.len() == 0 {
			continue
		}
		var row DomainReport
		for k := q.len() - 1; k >= 0; k-- {
			sl := s.slot(q.at(k))
			if sl.minute > nm {
				continue
			}
			if sl.minute < sm {
				break
			}
			row.Delivered += uint64(sl.n[statDelivered])
			row.Deferred += uint64(sl.n[statDeferred])
			row.Bounced += uint64(sl.n[statBounced])
			row.Expired += uint64(sl.n[statExpired])
			if sl.n[statDelivered] > 0 {
				for b, c := range sl.hist {
					row.Latency[b] += uint64(c)
				}
			}
		}
		if row.events() > 0 {
			row.Domain = s.domains[d].name
			r.Domains = append(r.Domains, row)
		}
	}
	s.mu.Unlock()
	r.finish()
	return r
}

// Report is deliverability per destination domain over a window; it
// encodes to JSON and reports of several nodes add up with MergeReports.
type Report struct {
	// Since and Until bound the window (Since rounded down to a minute).
	Since time.Time `json:"since"`
	Until time.Time `json:"until"`
	// Partial says that buckets inside the window were dropped early
	// because of DomainStatsOptions.MaxBuckets: the counts are too low.
	Partial bool `json:"partial,omitempty"`
	// Domains are the domains with records in the window, busiest (most
	// records) first.
	Domains []DomainReport `json:"domains"`
	// Total adds up all domains of the window, including any that Top or
	// Only left out of Domains.
	Total DomainReport `json:"total"`
}

// DomainReport is one domain's row of a Report.
type DomainReport struct {
	Domain    string `json:"domain,omitempty"`
	Delivered uint64 `json:"delivered"`
	Deferred  uint64 `json:"deferred"`
	Bounced   uint64 `json:"bounced"`
	Expired   uint64 `json:"expired"`
	// P50, P90 and P99 are latency percentiles of the delivered
	// recipients in seconds since acceptance, estimated from Latency
	// (within its bucket width of ±19%); 0 without deliveries.
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
	// Latency is the histogram of the delivered recipients' latency.
	Latency LatencyHistogram `json:"latency"`
}

func (d *DomainReport) events() uint64 { return d.Delivered + d.Deferred + d.Bounced + d.Expired }

func (d *DomainReport) add(o *DomainReport) {
	d.Delivered += o.Delivered
	d.Deferred += o.Deferred
	d.Bounced += o.Bounced
	d.Expired += o.Expired
	for b, c := range o.Latency {
		d.Latency[b] += c
	}
}

func (d *DomainReport) percentiles() {
	d.P50 = d.Latency.Quantile(0.50)
	d.P90 = d.Latency.Quantile(0.90)
	d.P99 = d.Latency.Quantile(0.99)
}

// finish sorts the domains, computes their percentiles and the total.
func (r *Report) finish() {
	r.Total = DomainReport{}
	for i := range r.Domains {
		r.Domains[i].percentiles()
		r.Total.add(&r.Domains[i])
	}
	r.Total.percentiles()
	sortDomainReports(r.Domains)
}

func sortDomainReports(rows []DomainReport) {
	slices.SortFunc(rows, func(a, b DomainReport) int {
		if ea, eb := a.events(), b.events(); ea != eb {
			if ea > eb {
				return -1
			}
			return 1
		}
		return strings.Compare(a.Domain, b.Domain)
	})
}

// MergeReports adds reports (of different nodes, for the same window):
// counts and histograms per domain and in total; percentiles are
// recomputed from the summed histograms. The window is the union of the
// windows. Reports cut by Top or Only merge into a report whose Total is
// right but whose Domains may miss counts of the cut rows: merge whole
// reports, then cut.
func MergeReports(rs ...Report) Report {
	out := Report{Domains: []DomainReport{}}
	pos := make(map[string]int)
	for _, r := range rs {
		if !r.Since.IsZero() && (out.Since.IsZero() || r.Since.Before(out.Since)) {
			out.Since = r.Since
		}
		if r.Until.After(out.Until) {
			out.Until = r.Until
		}
		out.Partial = out.Partial || r.Partial
		for i := range r.Domains {
			d := &r.Domains[i]
			k, ok := pos[d.Domain]
			if !ok {
				k = len(out.Domains)
				pos[d.Domain] = k
				out.Domains = append(out.Domains, DomainReport{Domain: d.Domain})
			}
			out.Domains[k].add(d)
		}
		out.Total.add(&r.Total)
	}
	for i := range out.Domains {
		out.Domains[i].percentiles()
	}
	out.Total.percentiles()
	sortDomainReports(out.Domains)
	return out
}

// Top returns r with only its n busiest domains (all if n <= 0); Total
// still counts them all.
func (r Report) Top(n int) Report {
	if n > 0 && len(r.Domains) > n {
		r.Domains = slices.Clone(r.Domains[:n])
	}
	return r
}

// Only returns r with only the row of domain (compared without regard to
// case), or no row if it had no records; Total still counts all domains.
func (r Report) Only(domain string) Report {
	rows := []DomainReport{}
	for _, d := range r.Domains {
		if strings.EqualFold(d.Domain, domain) {
			rows = append(rows, d)
		}
	}
	r.Domains = rows
	return r
}

// LatencyBuckets is the number of buckets of a LatencyHistogram.
const LatencyBuckets = 61

// LatencyHistogram counts latencies in fixed log-scale buckets, two per
// doubling: bucket 0 holds [0, 1 ms), bucket i in 1…59 holds
// [2^((i-1)/2) ms, 2^(i/2) ms), and bucket 60 everything from 2^29.5 ms
// (8.8 days) up. Every histogram has the same buckets, so histograms of
// different minutes and nodes merge by adding.
//
// In JSON it is a list of [bucket, count] pairs for the non-empty buckets.
type LatencyHistogram [LatencyBuckets]uint64

// latencyBucket returns the bucket of a latency in seconds.
func latencyBucket(sec float64) int {
	ms := sec * 1000
	if !(ms >= 1) { // also NaN
		return 0
	}
	if math.IsInf(ms, 1) {
		return LatencyBuckets - 1
	}
	frac, exp := math.Frexp(ms) // ms = frac × 2^exp, frac in [0.5, 1)
	b := 2*(exp-1) + 1
	if frac >= math.Sqrt2/2 {
		b++
	}
	return min(b, LatencyBuckets-1)
}

// LatencyBucketBounds returns the lower and upper bound of bucket b in
// seconds; the last bucket's upper bound is +Inf.
func LatencyBucketBounds(b int) (lo, hi float64) {
	switch {
	case b <= 0:
		return 0, 0.001
	case b >= LatencyBuckets-1:
		return math.Exp2(float64(LatencyBuckets-2)/2) / 1000, math.Inf(1)
	}
	return math.Exp2(float64(b-1)/2) / 1000, math.Exp2(float64(b)/2) / 1000
}

// Count returns the number of latencies in the histogram.
func (h *LatencyHistogram) Count() uint64 {
	var n uint64
	for _, c := range h {
		n += c
	}
	return n
}

// Quantile estimates the q-quantile (0 < q ≤ 1) in seconds: it finds the
// bucket of the rank and interpolates inside it (geometrically, linearly
// in bucket 0), so the estimate lies in the bucket of the true value; the
// last, open bucket answers its lower bound. 0 for an empty histogram.
func (h *LatencyHistogram) Quantile(q float64) float64 {
	n := h.Count()
	if n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(n)))
	rank = max(1, min(rank, n))
	var before uint64
	for b, c := range h {
		if c == 0 || before+c < rank {
			before += c
			continue
		}
		f := (float64(rank-before) - 0.5) / float64(c) // in (0, 1)
		lo, hi := LatencyBucketBounds(b)
		switch {
		case b == 0:
			return f * hi
		case math.IsInf(hi, 1):
			return lo
		}
		return lo * math.Pow(hi/lo, f)
	}
	return 0 // not reached
}

// MarshalJSON encodes the non-empty buckets as [bucket, count] pairs.
func (h LatencyHistogram) MarshalJSON() ([]byte, error) {
	b := []byte{'['}
	for i, c := range h {
		if c == 0 {
			continue
		}
		if len(b) > 1 {
			b = append(b, ',')
		}
		b = fmt.Appendf(b, "[%d,%d]", i, c)
	}
	return append(b, ']'), nil
}

// UnmarshalJSON decodes what MarshalJSON encodes; a bucket out of range
// is an error.
func (h *LatencyHistogram) UnmarshalJSON(data []byte) error {
	var pairs [][2]uint64
	if err := json.Unmarshal(data, &pairs); err != nil {
		return fmt.Errorf("latency histogram: %w", err)
	}
	*h = LatencyHistogram{}
	for _, p := range pairs {
		if p[0] >= LatencyBuckets {
			return fmt.Errorf("latency histogram: bucket %d out of range (0…%d)", p[0], LatencyBuckets-1)
		}
		h[p[0]] += p[1]
	}
	return nil
}

// slotQueue is a double-ended list of slot indexes that reuses its array:
// pushing at the back after popping at the front allocates nothing once
// the array has grown to the live size.
type slotQueue struct {
	buf  []int32
	head int
}

func (q *slotQueue) len() int       { return len(q.buf) - q.head }
func (q *slotQueue) at(k int) int32 { return q.buf[q.head+k] }

func (q *slotQueue) pop() int32 {
	v := q.buf[q.head]
	q.head++
	if q.head == len(q.buf) {
		q.buf, q.head = q.buf[:0], 0
	}
	return v
}

func (q *slotQueue) push(v int32) { q.insert(q.len(), v) }

// insert puts v before the element at k (at the back for k == len).
func (q *slotQueue) insert(k int, v int32) {
	if len(q.buf) == cap(q.buf) && q.head > 0 {
		n := copy(q.buf, q.buf[q.head:])
		q.buf, q.head = q.buf[:n], 0
	}
	k += q.head
	q.buf = append(q.buf, 0)
	copy(q.buf[k+1:], q.buf[k:])
	q.buf[k] = v
}

func (q *slotQueue) remove(k int) {
	k += q.head
	copy(q.buf[k:], q.buf[k+1:])
	q.buf = q.buf[:len(q.buf)-1]
}

package engine

import (
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// statsT0 is a minute boundary: 2030-01-02 03:04:00 UTC.
var statsT0 = time.Date(2030, 1, 2, 3, 4, 0, 0, time.UTC)

func statsRec(ev, domain string, at time.Duration, delay float64) *DeliveryRecord {
	return &DeliveryRecord{Time: statsT0.Add(at), Event: ev, Domain: domain, Delay: delay}
}

// counts is a compact view of a row for comparisons.
type counts struct{ del, def, bnc, exp uint64 }

func rowCounts(r DomainReport) counts { return counts{r.Delivered, r.Deferred, r.Bounced, r.Expired} }

func reportCounts(r Report) map[string]counts {
	m := map[string]counts{}
	for _, d := range r.Domains {
		m[d.Domain] = rowCounts(d)
	}
	return m
}

func TestDomainStatsWindow(t *testing.T) {
	s := NewDomainStats(DomainStatsOptions{})
	for _, r := range []*DeliveryRecord{
		statsRec("delivered", "a.test", 10*time.Second, 1), // minute 0
		statsRec("deferred", "a.test", 59*time.Second, 0),  // minute 0
		statsRec("delivered", "a.test", 60*time.Second, 2), // minute 1
		statsRec("bounced", "b.test", 5*time.Minute, 0),    // minute 5
		statsRec("expired", "b.test", 5*time.Minute+59*time.Second, 0),
		statsRec("received", "b.test", 5*time.Minute, 0),      // not an outcome: ignored
		statsRec("delivered", "c.test", 9*time.Minute, 0.004), // minute 9
	} {
		s.Observe(r)
	}
	for _, tc := range []struct {
		name       string
		since, now time.Duration
		want       map[string]counts
		total      counts
	}{
		{"all", -time.Hour, 10 * time.Minute,
			map[string]counts{"a.test": {2, 1, 0, 0}, "b.test": {0, 0, 1, 1}, "c.test": {1, 0, 0, 0}}, counts{3, 1, 1, 1}},
		{"since rounds down to its minute", 59 * time.Second, 10 * time.Minute,
			map[string]counts{"a.test": {2, 1, 0, 0}, "b.test": {0, 0, 1, 1}, "c.test": {1, 0, 0, 0}}, counts{3, 1, 1, 1}},
		{"from minute 1", 60 * time.Second, 10 * time.Minute,
			map[string]counts{"a.test": {1, 0, 0, 0}, "b.test": {0, 0, 1, 1}, "c.test": {1, 0, 0, 0}}, counts{2, 0, 1, 1}},
		{"now's minute is included", 2 * time.Minute, 5 * time.Minute,
			map[string]counts{"b.test": {0, 0, 1, 1}}, counts{0, 0, 1, 1}},
		{"window ends before minute 5", 0, 4*time.Minute + 59*time.Second,
			map[string]counts{"a.test": {2, 1, 0, 0}}, counts{2, 1, 0, 0}},
		{"empty window", 2 * time.Minute, 4 * time.Minute, map[string]counts{}, counts{}},
		{"window in the future", time.Hour, 2 * time.Hour, map[string]counts{}, counts{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := s.Snapshot(statsT0.Add(tc.since), statsT0.Add(tc.now))
			if got := reportCounts(r); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("domains = %v, want %v", got, tc.want)
			}
			if got := rowCounts(r.Total); got != tc.total {
				t.Errorf("total = %v, want %v", got, tc.total)
			}
			if r.Partial {
				t.Error("partial without evictions")
			}
			if r.Domains == nil {
				t.Error("Domains is nil (encodes as null)")
			}
		})
	}
	r := s.Snapshot(statsT0.Add(30*time.Second), statsT0.Add(10*time.Minute))
	if !r.Since.Equal(statsT0) || !r.Until.Equal(statsT0.Add(10*time.Minute)) {
		t.Errorf("window = %v … %v, want %v … %v", r.Since, r.Until, statsT0, statsT0.Add(10*time.Minute))
	}
	// Busiest first: a.test (3 records), b.test (2), c.test (1).
	var order []string
	for _, d := range r.Domains {
		order = append(order, d.Domain)
	}
	if want := []string{"a.test", "b.test", "c.test"}; !reflect.DeepEqual(order, want) {
		t.Errorf("order = %v, want %v", order, want)
	}
}

func TestDomainStatsRetention(t *testing.T) {
	s := NewDomainStats(DomainStatsOptions{Retention: 10 * time.Minute})
	s.Observe(statsRec("delivered", "a.test", 0, 1))
	s.Observe(statsRec("delivered", "a.test", 9*time.Minute, 1))
	all := func(now time.Duration) counts {
		return rowCounts(s.Snapshot(statsT0.Add(-24*time.Hour), statsT0.Add(now)).Total)
	}
	if got := all(9 * time.Minute); got != (counts{del: 2}) {
		t.Fatalf("within retention: %v, want 2 delivered", got)
	}
	// A report never reaches further back than the retention, even before
	// a newer record has expired the old bucket.
	if got := all(10 * time.Minute); got != (counts{del: 1}) {
		t.Fatalf("minute 0 left the retention: %v, want 1 delivered", got)
	}
	if s.live != 2 {
		t.Fatalf("live buckets = %d, want 2 (nothing expired yet)", s.live)
	}
	// A record of minute 10 expires minute 0's bucket.
	s.Observe(statsRec("deferred", "b.test", 10*time.Minute, 0))
	if s.live != 2 {
		t.Fatalf("live buckets = %d, want 2 after expiry", s.live)
	}
	// A record older than the retention is ignored.
	s.Observe(statsRec("delivered", "a.test", 30*time.Second, 1))
	if got := all(10 * time.Minute); got != (counts{del: 1, def: 1}) {
		t.Fatalf("after a late record: %v, want 1 delivered 1 deferred", got)
	}
	// A late record inside the retention lands in its minute.
	s.Observe(statsRec("bounced", "a.test", 5*time.Minute, 0))
	r := s.Snapshot(statsT0.Add(5*time.Minute), statsT0.Add(5*time.Minute))
	if got := rowCounts(r.Total); got != (counts{bnc: 1}) {
		t.Fatalf("late record: %v, want 1 bounced in minute 5", got)
	}
	// Everything expires; domains without buckets are forgotten.
	s.Observe(statsRec("deferred", "c.test", time.Hour, 0))
	if s.live != 1 || len(s.index) != 2 { // c.test and (other)
		t.Fatalf("after an hour: %d buckets, domains %v; want 1 bucket, c.test and (other)", s.live, s.index)
	}
}

func TestDomainStatsMaxDomains(t *testing.T) {
	s := NewDomainStats(DomainStatsOptions{Retention: 10 * time.Minute, MaxDomains: 3})
	for _, d := range []string{"a.test", "b.test", "c.test", "d.test", ""} {
		s.Observe(statsRec("delivered", d, 0, 1))
	}
	s.Observe(statsRec("delivered", "a.test", 5*time.Minute, 1))
	got := reportCounts(s.Snapshot(statsT0, statsT0.Add(5*time.Minute)))
	want := map[string]counts{"a.test": {del: 2}, "b.test": {del: 1}, OtherDomain: {del: 3}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	// b.test's only bucket expires: its place goes to the next new domain.
	s.Observe(statsRec("delivered", "e.test", 10*time.Minute, 1))
	got = reportCounts(s.Snapshot(statsT0.Add(10*time.Minute), statsT0.Add(10*time.Minute)))
	if want := map[string]counts{"e.test": {del: 1}}; !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestDomainStatsMaxBuckets(t *testing.T) {
	s := NewDomainStats(DomainStatsOptions{MaxBuckets: 3})
	for m := range 5 {
		s.Observe(statsRec("delivered", "a.test", time.Duration(m)*time.Minute, 1))
	}
	s.Observe(statsRec("deferred", "b.test", 4*time.Minute, 0)) // drops minute 2
	if s.live != 3 || s.nslots != 3 {
		t.Fatalf("buckets: %d live, %d allocated; want 3, 3", s.live, s.nslots)
	}
	for _, tc := range []struct {
		since   time.Duration
		partial bool
		total   counts
	}{
		{0, true, counts{del: 2, def: 1}},
		{2 * time.Minute, true, counts{del: 2, def: 1}},
		{3 * time.Minute, false, counts{del: 2, def: 1}},
		{4 * time.Minute, false, counts{del: 1, def: 1}},
	} {
		r := s.Snapshot(statsT0.Add(tc.since), statsT0.Add(4*time.Minute))
		if r.Partial != tc.partial || rowCounts(r.Total) != tc.total {
			t.Errorf("since +%v: partial %v total %v; want %v %v", tc.since, r.Partial, rowCounts(r.Total), tc.partial, tc.total)
		}
	}
}

func TestLatencyBucket(t *testing.T) {
	for _, tc := range []struct {
		sec  float64
		want int
	}{
		{-1, 0}, {math.NaN(), 0}, {0, 0}, {0.0009, 0},
		{0.001, 1}, {0.0014, 1}, {0.00142, 2}, {0.002, 3}, {0.0029, 4},
		{1, 20}, // 1000 ms = 2^9.97: [2^9.5, 2^10) ms
		{1.024, 21},
		{7 * 86400, 59},
		{9 * 86400, 60}, {math.Inf(1), 60},
	} {
		got := latencyBucket(tc.sec)
		if got != tc.want {
			t.Errorf("latencyBucket(%v) = %d, want %d", tc.sec, got, tc.want)
			continue
		}
		if lo, hi := LatencyBucketBounds(got); tc.sec >= 0 && !(tc.sec >= lo && (tc.sec < hi || math.IsInf(hi, 1))) {
			t.Errorf("%v is not in the bounds of its bucket %d: [%v, %v)", tc.sec, got, lo, hi)
		}
	}
	// The buckets tile the range without gaps.
	for b := 1; b < LatencyBuckets; b++ {
		_, prevHi := LatencyBucketBounds(b - 1)
		if lo, _ := LatencyBucketBounds(b); math.Abs(lo-prevHi) > 1e-12*lo {
			t.Errorf("bucket %d starts at %v, bucket %d ends at %v", b, lo, b-1, prevHi)
		}
	}
}

func TestLatencyQuantile(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, tc := range []struct {
		name    string
		samples func() []float64
	}{
		{"one", func() []float64 { return []float64{0.25} }},
		{"constant", func() []float64 { return repeat(3, 100) }},
		{"two groups", func() []float64 { return append(repeat(0.01, 95), repeat(100, 5)...) }},
		{"sub-millisecond", func() []float64 { return repeat(0.0002, 10) }},
		{"uniform", func() []float64 {
			var v []float64
			for range 1000 {
				v = append(v, rng.Float64()*60)
			}
			return v
		}},
		{"log-normal", func() []float64 {
			var v []float64
			for range 1000 {
				v = append(v, math.Exp(rng.NormFloat64()*2))
			}
			return v
		}},
		{"beyond the last bound", func() []float64 { return repeat(30*86400, 3) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			samples := tc.samples()
			var h LatencyHistogram
			for _, v := range samples {
				h[latencyBucket(v)]++
			}
			sorted := append([]float64(nil), samples...)
			slices.Sort(sorted)
			for _, q := range []float64{0.5, 0.9, 0.99} {
				rank := max(1, int(math.Ceil(q*float64(len(sorted)))))
				exact := sorted[rank-1]
				got := h.Quantile(q)
				// The estimate lies in the bucket of the exact value.
				lo, hi := LatencyBucketBounds(latencyBucket(exact))
				if got < lo || got > hi {
					t.Errorf("q%v = %v, exact %v: want it in [%v, %v]", q, got, exact, lo, hi)
				}
			}
		})
	}
	var empty LatencyHistogram
	if got := empty.Quantile(0.5); got != 0 {
		t.Errorf("empty histogram: %v, want 0", got)
	}
}

func repeat(v float64, n int) []float64 {
	out := make([]float64, n)
	for i := range out {
		out[i] = v
	}
	return out
}

// TestMergeReports checks that the merged reports of two nodes equal the
// report of one recorder that saw every record.
func TestMergeReports(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	nodes := []*DomainStats{NewDomainStats(DomainStatsOptions{}), NewDomainStats(DomainStatsOptions{})}
	one := NewDomainStats(DomainStatsOptions{})
	events := []string{"delivered", "delivered", "delivered", "deferred", "bounced", "expired"}
	for i := range 2000 {
		rec := statsRec(events[rng.IntN(len(events))], fmt.Sprintf("d%d.test", rng.IntN(7)),
			time.Duration(rng.IntN(3600))*time.Second, math.Exp(rng.NormFloat64()*3))
		nodes[i%2].Observe(rec)
		one.Observe(rec)
	}
	since, now := statsT0.Add(10*time.Minute), statsT0.Add(50*time.Minute)
	a, b := nodes[0].Snapshot(since, now), nodes[1].Snapshot(since, now)
	want := one.Snapshot(since, now)

	// Through JSON, as the cluster does.
	var got Report
	for _, r := range []*Report{&a, &b} {
		data, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		var back Report
		if err := json.Unmarshal(data, &back); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(back, *r) {
			t.Fatalf("JSON round trip changed the report:\n%s", data)
		}
		*r = back
	}
	got = MergeReports(a, b)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("merged:\n%+v\nwant:\n%+v", got, want)
	}
	if got.Total.Latency.Count() != got.Total.Delivered {
		t.Errorf("total histogram counts %d, delivered %d", got.Total.Latency.Count(), got.Total.Delivered)
	}
	// Merging one report changes nothing; merging none gives an empty one.
	if m := MergeReports(want); !reflect.DeepEqual(m, want) {
		t.Errorf("merge of one report differs")
	}
	if m := MergeReports(); len(m.Domains) != 0 || m.Total.events() != 0 || m.Domains == nil {
		t.Errorf("merge of nothing: %+v", m)
	}
	// Partial spreads; the window is the union.
	a.Partial = true
	a.Since = a.Since.Add(-time.Hour)
	m := MergeReports(a, b)
	if !m.Partial || !m.Since.Equal(a.Since) {
		t.Errorf("partial %v since %v; want true %v", m.Partial, m.Since, a.Since)
	}
}

func TestReportTopOnly(t *testing.T) {
	s := NewDomainStats(DomainStatsOptions{})
	for i, d := range []string{"a.test", "b.test", "c.test"} {
		for range i + 1 {
			s.Observe(statsRec("delivered", d, 0, 1))
		}
	}
	r := s.Snapshot(statsT0, statsT0)
	top := r.Top(2)
	if len(top.Domains) != 2 || top.Domains[0].Domain != "c.test" || top.Domains[1].Domain != "b.test" || top.Total.Delivered != 6 {
		t.Errorf("Top(2) = %+v", top)
	}
	if all := r.Top(0); len(all.Domains) != 3 {
		t.Errorf("Top(0) kept %d domains, want 3", len(all.Domains))
	}
	only := r.Only("B.Test")
	if len(only.Domains) != 1 || only.Domains[0].Delivered != 2 || only.Total.Delivered != 6 {
		t.Errorf("Only(B.Test) = %+v", only)
	}
	if none := r.Only("x.test"); none.Domains == nil || len(none.Domains) != 0 {
		t.Errorf("Only(x.test) = %+v", none)
	}
	if len(r.Domains) != 3 {
		t.Errorf("Top/Only changed the original")
	}
}

func TestLatencyHistogramJSON(t *testing.T) {
	var h LatencyHistogram
	h[0], h[20], h[60] = 1, 7, 2
	data, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	if string(data) != "[[0,1],[20,7],[60,2]]" {
		t.Errorf("encoded %s", data)
	}
	var back LatencyHistogram
	if err := json.Unmarshal(data, &back); err != nil || back != h {
		t.Errorf("decoded %v, %v", back, err)
	}
	for _, bad := range []string{"[[61,1]]", `{"a":1}`, "[[1]]x"} {
		if err := json.Unmarshal([]byte(bad), &back); err == nil {
			t.Errorf("%s decoded without error", bad)
		}
	}
}

// TestDomainStatsConcurrent observes from many goroutines (run it with
// -race) and checks that nothing is lost.
func TestDomainStatsConcurrent(t *testing.T) {
	s := NewDomainStats(DomainStatsOptions{MaxDomains: 50})
	const workers, per = 8, 2000
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range per {
				s.Observe(statsRec("delivered", fmt.Sprintf("d%d.test", (w*per+i)%100), time.Duration(i)*time.Second, 0.5))
			}
		})
	}
	// Readers at the same time.
	for range 2 {
		wg.Go(func() {
			for range 20 {
				s.Snapshot(statsT0, statsT0.Add(time.Hour))
			}
		})
	}
	wg.Wait()
	r := s.Snapshot(statsT0, statsT0.Add(time.Hour))
	if r.Total.Delivered != workers*per || len(r.Domains) != 50 {
		t.Fatalf("delivered %d in %d domains; want %d in 50 (49 and %s)", r.Total.Delivered, len(r.Domains), workers*per, OtherDomain)
	}
}

func BenchmarkDomainStatsObserve(b *testing.B) {
	s := NewDomainStats(DomainStatsOptions{})
	rec := statsRec("delivered", "example.com", 0, 1.5)
	b.ReportAllocs()
	for b.Loop() {
		s.Observe(rec)
	}
}

// BenchmarkDomainStatsObserveParallel: 100 domains, the goroutines
// sharing one clock that moves a minute every 1000 records (new buckets,
// and expiry once 24 h of them are filled).
func BenchmarkDomainStatsObserveParallel(b *testing.B) {
	s := NewDomainStats(DomainStatsOptions{})
	domains := make([]string, 100)
	for i := range domains {
		domains[i] = fmt.Sprintf("d%d.example", i)
	}
	var clock atomic.Int64
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		rec := DeliveryRecord{Event: "delivered", Delay: 2}
		for pb.Next() {
			i := clock.Add(1)
			rec.Domain = domains[i%int64(len(domains))]
			rec.Time = statsT0.Add(time.Duration(i/1000) * time.Minute)
			s.Observe(&rec)
		}
	})
}

func BenchmarkDomainStatsSnapshot(b *testing.B) {
	s := NewDomainStats(DomainStatsOptions{})
	for m := range 60 {
		for d := range 100 {
			s.Observe(statsRec("delivered", fmt.Sprintf("d%d.example", d), time.Duration(m)*time.Minute, float64(d)))
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		s.Snapshot(statsT0, statsT0.Add(time.Hour))
	}
}

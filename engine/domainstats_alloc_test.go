//go:build !race

package engine

import (
	"fmt"
	"testing"
	"time"
)

// Allocation guard for DomainStats.Observe (counts, not timings). The race
// detector changes allocation counts, so this runs without it.
func TestAllocsDomainStatsObserve(t *testing.T) {
	s := NewDomainStats(DomainStatsOptions{Retention: 30 * time.Minute})
	domains := make([]string, 20)
	for i := range domains {
		domains[i] = fmt.Sprintf("d%d.test", i)
	}
	rec := DeliveryRecord{Event: "delivered", Delay: 1.5, Time: statsT0}
	// Known domain, current minute.
	s.Observe(&rec)
	rec.Domain = domains[0]
	s.Observe(&rec)
	if got := testing.AllocsPerRun(500, func() { s.Observe(&rec) }); got > 0 {
		t.Errorf("known domain and minute: %.1f allocations, want 0", got)
	}
	// Minutes moving on, buckets expiring: once the retention has been
	// filled, a new minute reuses an expired bucket's memory.
	minute := 0
	step := func() {
		minute++
		rec.Time = statsT0.Add(time.Duration(minute) * time.Minute)
		for i, d := range domains {
			rec.Domain = d
			rec.Event = [...]string{"delivered", "deferred", "bounced", "expired"}[i%4]
			s.Observe(&rec)
		}
	}
	for range 100 {
		step()
	}
	if got := testing.AllocsPerRun(200, step); got > 0 {
		t.Errorf("new minutes for %d known domains: %.1f allocations per minute, want 0", len(domains), got)
	}
}

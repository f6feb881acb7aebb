//go:build !race

package dnscache

import (
	"context"
	"testing"
)

// TestAllocsResolveIntoHit guards the delivery hot path: a cached domain
// resolved into a caller's Route allocates nothing. (Counts, not timings;
// without the race detector, which changes them.)
func TestAllocsResolveIntoHit(t *testing.T) {
	s := newTestServer(t)
	s.add(
		"bench.test. 3600 IN MX 10 mx1.bench.test.",
		"bench.test. 3600 IN MX 20 mx2.bench.test.",
		"mx1.bench.test. 3600 IN A 192.0.2.1",
		"mx2.bench.test. 3600 IN A 192.0.2.2",
	)
	c := newCache(t, s, newFakeClock(), nil)
	ctx := context.Background()
	var r Route
	if err := c.ResolveInto(ctx, "bench.test", &r); err != nil {
		t.Fatal(err)
	}
	got := testing.AllocsPerRun(200, func() {
		if err := c.ResolveInto(ctx, "bench.test", &r); err != nil || len(r.Hosts) != 2 {
			t.Fatal(r, err)
		}
	})
	if got > 0 {
		t.Fatalf("ResolveInto on a hit: %.1f allocations, want 0", got)
	}
}

package cluster

import (
	"testing"
	"time"
)

// TestLimitsReportOnChange: a report goes out when the counts change, an
// unchanged one only as a refresh every refreshIntervals, and a peer
// counts as heard until staleAfter.
func TestLimitsReportOnChange(t *testing.T) {
	const iv = 500 * time.Millisecond
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	a := NewLimits("a", map[string]int{"big.test": 10, "other.test": 10}, iv, func() int { return 2 }, func([]byte) error { return nil })
	b := NewLimits("b", map[string]int{"big.test": 10, "other.test": 10}, iv, func() int { return 2 }, func([]byte) error { return nil })
	a.now, b.now = clock, clock

	tick := func() bool {
		t.Helper()
		now = now.Add(iv)
		ps := a.Report()
		for _, p := range ps {
			b.HandleEvent(p)
		}
		return ps != nil
	}
	steps := []struct {
		name   string
		change func()
		sent   bool
		held   int // b's view of big.test
	}{
		{"first report (empty)", nil, true, 0},
		{"unchanged", nil, false, 0},
		{"a opens a connection", func() { a.Opened("big.test") }, true, 1},
		{"unchanged again", nil, false, 1},
		{"still unchanged", nil, false, 1},
		{"unchanged: refresh due (4 intervals since the last)", nil, false, 1},
		{"refresh", nil, true, 1},
		{"another domain", func() { a.Opened("other.test") }, true, 1},
		{"a closes big.test", func() { a.Closed("big.test") }, true, 0},
		{"the zero is sent once", nil, true, 0},
		{"unchanged", nil, false, 0},
	}
	for _, st := range steps {
		if st.change != nil {
			st.change()
		}
		if sent := tick(); sent != st.sent {
			t.Fatalf("%s: sent %v, want %v", st.name, sent, st.sent)
		}
		if got := b.ClusterHeld("big.test"); got != st.held {
			t.Fatalf("%s: b sees %d connections to big.test, want %d", st.name, got, st.held)
		}
	}

	// b keeps a's counts while refreshes could still come, then forgets.
	a.Opened("big.test")
	tick()
	now = now.Add(a.staleAfter() - time.Millisecond)
	if got := b.ClusterHeld("big.test"); got != 1 {
		t.Fatalf("just before staleAfter: b sees %d, want 1", got)
	}
	now = now.Add(2 * time.Millisecond)
	if got := b.ClusterHeld("big.test"); got != 0 {
		t.Fatalf("after staleAfter: b sees %d, want 0 (a not heard from)", got)
	}
}

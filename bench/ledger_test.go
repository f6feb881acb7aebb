package bench

import (
	"context"
	"testing"
	"time"
)

func TestLedgerAgainstSink(t *testing.T) {
	s := newTestSink(t, SinkConfig{HTTP: "127.0.0.1:0"})
	ledger := NewLedger()
	res := runLoad(t, LoadConfig{Targets: s.Addrs(), Sessions: 4, Messages: 500, Rcpts: 2, Domains: 10,
		OnAccepted: ledger.Record})
	if msgs, pairs := ledger.Len(); msgs != 500 || pairs != res.Delivered {
		t.Fatalf("ledger %d messages %d pairs, load delivered %d", msgs, pairs, res.Delivered)
	}
	a := ledger.Check(s.Count)
	if a.Expected != 1000 || a.Delivered != 1000 || a.Lost != 0 || a.Duplicates != 0 {
		t.Errorf("accounting %+v", a)
	}

	if x := ledger.Check(s.Count, TestDomain(1), TestDomain(2)); x.Excluded == 0 || x.Expected+x.Excluded != 1000 ||
		x.Lost != 0 {
		t.Errorf("with exclusions %+v", x)
	}
	if st := s.Stats(); st.First.IsZero() || st.Last.Before(st.First) {
		t.Errorf("first %v last %v", st.First, st.Last)
	}

	// The same accounting from another process's point of view.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sc := SinkClient{Base: "http://" + s.HTTPAddr()}
	st, err := sc.Stats(ctx)
	if err != nil || st.Unique != 1000 {
		t.Fatalf("stats %+v %v", st, err)
	}
	var d Deliveries
	var since uint64
	for pages := 0; since < st.Messages; pages++ {
		if pages > 100 {
			t.Fatal("paging does not advance")
		}
		p, err := sc.Messages(ctx, since, 64)
		if err != nil {
			t.Fatal(err)
		}
		for _, arr := range p.Arrivals {
			d.Add(arr)
		}
		since = p.Next
	}
	if b := ledger.Check(d.Count); b.Expected != a.Expected || b.Delivered != a.Delivered || b.Lost != 0 {
		t.Errorf("over HTTP: %+v", b)
	}

	// A pair accepted but never delivered is lost; one delivered twice is a
	// duplicate.
	ledger.Record("ghost-1", []string{"x@d0001.test"})
	c := dialSink(t, s.Addrs()[0])
	c.greet()
	var someID, someRcpt string
	list, _, _ := s.Arrivals(0, 1)
	someID, someRcpt = list[0].ID, list[0].Rcpts[0]
	c.cmd("MAIL FROM:<a@sender.test>", 250)
	c.cmd("RCPT TO:<"+someRcpt+">", 250)
	c.data(stamped(t, someID), 250)
	a = ledger.Check(s.Count)
	if a.Expected != 1001 || a.Lost != 1 || a.Duplicates != 1 || len(a.LostSample) != 1 ||
		a.LostSample[0] != "ghost-1 x@d0001.test" {
		t.Errorf("accounting %+v", a)
	}

	if err := sc.CaptureDomain(ctx, "cap.test"); err != nil {
		t.Fatal(err)
	}
	c.cmd("MAIL FROM:<>", 250)
	c.cmd("RCPT TO:<b@cap.test>", 250)
	c.data([]byte("Subject: dsn\r\n\r\nbody\r\n"), 250)
	if caps, err := sc.Captured(ctx, "cap.test"); err != nil || len(caps) != 1 {
		t.Errorf("captured %d %v", len(caps), err)
	}
	if err := sc.Reset(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err := sc.Stats(ctx); err != nil || st.Messages != 0 {
		t.Errorf("after reset %+v %v", st, err)
	}
	if _, err := (SinkClient{Base: "http://" + s.HTTPAddr() + "/nope"}).Stats(ctx); err == nil {
		t.Error("no error for a bad path")
	}
}

func TestSinkSetFaults(t *testing.T) {
	s := newTestSink(t, SinkConfig{Faults: Faults{Domain: map[string]FaultRule{
		"d0001.test": {Rcpt: map[string]float64{"421": 1}}}}})
	res := runLoad(t, LoadConfig{Targets: s.Addrs(), Sessions: 2, Messages: 20, Domains: 1})
	if res.TempFailed != 20 || res.Codes[421] != 20 {
		t.Errorf("deferred: %+v", res)
	}
	if err := s.SetFaults(Faults{Default: FaultRule{Rcpt: map[string]float64{"451": 7}}}); err == nil {
		t.Error("SetFaults accepted an invalid profile")
	}
	if err := s.SetFaults(Faults{}); err != nil {
		t.Fatal(err)
	}
	res = runLoad(t, LoadConfig{Targets: s.Addrs(), Sessions: 2, Messages: 20, Domains: 1})
	if res.Accepted != 20 {
		t.Errorf("released: %+v", res)
	}
	if h := s.E2EHistogram(); h.TotalCount() != 20 || s.Stats().E2E.Count != 20 {
		t.Errorf("e2e histogram %d", h.TotalCount())
	}
}

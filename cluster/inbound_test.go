package cluster

import (
	"net/netip"
	"testing"
	"time"
)

func TestInboundClusterWideLimits(t *testing.T) {
	now := time.Unix(1e9, 0)
	var sent [][]byte
	newIn := func(name string, conns, rate int) *Inbound {
		in, err := NewInbound(name, conns, rate, 100*time.Millisecond, t.TempDir(), func() int { return 2 },
			func(_ string, p []byte) error { sent = append(sent, p); return nil })
		if err != nil {
			t.Fatal(err)
		}
		in.now = func() time.Time { return now }
		return in
	}
	a, b := newIn("a", 4, 0), newIn("b", 4, 0)
	ip := netip.MustParseAddr("192.0.2.7")
	other := netip.MustParseAddr("192.0.2.8")
	for i := 0; i < 2; i++ {
		if r := a.Admit(ip); r != nil {
			t.Fatalf("a, connection %d: %v", i, r)
		}
		if r := b.Admit(ip); r != nil {
			t.Fatalf("b, connection %d: %v", i, r)
		}
	}
	// Each node alone is under the limit; after gossip both see 4.
	b.HandleIPs(a.payload())
	a.HandleIPs(b.payload())
	if r := a.Admit(ip); r == nil || r.Code != 421 {
		t.Fatalf("a, 5th connection cluster-wide: %v", r)
	}
	if r := b.Admit(other); r != nil {
		t.Fatalf("another client: %v", r)
	}
	// One closes on b; once reported, a admits again.
	b.Release(ip)
	a.HandleIPs(b.payload())
	if r := a.Admit(ip); r != nil {
		t.Fatalf("after a release: %v", r)
	}
	// A failed node's connections no longer count.
	a.Forget("b")
	if r := a.Admit(ip); r != nil {
		t.Fatalf("after b failed: %v", r)
	}
	// IPv6 clients are counted per /64.
	c := newIn("c", 2, 0)
	c.Admit(netip.MustParseAddr("2001:db8::1"))
	c.Admit(netip.MustParseAddr("2001:db8::2"))
	if r := c.Admit(netip.MustParseAddr("2001:db8::3")); r == nil {
		t.Fatal("third connection from one /64 admitted")
	}

	// Rate: 6 per minute cluster-wide.
	ra, rb := newIn("ra", 0, 6), newIn("rb", 0, 6)
	for i := 0; i < 3; i++ {
		ra.Admit(ip)
		ra.Release(ip)
		rb.Admit(ip)
		rb.Release(ip)
	}
	ra.HandleIPs(rb.payload())
	if r := ra.Admit(ip); r == nil || r.Code != 421 {
		t.Fatalf("7th connection in a minute: %v", r)
	}
	now = now.Add(2 * time.Minute)
	ra.Forget("rb")
	if r := ra.Admit(ip); r != nil {
		t.Fatalf("two minutes later: %v", r)
	}
	_ = sent
}

func TestInboundBlocks(t *testing.T) {
	dir := t.TempDir()
	var events [][]byte
	in, err := NewInbound("a", 0, 0, time.Second, dir, func() int { return 1 },
		func(_ string, p []byte) error { events = append(events, p); return nil })
	if err != nil {
		t.Fatal(err)
	}
	if err := in.Block(Block{Prefix: "198.51.100.0/24", Reason: "spam run"}); err != nil {
		t.Fatal(err)
	}
	if err := in.Block(Block{Prefix: "not-an-ip"}); err == nil {
		t.Fatal("bad prefix accepted")
	}
	if r := in.Admit(netip.MustParseAddr("198.51.100.9")); r == nil || r.Code != 554 {
		t.Fatalf("blocked client: %v", r)
	}
	if r := in.Admit(netip.MustParseAddr("::ffff:198.51.100.9")); r == nil {
		t.Fatal("blocked client as v4-mapped v6 admitted")
	}
	if r := in.Admit(netip.MustParseAddr("198.51.101.9")); r != nil {
		t.Fatalf("other client: %v", r)
	}
	// Another node applies the event.
	b, _ := NewInbound("b", 0, 0, time.Second, t.TempDir(), func() int { return 1 }, func(string, []byte) error { return nil })
	b.HandleBlock(events[0])
	if r := b.Admit(netip.MustParseAddr("198.51.100.1")); r == nil {
		t.Fatal("block not applied from the event")
	}
	// Blocks survive a restart; expired ones are not enforced.
	in2, err := NewInbound("a", 0, 0, time.Second, dir, func() int { return 1 }, func(string, []byte) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if got := in2.Blocks(); len(got) != 1 || got[0].Reason != "spam run" {
		t.Fatalf("after restart: %+v", got)
	}
	in2.Block(Block{Prefix: "203.0.113.5", Until: time.Now().Add(-time.Second)})
	if r := in2.Admit(netip.MustParseAddr("203.0.113.5")); r != nil {
		t.Fatalf("expired block enforced: %v", r)
	}
	if err := in2.Unblock("198.51.100.0/24"); err != nil {
		t.Fatal(err)
	}
	if r := in2.Admit(netip.MustParseAddr("198.51.100.9")); r != nil {
		t.Fatalf("after unblock: %v", r)
	}
	// Malformed events are ignored.
	b.HandleBlock([]byte{1})
	b.HandleIPs([]byte{1, 5, 'x'})
}

package spool

import (
	"testing"
	"time"
)

// TestDueHint: a due entry names the domains of the pending recipients,
// and follows them as recipients finish.
func TestDueHint(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Dir = t.TempDir()
	st := openT(t, cfg)
	defer st.Close()
	now := time.Now()
	msg := &Message{From: "s@x.test", Rcpts: []Recipient{
		{Addr: "a@A.test", Domain: "a.test"}, {Addr: "b@b.test"}, {Addr: "c@a.test", Domain: "a.test"},
	}}
	if err := st.CommitWait(msg, []byte("x\r\n")); err != nil {
		t.Fatal(err)
	}
	hint := func() string {
		t.Helper()
		var got string
		n := 0
		if err := st.DueAfterHint(time.Time{}, ID{}, now.Add(time.Hour), func(id ID, _ time.Time, h []byte) bool {
			got = string(h)
			n++
			return true
		}); err != nil {
			t.Fatal(err)
		}
		if n != 1 {
			t.Fatalf("%d due entries", n)
		}
		return got
	}
	if h := hint(); h != "a.test,b.test" {
		t.Fatalf("hint %q", h)
	}
	// b.test delivered, same due time: the hint drops it.
	if _, err := st.Update(msg.ID, []Recipient{{Index: 1, State: Delivered}}); err != nil {
		t.Fatal(err)
	}
	if h := hint(); h != "a.test" {
		t.Fatalf("after b.test delivered: %q", h)
	}
	// Too many domains: no hint.
	var many []Recipient
	for i := 0; i < 40; i++ {
		many = append(many, Recipient{Addr: "u@long-domain-name-number-" + string(rune('a'+i%26)) + string(rune('a'+i/26)) + ".test"})
	}
	if h := appendDueHint(nil, many); len(h) != 0 {
		t.Fatalf("hint of 40 long domains: %d bytes", len(h))
	}
}

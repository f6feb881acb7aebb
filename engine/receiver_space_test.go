package engine

import (
	"testing"

	"github.com/hermod-mta/hermod/netio"
	"github.com/hermod-mta/hermod/spool"
)

// TestReceiverRefusesMailWhenShortOfSpace: MAIL gets 452 4.3.1 while the
// spool's filesystem (the real one of the test's temporary directory)
// has less free space than spool.min_free, counting the declared SIZE.
func TestReceiverRefusesMailWhenShortOfSpace(t *testing.T) {
	open := func(minFree int64) *spool.Store {
		cfg := spool.DefaultConfig()
		cfg.Dir, cfg.MinFree = t.TempDir(), minFree
		st, err := spool.Open(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		return st
	}
	roomy := open(1)
	free := roomy.FreeBytes()
	tests := []struct {
		name string
		st   *spool.Store
		size int64
		want string // reply code and enhanced code, "" for acceptance
	}{
		{"room enough", roomy, 1 << 20, ""},
		{"declared SIZE beyond the free space", roomy, free + 1<<30, "452 4.3.1"},
		{"filesystem below min_free", open(1 << 62), 0, "452 4.3.1"},
		{"check disabled", open(-1), 1 << 62, ""},
	}
	for _, tt := range tests {
		r, err := NewReceiver(RelayConfig{}, ReceiverOptions{Store: tt.st})
		if err != nil {
			t.Fatal(err)
		}
		got := ""
		if rep := r.Mail(&netio.Envelope{From: "a@x.test", Size: tt.size}); rep != nil {
			got = rep.Error()[:9]
		}
		if got != tt.want {
			t.Errorf("%s: Mail replied %q, want %q", tt.name, got, tt.want)
		}
	}
	r, _ := NewReceiver(RelayConfig{}, ReceiverOptions{Store: open(1 << 62)})
	r.Mail(&netio.Envelope{})
	if n := r.Metrics().NoRoom; n != 1 {
		t.Errorf("NoRoom = %d, want 1", n)
	}
}

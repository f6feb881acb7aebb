package netio

import (
	"testing"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

type countingBackend struct {
	fakeBackend
	disconnects int
}

func (b *countingBackend) Disconnect(*ConnInfo) { b.disconnects++ }

// TestDisconnecter: a backend tracking connections hears of the end of
// each connection it accepted exactly once, and never of one it refused.
func TestDisconnecter(t *testing.T) {
	for _, tc := range []struct {
		name   string
		refuse *smtperr.Error
		aborts int
		want   int
	}{
		{"accepted, aborted once", nil, 1, 1},
		{"accepted, aborted twice", nil, 2, 1},
		{"refused", smtperr.New(421, "4.7.0", "busy"), 1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := &countingBackend{fakeBackend: fakeBackend{refuse: tc.refuse}}
			s := NewSession(testConfig(), b, ConnInfo{}, false, func(*smtperr.Error) {})
			s.Greeting(nil)
			for i := 0; i < tc.aborts; i++ {
				s.Abort()
			}
			if b.disconnects != tc.want {
				t.Fatalf("%d disconnects, want %d", b.disconnects, tc.want)
			}
		})
	}
}

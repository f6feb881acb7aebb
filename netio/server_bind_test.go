package netio

import (
	"context"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"
)

// TestServeBusyAddress: when one of several listen addresses is taken,
// Serve reports "address in use" (not EBADF, which gnet's keepalive
// option put in its place), and leaves none of the other addresses bound,
// so that a retry (the cluster's address hand-back) can succeed once the
// address is free.
func TestServeBusyAddress(t *testing.T) {
	free := freePort(t)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := ServerConfig{Listen: []string{free, busy.Addr().String()}, Hostname: "mx.test"}
	for attempt := range 3 {
		s, err := NewServer(cfg, &asyncBackend{}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		err = s.Serve()
		if !errors.Is(err, syscall.EADDRINUSE) {
			t.Fatalf("attempt %d: Serve with a busy address = %v, want EADDRINUSE", attempt, err)
		}
		// The free address must not have been left bound.
		ln, err := net.Listen("tcp", free)
		if err != nil {
			t.Fatalf("attempt %d: %s left bound after the failed Serve: %v", attempt, free, err)
		}
		ln.Close()
	}

	// Once the address is free, the same configuration serves.
	busy.Close()
	s, err := NewServer(cfg, &asyncBackend{}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	errc := serveReady(t, s)
	for _, a := range cfg.Listen {
		c, err := net.DialTimeout("tcp", a, 2*time.Second)
		if err != nil {
			t.Fatalf("dial %s: %v", a, err)
		}
		c.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

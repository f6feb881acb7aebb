package dnscache

import (
	"context"
	"testing"
)

func benchCache(b *testing.B) *Cache {
	b.Helper()
	s := newTestServer(b)
	s.add(
		"bench.test. 3600 IN MX 10 mx1.bench.test.",
		"bench.test. 3600 IN MX 10 mx2.bench.test.",
		"bench.test. 3600 IN MX 20 mx3.bench.test.",
		"mx1.bench.test. 3600 IN A 192.0.2.1",
		"mx1.bench.test. 3600 IN AAAA 2001:db8::1",
		"mx2.bench.test. 3600 IN A 192.0.2.2",
		"mx3.bench.test. 3600 IN A 192.0.2.3",
	)
	c := newCache(b, s, newFakeClock(), nil)
	if _, err := c.Resolve(context.Background(), "bench.test"); err != nil {
		b.Fatal(err)
	}
	return c
}

// BenchmarkResolveHit is the delivery hot path: a domain with three MX
// hosts, everything cached.
func BenchmarkResolveHit(b *testing.B) {
	c := benchCache(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		r, err := c.Resolve(ctx, "bench.test")
		if err != nil || len(r.Hosts) != 3 {
			b.Fatal(r, err)
		}
	}
}

func BenchmarkResolveHitParallel(b *testing.B) {
	c := benchCache(b)
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.Resolve(ctx, "bench.test"); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkLookupIPHit(b *testing.B) {
	c := benchCache(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.LookupIP(ctx, "mx1.bench.test"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkResolveIntoHit is the hot path with a Route reused by the caller.
func BenchmarkResolveIntoHit(b *testing.B) {
	c := benchCache(b)
	ctx := context.Background()
	var r Route
	b.ReportAllocs()
	for b.Loop() {
		if err := c.ResolveInto(ctx, "bench.test", &r); err != nil || len(r.Hosts) != 3 {
			b.Fatal(r, err)
		}
	}
}

func BenchmarkLookupIPHitParallel(b *testing.B) {
	c := benchCache(b)
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.LookupIP(ctx, "mx1.bench.test"); err != nil {
				b.Fatal(err)
			}
		}
	})
}

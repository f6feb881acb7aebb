package dnscache

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// testServer is a real DNS server on 127.0.0.1 (UDP and TCP on the same
// port) answering from a zone the test controls. It plays the recursive
// resolver: answers include the CNAME chain, negative answers carry an SOA.
type testServer struct {
	t    testing.TB
	addr string

	mu       sync.Mutex
	rrs      map[qkey][]dns.RR
	rcode    map[qkey]int    // forced RCODE
	truncate map[string]bool // names answered with TC=1 over UDP
	gate     chan struct{}   // when set, queries wait for it to close
	soaTTL   uint32
	soaMin   uint32
	allRcode int  // when nonzero, every query gets this RCODE
	noSOA    bool // omit the SOA from negative answers
	queries  map[qkey]int
	edns     []uint16 // EDNS0 UDP size of each query (0: none)

	drop  atomic.Bool // answer nothing
	udpN  atomic.Int64
	tcpN  atomic.Int64
	total atomic.Int64
}

type qkey struct {
	name  string // lower case, fully qualified
	qtype uint16
}

func newTestServer(t testing.TB) *testServer {
	t.Helper()
	s := &testServer{
		t:        t,
		rrs:      make(map[qkey][]dns.RR),
		rcode:    make(map[qkey]int),
		truncate: make(map[string]bool),
		queries:  make(map[qkey]int),
		soaTTL:   3600,
		soaMin:   60,
	}
	var (
		pc  net.PacketConn
		ln  net.Listener
		err error
	)
	for i := 0; i < 20; i++ {
		pc, err = net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ln, err = net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			break
		}
		pc.Close()
	}
	if err != nil {
		t.Fatalf("no port free for both UDP and TCP: %v", err)
	}
	s.addr = pc.LocalAddr().String()
	start := func(srv *dns.Server) {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go srv.ActivateAndServe()
		select {
		case <-started:
		case <-time.After(5 * time.Second):
			t.Fatal("test DNS server did not start")
		}
		t.Cleanup(func() { srv.Shutdown() })
	}
	start(&dns.Server{PacketConn: pc, Handler: s})
	start(&dns.Server{Listener: ln, Handler: s})
	return s
}

// add adds records in zone-file syntax, e.g. "example.test. 300 IN MX 10 mx.example.test.".
func (s *testServer) add(lines ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range lines {
		rr, err := dns.NewRR(l)
		if err != nil {
			s.t.Fatalf("bad RR %q: %v", l, err)
		}
		k := qkey{strings.ToLower(rr.Header().Name), rr.Header().Rrtype}
		s.rrs[k] = append(s.rrs[k], rr)
	}
}

// set replaces the records of (name, type).
func (s *testServer) set(name string, qtype uint16, lines ...string) {
	s.mu.Lock()
	delete(s.rrs, qkey{dns.Fqdn(name), qtype})
	s.mu.Unlock()
	s.add(lines...)
}

func (s *testServer) setRcode(name string, qtype uint16, rcode int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rcode[qkey{dns.Fqdn(name), qtype}] = rcode
}

func (s *testServer) setAllRcode(rcode int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.allRcode = rcode
}

func (s *testServer) count(name string, qtype uint16) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.queries[qkey{dns.Fqdn(name), qtype}]
}

func (s *testServer) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	if len(r.Question) != 1 {
		return
	}
	q := r.Question[0]
	k := qkey{strings.ToLower(q.Name), q.Qtype}
	udp := w.LocalAddr().Network() == "udp"
	s.mu.Lock()
	s.queries[k]++
	size := uint16(0)
	if opt := r.IsEdns0(); opt != nil {
		size = opt.UDPSize()
	}
	s.edns = append(s.edns, size)
	gate := s.gate
	s.mu.Unlock()
	s.total.Add(1)
	if udp {
		s.udpN.Add(1)
	} else {
		s.tcpN.Add(1)
	}
	if gate != nil {
		select {
		case <-gate:
		case <-time.After(10 * time.Second):
		}
	}
	if s.drop.Load() {
		return
	}
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	m.RecursionAvailable = true

	s.mu.Lock()
	defer s.mu.Unlock()
	if rc, ok := s.rcode[k]; ok || s.allRcode != 0 {
		if !ok {
			rc = s.allRcode
		}
		m.Rcode = rc
		w.WriteMsg(m)
		return
	}
	if udp && s.truncate[k.name] {
		m.Truncated = true
		w.WriteMsg(m)
		return
	}
	owner := k.name
	for hops := 0; hops < 10 && q.Qtype != dns.TypeCNAME; hops++ {
		cn := s.rrs[qkey{owner, dns.TypeCNAME}]
		if len(cn) == 0 {
			break
		}
		m.Answer = append(m.Answer, cn[0])
		owner = strings.ToLower(cn[0].(*dns.CNAME).Target)
	}
	m.Answer = append(m.Answer, s.rrs[qkey{owner, q.Qtype}]...)
	if len(s.rrs[qkey{owner, q.Qtype}]) == 0 {
		exists := false
		for kk := range s.rrs {
			if kk.name == owner {
				exists = true
				break
			}
		}
		if !exists {
			m.Rcode = dns.RcodeNameError
		}
		if !s.noSOA {
			soa, _ := dns.NewRR(fmt.Sprintf("test. %d IN SOA ns.test. admin.test. 1 3600 600 86400 %d", s.soaTTL, s.soaMin))
			m.Ns = append(m.Ns, soa)
		}
	}
	w.WriteMsg(m)
}

// fakeClock is a settable clock for Config.Now.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock() *fakeClock {
	c := new(fakeClock)
	c.ns.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}

func (c *fakeClock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// waitFor polls cond for at most 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

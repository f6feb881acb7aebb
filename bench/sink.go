package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// Errors of the sink.
var (
	// ErrSinkClosed is returned by Sink.Wait when the sink is closed.
	ErrSinkClosed = errors.New("bench: sink closed")
)

// SinkConfig configures a Sink.
type SinkConfig struct {
	// Listen is the list of addresses to accept SMTP on, e.g.
	// ["127.0.0.2:2526", "127.0.0.3:2526"]. Port 0 picks a free port (see
	// Sink.Addrs). Default: ["127.0.0.1:2526"].
	Listen []string `toml:"listen"`
	// HTTP is the address of the JSON endpoint (/stats, /messages,
	// /captured, /capture, /reset, /metrics); empty disables it.
	// Default: "".
	HTTP string `toml:"http"`
	// Hostname is the name in the greeting and EHLO reply.
	// Default: "sink.test".
	Hostname string `toml:"hostname"`
	// MaxSize is the SIZE advertised and enforced (552 beyond).
	// Default: 67108864 (64 MiB).
	MaxSize int64 `toml:"max_size"`
	// MaxRcpts is the number of recipients per transaction accepted before
	// "452 4.5.3". Default: 1000.
	MaxRcpts int `toml:"max_rcpts"`
	// NoPipelining stops advertising PIPELINING (the sink still answers
	// pipelined commands in order). Default: false.
	NoPipelining bool `toml:"no_pipelining"`
	// Chunking advertises CHUNKING and accepts BDAT. Default: false.
	Chunking bool `toml:"chunking"`
	// StartTLS advertises STARTTLS. Without TLSCert/TLSKey a self-signed
	// certificate for Hostname, "localhost" and the listen IPs is made at
	// start. Default: false.
	StartTLS bool `toml:"starttls"`
	// TLSCert and TLSKey are PEM files for STARTTLS. Default: "".
	TLSCert string `toml:"tls_cert"`
	TLSKey  string `toml:"tls_key"`
	// IdleTimeout closes a connection that sends nothing for this long.
	// Default: 5m.
	IdleTimeout time.Duration `toml:"idle_timeout"`
	// Seed seeds the fault-injection draws. Default: 0.
	Seed uint64 `toml:"seed"`
	// Faults is the fault-injection profile. Default: no faults.
	Faults Faults `toml:"faults"`
	// Capture lists recipient domains whose messages are kept whole (see
	// Sink.Captured). Default: none.
	Capture []string `toml:"capture"`
	// NoRecords keeps no per-(id, recipient) record (about 100 bytes per
	// delivered pair): Seen and Count then know nothing, duplicates are not
	// detected (Unique counts every stamped delivery) and E2E counts every
	// verified delivery. For very long runs. Default: false.
	NoRecords bool `toml:"no_records"`
	// ArrivalLog is how many arrivals /messages and Sink.Arrivals keep
	// (the oldest are dropped). Default: 1048576.
	ArrivalLog int `toml:"arrival_log"`
	// Logger receives connection errors at debug level. Default: nil
	// (discard).
	Logger *slog.Logger `toml:"-" json:"-"`
}

// DefaultSinkConfig returns the defaults.
func DefaultSinkConfig() SinkConfig {
	var c SinkConfig
	c.EnsureDefaults()
	return c
}

// EnsureDefaults fills zero fields with their defaults.
func (c *SinkConfig) EnsureDefaults() {
	if len(c.Listen) == 0 {
		c.Listen = []string{"127.0.0.1:2526"}
	}
	if c.Hostname == "" {
		c.Hostname = "sink.test"
	}
	if c.MaxSize == 0 {
		c.MaxSize = 64 << 20
	}
	if c.MaxRcpts == 0 {
		c.MaxRcpts = 1000
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = 5 * time.Minute
	}
	if c.ArrivalLog == 0 {
		c.ArrivalLog = 1 << 20
	}
}

// Validate reports every problem at once.
func (c SinkConfig) Validate() error {
	var errs []error
	for i, a := range c.Listen {
		if _, _, err := net.SplitHostPort(a); err != nil {
			errs = append(errs, fmt.Errorf("sink.listen[%d]: %q: %v", i, a, err))
		}
	}
	if c.HTTP != "" {
		if _, _, err := net.SplitHostPort(c.HTTP); err != nil {
			errs = append(errs, fmt.Errorf("sink.http: %q: %v", c.HTTP, err))
		}
	}
	if c.MaxSize < 0 {
		errs = append(errs, errors.New("sink.max_size: must be >= 0"))
	}
	if c.MaxRcpts < 0 {
		errs = append(errs, errors.New("sink.max_rcpts: must be >= 0"))
	}
	if c.IdleTimeout < 0 {
		errs = append(errs, errors.New("sink.idle_timeout: must be >= 0"))
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		errs = append(errs, errors.New("sink.tls_cert: must be set together with sink.tls_key"))
	}
	if c.ArrivalLog < 0 {
		errs = append(errs, errors.New("sink.arrival_log: must be >= 0"))
	}
	errs = c.Faults.validate("sink.faults.", errs)
	return errors.Join(errs...)
}

// Arrival is one message accepted by the sink.
type Arrival struct {
	// Seq numbers arrivals from 0 in order of acceptance.
	Seq uint64 `json:"seq"`
	// ID is the X-Bench-Id, empty for unstamped messages.
	ID    string   `json:"id,omitempty"`
	From  string   `json:"from"`
	Rcpts []string `json:"rcpts"`
	// Sent is X-Bench-Sent and Arrived the time of the 250, in Unix
	// nanoseconds.
	Sent    int64 `json:"sent_ns,omitempty"`
	Arrived int64 `json:"arrived_ns"`
	Size    int   `json:"size"`
	// MX is the local address the message arrived on.
	MX string `json:"mx"`
	// Status is "ok", "corrupt" or "unstamped".
	Status string `json:"status"`
	// Dups is how many of Rcpts had already received this ID.
	Dups int `json:"dups,omitempty"`
}

// Captured is a whole message kept for a captured domain.
type Captured struct {
	From    string    `json:"from"`
	Rcpts   []string  `json:"rcpts"`
	Raw     []byte    `json:"raw"`
	Arrived time.Time `json:"arrived"`
	MX      string    `json:"mx"`
}

// SinkStats is a snapshot of a Sink's counters.
type SinkStats struct {
	Uptime time.Duration `json:"uptime_ns"`
	// Connections accepted in total, and open now.
	Connections uint64 `json:"connections"`
	Active      int64  `json:"active"`
	// Messages, Recipients and Bytes of accepted transactions (250 after
	// DATA or BDAT LAST); Bytes counts message bytes after dot-unstuffing.
	Messages   uint64 `json:"messages"`
	Recipients uint64 `json:"recipients"`
	Bytes      uint64 `json:"bytes"`
	// Unique counts distinct (id, recipient) pairs delivered; Duplicates
	// the deliveries of a pair beyond its first.
	Unique     uint64 `json:"unique"`
	Duplicates uint64 `json:"duplicates"`
	// Corrupted messages had a stamp that their body does not match;
	// Unstamped had no X-Bench-Id (bounces, foreign mail).
	Corrupted uint64 `json:"corrupted"`
	Unstamped uint64 `json:"unstamped"`
	// Injected faults: connections dropped mid-DATA, connections hung,
	// RCPTs greylisted, connections refused by max_conns_per_ip.
	Dropped    uint64 `json:"dropped"`
	Hung       uint64 `json:"hung"`
	Greylisted uint64 `json:"greylisted"`
	ConnCapped uint64 `json:"conn_capped"`
	// TLS counts completed STARTTLS handshakes.
	TLS uint64 `json:"tls"`
	// Replies counts every reply sent, by code.
	Replies map[int]uint64 `json:"replies"`
	// Domains counts delivered recipients by (lower-case) domain.
	Domains map[string]uint64 `json:"domains"`
	// First and Last are the times of the first and the latest accepted
	// message (zero before any): (Last-First) is the span of an
	// end-to-end delivery rate.
	First time.Time `json:"first"`
	Last  time.Time `json:"last"`
	// E2E is arrival time minus X-Bench-Sent, once per (id, recipient)
	// pair at its first delivery, for messages that verified.
	E2E Latency `json:"e2e"`
}

// Sink is a fast SMTP sink MX for load tests. It accepts mail on every
// listen address, answers per its fault profile, verifies each message's
// X-Bench-Sum, records arrivals by (X-Bench-Id, recipient) and counts
// everything.
//
// Every method is safe for concurrent use. NewSink starts serving; Close
// stops. A connection is served by one goroutine with buffered reads and
// writes; replies are flushed only when the client has nothing more
// buffered, so pipelined commands get their replies in one write.
//
// Failures: a connection that errors (reset, timeout, protocol garbage
// beyond a line limit) is closed and counted; it never affects others.
// Messages are kept in memory only as the counters, the arrival log and
// captured domains say; nothing touches the disk.
type Sink struct {
	cfg     SinkConfig
	log     *slog.Logger
	faults  atomic.Pointer[compiledFaults]
	tlsConf *tls.Config
	certPEM []byte
	ehlo    []byte // EHLO reply tail after the first line
	ehloTLS []byte
	start   time.Time

	lns     []net.Listener
	httpLn  net.Listener
	httpSrv *http.Server
	closing chan struct{}
	closed  atomic.Bool
	wg      sync.WaitGroup

	connSeq atomic.Uint64

	connMu sync.Mutex
	conns  map[net.Conn]struct{}
	perIP  map[string]int

	// Counters (see SinkStats).
	connections, messages, recipients, bytes atomic.Uint64
	dropped, hung, greylisted, capped, tlsN  atomic.Uint64
	corrupted, unstamped, unique, duplicates atomic.Uint64
	active                                   atomic.Int64
	replies                                  [600]atomic.Uint64

	// recMu guards the delivery records.
	recMu    sync.Mutex
	seen     map[string]seenRec // by seenKey(id, rcpt)
	domains  map[string]uint64
	arrivals []Arrival // ring of cfg.ArrivalLog entries
	arrNext  uint64    // Seq of the next arrival
	first    int64     // Unix nanos of the first and latest arrival
	last     int64
	e2e      *hdrhistogram.Histogram

	capMu      sync.Mutex
	capDomains map[string]bool
	captured   map[string][]Captured

	greyMu sync.Mutex
	grey   map[string]time.Time // first attempt per sender/recipient
}

type seenRec struct {
	first int64
	count uint32
}

// NewSink validates cfg (after EnsureDefaults), listens on every address
// and starts serving. Close releases everything.
func NewSink(cfg SinkConfig) (*Sink, error) {
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	s := &Sink{
		cfg:        cfg,
		log:        cfg.Logger,
		start:      time.Now(),
		closing:    make(chan struct{}),
		conns:      map[net.Conn]struct{}{},
		perIP:      map[string]int{},
		seen:       map[string]seenRec{},
		domains:    map[string]uint64{},
		arrivals:   make([]Arrival, 0, min(cfg.ArrivalLog, 4096)),
		e2e:        newHist(),
		capDomains: map[string]bool{},
		captured:   map[string][]Captured{},
		grey:       map[string]time.Time{},
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	cf := cfg.Faults.compile()
	s.faults.Store(&cf)
	for _, d := range cfg.Capture {
		s.capDomains[strings.ToLower(d)] = true
	}
	for _, a := range cfg.Listen {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			s.closeListeners()
			return nil, fmt.Errorf("bench: sink listen %s: %w", a, err)
		}
		s.lns = append(s.lns, ln)
	}
	if cfg.StartTLS {
		if err := s.setupTLS(); err != nil {
			s.closeListeners()
			return nil, err
		}
	}
	s.ehlo = s.ehloTail(false)
	s.ehloTLS = s.ehloTail(true)
	if cfg.HTTP != "" {
		ln, err := net.Listen("tcp", cfg.HTTP)
		if err != nil {
			s.closeListeners()
			return nil, fmt.Errorf("bench: sink http listen %s: %w", cfg.HTTP, err)
		}
		s.httpLn = ln
		s.httpSrv = &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			_ = s.httpSrv.Serve(ln)
		}()
	}
	for _, ln := range s.lns {
		s.wg.Add(1)
		go s.acceptLoop(ln)
	}
	return s, nil
}

func (s *Sink) ehloTail(inTLS bool) []byte {
	var b []byte
	add := func(l string) { b = append(b, "250-"...); b = append(b, l...); b = append(b, "\r\n"...) }
	if !s.cfg.NoPipelining {
		add("PIPELINING")
	}
	add("8BITMIME")
	add("SMTPUTF8")
	add("SIZE " + strconv.FormatInt(s.cfg.MaxSize, 10))
	if s.cfg.Chunking {
		add("CHUNKING")
	}
	if s.cfg.StartTLS && !inTLS {
		add("STARTTLS")
	}
	b = append(b, "250 ENHANCEDSTATUSCODES\r\n"...)
	return b
}

func (s *Sink) closeListeners() {
	for _, ln := range s.lns {
		_ = ln.Close()
	}
}

// Addrs returns the actual listen addresses, in Listen order.
func (s *Sink) Addrs() []string {
	out := make([]string, len(s.lns))
	for i, ln := range s.lns {
		out[i] = ln.Addr().String()
	}
	return out
}

// HTTPAddr returns the actual address of the JSON endpoint, or "".
func (s *Sink) HTTPAddr() string {
	if s.httpLn == nil {
		return ""
	}
	return s.httpLn.Addr().String()
}

// CertPEM returns the PEM of the STARTTLS certificate (nil without
// STARTTLS), for clients that want to verify it.
func (s *Sink) CertPEM() []byte { return s.certPEM }

// Close stops accepting, closes every connection (hung ones included) and
// waits for all goroutines to end.
func (s *Sink) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	close(s.closing)
	s.closeListeners()
	if s.httpSrv != nil {
		_ = s.httpSrv.Close()
	}
	s.connMu.Lock()
	for c := range s.conns {
		_ = c.Close()
	}
	s.connMu.Unlock()
	s.wg.Wait()
	return nil
}

func (s *Sink) acceptLoop(ln net.Listener) {
	defer s.wg.Done()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.closed.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors and the like: wait a little, keep going.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("sink accept", "err", err)
			select {
			case <-time.After(backoff):
			case <-s.closing:
				return
			}
			continue
		}
		backoff = 0
		s.connMu.Lock()
		if s.closed.Load() {
			s.connMu.Unlock()
			_ = c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.connMu.Unlock()
		s.wg.Add(1)
		go s.serve(c)
	}
}

// SetFaults validates f and makes it the fault profile from now on:
// connections accepted later take their connection rule from it, and every
// later RCPT looks up its domain rule in it (transactions under way keep
// the rule their first recipient chose). Use it to release a deferring
// domain, or to start a storm, in the middle of a run.
func (s *Sink) SetFaults(f Faults) error {
	if err := f.Validate(); err != nil {
		return err
	}
	cf := f.compile()
	s.faults.Store(&cf)
	return nil
}

// E2EHistogram returns a copy of the end-to-end latency histogram
// (microseconds; see SinkStats.E2E), for merging and charts.
func (s *Sink) E2EHistogram() *hdrhistogram.Histogram {
	s.recMu.Lock()
	defer s.recMu.Unlock()
	return hdrhistogram.Import(s.e2e.Export())
}

// CaptureDomain starts keeping whole messages that have a recipient in
// domain (see Captured).
func (s *Sink) CaptureDomain(domain string) {
	s.capMu.Lock()
	s.capDomains[strings.ToLower(domain)] = true
	s.capMu.Unlock()
}

// Captured returns the messages kept for domain so far, oldest first.
func (s *Sink) Captured(domain string) []Captured {
	s.capMu.Lock()
	defer s.capMu.Unlock()
	return append([]Captured(nil), s.captured[strings.ToLower(domain)]...)
}

// Seen returns how many times (id, rcpt) was delivered and when first.
func (s *Sink) Seen(id, rcpt string) (int, time.Time) {
	s.recMu.Lock()
	defer s.recMu.Unlock()
	r, ok := s.seen[seenKey(id, rcpt)]
	if !ok {
		return 0, time.Time{}
	}
	return int(r.count), time.Unix(0, r.first)
}

// Count returns how many times (id, rcpt) was delivered (for Ledger.Check).
func (s *Sink) Count(id, rcpt string) int {
	n, _ := s.Seen(id, rcpt)
	return n
}

func seenKey(id, rcpt string) string { return id + "\x00" + strings.ToLower(rcpt) }

// Arrivals returns up to limit arrivals with Seq >= since, the Seq to ask
// for next, and how many wanted arrivals were already dropped from the
// log.
func (s *Sink) Arrivals(since uint64, limit int) (list []Arrival, next, dropped uint64) {
	s.recMu.Lock()
	defer s.recMu.Unlock()
	oldest := s.arrNext - uint64(len(s.arrivals))
	if since < oldest {
		dropped = oldest - since
		since = oldest
	}
	for seq := since; seq < s.arrNext && len(list) < limit; seq++ {
		a := s.arrivals[seq%uint64(max(s.cfg.ArrivalLog, 1))]
		list = append(list, a)
	}
	return list, since + uint64(len(list)), dropped
}

// Stats returns a snapshot of the counters.
func (s *Sink) Stats() SinkStats {
	s.recMu.Lock()
	start := s.start
	s.recMu.Unlock()
	st := SinkStats{
		Uptime:      time.Since(start),
		Connections: s.connections.Load(),
		Active:      s.active.Load(),
		Messages:    s.messages.Load(),
		Recipients:  s.recipients.Load(),
		Bytes:       s.bytes.Load(),
		Unique:      s.unique.Load(),
		Duplicates:  s.duplicates.Load(),
		Corrupted:   s.corrupted.Load(),
		Unstamped:   s.unstamped.Load(),
		Dropped:     s.dropped.Load(),
		Hung:        s.hung.Load(),
		Greylisted:  s.greylisted.Load(),
		ConnCapped:  s.capped.Load(),
		TLS:         s.tlsN.Load(),
		Replies:     map[int]uint64{},
	}
	for i := range s.replies {
		if n := s.replies[i].Load(); n > 0 {
			st.Replies[i] = n
		}
	}
	s.recMu.Lock()
	st.Domains = make(map[string]uint64, len(s.domains))
	for d, n := range s.domains {
		st.Domains[d] = n
	}
	st.E2E = latencyOf(s.e2e)
	if s.first != 0 {
		st.First, st.Last = time.Unix(0, s.first), time.Unix(0, s.last)
	}
	s.recMu.Unlock()
	return st
}

// Reset zeroes the counters and forgets arrivals, captured messages and
// greylist state (not the capture domains). Connections stay open.
func (s *Sink) Reset() {
	for _, c := range []*atomic.Uint64{&s.connections, &s.messages, &s.recipients, &s.bytes, &s.dropped,
		&s.hung, &s.greylisted, &s.capped, &s.tlsN, &s.corrupted, &s.unstamped, &s.unique, &s.duplicates} {
		c.Store(0)
	}
	for i := range s.replies {
		s.replies[i].Store(0)
	}
	s.recMu.Lock()
	s.seen = map[string]seenRec{}
	s.domains = map[string]uint64{}
	s.arrivals = s.arrivals[:0]
	s.arrNext = 0
	s.first, s.last = 0, 0
	s.e2e.Reset()
	s.start = time.Now()
	s.recMu.Unlock()
	s.capMu.Lock()
	s.captured = map[string][]Captured{}
	s.capMu.Unlock()
	s.greyMu.Lock()
	s.grey = map[string]time.Time{}
	s.greyMu.Unlock()
}

// Wait polls Stats every 10 ms until done returns true, ctx ends (its
// error is returned) or the sink closes (ErrSinkClosed).
func (s *Sink) Wait(ctx context.Context, done func(SinkStats) bool) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		if done(s.Stats()) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.closing:
			return ErrSinkClosed
		case <-t.C:
		}
	}
}

// record accounts for one accepted message.
func (s *Sink) record(from string, rcpts []string, msg []byte, mx string) {
	now := time.Now()
	s.messages.Add(1)
	s.recipients.Add(uint64(len(rcpts)))
	s.bytes.Add(uint64(len(msg)))
	st, err := CheckMessage(msg)
	status := "ok"
	switch {
	case errors.Is(err, ErrNoStamp):
		status = "unstamped"
		s.unstamped.Add(1)
	case err != nil:
		status = "corrupt"
		s.corrupted.Add(1)
		s.log.Debug("sink corrupt message", "msg_id", st.ID, "err", err)
	}
	a := Arrival{ID: st.ID, From: from, Rcpts: append([]string(nil), rcpts...), Arrived: now.UnixNano(),
		Size: len(msg), MX: mx, Status: status}
	if !st.Sent.IsZero() {
		a.Sent = st.Sent.UnixNano()
	}
	s.recMu.Lock()
	if s.first == 0 {
		s.first = a.Arrived
	}
	s.last = a.Arrived
	for _, r := range rcpts {
		s.domains[domainOf(r)]++
		if st.ID == "" {
			continue
		}
		if !s.cfg.NoRecords {
			k := seenKey(st.ID, r)
			if rec, ok := s.seen[k]; ok {
				rec.count++
				s.seen[k] = rec
				a.Dups++
				continue
			}
			s.seen[k] = seenRec{first: a.Arrived, count: 1}
		}
		if err == nil {
			recordDur(s.e2e, now.Sub(st.Sent))
		}
	}
	if st.ID != "" {
		s.unique.Add(uint64(len(rcpts) - a.Dups))
		s.duplicates.Add(uint64(a.Dups))
	}
	if s.cfg.ArrivalLog > 0 {
		a.Seq = s.arrNext
		if len(s.arrivals) < s.cfg.ArrivalLog {
			s.arrivals = append(s.arrivals, a)
		} else {
			s.arrivals[a.Seq%uint64(s.cfg.ArrivalLog)] = a
		}
		s.arrNext++
	}
	s.recMu.Unlock()

	s.capMu.Lock()
	if len(s.capDomains) > 0 {
		for _, r := range rcpts {
			if d := domainOf(r); s.capDomains[d] {
				s.captured[d] = append(s.captured[d], Captured{From: from,
					Rcpts: append([]string(nil), rcpts...), Raw: append([]byte(nil), msg...), Arrived: now, MX: mx})
				break
			}
		}
	}
	s.capMu.Unlock()
}

// domainOf returns the lower-case domain of an address ("" if none).
func domainOf(addr string) string {
	i := strings.LastIndexByte(addr, '@')
	if i < 0 {
		return ""
	}
	d := addr[i+1:]
	for j := 0; j < len(d); j++ {
		if c := d[j]; c >= 'A' && c <= 'Z' {
			return strings.ToLower(d)
		}
	}
	return d
}

// greylisted reports whether (from, rcpt) must still be refused.
func (s *Sink) greylistRefuses(from, rcpt string, delay time.Duration) bool {
	k := strings.ToLower(from) + "\x00" + strings.ToLower(rcpt)
	now := time.Now()
	s.greyMu.Lock()
	defer s.greyMu.Unlock()
	first, ok := s.grey[k]
	if !ok {
		s.grey[k] = now
		return true
	}
	return now.Sub(first) < delay
}

// serve runs one connection.
func (s *Sink) serve(nc net.Conn) {
	defer s.wg.Done()
	s.connections.Add(1)
	s.active.Add(1)
	local := nc.LocalAddr().String()
	ip := ""
	if ta, ok := nc.RemoteAddr().(*net.TCPAddr); ok {
		ip = ta.IP.String()
	}
	ord := s.connSeq.Add(1) - 1
	c := &sconn{
		s:     s,
		nc:    nc,
		r:     bufio.NewReaderSize(nc, 64<<10),
		w:     bufio.NewWriterSize(nc, 16<<10),
		rng:   rand.New(rand.NewPCG(s.cfg.Seed, ord)),
		local: local,
		rule:  s.faults.Load().forAddr(local),
	}
	counted := false
	defer func() {
		_ = c.nc.Close() // c.nc: the TLS conn after STARTTLS
		s.connMu.Lock()
		delete(s.conns, c.nc)
		if counted {
			if s.perIP[ip]--; s.perIP[ip] <= 0 {
				delete(s.perIP, ip)
			}
		}
		s.connMu.Unlock()
		s.active.Add(-1)
	}()
	if cap := c.rule.maxPerIP; cap > 0 {
		s.connMu.Lock()
		n := s.perIP[ip]
		if n < cap {
			s.perIP[ip] = n + 1
			counted = true
		}
		s.connMu.Unlock()
		if !counted {
			s.capped.Add(1)
			c.reply(421, "4.7.0", "Too many connections from your IP")
			_ = c.w.Flush()
			return
		}
	}
	if err := c.run(); err != nil && !errors.Is(err, errQuit) && !s.closed.Load() {
		s.log.Debug("sink connection", "remote", nc.RemoteAddr().String(), "err", err)
	}
}

var (
	errQuit = errors.New("quit")
	errDrop = errors.New("injected drop")
	errHang = errors.New("hung up")
)

// sconn is the state of one SMTP connection.
type sconn struct {
	s     *Sink
	nc    net.Conn
	r     *bufio.Reader
	w     *bufio.Writer
	rng   *rand.Rand
	local string
	rule  *rule
	inTLS bool

	helo      bool
	rejectAll bool // after a 5xx greeting: 503 to all but QUIT

	// transaction
	inTx    bool
	from    string
	rcpts   []string
	txRule  *rule
	msg     []byte
	tooBig  bool
	bdating bool
}

func (c *sconn) reset() {
	c.inTx, c.from, c.rcpts, c.txRule = false, "", c.rcpts[:0], nil
	c.msg, c.tooBig, c.bdating = c.msg[:0], false, false
}

// reply buffers one reply line.
func (c *sconn) reply(code int, enh, text string) {
	b := c.w.AvailableBuffer()
	b = (&smtperr.Error{Code: code, Enhanced: enh, Message: text}).AppendReply(b)
	_, _ = c.w.Write(b)
	c.s.replies[code].Add(1)
}

// replyRaw buffers a prebuilt reply whose code is code.
func (c *sconn) replyRaw(code int, line string) {
	_, _ = c.w.WriteString(line)
	c.s.replies[code].Add(1)
}

// readSlice returns the next line (or ErrBufferFull chunk), flushing owed
// replies first when the client has sent nothing more.
func (c *sconn) readSlice() ([]byte, error) {
	if c.r.Buffered() == 0 {
		if c.w.Buffered() > 0 {
			if err := c.w.Flush(); err != nil {
				return nil, err
			}
		}
		if t := c.s.cfg.IdleTimeout; t > 0 {
			_ = c.nc.SetDeadline(time.Now().Add(t)) // writes too: a client that never reads
		}
	}
	return c.r.ReadSlice('\n')
}

// sleep waits d unless the sink closes first.
func (c *sconn) sleep(d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-c.s.closing:
		return ErrSinkClosed
	}
}

// hang flushes what is owed, then reads and discards until the client or
// the sink closes the connection.
func (c *sconn) hang() error {
	c.s.hung.Add(1)
	_ = c.w.Flush()
	_ = c.nc.SetDeadline(time.Time{})
	_, _ = io.Copy(io.Discard, c.nc)
	return errHang
}

func (c *sconn) run() error {
	r := c.rule
	if r.hang {
		return c.hang()
	}
	if r.hasDelay {
		if err := c.sleep(r.delay.Sample(c.rng)); err != nil {
			return err
		}
	}
	if code := r.draw(stageConnect, c.rng); code != 0 {
		enh, text := faultReply(stageConnect, code)
		c.reply(code, enh, c.s.cfg.Hostname+" "+text)
		if code == 421 {
			return c.w.Flush()
		}
		c.rejectAll = true
	} else {
		c.reply(220, "", c.s.cfg.Hostname+" ESMTP hermod-bench sink")
	}
	for {
		line, err := c.readSlice()
		if err != nil {
			if errors.Is(err, bufio.ErrBufferFull) {
				if err := c.skipLine(); err != nil {
					return err
				}
				c.reply(500, "5.5.2", "Line too long")
				continue
			}
			return err
		}
		if err := c.command(line); err != nil {
			_ = c.w.Flush()
			return err
		}
	}
}

// skipLine discards the rest of an over-long line.
func (c *sconn) skipLine() error {
	for {
		_, err := c.r.ReadSlice('\n')
		if !errors.Is(err, bufio.ErrBufferFull) {
			return err
		}
	}
}

func verbIs(v []byte, s string) bool { return len(v) == 4 && asciiEqualFold(v, s) }

// command handles one command line (with its CRLF).
func (c *sconn) command(line []byte) error {
	line = bytes.TrimRight(line, "\r\n")
	verb, arg := line, []byte(nil)
	if i := bytes.IndexByte(line, ' '); i >= 0 {
		verb, arg = line[:i], line[i+1:]
	}
	if c.rejectAll {
		if verbIs(verb, "QUIT") {
			c.reply(221, "2.0.0", "Bye")
			return errQuit
		}
		c.reply(503, "5.5.1", "No SMTP service here")
		return nil
	}
	switch {
	case verbIs(verb, "EHLO"), verbIs(verb, "HELO"):
		if len(bytes.TrimSpace(arg)) == 0 {
			c.reply(501, "5.5.4", "Syntax: EHLO hostname")
			return nil
		}
		c.reset()
		c.helo = true
		if err := c.delay(c.rule); err != nil {
			return err
		}
		if verbIs(verb, "HELO") {
			c.reply(250, "", c.s.cfg.Hostname)
			return nil
		}
		_, _ = c.w.WriteString("250-" + c.s.cfg.Hostname + "\r\n")
		if c.inTLS {
			_, _ = c.w.Write(c.s.ehloTLS)
		} else {
			_, _ = c.w.Write(c.s.ehlo)
		}
		c.s.replies[250].Add(1)
	case verbIs(verb, "MAIL"):
		return c.mail(arg)
	case verbIs(verb, "RCPT"):
		return c.rcpt(arg)
	case verbIs(verb, "DATA"):
		return c.data()
	case verbIs(verb, "BDAT") && c.s.cfg.Chunking:
		return c.bdat(arg)
	case verbIs(verb, "RSET"):
		c.reset()
		c.replyRaw(250, "250 2.0.0 Ok\r\n")
	case verbIs(verb, "NOOP"):
		c.replyRaw(250, "250 2.0.0 Ok\r\n")
	case verbIs(verb, "QUIT"):
		c.replyRaw(221, "221 2.0.0 Bye\r\n")
		return errQuit
	case verbIs(verb, "VRFY"):
		c.reply(252, "2.5.0", "Cannot VRFY user, but will accept message")
	case verbIs(verb, "HELP"):
		c.reply(214, "2.0.0", "hermod-bench sink")
	case asciiEqualFold(verb, "STARTTLS") && c.s.cfg.StartTLS && !c.inTLS:
		return c.startTLS(arg)
	default:
		c.reply(500, "5.5.2", "Command not recognized")
	}
	return nil
}

func (c *sconn) delay(r *rule) error {
	if r.hasDelay {
		return c.sleep(r.delay.Sample(c.rng))
	}
	return nil
}

// parsePath parses "FROM:<addr> params" (keyword kw) and returns the
// address and the parameters.
func parsePath(arg []byte, kw string) (string, []byte, bool) {
	if len(arg) < len(kw) || !asciiEqualFold(arg[:len(kw)], kw) {
		return "", nil, false
	}
	arg = bytes.TrimLeft(arg[len(kw):], " ")
	if len(arg) == 0 || arg[0] != '<' {
		return "", nil, false
	}
	end := bytes.IndexByte(arg, '>')
	if end < 0 {
		return "", nil, false
	}
	return string(arg[1:end]), bytes.TrimSpace(arg[end+1:]), true
}

func (c *sconn) mail(arg []byte) error {
	switch {
	case !c.helo:
		c.reply(503, "5.5.1", "Send EHLO first")
		return nil
	case c.inTx:
		c.reply(503, "5.5.1", "Nested MAIL command")
		return nil
	}
	from, params, ok := parsePath(arg, "FROM:")
	if !ok {
		c.reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
		return nil
	}
	for len(params) > 0 {
		var p []byte
		p, params, _ = bytes.Cut(params, []byte(" "))
		k, v, _ := bytes.Cut(p, []byte("="))
		switch {
		case len(k) == 0:
		case asciiEqualFold(k, "SIZE"):
			n, err := strconv.ParseInt(string(v), 10, 64)
			if err != nil || n < 0 {
				c.reply(501, "5.5.4", "Bad SIZE")
				return nil
			}
			if c.s.cfg.MaxSize > 0 && n > c.s.cfg.MaxSize {
				c.reply(552, "5.3.4", "Message size exceeds fixed limit")
				return nil
			}
		case asciiEqualFold(k, "BODY"), asciiEqualFold(k, "SMTPUTF8"), asciiEqualFold(k, "RET"),
			asciiEqualFold(k, "ENVID"), asciiEqualFold(k, "AUTH"):
		default:
			c.reply(555, "5.5.4", "Unsupported MAIL parameter")
			return nil
		}
	}
	r := c.rule
	if err := c.delay(r); err != nil {
		return err
	}
	if code := r.draw(stageMail, c.rng); code != 0 {
		return c.fault(stageMail, code)
	}
	c.inTx, c.from = true, from
	c.replyRaw(250, "250 2.1.0 Ok\r\n")
	return nil
}

// fault sends an injected reply; 421 ends the connection.
func (c *sconn) fault(st stage, code int) error {
	enh, text := faultReply(st, code)
	c.reply(code, enh, text)
	if code == 421 {
		return errQuit
	}
	if st == stageData {
		c.reset()
	}
	return nil
}

func (c *sconn) rcpt(arg []byte) error {
	if !c.inTx {
		c.reply(503, "5.5.1", "Need MAIL command")
		return nil
	}
	rcpt, _, ok := parsePath(arg, "TO:")
	if !ok || rcpt == "" {
		c.reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
		return nil
	}
	if len(c.rcpts) >= c.s.cfg.MaxRcpts {
		c.reply(452, "4.5.3", "Too many recipients")
		return nil
	}
	r := c.rule
	if f := c.s.faults.Load(); len(f.domain) > 0 {
		if dr, ok := f.domain[domainOf(rcpt)]; ok {
			r = dr
		}
	}
	if r.hang {
		return c.hang()
	}
	if err := c.delay(r); err != nil {
		return err
	}
	if r.grey && c.s.greylistRefuses(c.from, rcpt, r.greyDelay) {
		c.s.greylisted.Add(1)
		c.reply(451, "4.7.1", "Greylisted, please try again later")
		return nil
	}
	if code := r.draw(stageRcpt, c.rng); code != 0 {
		return c.fault(stageRcpt, code)
	}
	if c.txRule == nil {
		c.txRule = r
	}
	c.rcpts = append(c.rcpts, rcpt)
	c.replyRaw(250, "250 2.1.5 Ok\r\n")
	return nil
}

// dataGate checks that a transaction can take data; it replies and
// returns false if not.
func (c *sconn) dataGate() bool {
	switch {
	case !c.inTx:
		c.reply(503, "5.5.1", "Need MAIL command")
		return false
	case len(c.rcpts) == 0:
		c.reply(554, "5.5.1", "No valid recipients")
		return false
	}
	return true
}

func (c *sconn) data() error {
	if !c.dataGate() {
		return nil
	}
	r := c.txRule
	if err := c.delay(r); err != nil {
		return err
	}
	drop := r.drop > 0 && c.rng.Float64() < r.drop
	c.replyRaw(354, "354 End data with <CR><LF>.<CR><LF>\r\n")
	if drop {
		_ = c.w.Flush()
		_, _ = c.readSlice()
		c.s.dropped.Add(1)
		return errDrop
	}
	c.msg = c.msg[:0]
	atStart := true
	max := c.s.cfg.MaxSize
	for {
		line, err := c.readSlice()
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return err
		}
		if atStart && len(line) > 0 && line[0] == '.' {
			if len(line) == 3 && line[1] == '\r' && line[2] == '\n' {
				break
			}
			line = line[1:]
		}
		atStart = err == nil
		if max > 0 && int64(len(c.msg)+len(line)) > max {
			c.tooBig = true
			c.msg = c.msg[:0]
		}
		if !c.tooBig {
			c.msg = append(c.msg, line...)
		}
	}
	return c.endData()
}

// endData answers the end of a message (DATA's dot or BDAT LAST).
func (c *sconn) endData() error {
	if c.tooBig {
		c.reset()
		c.reply(552, "5.3.4", "Message size exceeds fixed limit")
		return nil
	}
	r := c.txRule
	if err := c.delay(r); err != nil {
		return err
	}
	if r.hasDataDel {
		if err := c.sleep(r.dataDelay.Sample(c.rng)); err != nil {
			return err
		}
	}
	if code := r.draw(stageData, c.rng); code != 0 {
		return c.fault(stageData, code)
	}
	c.s.record(c.from, c.rcpts, c.msg, c.local)
	c.reset()
	c.replyRaw(250, "250 2.0.0 Ok: queued\r\n")
	return nil
}

func (c *sconn) bdat(arg []byte) error {
	sz, rest, _ := bytes.Cut(bytes.TrimSpace(arg), []byte(" "))
	n, err := strconv.ParseInt(string(sz), 10, 64)
	last := asciiEqualFold(bytes.TrimSpace(rest), "LAST")
	if err != nil || n < 0 || (len(bytes.TrimSpace(rest)) > 0 && !last) {
		c.reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
		return errQuit // the chunk's length is unknown: the stream is lost
	}
	ok := c.dataGate()
	if ok && !c.bdating {
		c.bdating = true
		if r := c.txRule; r.drop > 0 && c.rng.Float64() < r.drop {
			c.s.dropped.Add(1)
			return errDrop
		}
	}
	// Read the chunk whatever the verdict: it is on the wire.
	if !ok || c.tooBig || (c.s.cfg.MaxSize > 0 && int64(len(c.msg))+n > c.s.cfg.MaxSize) {
		if ok {
			c.tooBig = true
		}
		if _, err := io.CopyN(io.Discard, c.r, n); err != nil {
			return err
		}
		if !ok {
			return nil
		}
	} else {
		start := len(c.msg)
		c.msg = append(c.msg, make([]byte, n)...)
		if c.s.cfg.IdleTimeout > 0 {
			_ = c.nc.SetDeadline(time.Now().Add(c.s.cfg.IdleTimeout))
		}
		if _, err := io.ReadFull(c.r, c.msg[start:]); err != nil {
			return err
		}
	}
	if last {
		return c.endData()
	}
	c.reply(250, "2.0.0", strconv.FormatInt(n, 10)+" octets received")
	return nil
}

func (c *sconn) startTLS(arg []byte) error {
	if len(bytes.TrimSpace(arg)) > 0 {
		c.reply(501, "5.5.4", "Syntax: STARTTLS")
		return nil
	}
	if c.r.Buffered() > 0 {
		// RFC 3207 §4: nothing may be pipelined after STARTTLS.
		c.reply(503, "5.5.1", "Commands pipelined after STARTTLS")
		return errQuit
	}
	c.replyRaw(220, "220 2.0.0 Ready to start TLS\r\n")
	if err := c.w.Flush(); err != nil {
		return err
	}
	tc := tls.Server(c.nc, c.s.tlsConf)
	_ = tc.SetDeadline(time.Now().Add(30 * time.Second))
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("tls handshake: %w", err)
	}
	_ = tc.SetDeadline(time.Time{})
	c.s.tlsN.Add(1)
	c.s.connMu.Lock()
	delete(c.s.conns, c.nc)
	c.s.conns[tc] = struct{}{}
	c.s.connMu.Unlock()
	c.nc = tc
	c.inTLS = true
	c.r.Reset(tc)
	c.w.Reset(tc)
	c.helo = false
	c.reset()
	return nil
}

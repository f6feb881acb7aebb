package bench

import (
	"bufio"
	"context"
	crand "crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// Errors of the load generator.
var (
	// ErrProtocol means the server sent something that is not an SMTP reply.
	ErrProtocol = errors.New("bench: SMTP protocol error")
)

// TestDomain returns the name of generated test domain i (1-based):
// "d0001.test", "d0002.test", …
func TestDomain(i int) string {
	s := strconv.Itoa(i)
	if len(s) < 4 {
		s = "0000"[len(s):] + s
	}
	return "d" + s + ".test"
}

// LoadConfig configures a Load.
type LoadConfig struct {
	// Targets are the SMTP servers to send to; session i uses
	// Targets[i % len]. Default: ["127.0.0.1:2525"].
	Targets []string `toml:"targets"`
	// Sessions is the number of concurrent SMTP connections. Default: 50.
	Sessions int `toml:"sessions"`
	// Messages bounds the number of messages. Default: 10000.
	Messages int `toml:"messages"`
	// Duration bounds the time during which messages are started; messages
	// under way then get Timeout more to finish. Default: 1m.
	Duration time.Duration `toml:"duration"`
	// PerConn is the number of messages sent over one connection before
	// QUIT and a new connection; 0 reuses connections until the end.
	// Default: 0.
	PerConn int `toml:"per_conn"`
	// Rate > 0 runs an open loop: messages are due at this many per second
	// (arrivals per Arrivals) and served by up to Sessions connections;
	// 0 runs a closed loop (each session sends as fast as replies come).
	// Default: 0.
	Rate float64 `toml:"rate"`
	// Arrivals is "poisson" or "uniform" (evenly spaced), for Rate > 0.
	// Default: "poisson".
	Arrivals string `toml:"arrivals"`
	// Rcpts is the number of recipients per message. Default: 1.
	Rcpts int `toml:"rcpts"`
	// Domains is the number of generated test domains d0001.test… used for
	// recipients. Default: 100.
	Domains int `toml:"domains"`
	// DomainList replaces the generated domains when set. Default: none.
	DomainList []string `toml:"domain_list"`
	// Mix is how recipients' domains are drawn: "uniform", or "zipf" (the
	// k-th domain has weight 1/k^ZipfS: with the defaults the first three
	// domains take about two thirds of the mail, like large providers).
	// Default: "uniform".
	Mix string `toml:"mix"`
	// ZipfS is the exponent of the "zipf" mix. Default: 1.5.
	ZipfS float64 `toml:"zipf_s"`
	// Users is the number of distinct local parts per domain (u0…).
	// Default: 1000.
	Users int `toml:"users"`
	// Size is the message size distribution (see SizeDist).
	// Default: "1KiB".
	Size SizeDist `toml:"size"`
	// NoPipelining sends one command at a time even when the server offers
	// PIPELINING. Default: false (pipeline MAIL, RCPT and DATA, and the
	// next message's envelope with the previous message's data).
	NoPipelining bool `toml:"no_pipelining"`
	// StartTLS upgrades each connection when the server offers STARTTLS
	// (certificates are not verified). Default: false.
	StartTLS bool `toml:"starttls"`
	// From is the envelope sender. Default: "bench@sender.test".
	From string `toml:"from"`
	// Helo is the EHLO name. Default: "load.test".
	Helo string `toml:"helo"`
	// SourceAddrs are local IPs to bind; session i uses SourceAddrs[i %
	// len]. Default: none (the kernel chooses).
	SourceAddrs []string `toml:"source_addrs"`
	// Timeout bounds the wait for each reply and each connect. Default: 30s.
	Timeout time.Duration `toml:"timeout"`
	// Seed seeds sizes, recipients and body text. Default: 0.
	Seed uint64 `toml:"seed"`
	// RunTag prefixes message ids ("<tag>-<seq>"); it must differ between
	// runs against one sink. Default: 8 random hex digits.
	RunTag string `toml:"run_tag"`
	// OnAccepted, when set, is called for each accepted message with its id
	// and the recipients the server accepted, from the session goroutines
	// (concurrently; it must be quick). Default: nil.
	OnAccepted func(id string, rcpts []string) `toml:"-" json:"-"`
	// Logger receives session errors at debug level. Default: nil
	// (discard).
	Logger *slog.Logger `toml:"-" json:"-"`
}

// DefaultLoadConfig returns the defaults.
func DefaultLoadConfig() LoadConfig {
	var c LoadConfig
	c.EnsureDefaults()
	return c
}

// EnsureDefaults fills zero fields with their defaults (RunTag included).
func (c *LoadConfig) EnsureDefaults() {
	if len(c.Targets) == 0 {
		c.Targets = []string{"127.0.0.1:2525"}
	}
	if c.Sessions == 0 {
		c.Sessions = 50
	}
	if c.Messages == 0 {
		c.Messages = 10000
	}
	if c.Duration == 0 {
		c.Duration = time.Minute
	}
	if c.Arrivals == "" {
		c.Arrivals = "poisson"
	}
	if c.Rcpts == 0 {
		c.Rcpts = 1
	}
	if c.Domains == 0 {
		c.Domains = 100
	}
	if c.Mix == "" {
		c.Mix = "uniform"
	}
	if c.ZipfS == 0 {
		c.ZipfS = 1.5
	}
	if c.Users == 0 {
		c.Users = 1000
	}
	if c.Size.IsZero() {
		c.Size = FixedSize(1024)
	}
	if c.From == "" {
		c.From = "bench@sender.test"
	}
	if c.Helo == "" {
		c.Helo = "load.test"
	}
	if c.Timeout == 0 {
		c.Timeout = 30 * time.Second
	}
	if c.RunTag == "" {
		var b [4]byte
		_, _ = crand.Read(b[:])
		c.RunTag = hex.EncodeToString(b[:])
	}
}

// Validate reports every problem at once.
func (c LoadConfig) Validate() error {
	var errs []error
	bad := func(key, msg string) { errs = append(errs, fmt.Errorf("load.%s: %s", key, msg)) }
	if len(c.Targets) == 0 {
		bad("targets", "at least one target is required")
	}
	for i, a := range c.Targets {
		if _, _, err := net.SplitHostPort(a); err != nil {
			bad(fmt.Sprintf("targets[%d]", i), err.Error())
		}
	}
	for i, a := range c.SourceAddrs {
		if net.ParseIP(a) == nil {
			bad(fmt.Sprintf("source_addrs[%d]", i), fmt.Sprintf("%q is not an IP address", a))
		}
	}
	if c.Sessions < 1 {
		bad("sessions", "must be >= 1")
	}
	if c.Messages < 1 {
		bad("messages", "must be >= 1")
	}
	if c.Duration <= 0 {
		bad("duration", "must be > 0")
	}
	if c.PerConn < 0 {
		bad("per_conn", "must be >= 0")
	}
	if c.Rate < 0 || math.IsNaN(c.Rate) || math.IsInf(c.Rate, 0) {
		bad("rate", "must be a finite number >= 0")
	}
	if c.Arrivals != "poisson" && c.Arrivals != "uniform" {
		bad("arrivals", `must be "poisson" or "uniform"`)
	}
	if c.Rcpts < 1 {
		bad("rcpts", "must be >= 1")
	}
	if c.Domains < 1 && len(c.DomainList) == 0 {
		bad("domains", "must be >= 1")
	}
	if c.Mix != "uniform" && c.Mix != "zipf" {
		bad("mix", `must be "uniform" or "zipf"`)
	}
	if !(c.ZipfS > 0) {
		bad("zipf_s", "must be > 0")
	}
	if c.Users < 1 {
		bad("users", "must be >= 1")
	}
	if c.Timeout <= 0 {
		bad("timeout", "must be > 0")
	}
	if strings.ContainsAny(c.RunTag, " \t\r\n<>@") {
		bad("run_tag", "must not contain spaces, <, > or @")
	}
	if strings.ContainsAny(c.From, " \t\r\n<>") {
		bad("from", "must not contain spaces, < or >")
	}
	return errors.Join(errs...)
}

// LoadResult is the outcome of a Load run.
type LoadResult struct {
	RunTag  string        `json:"run_tag"`
	Start   time.Time     `json:"start"`
	Elapsed time.Duration `json:"elapsed_ns"`
	// Attempted messages ended as Accepted (2xx after the data), Rejected
	// (a 5xx decided), TempFailed (a 4xx decided) or Failed (connection or
	// protocol error, timeout; no reply decided).
	Attempted  uint64 `json:"attempted"`
	Accepted   uint64 `json:"accepted"`
	Rejected   uint64 `json:"rejected"`
	TempFailed uint64 `json:"tempfailed"`
	Failed     uint64 `json:"failed"`
	// Codes counts messages by the reply code that decided them (0: none).
	Codes map[int]uint64 `json:"codes"`
	// Recipient replies to RCPT.
	RcptAccepted   uint64 `json:"rcpt_accepted"`
	RcptRejected   uint64 `json:"rcpt_rejected"`
	RcptTempFailed uint64 `json:"rcpt_tempfailed"`
	// Delivered counts (message, recipient) pairs the server took
	// responsibility for: accepted recipients of accepted messages.
	Delivered uint64 `json:"delivered"`
	// Bytes counts message bytes (before dot-stuffing) of accepted
	// messages.
	Bytes uint64 `json:"bytes"`
	// Connections opened, and connection attempts that failed (refused,
	// timed out, or a non-2xx greeting).
	Connections  uint64 `json:"connections"`
	ConnFailures uint64 `json:"conn_failures"`
	// TLSConnections counts connections upgraded with STARTTLS.
	TLSConnections uint64 `json:"tls_connections"`
	// Rate is Accepted per second of Elapsed.
	Rate float64 `json:"rate"`
	// Latency is from the first byte of a message's MAIL command to the
	// reply to its data, for accepted messages.
	Latency Latency `json:"latency"`
	// Sojourn is from the time an open-loop message was due to the reply
	// to its data (it includes waiting for a free session), for accepted
	// messages; empty in a closed loop.
	Sojourn Latency `json:"sojourn"`
	// Hist is the Latency histogram in microseconds.
	Hist *hdrhistogram.Histogram `json:"-"`
}

// LoadProgress is a live view of a running Load.
type LoadProgress struct {
	Attempted, Accepted uint64
	Elapsed             time.Duration
}

// Load is a load generator: Sessions SMTP connections sending stamped
// messages (see Generator) to Targets, in a closed loop or at a fixed rate.
//
// A run is bounded: it starts no message after Messages have been started
// or Duration has passed, and ends at most Timeout after that (remaining
// connections are then closed). Messages are never retried: each is
// attempted once and ends in one of the LoadResult classes; only a message
// whose envelope was pipelined behind one that lost the connection is sent
// again on a new connection (it had not been answered).
//
// A Load runs once; Progress is safe to call during Run.
type Load struct {
	cfg     LoadConfig
	log     *slog.Logger
	domains []string
	zipfCDF []float64

	start    time.Time // set by Run before any session starts
	startNS  atomic.Int64
	stopAt   time.Time
	ticket   atomic.Int64
	jobs     chan job
	ran      atomic.Bool
	accepted atomic.Uint64
	tried    atomic.Uint64

	connMu sync.Mutex
	conns  map[net.Conn]struct{}
	dead   bool
}

type job struct {
	seq uint64
	due time.Time // zero in a closed loop
}

// NewLoad validates cfg (after EnsureDefaults) and returns a Load ready to
// Run.
func NewLoad(cfg LoadConfig) (*Load, error) {
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	l := &Load{cfg: cfg, log: cfg.Logger, conns: map[net.Conn]struct{}{}}
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	if len(cfg.DomainList) > 0 {
		l.domains = cfg.DomainList
	} else {
		for i := 1; i <= cfg.Domains; i++ {
			l.domains = append(l.domains, TestDomain(i))
		}
	}
	if cfg.Mix == "zipf" {
		l.zipfCDF = make([]float64, len(l.domains))
		sum := 0.0
		for i := range l.domains {
			sum += 1 / math.Pow(float64(i+1), cfg.ZipfS)
			l.zipfCDF[i] = sum
		}
		for i := range l.zipfCDF {
			l.zipfCDF[i] /= sum
		}
	}
	return l, nil
}

// Config returns the configuration in use (defaults filled in).
func (l *Load) Config() LoadConfig { return l.cfg }

// Progress returns how many messages have ended and been accepted so far.
func (l *Load) Progress() LoadProgress {
	p := LoadProgress{Attempted: l.tried.Load(), Accepted: l.accepted.Load()}
	if ns := l.startNS.Load(); ns != 0 {
		p.Elapsed = time.Since(time.Unix(0, ns))
	}
	return p
}

// Run sends the load and returns the result. It returns early (with the
// partial result and ctx's error) when ctx ends. A Load runs only once.
func (l *Load) Run(ctx context.Context) (LoadResult, error) {
	if l.ran.Swap(true) {
		return LoadResult{}, errors.New("bench: Load.Run called twice")
	}
	cfg := &l.cfg
	l.start = time.Now()
	l.startNS.Store(l.start.UnixNano())
	l.stopAt = l.start.Add(cfg.Duration)
	hard, cancel := context.WithDeadline(ctx, l.stopAt.Add(cfg.Timeout))
	defer cancel()
	stopConns := context.AfterFunc(hard, l.closeAll)
	defer stopConns()

	if cfg.Rate > 0 {
		l.jobs = make(chan job, 4*cfg.Sessions)
		go l.dispatch(hard)
	}
	gen := NewGenerator(cfg.Seed)
	workers := make([]*worker, cfg.Sessions)
	var wg sync.WaitGroup
	for i := range workers {
		w := &worker{
			l:      l,
			idx:    i,
			rng:    rand.New(rand.NewPCG(cfg.Seed, uint64(i))),
			gen:    gen.Clone(),
			hist:   newHist(),
			codes:  map[int]uint64{},
			target: cfg.Targets[i%len(cfg.Targets)],
		}
		if cfg.Rate > 0 {
			w.sojourn = newHist()
		}
		if len(cfg.SourceAddrs) > 0 {
			w.source = net.ParseIP(cfg.SourceAddrs[i%len(cfg.SourceAddrs)])
		}
		workers[i] = w
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.run(hard)
		}()
	}
	wg.Wait()
	res := LoadResult{RunTag: cfg.RunTag, Start: l.start, Elapsed: time.Since(l.start), Codes: map[int]uint64{},
		Hist: newHist()}
	soj := newHist()
	for _, w := range workers {
		res.Attempted += w.n.attempted
		res.Accepted += w.n.accepted
		res.Rejected += w.n.rejected
		res.TempFailed += w.n.tempfailed
		res.Failed += w.n.failed
		res.RcptAccepted += w.n.rcptOK
		res.RcptRejected += w.n.rcptRej
		res.RcptTempFailed += w.n.rcptTemp
		res.Delivered += w.n.delivered
		res.Bytes += w.n.bytes
		res.Connections += w.n.conns
		res.ConnFailures += w.n.connFail
		res.TLSConnections += w.n.tlsConns
		for c, n := range w.codes {
			res.Codes[c] += n
		}
		res.Hist.Merge(w.hist)
		if w.sojourn != nil {
			soj.Merge(w.sojourn)
		}
	}
	res.Latency = latencyOf(res.Hist)
	res.Sojourn = latencyOf(soj)
	if s := res.Elapsed.Seconds(); s > 0 {
		res.Rate = float64(res.Accepted) / s
	}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	return res, nil
}

// dispatch feeds l.jobs at the configured rate, then closes it.
func (l *Load) dispatch(ctx context.Context) {
	defer close(l.jobs)
	r := rand.New(rand.NewPCG(l.cfg.Seed, 0x61727269))
	mean := float64(time.Second) / l.cfg.Rate
	due := l.start
	for seq := 0; seq < l.cfg.Messages; seq++ {
		if l.cfg.Arrivals == "poisson" {
			due = due.Add(time.Duration(r.ExpFloat64() * mean))
		} else {
			due = due.Add(time.Duration(mean))
		}
		if due.After(l.stopAt) {
			return
		}
		// Sleep only when ahead by more than a millisecond: timers are
		// coarse, and late messages keep their due time (sojourn counts).
		if d := time.Until(due); d > time.Millisecond {
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return
			}
		}
		select {
		case l.jobs <- job{seq: uint64(seq), due: due}:
		case <-ctx.Done():
			return
		}
	}
}

// next returns the next message to send. In an open loop, block says
// whether to wait for one.
func (l *Load) next(ctx context.Context, block bool) (job, bool) {
	if ctx.Err() != nil {
		return job{}, false
	}
	if l.jobs == nil {
		if time.Now().After(l.stopAt) {
			return job{}, false
		}
		n := l.ticket.Add(1) - 1
		if n >= int64(l.cfg.Messages) {
			return job{}, false
		}
		return job{seq: uint64(n)}, true
	}
	if !block {
		select {
		case j, ok := <-l.jobs:
			return j, ok
		default:
			return job{}, false
		}
	}
	select {
	case j, ok := <-l.jobs:
		return j, ok
	case <-ctx.Done():
		return job{}, false
	}
}

func (l *Load) track(c net.Conn) bool {
	l.connMu.Lock()
	defer l.connMu.Unlock()
	if l.dead {
		return false
	}
	l.conns[c] = struct{}{}
	return true
}

func (l *Load) untrack(c net.Conn) {
	l.connMu.Lock()
	delete(l.conns, c)
	l.connMu.Unlock()
}

func (l *Load) closeAll() {
	l.connMu.Lock()
	l.dead = true
	for c := range l.conns {
		_ = c.Close()
	}
	l.connMu.Unlock()
}

// pickDomain draws a recipient domain.
func (l *Load) pickDomain(r *rand.Rand) string {
	if l.zipfCDF == nil {
		return l.domains[r.IntN(len(l.domains))]
	}
	u := r.Float64()
	lo, hi := 0, len(l.zipfCDF)-1
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if l.zipfCDF[m] <= u {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return l.domains[lo]
}

// message is one message in flight on a worker.
type message struct {
	job      job
	id       string
	rcpts    []string
	raw      []byte // the message
	wire     []byte // dot-stuffed, with the terminator
	start    time.Time
	envSent  bool
	mailCode int
	rcptOK   []string
	decisive int // first failing RCPT code, if all failed
}

type workerCounts struct {
	attempted, accepted, rejected, tempfailed, failed uint64
	rcptOK, rcptRej, rcptTemp, delivered, bytes       uint64
	conns, connFail, tlsConns                         uint64
}

// worker is one session.
type worker struct {
	l       *Load
	idx     int
	rng     *rand.Rand
	gen     *Generator
	hist    *hdrhistogram.Histogram
	sojourn *hdrhistogram.Histogram
	codes   map[int]uint64
	n       workerCounts
	target  string
	source  net.IP

	conn      net.Conn
	r         *bufio.Reader
	w         *bufio.Writer
	pipe      bool // server offers PIPELINING and we use it
	size      bool
	onConn    int // messages started on this connection
	needRset  bool
	msgs      [2]message
	nextSlot  int
	failures  int
	scratch   []byte
	replyText string
}

func (w *worker) run(ctx context.Context) {
	var cur *message
	for {
		if cur == nil {
			j, ok := w.l.next(ctx, true)
			if !ok {
				break
			}
			cur = w.prepare(j)
		}
		if w.conn == nil {
			if ctx.Err() != nil {
				w.finish(cur, 0, false) // started, never answered
				break
			}
			if err := w.connect(ctx); err != nil {
				code := 0
				var re *replyError
				if errors.As(err, &re) {
					code = re.code
				}
				w.l.log.Debug("load connect", "target", w.target, "err", err)
				w.finish(cur, code, false)
				cur = nil
				w.failures++
				if !w.backoff(ctx) {
					break
				}
				continue
			}
			w.failures = 0
		}
		cur = w.transact(ctx, cur)
	}
	w.quit()
}

// backoff sleeps after a failed connection, growing to 1 s.
func (w *worker) backoff(ctx context.Context) bool {
	d := min(time.Duration(1<<min(w.failures, 10))*time.Millisecond, time.Second)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// prepare builds the message for j in a free slot.
func (w *worker) prepare(j job) *message {
	m := &w.msgs[w.nextSlot]
	w.nextSlot ^= 1
	cfg := &w.l.cfg
	m.job = j
	m.id = cfg.RunTag + "-" + strconv.FormatUint(j.seq, 10)
	m.rcpts = m.rcpts[:0]
	base := w.rng.IntN(cfg.Users)
	for k := 0; k < cfg.Rcpts; k++ {
		m.rcpts = append(m.rcpts, "u"+strconv.Itoa((base+k)%cfg.Users)+"@"+w.l.pickDomain(w.rng))
	}
	m.envSent = false
	m.raw = m.raw[:0]
	return m
}

// build stamps and renders m now, as its envelope is about to be written.
func (w *worker) build(m *message) {
	m.start = time.Now()
	spec := MessageSpec{ID: m.id, From: w.l.cfg.From, To: m.rcpts, Size: w.l.cfg.Size.Sample(w.rng), Sent: m.start}
	m.raw = w.gen.Append(m.raw[:0], spec, w.rng)
	m.wire = AppendDotStuffed(m.wire[:0], m.raw)
	m.mailCode, m.rcptOK, m.decisive = 0, m.rcptOK[:0], 0
}

// appendMail appends m's MAIL command.
func (w *worker) appendMail(b []byte, m *message) []byte {
	b = append(b, "MAIL FROM:<"...)
	b = append(b, w.l.cfg.From...)
	b = append(b, '>')
	if w.size {
		b = append(b, " SIZE="...)
		b = strconv.AppendInt(b, int64(len(m.raw)), 10)
	}
	return append(b, "\r\n"...)
}

// writeEnvelope buffers RSET (if owed), MAIL, RCPTs and DATA for m.
func (w *worker) writeEnvelope(m *message) {
	w.build(m)
	b := w.scratch[:0]
	if w.needRset {
		b = append(b, "RSET\r\n"...)
	}
	b = w.appendMail(b, m)
	for _, r := range m.rcpts {
		b = append(b, "RCPT TO:<"...)
		b = append(b, r...)
		b = append(b, ">\r\n"...)
	}
	b = append(b, "DATA\r\n"...)
	w.scratch = b
	_, _ = w.w.Write(b)
	m.envSent = true
	w.onConn++
}

type replyError struct {
	code int
	text string
}

func (e *replyError) Error() string { return "bench: server replied " + e.text }

// readReply reads one (possibly multi-line) reply and returns its code.
// When each is set it gets every line's text after the code.
func (w *worker) readReply(each func(string)) (int, error) {
	code := -1
	for {
		line, err := w.r.ReadSlice('\n')
		if err != nil {
			return 0, err
		}
		if len(line) < 4 || line[0] < '2' || line[0] > '5' || line[1] < '0' || line[1] > '9' || line[2] < '0' || line[2] > '9' {
			return 0, fmt.Errorf("%w: %q", ErrProtocol, line)
		}
		c := int(line[0]-'0')*100 + int(line[1]-'0')*10 + int(line[2]-'0')
		if code >= 0 && c != code {
			return 0, fmt.Errorf("%w: mixed codes in one reply", ErrProtocol)
		}
		code = c
		if each != nil {
			each(strings.TrimRight(string(line[4:]), "\r\n"))
		}
		if line[3] == ' ' || line[3] == '\r' || line[3] == '\n' {
			if code >= 400 {
				w.replyText = strings.TrimRight(string(line), "\r\n")
			}
			return code, nil
		}
		if line[3] != '-' {
			return 0, fmt.Errorf("%w: %q", ErrProtocol, line)
		}
	}
}

func (w *worker) deadline() {
	_ = w.conn.SetDeadline(time.Now().Add(w.l.cfg.Timeout))
}

// connect dials, reads the greeting and says EHLO (and STARTTLS).
func (w *worker) connect(ctx context.Context) error {
	d := net.Dialer{Timeout: w.l.cfg.Timeout}
	if w.source != nil {
		d.LocalAddr = &net.TCPAddr{IP: w.source}
	}
	w.n.conns++
	c, err := d.DialContext(ctx, "tcp", w.target)
	if err != nil {
		w.n.connFail++
		return err
	}
	if !w.l.track(c) {
		_ = c.Close()
		w.n.connFail++
		return context.Canceled
	}
	w.conn = c
	if w.r == nil {
		w.r = bufio.NewReaderSize(c, 32<<10)
		w.w = bufio.NewWriterSize(c, 64<<10)
	} else {
		w.r.Reset(c)
		w.w.Reset(c)
	}
	w.onConn, w.needRset = 0, false
	w.deadline()
	code, err := w.readReply(nil)
	if err == nil && code/100 != 2 {
		err = &replyError{code: code, text: w.replyText}
	}
	if err == nil {
		err = w.ehlo()
	}
	if err != nil {
		w.n.connFail++
		w.drop()
		return err
	}
	return nil
}

func (w *worker) ehlo() error {
	_, _ = w.w.WriteString("EHLO " + w.l.cfg.Helo + "\r\n")
	if err := w.w.Flush(); err != nil {
		return err
	}
	var pipe, size, tlsOK bool
	first := true
	code, err := w.readReply(func(s string) {
		if first {
			first = false
			return
		}
		kw, _, _ := strings.Cut(strings.ToUpper(s), " ")
		switch kw {
		case "PIPELINING":
			pipe = true
		case "SIZE":
			size = true
		case "STARTTLS":
			tlsOK = true
		}
	})
	if err != nil {
		return err
	}
	if code != 250 {
		return &replyError{code: code, text: w.replyText}
	}
	w.pipe, w.size = pipe && !w.l.cfg.NoPipelining, size
	if w.l.cfg.StartTLS && tlsOK {
		if _, ok := w.conn.(*tls.Conn); !ok {
			return w.startTLS()
		}
	}
	return nil
}

func (w *worker) startTLS() error {
	_, _ = w.w.WriteString("STARTTLS\r\n")
	if err := w.w.Flush(); err != nil {
		return err
	}
	code, err := w.readReply(nil)
	if err != nil {
		return err
	}
	if code != 220 {
		return &replyError{code: code, text: w.replyText}
	}
	host, _, _ := net.SplitHostPort(w.target)
	tc := tls.Client(w.conn, &tls.Config{ServerName: host, InsecureSkipVerify: true}) //nolint:gosec // test peers use self-signed certificates
	if err := tc.Handshake(); err != nil {
		return err
	}
	w.l.untrack(w.conn)
	w.conn = tc
	w.n.tlsConns++
	if !w.l.track(tc) {
		return context.Canceled
	}
	w.r.Reset(tc)
	w.w.Reset(tc)
	return w.ehlo()
}

// drop closes the connection without QUIT.
func (w *worker) drop() {
	if w.conn != nil {
		w.l.untrack(w.conn)
		_ = w.conn.Close()
		w.conn = nil
	}
}

// quit ends the connection politely (bounded by a short timeout).
func (w *worker) quit() {
	if w.conn == nil {
		return
	}
	_ = w.conn.SetDeadline(time.Now().Add(min(w.l.cfg.Timeout, 2*time.Second)))
	if w.needRset {
		_, _ = w.w.WriteString("RSET\r\n")
	}
	_, _ = w.w.WriteString("QUIT\r\n")
	if w.w.Flush() == nil {
		if w.needRset {
			_, _ = w.readReply(nil)
		}
		_, _ = w.readReply(nil)
	}
	w.drop()
}

// transact carries m through one transaction on the current connection and
// returns the next message if its envelope was pipelined behind m's data.
func (w *worker) transact(ctx context.Context, m *message) *message {
	w.deadline()
	var code int
	var err error
	if w.pipe {
		if !m.envSent {
			w.writeEnvelope(m)
		}
		code, err = w.envelopePipelined(m)
	} else {
		w.build(m)
		w.onConn++
		code, err = w.envelopeStepwise(m)
	}
	if err != nil {
		w.connLost(err)
		w.finish(m, 0, false)
		return nil
	}
	if code != 354 {
		code = w.decide(m, code)
		w.finish(m, code, false)
		w.needRset = m.mailCode/100 == 2
		if code == 421 {
			w.connLost(nil)
		}
		return nil
	}
	w.needRset = false
	_, _ = w.w.Write(m.wire)
	var next *message
	if w.pipe && (w.l.cfg.PerConn == 0 || w.onConn < w.l.cfg.PerConn) {
		if j, ok := w.l.next(ctx, false); ok {
			next = w.prepare(j)
			w.writeEnvelope(next)
		}
	}
	if err = w.w.Flush(); err == nil {
		code, err = w.readReply(nil)
	}
	if err != nil {
		w.connLost(err)
		w.finish(m, 0, false)
	} else {
		w.finish(m, code, code/100 == 2)
		if code == 421 {
			w.connLost(nil)
		}
	}
	if next != nil && w.conn == nil {
		next.envSent = false // unanswered: send again on a new connection
		w.onConn = 0
	}
	if w.conn != nil && next == nil && w.l.cfg.PerConn > 0 && w.onConn >= w.l.cfg.PerConn {
		w.quit()
	}
	return next
}

// envelopePipelined flushes the envelope and reads its replies; it returns
// the reply to DATA.
func (w *worker) envelopePipelined(m *message) (int, error) {
	if err := w.w.Flush(); err != nil {
		return 0, err
	}
	if w.needRset {
		if _, err := w.readReply(nil); err != nil {
			return 0, err
		}
		w.needRset = false
	}
	code, err := w.readReply(nil)
	if err != nil {
		return 0, err
	}
	m.mailCode = code
	if code == 421 {
		return 421, nil
	}
	for _, r := range m.rcpts {
		code, err := w.readReply(nil)
		if err != nil {
			return 0, err
		}
		if m.mailCode/100 != 2 {
			continue // 503s that follow the failed MAIL
		}
		w.rcptReply(m, r, code)
		if code == 421 {
			return 421, nil
		}
	}
	return w.readReply(nil)
}

// envelopeStepwise sends the envelope one command at a time and returns
// the reply to DATA, or the code that made it pointless to send DATA.
func (w *worker) envelopeStepwise(m *message) (int, error) {
	cmd := func(b []byte) (int, error) {
		_, _ = w.w.Write(b)
		if err := w.w.Flush(); err != nil {
			return 0, err
		}
		return w.readReply(nil)
	}
	if w.needRset {
		if _, err := cmd([]byte("RSET\r\n")); err != nil {
			return 0, err
		}
		w.needRset = false
	}
	code, err := cmd(w.appendMail(w.scratch[:0], m))
	if err != nil {
		return 0, err
	}
	m.mailCode = code
	if code/100 != 2 {
		return code, nil
	}
	for _, r := range m.rcpts {
		code, err := cmd(append(append(append(w.scratch[:0], "RCPT TO:<"...), r...), ">\r\n"...))
		if err != nil {
			return 0, err
		}
		w.rcptReply(m, r, code)
		if code == 421 {
			return code, nil
		}
	}
	if len(m.rcptOK) == 0 {
		return m.decisive, nil
	}
	return cmd([]byte("DATA\r\n"))
}

func (w *worker) rcptReply(m *message, rcpt string, code int) {
	switch code / 100 {
	case 2:
		w.n.rcptOK++
		m.rcptOK = append(m.rcptOK, rcpt)
	case 4:
		w.n.rcptTemp++
	default:
		w.n.rcptRej++
	}
	if code/100 != 2 && m.decisive == 0 {
		m.decisive = code
	}
}

// decide returns the code that decided a message that got no 354.
func (w *worker) decide(m *message, dataCode int) int {
	switch {
	case m.mailCode/100 != 2:
		return m.mailCode
	case len(m.rcptOK) == 0 && m.decisive != 0:
		return m.decisive
	}
	return dataCode
}

// connLost records a broken connection.
func (w *worker) connLost(err error) {
	if err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, io.EOF) {
		w.l.log.Debug("load session", "target", w.target, "err", err)
	}
	w.drop()
}

// finish accounts for m's outcome.
func (w *worker) finish(m *message, code int, ok bool) {
	w.n.attempted++
	w.codes[code]++
	w.l.tried.Add(1)
	switch {
	case ok:
		now := time.Now()
		w.n.accepted++
		w.l.accepted.Add(1)
		w.n.delivered += uint64(len(m.rcptOK))
		w.n.bytes += uint64(len(m.raw))
		recordDur(w.hist, now.Sub(m.start))
		if w.sojourn != nil && !m.job.due.IsZero() {
			recordDur(w.sojourn, now.Sub(m.job.due))
		}
		if cb := w.l.cfg.OnAccepted; cb != nil {
			cb(m.id, append([]string(nil), m.rcptOK...))
		}
	case code/100 == 4:
		w.n.tempfailed++
	case code/100 == 5:
		w.n.rejected++
	default:
		w.n.failed++
	}
}

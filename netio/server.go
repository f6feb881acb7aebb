package netio

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/panjf2000/gnet/v2"
	"github.com/panjf2000/gnet/v2/pkg/logging"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// Server is the inbound SMTP server: gnet event loops (one per CPU) running
// a Session per connection, handing each connection that issues STARTTLS to
// a goroutine driving crypto/tls.
//
// Invariants:
//   - Nothing that blocks runs on an event loop. Backend.Data returns at
//     once; its commit completes on a spool goroutine, which wakes the
//     connection's loop, and only then is the reply (250 or 451) written.
//   - Connections beyond MaxConnections or MaxConnectionsPerIP receive
//     421 4.7.0 and are closed before any session state exists.
//   - A connection silent past CommandTimeout (DataTimeout while message
//     data is expected), or sending data slower than MinDataRate, receives
//     421 4.4.2 and is closed. No timeout runs while a commit is pending.
//   - The message content held by all sessions together (bodies being
//     received and bodies being committed) stays within
//     MaxBufferedBytes: a message that does not fit is read to its end,
//     dropped and answered 452 4.3.1, and MAIL gets 452 4.3.1 while the
//     budget is spent.
//
// On failure: a listener that cannot be bound makes Serve return an error;
// an individual connection error closes only that connection. A message
// whose commit was in flight when its client vanished stays committed (the
// client may send it again: delivery is at least once). A client that only
// shut down its sending side while a commit was pending still gets the
// reply, and those to the commands it pipelined behind (gnet closes on the
// end of input, so such a connection moves to a goroutine as a TLS one
// does).
type Server struct {
	cfg     ServerConfig
	backend Backend
	log     *slog.Logger
	tlsCfg  atomic.Pointer[tls.Config]

	eng     gnet.Engine
	booted  chan struct{}
	stopped chan struct{}

	mu     sync.Mutex
	conns  map[*conn]struct{}
	perIP  map[netip.Addr]int
	total  int
	closed bool
	tlsWG  sync.WaitGroup

	m serverCounters
}

// NewServer returns a server for cfg (defaults applied). tlsConfig may be
// nil: STARTTLS is then not offered. Call Serve to run it.
func NewServer(cfg ServerConfig, b Backend, tlsConfig *tls.Config, logger *slog.Logger) (*Server, error) {
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	cfg.budget = newContentBudget(cfg.MaxBufferedBytes)
	s := &Server{
		cfg:     cfg,
		backend: b,
		log:     logger,
		booted:  make(chan struct{}),
		stopped: make(chan struct{}),
		conns:   make(map[*conn]struct{}),
		perIP:   make(map[netip.Addr]int),
	}
	s.tlsCfg.Store(tlsConfig)
	return s, nil
}

// SetTLSConfig replaces the TLS configuration for new STARTTLS handshakes
// (a reload); nil stops offering STARTTLS on new connections.
func (s *Server) SetTLSConfig(c *tls.Config) { s.tlsCfg.Store(c) }

// Ready is closed once every listener is bound and accepting.
func (s *Server) Ready() <-chan struct{} { return s.booted }

// Serve binds the listeners and runs the event loops until Shutdown. It
// returns an error if a listener cannot be bound.
func (s *Server) Serve() error {
	addrs := make([]string, len(s.cfg.Listen))
	for i, l := range s.cfg.Listen {
		addrs[i] = "tcp://" + l
	}
	// gnet (v2.9.7) mishandles a listener that cannot be bound: the
	// listeners already opened for earlier addresses stay open (bound)
	// forever, and with WithTCPKeepAlive the bind error is replaced by the
	// result of setsockopt on the closed descriptor — EBADF, or nil and a
	// "listener" on whatever file reused that number. So every address is
	// tried here first, and no keepalive is set on the listener (a dead
	// client is closed by the session's command timeouts).
	if err := checkBindable(s.cfg.Listen); err != nil {
		close(s.stopped)
		return fmt.Errorf("netio: serve %v: %w", s.cfg.Listen, err)
	}
	h := &handler{s: s}
	err := gnet.Rotate(h, addrs,
		gnet.WithMulticore(true),
		gnet.WithNumEventLoop(eventLoops(s.cfg.EventLoops, runtime.GOMAXPROCS(0))),
		gnet.WithReuseAddr(true),
		gnet.WithTicker(true),
		gnet.WithLogger(gnetLogger{s.log}),
		gnet.WithLogLevel(logging.ErrorLevel),
	)
	close(s.stopped)
	if err != nil {
		return fmt.Errorf("netio: serve %v: %w", s.cfg.Listen, err)
	}
	return nil
}

// eventLoops returns the number of gnet event loops: n when set, otherwise
// half of procs (GOMAXPROCS), at least one.
//
// Not one per CPU, gnet's own default: an event loop waits for its sockets
// in epoll_wait, an ordinary system call for the Go runtime, which counts
// the loop as running on its P until sysmon takes the P back (20 µs to
// 10 ms later). With a loop per P the idle loops can hold every P while
// the goroutines that do most of a relay's work (delivery agents, spool
// commits, the scheduler) wait for sysmon to hand one over, and sysmon,
// retaking Ps all the time, keeps running at its 20 µs period (a tenth of
// hermod's CPU on steady-1k with 2 CPUs and two loops). A loop's own work
// is small (the session parser and one read and one write per message), so
// half the Ps serve it well.
func eventLoops(n, procs int) int {
	if n > 0 {
		return n
	}
	return max(1, procs/2)
}

// checkBindable binds and closes each address (with SO_REUSEADDR, as gnet
// does), so that a busy one is reported before gnet opens any listener.
func checkBindable(listen []string) error {
	for _, a := range listen {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			return err
		}
		if err := ln.Close(); err != nil {
			return err
		}
	}
	return nil
}

// Shutdown stops accepting, closes every connection (gnet ones and those
// handed to TLS goroutines) and waits for the TLS goroutines to end or ctx
// to expire.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	var tlsConns []net.Conn
	for c := range s.conns {
		if nc := c.netConn.Load(); nc != nil {
			tlsConns = append(tlsConns, *nc)
		}
	}
	s.mu.Unlock()
	var err error
	select {
	case <-s.booted:
		err = s.eng.Stop(ctx)
	default:
	}
	for _, nc := range tlsConns {
		nc.Close()
	}
	done := make(chan struct{})
	go func() { s.tlsWG.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		return errors.Join(err, ctx.Err())
	}
	return err
}

// admit counts a new connection from ip, or returns the refusal.
func (s *Server) admit(ip netip.Addr) *smtperr.Error {
	key := ipKey(ip)
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closed:
		return errShuttingDown
	case s.total >= s.cfg.MaxConnections:
		s.m.refusedTotal.Add(1)
		return errTooManyConns
	case s.perIP[key] >= s.cfg.MaxConnectionsPerIP:
		s.m.refusedPerIP.Add(1)
		return errTooManyConnsIP
	}
	s.total++
	s.perIP[key]++
	return nil
}

// ipKey is the unit of the per-IP limit: the address for IPv4, the /64 for
// IPv6 (one host usually owns a whole /64).
func ipKey(ip netip.Addr) netip.Addr {
	ip = ip.Unmap()
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.Addr()
	}
	return ip
}

func (s *Server) release(c *conn) {
	if !c.released.CompareAndSwap(false, true) {
		return
	}
	key := ipKey(c.info.Remote.Addr())
	s.mu.Lock()
	delete(s.conns, c)
	s.total--
	if n := s.perIP[key] - 1; n > 0 {
		s.perIP[key] = n
	} else {
		delete(s.perIP, key)
	}
	s.mu.Unlock()
	s.m.active.Add(-1)
}

var (
	errTooManyConns   = smtperr.New(421, "4.7.0", "Error: too many connections, try again later")
	errTooManyConnsIP = smtperr.New(421, "4.7.0", "Error: too many connections from your address, try again later")
	errShuttingDown   = smtperr.New(421, "4.3.2", "Error: service shutting down")
	errTimeout        = smtperr.New(421, "4.4.2", "Error: timeout exceeded, closing connection")
	errSlowData       = smtperr.New(421, "4.4.2", "Error: data rate too low, closing connection")
	errOutputBacklog  = smtperr.New(421, "4.7.0", "Error: client does not read replies, closing connection")
	errInputBacklog   = smtperr.New(421, "4.7.0", "Error: too much input while a reply is pending, closing connection")
)

// maxOutbound is the reply backlog after which a client that pipelines
// commands without reading the replies is disconnected.
const maxOutbound = 1 << 20

// maxPendingInbound is the input a client may send while a commit is
// pending. gnet keeps reading the socket meanwhile, so without a bound a
// client that does not wait for the reply to its end of data (RFC 2920
// §3.1 says it must) would pile up memory for as long as the commit lasts.
const maxPendingInbound = 1 << 20

// conn is the per-connection state. Fields without atomics belong to the
// goroutine driving the session (the event loop, or the TLS goroutine
// after the hand-off).
type conn struct {
	s       *Server
	gc      gnet.Conn
	sess    *Session
	info    ConnInfo
	out     []byte
	result  chan *smtperr.Error // commit results, capacity 1
	outcome string              // how the session ended, for metrics

	handedOff bool
	progress  uint64 // the session's Progress when lastActive was set
	released  atomic.Bool
	tlsMode   atomic.Bool
	netConn   atomic.Pointer[net.Conn]
	timedOut  atomic.Bool

	// Read by the ticker.
	phase      atomic.Uint32
	lastActive atomic.Int64 // unix nanos of the last consumed input
	dataStart  atomic.Int64 // unix nanos when the data phase began
	dataBytes  atomic.Int64
}

func (c *conn) notify(r *smtperr.Error) {
	c.result <- r
	if !c.tlsMode.Load() {
		_ = c.gc.Wake(nil)
	}
}

// track publishes the session's phase for the ticker. The idle timer
// restarts when the session made progress (a complete command, content
// octets) or changed phase, not on any octet read: a partial command line
// does not extend the command timeout.
//
// The clocks are set before the phase is published: the ticker, on another
// goroutine, must never see a new phase with the previous one's clocks
// (a data phase with no start, a command phase idle since before a long
// commit).
func (c *conn) track(now int64) {
	ph := c.sess.Phase()
	old := Phase(c.phase.Load()) // only this connection's goroutine stores it
	if p := c.sess.Progress(); p != c.progress || old != ph {
		c.progress = p
		c.lastActive.Store(now)
	}
	if ph == PhaseData || ph == PhaseBDAT {
		if old != PhaseData && old != PhaseBDAT {
			c.dataStart.Store(now)
		}
		c.dataBytes.Store(c.sess.DataBytes)
	}
	c.phase.Store(uint32(ph))
}

// expired reports why c must be closed at now, or nil.
func (c *conn) expired(now int64, cfg *ServerConfig) *smtperr.Error {
	last := c.lastActive.Load()
	switch Phase(c.phase.Load()) {
	case PhasePending, PhaseClosed:
		return nil
	case PhaseData, PhaseBDAT:
		if now-last > int64(cfg.DataTimeout) {
			return errTimeout
		}
		if cfg.MinDataRate > 0 {
			elapsed := now - c.dataStart.Load()
			if elapsed > int64(cfg.DataRateGrace) && elapsed > int64(time.Second) &&
				c.dataBytes.Load()*int64(time.Second)/elapsed < cfg.MinDataRate {
				return errSlowData
			}
		}
	default:
		if now-last > int64(cfg.CommandTimeout) {
			return errTimeout
		}
	}
	return nil
}

// handler adapts Server to gnet's event callbacks.
type handler struct {
	gnet.BuiltinEventEngine
	s *Server
}

func (h *handler) OnBoot(eng gnet.Engine) gnet.Action {
	h.s.eng = eng
	close(h.s.booted)
	h.s.log.Info("smtp server listening", "listen", h.s.cfg.Listen)
	return gnet.None
}

func addrPort(a net.Addr) netip.AddrPort {
	if t, ok := a.(*net.TCPAddr); ok {
		ap := t.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

func (h *handler) OnOpen(gc gnet.Conn) ([]byte, gnet.Action) {
	s := h.s
	info := ConnInfo{Remote: addrPort(gc.RemoteAddr()), Local: addrPort(gc.LocalAddr())}
	if r := s.admit(info.Remote.Addr()); r != nil {
		return r.AppendReply(nil), gnet.Close
	}
	s.m.accepted.Add(1)
	s.m.active.Add(1)
	c := &conn{s: s, gc: gc, info: info, result: make(chan *smtperr.Error, 1)}
	c.sess = NewSession(&s.cfg, s.backend, info, s.tlsCfg.Load() != nil, c.notify)
	gc.SetContext(c)
	// The idle clock starts before the ticker (another goroutine) can see
	// the connection: with lastActive still 0 it took a new connection
	// for one idle since 1970 and closed it with 421 (seen once in CI).
	c.lastActive.Store(time.Now().UnixNano())
	s.mu.Lock()
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	out, act := c.sess.Greeting(make([]byte, 0, 512))
	now := time.Now().UnixNano()
	c.lastActive.Store(now)
	c.track(now)
	if act == ActClose || c.sess.Refused() {
		c.outcome = "refused"
	}
	if act == ActClose {
		return out, gnet.Close
	}
	return out, gnet.None
}

func (h *handler) OnClose(gc gnet.Conn, err error) gnet.Action {
	c, ok := gc.Context().(*conn)
	if !ok || c.handedOff {
		return gnet.None
	}
	if errors.Is(err, io.EOF) && c.sess.Phase() == PhasePending && h.handOffHalfClosed(c) {
		return gnet.None
	}
	h.s.finish(c, err)
	return gnet.None
}

// handOffHalfClosed keeps a connection whose client shut down its sending
// side (gnet closes on the end of input) while a commit is pending: a
// goroutine waits for the commit, writes its reply and answers the input
// pipelined behind it, as the TLS goroutines do. Without it the client of
// a queued message would never see the 250 and would send the message
// again, and a pipelined QUIT would go unanswered (RFC 5321 §4.1.1.10).
// It reports false when the connection could not be kept.
func (h *handler) handOffHalfClosed(c *conn) bool {
	fd, err := c.gc.Dup()
	if err != nil {
		h.s.log.Warn("half-closed connection: dup failed", "remote", c.info.Remote, "err", err)
		return false
	}
	in, _ := c.gc.Peek(-1)
	pending := append(make([]byte, 0, len(in)+64<<10), in...)
	c.handedOff = true
	c.tlsMode.Store(true) // no more wake-ups nor ticker: the goroutine owns c
	c.sess.tls = false    // a client that sends no more cannot negotiate TLS
	h.s.tlsWG.Add(1)
	go h.s.serveHalfClosed(c, fd, pending)
	return true
}

// finish accounts for a session that ended.
func (s *Server) finish(c *conn, err error) {
	c.sess.Abort()
	outcome := c.outcome
	switch {
	case outcome != "":
	case c.timedOut.Load():
		outcome = "timeout"
	case err != nil && !errors.Is(err, io.EOF): // EOF: the client closed
		outcome = "error"
	default:
		outcome = "client_closed"
	}
	s.m.outcome(outcome)
	s.release(c)
}

func (h *handler) OnTraffic(gc gnet.Conn) gnet.Action {
	c, ok := gc.Context().(*conn)
	if !ok || c.handedOff {
		return gnet.Close
	}
	out := c.out[:0]
	act := ActNone
	if c.sess.Phase() == PhasePending {
		select {
		case r := <-c.result:
			out, act = c.sess.Resume(r, out)
		default:
			// Input stays buffered until the commit is done, up to a bound.
			if gc.InboundBuffered() > maxPendingInbound {
				_, _ = gc.Write(errInputBacklog.AppendReply(nil))
				c.outcome = "backlog"
				return gnet.Close
			}
			return gnet.None
		}
	}
	if act == ActNone {
		buf, _ := gc.Peek(-1)
		var n int
		n, out, act = c.sess.Feed(buf, out)
		if n > 0 {
			_, _ = gc.Discard(n)
		}
	}
	c.track(time.Now().UnixNano())
	if len(out) > 0 {
		_, _ = gc.Write(out)
	}
	if cap(out) <= 64<<10 {
		c.out = out[:0]
	}
	switch act {
	case ActClose:
		if c.outcome == "" {
			c.outcome = c.closeOutcome()
		}
		return gnet.Close
	case ActStartTLS:
		return h.startTLS(c)
	}
	if gc.OutboundBuffered() > maxOutbound {
		_, _ = gc.Write(errOutputBacklog.AppendReply(nil))
		c.outcome = "backlog"
		return gnet.Close
	}
	return gnet.None
}

// closeOutcome names why the session asked to close.
func (c *conn) closeOutcome() string {
	switch {
	case c.sess.Quit():
		return "quit"
	case c.timedOut.Load():
		return "timeout"
	default:
		return "protocol_error"
	}
}

func (h *handler) OnTick() (time.Duration, gnet.Action) {
	s := h.s
	now := time.Now().UnixNano()
	var expired []*conn
	var reasons []*smtperr.Error
	s.mu.Lock()
	for c := range s.conns {
		if c.tlsMode.Load() || c.timedOut.Load() {
			continue
		}
		if r := c.expired(now, &s.cfg); r != nil {
			expired = append(expired, c)
			reasons = append(reasons, r)
		}
	}
	s.mu.Unlock()
	for i, c := range expired {
		c.timedOut.Store(true)
		_ = c.gc.AsyncWrite(reasons[i].AppendReply(nil), nil)
		_ = c.gc.Close()
	}
	return time.Second, gnet.None
}

// gnetLogger sends gnet's own log lines to slog.
type gnetLogger struct{ l *slog.Logger }

func (g gnetLogger) Debugf(f string, a ...any) { g.l.Debug(fmt.Sprintf(f, a...), "component", "gnet") }
func (g gnetLogger) Infof(f string, a ...any)  { g.l.Info(fmt.Sprintf(f, a...), "component", "gnet") }
func (g gnetLogger) Warnf(f string, a ...any)  { g.l.Warn(fmt.Sprintf(f, a...), "component", "gnet") }
func (g gnetLogger) Errorf(f string, a ...any) { g.l.Error(fmt.Sprintf(f, a...), "component", "gnet") }
func (g gnetLogger) Fatalf(f string, a ...any) { g.l.Error(fmt.Sprintf(f, a...), "component", "gnet") }

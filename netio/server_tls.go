package netio

import (
	"context"
	"crypto/tls"
	"net"
	"os"
	"time"

	"github.com/panjf2000/gnet/v2"
)

// STARTTLS design: gnet has no TLS. After the session has written
// "220 Ready to start TLS", the loop duplicates the socket descriptor,
// returns gnet.Close (gnet flushes the 220 and closes only its own
// descriptor) and a goroutine serves the rest of the connection through
// crypto/tls on the duplicate, driving the same Session with ordinary
// deadlines. TLS sessions are the minority of inbound traffic for a relay
// fed by its own senders, and a goroutine per TLS connection costs far less
// than re-implementing TLS record handling over the loop's buffers; the
// plain path keeps the event loop's economy. Bytes pipelined after STARTTLS
// never reach the TLS session: the Session refuses them before the
// hand-off, and bytes arriving after it are fed to the TLS handshake, which
// fails on them.
func (h *handler) startTLS(c *conn) gnet.Action {
	fd, err := c.gc.Dup()
	if err != nil {
		h.s.log.Warn("starttls: dup failed", "remote", c.info.Remote, "err", err)
		c.outcome = "tls_failed"
		return gnet.Close
	}
	c.handedOff = true
	c.tlsMode.Store(true)
	h.s.tlsWG.Add(1)
	go h.s.serveTLS(c, fd)
	return gnet.Close
}

func (s *Server) serveTLS(c *conn, fd int) {
	defer s.tlsWG.Done()
	var outcome string
	defer func() {
		c.outcome = outcome
		s.finish(c, nil)
	}()
	f := os.NewFile(uintptr(fd), "smtp-starttls")
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		outcome = "tls_failed"
		return
	}
	cfg := s.tlsCfg.Load()
	if cfg == nil {
		nc.Close()
		outcome = "tls_failed"
		return
	}
	tc := tls.Server(nc, cfg)
	if !s.adopt(c, tc) {
		outcome = "shutdown"
		return
	}
	defer tc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.CommandTimeout)
	err = tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		s.m.tlsFailed.Add(1)
		s.log.Debug("starttls handshake failed", "remote", c.info.Remote, "err", err)
		outcome = "tls_failed"
		return
	}
	s.m.tlsOK.Add(1)
	cs := tc.ConnectionState()
	c.sess.TLSStarted(&cs)
	outcome = s.runBlocking(c, tc, nil)
}

// serveHalfClosed finishes, on the duplicate descriptor fd, a plain
// connection whose client shut down its sending side while a commit was
// pending; pending is the input gnet had buffered (see handOffHalfClosed).
func (s *Server) serveHalfClosed(c *conn, fd int, pending []byte) {
	defer s.tlsWG.Done()
	outcome := "client_closed"
	defer func() {
		c.outcome = outcome
		s.finish(c, nil)
	}()
	f := os.NewFile(uintptr(fd), "smtp-halfclosed")
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return
	}
	if !s.adopt(c, nc) {
		outcome = "shutdown"
		return
	}
	defer nc.Close()
	outcome = s.runBlocking(c, nc, pending)
}

// adopt publishes nc as c's connection (so that Shutdown can close it) and
// reports whether the server still runs; when it does not, nc is closed.
func (s *Server) adopt(c *conn, nc net.Conn) bool {
	c.netConn.Store(&nc)
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		nc.Close()
	}
	return !closed
}

// runBlocking drives a session over a blocking connection until it ends and
// returns the session's outcome. buf holds input already received (nil
// for none); its capacity beyond its length is the read buffer.
func (s *Server) runBlocking(c *conn, nc net.Conn, buf []byte) string {
	if buf == nil {
		buf = make([]byte, 0, 64<<10)
	}
	out := make([]byte, 0, 512)
	// write sends replies, each with a fresh deadline: a stale one (say,
	// set with the 354 before a DATA phase longer than CommandTimeout)
	// would fail the reply to a message already committed, and the client
	// would send it again.
	write := func(b []byte) error {
		_ = nc.SetWriteDeadline(time.Now().Add(s.cfg.CommandTimeout))
		_, err := nc.Write(b)
		return err
	}
	var dataStart time.Time
	// The read deadline runs from the session's last progress (a complete
	// command, content octets, a change of phase), as on the event loop:
	// a client dribbling a command line that never ends is not kept alive
	// by each octet.
	lastActive, progress, lastPhase := time.Now(), c.sess.Progress(), c.sess.Phase()
	for {
		act := ActNone
		var n int
		n, out, act = c.sess.Feed(buf, out[:0])
		buf = buf[:copy(buf, buf[n:])]
		if act == ActPending {
			if len(out) > 0 {
				if err := write(out); err != nil {
					c.sess.Abort()
					<-c.result
					return "client_closed"
				}
			}
			r := <-c.result
			out, act = c.sess.Resume(r, out[:0])
			if act == ActNone {
				if err := write(out); err != nil {
					return "client_closed"
				}
				out = out[:0]
				continue // feed what was pipelined behind DATA
			}
		}
		if len(out) > 0 {
			if err := write(out); err != nil {
				return "client_closed"
			}
		}
		switch act {
		case ActClose:
			if c.sess.Quit() {
				return "quit"
			}
			return "protocol_error"
		case ActStartTLS:
			return "protocol_error" // cannot happen: TLS is active or not offered
		}
		phase := c.sess.Phase()
		if p := c.sess.Progress(); p != progress || phase != lastPhase {
			lastActive, progress, lastPhase = time.Now(), p, phase
		}
		timeout := s.cfg.CommandTimeout
		inData := phase == PhaseData || phase == PhaseBDAT
		if inData {
			timeout = s.cfg.DataTimeout
			if dataStart.IsZero() {
				dataStart = time.Now()
			}
		} else {
			dataStart = time.Time{}
		}
		_ = nc.SetReadDeadline(lastActive.Add(timeout))
		if len(buf) == cap(buf) {
			// Cannot happen: the session consumes or discards long lines.
			return "protocol_error"
		}
		start := len(buf)
		m, err := nc.Read(buf[start:cap(buf)])
		buf = buf[:start+m]
		if err != nil && m == 0 {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				_ = write(errTimeout.AppendReply(nil))
				return "timeout"
			}
			return "client_closed"
		}
		if inData && s.cfg.MinDataRate > 0 {
			elapsed := time.Since(dataStart)
			if elapsed > s.cfg.DataRateGrace && elapsed > time.Second &&
				c.sess.DataBytes*int64(time.Second)/int64(elapsed) < s.cfg.MinDataRate {
				_ = write(errSlowData.AppendReply(nil))
				return "timeout"
			}
		}
	}
}

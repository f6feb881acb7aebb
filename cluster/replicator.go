package cluster

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hermod-mta/hermod/spool"
)

// ErrNoReplicas is the refusal when RequireReplicas is set and too few
// peers could take a copy.
var ErrNoReplicas = errors.New("cluster: not enough peers to replicate to")

// replicator is the sending side: one connection per holder, frames
// written by one goroutine per connection (many messages per write),
// acknowledgements read by another.
type replicator struct {
	self    string
	key     []byte
	log     *slog.Logger
	timeout time.Duration

	mu    sync.Mutex
	peers map[string]*peerConn

	replicated atomic.Int64 // copies acknowledged
	short      atomic.Int64 // messages acknowledged with fewer copies than asked
}

type peerConn struct {
	self       string // this node, announced in the hello
	key        []byte // the cluster's secret key (authenticates the hello)
	name, addr string
	log        *slog.Logger

	mu      sync.Mutex
	conn    net.Conn
	out     chan []byte   // frames to write (never closed)
	done    chan struct{} // closed when conn fails
	pending map[uint64]func(error)
	answers map[uint64]chan []byte
	seq     uint64
	down    time.Time // when the last connection failed (redial after 1s)
}

func newReplicator(self string, key []byte, timeout time.Duration, log *slog.Logger) *replicator {
	return &replicator{self: self, key: key, log: log, timeout: timeout, peers: map[string]*peerConn{}}
}

// rank orders candidate holders for id: highest rendezvous score first,
// so every node computes the same order and load spreads evenly.
func rank(id spool.ID, names []string) []string { return rankKey(id[:], names) }

// rankKey is rank for any key.
func rankKey(key []byte, names []string) []string {
	type sc struct {
		name  string
		score uint64
	}
	s := make([]sc, len(names))
	for i, n := range names {
		h := fnv.New64a()
		h.Write(key)
		h.Write([]byte(n))
		s[i] = sc{n, h.Sum64()}
	}
	slices.SortFunc(s, func(a, b sc) int {
		if a.score > b.score {
			return -1
		}
		if a.score < b.score {
			return 1
		}
		return 0
	})
	out := make([]string, len(s))
	for i := range s {
		out[i] = s[i].name
	}
	return out
}

// peer returns the connection state for member m, creating it.
func (r *replicator) peer(m Member) *peerConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	p := r.peers[m.Name]
	if p == nil || p.addr != m.Repl {
		p = &peerConn{self: r.self, key: r.key, name: m.Name, addr: m.Repl, log: r.log}
		r.peers[m.Name] = p
	}
	return p
}

// forget closes the connection to a node that failed or left.
func (r *replicator) forget(name string) {
	r.mu.Lock()
	p := r.peers[name]
	delete(r.peers, name)
	r.mu.Unlock()
	if p != nil {
		p.fail(errors.New("peer left the cluster"))
	}
}

func (r *replicator) closeAll() {
	r.mu.Lock()
	ps := r.peers
	r.peers = map[string]*peerConn{}
	r.mu.Unlock()
	for _, p := range ps {
		p.fail(errors.New("shutting down"))
	}
}

// send queues a frame to p, connecting first when needed. cb, when set,
// is called with the acknowledgement (seq is put in front of payload).
func (p *peerConn) send(typ byte, payload []byte, withSeq bool, cb func(error), answer chan []byte) error {
	p.mu.Lock()
	if p.conn == nil {
		if !p.down.IsZero() && time.Since(p.down) < time.Second {
			p.mu.Unlock()
			return fmt.Errorf("cluster: peer %s unreachable", p.name)
		}
		if err := p.dialLocked(); err != nil {
			p.down = time.Now()
			p.mu.Unlock()
			return err
		}
	}
	f := make([]byte, 0, len(payload)+12)
	f = append(f, typ)
	if withSeq {
		p.seq++
		f = binary.AppendUvarint(f, p.seq)
		if cb != nil {
			p.pending[p.seq] = cb
		}
		if answer != nil {
			p.answers[p.seq] = answer
		}
	}
	f = append(f, payload...)
	out, done := p.out, p.done
	p.mu.Unlock()
	select {
	case <-done:
		return fmt.Errorf("cluster: connection to %s lost", p.name)
	default:
	}
	select {
	case out <- f:
		return nil
	case <-done:
		return fmt.Errorf("cluster: connection to %s lost", p.name)
	default:
		// The writer is far behind: treat the peer as failed rather than
		// block the SMTP session.
		p.fail(fmt.Errorf("cluster: replication queue to %s full", p.name))
		return fmt.Errorf("cluster: replication queue to %s full", p.name)
	}
}

// connected reports whether a connection is up (sending will not dial).
func (p *peerConn) connected() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conn != nil
}

func (p *peerConn) dialLocked() error {
	c, err := net.DialTimeout("tcp", p.addr, 2*time.Second)
	if err != nil {
		return fmt.Errorf("cluster: connecting to %s (%s): %w", p.name, p.addr, err)
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	// Handshake: the holder's challenge, our authenticated hello.
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	br := bufio.NewReaderSize(c, 64<<10)
	typ, challenge, err := readFrame(br, nil)
	if err == nil && (typ != frameChallenge || len(challenge) != 16) {
		err = fmt.Errorf("%w: no challenge", errFrame)
	}
	if err == nil {
		w := bufio.NewWriterSize(c, 256)
		if err = writeFrame(w, frameHello, encodeHello(p.key, challenge, p.self)); err == nil {
			err = w.Flush()
		}
	}
	_ = c.SetDeadline(time.Time{})
	if err != nil {
		c.Close()
		return fmt.Errorf("cluster: handshake with %s (%s): %w", p.name, p.addr, err)
	}
	p.conn = c
	p.out = make(chan []byte, 16384)
	p.done = make(chan struct{})
	p.pending = map[uint64]func(error){}
	p.answers = map[uint64]chan []byte{}
	p.down = time.Time{}
	go p.writer(c, p.out, p.done)
	go p.reader(c, br)
	return nil
}

// writer sends queued frames, flushing when the queue is empty, until
// the connection fails (done). The queue is never closed: senders racing
// with a failure see done instead.
func (p *peerConn) writer(c net.Conn, out chan []byte, done chan struct{}) {
	w := bufio.NewWriterSize(c, 256<<10)
	for {
		var f []byte
		select {
		case f = <-out:
		case <-done:
			return
		}
		if err := writeFrame(w, f[0], f[1:]); err != nil {
			p.failConn(c, err)
			return
		}
		if len(out) == 0 {
			if err := w.Flush(); err != nil {
				p.failConn(c, err)
				return
			}
		}
	}
}

func (p *peerConn) reader(c net.Conn, r *bufio.Reader) {
	for {
		typ, pl, err := readFrame(r, nil)
		if err != nil {
			p.failConn(c, err)
			return
		}
		rd := reader{b: pl}
		seq := rd.uvarint()
		switch typ {
		case frameAck:
			var ackErr error
			if rd.byte() != 0 {
				ackErr = fmt.Errorf("cluster: %s could not store the copy: %s", p.name, rd.str())
			}
			p.mu.Lock()
			cb := p.pending[seq]
			delete(p.pending, seq)
			p.mu.Unlock()
			if cb != nil {
				cb(ackErr)
			}
		case frameTaken, frameGone:
			p.mu.Lock()
			ch := p.answers[seq]
			delete(p.answers, seq)
			p.mu.Unlock()
			if ch != nil {
				ch <- rd.b
			}
		default:
			p.failConn(c, fmt.Errorf("%w: type %q from holder", errFrame, typ))
			return
		}
	}
}

// failConn fails the connection c if it is still the current one.
func (p *peerConn) failConn(c net.Conn, err error) {
	p.mu.Lock()
	if p.conn != c {
		p.mu.Unlock()
		return
	}
	p.mu.Unlock()
	p.fail(err)
}

// fail closes the current connection and fails what waits on it.
func (p *peerConn) fail(err error) {
	p.mu.Lock()
	c, done, pending, answers := p.conn, p.done, p.pending, p.answers
	p.conn, p.out, p.done, p.pending, p.answers = nil, nil, nil, nil, nil
	if c != nil {
		p.down = time.Now()
	}
	p.mu.Unlock()
	if c == nil {
		return
	}
	p.log.Warn("replication connection lost", "peer", p.name, "err", err)
	c.Close()
	close(done)
	for _, cb := range pending {
		cb(err)
	}
	for _, ch := range answers {
		close(ch)
	}
}

package cluster

import (
	"bufio"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hermod-mta/hermod/spool"
)

// errReplicaNoRoom refuses a copy while the replica spool's filesystem is
// short of space (spool.Store.HasRoom).
var errReplicaNoRoom = errors.New("cluster: replica spool short of space (spool.min_free)")

// holder is the receiving side of replication: it keeps other nodes'
// messages in the replica store (a spool of its own, never scanned for
// delivery) until their origin reports them finished or this node takes
// them over.
type holder struct {
	log     *slog.Logger
	store   *spool.Store // the replica store
	main    *spool.Store // this node's own spool (answers checks)
	taken   *takenLog
	ln      net.Listener
	key     []byte                                // cluster secret key ("": none)
	member  func(name string, ip netip.Addr) bool // is this a member connecting from its address?
	reports map[byte]func(payload []byte)         // handlers of frameCounts and frameClients
	wg      sync.WaitGroup
	mu      sync.Mutex
	conns   map[net.Conn]bool
	closed  bool
	sem     chan struct{} // bounds concurrent outcome writes
	stored  atomic.Int64
	dropped atomic.Int64
	failed  atomic.Int64
}

func newHolder(log *slog.Logger, store, main *spool.Store, taken *takenLog, ln net.Listener, key []byte,
	member func(string, netip.Addr) bool) *holder {
	return &holder{log: log, store: store, main: main, taken: taken, ln: ln, key: key, member: member,
		conns: map[net.Conn]bool{}, sem: make(chan struct{}, 64)}
}

func (h *holder) serve() {
	h.wg.Add(1)
	defer h.wg.Done()
	for {
		c, err := h.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			h.log.Warn("replication accept", "err", err)
			continue
		}
		h.mu.Lock()
		if h.closed {
			h.mu.Unlock()
			c.Close()
			return
		}
		h.conns[c] = true
		h.mu.Unlock()
		h.wg.Add(1)
		go h.conn(c)
	}
}

func (h *holder) close() {
	h.mu.Lock()
	h.closed = true
	for c := range h.conns {
		c.Close()
	}
	h.mu.Unlock()
	h.ln.Close()
	h.wg.Wait()
}

// conn serves one origin's connection. Replies (acks, answers) go through
// out, written by one goroutine that flushes when nothing else waits.
func (h *holder) conn(c net.Conn) {
	defer h.wg.Done()
	out := make(chan []byte, 4096)
	var wwg sync.WaitGroup
	wwg.Add(1)
	go func() {
		defer wwg.Done()
		w := bufio.NewWriterSize(c, 64<<10)
		for f := range out {
			_ = writeFrame(w, f[0], f[1:])
			if len(out) == 0 {
				if err := w.Flush(); err != nil {
					for range out { // drain until closed
					}
					return
				}
			}
		}
	}()
	var pending sync.WaitGroup // commits and outcomes in flight on this connection
	defer func() {
		c.Close()
		pending.Wait()
		close(out)
		wwg.Wait()
		h.mu.Lock()
		delete(h.conns, c)
		h.mu.Unlock()
	}()
	r := bufio.NewReaderSize(c, 64<<10)
	origin, err := h.handshake(c, r)
	if err != nil {
		h.log.Warn("replication connection refused", "remote", c.RemoteAddr().String(), "err", err)
		return
	}
	for {
		typ, p, err := readFrame(r, nil)
		if err != nil {
			return
		}
		switch typ {
		case frameReplicate:
			seq, k := binary.Uvarint(p)
			if k <= 0 {
				return
			}
			msg, body, err := decodeMessage(p[k:])
			if err != nil {
				h.log.Warn("bad replica frame", "origin", origin, "err", err)
				return
			}
			pending.Add(1)
			commit := h.store.Commit
			if !h.store.HasRoom(int64(len(body))) {
				// Short of space (spool.min_free): refuse the copy,
				// as a failed one, rather than fill the disk.
				commit = func(_ *spool.Message, _ []byte, done func(error)) { done(errReplicaNoRoom) }
			}
			commit(msg, body, func(err error) {
				defer pending.Done()
				a := binary.AppendUvarint([]byte{frameAck}, seq)
				if err != nil {
					h.failed.Add(1)
					a = append(a, 1)
					a = appendStr(a, err.Error())
				} else {
					h.stored.Add(1)
					a = append(a, 0)
				}
				out <- a
			})
		case frameOutcome:
			id, rcpts, removed, err := decodeOutcome(p)
			if err != nil {
				return
			}
			pending.Add(1)
			h.sem <- struct{}{}
			go func() {
				defer func() { <-h.sem; pending.Done() }()
				h.applyOutcome(id, rcpts, removed)
			}()
		case frameDrop:
			if len(p) != spool.IDLen {
				return
			}
			var id spool.ID
			copy(id[:], p)
			pending.Add(1)
			h.sem <- struct{}{}
			go func() {
				defer func() { <-h.sem; pending.Done() }()
				if err := h.store.Delete(id); err == nil {
					h.dropped.Add(1)
				}
			}()
		case frameReconcile:
			rd := reader{b: p}
			seq := rd.uvarint()
			node := rd.str()
			if rd.bad {
				return
			}
			out <- appendIDs(binary.AppendUvarint([]byte{frameTaken}, seq), h.taken.of(node))
		case frameCounts, frameClients:
			if fn := h.reports[typ]; fn != nil {
				fn(p)
			}
		case frameCheck:
			// A holder asks which of our messages it holds copies of
			// are gone from our spool (finished, or never committed).
			seq, k := binary.Uvarint(p)
			if k <= 0 {
				return
			}
			ids, err := decodeIDs(p[k:])
			if err != nil {
				return
			}
			var gone []spool.ID
			for _, id := range ids {
				if _, err := h.main.Load(id); errors.Is(err, spool.ErrNotFound) {
					gone = append(gone, id)
				}
			}
			out <- appendIDs(binary.AppendUvarint([]byte{frameGone}, seq), gone)
		default:
			h.log.Warn("unknown replication frame", "origin", origin, "type", typ)
			return
		}
	}
}

// handshake sends a challenge and checks the answer: the sender must be
// a cluster member connecting from one of its addresses and, with a
// secret key, prove it knows the key.
func (h *holder) handshake(c net.Conn, r *bufio.Reader) (string, error) {
	challenge := make([]byte, 16)
	if _, err := rand.Read(challenge); err != nil {
		return "", err
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	w := bufio.NewWriterSize(c, 64)
	if err := writeFrame(w, frameChallenge, challenge); err != nil {
		return "", err
	}
	if err := w.Flush(); err != nil {
		return "", err
	}
	typ, p, err := readFrame(r, nil)
	if err != nil {
		return "", err
	}
	if typ != frameHello || len(p) > 256 {
		return "", fmt.Errorf("%w: want a hello", errFrame)
	}
	name, err := checkHello(h.key, challenge, p)
	if err != nil {
		return "", err
	}
	ip := netip.Addr{}
	if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		ip, _ = netip.AddrFromSlice(ta.IP)
	}
	if h.member != nil && !h.member(name, ip.Unmap()) {
		return "", fmt.Errorf("cluster: %q at %s is not a member of this cluster", name, ip)
	}
	return name, nil
}

// applyOutcome records recipients' outcomes on a copy; a finished message
// is dropped. A copy that is gone (taken over, or never stored) is
// ignored. The writes do not wait for their fsync: one lost in a crash of
// this machine leaves a copy the origin no longer needs, which the check
// with the origin drops later (or, if the origin dies first, a takeover
// delivers again: a duplicate, never a loss).
func (h *holder) applyOutcome(id spool.ID, rcpts []spool.Recipient, removed bool) {
	if removed {
		if err := h.store.DeleteLazy(id); err == nil {
			h.dropped.Add(1)
		}
		return
	}
	if _, err := h.store.UpdateLazy(id, rcpts); err != nil && !errors.Is(err, spool.ErrNotFound) {
		h.log.Warn("applying an outcome to a replica", "msg_id", id.String(), "err", err)
	}
}

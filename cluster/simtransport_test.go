package cluster

import (
	"errors"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// simNet is an in-memory network for memberlist: many gossip members in
// one process, no sockets. It replaces memberlist.MockNetwork, which
// cannot serve a simulation: its packet channel is unbuffered, so a
// sender blocks until the receiver's packet loop takes the packet — a
// stopped node blocks every sender forever, and two packet loops each
// answering the other deadlock — it counts no bytes, cannot cut a node
// off, and its maps are not safe for concurrent use.
//
// Semantics. Packets are like UDP: delivered into a buffered queue of the
// receiver, dropped (and counted) when the queue is full, the receiver is
// cut off, shut down or unknown. Streams are net.Pipe pairs (memberlist
// sets deadlines on them); dialing a node that is cut off or shut down
// fails at once, like a refused connection. Every byte a node writes to a
// packet or stream is counted as sent by it, every byte it receives as
// received.
//
// Invariants: a transport's counters only grow; a cut transport neither
// sends nor receives anything (packets and streams in both directions
// fail or are dropped) until it is restored.
type simNet struct {
	mu    sync.RWMutex
	nodes map[string]*simTransport // by "ip:port"
}

func newSimNet() *simNet {
	return &simNet{nodes: make(map[string]*simTransport)}
}

// simTransport is one node's memberlist.NodeAwareTransport on a simNet.
type simTransport struct {
	net  *simNet
	addr string
	ip   net.IP
	port int

	packets chan *memberlist.Packet
	streams chan net.Conn

	cut      atomic.Bool
	down     atomic.Bool
	sent     atomic.Int64 // bytes
	received atomic.Int64
	dropped  atomic.Int64 // packets this node sent that were lost

	shutdown chan struct{}
	once     sync.Once
}

var _ memberlist.NodeAwareTransport = (*simTransport)(nil)

// add returns the transport of the node at addr ("127.0.x.y:port").
func (n *simNet) add(addr string) (*simTransport, error) {
	host, port, err := hostPort(addr)
	if err != nil {
		return nil, err
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return nil, errors.New("simnet: not an IP address: " + host)
	}
	t := &simTransport{
		net: n, addr: net.JoinHostPort(ip.String(), strconv.Itoa(port)), ip: ip, port: port,
		packets:  make(chan *memberlist.Packet, 4096),
		streams:  make(chan net.Conn, 64),
		shutdown: make(chan struct{}),
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.nodes[t.addr]; ok {
		return nil, errors.New("simnet: address in use: " + t.addr)
	}
	n.nodes[t.addr] = t
	return t, nil
}

func (n *simNet) lookup(addr string) *simTransport {
	n.mu.RLock()
	defer n.mu.RUnlock()
	return n.nodes[addr]
}

// setCut cuts the node off the network (true) or restores it (false).
func (t *simTransport) setCut(cut bool) { t.cut.Store(cut) }

func (t *simTransport) reachable() bool { return !t.cut.Load() && !t.down.Load() }

// FinalAdvertiseAddr implements memberlist.Transport: the node's own
// address, whatever was configured.
func (t *simTransport) FinalAdvertiseAddr(string, int) (net.IP, int, error) {
	return t.ip, t.port, nil
}

// WriteTo implements memberlist.Transport.
func (t *simTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.WriteToAddress(b, memberlist.Address{Addr: addr})
}

// WriteToAddress implements memberlist.NodeAwareTransport. Like UDP, a
// lost packet is not an error.
func (t *simTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	now := time.Now()
	if !t.reachable() {
		return now, nil
	}
	t.sent.Add(int64(len(b)))
	dest := t.net.lookup(a.Addr)
	if dest == nil || !dest.reachable() {
		t.dropped.Add(1)
		return now, nil
	}
	p := &memberlist.Packet{
		Buf:       append([]byte(nil), b...),
		From:      &net.UDPAddr{IP: t.ip, Port: t.port},
		Timestamp: now,
	}
	select {
	case dest.packets <- p:
		dest.received.Add(int64(len(b)))
	default:
		t.dropped.Add(1)
	}
	return now, nil
}

// PacketCh implements memberlist.Transport.
func (t *simTransport) PacketCh() <-chan *memberlist.Packet { return t.packets }

// DialTimeout implements memberlist.Transport.
func (t *simTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

var errSimRefused = errors.New("simnet: connection refused")

// DialAddressTimeout implements memberlist.NodeAwareTransport.
func (t *simTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	dest := t.net.lookup(a.Addr)
	if !t.reachable() || dest == nil || !dest.reachable() {
		return nil, errSimRefused
	}
	local, remote := net.Pipe()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case dest.streams <- &simConn{Conn: remote, owner: dest, peer: t}:
		return &simConn{Conn: local, owner: t, peer: dest}, nil
	case <-dest.shutdown:
	case <-timer.C:
	}
	local.Close()
	remote.Close()
	return nil, errSimRefused
}

// StreamCh implements memberlist.Transport.
func (t *simTransport) StreamCh() <-chan net.Conn { return t.streams }

// Shutdown implements memberlist.Transport: the node is gone.
func (t *simTransport) Shutdown() error {
	t.once.Do(func() {
		t.down.Store(true)
		close(t.shutdown)
	})
	return nil
}

// simConn is one end of a stream; it counts the bytes of its owner and
// fails once either end is cut off.
type simConn struct {
	net.Conn
	owner, peer *simTransport
}

func (c *simConn) Read(b []byte) (int, error) {
	if !c.owner.reachable() || !c.peer.reachable() {
		c.Conn.Close()
		return 0, errSimRefused
	}
	n, err := c.Conn.Read(b)
	c.owner.received.Add(int64(n))
	return n, err
}

func (c *simConn) Write(b []byte) (int, error) {
	if !c.owner.reachable() || !c.peer.reachable() {
		c.Conn.Close()
		return 0, errSimRefused
	}
	n, err := c.Conn.Write(b)
	c.owner.sent.Add(int64(n))
	return n, err
}

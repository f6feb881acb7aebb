package cluster

import (
	"bufio"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/hermod-mta/hermod/spool"
)

// Replication protocol: frames over one TCP connection per pair of
// nodes, sender to holder. A frame is a big-endian uint32 length (of what
// follows), a type byte and a payload. The connection opens with a hello.
const (
	frameChallenge = 'N' // holder → sender, first: 16 random bytes
	frameHello     = 'H' // sender → holder, answer: node name, MAC (32 bytes, with a secret key)
	frameReplicate = 'M' // seq, message, body: store a copy, then ack
	frameAck       = 'A' // seq, status (0 ok), error text
	frameOutcome   = 'U' // id, removed, recipients' new states: apply to the copy
	frameDrop      = 'D' // id: another holder took the message over; drop the copy
	frameReconcile = 'R' // seq, node name: which messages of that node did you take over?
	frameTaken     = 'T' // seq, ids: the answer
	frameCounts    = 'K' // a Limits report (connection counts), no answer
	frameClients   = 'I' // an Inbound report (client counts), no answer
	frameCheck     = 'C' // seq, ids: which of these messages of yours are gone?
	frameGone      = 'G' // seq, ids: the answer

	maxFrame = 64 << 20
)

var errFrame = errors.New("cluster: malformed replication frame")

// writeFrame appends a frame to w.
func writeFrame(w *bufio.Writer, typ byte, payload []byte) error {
	var hdr [5]byte
	binary.BigEndian.PutUint32(hdr[:4], uint32(len(payload)+1))
	hdr[4] = typ
	if _, err := w.Write(hdr[:]); err != nil {
		return err
	}
	_, err := w.Write(payload)
	return err
}

// readFrame reads one frame; buf is reused when large enough.
func readFrame(r *bufio.Reader, buf []byte) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:4])
	if n < 1 || n > maxFrame {
		return 0, nil, fmt.Errorf("%w: length %d", errFrame, n)
	}
	n--
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		return 0, nil, err
	}
	return hdr[4], buf, nil
}

func nanos(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromNanos(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// appendMessage encodes what a holder needs to deliver msg later: the
// envelope, the peers and each recipient's address and DSN parameters.
// Recipient states travel in outcome frames.
func appendMessage(b []byte, m *spool.Message) []byte {
	b = append(b, m.ID[:]...)
	var flags byte
	if m.Body8Bit {
		flags |= 1
	}
	if m.SMTPUTF8 {
		flags |= 2
	}
	if m.Bounce {
		flags |= 4
	}
	b = append(b, flags)
	b = appendStr(b, m.From)
	b = binary.AppendVarint(b, nanos(m.Received))
	b = appendStr(b, m.EnvID)
	b = appendStr(b, m.Ret)
	b = appendStr(b, m.ClientIP)
	b = appendStr(b, m.Helo)
	b = binary.AppendUvarint(b, uint64(len(m.Peers)))
	for _, p := range m.Peers {
		b = appendStr(b, p)
	}
	b = binary.AppendUvarint(b, uint64(len(m.Rcpts)))
	for i := range m.Rcpts {
		r := &m.Rcpts[i]
		b = appendStr(b, r.Addr)
		b = appendStr(b, r.Domain)
		b = appendStr(b, r.ORcpt)
		b = append(b, r.Notify)
		b = binary.AppendVarint(b, nanos(r.NextAttempt))
	}
	return b
}

// reader decodes a payload; the first error sticks.
type reader struct {
	b   []byte
	bad bool
}

func (r *reader) fail() { r.bad, r.b = true, nil }

func (r *reader) byte() byte {
	if len(r.b) < 1 {
		r.fail()
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

func (r *reader) bytes(n int) []byte {
	if n < 0 || len(r.b) < n {
		r.fail()
		return nil
	}
	p := r.b[:n]
	r.b = r.b[n:]
	return p
}

func (r *reader) uvarint() uint64 {
	v, k := binary.Uvarint(r.b)
	if k <= 0 {
		r.fail()
		return 0
	}
	r.b = r.b[k:]
	return v
}

func (r *reader) varint() int64 {
	v, k := binary.Varint(r.b)
	if k <= 0 {
		r.fail()
		return 0
	}
	r.b = r.b[k:]
	return v
}

func (r *reader) str() string {
	s, rest, ok := readStr(r.b)
	if !ok {
		r.fail()
		return ""
	}
	r.b = rest
	return s
}

func (r *reader) id() spool.ID {
	var id spool.ID
	copy(id[:], r.bytes(spool.IDLen))
	return id
}

// decodeMessage decodes appendMessage's encoding; the rest of the payload
// is returned (the body).
func decodeMessage(b []byte) (*spool.Message, []byte, error) {
	r := reader{b: b}
	m := &spool.Message{ID: r.id()}
	flags := r.byte()
	m.Body8Bit, m.SMTPUTF8, m.Bounce = flags&1 != 0, flags&2 != 0, flags&4 != 0
	m.From = r.str()
	m.Received = fromNanos(r.varint())
	m.EnvID = r.str()
	m.Ret = r.str()
	m.ClientIP = r.str()
	m.Helo = r.str()
	np := r.uvarint()
	if np > 64 {
		r.fail()
	}
	for i := uint64(0); i < np && !r.bad; i++ {
		m.Peers = append(m.Peers, r.str())
	}
	n := r.uvarint()
	if n == 0 || n > 1<<16 {
		r.fail()
	}
	for i := uint64(0); i < n && !r.bad; i++ {
		rc := spool.Recipient{Index: uint16(i)}
		rc.Addr = r.str()
		rc.Domain = r.str()
		rc.ORcpt = r.str()
		rc.Notify = r.byte()
		rc.NextAttempt = fromNanos(r.varint())
		m.Rcpts = append(m.Rcpts, rc)
	}
	if r.bad {
		return nil, nil, errFrame
	}
	return m, r.b, nil
}

// appendOutcome encodes recipients' new states.
func appendOutcome(b []byte, id spool.ID, rcpts []spool.Recipient, removed bool) []byte {
	b = append(b, id[:]...)
	if removed {
		b = append(b, 1)
	} else {
		b = append(b, 0)
	}
	b = binary.AppendUvarint(b, uint64(len(rcpts)))
	for i := range rcpts {
		r := &rcpts[i]
		b = binary.AppendUvarint(b, uint64(r.Index))
		b = append(b, byte(r.State))
		b = binary.AppendUvarint(b, uint64(r.Attempts))
		b = binary.AppendVarint(b, nanos(r.NextAttempt))
		b = binary.AppendVarint(b, nanos(r.LastAttempt))
		b = appendStr(b, r.LastReply)
	}
	return b
}

func decodeOutcome(b []byte) (spool.ID, []spool.Recipient, bool, error) {
	r := reader{b: b}
	id := r.id()
	removed := r.byte() == 1
	n := r.uvarint()
	if n > 1<<16 {
		r.fail()
	}
	var rcpts []spool.Recipient
	for i := uint64(0); i < n && !r.bad; i++ {
		var rc spool.Recipient
		idx := r.uvarint()
		if idx > 0xffff {
			r.fail()
		}
		rc.Index = uint16(idx)
		rc.State = spool.RcptState(r.byte())
		rc.Attempts = uint32(r.uvarint())
		rc.NextAttempt = fromNanos(r.varint())
		rc.LastAttempt = fromNanos(r.varint())
		rc.LastReply = r.str()
		rcpts = append(rcpts, rc)
	}
	if r.bad || len(r.b) != 0 {
		return id, nil, false, errFrame
	}
	return id, rcpts, removed, nil
}

// appendIDs appends a count and the ids.
func appendIDs(b []byte, ids []spool.ID) []byte {
	b = binary.AppendUvarint(b, uint64(len(ids)))
	for _, id := range ids {
		b = append(b, id[:]...)
	}
	return b
}

// decodeIDs decodes appendIDs' encoding (the whole of b).
func decodeIDs(b []byte) ([]spool.ID, error) {
	n, k := binary.Uvarint(b)
	if k <= 0 || uint64(len(b)-k) != n*spool.IDLen {
		return nil, errFrame
	}
	b = b[k:]
	ids := make([]spool.ID, n)
	for i := range ids {
		copy(ids[i][:], b[i*spool.IDLen:])
	}
	return ids, nil
}

// helloMAC authenticates a hello: HMAC-SHA256 over the holder's challenge
// and the sender's name, keyed with the cluster's secret key.
func helloMAC(key, challenge []byte, name string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(challenge)
	m.Write([]byte(name))
	return m.Sum(nil)
}

// encodeHello is the hello payload: the name, then the MAC when keyed.
func encodeHello(key, challenge []byte, name string) []byte {
	b := appendStr(nil, name)
	if len(key) > 0 {
		b = append(b, helloMAC(key, challenge, name)...)
	}
	return b
}

// checkHello decodes a hello and verifies its MAC.
func checkHello(key, challenge, p []byte) (string, error) {
	name, rest, ok := readStr(p)
	if !ok || name == "" {
		return "", errFrame
	}
	if len(key) == 0 {
		if len(rest) != 0 {
			return "", errFrame
		}
		return name, nil
	}
	if !hmac.Equal(rest, helloMAC(key, challenge, name)) {
		return "", errors.New("cluster: replication hello not authenticated (secret_key differs?)")
	}
	return name, nil
}

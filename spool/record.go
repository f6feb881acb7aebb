package spool

import (
	"encoding/binary"
	"fmt"
	"math"
	"time"
)

// Key layout (see docs/DESIGN.md):
//
//	'm' id(10) 0x00           envelope record (immutable)
//	'm' id(10) 0x01           body record (immutable)
//	'm' id(10) 0x02 idx(2 BE) recipient record
//	'd' due(8 BE) id(10)      due index entry, empty value; due is unix nanos
const (
	prefixMsg = 'm'
	prefixDue = 'd'

	suffixEnv  = 0x00
	suffixBody = 0x01
	suffixRcpt = 0x02
	suffixEnd  = 0x03 // exclusive upper bound of a message's keys

	msgPrefixLen = 1 + IDLen
	envKeyLen    = msgPrefixLen + 1
	rcptKeyLen   = msgPrefixLen + 1 + 2
	dueKeyLen    = 1 + 8 + IDLen
)

func msgKey(dst []byte, id ID, suffix byte) []byte {
	dst = append(dst, prefixMsg)
	dst = append(dst, id[:]...)
	return append(dst, suffix)
}

func envKey(dst []byte, id ID) []byte  { return msgKey(dst, id, suffixEnv) }
func bodyKey(dst []byte, id ID) []byte { return msgKey(dst, id, suffixBody) }

func rcptKey(dst []byte, id ID, idx uint16) []byte {
	dst = msgKey(dst, id, suffixRcpt)
	return binary.BigEndian.AppendUint16(dst, idx)
}

// dueNanos maps a due time to the value stored in due keys. Zero and
// pre-1970 times are due at 0 ("now").
func dueNanos(t time.Time) int64 {
	if t.IsZero() || t.Unix() < 0 {
		return 0
	}
	if t.Unix() >= math.MaxInt64/int64(time.Second) {
		return math.MaxInt64
	}
	return t.UnixNano()
}

func dueKey(dst []byte, due int64, id ID) []byte {
	dst = append(dst, prefixDue)
	dst = binary.BigEndian.AppendUint64(dst, uint64(due))
	return append(dst, id[:]...)
}

// parseDueKey splits a due key. ok is false for any other key.
func parseDueKey(k []byte) (due int64, id ID, ok bool) {
	if len(k) != dueKeyLen || k[0] != prefixDue {
		return 0, id, false
	}
	copy(id[:], k[9:])
	return int64(binary.BigEndian.Uint64(k[1:9])), id, true
}

// parseMsgKey splits a message key into id, suffix and (for recipient keys)
// index. ok is false for malformed keys.
func parseMsgKey(k []byte) (id ID, suffix byte, idx uint16, ok bool) {
	if len(k) < envKeyLen || k[0] != prefixMsg {
		return id, 0, 0, false
	}
	copy(id[:], k[1:msgPrefixLen])
	suffix = k[msgPrefixLen]
	switch {
	case suffix == suffixRcpt && len(k) == rcptKeyLen:
		idx = binary.BigEndian.Uint16(k[msgPrefixLen+1:])
	case (suffix == suffixEnv || suffix == suffixBody) && len(k) == envKeyLen:
	default:
		return id, 0, 0, false
	}
	return id, suffix, idx, true
}

// Record encoding. Every record starts with a version byte; integers are
// varints, strings are uvarint length + bytes, times are varint unix nanos
// (0 = zero time). Records are self-contained (the envelope carries its ID)
// so that they can be shipped to cluster peers as they are.
const (
	envVersion1  = 1
	envVersion2  = 2 // version 1 + peers (uvarint count, strings)
	rcptVersion1 = 1
	bodyVersion1 = 1

	envFlag8Bit     = 1 << 0
	envFlagSMTPUTF8 = 1 << 1
	envFlagBounce   = 1 << 2
	envFlagsKnown   = envFlag8Bit | envFlagSMTPUTF8 | envFlagBounce

	maxRcpts = math.MaxUint16 + 1
	maxPeers = 64
)

func timeToNanos(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func nanosToTime(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// appendEnvelope appends the envelope record of m (without recipients, but
// with their count).
func appendEnvelope(dst []byte, m *Message) []byte {
	if len(m.Peers) > 0 {
		dst = append(dst, envVersion2)
	} else {
		dst = append(dst, envVersion1)
	}
	dst = append(dst, m.ID[:]...)
	var flags byte
	if m.Body8Bit {
		flags |= envFlag8Bit
	}
	if m.SMTPUTF8 {
		flags |= envFlagSMTPUTF8
	}
	if m.Bounce {
		flags |= envFlagBounce
	}
	dst = append(dst, flags)
	dst = appendString(dst, m.From)
	dst = binary.AppendVarint(dst, timeToNanos(m.Received))
	dst = binary.AppendVarint(dst, m.Size)
	dst = appendString(dst, m.EnvID)
	dst = appendString(dst, m.Ret)
	dst = appendString(dst, m.ClientIP)
	dst = appendString(dst, m.Helo)
	dst = binary.AppendUvarint(dst, uint64(len(m.Rcpts)))
	if len(m.Peers) > 0 {
		dst = binary.AppendUvarint(dst, uint64(len(m.Peers)))
		for _, p := range m.Peers {
			dst = appendString(dst, p)
		}
	}
	return dst
}

// appendRecipient appends the recipient record of r.
func appendRecipient(dst []byte, r *Recipient) []byte {
	dst = append(dst, rcptVersion1)
	dst = binary.AppendUvarint(dst, uint64(r.Index))
	dst = appendString(dst, r.Addr)
	dst = appendString(dst, r.Domain)
	dst = appendString(dst, r.ORcpt)
	dst = append(dst, r.Notify, byte(r.State))
	dst = binary.AppendUvarint(dst, uint64(r.Attempts))
	dst = binary.AppendVarint(dst, timeToNanos(r.NextAttempt))
	dst = binary.AppendVarint(dst, timeToNanos(r.LastAttempt))
	dst = appendString(dst, r.LastReply)
	return dst
}

// decoder reads a record. The first error sticks; later reads return zero
// values, so decoding functions check d.err once at the end.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %s", ErrCorrupt, what)
	}
}

func (d *decoder) byte(what string) byte {
	if d.err != nil || len(d.b) < 1 {
		d.fail("short " + what)
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

func (d *decoder) bytes(n int, what string) []byte {
	if d.err != nil || n < 0 || len(d.b) < n {
		d.fail("short " + what)
		return nil
	}
	p := d.b[:n]
	d.b = d.b[n:]
	return p
}

func (d *decoder) uvarint(what string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("bad " + what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint(what string) int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail("bad " + what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) string(what string) string {
	n := d.uvarint(what + " length")
	if d.err != nil {
		return ""
	}
	if n > uint64(len(d.b)) {
		d.fail("short " + what)
		return ""
	}
	return string(d.bytes(int(n), what))
}

func (d *decoder) version(want byte, what string) {
	v := d.byte(what + " version")
	if d.err == nil && v != want {
		d.err = fmt.Errorf("%w: %s version %d", ErrUnknownVersion, what, v)
	}
}

func (d *decoder) finish(what string) error {
	if d.err == nil && len(d.b) != 0 {
		d.fail(fmt.Sprintf("%d trailing bytes in %s", len(d.b), what))
	}
	return d.err
}

// decodeEnvelope decodes an envelope record. The returned Message has no
// recipients; nrcpt is the recipient count recorded at commit. It never
// panics, whatever b holds.
func decodeEnvelope(b []byte) (m *Message, nrcpt int, err error) {
	d := decoder{b: b}
	v := d.byte("envelope version")
	if d.err == nil && v != envVersion1 && v != envVersion2 {
		d.err = fmt.Errorf("%w: envelope version %d", ErrUnknownVersion, v)
	}
	m = &Message{}
	copy(m.ID[:], d.bytes(IDLen, "id"))
	flags := d.byte("flags")
	if d.err == nil && flags&^envFlagsKnown != 0 {
		d.fail(fmt.Sprintf("unknown envelope flags %#x", flags))
	}
	m.Body8Bit = flags&envFlag8Bit != 0
	m.SMTPUTF8 = flags&envFlagSMTPUTF8 != 0
	m.Bounce = flags&envFlagBounce != 0
	m.From = d.string("from")
	m.Received = nanosToTime(d.varint("received"))
	m.Size = d.varint("size")
	m.EnvID = d.string("envid")
	m.Ret = d.string("ret")
	m.ClientIP = d.string("client ip")
	m.Helo = d.string("helo")
	n := d.uvarint("recipient count")
	if d.err == nil && (n == 0 || n > maxRcpts) {
		d.fail(fmt.Sprintf("recipient count %d", n))
	}
	if d.err == nil && v == envVersion2 {
		np := d.uvarint("peer count")
		if d.err == nil && (np == 0 || np > maxPeers) {
			d.fail(fmt.Sprintf("peer count %d", np))
		}
		for i := uint64(0); d.err == nil && i < np; i++ {
			m.Peers = append(m.Peers, d.string("peer"))
		}
	}
	if d.err == nil && m.Size < 0 {
		d.fail("negative size")
	}
	if err := d.finish("envelope"); err != nil {
		return nil, 0, err
	}
	return m, int(n), nil
}

// decodeRecipient decodes a recipient record. It never panics.
func decodeRecipient(b []byte) (Recipient, error) {
	var r Recipient
	d := decoder{b: b}
	d.version(rcptVersion1, "recipient")
	idx := d.uvarint("index")
	if d.err == nil && idx > math.MaxUint16 {
		d.fail("index out of range")
	}
	r.Index = uint16(idx)
	r.Addr = d.string("addr")
	r.Domain = d.string("domain")
	r.ORcpt = d.string("orcpt")
	r.Notify = d.byte("notify")
	r.State = RcptState(d.byte("state"))
	if d.err == nil && r.State >= numRcptStates {
		d.fail(fmt.Sprintf("unknown state %d", r.State))
	}
	att := d.uvarint("attempts")
	if d.err == nil && att > math.MaxUint32 {
		d.fail("attempts out of range")
	}
	r.Attempts = uint32(att)
	r.NextAttempt = nanosToTime(d.varint("next attempt"))
	r.LastAttempt = nanosToTime(d.varint("last attempt"))
	r.LastReply = d.string("last reply")
	if err := d.finish("recipient"); err != nil {
		return Recipient{}, err
	}
	return r, nil
}

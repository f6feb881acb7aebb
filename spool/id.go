package spool

import (
	"encoding/binary"
	"fmt"
	"time"
)

// IDLen is the length in bytes of an ID.
const IDLen = 10

// ID identifies a queued message. It is 8 bytes of big-endian microseconds
// since the Unix epoch (strictly increasing per Store) followed by 2 bytes of
// node id, so IDs sort by creation time and are unique across cluster nodes.
// The zero ID is never assigned.
type ID [IDLen]byte

// crockford is the lower-case Crockford base32 alphabet. It is in ASCII
// order, so the text form sorts like the bytes.
const crockford = "0123456789abcdefghjkmnpqrstvwxyz"

// crockfordDec maps an input byte to its 5-bit value, or 0xff. It accepts
// upper case and the Crockford aliases o/O → 0 and i/I/l/L → 1.
var crockfordDec = func() (t [256]byte) {
	for i := range t {
		t[i] = 0xff
	}
	for i := 0; i < len(crockford); i++ {
		c := crockford[i]
		t[c] = byte(i)
		if c >= 'a' && c <= 'z' {
			t[c-'a'+'A'] = byte(i)
		}
	}
	t['o'], t['O'] = 0, 0
	t['i'], t['I'], t['l'], t['L'] = 1, 1, 1, 1
	return t
}()

// MakeID returns the ID for the given microsecond timestamp and node id.
func MakeID(unixMicro int64, node uint16) ID {
	var id ID
	binary.BigEndian.PutUint64(id[:8], uint64(unixMicro))
	binary.BigEndian.PutUint16(id[8:], node)
	return id
}

// String returns the 16-character lower-case Crockford base32 form, which
// sorts like the bytes.
func (id ID) String() string {
	var out [16]byte
	hi := binary.BigEndian.Uint64(id[:8])
	lo := uint64(binary.BigEndian.Uint16(id[8:]))
	// 80 bits: the top 64 in hi, the low 16 in lo.
	for i := 15; i >= 0; i-- {
		out[i] = crockford[lo&31]
		lo = lo>>5 | (hi&31)<<11
		hi >>= 5
	}
	return string(out[:])
}

// ParseID parses the text form made by String. Upper case and the Crockford
// aliases (o for 0, i and l for 1) are accepted.
func ParseID(s string) (ID, error) {
	var id ID
	if len(s) != 16 {
		return id, fmt.Errorf("%w: %q: length %d, want 16", ErrBadID, s, len(s))
	}
	var hi, lo uint64 // lo holds the low 16 bits
	for i := 0; i < 16; i++ {
		v := crockfordDec[s[i]]
		if v == 0xff {
			return id, fmt.Errorf("%w: %q: bad character %q", ErrBadID, s, s[i])
		}
		hi = hi<<5 | lo>>11
		lo = (lo<<5 | uint64(v)) & 0xffff
	}
	binary.BigEndian.PutUint64(id[:8], hi)
	binary.BigEndian.PutUint16(id[8:], uint16(lo))
	return id, nil
}

// Time returns the creation time encoded in id, in UTC.
func (id ID) Time() time.Time {
	return time.UnixMicro(id.micros()).UTC()
}

// Node returns the node id encoded in id.
func (id ID) Node() uint16 { return binary.BigEndian.Uint16(id[8:]) }

// IsZero reports whether id is the zero ID.
func (id ID) IsZero() bool { return id == ID{} }

func (id ID) micros() int64 { return int64(binary.BigEndian.Uint64(id[:8])) }

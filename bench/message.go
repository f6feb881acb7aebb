package bench

import (
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"strconv"
	"time"
)

// The headers the generator stamps on every message. The MTA under test may
// add, fold or reorder other header fields (a Received: line at least); the
// stamp covers only what the generator owns: the body bytes after the first
// empty line, exactly as they are after SMTP dot-unstuffing.
const (
	// HeaderID carries the message's unique id, "<run tag>-<sequence>".
	HeaderID = "X-Bench-Id"
	// HeaderSent carries the time the message was handed to the socket, in
	// Unix nanoseconds.
	HeaderSent = "X-Bench-Sent"
	// HeaderSum carries "<crc32c in 8 hex digits>/<body length>" of the body.
	HeaderSum = "X-Bench-Sum"
)

// Errors returned by CheckMessage.
var (
	// ErrNoStamp means the message carries no X-Bench-Id header: it was not
	// made by the generator (a bounce, for example).
	ErrNoStamp = errors.New("bench: message has no X-Bench-Id")
	// ErrCorrupt means the body does not match X-Bench-Sum, or the stamp
	// headers are unreadable.
	ErrCorrupt = errors.New("bench: message corrupted")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Stamp is what the generator put in a message's header.
type Stamp struct {
	// ID is the X-Bench-Id value.
	ID string
	// Sent is the X-Bench-Sent value.
	Sent time.Time
	// Sum and Len are the checksum and length from X-Bench-Sum.
	Sum uint32
	Len int
}

// MessageSpec describes one message to generate.
type MessageSpec struct {
	ID   string
	From string
	To   []string
	// Size is the wanted size of the whole message (header and body, before
	// dot-stuffing). The body is never shorter than one line naming the id,
	// so very small sizes yield somewhat larger messages.
	Size int
	Sent time.Time
}

// bodyPool is a fixed block of pseudo-random text lines (CRLF, at most 78
// octets each, some starting with "." or being just "." so that the MTA's
// dot-stuffing is exercised) from which bodies are cut.
type bodyPool struct {
	text []byte
	ends []int // offset just past each line's LF, ascending
}

const bodyPoolSize = 64 << 10

func newBodyPool(seed uint64) *bodyPool {
	r := rand.New(rand.NewPCG(seed, 0x626f6479))
	p := &bodyPool{text: make([]byte, 0, bodyPoolSize+128)}
	const letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	for len(p.text) < bodyPoolSize {
		switch n := r.IntN(40); {
		case n == 0:
			p.text = append(p.text, '.')
		case n == 1:
			p.text = append(p.text, ".."...)
		case n == 2:
			p.text = append(p.text, ". a line that starts with a dot"...)
		case n == 3:
			// empty line
		default:
			ln := 20 + r.IntN(59)
			for i := 0; i < ln; i++ {
				if i > 0 && r.IntN(7) == 0 {
					p.text = append(p.text, ' ')
				} else {
					p.text = append(p.text, letters[r.IntN(len(letters))])
				}
			}
		}
		p.text = append(p.text, '\r', '\n')
		p.ends = append(p.ends, len(p.text))
	}
	return p
}

// appendBody appends about n bytes of whole lines to dst starting at a
// line boundary chosen by r, and pads to exactly n with a line of 'x' when
// n allows it.
func (p *bodyPool) appendBody(dst []byte, n int, r *rand.Rand) []byte {
	li := r.IntN(len(p.ends))
	start := 0
	if li > 0 {
		start = p.ends[li-1]
	}
	for n > 0 {
		avail := len(p.text) - start
		if avail > n {
			// The last line end at or before start+n.
			lim := start + n
			lo, hi := 0, len(p.ends)
			for lo < hi {
				m := int(uint(lo+hi) >> 1)
				if p.ends[m] <= lim {
					lo = m + 1
				} else {
					hi = m
				}
			}
			end := start
			if lo > 0 && p.ends[lo-1] > start {
				end = p.ends[lo-1]
			}
			dst = append(dst, p.text[start:end]...)
			n -= end - start
			break
		}
		dst = append(dst, p.text[start:]...)
		n -= avail
		start = 0
	}
	switch {
	case n >= 2:
		for i := 0; i < n-2; i++ {
			dst = append(dst, 'x')
		}
		dst = append(dst, '\r', '\n')
	case n == 1:
		dst = append(dst, 'x', '\r', '\n')
	}
	return dst
}

// Generator builds stamped messages. It is not safe for concurrent use;
// give each goroutine its own (they share nothing).
type Generator struct {
	pool *bodyPool
	hdr  []byte
}

// NewGenerator returns a Generator whose body text is derived from seed.
func NewGenerator(seed uint64) *Generator { return &Generator{pool: newBodyPool(seed)} }

// Clone returns a Generator with the same body text (shared, read-only) for
// use by another goroutine.
func (g *Generator) Clone() *Generator { return &Generator{pool: g.pool} }

// Append appends the message described by spec to dst (CRLF line endings,
// not dot-stuffed) and returns the extended slice. r chooses where in the
// body text the body starts.
func (g *Generator) Append(dst []byte, spec MessageSpec, r *rand.Rand) []byte {
	h := g.hdr[:0]
	h = append(h, "From: <"...)
	h = append(h, spec.From...)
	h = append(h, ">\r\nTo: <"...)
	if len(spec.To) > 0 {
		h = append(h, spec.To[0]...)
	}
	h = append(h, ">\r\nSubject: bench "...)
	h = append(h, spec.ID...)
	h = append(h, "\r\nDate: "...)
	h = spec.Sent.AppendFormat(h, time.RFC1123Z)
	h = append(h, "\r\nMessage-ID: <"...)
	h = append(h, spec.ID...)
	h = append(h, "@bench.test>\r\n"+HeaderID+": "...)
	h = append(h, spec.ID...)
	h = append(h, "\r\n"+HeaderSent+": "...)
	h = strconv.AppendInt(h, spec.Sent.UnixNano(), 10)
	h = append(h, "\r\n"+HeaderSum+": "...)
	g.hdr = h
	// The sum line is "xxxxxxxx/<len>\r\n\r\n"; its length depends on the
	// body length, which depends on what is left of Size.
	idLine := len("id ") + len(spec.ID) + 2
	want := spec.Size - len(h) - 8 - 1 - 4
	want -= len(strconv.Itoa(max(want, 0)))
	want = max(want, idLine)

	// Build the body after a placeholder header, then move it in place.
	dst = append(dst, h...)
	sumAt := len(dst)
	dst = append(dst, "00000000/"...)
	lenAt := len(dst)
	dst = strconv.AppendInt(dst, int64(want), 10)
	dst = append(dst, "\r\n\r\n"...)
	bodyAt := len(dst)
	dst = append(dst, "id "...)
	dst = append(dst, spec.ID...)
	dst = append(dst, '\r', '\n')
	dst = g.pool.appendBody(dst, want-idLine, r)
	body := dst[bodyAt:]
	if len(body) != want {
		// Padding could not be exact (1 byte left); rewrite the length.
		tail := append([]byte(nil), body...)
		dst = dst[:lenAt]
		dst = strconv.AppendInt(dst, int64(len(tail)), 10)
		dst = append(dst, "\r\n\r\n"...)
		dst = append(dst, tail...)
		body = dst[len(dst)-len(tail):]
	}
	sum := crc32.Checksum(body, castagnoli)
	const hexdigits = "0123456789abcdef"
	for i := 7; i >= 0; i-- {
		dst[sumAt+i] = hexdigits[sum&0xf]
		sum >>= 4
	}
	return dst
}

// AppendDotStuffed appends msg to dst in SMTP DATA form: every line that
// starts with "." gets another ".", and the terminating ".\r\n" is added.
// msg must end with CRLF (Generator output does).
func AppendDotStuffed(dst, msg []byte) []byte {
	if len(msg) > 0 && msg[0] == '.' {
		dst = append(dst, '.')
	}
	for {
		i := bytes.Index(msg, []byte("\n."))
		if i < 0 {
			dst = append(dst, msg...)
			break
		}
		dst = append(dst, msg[:i+2]...)
		dst = append(dst, '.')
		msg = msg[i+2:]
	}
	return append(dst, ".\r\n"...)
}

// CheckMessage reads the stamp of a received message and verifies its body.
// It returns ErrNoStamp when there is no X-Bench-Id header in the header
// section, and an error wrapping ErrCorrupt when the other stamp headers are
// missing or unreadable or the body does not match them. The Stamp holds
// whatever could be read, also on error.
func CheckMessage(msg []byte) (Stamp, error) {
	var st Stamp
	var sent, sum []byte
	body := -1
	for off := 0; off < len(msg); {
		end := bytes.IndexByte(msg[off:], '\n')
		if end < 0 {
			break
		}
		line := msg[off : off+end+1]
		off += end + 1
		if len(line) <= 2 && (len(line) == 1 || line[0] == '\r') {
			body = off
			break
		}
		if len(line) < 7 || (line[0]|0x20) != 'x' || line[1] != '-' {
			continue
		}
		name, val, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue
		}
		val = bytes.TrimSpace(val)
		switch {
		case asciiEqualFold(name, HeaderID):
			st.ID = string(val)
		case asciiEqualFold(name, HeaderSent):
			sent = val
		case asciiEqualFold(name, HeaderSum):
			sum = val
		}
	}
	if st.ID == "" {
		return st, ErrNoStamp
	}
	if n, err := strconv.ParseInt(string(sent), 10, 64); err == nil {
		st.Sent = time.Unix(0, n)
	} else {
		return st, fmt.Errorf("%w: %s %q unreadable", ErrCorrupt, HeaderSent, sent)
	}
	hexs, lens, ok := bytes.Cut(sum, []byte("/"))
	s64, err1 := strconv.ParseUint(string(hexs), 16, 32)
	n, err2 := strconv.Atoi(string(lens))
	if !ok || err1 != nil || err2 != nil || len(hexs) != 8 {
		return st, fmt.Errorf("%w: %s %q unreadable", ErrCorrupt, HeaderSum, sum)
	}
	st.Sum, st.Len = uint32(s64), n
	if body < 0 {
		return st, fmt.Errorf("%w: no end of header", ErrCorrupt)
	}
	b := msg[body:]
	if len(b) != st.Len {
		return st, fmt.Errorf("%w: body is %d bytes, stamped %d", ErrCorrupt, len(b), st.Len)
	}
	if got := crc32.Checksum(b, castagnoli); got != st.Sum {
		return st, fmt.Errorf("%w: body crc32c %08x, stamped %08x", ErrCorrupt, got, st.Sum)
	}
	return st, nil
}

// asciiEqualFold reports whether b equals s ignoring ASCII case.
func asciiEqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := 0; i < len(b); i++ {
		c, d := b[i]|0x20, s[i]|0x20
		if c != d {
			return false
		}
	}
	return true
}

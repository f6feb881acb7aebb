package spool

import (
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
)

// codec identifies how a body record's payload is compressed.
type codec byte

const (
	codecNone codec = 0
	codecS2   codec = 1
	codecZstd codec = 2
)

// maxBodyLen bounds the uncompressed length a body record may claim, so
// that a corrupt record cannot make Body allocate without limit.
const maxBodyLen = 1 << 30

// bodyCodec compresses and decompresses body records. It is safe for
// concurrent use; the zstd coders are made on first use.
type bodyCodec struct {
	codec codec

	encOnce sync.Once
	enc     *zstd.Encoder
	encErr  error

	decOnce sync.Once
	dec     *zstd.Decoder
	decErr  error
}

func newBodyCodec(name string) (*bodyCodec, error) {
	c := &bodyCodec{}
	switch name {
	case CompressionS2:
		c.codec = codecS2
	case CompressionZstd:
		c.codec = codecZstd
	case CompressionNone:
		c.codec = codecNone
	default:
		return nil, fmt.Errorf("spool: unknown compression %q", name)
	}
	return c, nil
}

func (c *bodyCodec) zstdEncoder() (*zstd.Encoder, error) {
	c.encOnce.Do(func() {
		c.enc, c.encErr = zstd.NewWriter(nil,
			zstd.WithEncoderLevel(zstd.SpeedFastest),
			zstd.WithEncoderConcurrency(1),
			zstd.WithLowerEncoderMem(true))
	})
	return c.enc, c.encErr
}

func (c *bodyCodec) zstdDecoder() (*zstd.Decoder, error) {
	c.decOnce.Do(func() {
		c.dec, c.decErr = zstd.NewReader(nil,
			zstd.WithDecoderConcurrency(0),
			zstd.WithDecoderMaxMemory(maxBodyLen))
	})
	return c.dec, c.decErr
}

// appendBody appends the body record for body to dst: version, codec,
// uvarint uncompressed length, payload. A body that does not shrink is
// stored uncompressed.
func (c *bodyCodec) appendBody(dst, body []byte) ([]byte, error) {
	start := len(dst)
	hdr := func(cd codec) {
		dst = append(dst[:start], bodyVersion1, byte(cd))
		dst = binary.AppendUvarint(dst, uint64(len(body)))
	}
	hdr(c.codec)
	h := len(dst)
	switch c.codec {
	case codecS2:
		n := s2.MaxEncodedLen(len(body))
		if n < 0 {
			return nil, fmt.Errorf("spool: body of %d bytes too large", len(body))
		}
		dst = grow(dst, n)
		enc := s2.Encode(dst[h:h+n], body)
		dst = dst[:h+len(enc)]
	case codecZstd:
		enc, err := c.zstdEncoder()
		if err != nil {
			return nil, err
		}
		dst = enc.EncodeAll(body, dst)
	}
	if c.codec != codecNone && len(dst)-h < len(body) {
		return dst, nil
	}
	hdr(codecNone)
	return append(dst, body...), nil
}

// decodeBody returns the uncompressed body held by a body record. It never
// panics, whatever rec holds.
func (c *bodyCodec) decodeBody(rec []byte) ([]byte, error) {
	d := decoder{b: rec}
	d.version(bodyVersion1, "body")
	cd := codec(d.byte("codec"))
	n := d.uvarint("body length")
	if d.err != nil {
		return nil, d.err
	}
	if n > maxBodyLen {
		return nil, fmt.Errorf("%w: body length %d", ErrCorrupt, n)
	}
	payload := d.b
	switch cd {
	case codecNone:
		if uint64(len(payload)) != n {
			return nil, fmt.Errorf("%w: body length %d, have %d", ErrCorrupt, n, len(payload))
		}
		return append([]byte(nil), payload...), nil
	case codecS2:
		dl, err := s2.DecodedLen(payload)
		if err != nil || uint64(dl) != n {
			return nil, fmt.Errorf("%w: s2 body length mismatch", ErrCorrupt)
		}
		out, err := s2.Decode(make([]byte, n), payload)
		if err != nil {
			return nil, fmt.Errorf("%w: s2: %v", ErrCorrupt, err)
		}
		return out, nil
	case codecZstd:
		dec, err := c.zstdDecoder()
		if err != nil {
			return nil, err
		}
		out, err := dec.DecodeAll(payload, make([]byte, 0, n))
		if err != nil {
			return nil, fmt.Errorf("%w: zstd: %v", ErrCorrupt, err)
		}
		if uint64(len(out)) != n {
			return nil, fmt.Errorf("%w: zstd body length mismatch", ErrCorrupt)
		}
		return out, nil
	default:
		return nil, fmt.Errorf("%w: unknown body codec %d", ErrCorrupt, cd)
	}
}

func (c *bodyCodec) close() {
	if c.enc != nil {
		_ = c.enc.Close()
	}
	if c.dec != nil {
		c.dec.Close()
	}
}

// grow returns b with room for n more bytes beyond len(b) (capacity only).
func grow(b []byte, n int) []byte {
	if cap(b)-len(b) >= n {
		return b
	}
	nb := make([]byte, len(b), len(b)+n)
	copy(nb, b)
	return nb
}

package spool

import (
	"reflect"
	"testing"
)

// FuzzDecodeMessage checks that envelope decoding never panics and that
// whatever decodes re-encodes to the same message.
func FuzzDecodeMessage(f *testing.F) {
	f.Add(appendEnvelope(nil, sampleMessage()))
	f.Add(appendEnvelope(nil, &Message{Rcpts: make([]Recipient, 1)}))
	f.Add(appendEnvelope(nil, &Message{Rcpts: make([]Recipient, 2), Peers: []string{"a", "b"}}))
	f.Add([]byte{1})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, n, err := decodeEnvelope(b)
		if err != nil {
			return
		}
		m.Rcpts = make([]Recipient, n)
		m2, n2, err := decodeEnvelope(appendEnvelope(nil, m))
		if err != nil || n2 != n {
			t.Fatalf("re-decode: %v (n %d, %d)", err, n, n2)
		}
		m.Rcpts = nil
		if !reflect.DeepEqual(m, m2) {
			t.Fatalf("round trip:\n%+v\n%+v", m, m2)
		}
	})
}

// FuzzDecodeRecipient checks that recipient decoding never panics and is
// stable under re-encoding.
func FuzzDecodeRecipient(f *testing.F) {
	r := sampleRecipient()
	f.Add(appendRecipient(nil, &r))
	f.Add(appendRecipient(nil, &Recipient{Addr: "a@b"}))
	f.Add([]byte{1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeRecipient(b)
		if err != nil {
			return
		}
		r2, err := decodeRecipient(appendRecipient(nil, &r))
		if err != nil || !reflect.DeepEqual(r, r2) {
			t.Fatalf("round trip: %v\n%+v\n%+v", err, r, r2)
		}
	})
}

// FuzzDecodeBody checks that body decoding never panics on garbage.
func FuzzDecodeBody(f *testing.F) {
	for _, name := range []string{CompressionS2, CompressionZstd, CompressionNone} {
		c, _ := newBodyCodec(name)
		rec, _ := c.appendBody(nil, testBody(1, 300))
		f.Add(rec)
	}
	c, _ := newBodyCodec(CompressionS2)
	f.Fuzz(func(t *testing.T, b []byte) {
		body, err := c.decodeBody(b)
		if err == nil && len(body) > len(b)*1000+64 {
			t.Fatalf("%d bytes from %d", len(body), len(b))
		}
	})
}

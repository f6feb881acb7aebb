package spool

import (
	"bytes"
	"errors"
	"math"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestIDText(t *testing.T) {
	tests := []struct {
		id   ID
		want string
	}{
		{ID{}, "0000000000000000"},
		{ID{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, "zzzzzzzzzzzzzzzz"},
		{ID{0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, "0000000000000001"},
		{ID{0, 0, 0, 0, 0, 0, 0, 0, 0, 32}, "0000000000000010"},
		{ID{0x80}, "g000000000000000"},
		{MakeID(t0.UnixMicro(), 0), "0034ej2641000000"},
	}
	for _, tt := range tests {
		if got := tt.id.String(); got != tt.want {
			t.Errorf("%x.String() = %q, want %q", tt.id[:], got, tt.want)
		}
		back, err := ParseID(tt.want)
		if err != nil || back != tt.id {
			t.Errorf("ParseID(%q) = %x, %v", tt.want, back[:], err)
		}
		if back, err := ParseID(strings.ToUpper(tt.want)); err != nil || back != tt.id {
			t.Errorf("ParseID(upper %q) = %x, %v", tt.want, back[:], err)
		}
	}
	// Crockford aliases.
	if a, err := ParseID("oooooooooooooooI"); err != nil || a != (ID{0, 0, 0, 0, 0, 0, 0, 0, 0, 1}) {
		t.Errorf("aliases: %x %v", a[:], err)
	}
	for _, bad := range []string{"", "000000000000000", "00000000000000000", "000000000000000u", "00000000000000-0"} {
		if _, err := ParseID(bad); !errors.Is(err, ErrBadID) {
			t.Errorf("ParseID(%q) err = %v", bad, err)
		}
	}
}

func TestIDOrderAndTime(t *testing.T) {
	var ids []ID
	var strs []string
	for _, us := range []int64{0, 1, 31, 32, 1 << 40, t0.UnixMicro(), t0.UnixMicro() + 1, math.MaxInt64} {
		for _, node := range []uint16{0, 1, 0xffff} {
			id := MakeID(us, node)
			ids = append(ids, id)
			strs = append(strs, id.String())
			if id.Node() != node || id.micros() != us {
				t.Errorf("MakeID(%d, %d) = %x", us, node, id[:])
			}
		}
	}
	if !slices.IsSortedFunc(ids, func(a, b ID) int { return bytes.Compare(a[:], b[:]) }) {
		t.Fatal("ids not sorted")
	}
	if !slices.IsSorted(strs) {
		t.Fatalf("text forms do not sort like the bytes: %v", strs)
	}
	if got := MakeID(t0.UnixMicro(), 3).Time(); !got.Equal(t0) {
		t.Errorf("Time() = %v", got)
	}
}

func TestRcptStateString(t *testing.T) {
	for s, want := range map[RcptState]string{Pending: "pending", Delivered: "delivered",
		Bounced: "bounced", Expired: "expired", 9: "RcptState(9)"} {
		if got := s.String(); got != want {
			t.Errorf("%d.String() = %q", s, got)
		}
		if p, ok := ParseRcptState(want); s < numRcptStates && (!ok || p != s) {
			t.Errorf("ParseRcptState(%q) = %v, %v", want, p, ok)
		}
	}
}

func TestDomainOf(t *testing.T) {
	for addr, want := range map[string]string{
		"a@Example.TEST": "example.test", "\"a@b\"@c.test": "c.test", "postmaster": "", "a@": "",
	} {
		if got := domainOf(addr); got != want {
			t.Errorf("domainOf(%q) = %q, want %q", addr, got, want)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatalf("default config: %v", err)
	}
	d := DefaultConfig()
	if d.Dir != "data/spool" || d.Compression != "s2" || d.MemTableSize != 64<<20 || d.CommitWorkers != 4 || d.LazySyncDelay != 100*time.Millisecond {
		t.Fatalf("defaults: %+v", d)
	}
	bad := Config{Dir: " ", Compression: "lz4", MemTableSize: 1, CommitWorkers: -1, CommitQueue: -5, CacheSize: -1, LazySyncDelay: time.Minute}
	err := bad.Validate()
	if err == nil {
		t.Fatal("no error")
	}
	for _, key := range []string{"spool.dir:", "spool.compression:", "spool.memtable_size:",
		"spool.commit_workers:", "spool.commit_queue:", "spool.cache_size:", "spool.lazy_sync_delay:"} {
		if !strings.Contains(err.Error(), key) {
			t.Errorf("error lacks %q: %v", key, err)
		}
	}
	if _, err := Open(bad, nil); err == nil {
		t.Fatal("Open accepted a bad config")
	}
}

func sampleMessage() *Message {
	return &Message{
		ID: MakeID(t0.UnixMicro(), 9), From: "sender@example.test", Received: t0, Size: 1234,
		Body8Bit: true, SMTPUTF8: true, EnvID: "env", Ret: "FULL", ClientIP: "192.0.2.1",
		Helo: "mx.example.test", Bounce: true,
		Rcpts: make([]Recipient, 3),
	}
}

func sampleRecipient() Recipient {
	return Recipient{
		Index: 513, Addr: "Rcpt@Example.test", Domain: "example.test", ORcpt: "rfc822;rcpt@example.test",
		Notify: NotifyFailure | NotifyDelay, State: Bounced, Attempts: 7,
		NextAttempt: t0.Add(time.Hour), LastAttempt: t0.Add(time.Minute), LastReply: "550 5.1.1 no such user",
	}
}

func TestRecordRoundTrip(t *testing.T) {
	m := sampleMessage()
	got, n, err := decodeEnvelope(appendEnvelope(nil, m))
	if err != nil || n != 3 {
		t.Fatalf("decodeEnvelope: %v, n=%d", err, n)
	}
	want := *m
	want.Rcpts = nil
	if !reflect.DeepEqual(*got, want) {
		t.Fatalf("envelope:\n got %+v\nwant %+v", *got, want)
	}
	// Version 2 carries the cluster peers.
	m.Peers = []string{"node-a", "node-b"}
	b := appendEnvelope(nil, m)
	if b[0] != envVersion2 {
		t.Fatalf("envelope with peers has version %d", b[0])
	}
	got, _, err = decodeEnvelope(b)
	if err != nil || !reflect.DeepEqual(got.Peers, m.Peers) {
		t.Fatalf("peers: %v %q", err, got.Peers)
	}
	r := sampleRecipient()
	gr, err := decodeRecipient(appendRecipient(nil, &r))
	if err != nil || !reflect.DeepEqual(gr, r) {
		t.Fatalf("recipient: %v\n got %+v\nwant %+v", err, gr, r)
	}
	// Zero times stay zero.
	var z Recipient
	z.Addr = "a@b"
	if gz, err := decodeRecipient(appendRecipient(nil, &z)); err != nil || !gz.NextAttempt.IsZero() {
		t.Fatalf("zero recipient: %+v %v", gz, err)
	}
}

func TestRecordErrors(t *testing.T) {
	env := appendEnvelope(nil, sampleMessage())
	r := sampleRecipient()
	rc := appendRecipient(nil, &r)
	tests := []struct {
		name string
		rec  []byte
		dec  func([]byte) error
		want error
	}{
		{"env empty", nil, decEnv, ErrCorrupt},
		{"env version", append([]byte{3}, env[1:]...), decEnv, ErrUnknownVersion},
		{"env v2 without peers", append([]byte{2}, env[1:]...), decEnv, ErrCorrupt},
		{"env truncated", env[:len(env)-1], decEnv, ErrCorrupt},
		{"env trailing", append(slices.Clone(env), 0), decEnv, ErrCorrupt},
		{"env flags", func() []byte { e := slices.Clone(env); e[11] = 0x80; return e }(), decEnv, ErrCorrupt},
		{"env no rcpts", func() []byte { e := slices.Clone(env); e[len(e)-1] = 0; return e }(), decEnv, ErrCorrupt},
		{"env huge string", append([]byte{1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, 0xff, 0xff, 0xff, 0xff, 0x0f), decEnv, ErrCorrupt},
		{"rcpt empty", nil, decRcpt, ErrCorrupt},
		{"rcpt version", append([]byte{0}, rc[1:]...), decRcpt, ErrUnknownVersion},
		{"rcpt truncated", rc[:len(rc)-3], decRcpt, ErrCorrupt},
		{"rcpt index", []byte{1, 0xff, 0xff, 0x04}, decRcpt, ErrCorrupt},
		{"rcpt state", func() []byte {
			x := Recipient{Addr: "a", State: Pending}
			b := appendRecipient(nil, &x)
			b[7] = 9 // state byte after version, index, len+"a", domain len, orcpt len, notify
			return b
		}(), decRcpt, ErrCorrupt},
	}
	for _, tt := range tests {
		if err := tt.dec(tt.rec); !errors.Is(err, tt.want) {
			t.Errorf("%s: err = %v, want %v", tt.name, err, tt.want)
		}
	}
}

func decEnv(b []byte) error  { _, _, err := decodeEnvelope(b); return err }
func decRcpt(b []byte) error { _, err := decodeRecipient(b); return err }

func TestBodyCodecs(t *testing.T) {
	bodies := [][]byte{nil, []byte("x"), testBody(1, 100), testBody(2, 70000), bytes.Repeat([]byte{0}, 1<<20)}
	for _, name := range []string{CompressionS2, CompressionZstd, CompressionNone} {
		c, err := newBodyCodec(name)
		if err != nil {
			t.Fatal(err)
		}
		for _, body := range bodies {
			rec, err := c.appendBody([]byte("prefix"), body)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(rec, []byte("prefix")) {
				t.Fatalf("%s: appendBody clobbered dst", name)
			}
			got, err := c.decodeBody(rec[len("prefix"):])
			if err != nil || !bytes.Equal(got, body) {
				t.Fatalf("%s: %d-byte body: err=%v equal=%v", name, len(body), err, bytes.Equal(got, body))
			}
			if name != CompressionNone && len(body) > 1000 && len(rec)-len("prefix") >= len(body) {
				t.Errorf("%s: %d bytes stored as %d", name, len(body), len(rec))
			}
		}
		c.close()
	}
	c, _ := newBodyCodec(CompressionS2)
	rec, _ := c.appendBody(nil, testBody(1, 1000))
	for _, bad := range [][]byte{nil, {1}, {2, 0, 0}, {1, 9, 0}, {1, 0, 5, 'a'}, append([]byte{1, 1, 0xff, 0xff, 0xff, 0xff, 0x0f}, rec[4:]...),
		rec[:len(rec)-5]} {
		if _, err := c.decodeBody(bad); err == nil {
			t.Errorf("decodeBody(%x) succeeded", bad)
		}
	}
}

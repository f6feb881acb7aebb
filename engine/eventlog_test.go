package engine

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/spool"
)

var logT0 = time.Date(2026, 11, 23, 20, 18, 5, 123456789, time.UTC)

// TestEventLogEncodingMatchesJSON checks the hand-written encoders against
// encoding/json, byte for byte.
func TestEventLogEncodingMatchesJSON(t *testing.T) {
	paris := time.FixedZone("CET", 3600)
	strs := []string{"", "a@b.test", `quo"te`, `back\slash`, "<html>&amp;", "tab\tnl\n\x00\x1f", "ümlaut é", "\u2028\u2029",
		"bad utf8 \xff\xfe", "del \x7f", "250 2.0.0 Ok: queued as 12345"}
	floats := []float64{0, 1, -1, 0.001, 1.5, 123.456, 1e-7, 1e-6, 9.99e-7, 1e20, 1e21, 1.234e25, -3e-9, math.SmallestNonzeroFloat64, math.MaxFloat64}
	times := []time.Time{{}, logT0, logT0.Truncate(time.Second), logT0.In(paris), time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Date(-1, 1, 1, 0, 0, 0, 0, time.UTC), time.Unix(0, 0).UTC()}
	var dels []DeliveryRecord
	var recs []ReceivedRecord
	for i, s := range strs {
		f := floats[i%len(floats)]
		tm := times[i%len(times)]
		dels = append(dels, DeliveryRecord{Time: tm, Event: "delivered", MsgID: s, Rcpt: s, Domain: s, MX: s, IP: s, Reply: s,
			TLS: i%2 == 0, Attempt: uint32(i), NextAttempt: times[(i+1)%len(times)], Delay: f, Delays: s})
		recs = append(recs, ReceivedRecord{Time: tm, Event: "received", MsgID: s, From: s, Rcpts: i, Size: -i, ClientIP: s,
			Helo: s, TLS: i%2 == 1, CommitMS: f})
	}
	for _, f := range floats {
		dels = append(dels, DeliveryRecord{Time: logT0, Delay: f})
		recs = append(recs, ReceivedRecord{Time: logT0, CommitMS: f})
	}
	for _, tm := range times {
		dels = append(dels, DeliveryRecord{Time: tm, NextAttempt: tm})
		recs = append(recs, ReceivedRecord{Time: tm})
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 300 {
		s := randString(rng)
		dels = append(dels, DeliveryRecord{Time: logT0, Reply: s, Rcpt: s, Delay: rng.NormFloat64() * math.Pow(10, float64(rng.IntN(40)-20))})
	}
	for _, bad := range []float64{math.NaN(), math.Inf(1), math.Inf(-1)} {
		dels = append(dels, DeliveryRecord{Time: logT0, Delay: bad})
		recs = append(recs, ReceivedRecord{Time: logT0, CommitMS: bad})
	}
	check := func(i int, v any, got []byte, ok bool) {
		t.Helper()
		want, err := json.Marshal(v)
		if (err == nil) != ok {
			t.Fatalf("%d: ok=%v, encoding/json error %v", i, ok, err)
		}
		if ok && !bytes.Equal(got, want) {
			t.Fatalf("%d:\n got %s\nwant %s", i, got, want)
		}
	}
	for i := range dels {
		got, ok := dels[i].appendJSON([]byte(nil))
		check(i, dels[i], got, ok)
	}
	for i := range recs {
		got, ok := recs[i].appendJSON([]byte(nil))
		check(i, recs[i], got, ok)
	}
}

func randString(rng *rand.Rand) string {
	const pool = "abc@.-_ \"\\<>&\t\n\x00\x7f\u00e9\u2028\U0001F600\xff"
	var b strings.Builder
	for range rng.IntN(12) {
		p := rng.IntN(len(pool))
		b.WriteByte(pool[p])
	}
	return b.String()
}

func TestFormatDelays(t *testing.T) {
	for _, d := range [][4]time.Duration{
		{0, 0, 0, 0},
		{time.Millisecond, 1500 * time.Microsecond, 2*time.Second + 499*time.Microsecond, 3*time.Hour + 500*time.Microsecond},
		{-time.Millisecond, time.Nanosecond, 999999 * time.Nanosecond, 123456789 * time.Nanosecond},
	} {
		want := fmt.Sprintf("%.3f/%.3f/%.3f/%.3f", d[0].Seconds(), d[1].Seconds(), d[2].Seconds(), d[3].Seconds())
		if got := FormatDelays(d[0], d[1], d[2], d[3]); got != want {
			t.Errorf("FormatDelays(%v) = %q, want %q", d, got, want)
		}
	}
}

// TestEventLogLines checks that what the log writes is one valid JSON
// object per line, holding the records, and that a record JSON cannot
// carry is dropped whole.
func TestEventLogLines(t *testing.T) {
	var out bytes.Buffer
	l := NewEventLog(&out, nil)
	m := &spool.Message{ID: spool.MakeID(logT0.UnixMicro(), 1), From: "a@b.test", ClientIP: "127.0.0.1", Helo: "x<y>",
		Rcpts: []spool.Recipient{{Addr: "r@d.test"}}}
	l.Received(m, 1024, true, 2500*time.Microsecond)
	d := DeliveryRecord{Time: logT0, Event: "deferred", MsgID: m.ID.String(), Rcpt: "r@d.test", Domain: "d.test",
		Reply: "451 4.4.1 \"no\"", Attempt: 2, NextAttempt: logT0.Add(time.Minute), Delay: 0.25, Delays: FormatDelays(time.Millisecond, 0, 0, 0)}
	l.Delivery(d)
	l.Delivery(DeliveryRecord{Time: logT0, Event: "delivered", Delay: math.NaN()})
	l.Delivery(DeliveryRecord{Time: logT0, Event: "delivered", MX: "mx.d.test"})
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d lines, want 3:\n%s", len(lines), out.String())
	}
	var rr ReceivedRecord
	if err := json.Unmarshal([]byte(lines[0]), &rr); err != nil || rr.MsgID != m.ID.String() || rr.Helo != "x<y>" || rr.CommitMS != 2.5 || !rr.TLS {
		t.Fatalf("line 1 %s: %+v, %v", lines[0], rr, err)
	}
	var dr DeliveryRecord
	if err := json.Unmarshal([]byte(lines[1]), &dr); err != nil || dr != d {
		t.Fatalf("line 2 %s: %+v, %v", lines[1], dr, err)
	}
	if err := json.Unmarshal([]byte(lines[2]), &dr); err != nil || dr.MX != "mx.d.test" {
		t.Fatalf("line 3 %s: %+v, %v", lines[2], dr, err)
	}
}

// BenchmarkEventLogDelivery measures one delivery line.
func BenchmarkEventLogDelivery(b *testing.B) {
	l := NewEventLog(io.Discard, nil)
	defer l.Close()
	d := DeliveryRecord{Time: logT0, Event: "delivered", MsgID: "00361y2rbqfxe000", Rcpt: "user123@d0042.test", Domain: "d0042.test",
		MX: "mx1.d0042.test", IP: "127.0.0.2", Reply: "250 2.0.0 Ok: queued as 12345", Attempt: 1, Delay: 0.0213,
		Delays: FormatDelays(time.Millisecond, 0, 0, 3*time.Millisecond)}
	b.ReportAllocs()
	for b.Loop() {
		l.Delivery(d)
	}
}

// BenchmarkEventLogDeliveryJSON is the same line through encoding/json,
// as the log wrote it before, for comparison.
func BenchmarkEventLogDeliveryJSON(b *testing.B) {
	d := DeliveryRecord{Time: logT0, Event: "delivered", MsgID: "00361y2rbqfxe000", Rcpt: "user123@d0042.test", Domain: "d0042.test",
		MX: "mx1.d0042.test", IP: "127.0.0.2", Reply: "250 2.0.0 Ok: queued as 12345", Attempt: 1, Delay: 0.0213,
		Delays: fmt.Sprintf("%.3f/%.3f/%.3f/%.3f", 0.001, 0.0, 0.0, 0.003)}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := json.Marshal(d); err != nil {
			b.Fatal(err)
		}
	}
}

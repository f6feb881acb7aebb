package netio

import (
	"context"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// refusingBackend refuses recipients at refuse.test and records messages.
type refusingBackend struct {
	mu   sync.Mutex
	msgs []fakeMsg
}

func (b *refusingBackend) Connect(*ConnInfo) *smtperr.Error { return nil }
func (b *refusingBackend) Mail(*Envelope) *smtperr.Error    { return nil }
func (b *refusingBackend) Rcpt(_ *Envelope, r string) *smtperr.Error {
	if strings.HasSuffix(r, "@refuse.test") {
		return smtperr.New(550, "5.1.1", "no such user")
	}
	return nil
}
func (b *refusingBackend) Data(env *Envelope, body []byte, done func(*smtperr.Error)) {
	b.mu.Lock()
	b.msgs = append(b.msgs, fakeMsg{env: Envelope{From: env.From, Rcpts: append([]string(nil), env.Rcpts...), Chunked: env.Chunked}, body: string(body)})
	b.mu.Unlock()
	done(smtperr.New(250, "2.0.0", "Ok: queued"))
}

// dialOwnServer starts Hermod's server on backend b and connects the
// client to it (plain).
func dialOwnServer(t *testing.T, b Backend) *ClientConn {
	t.Helper()
	_, addr := startServer(t, ServerConfig{}, b, nil)
	cfg := DefaultClientConfig()
	cfg.Hostname = "client.test"
	cfg.TLS = TLSDisabled
	c, err := Dial(context.Background(), &cfg, "mx.test", netip.MustParseAddrPort(addr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestClientChunkingAgainstServer sends with BDAT (one round trip per
// message) to Hermod's own server, which offers CHUNKING and PIPELINING,
// with a pipelined RSET between messages.
func TestClientChunkingAgainstServer(t *testing.T) {
	b := &refusingBackend{}
	c := dialOwnServer(t, b)
	ctx := context.Background()
	if !c.Has("CHUNKING") {
		t.Fatal("server does not offer CHUNKING")
	}
	cases := []struct {
		rcpts    []string
		body     string
		stored   string
		accepted bool
	}{
		{[]string{"a@ok.test"}, "Subject: 1\r\n\r\n.leading dot stays\r\n", "Subject: 1\r\n\r\n.leading dot stays\r\n", true},
		{[]string{"a@ok.test", "b@refuse.test"}, "Subject: 2\r\n\r\nbare\nlf and no final newline", "Subject: 2\r\n\r\nbare\r\nlf and no final newline\r\n", true},
		{[]string{"c@refuse.test"}, "Subject: 3\r\n\r\nnobody\r\n", "", false},
		{[]string{"d@ok.test"}, "Subject: 4\r\n\r\n.\r\n..\r\n", "Subject: 4\r\n\r\n.\r\n..\r\n", true},
	}
	for i, cs := range cases {
		if i > 0 {
			c.ResetNext()
		}
		res, err := c.Send(ctx, &ClientEnvelope{From: "s@x.test", Rcpts: cs.rcpts}, []byte(cs.body))
		if err != nil {
			t.Fatalf("message %d: %v", i+1, err)
		}
		for k, r := range cs.rcpts {
			out := res.Outcome(k)
			want := 250
			if strings.HasSuffix(r, "@refuse.test") {
				want = 550
			}
			if out == nil || out.Code != want {
				t.Errorf("message %d rcpt %s: outcome %v, want %d", i+1, r, out, want)
			}
		}
		if (res.Data != nil) != cs.accepted {
			t.Errorf("message %d: data reply %v, accepted %v", i+1, res.Data, cs.accepted)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		b.mu.Lock()
		n := len(b.msgs)
		b.mu.Unlock()
		if n == 3 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.msgs) != 3 {
		t.Fatalf("%d messages stored, want 3", len(b.msgs))
	}
	k := 0
	for _, cs := range cases {
		if !cs.accepted {
			continue
		}
		m := b.msgs[k]
		k++
		if m.body != cs.stored || !m.env.Chunked {
			t.Errorf("stored %q (chunked %v), want %q", m.body, m.env.Chunked, cs.stored)
		}
	}
	if !c.Usable() {
		t.Fatal("connection unusable after the transactions")
	}
}

func TestClientNormalize(t *testing.T) {
	cases := map[string]string{
		"":             "",
		"a\r\n":        "a\r\n",
		"a":            "a\r\n",
		"a\nb\rc\r\n":  "a\r\nb\r\nc\r\n",
		"a\r\r\nb":     "a\r\n\r\nb\r\n",
		".x\r\n..\r\n": ".x\r\n..\r\n",
		"x\r":          "x\r\n",
	}
	for in, want := range cases {
		if got := string(clientNormalize([]byte(in))); got != want {
			t.Errorf("clientNormalize(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestClientSendBatch pipelines several transactions in one write to
// Hermod's own server, with one refused recipient and one message the
// client refuses to send (too big for the server's SIZE).
func TestClientSendBatch(t *testing.T) {
	b := &refusingBackend{}
	c := dialOwnServer(t, b)
	ctx := context.Background()
	for round := 0; round < 2; round++ {
		envs := []*ClientEnvelope{
			{From: "s@x.test", Rcpts: []string{"a@ok.test"}},
			{From: "s@x.test", Rcpts: []string{"b@refuse.test"}},
			{From: "s@x.test", Rcpts: []string{"c@ok.test", "d@refuse.test"}},
			{From: "s@x.test", Rcpts: []string{"e@ok.test"}, Size: 1 << 40},
			{From: "", Rcpts: []string{"f@ok.test"}},
		}
		bodies := [][]byte{[]byte("Subject: a\r\n\r\na\r\n"), []byte("Subject: b\r\n\r\nb\r\n"), []byte("Subject: c\r\n\r\n.c\r\n"), []byte("x\r\n"), []byte("Subject: f\r\n\r\nf")}
		if round == 1 {
			c.ResetNext()
		}
		res, errs := c.SendBatch(ctx, envs, bodies)
		want := []struct {
			codes []int
			err   bool
		}{{[]int{250}, false}, {[]int{550}, false}, {[]int{250, 550}, false}, {nil, true}, {[]int{250}, false}}
		for i, w := range want {
			if (errs[i] != nil) != w.err {
				t.Fatalf("round %d txn %d: error %v", round, i, errs[i])
			}
			for k, code := range w.codes {
				if out := res[i].Outcome(k); out == nil || out.Code != code {
					t.Errorf("round %d txn %d rcpt %d: %v, want %d", round, i, k, out, code)
				}
			}
		}
		if e := smtperr.Classify(errs[3]); e.Code != 552 {
			t.Errorf("oversized message refused with %v, want 552", errs[3])
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		b.mu.Lock()
		n := len(b.msgs)
		b.mu.Unlock()
		if n == 6 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	var got []string
	for _, m := range b.msgs {
		got = append(got, strings.Join(m.env.Rcpts, ",")+"|"+m.body)
	}
	wantStored := "a@ok.test|Subject: a\r\n\r\na\r\n;c@ok.test|Subject: c\r\n\r\n.c\r\n;f@ok.test|Subject: f\r\n\r\nf\r\n"
	if s := strings.Join(got, ";"); s != wantStored+";"+wantStored {
		t.Fatalf("stored:\n%q\nwant twice:\n%q", s, wantStored)
	}
	if !c.Usable() {
		t.Fatal("connection unusable after the batches")
	}
}

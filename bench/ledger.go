package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// Ledger records the (message id, recipient) pairs a target accepted during
// a Load, so that loss and duplication can be counted against what a Sink
// received. Record is a LoadConfig.OnAccepted; all methods are safe for
// concurrent use. Memory: about 100 bytes per accepted pair.
type Ledger struct {
	mu    sync.Mutex
	acc   map[string][]string
	pairs uint64
}

// NewLedger returns an empty Ledger.
func NewLedger() *Ledger { return &Ledger{acc: map[string][]string{}} }

// Record notes that the target accepted message id for rcpts.
func (l *Ledger) Record(id string, rcpts []string) {
	l.mu.Lock()
	l.acc[id] = append(l.acc[id], rcpts...)
	l.pairs += uint64(len(rcpts))
	l.mu.Unlock()
}

// Len returns the number of messages and pairs recorded.
func (l *Ledger) Len() (messages, pairs uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return uint64(len(l.acc)), l.pairs
}

// Accounting is the outcome of Ledger.Check.
type Accounting struct {
	// Expected pairs were accepted by the target.
	Expected uint64 `json:"expected"`
	// Delivered pairs arrived at least once; Lost never arrived.
	Delivered uint64 `json:"delivered"`
	Lost      uint64 `json:"lost"`
	// Duplicates counts arrivals of expected pairs beyond their first.
	Duplicates uint64 `json:"duplicates"`
	// Excluded pairs went to domains excluded from the check (refused on
	// purpose for the whole run); they are in no other count.
	Excluded uint64 `json:"excluded"`
	// LostSample lists up to 20 lost pairs as "id rcpt", sorted.
	LostSample []string `json:"lost_sample,omitempty"`
}

// Check counts every recorded pair against seen, which returns how many
// times a pair arrived (Sink.Count, or Deliveries.Count for a sink read
// over HTTP). Pairs whose recipient domain is in exclude are only counted
// as Excluded.
func (l *Ledger) Check(seen func(id, rcpt string) int, exclude ...string) Accounting {
	l.mu.Lock()
	defer l.mu.Unlock()
	var a Accounting
	for id, rcpts := range l.acc {
		for _, r := range rcpts {
			if len(exclude) > 0 && slices.Contains(exclude, domainOf(r)) {
				a.Excluded++
				continue
			}
			a.Expected++
			switch n := seen(id, r); {
			case n == 0:
				a.Lost++
				a.LostSample = append(a.LostSample, id+" "+r)
			default:
				a.Delivered++
				a.Duplicates += uint64(n - 1)
			}
		}
	}
	sort.Strings(a.LostSample)
	if len(a.LostSample) > 20 {
		a.LostSample = a.LostSample[:20]
	}
	return a
}

// Deliveries counts arrivals by (id, recipient), built from a sink's
// arrival log (SinkClient.Messages). It is not safe for concurrent use.
type Deliveries struct{ m map[string]int }

// Add counts the recipients of a.
func (d *Deliveries) Add(a Arrival) {
	if a.ID == "" {
		return
	}
	if d.m == nil {
		d.m = map[string]int{}
	}
	for _, r := range a.Rcpts {
		d.m[seenKey(a.ID, r)]++
	}
}

// Count returns how many times (id, rcpt) arrived.
func (d *Deliveries) Count(id, rcpt string) int { return d.m[seenKey(id, rcpt)] }

// SinkClient reads a Sink's HTTP endpoint from another process.
type SinkClient struct {
	// Base is the endpoint's URL, e.g. "http://127.0.0.1:8026".
	Base string
	// HTTP is the client to use; nil means http.DefaultClient.
	HTTP *http.Client
}

func (c SinkClient) do(ctx context.Context, method, path string, q url.Values, v any) error {
	u := strings.TrimSuffix(c.Base, "/") + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return err
	}
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("bench: %s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(b)))
	}
	if v == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// Stats returns the sink's counters.
func (c SinkClient) Stats(ctx context.Context) (SinkStats, error) {
	var st SinkStats
	err := c.do(ctx, http.MethodGet, "/stats", nil, &st)
	return st, err
}

// Messages returns up to limit arrivals from since on (see Sink.Arrivals).
func (c SinkClient) Messages(ctx context.Context, since uint64, limit int) (MessagesPage, error) {
	var p MessagesPage
	err := c.do(ctx, http.MethodGet, "/messages",
		url.Values{"since": {strconv.FormatUint(since, 10)}, "limit": {strconv.Itoa(limit)}}, &p)
	return p, err
}

// Captured returns the messages kept for domain.
func (c SinkClient) Captured(ctx context.Context, domain string) ([]Captured, error) {
	var list []Captured
	err := c.do(ctx, http.MethodGet, "/captured", url.Values{"domain": {domain}}, &list)
	return list, err
}

// CaptureDomain starts capturing domain.
func (c SinkClient) CaptureDomain(ctx context.Context, domain string) error {
	return c.do(ctx, http.MethodPost, "/capture", url.Values{"domain": {domain}}, nil)
}

// Reset zeroes the sink's counters and records.
func (c SinkClient) Reset(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, "/reset", nil, nil)
}

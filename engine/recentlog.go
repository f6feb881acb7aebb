package engine

import (
	"strings"
	"sync"
	"time"
)

// RecentLog keeps the last delivery records in memory (a ring), so the
// admin API can answer "what happened to this message / domain" without
// reading log files, on one node or, merged, on the whole cluster.
// Observe is safe for concurrent use; memory is bounded by the capacity.
type RecentLog struct {
	mu   sync.Mutex
	ring []DeliveryRecord
	next int
	full bool
}

// NewRecentLog keeps the last capacity records (default 10000 when ≤ 0).
func NewRecentLog(capacity int) *RecentLog {
	if capacity <= 0 {
		capacity = 10000
	}
	return &RecentLog{ring: make([]DeliveryRecord, capacity)}
}

// Observe records rec (a SchedulerOptions.Observe function).
func (l *RecentLog) Observe(rec *DeliveryRecord) {
	l.mu.Lock()
	l.ring[l.next] = *rec
	l.next++
	if l.next == len(l.ring) {
		l.next, l.full = 0, true
	}
	l.mu.Unlock()
}

// LogQuery selects records; zero fields match everything.
type LogQuery struct {
	Domain string    // destination domain (case-insensitive)
	Event  string    // delivered, deferred, bounced, expired
	MsgID  string    // queue id
	Rcpt   string    // recipient (case-insensitive)
	Since  time.Time // records at or after
	Limit  int       // most records returned (default 100)
}

func (q LogQuery) match(r *DeliveryRecord) bool {
	return (q.Domain == "" || strings.EqualFold(q.Domain, r.Domain)) &&
		(q.Event == "" || q.Event == r.Event) &&
		(q.MsgID == "" || q.MsgID == r.MsgID) &&
		(q.Rcpt == "" || strings.EqualFold(q.Rcpt, r.Rcpt)) &&
		(q.Since.IsZero() || !r.Time.Before(q.Since))
}

// Query returns the matching records, newest first.
func (l *RecentLog) Query(q LogQuery) []DeliveryRecord {
	if q.Limit <= 0 {
		q.Limit = 100
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	out := []DeliveryRecord{}
	n := l.next
	if l.full {
		n = len(l.ring)
	}
	for k := 0; k < n && len(out) < q.Limit; k++ {
		i := (l.next - 1 - k + len(l.ring)) % len(l.ring)
		if r := &l.ring[i]; q.match(r) {
			out = append(out, *r)
		}
	}
	return out
}

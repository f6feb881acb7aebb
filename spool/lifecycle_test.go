package spool

import (
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"
)

func TestCommitInvalid(t *testing.T) {
	s := openT(t, memConfig(vfs.NewMem()))
	defer s.Close()
	for name, m := range map[string]*Message{
		"nil":        nil,
		"no rcpts":   {From: "a@b"},
		"empty addr": {Rcpts: []Recipient{{Addr: "a@b"}, {}}},
	} {
		if err := s.CommitWait(m, nil); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if m := s.Metrics(); m.CommitErrors != 3 || m.Commits != 0 {
		t.Fatalf("metrics %+v", m)
	}
	// Commit assigns what it documents.
	m := &Message{Rcpts: []Recipient{{Addr: "x@Y.test", Index: 7, State: Bounced}, {Addr: "z@w.test", Domain: "keep"}}}
	if err := s.CommitWait(m, []byte("body")); err != nil {
		t.Fatal(err)
	}
	r := m.Rcpts
	if m.ID.IsZero() || m.Received.IsZero() || m.Size != 4 || r[0].Index != 0 || r[1].Index != 1 ||
		r[0].Domain != "y.test" || r[1].Domain != "keep" || r[0].State != Pending || !r[0].NextAttempt.Equal(m.Received) {
		t.Fatalf("Commit filled in %+v", m)
	}
}

func TestCloseDrains(t *testing.T) {
	cfg := Config{Dir: t.TempDir(), CommitWorkers: 1, CommitQueue: 8}
	s := openT(t, cfg)
	var ok, calls atomic.Int64
	const n = 300
	for i := range n {
		s.Commit(testMessage(i, "a@x.test"), testBody(i, 100), func(err error) {
			calls.Add(1)
			if err == nil {
				ok.Add(1)
			}
		})
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Every Commit made before Close was committed and acknowledged.
	if ok.Load() != n || calls.Load() != n {
		t.Fatalf("after Close: %d ok of %d calls", ok.Load(), calls.Load())
	}
	if err := s.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second Close = %v", err)
	}
	if err := s.CommitWait(testMessage(1, "a@x.test"), nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Commit after Close = %v", err)
	}
	if _, err := s.Update(MakeID(1, 0), nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Update after Close = %v", err)
	}
	if _, err := s.Load(MakeID(1, 0)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Load after Close = %v", err)
	}
	if err := s.Walk(func(*Message) bool { return true }); !errors.Is(err, ErrClosed) {
		t.Fatalf("Walk after Close = %v", err)
	}
	if _, ok := s.NextDue(); ok {
		t.Fatal("NextDue after Close")
	}
	if st := s.Stats(); st.Messages != n || st.DiskBytes == 0 {
		t.Fatalf("Stats after Close = %+v", st)
	}
	s2 := openT(t, cfg)
	defer s2.Close()
	if got := s2.Stats().Messages; got != n {
		t.Fatalf("reopened: %d messages", got)
	}
}

func TestWalkStopsAndDueStops(t *testing.T) {
	s := openT(t, memConfig(vfs.NewMem()))
	defer s.Close()
	for i := range 5 {
		if err := s.CommitWait(testMessage(i, "a@x.test", "b@x.test"), nil); err != nil {
			t.Fatal(err)
		}
	}
	n := 0
	if err := s.Walk(func(m *Message) bool { n++; return len(m.Rcpts) == 2 && n < 3 }); err != nil || n != 3 {
		t.Fatalf("Walk visited %d: %v", n, err)
	}
	n = 0
	if err := s.Due(time.Now().Add(time.Hour), func(ID, time.Time) bool { n++; return n < 2 }); err != nil || n != 2 {
		t.Fatalf("Due visited %d: %v", n, err)
	}
}

func TestMetricsAndCollector(t *testing.T) {
	s := openT(t, Config{Dir: t.TempDir()})
	defer s.Close()
	m := testMessage(1, "a@x.test")
	if err := s.CommitWait(m, testBody(1, 1000)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Update(m.ID, []Recipient{{Index: 0, State: Delivered}}); err != nil {
		t.Fatal(err)
	}
	met := s.Metrics()
	if met.Commits != 1 || met.CommitBatches != 2 || met.WALFsyncs < 2 || met.Removals != 1 ||
		met.Updates != 1 || met.Messages != 0 || met.DiskBytes == 0 || met.FsyncTime <= 0 {
		t.Fatalf("metrics %+v", met)
	}
	var total uint64
	for _, b := range met.FsyncBuckets {
		total += b
	}
	if total != met.Fsyncs() {
		t.Fatalf("histogram holds %d of %d syncs", total, met.Fsyncs())
	}

	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(s.Collector()); err != nil {
		t.Fatal(err)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, f := range families {
		got[f.GetName()] = true
		if f.GetName() == "hermod_spool_fsync_duration_seconds" && f.GetMetric()[0].GetHistogram().GetSampleCount() < met.Fsyncs() {
			t.Errorf("histogram count %d", f.GetMetric()[0].GetHistogram().GetSampleCount())
		}
	}
	for _, name := range []string{"hermod_spool_fsyncs_total", "hermod_spool_fsync_duration_seconds",
		"hermod_spool_commits_total", "hermod_spool_commit_batches_total", "hermod_spool_messages",
		"hermod_spool_disk_bytes", "hermod_spool_commit_errors_total"} {
		if !got[name] {
			t.Errorf("collector lacks %s", name)
		}
	}
	if t.Failed() {
		var names []string
		for n := range got {
			names = append(names, n)
		}
		t.Log(strings.Join(names, " "))
	}
}

// TestPebbleLoggerFatal checks the adapter's contract: Fatalf puts the store
// into the failed state first and then panics with fatalPanic (returning
// would let pebble report an unsynced commit as done).
func TestPebbleLoggerFatal(t *testing.T) {
	var got error
	l := pebbleLogger{log: slogDiscard(), fatal: func(err error) { got = err }}
	l.Infof("info %d", 1)
	l.Errorf("error %d", 2)
	defer func() {
		r := recover()
		fp, ok := r.(fatalPanic)
		if !ok || got == nil || fp.err.Error() != "pebble: fatal commit error: boom" || got != fp.err {
			t.Fatalf("recovered %v, fatal callback got %v", r, got)
		}
	}()
	l.Fatalf("pebble: fatal commit error: %s", "boom")
	t.Fatal("Fatalf returned")
}

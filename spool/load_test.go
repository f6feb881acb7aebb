package spool

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestLoadCachesRecords: Load reads the same records from the memtable and
// from sstables; the records it puts in the recipient cache do not make a
// later Update or Load see stale state; ErrNotFound once the message is
// gone.
func TestLoadCachesRecords(t *testing.T) {
	s := openT(t, memConfig(vfs.NewMem()))
	defer s.Close()
	var msgs []*Message
	for i, n := range []int{1, 2, 8, 9, 50} {
		var rcpts []string
		for j := range n {
			rcpts = append(rcpts, fmt.Sprintf("r%d@d%d.test", j, j%3))
		}
		m := testMessage(i+1, rcpts...)
		if err := s.CommitWait(m, testBody(i, 300)); err != nil {
			t.Fatal(err)
		}
		msgs = append(msgs, m)
	}
	check := func(stage string, m *Message, wantState func(idx int) RcptState) {
		t.Helper()
		got, err := s.Load(m.ID)
		if err != nil {
			t.Fatalf("%s: Load(%d rcpts): %v", stage, len(m.Rcpts), err)
		}
		if len(got.Rcpts) != len(m.Rcpts) || got.From != m.From {
			t.Fatalf("%s: Load = %d rcpts from %q, want %d from %q", stage, len(got.Rcpts), got.From, len(m.Rcpts), m.From)
		}
		for j, r := range got.Rcpts {
			if r.Index != uint16(j) || r.Addr != m.Rcpts[j].Addr || r.State != wantState(j) {
				t.Fatalf("%s: rcpt %d = %+v, want %s in state %v", stage, j, r, m.Rcpts[j].Addr, wantState(j))
			}
		}
	}
	pending := func(int) RcptState { return Pending }
	for _, m := range msgs {
		check("memtable", m, pending)
	}
	if err := s.db.Flush(); err != nil {
		t.Fatal(err)
	}
	for i, m := range msgs {
		check("sstable", m, pending)
		want := testBody(i, 300)
		got, body, err := s.LoadWithBody(m.ID, int64(len(want)))
		if err != nil || len(got.Rcpts) != len(m.Rcpts) || string(body) != string(want) {
			t.Fatalf("LoadWithBody(%d rcpts): %v, %d rcpts, body equal %v", len(m.Rcpts), err, len(got.Rcpts), string(body) == string(want))
		}
		if _, body, err := s.LoadWithBody(m.ID, int64(len(want)-1)); err != nil || body != nil {
			t.Fatalf("LoadWithBody over the size bound: %v, body %d bytes", err, len(body))
		}
	}
	// Load may have cached the records: an Update must still see and
	// write the current state, and a later Load must read it.
	for _, m := range msgs {
		removed, err := s.Update(m.ID, []Recipient{{Index: 0, State: Delivered}})
		if err != nil {
			t.Fatal(err)
		}
		if len(m.Rcpts) == 1 {
			// Its only recipient is done: the message is gone.
			if _, err := s.Load(m.ID); !removed || !errors.Is(err, ErrNotFound) {
				t.Fatalf("after the last recipient: removed %v, Load = %v", removed, err)
			}
			continue
		}
		if _, err := s.Update(m.ID, []Recipient{{Index: 1, State: Pending, Attempts: 1, NextAttempt: t0.Add(time.Hour)}}); err != nil {
			t.Fatal(err)
		}
		check("updated", m, func(idx int) RcptState {
			if idx == 0 {
				return Delivered
			}
			return Pending
		})
	}
	for _, m := range msgs {
		if err := s.Delete(m.ID); err != nil && !errors.Is(err, ErrNotFound) {
			t.Fatal(err)
		}
		if _, err := s.Load(m.ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Load after Delete (%d rcpts) = %v, want ErrNotFound", len(m.Rcpts), err)
		}
	}
}

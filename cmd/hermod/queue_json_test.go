package main

import (
	"testing"

	"github.com/hermod-mta/hermod/spool"
)

// TestQueueEntryDSN: /api/queue shows the DSN parameters a message was
// received with.
func TestQueueEntryDSN(t *testing.T) {
	m := &spool.Message{From: "a@x.test", EnvID: "env 1", Ret: "HDRS", Rcpts: []spool.Recipient{
		{Addr: "b@y.test", Notify: spool.NotifySuccess | spool.NotifyDelay, ORcpt: "rfc822;b+2B1@y.test"},
		{Addr: "c@y.test", Notify: spool.NotifyNever},
		{Addr: "d@y.test"},
	}}
	e := toQueueEntry(m)
	if e.EnvID != "env 1" || e.Ret != "HDRS" {
		t.Errorf("envid %q ret %q", e.EnvID, e.Ret)
	}
	want := []struct{ notify, orcpt string }{{"SUCCESS,DELAY", "rfc822;b+2B1@y.test"}, {"NEVER", ""}, {"", ""}}
	for i, w := range want {
		if r := e.Rcpts[i]; r.Notify != w.notify || r.ORcpt != w.orcpt {
			t.Errorf("recipient %d: notify %q orcpt %q, want %q %q", i, r.Notify, r.ORcpt, w.notify, w.orcpt)
		}
	}
}

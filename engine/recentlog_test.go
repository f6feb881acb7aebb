package engine

import (
	"fmt"
	"testing"
	"time"
)

func TestRecentLog(t *testing.T) {
	l := NewRecentLog(5)
	t0 := time.Unix(1e9, 0)
	for i := 0; i < 8; i++ {
		ev := "delivered"
		if i%2 == 1 {
			ev = "deferred"
		}
		l.Observe(&DeliveryRecord{Time: t0.Add(time.Duration(i) * time.Second), Event: ev, MsgID: fmt.Sprint(i), Domain: fmt.Sprintf("d%d.test", i%3)})
	}
	ids := func(rs []DeliveryRecord) string {
		s := ""
		for _, r := range rs {
			s += r.MsgID
		}
		return s
	}
	for _, tc := range []struct {
		q    LogQuery
		want string
	}{
		{LogQuery{}, "76543"}, // the last 5, newest first
		{LogQuery{Limit: 2}, "76"},
		{LogQuery{Event: "deferred"}, "753"},
		{LogQuery{Domain: "D1.test"}, "74"},
		{LogQuery{MsgID: "5"}, "5"},
		{LogQuery{MsgID: "1"}, ""}, // overwritten
		{LogQuery{Since: t0.Add(6 * time.Second)}, "76"},
	} {
		if got := ids(l.Query(tc.q)); got != tc.want {
			t.Errorf("%+v: got %q, want %q", tc.q, got, tc.want)
		}
	}
}

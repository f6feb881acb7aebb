package spool

import (
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"
	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// ddEnv is the state of one datadriven script: a store on a crashable
// in-memory filesystem, a fake clock starting at t0, and labels for IDs.
type ddEnv struct {
	t      *testing.T
	fs     *vfs.MemFS
	clock  *fakeClock
	cfg    Config
	s      *Store
	labels map[string]ID
	names  map[ID]string
}

func (e *ddEnv) open() {
	e.cfg.FS = e.fs
	e.cfg.Clock = e.clock.Now
	e.s = openT(e.t, e.cfg)
}

// parseTime reads "+5m" / "-1h" (relative to t0), "0" (t0) or RFC 3339.
func parseTime(s string) (time.Time, error) {
	switch {
	case s == "0":
		return t0, nil
	case strings.HasPrefix(s, "+") || strings.HasPrefix(s, "-"):
		d, err := time.ParseDuration(s)
		return t0.Add(d), err
	default:
		return time.Parse(time.RFC3339Nano, s)
	}
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := t.Sub(t0)
	if d >= 0 {
		return "+" + d.String()
	}
	return d.String()
}

func (e *ddEnv) name(id ID) string {
	if n, ok := e.names[id]; ok {
		return n
	}
	return id.String()
}

func (e *ddEnv) id(td *datadriven.TestData) ID {
	var label string
	td.ScanArgs(e.t, "id", &label)
	id, ok := e.labels[label]
	if !ok {
		var err error
		if id, err = ParseID(label); err != nil {
			td.Fatalf(e.t, "unknown id %q", label)
		}
	}
	return id
}

func (e *ddEnv) timeArg(td *datadriven.TestData, key string) (time.Time, bool) {
	if !td.HasArg(key) {
		return time.Time{}, false
	}
	var s string
	td.ScanArgs(e.t, key, &s)
	t, err := parseTime(s)
	if err != nil {
		td.Fatalf(e.t, "%s: %v", key, err)
	}
	return t, true
}

func fmtRcpt(r Recipient) string {
	var b strings.Builder
	fmt.Fprintf(&b, "rcpt %d %s domain=%s %s attempts=%d next=%s", r.Index, r.Addr, r.Domain, r.State,
		r.Attempts, fmtTime(r.NextAttempt))
	if !r.LastAttempt.IsZero() {
		fmt.Fprintf(&b, " last=%s", fmtTime(r.LastAttempt))
	}
	if r.ORcpt != "" {
		fmt.Fprintf(&b, " orcpt=%s", r.ORcpt)
	}
	if r.Notify != 0 {
		fmt.Fprintf(&b, " notify=%#x", r.Notify)
	}
	if r.LastReply != "" {
		fmt.Fprintf(&b, " reply=%q", r.LastReply)
	}
	return b.String()
}

func (e *ddEnv) fmtEnvelope(m *Message) string {
	s := fmt.Sprintf("envelope from=<%s> received=%s size=%d", m.From, fmtTime(m.Received), m.Size)
	if m.Bounce {
		s += " bounce"
	}
	return s
}

// show dumps every live key of the database in key order.
func (e *ddEnv) show(raw bool) string {
	it, err := e.s.db.NewIter(&pebble.IterOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	defer it.Close()
	var out strings.Builder
	for ok := it.First(); ok; ok = it.Next() {
		k, v := it.Key(), it.Value()
		if raw {
			fmt.Fprintf(&out, "%s => %d bytes\n", hex.EncodeToString(k), len(v))
			continue
		}
		if due, id, ok := parseDueKey(k); ok {
			fmt.Fprintf(&out, "d %s %s\n", fmtTime(nanosToTime(due)), e.name(id))
			continue
		}
		id, suffix, idx, ok := parseMsgKey(k)
		if !ok {
			fmt.Fprintf(&out, "? %x\n", k)
			continue
		}
		switch suffix {
		case suffixEnv:
			m, n, err := decodeEnvelope(v)
			if err != nil {
				fmt.Fprintf(&out, "m %s envelope error: %v\n", e.name(id), err)
				continue
			}
			fmt.Fprintf(&out, "m %s %s rcpts=%d\n", e.name(id), e.fmtEnvelope(m), n)
		case suffixBody:
			codecs := map[byte]string{0: "none", 1: "s2", 2: "zstd"}
			body, err := e.s.codec.decodeBody(v)
			fmt.Fprintf(&out, "m %s body %s %d bytes (%d stored) err=%v\n", e.name(id), codecs[v[1]], len(body), len(v), err)
		case suffixRcpt:
			r, err := decodeRecipient(v)
			if err != nil || r.Index != idx {
				fmt.Fprintf(&out, "m %s rcpt %d error: %v\n", e.name(id), idx, err)
				continue
			}
			fmt.Fprintf(&out, "m %s %s\n", e.name(id), fmtRcpt(r))
		}
	}
	if out.Len() == 0 {
		return "(empty)\n"
	}
	return out.String()
}

func TestDataDriven(t *testing.T) {
	datadriven.Walk(t, "testdata/spool", func(t *testing.T, path string) {
		e := &ddEnv{
			t:      t,
			fs:     vfs.NewCrashableMem(),
			clock:  &fakeClock{now: t0},
			cfg:    memConfig(nil),
			labels: map[string]ID{},
			names:  map[ID]string{},
		}
		e.open()
		defer func() { _ = e.s.Close() }()
		datadriven.RunTest(t, path, func(t *testing.T, td *datadriven.TestData) string {
			e.t = t
			out := e.run(td)
			checkInvariants(t, e.s)
			return out
		})
	})
}

func (e *ddEnv) run(td *datadriven.TestData) string {
	t := e.t
	switch td.Cmd {
	case "open":
		_ = e.s.Close()
		if td.HasArg("compression") {
			td.ScanArgs(t, "compression", &e.cfg.Compression)
		}
		if td.HasArg("node") {
			var n int
			td.ScanArgs(t, "node", &n)
			e.cfg.NodeID = uint16(n)
		}
		e.open()
		return fmt.Sprintf("messages=%d\n", e.s.Stats().Messages)

	case "reopen":
		if err := e.s.Close(); err != nil {
			return fmt.Sprintf("close: %v\n", err)
		}
		e.open()
		return fmt.Sprintf("messages=%d\n", e.s.Stats().Messages)

	case "crash":
		// Keep only what was synced, as after a power cut, and open that.
		clone := e.fs.CrashClone(vfs.CrashCloneCfg{})
		_ = e.s.Close()
		e.fs = clone
		e.open()
		return fmt.Sprintf("messages=%d\n", e.s.Stats().Messages)

	case "clock":
		at, _ := e.timeArg(td, "at")
		e.clock.Set(at)
		return ""

	case "commit":
		var label, from, rcpts string
		td.ScanArgs(t, "id", &label)
		td.MaybeScanArgs(t, "from", &from)
		td.ScanArgs(t, "rcpt", &rcpts)
		m := &Message{From: from}
		if at, ok := e.timeArg(td, "at"); ok {
			e.clock.Set(at)
		}
		for _, r := range strings.Split(rcpts, ",") {
			m.Rcpts = append(m.Rcpts, Recipient{Addr: r})
		}
		if td.HasArg("next") {
			// next=1:+5m sets recipient 1's first attempt.
			for _, a := range td.CmdArgs {
				if a.Key != "next" {
					continue
				}
				for _, v := range a.Vals {
					idx, ts, _ := strings.Cut(v, ":")
					i, _ := strconv.Atoi(idx)
					at, err := parseTime(ts)
					if err != nil || i >= len(m.Rcpts) {
						td.Fatalf(t, "bad next=%s", v)
					}
					m.Rcpts[i].NextAttempt = at
				}
			}
		}
		m.Bounce = td.HasArg("bounce")
		body := []byte(td.Input)
		if err := e.s.CommitWait(m, body); err != nil {
			return fmt.Sprintf("error: %v\n", err)
		}
		e.labels[label] = m.ID
		e.names[m.ID] = label
		return fmt.Sprintf("%s = %s (time %s, node %d)\n", label, m.ID, fmtTime(m.ID.Time()), m.ID.Node())

	case "update":
		id := e.id(td)
		var idxs []string
		var state string
		td.ScanArgs(t, "rcpt", &idxs)
		td.ScanArgs(t, "state", &state)
		st, ok := ParseRcptState(state)
		if !ok {
			td.Fatalf(t, "bad state %q", state)
		}
		var ups []Recipient
		for _, s := range idxs {
			i, err := strconv.Atoi(s)
			if err != nil {
				td.Fatalf(t, "bad rcpt %q", s)
			}
			u := Recipient{Index: uint16(i), State: st, Attempts: 1}
			u.NextAttempt, _ = e.timeArg(td, "next")
			u.LastAttempt = e.clock.Now()
			td.MaybeScanArgs(t, "reply", &u.LastReply)
			if td.HasArg("attempts") {
				var a int
				td.ScanArgs(t, "attempts", &a)
				u.Attempts = uint32(a)
			}
			ups = append(ups, u)
		}
		removed, err := e.s.Update(id, ups)
		if err != nil {
			return fmt.Sprintf("error: %v\n", err)
		}
		return fmt.Sprintf("removed=%t\n", removed)

	case "reschedule":
		at, _ := e.timeArg(td, "at")
		if err := e.s.Reschedule(e.id(td), at); err != nil {
			return fmt.Sprintf("error: %v\n", err)
		}
		return "ok\n"

	case "delete":
		if err := e.s.Delete(e.id(td)); err != nil {
			return fmt.Sprintf("error: %v\n", err)
		}
		return "ok\n"

	case "due":
		before, _ := e.timeArg(td, "before")
		after, _ := e.timeArg(td, "after")
		var afterID ID
		if td.HasArg("after-id") {
			var l string
			td.ScanArgs(t, "after-id", &l)
			afterID = e.labels[l]
		}
		limit := -1
		td.MaybeScanArgs(t, "limit", &limit)
		var out strings.Builder
		err := e.s.DueAfter(after, afterID, before, func(id ID, due time.Time) bool {
			if limit == 0 {
				return false
			}
			limit--
			fmt.Fprintf(&out, "%s %s\n", fmtTime(due), e.name(id))
			return true
		})
		if err != nil {
			return fmt.Sprintf("error: %v\n", err)
		}
		if out.Len() == 0 {
			return "(none)\n"
		}
		return out.String()

	case "next-due":
		due, ok := e.s.NextDue()
		if !ok {
			return "(none)\n"
		}
		return fmtTime(due) + "\n"

	case "load":
		m, err := e.s.Load(e.id(td))
		if err != nil {
			return fmt.Sprintf("error: %v\n", err)
		}
		var out strings.Builder
		fmt.Fprintf(&out, "%s %s\n", e.name(m.ID), e.fmtEnvelope(m))
		for _, r := range m.Rcpts {
			fmt.Fprintf(&out, "  %s\n", fmtRcpt(r))
		}
		return out.String()

	case "body":
		b, err := e.s.Body(e.id(td))
		if err != nil {
			return fmt.Sprintf("error: %v\n", err)
		}
		return string(b)

	case "walk":
		var out strings.Builder
		err := e.s.Walk(func(m *Message) bool {
			fmt.Fprintf(&out, "%s %s rcpts=%d\n", e.name(m.ID), e.fmtEnvelope(m), len(m.Rcpts))
			return true
		})
		if err != nil {
			return fmt.Sprintf("error: %v\n", err)
		}
		if out.Len() == 0 {
			return "(none)\n"
		}
		return out.String()

	case "show":
		return e.show(td.HasArg("raw"))

	case "stats":
		return fmt.Sprintf("messages=%d\n", e.s.Stats().Messages)

	case "labels":
		keys := make([]string, 0, len(e.labels))
		for k := range e.labels {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		var out strings.Builder
		for _, k := range keys {
			fmt.Fprintf(&out, "%s %s\n", k, e.labels[k])
		}
		return out.String()

	default:
		td.Fatalf(t, "unknown command %q", td.Cmd)
		return ""
	}
}

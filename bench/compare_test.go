package bench

import (
	"bytes"
	"context"
	"encoding/xml"
	"regexp"
	"strings"
	"testing"
	"time"
)

func TestCompare(t *testing.T) {
	sc := testScenario(t, smallScenario)
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	var prog bytes.Buffer
	c, err := Compare(ctx, CompareConfig{
		RunConfig: RunConfig{Scenario: sc, Target: &testRelay{}, WorkDir: t.TempDir(),
			SampleInterval: 50 * time.Millisecond, Progress: &prog},
		Peer: DirectTarget{}, PeerMessages: 100, Rounds: 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Runs) != 4 || c.Target != "test-relay" || c.Peer != "direct" {
		t.Fatalf("comparison %+v", c)
	}
	tags := map[string]bool{}
	for i, r := range c.Runs {
		wantRole, wantName, wantMsgs := RoleTarget, "test-relay", uint64(300)
		if i%2 == 1 {
			wantRole, wantName, wantMsgs = RolePeer, "direct", 100
		}
		if r.Role != wantRole || r.Target != wantName || r.Load.Accepted != wantMsgs || !r.Complete ||
			r.Accounting.Lost != 0 {
			t.Errorf("run %d: role %q target %q accepted %d complete %v", i, r.Role, r.Target, r.Load.Accepted,
				r.Complete)
		}
		// The sink is reset between runs: each run sees only its own mail.
		if r.Sink.Unique != wantMsgs {
			t.Errorf("run %d: sink saw %d pairs", i, r.Sink.Unique)
		}
		tags[r.RunTag] = true
	}
	if len(tags) != 4 {
		t.Errorf("run tags not fresh: %v", tags)
	}
	row, ok := c.Row("delivery rate")
	if !ok || !row.Known || row.Target <= 0 || row.Peer <= 0 || row.Ratio != row.Target/row.Peer {
		t.Errorf("delivery rate row %+v", row)
	}
	if row, _ := c.Row("target CPU per message"); row.Known || !row.TargetKnown || row.PeerKnown || row.Ratio != 0 {
		t.Errorf("cpu row %+v", row)
	}
	if row, _ := c.Row("messages accepted"); row.Target != 600 || row.Peer != 200 {
		t.Errorf("messages row %+v", row)
	}
	if len(c.Notes) == 0 || !strings.Contains(c.Notes[0], "direct ran 100 messages per round") {
		t.Errorf("notes %v", c.Notes)
	}
	var txt bytes.Buffer
	if err := c.WriteText(&txt); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"test-relay vs direct, 2 round(s)", "test-relay/direct", "delivery rate (msg/s)",
		"note: direct ran 100"} {
		if !strings.Contains(txt.String(), want) {
			t.Errorf("text lacks %q:\n%s", want, txt.String())
		}
	}
	if strings.Count(prog.String(), "round ") != 4 {
		t.Errorf("progress:\n%s", prog.String())
	}
	var page bytes.Buffer
	if err := c.WriteHTML(&page); err != nil {
		t.Fatal(err)
	}
	checkHTML(t, page.String(), 2+4*2)
}

func TestCompareValidate(t *testing.T) {
	sc := testScenario(t, smallScenario)
	_, err := Compare(context.Background(), CompareConfig{RunConfig: RunConfig{Scenario: sc}, Rounds: -1})
	if err == nil || !strings.Contains(err.Error(), "peer: required") || !strings.Contains(err.Error(), "rounds") {
		t.Errorf("err = %v", err)
	}
}

func TestMedianAndRatio(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(tc.in); got != tc.want {
			t.Errorf("median(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
	for r, want := range map[float64]string{0: "-", 12.345: "12.3×", 0.5: "0.50×", 0.00388: "0.0039×"} {
		if got := fmtRatio(r); got != want {
			t.Errorf("fmtRatio(%v) = %q, want %q", r, got, want)
		}
	}
}

// checkHTML checks that page is self-contained and holds at least svgs
// well-formed SVG charts.
func checkHTML(t *testing.T, page string, svgs int) {
	t.Helper()
	for _, bad := range []string{"<script", "src=", "<link", "@import", "url("} {
		if strings.Contains(page, bad) {
			t.Errorf("page contains %q", bad)
		}
	}
	if !strings.HasPrefix(page, "<!DOCTYPE html>") || !strings.HasSuffix(strings.TrimSpace(page), "</html>") {
		t.Errorf("not a whole page")
	}
	found := regexp.MustCompile(`(?s)<svg .*?</svg>`).FindAllString(page, -1)
	if len(found) < svgs {
		t.Errorf("%d charts, want at least %d", len(found), svgs)
	}
	for _, s := range found {
		d := xml.NewDecoder(strings.NewReader(s))
		for {
			_, err := d.Token()
			if err != nil {
				if err.Error() != "EOF" {
					t.Errorf("chart is not well-formed XML: %v\n%.300s", err, s)
				}
				break
			}
		}
		if strings.Contains(s, "NaN") || strings.Contains(s, "Inf") {
			t.Errorf("chart has NaN/Inf coordinates: %.300s", s)
		}
	}
}

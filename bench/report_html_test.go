package bench

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestReportHTML(t *testing.T) {
	r := Report{Scenario: "s", Target: "hermod", RunTag: "t1", Description: "a <test> & more", Rcpts: 1,
		MeasuredProcess: true, CPUPerMsg: 80 * time.Microsecond,
		Released: 6 * time.Second, Load: LoadResult{Elapsed: 3 * time.Second},
		Accounting: Accounting{Expected: 3, Delivered: 2, Lost: 1, LostSample: []string{"t1-0 u@d0001.test"}}}
	for i := range 20 {
		r.Timeline = append(r.Timeline, Sample{T: float64(i) / 2, AcceptRate: float64(1000 + 10*i),
			DeliveryRate: float64(900 + 10*i), E2EP50: float64(i % 3), E2EP99: float64(10 * i), E2EMax: float64(100 * i),
			CPU: 0.5, RSS: uint64(i) << 20, Queued: int64(i)})
	}
	var page bytes.Buffer
	if err := r.WriteHTML(&page); err != nil {
		t.Fatal(err)
	}
	s := page.String()
	checkHTML(t, s, 5)
	for _, want := range []string{"a &lt;test&gt; &amp; more", "1 accepted pairs never delivered", "80 µs",
		"Throughput", "End-to-end latency", "Target CPU", "Target queue", ">release</text>", ">end of load</text>"} {
		if !strings.Contains(s, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	// An empty timeline still makes a valid page.
	page.Reset()
	if err := (Report{Scenario: "empty"}).WriteHTML(&page); err != nil {
		t.Fatal(err)
	}
	checkHTML(t, page.String(), 2)
	if !strings.Contains(page.String(), "no data") {
		t.Error("empty chart not marked")
	}
}

func TestSVGChartScales(t *testing.T) {
	for span, want := range map[float64]float64{10: 2, 100: 20, 7: 2, 0.3: 0.1, 45000: 10000, 0: 1} {
		if got := niceStep(span, 5); got != want {
			t.Errorf("niceStep(%v) = %v, want %v", span, got, want)
		}
	}
	// Log scale drops zeros instead of drawing them at -Inf.
	svg := string(svgChart("t", "ms", []series{{name: "a", pts: [][2]float64{{0, 0}, {1, 5}, {2, 500}}}}, true))
	if strings.Contains(svg, "Inf") || strings.Contains(svg, "NaN") || !strings.Contains(svg, "polyline") {
		t.Errorf("svg %s", svg)
	}
	// A single point is drawn as a dot.
	svg = string(svgChart("t", "ms", []series{{name: "a", pts: [][2]float64{{0, 3}}}}, false))
	if !strings.Contains(svg, "<circle") {
		t.Errorf("svg %s", svg)
	}
}

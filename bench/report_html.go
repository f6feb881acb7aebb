package bench

import (
	"bytes"
	"fmt"
	"html"
	"html/template"
	"io"
	"math"
	"strings"
)

// The HTML reports are single self-contained pages: inline CSS, charts as
// inline SVG drawn here, no script and nothing fetched from anywhere.

// series is one line of a chart.
type series struct {
	name  string
	color string
	pts   [][2]float64 // x, y
}

var palette = []string{"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"}

// niceStep returns a round step (1, 2 or 5 × 10^k) giving about n ticks
// over span.
func niceStep(span float64, n int) float64 {
	if span <= 0 || math.IsNaN(span) || math.IsInf(span, 0) {
		return 1
	}
	raw := span / float64(n)
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= raw {
			return m * p
		}
	}
	return 10 * p
}

func fmtTick(v float64) string {
	switch a := math.Abs(v); {
	case a == 0:
		return "0"
	case a >= 1e6:
		return fmt.Sprintf("%gM", v/1e6)
	case a >= 1e4:
		return fmt.Sprintf("%gk", v/1e3)
	default:
		return fmt.Sprintf("%g", math.Round(v*1000)/1000)
	}
}

// mark is a labelled vertical line on a chart (an event: the release).
type mark struct {
	x     float64
	label string
}

// svgChart draws series as lines over a shared x axis (seconds), with
// marks as vertical lines. With logY the y axis is logarithmic and points
// <= 0 are left out.
func svgChart(title, yUnit string, ss []series, logY bool, marks ...mark) template.HTML {
	const W, H, ml, mr, mt, mb = 760.0, 270.0, 64.0, 16.0, 30.0, 34.0
	pw, ph := W-ml-mr, H-mt-mb
	maxX, minY, maxY := 0.0, math.Inf(1), math.Inf(-1)
	n := 0
	for _, s := range ss {
		for _, p := range s.pts {
			if logY && p[1] <= 0 {
				continue
			}
			maxX = max(maxX, p[0])
			minY = min(minY, p[1])
			maxY = max(maxY, p[1])
			n++
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %g %g" width="%g" height="%g" role="img">`, W, H, W, H)
	fmt.Fprintf(&b, `<text x="%g" y="18" font-size="14" font-weight="bold">%s</text>`, ml, html.EscapeString(title))
	if n == 0 {
		fmt.Fprintf(&b, `<text x="%g" y="%g" font-size="13" fill="#777">no data</text></svg>`, ml+pw/2-30, mt+ph/2)
		return template.HTML(b.String()) //nolint:gosec // built here, text escaped
	}
	for _, m := range marks {
		maxX = max(maxX, m.x)
	}
	if maxX <= 0 {
		maxX = 1
	}
	var y0, y1 float64
	if logY {
		y0 = math.Pow(10, math.Floor(math.Log10(minY)))
		y1 = math.Pow(10, math.Ceil(math.Log10(maxY)))
		if y1 <= y0 {
			y1 = y0 * 10
		}
	} else {
		y0 = 0
		step := niceStep(maxY, 5)
		y1 = math.Ceil(maxY/step) * step
		if y1 <= 0 {
			y1 = 1
		}
	}
	px := func(x float64) float64 { return ml + pw*x/maxX }
	py := func(y float64) float64 {
		if logY {
			return mt + ph*(1-(math.Log10(y)-math.Log10(y0))/(math.Log10(y1)-math.Log10(y0)))
		}
		return mt + ph*(1-(y-y0)/(y1-y0))
	}
	// Grid and y ticks.
	var ticks []float64
	if logY {
		for v := y0; v <= y1*1.0001; v *= 10 {
			ticks = append(ticks, v)
		}
	} else {
		step := niceStep(y1, 5)
		for v := 0.0; v <= y1*1.0001; v += step {
			ticks = append(ticks, v)
		}
	}
	for _, v := range ticks {
		y := py(v)
		fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#e5e5e5"/>`, ml, ml+pw, y, y)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="11" text-anchor="end" fill="#555">%s</text>`, ml-6, y+4,
			html.EscapeString(fmtTick(v)))
	}
	xstep := niceStep(maxX, 8)
	for v := 0.0; v <= maxX*1.0001; v += xstep {
		x := px(v)
		fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#f0f0f0"/>`, x, x, mt, mt+ph)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="11" text-anchor="middle" fill="#555">%s</text>`, x,
			mt+ph+15, html.EscapeString(fmtTick(v)))
	}
	fmt.Fprintf(&b, `<rect x="%g" y="%g" width="%g" height="%g" fill="none" stroke="#999"/>`, ml, mt, pw, ph)
	fmt.Fprintf(&b, `<text x="%g" y="%g" font-size="11" text-anchor="middle" fill="#555">seconds since the start of the load</text>`,
		ml+pw/2, H-4)
	fmt.Fprintf(&b, `<text x="14" y="%g" font-size="11" fill="#555" transform="rotate(-90 14 %g)" text-anchor="middle">%s</text>`,
		mt+ph/2, mt+ph/2, html.EscapeString(yUnit))
	for _, m := range marks {
		x := px(m.x)
		fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#444" stroke-dasharray="4 3"/>`, x, x, mt,
			mt+ph)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="11" fill="#444">%s</text>`, x+4, mt+12,
			html.EscapeString(m.label))
	}
	// Lines and legend (left to right, ending at the plot's right edge).
	lx := ml + pw
	for _, s := range ss {
		lx -= 20 + 6.5*float64(len(s.name))
	}
	for i, s := range ss {
		color := s.color
		if color == "" {
			color = palette[i%len(palette)]
		}
		var pts []string
		for _, p := range s.pts {
			if logY && p[1] <= 0 {
				continue
			}
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(p[0]), py(p[1])))
		}
		if len(pts) == 1 {
			fmt.Fprintf(&b, `<circle cx="%s" cy="%s" r="2.5" fill="%s"/>`, strings.Split(pts[0], ",")[0],
				strings.Split(pts[0], ",")[1], color)
		} else if len(pts) > 1 {
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="1.6" points="%s"/>`, color,
				strings.Join(pts, " "))
		}
		fmt.Fprintf(&b, `<rect x="%.1f" y="8" width="9" height="9" fill="%s"/>`, lx, color)
		fmt.Fprintf(&b, `<text x="%.1f" y="17" font-size="11">%s</text>`, lx+12, html.EscapeString(s.name))
		lx += 20 + 6.5*float64(len(s.name))
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String()) //nolint:gosec // built here, text escaped
}

// timelineSeries extracts one series from a timeline.
func timelineSeries(name, color string, tl []Sample, get func(Sample) float64) series {
	s := series{name: name, color: color}
	for _, p := range tl {
		s.pts = append(s.pts, [2]float64{p.T, get(p)})
	}
	return s
}

// charts returns a report's charts.
func (r Report) charts() []template.HTML {
	tl := r.Timeline
	var marks []mark
	if r.Released > 0 {
		marks = append(marks, mark{r.Released.Seconds(), "release"})
	}
	if r.Load.Elapsed > 0 {
		marks = append(marks, mark{r.Load.Elapsed.Seconds(), "end of load"})
	}
	out := []template.HTML{
		svgChart("Throughput", r.rateUnit(), []series{
			timelineSeries("accepted", palette[0], tl, func(s Sample) float64 { return s.AcceptRate }),
			timelineSeries("delivered", palette[1], tl, func(s Sample) float64 { return s.DeliveryRate }),
		}, false, marks...),
		svgChart("End-to-end latency of the messages arriving in each interval", "ms (log)", []series{
			timelineSeries("p50", palette[2], tl, func(s Sample) float64 { return s.E2EP50 }),
			timelineSeries("p99", palette[3], tl, func(s Sample) float64 { return s.E2EP99 }),
			timelineSeries("max", palette[1], tl, func(s Sample) float64 { return s.E2EMax }),
		}, true, marks...),
	}
	has := func(get func(Sample) float64) bool {
		for _, s := range tl {
			if get(s) > 0 {
				return true
			}
		}
		return false
	}
	if has(func(s Sample) float64 { return s.CPU }) {
		out = append(out, svgChart("Target CPU", "cores", []series{
			timelineSeries("CPU", palette[4], tl, func(s Sample) float64 { return s.CPU }),
		}, false))
	}
	if has(func(s Sample) float64 { return float64(s.RSS) }) {
		out = append(out, svgChart("Target resident memory", "MiB", []series{
			timelineSeries("RSS", palette[5], tl, func(s Sample) float64 { return float64(s.RSS) / (1 << 20) }),
		}, false))
	}
	if has(func(s Sample) float64 { return float64(s.Queued) }) {
		out = append(out, svgChart("Target queue", "messages", []series{
			timelineSeries("queued", palette[6], tl, func(s Sample) float64 { return float64(s.Queued) }),
		}, false, marks...))
	}
	return out
}

type htmlRun struct {
	Title    string
	Problems []string
	Cards    [][2]string
	Text     string
	Charts   []template.HTML
}

func (r Report) htmlRun(title string) htmlRun {
	var txt bytes.Buffer
	_ = r.WriteText(&txt)
	cpu := "-"
	if r.MeasuredProcess {
		cpu = fmtMicros(r.CPUPerMsg)
	}
	return htmlRun{
		Title:    title,
		Problems: r.Problems(),
		Cards: [][2]string{
			{"injection", fmt.Sprintf("%.0f msg/s", r.InjectionRate)},
			{"delivery", fmt.Sprintf("%.0f %s", r.DeliveryRate, r.rateUnit())},
			{"e2e p99", fmtDur(r.E2E.P99)},
			{"target CPU/msg", cpu},
			{"lost", fmt.Sprint(r.Accounting.Lost)},
		},
		Text:   txt.String(),
		Charts: r.charts(),
	}
}

type htmlPage struct {
	Title    string
	Subtitle string
	Compare  *Comparison
	Rows     []htmlRow
	Overlay  []template.HTML
	Runs     []htmlRun
}

type htmlRow struct {
	Figure, Target, Peer, Ratio string
	Class                       string
}

var pageTmpl = template.Must(template.New("page").Parse(`<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{{.Title}}</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1000px;color:#222;padding:0 12px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px} .card span{color:#666;font-size:12px}
pre{background:#f7f7f7;border:1px solid #e5e5e5;padding:10px;overflow-x:auto;font-size:12px}
table{border-collapse:collapse;margin:10px 0} td,th{border:1px solid #ddd;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}
.good{background:#e8f5e9} .bad{background:#fdecea}
.problem{color:#b00020;font-weight:bold}
svg{max-width:100%;height:auto;display:block;margin:8px 0}
</style></head><body>
<h1>{{.Title}}</h1>
<p class="sub">{{.Subtitle}}</p>
{{with .Compare}}
<table><tr><th>figure (median of rounds)</th><th>{{.Target}}</th><th>{{.Peer}}</th><th>{{.Target}}/{{.Peer}}</th></tr>
{{range $.Rows}}<tr class="{{.Class}}"><td>{{.Figure}}</td><td>{{.Target}}</td><td>{{.Peer}}</td><td>{{.Ratio}}</td></tr>
{{end}}</table>
{{range .Notes}}<p>Note: {{.}}</p>{{end}}
{{end}}
{{range .Overlay}}{{.}}{{end}}
{{range .Runs}}
<h2>{{.Title}}</h2>
{{range .Problems}}<p class="problem">{{.}}</p>{{end}}
<div class="cards">{{range .Cards}}<div class="card"><span>{{index . 0}}</span><b>{{index . 1}}</b></div>{{end}}</div>
{{range .Charts}}{{.}}{{end}}
<pre>{{.Text}}</pre>
{{end}}
</body></html>
`))

// WriteHTML writes r as a self-contained HTML page: the figures, and
// charts of throughput, end-to-end latency and the target's resources
// over time.
func (r Report) WriteHTML(w io.Writer) error {
	p := htmlPage{
		Title: fmt.Sprintf("hermod-bench: %s against %s", r.Scenario, r.Target),
		Subtitle: fmt.Sprintf("%s — run %s on %s (%d CPUs), %s", r.Description, r.RunTag, r.Host.Hostname,
			r.Host.CPUs, r.Start.UTC().Format("2006-01-02 15:04 UTC")),
		Runs: []htmlRun{r.htmlRun(r.Target + " (run " + r.RunTag + ")")},
	}
	return pageTmpl.Execute(w, p)
}

// WriteHTML writes c as a self-contained HTML page: the figures side by
// side, the delivery rate and latency of every run over time, and each
// run's own report.
func (c Comparison) WriteHTML(w io.Writer) error {
	p := htmlPage{
		Title: fmt.Sprintf("hermod-bench: %s, %s vs %s", c.Scenario, c.Target, c.Peer),
		Subtitle: fmt.Sprintf("%s — %d round(s) on %s (%d CPUs), %s. Ratios are of medians from this one invocation.",
			c.Description, c.Rounds, c.Host.Hostname, c.Host.CPUs, c.Start.UTC().Format("2006-01-02 15:04 UTC")),
		Compare: &c,
	}
	for _, r := range c.Rows {
		row := htmlRow{Figure: r.Figure, Target: fmtFigure(r.Target, r.TargetKnown), Peer: fmtFigure(r.Peer, r.PeerKnown),
			Ratio: "-"}
		if r.Unit != "" {
			row.Figure += " (" + r.Unit + ")"
		}
		if r.Ratio != 0 {
			row.Ratio = fmtRatio(r.Ratio)
			switch {
			case r.Better == "higher" && r.Ratio > 1, r.Better == "lower" && r.Ratio < 1:
				row.Class = "good"
			case r.Better == "higher" && r.Ratio < 1, r.Better == "lower" && r.Ratio > 1:
				row.Class = "bad"
			}
		}
		if r.Better == "" && r.Figure != "messages accepted" && r.Figure != "machine busy" && r.Target+r.Peer > 0 {
			row.Class = "bad"
		}
		p.Rows = append(p.Rows, row)
	}
	var rates, lat []series
	for i, r := range c.Runs {
		name := fmt.Sprintf("%s #%d", r.Target, i+1)
		color := palette[i%len(palette)]
		rates = append(rates, timelineSeries(name, color, r.Timeline, func(s Sample) float64 { return s.DeliveryRate }))
		lat = append(lat, timelineSeries(name, color, r.Timeline, func(s Sample) float64 { return s.E2EP99 }))
	}
	p.Overlay = []template.HTML{
		svgChart("Delivery rate, every run", "per second", rates, false),
		svgChart("End-to-end latency p99, every run", "ms (log)", lat, true),
	}
	for i, r := range c.Runs {
		p.Runs = append(p.Runs, r.htmlRun(fmt.Sprintf("Run %d: %s (run %s)", i+1, r.Target, r.RunTag)))
	}
	return pageTmpl.Execute(w, p)
}

package bench

import (
	"strconv"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// Histograms record microseconds from 1 µs to 1 hour with 3 significant
// digits; longer values are clamped to the maximum.
const (
	histMin = 1
	histMax = int64(time.Hour / time.Microsecond)
	histSig = 3
)

func newHist() *hdrhistogram.Histogram { return hdrhistogram.New(histMin, histMax, histSig) }

// recordDur records d (clamped to the histogram's range) into h.
func recordDur(h *hdrhistogram.Histogram, d time.Duration) {
	us := int64(d / time.Microsecond)
	if us < histMin {
		us = histMin
	}
	if us > histMax {
		us = histMax
	}
	_ = h.RecordValue(us) // cannot fail: us is within range
}

// Latency summarises a latency histogram.
type Latency struct {
	Count uint64        `json:"count"`
	Mean  time.Duration `json:"mean_ns"`
	P50   time.Duration `json:"p50_ns"`
	P90   time.Duration `json:"p90_ns"`
	P99   time.Duration `json:"p99_ns"`
	P999  time.Duration `json:"p999_ns"`
	Max   time.Duration `json:"max_ns"`
}

func latencyOf(h *hdrhistogram.Histogram) Latency {
	if h == nil || h.TotalCount() == 0 {
		return Latency{}
	}
	q := func(p float64) time.Duration { return time.Duration(h.ValueAtQuantile(p)) * time.Microsecond }
	return Latency{
		Count: uint64(h.TotalCount()),
		Mean:  time.Duration(h.Mean() * float64(time.Microsecond)),
		P50:   q(50),
		P90:   q(90),
		P99:   q(99),
		P999:  q(99.9),
		Max:   time.Duration(h.Max()) * time.Microsecond,
	}
}

// String formats l on one line, e.g. "n=1000 p50=1.2ms p90=… max=…".
func (l Latency) String() string {
	r := func(d time.Duration) string { return d.Round(time.Microsecond).String() }
	return "n=" + strconv.FormatUint(l.Count, 10) + " mean=" + r(l.Mean) + " p50=" + r(l.P50) + " p90=" + r(l.P90) +
		" p99=" + r(l.P99) + " p99.9=" + r(l.P999) + " max=" + r(l.Max)
}

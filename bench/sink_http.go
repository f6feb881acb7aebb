package bench

import (
	"encoding/json"
	"net/http"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// MessagesPage is the answer of GET /messages.
type MessagesPage struct {
	// Next is the "since" to ask for next.
	Next uint64 `json:"next"`
	// Dropped counts wanted arrivals already gone from the log.
	Dropped  uint64    `json:"dropped"`
	Arrivals []Arrival `json:"arrivals"`
}

// Handler returns the sink's HTTP/JSON endpoint:
//
//	GET  /stats                         SinkStats
//	GET  /messages?since=N&limit=M      MessagesPage (limit default 10000)
//	GET  /captured?domain=D             []Captured (raw in base64)
//	POST /capture?domain=D              start capturing D
//	POST /reset                         Reset
//	GET  /metrics                       Prometheus text (a private registry)
func (s *Sink) Handler() http.Handler {
	mux := http.NewServeMux()
	writeJSON := func(w http.ResponseWriter, v any) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		_ = enc.Encode(v)
	}
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, s.Stats())
	})
	mux.HandleFunc("GET /messages", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		since, err1 := parseUintDefault(q.Get("since"), 0)
		limit, err2 := parseUintDefault(q.Get("limit"), 10000)
		if err1 != nil || err2 != nil {
			http.Error(w, "since and limit must be unsigned integers", http.StatusBadRequest)
			return
		}
		list, next, dropped := s.Arrivals(since, int(min(limit, 1<<20)))
		if list == nil {
			list = []Arrival{}
		}
		writeJSON(w, MessagesPage{Next: next, Dropped: dropped, Arrivals: list})
	})
	mux.HandleFunc("GET /captured", func(w http.ResponseWriter, r *http.Request) {
		list := s.Captured(r.URL.Query().Get("domain"))
		if list == nil {
			list = []Captured{}
		}
		writeJSON(w, list)
	})
	mux.HandleFunc("POST /capture", func(w http.ResponseWriter, r *http.Request) {
		d := r.URL.Query().Get("domain")
		if d == "" {
			http.Error(w, "domain is required", http.StatusBadRequest)
			return
		}
		s.CaptureDomain(d)
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /reset", func(w http.ResponseWriter, r *http.Request) {
		s.Reset()
		w.WriteHeader(http.StatusNoContent)
	})
	reg := prometheus.NewRegistry()
	reg.MustRegister(s.Collector())
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	return mux
}

func parseUintDefault(s string, def uint64) (uint64, error) {
	if s == "" {
		return def, nil
	}
	return strconv.ParseUint(s, 10, 64)
}

// Collector returns a Prometheus collector reading the sink's counters
// (names hermod_bench_sink_*; replies are labelled by reply code).
func (s *Sink) Collector() prometheus.Collector { return sinkCollector{s} }

type sinkCollector struct{ s *Sink }

var sinkCounterDescs = []struct {
	desc *prometheus.Desc
	get  func(*SinkStats) float64
	kind prometheus.ValueType
}{
	{prometheus.NewDesc("hermod_bench_sink_connections_total", "Connections accepted.", nil, nil),
		func(s *SinkStats) float64 { return float64(s.Connections) }, prometheus.CounterValue},
	{prometheus.NewDesc("hermod_bench_sink_connections_active", "Connections open.", nil, nil),
		func(s *SinkStats) float64 { return float64(s.Active) }, prometheus.GaugeValue},
	{prometheus.NewDesc("hermod_bench_sink_messages_total", "Messages accepted.", nil, nil),
		func(s *SinkStats) float64 { return float64(s.Messages) }, prometheus.CounterValue},
	{prometheus.NewDesc("hermod_bench_sink_recipients_total", "Recipients of accepted messages.", nil, nil),
		func(s *SinkStats) float64 { return float64(s.Recipients) }, prometheus.CounterValue},
	{prometheus.NewDesc("hermod_bench_sink_received_bytes_total", "Message bytes accepted.", nil, nil),
		func(s *SinkStats) float64 { return float64(s.Bytes) }, prometheus.CounterValue},
	{prometheus.NewDesc("hermod_bench_sink_corrupted_total", "Messages whose body fails X-Bench-Sum.", nil, nil),
		func(s *SinkStats) float64 { return float64(s.Corrupted) }, prometheus.CounterValue},
	{prometheus.NewDesc("hermod_bench_sink_duplicates_total", "Repeated (id, recipient) deliveries.", nil, nil),
		func(s *SinkStats) float64 { return float64(s.Duplicates) }, prometheus.CounterValue},
	{prometheus.NewDesc("hermod_bench_sink_unstamped_total", "Messages without X-Bench-Id.", nil, nil),
		func(s *SinkStats) float64 { return float64(s.Unstamped) }, prometheus.CounterValue},
}

var sinkRepliesDesc = prometheus.NewDesc("hermod_bench_sink_replies_total", "Replies sent, by code.", []string{"code"}, nil)

func (c sinkCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range sinkCounterDescs {
		ch <- d.desc
	}
	ch <- sinkRepliesDesc
}

func (c sinkCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.s.Stats()
	for _, d := range sinkCounterDescs {
		ch <- prometheus.MustNewConstMetric(d.desc, d.kind, d.get(&st))
	}
	for code, n := range st.Replies {
		ch <- prometheus.MustNewConstMetric(sinkRepliesDesc, prometheus.CounterValue, float64(n), strconv.Itoa(code))
	}
}

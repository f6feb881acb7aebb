package netio

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// sessionOutcomes are the fixed values of the outcome label.
var sessionOutcomes = []string{"quit", "client_closed", "timeout", "protocol_error", "tls_failed", "refused", "backlog", "error", "shutdown"}

type serverCounters struct {
	accepted     atomic.Int64
	active       atomic.Int64
	refusedTotal atomic.Int64
	refusedPerIP atomic.Int64
	tlsOK        atomic.Int64
	tlsFailed    atomic.Int64
	outcomes     [9]atomic.Int64
}

func (m *serverCounters) outcome(o string) {
	for i, name := range sessionOutcomes {
		if name == o {
			m.outcomes[i].Add(1)
			return
		}
	}
	m.outcomes[len(sessionOutcomes)-2].Add(1) // "error"
}

// ServerMetrics is a snapshot of the server's counters.
type ServerMetrics struct {
	Accepted        int64            // connections accepted
	Active          int64            // connections open now
	RefusedLimit    int64            // refused by max_connections
	RefusedPerIP    int64            // refused by max_connections_per_ip
	TLSHandshakes   int64            // successful STARTTLS handshakes
	TLSFailures     int64            // failed STARTTLS handshakes
	SessionOutcomes map[string]int64 // ended sessions by outcome
	BufferedBytes   int64            // message content held in memory now (max_buffered_bytes)
	BufferRefused   int64            // MAIL commands and messages refused with 452 for max_buffered_bytes
}

// Metrics returns a snapshot of the counters.
func (s *Server) Metrics() ServerMetrics {
	m := ServerMetrics{
		Accepted:        s.m.accepted.Load(),
		Active:          s.m.active.Load(),
		RefusedLimit:    s.m.refusedTotal.Load(),
		RefusedPerIP:    s.m.refusedPerIP.Load(),
		TLSHandshakes:   s.m.tlsOK.Load(),
		TLSFailures:     s.m.tlsFailed.Load(),
		SessionOutcomes: make(map[string]int64, len(sessionOutcomes)),
		BufferedBytes:   s.cfg.budget.buffered(),
	}
	if s.cfg.budget != nil {
		m.BufferRefused = s.cfg.budget.refused.Load()
	}
	for i, name := range sessionOutcomes {
		m.SessionOutcomes[name] = s.m.outcomes[i].Load()
	}
	return m
}

var (
	descConnAccepted = prometheus.NewDesc("hermod_smtp_connections_accepted_total", "Inbound SMTP connections accepted.", nil, nil)
	descConnActive   = prometheus.NewDesc("hermod_smtp_connections_active", "Inbound SMTP connections open now.", nil, nil)
	descConnRefused  = prometheus.NewDesc("hermod_smtp_connections_refused_total", "Inbound SMTP connections refused by a connection limit.", []string{"limit"}, nil)
	descTLS          = prometheus.NewDesc("hermod_smtp_starttls_total", "STARTTLS handshakes by result.", []string{"result"}, nil)
	descSessions     = prometheus.NewDesc("hermod_smtp_sessions_total", "Ended SMTP sessions by outcome.", []string{"outcome"}, nil)
	descBuffered     = prometheus.NewDesc("hermod_smtp_buffered_bytes", "Message content held in memory by all sessions (bounded by smtp.max_buffered_bytes).", nil, nil)
	descBufRefused   = prometheus.NewDesc("hermod_smtp_buffer_refused_total", "MAIL commands and messages refused with 452 4.3.1 because smtp.max_buffered_bytes was reached.", nil, nil)
)

// Collector returns a Prometheus collector for the server's metrics. The
// caller registers it.
func (s *Server) Collector() prometheus.Collector { return serverCollector{s} }

type serverCollector struct{ s *Server }

func (c serverCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descConnAccepted, descConnActive, descConnRefused, descTLS, descSessions, descBuffered, descBufRefused} {
		ch <- d
	}
}

func (c serverCollector) Collect(ch chan<- prometheus.Metric) {
	m := c.s.Metrics()
	ch <- prometheus.MustNewConstMetric(descConnAccepted, prometheus.CounterValue, float64(m.Accepted))
	ch <- prometheus.MustNewConstMetric(descConnActive, prometheus.GaugeValue, float64(m.Active))
	ch <- prometheus.MustNewConstMetric(descConnRefused, prometheus.CounterValue, float64(m.RefusedLimit), "max_connections")
	ch <- prometheus.MustNewConstMetric(descConnRefused, prometheus.CounterValue, float64(m.RefusedPerIP), "max_connections_per_ip")
	ch <- prometheus.MustNewConstMetric(descTLS, prometheus.CounterValue, float64(m.TLSHandshakes), "ok")
	ch <- prometheus.MustNewConstMetric(descTLS, prometheus.CounterValue, float64(m.TLSFailures), "failed")
	for _, name := range sessionOutcomes {
		ch <- prometheus.MustNewConstMetric(descSessions, prometheus.CounterValue, float64(m.SessionOutcomes[name]), name)
	}
	ch <- prometheus.MustNewConstMetric(descBuffered, prometheus.GaugeValue, float64(m.BufferedBytes))
	ch <- prometheus.MustNewConstMetric(descBufRefused, prometheus.CounterValue, float64(m.BufferRefused))
}

package engine

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

type receiverCounters struct {
	accepted     atomic.Int64
	bytes        atomic.Int64
	commitFailed atomic.Int64
	rejected     atomic.Int64
	relayDenied  atomic.Int64
	noRoom       atomic.Int64
}

// ReceiverMetrics is a snapshot of the receiver's counters.
type ReceiverMetrics struct {
	Messages     int64 // messages accepted (durable)
	Bytes        int64 // octets of accepted messages, Received: header included
	CommitFailed int64 // messages refused with 451 because the spool failed
	Rejected     int64 // messages refused for their content (mail loops)
	RelayDenied  int64 // recipients refused by the relay policy
	NoRoom       int64 // transactions refused with 452 4.3.1: spool filesystem short of space
}

// Metrics returns a snapshot of the counters.
func (r *Receiver) Metrics() ReceiverMetrics {
	return ReceiverMetrics{
		Messages:     r.m.accepted.Load(),
		Bytes:        r.m.bytes.Load(),
		CommitFailed: r.m.commitFailed.Load(),
		Rejected:     r.m.rejected.Load(),
		RelayDenied:  r.m.relayDenied.Load(),
		NoRoom:       r.m.noRoom.Load(),
	}
}

var (
	descRecvMessages = prometheus.NewDesc("hermod_smtp_messages_received_total", "Messages accepted and spooled.", nil, nil)
	descRecvBytes    = prometheus.NewDesc("hermod_smtp_received_bytes_total", "Octets of messages accepted and spooled.", nil, nil)
	descRecvRefused  = prometheus.NewDesc("hermod_smtp_messages_refused_total", "Messages refused at end of data, by reason.", []string{"reason"}, nil)
	descRelayDenied  = prometheus.NewDesc("hermod_smtp_relay_denied_total", "Recipients refused by the relay policy.", nil, nil)
	descNoRoom       = prometheus.NewDesc("hermod_smtp_insufficient_storage_total", "MAIL commands refused with 452 4.3.1 because the spool's filesystem was short of space (spool.min_free).", nil, nil)
)

// Collector returns a Prometheus collector for the receiver's metrics.
func (r *Receiver) Collector() prometheus.Collector { return receiverCollector{r} }

type receiverCollector struct{ r *Receiver }

func (c receiverCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descRecvMessages
	ch <- descRecvBytes
	ch <- descRecvRefused
	ch <- descRelayDenied
	ch <- descNoRoom
}

func (c receiverCollector) Collect(ch chan<- prometheus.Metric) {
	m := c.r.Metrics()
	ch <- prometheus.MustNewConstMetric(descRecvMessages, prometheus.CounterValue, float64(m.Messages))
	ch <- prometheus.MustNewConstMetric(descRecvBytes, prometheus.CounterValue, float64(m.Bytes))
	ch <- prometheus.MustNewConstMetric(descRecvRefused, prometheus.CounterValue, float64(m.CommitFailed), "spool_error")
	ch <- prometheus.MustNewConstMetric(descRecvRefused, prometheus.CounterValue, float64(m.Rejected), "loop")
	ch <- prometheus.MustNewConstMetric(descRelayDenied, prometheus.CounterValue, float64(m.RelayDenied))
	ch <- prometheus.MustNewConstMetric(descNoRoom, prometheus.CounterValue, float64(m.NoRoom))
}

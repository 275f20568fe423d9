package stream

import (
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Prometheus metrics of the engine. They are created here and registered by
// the process that wants them (see Collectors), never on a global registry.
var (
	metricBytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "stowage", Subsystem: "stream", Name: "bytes_total",
		Help: "Bytes handled by the copy engine, by kind: read, written, hole (skipped source holes), zero (detected zero blocks), reflink, resumed.",
	}, []string{"kind"})
	metricCopies = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "stowage", Subsystem: "stream", Name: "copies_total",
		Help: "Copies finished, by method and result (ok, error, canceled, checksum_mismatch).",
	}, []string{"method", "result"})
	metricRetries = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "stowage", Subsystem: "stream", Name: "read_retries_total",
		Help: "Source reads retried after a dropped connection, an error or a stall.",
	})
	metricSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "stowage", Subsystem: "stream", Name: "copy_seconds",
		Help:    "Duration of finished copies.",
		Buckets: prometheus.ExponentialBuckets(0.01, 4, 10),
	})
)

// Collectors returns the engine's Prometheus collectors for the caller to
// register, e.g. prometheus.MustRegister(stream.Collectors()...).
func Collectors() []prometheus.Collector {
	return []prometheus.Collector{metricBytes, metricCopies, metricRetries, metricSeconds}
}

// Totals are the engine's counters in this process, read for a caller
// that reports them elsewhere (an agent's heartbeat) rather than serving
// them to Prometheus itself.
type Totals struct {
	// Bytes by kind (the kind label of stowage_stream_bytes_total).
	Bytes map[string]int64
	// Copies by method and result.
	Copies map[CopyKey]int64
	// ReadRetries is stowage_stream_read_retries_total.
	ReadRetries int64
}

// CopyKey is the method and result of finished copies.
type CopyKey struct{ Method, Result string }

// ReadTotals returns the engine's counters now.
func ReadTotals() Totals {
	t := Totals{Bytes: map[string]int64{}, Copies: map[CopyKey]int64{}}
	each(metricBytes, func(labels map[string]string, v float64) { t.Bytes[labels["kind"]] = int64(v) })
	each(metricCopies, func(labels map[string]string, v float64) {
		t.Copies[CopyKey{Method: labels["method"], Result: labels["result"]}] = int64(v)
	})
	each(metricRetries, func(_ map[string]string, v float64) { t.ReadRetries = int64(v) })
	return t
}

// each calls fn with the labels and value of every counter c collects.
func each(c prometheus.Collector, fn func(labels map[string]string, v float64)) {
	ch := make(chan prometheus.Metric, 16)
	go func() {
		c.Collect(ch)
		close(ch)
	}()
	for m := range ch {
		var d dto.Metric
		if err := m.Write(&d); err != nil || d.GetCounter() == nil {
			continue
		}
		labels := make(map[string]string, len(d.GetLabel()))
		for _, l := range d.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		fn(labels, d.GetCounter().GetValue())
	}
}

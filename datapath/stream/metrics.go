package stream

import "github.com/prometheus/client_golang/prometheus"

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

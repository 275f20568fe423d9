package main

import (
	"github.com/prometheus/client_golang/prometheus"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// copyEngineCollector exports the agents' copy engine counters, as their
// heartbeats to this controller carried them, labelled with the host:
// agents serve no metrics of their own, so one scrape of the leader sees
// every host's copies.
type copyEngineCollector struct {
	counters               func() map[string]*stowagev1.CopyEngineCounters
	bytes, copies, retries *prometheus.Desc
}

func newCopyEngineCollector(counters func() map[string]*stowagev1.CopyEngineCounters) *copyEngineCollector {
	const where = " Counted by each host's agent since it started (restarts from 0 with it) and reported in its heartbeats, so exported by the leading controller only."
	return &copyEngineCollector{
		counters: counters,
		bytes: prometheus.NewDesc("stowage_stream_bytes_total",
			"Bytes the copy engine handled on each host, by kind: read, written, hole (source holes skipped), zero (zero blocks detected), reflink, resumed."+where, []string{"host", "kind"}, nil),
		copies: prometheus.NewDesc("stowage_stream_copies_total",
			"Copies the copy engine finished on each host, by method and result (ok, error, canceled, checksum_mismatch)."+where, []string{"host", "method", "result"}, nil),
		retries: prometheus.NewDesc("stowage_stream_read_retries_total",
			"Source reads the copy engine retried on each host after a dropped connection, an error or a stall."+where, []string{"host"}, nil),
	}
}

func (c *copyEngineCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.bytes
	ch <- c.copies
	ch <- c.retries
}

func (c *copyEngineCollector) Collect(ch chan<- prometheus.Metric) {
	for host, ce := range c.counters() {
		for kind, n := range ce.GetBytes() {
			ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(n), host, kind)
		}
		for _, cc := range ce.GetCopies() {
			ch <- prometheus.MustNewConstMetric(c.copies, prometheus.CounterValue, float64(cc.GetCount()), host, cc.GetMethod(), cc.GetResult())
		}
		ch <- prometheus.MustNewConstMetric(c.retries, prometheus.CounterValue, float64(ce.GetReadRetries()), host)
	}
}

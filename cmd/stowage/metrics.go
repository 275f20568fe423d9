package main

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stowage/stowage/controller/meta"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// stateCollector exports how many stores and hosts are in each state,
// read from the metadata at scrape time.
type stateCollector struct {
	db     *meta.DB
	stores *prometheus.Desc
	hosts  *prometheus.Desc
	mounts *prometheus.Desc
}

func newStateCollector(db *meta.DB) *stateCollector {
	return &stateCollector{
		db:     db,
		stores: prometheus.NewDesc("stowage_stores", "Data stores by role and state.", []string{"role", "state"}, nil),
		hosts:  prometheus.NewDesc("stowage_hosts", "Hosts by state.", []string{"state"}, nil),
		mounts: prometheus.NewDesc("stowage_template_mount_templates", "Templates in each host's template mount, by state (complete, partial, pinned, error), as last persisted from heartbeats.", []string{"host", "state"}, nil),
	}
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.stores
	ch <- c.hosts
	ch <- c.mounts
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	stores, err := c.db.Stores().List(ctx, meta.Filter[*stowagev1.DataStore]{})
	if err == nil {
		counts := map[[2]string]int{}
		for _, s := range stores {
			counts[[2]string{meta.StoreRoleName(s.GetRole()), meta.StoreStateName(s.GetState())}]++
		}
		for k, n := range counts {
			ch <- prometheus.MustNewConstMetric(c.stores, prometheus.GaugeValue, float64(n), k[0], k[1])
		}
	}
	hosts, err := c.db.Hosts().List(ctx, meta.Filter[*stowagev1.Host]{})
	if err == nil {
		counts := map[string]int{}
		for _, h := range hosts {
			counts[meta.HostStateName(h.GetState())]++
		}
		for k, n := range counts {
			ch <- prometheus.MustNewConstMetric(c.hosts, prometheus.GaugeValue, float64(n), k)
		}
		for _, h := range hosts {
			tc := h.GetCapabilities().GetTemplateCache()
			if tc == nil {
				continue
			}
			n := map[string]int{"complete": 0, "partial": 0, "pinned": 0, "error": 0}
			for _, t := range tc.GetTemplates() {
				switch {
				case t.GetError() != "":
					n["error"]++
				case t.GetComplete():
					n["complete"]++
				default:
					n["partial"]++
				}
				if t.GetPinned() {
					n["pinned"]++
				}
			}
			for st, v := range n {
				ch <- prometheus.MustNewConstMetric(c.mounts, prometheus.GaugeValue, float64(v), h.GetId(), st)
			}
		}
	}
}

package main

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stowage/stowage/controller/datastore"
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
	// The template mounts' counters, as last persisted from heartbeats.
	cacheRead, cachePassthrough, cacheFetched, cacheCorrupt *prometheus.Desc

	storeCapacity *prometheus.Desc
	storeUsed     *prometheus.Desc
	storeReserved *prometheus.Desc
	// storeThreshold and policy: the capacity thresholds in force.
	storeThreshold *prometheus.Desc
	policy         storePolicy
	jobs           *prometheus.Desc
	jobOldest      *prometheus.Desc
	jobRate        *prometheus.Desc
	jobDone        *prometheus.Desc
	now            func() time.Time
}

// unfinishedJobStates are the job states the collector reads at each
// scrape: finished jobs are many and say nothing about what is stuck.
var unfinishedJobStates = []stowagev1.JobState{
	stowagev1.JobState_JOB_STATE_PENDING,
	stowagev1.JobState_JOB_STATE_RUNNING,
	stowagev1.JobState_JOB_STATE_CANCELLING,
}

// storePolicy is what the collector reads of placement: the thresholds in
// force on a store and what jobs in flight reserved there.
type storePolicy interface {
	Effective(st *stowagev1.DataStore) datastore.Thresholds
	Reserved(storeID string) int64
}

func newStateCollector(db *meta.DB, policy storePolicy) *stateCollector {
	return &stateCollector{
		db:     db,
		policy: policy,
		storeThreshold: prometheus.NewDesc("stowage_store_capacity_threshold_ratio",
			"Capacity thresholds in force on each data store, as fractions of its capacity: at threshold=\"disable\" allocation stops, above threshold=\"notify\" an alert fires.", []string{"store", "role", "threshold"}, nil),
		stores: prometheus.NewDesc("stowage_stores", "Data stores by role and state.", []string{"role", "state"}, nil),
		hosts:  prometheus.NewDesc("stowage_hosts", "Hosts by state.", []string{"state"}, nil),
		mounts: prometheus.NewDesc("stowage_template_mount_templates", "Templates in each host's template mount, by state (complete, partial, pinned, error), as last persisted from heartbeats.", []string{"host", "state"}, nil),
		cacheRead: prometheus.NewDesc("stowage_template_cache_read_bytes_total",
			"Bytes read through each host's template mount: result=\"hit\" served from cached chunks, \"miss\" waited for the origin. Reads through passthrough opens (stowage_template_cache_passthrough_opens_total) are all hits and not counted. Restarts from 0 with the mount's process; up to 30 s old (persisted from heartbeats).", []string{"host", "result"}, nil),
		cachePassthrough: prometheus.NewDesc("stowage_template_cache_passthrough_opens_total",
			"Opens of complete templates each host's mount handed to the kernel (FUSE passthrough): their reads are hits the mount never sees.", []string{"host"}, nil),
		cacheFetched: prometheus.NewDesc("stowage_template_cache_fetched_bytes_total",
			"Bytes each host's template mount read from the templates' origins (on demand, read-ahead and prefetch).", []string{"host"}, nil),
		cacheCorrupt: prometheus.NewDesc("stowage_template_cache_corrupt_chunks_total",
			"Cached template chunks each host's mount found not matching their checksum when read back (each dropped and fetched again): the host's cache disk returns bad data.", []string{"host"}, nil),
		storeCapacity: prometheus.NewDesc("stowage_store_capacity_bytes",
			"Capacity of each data store in bytes, as last reported by its driver (0 when the driver does not know).", []string{"store", "role"}, nil),
		storeUsed: prometheus.NewDesc("stowage_store_used_bytes",
			"Bytes used on each data store, as last reported by its driver.", []string{"store", "role"}, nil),
		storeReserved: prometheus.NewDesc("stowage_store_reserved_bytes",
			"Bytes jobs in flight may still write to each data store (and those that ended a few heartbeats ago), counted as used by placement; the leading controller's.", []string{"store", "role"}, nil),
		jobs: prometheus.NewDesc("stowage_jobs_unfinished",
			"Unfinished jobs (Pending, Running, Cancelling) by kind and state.", []string{"kind", "state"}, nil),
		jobOldest: prometheus.NewDesc("stowage_jobs_unfinished_oldest_update_age_seconds",
			"Seconds since the least recently updated unfinished job in each state was last updated (absent when none): a job not updated for long is stuck.", []string{"state"}, nil),
		jobRate: prometheus.NewDesc("stowage_jobs_running_bytes_per_second",
			"Sum of the copy rates (bytes per second) that running jobs of each kind last reported in their progress: 0 while jobs run means no data moves.", []string{"kind"}, nil),
		jobDone: prometheus.NewDesc("stowage_jobs_running_bytes_done",
			"Sum of the bytes that running jobs of each kind have copied in their current phase, as last recorded: unchanged for long while copy jobs run means no data moves.", []string{"kind"}, nil),
		now: time.Now,
	}
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.stores
	ch <- c.hosts
	ch <- c.mounts
	ch <- c.cacheRead
	ch <- c.cachePassthrough
	ch <- c.cacheFetched
	ch <- c.cacheCorrupt
	ch <- c.storeCapacity
	ch <- c.storeUsed
	ch <- c.storeReserved
	ch <- c.storeThreshold
	ch <- c.jobs
	ch <- c.jobOldest
	ch <- c.jobRate
	ch <- c.jobDone
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
		for _, s := range stores {
			role := meta.StoreRoleName(s.GetRole())
			ch <- prometheus.MustNewConstMetric(c.storeCapacity, prometheus.GaugeValue, float64(s.GetCapacityBytes()), s.GetName(), role)
			ch <- prometheus.MustNewConstMetric(c.storeUsed, prometheus.GaugeValue, float64(s.GetUsedBytes()), s.GetName(), role)
			ch <- prometheus.MustNewConstMetric(c.storeReserved, prometheus.GaugeValue, float64(c.policy.Reserved(s.GetId())), s.GetName(), role)
			t := c.policy.Effective(s)
			ch <- prometheus.MustNewConstMetric(c.storeThreshold, prometheus.GaugeValue, t.Disable, s.GetName(), role, "disable")
			ch <- prometheus.MustNewConstMetric(c.storeThreshold, prometheus.GaugeValue, t.Notify, s.GetName(), role, "notify")
		}
	}
	c.collectJobs(ctx, ch)
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
			ch <- prometheus.MustNewConstMetric(c.cacheRead, prometheus.CounterValue, float64(tc.GetReadHitBytes()), h.GetId(), "hit")
			ch <- prometheus.MustNewConstMetric(c.cacheRead, prometheus.CounterValue, float64(tc.GetReadMissBytes()), h.GetId(), "miss")
			ch <- prometheus.MustNewConstMetric(c.cachePassthrough, prometheus.CounterValue, float64(tc.GetPassthroughOpens()), h.GetId())
			ch <- prometheus.MustNewConstMetric(c.cacheFetched, prometheus.CounterValue, float64(tc.GetFetchedBytes()), h.GetId())
			ch <- prometheus.MustNewConstMetric(c.cacheCorrupt, prometheus.CounterValue, float64(tc.GetCorruptChunks()), h.GetId())
		}
	}
}

// collectJobs exports the unfinished jobs: how many by kind and state, how
// long the stalest of each state has gone without an update, and how fast
// the running ones copy.
func (c *stateCollector) collectJobs(ctx context.Context, ch chan<- prometheus.Metric) {
	counts := map[[2]string]int{}
	rates, done := map[string]float64{}, map[string]float64{}
	for _, st := range unfinishedJobStates {
		state := meta.JobStateName(st)
		js, err := c.db.Jobs().ListBy(ctx, meta.IndexState, state)
		if err != nil {
			return
		}
		var oldest time.Time
		for _, j := range js {
			if j.GetState() != st {
				continue
			}
			counts[[2]string{j.GetKind(), state}]++
			if st == stowagev1.JobState_JOB_STATE_RUNNING {
				rates[j.GetKind()] += j.GetProgress().GetBytesPerSecond()
				done[j.GetKind()] += float64(j.GetProgress().GetBytesDone())
			}
			u := j.GetUpdatedAt().AsTime()
			if j.GetUpdatedAt() == nil {
				u = j.GetCreatedAt().AsTime()
			}
			if oldest.IsZero() || u.Before(oldest) {
				oldest = u
			}
		}
		if !oldest.IsZero() {
			ch <- prometheus.MustNewConstMetric(c.jobOldest, prometheus.GaugeValue, max(0, c.now().Sub(oldest).Seconds()), state)
		}
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(c.jobs, prometheus.GaugeValue, float64(n), k[0], k[1])
	}
	for k, r := range rates {
		ch <- prometheus.MustNewConstMetric(c.jobRate, prometheus.GaugeValue, r, k)
		ch <- prometheus.MustNewConstMetric(c.jobDone, prometheus.GaugeValue, done[k], k)
	}
}

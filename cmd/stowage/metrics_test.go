package main

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/protobuf/proto"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/meta"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// TestStateCollectorCapacityAndJobs: the state collector exports each
// store's capacity and use, the unfinished jobs by kind and state, the age
// of the stalest one and the running jobs' copy rate; finished jobs are
// not counted.
func TestStateCollectorCapacityAndJobs(t *testing.T) {
	ctx := context.Background()
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Stores().Create(ctx, &stowagev1.DataStore{Id: "s1", Name: "primary", Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY,
		CapacityBytes: 1000, UsedBytes: 850, CapacityNotifyThreshold: proto.Float64(0.8)}); err != nil {
		t.Fatal(err)
	}
	for _, j := range []struct {
		id    string
		rate  float64
		event meta.JobEvent
	}{{"j1", 100, meta.JobStart}, {"j2", 50, meta.JobStart}, {"j3", 0, meta.JobSucceed}} {
		if _, err := db.Jobs().Create(ctx, &stowagev1.Job{Id: j.id, Kind: "volume.create"}); err != nil {
			t.Fatal(err)
		}
		if _, err := db.Jobs().Transition(ctx, j.id, meta.JobStart, func(r *stowagev1.Job) error {
			r.Progress = &stowagev1.JobProgress{BytesPerSecond: j.rate, BytesDone: int64(j.rate) * 10}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if j.event != meta.JobStart {
			if _, err := db.Jobs().Transition(ctx, j.id, j.event, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	j1, err := db.Jobs().Get(ctx, "j1")
	if err != nil {
		t.Fatal(err)
	}
	now := j1.GetUpdatedAt().AsTime().Add(40 * time.Minute)
	c := newStateCollector(db, datastore.New(db, nil, slog.New(slog.DiscardHandler)))
	c.now = func() time.Time { return now }
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	want := `
# HELP stowage_store_capacity_bytes Capacity of each data store in bytes, as last reported by its driver (0 when the driver does not know).
# TYPE stowage_store_capacity_bytes gauge
stowage_store_capacity_bytes{role="Primary",store="primary"} 1000
# HELP stowage_store_used_bytes Bytes used on each data store, as last reported by its driver.
# TYPE stowage_store_used_bytes gauge
stowage_store_used_bytes{role="Primary",store="primary"} 850
# HELP stowage_store_capacity_threshold_ratio Capacity thresholds in force on each data store, as fractions of its capacity: at threshold="disable" allocation stops, above threshold="notify" an alert fires.
# TYPE stowage_store_capacity_threshold_ratio gauge
stowage_store_capacity_threshold_ratio{role="Primary",store="primary",threshold="disable"} 0.85
stowage_store_capacity_threshold_ratio{role="Primary",store="primary",threshold="notify"} 0.8
# HELP stowage_jobs_unfinished Unfinished jobs (Pending, Running, Cancelling) by kind and state.
# TYPE stowage_jobs_unfinished gauge
stowage_jobs_unfinished{kind="volume.create",state="Running"} 2
# HELP stowage_jobs_unfinished_oldest_update_age_seconds Seconds since the least recently updated unfinished job in each state was last updated (absent when none): a job not updated for long is stuck.
# TYPE stowage_jobs_unfinished_oldest_update_age_seconds gauge
stowage_jobs_unfinished_oldest_update_age_seconds{state="Running"} 2400
# HELP stowage_jobs_running_bytes_per_second Sum of the copy rates (bytes per second) that running jobs of each kind last reported in their progress: 0 while jobs run means no data moves.
# TYPE stowage_jobs_running_bytes_per_second gauge
stowage_jobs_running_bytes_per_second{kind="volume.create"} 150
# HELP stowage_jobs_running_bytes_done Sum of the bytes that running jobs of each kind have copied in their current phase, as last recorded: unchanged for long while copy jobs run means no data moves.
# TYPE stowage_jobs_running_bytes_done gauge
stowage_jobs_running_bytes_done{kind="volume.create"} 1500
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"stowage_store_capacity_bytes", "stowage_store_used_bytes", "stowage_store_capacity_threshold_ratio", "stowage_jobs_unfinished",
		"stowage_jobs_unfinished_oldest_update_age_seconds", "stowage_jobs_running_bytes_per_second", "stowage_jobs_running_bytes_done"); err != nil {
		t.Fatal(err)
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
}

// Command scaleseed fills a metadata store for bench/scale.sh and measures
// state transitions in process: the primary stores (one per zone and
// index, Up, already reached by the simulated hosts that agentsim will
// run), Ready volumes spread over them, snapshots of the first volumes,
// all written through controller/meta in batched transactions.
//
//	go run ./bench/cmd/scaleseed -metadata DIR|etcd://h:p/prefix -stores 200 -volumes 100000 -snapshots 20000 -hosts 1000 -zones 10
//	go run ./bench/cmd/scaleseed -metadata SPEC -transitions 20000 -writers 8   # after seeding, controller stopped
//	go run ./bench/cmd/scaleseed -metadata SPEC -plans 1000                   # after a controller run (hosts registered), controller stopped
//
// The transition run moves distinct Ready volumes Ready -> Resizing ->
// Ready from -writers goroutines (each move is two transitions, each its
// own transaction) and prints one TSV row: transitions, seconds, per
// second. The plan run (plan.go) times dry-run volume creates in process
// over the same services as the controller, among the hosts a controller
// run left registered: planning alone, without TLS, the API or load.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stowage/stowage/controller/meta"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func main() {
	var (
		spec                       = flag.String("metadata", "", "metadata store: a directory (Badger) or etcd://host:port[,...]/prefix")
		stores, volumes, snapshots = flag.Int("stores", 200, "primary stores"), flag.Int("volumes", 100000, "volumes"), flag.Int("snapshots", 20000, "snapshots")
		hosts                      = flag.Int("hosts", 1000, "simulated hosts (agentsim ids sim-0000...) the stores list as reaching them")
		zones                      = flag.Int("zones", 10, "zones the stores and hosts are spread over")
		batch                      = flag.Int("batch", 100, "records per transaction")
		transitions                = flag.Int("transitions", 0, "measure this many volume state transitions instead of seeding")
		writers                    = flag.Int("writers", 8, "concurrent writers of the transition run")
		plans                      = flag.Int("plans", 0, "time this many dry-run volume creates in process instead of seeding")
	)
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if *spec == "" {
		log.Error("-metadata is required")
		os.Exit(2)
	}
	db, err := meta.Open(*spec)
	if err != nil {
		log.Error("open metadata", "err", err)
		os.Exit(1)
	}
	defer db.Close()
	ctx := context.Background()
	switch {
	case *plans > 0:
		err = measurePlans(ctx, db, *plans, Zone(1, *zones))
	case *transitions > 0:
		err = measureTransitions(ctx, db, *transitions, *writers)
	default:
		err = seed(ctx, db, log, world{stores: *stores, volumes: *volumes, snapshots: *snapshots, hosts: *hosts, zones: *zones, batch: *batch})
	}
	if err != nil {
		log.Error("scaleseed", "err", err)
		os.Exit(1)
	}
}

type world struct{ stores, volumes, snapshots, hosts, zones, batch int }

// HostID is the id agentsim gives simulated host i.
func HostID(i int) string { return fmt.Sprintf("sim-%04d", i) }

// Zone is the zone of simulated host or store i.
func Zone(i, zones int) string { return fmt.Sprintf("z%d", i%zones) }

const storeCapacity = 100 << 40 // what agentsim reports for every store

func seed(ctx context.Context, db *meta.DB, log *slog.Logger, w world) error {
	t0 := time.Now()
	// Stores: store i is in zone i%zones, reached by every host of that zone.
	var storeIDs []string
	for lo := 0; lo < w.stores; lo += w.batch {
		err := db.Txn(ctx, func(tx *meta.Tx) error {
			for i := lo; i < min(lo+w.batch, w.stores); i++ {
				var hostIDs []string
				for h := i % w.zones; h < w.hosts; h += w.zones {
					hostIDs = append(hostIDs, HostID(h))
				}
				st, err := meta.Stores.CreateTx(tx, &stowagev1.DataStore{Id: meta.NewID(), Name: fmt.Sprintf("p%03d", i),
					Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY, Provider: "filesystem", Url: fmt.Sprintf("file:///srv/sim/p%03d", i),
					Scope: &stowagev1.Scope{Zone: Zone(i, w.zones)}, Details: map[string]string{"path": fmt.Sprintf("/srv/sim/p%03d", i)},
					HostIds: hostIDs, CapacityBytes: storeCapacity, AvailableBytes: storeCapacity / 2, UsedBytes: storeCapacity / 2})
				if err != nil {
					return err
				}
				if _, err := meta.Stores.TransitionTx(tx, st.GetId(), 0, meta.StoreAttachSucceeded, nil); err != nil {
					return err
				}
				storeIDs = append(storeIDs, st.GetId())
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("seed stores: %w", err)
		}
	}
	if len(storeIDs) == 0 {
		return fmt.Errorf("seed: -stores 0")
	}
	var volIDs []string
	for lo := 0; lo < w.volumes; lo += w.batch {
		var ids []string
		err := db.Txn(ctx, func(tx *meta.Tx) error {
			ids = ids[:0]
			for i := lo; i < min(lo+w.batch, w.volumes); i++ {
				v, err := meta.Volumes.CreateTx(tx, &stowagev1.Volume{Id: meta.NewID(), Name: fmt.Sprintf("vol-%06d", i), Size: 10 << 30,
					StoreId: storeIDs[i%len(storeIDs)], Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, InstallPath: fmt.Sprintf("volumes/vol-%06d.qcow2", i)})
				if err != nil {
					return err
				}
				for _, ev := range []meta.VolumeEvent{meta.VolumeCreateRequested, meta.VolumeOperationSucceeded} {
					if _, err := meta.Volumes.TransitionTx(tx, v.GetId(), 0, ev, nil); err != nil {
						return err
					}
				}
				ids = append(ids, v.GetId())
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("seed volumes: %w", err)
		}
		volIDs = append(volIDs, ids...)
	}
	for lo := 0; lo < w.snapshots && len(volIDs) > 0; lo += w.batch {
		err := db.Txn(ctx, func(tx *meta.Tx) error {
			for i := lo; i < min(lo+w.batch, w.snapshots); i++ {
				sn, err := meta.Snapshots.CreateTx(tx, &stowagev1.Snapshot{Id: meta.NewID(), VolumeId: volIDs[i%len(volIDs)],
					Name: fmt.Sprintf("snap-%06d", i), Method: "qcow2-external", Size: 10 << 30})
				if err != nil {
					return err
				}
				for _, ev := range []meta.SnapshotEvent{meta.SnapshotCreateRequested, meta.SnapshotOperationSucceeded} {
					if _, err := meta.Snapshots.TransitionTx(tx, sn.GetId(), 0, ev, nil); err != nil {
						return err
					}
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("seed snapshots: %w", err)
		}
	}
	log.Info("seeded", "stores", len(storeIDs), "volumes", len(volIDs), "snapshots", w.snapshots, "took", time.Since(t0).Round(time.Millisecond))
	fmt.Printf("seed\t%d\t%d\t%d\t%.1f\n", len(storeIDs), len(volIDs), w.snapshots, time.Since(t0).Seconds())
	return nil
}

// measureTransitions moves n/2 distinct Ready volumes to Resizing and back
// from writers goroutines, each transition its own transaction.
func measureTransitions(ctx context.Context, db *meta.DB, n, writers int) error {
	vols, err := db.Volumes().List(ctx, meta.Filter[*stowagev1.Volume]{Index: meta.IndexState, Value: "Ready", Limit: (n + 1) / 2})
	if err != nil {
		return err
	}
	if len(vols) == 0 {
		return fmt.Errorf("transitions: no Ready volume; seed first")
	}
	var next, done, failed atomic.Int64
	var wg sync.WaitGroup
	t0 := time.Now()
	for range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(vols) {
					return
				}
				id := vols[i].GetId()
				for _, ev := range []meta.VolumeEvent{meta.VolumeResizeRequested, meta.VolumeOperationSucceeded} {
					if _, err := db.Volumes().Transition(ctx, id, ev, nil); err != nil {
						failed.Add(1)
						continue
					}
					done.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	secs := time.Since(t0).Seconds()
	if failed.Load() > 0 {
		return fmt.Errorf("transitions: %d failed", failed.Load())
	}
	fmt.Printf("transitions\t%d\t%d\t%.3f\t%.0f\n", writers, done.Load(), secs, float64(done.Load())/secs)
	return nil
}

package main

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/endpoint"
	"github.com/stowage/stowage/controller/hosts"
	"github.com/stowage/stowage/controller/image"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/controller/volume"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/filesystem"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// measurePlans times n dry-run volume creates in process, over the
// services as the controller assembles them, on metadata that holds the
// hosts a controller run registered (the controller stopped): planning
// alone, without TLS, the API or other load.
func measurePlans(ctx context.Context, db *meta.DB, n int, zone string) error {
	log := slog.New(slog.DiscardHandler)
	hs := hosts.New(db, nil, hosts.Config{HeartbeatInterval: 10 * time.Second}, log)
	sel := endpoint.New(hs, nil)
	reg := drivers.NewRegistry()
	reg.Register(filesystem.New(sel))
	stores := datastore.New(db, reg, log)
	hs.SetStoreWatcher(stores)
	runner := jobs.New(db, log) // never started: a dry run submits nothing
	mover := motion.NewMover(reg, sel)
	images := image.New(db, stores, sel, mover, runner, log)
	vols := volume.New(db, stores, images, sel, mover, runner, reg, log)
	up, err := hs.UpHosts(ctx)
	if err != nil {
		return err
	}
	var d []time.Duration
	for i := range n {
		t0 := time.Now()
		if _, err := vols.Create(ctx, &stowagev1.CreateVolumeRequest{Name: fmt.Sprint("planned-", i), Size: 10 << 30, Zone: zone, DryRun: true}); err != nil {
			return fmt.Errorf("plan %d: %w", i, err)
		}
		d = append(d, time.Since(t0))
	}
	slices.Sort(d)
	at := func(p float64) float64 {
		i := max(0, min(len(d)-1, int(p/100*float64(len(d))+0.5)-1))
		return float64(d[i].Microseconds()) / 1000
	}
	fmt.Printf("plan\t%d\t%d\t%.3f\t%.3f\t%.3f\n", len(up), len(d), at(50), at(99), at(100))
	return nil
}

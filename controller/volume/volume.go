// Package volume is the controller's VolumeService: blank volumes, volumes
// from templates (the template is cached on the primary store once, then
// installed by the best TemplateInstallStrategy: reflink, qcow2 linked
// clone or full copy; or, lazy, a qcow2 overlay on the template's file in
// the host's FUSE template mount, with no copy at all), volumes from snapshots (on primary or from a backup),
// delete, resize, access grants and migration between primary stores
// (directly between agents, never through an image store).
//
// Every mutating call validates and plans first (a dry run returns the plan
// and writes nothing), then records the volume and a job in one transaction
// and returns the job at once. A volume that is busy (Creating, Snapshotting,
// Migrating, ...) refuses a second mutating call with ErrAborted.
package volume

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/endpoint"
	"github.com/stowage/stowage/controller/image"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Job kinds of this service.
const (
	KindCreate  = "volume.create"
	KindDelete  = "volume.delete"
	KindResize  = "volume.resize"
	KindMigrate = "volume.migrate"
)

// Service implements VolumeService.
type Service struct {
	db        *meta.DB
	stores    *datastore.Service
	images    *image.Service
	sel       *endpoint.Selector
	mover     *motion.Mover
	jobs      *jobs.Runner
	providers *drivers.Registry
	log       *slog.Logger
	// mounts is what hosts' template mounts show (SetMounts); a lazy
	// create pushes its template to the chosen host's mount through it.
	mounts MountShower
	// CacheLowWater is the fraction of a primary store's capacity that must
	// stay free; unreferenced cached templates are evicted (least recently
	// used first) to keep it.
	CacheLowWater float64
}

// MountShower is the template mount planner as a lazy create needs it
// (image.Mounts).
type MountShower interface {
	Show(ctx context.Context, hostID, templateID string) (*stowagev1.CacheSpec, error)
}

var _ MountShower = (*image.Mounts)(nil)

// SetMounts wires the template mount planner (nil: a lazy create waits for
// the heartbeats to show its template, as before).
func (s *Service) SetMounts(m MountShower) { s.mounts = m }

// New returns the volume service and registers its job handlers.
func New(db *meta.DB, stores *datastore.Service, images *image.Service, sel *endpoint.Selector, mover *motion.Mover, runner *jobs.Runner, providers *drivers.Registry, log *slog.Logger) *Service {
	s := &Service{db: db, stores: stores, images: images, sel: sel, mover: mover, jobs: runner, providers: providers, log: log, CacheLowWater: 0.10}
	runner.Register(KindCreate, createHandler{s})
	runner.Register(KindDelete, deleteHandler{s})
	runner.Register(KindResize, resizeHandler{s})
	runner.Register(KindMigrate, migrateHandler{s})
	return s
}

// Get returns a volume by id, or by name when exactly one has it.
func (s *Service) Get(ctx context.Context, idOrName string) (*stowagev1.Volume, error) {
	if idOrName == "" {
		return nil, fmt.Errorf("a volume id or name is required: %w", errdefs.ErrInvalid)
	}
	v, err := s.db.Volumes().Get(ctx, idOrName)
	if err == nil {
		return v, nil
	}
	if byName, lerr := s.db.Volumes().ListBy(ctx, meta.IndexName, idOrName); lerr == nil {
		live := byName[:0]
		for _, v := range byName {
			if v.GetState() != stowagev1.VolumeState_VOLUME_STATE_EXPUNGED {
				live = append(live, v)
			}
		}
		if len(live) == 1 {
			return live[0], nil
		}
		if len(live) > 1 {
			return nil, fmt.Errorf("volume name %q is ambiguous (%d volumes); use the id: %w", idOrName, len(live), errdefs.ErrInvalid)
		}
	}
	return nil, fmt.Errorf("volume %q: no volume has that id or name; see `stowage volume list`: %w", idOrName, errdefs.ErrNotFound)
}

// ListFilter selects volumes for List: every field set must match.
// Expunged volumes are left out unless State asks for them.
type ListFilter struct {
	StoreID, TemplateID, Name string
	State                     stowagev1.VolumeState
}

// List returns up to limit volumes (0: no limit) that f selects with ids
// after after, in id order. It scans the narrowest secondary index f names
// (store, template, name, then state) and stops at limit.
func (s *Service) List(ctx context.Context, f ListFilter, after string, limit int) ([]*stowagev1.Volume, error) {
	mf := meta.Filter[*stowagev1.Volume]{After: after, Limit: limit}
	switch {
	case f.StoreID != "":
		mf.Index, mf.Value = meta.IndexStoreID, f.StoreID
	case f.TemplateID != "":
		mf.Index, mf.Value = meta.IndexTemplateID, f.TemplateID
	case f.Name != "":
		mf.Index, mf.Value = meta.IndexName, f.Name
	case f.State != stowagev1.VolumeState_VOLUME_STATE_UNSPECIFIED:
		mf.Index, mf.Value = meta.IndexState, meta.VolumeStateName(f.State)
	}
	mf.Where = func(v *stowagev1.Volume) bool {
		if f.State == stowagev1.VolumeState_VOLUME_STATE_UNSPECIFIED {
			if v.GetState() == stowagev1.VolumeState_VOLUME_STATE_EXPUNGED {
				return false
			}
		} else if v.GetState() != f.State {
			return false
		}
		return (f.StoreID == "" || v.GetStoreId() == f.StoreID) &&
			(f.TemplateID == "" || v.GetTemplateId() == f.TemplateID) &&
			(f.Name == "" || v.GetName() == f.Name)
	}
	vs, err := s.db.Volumes().List(ctx, mf)
	if err != nil {
		return nil, fmt.Errorf("list volumes: %w", err)
	}
	return vs, nil
}

// busy turns a refused volume transition into ErrAborted when the volume is
// in the middle of another operation.
func busy(v *stowagev1.Volume, err error) error {
	if err == nil {
		return nil
	}
	switch v.GetState() {
	case stowagev1.VolumeState_VOLUME_STATE_CREATING, stowagev1.VolumeState_VOLUME_STATE_SNAPSHOTTING,
		stowagev1.VolumeState_VOLUME_STATE_REVERT_SNAPSHOTTING, stowagev1.VolumeState_VOLUME_STATE_MIGRATING,
		stowagev1.VolumeState_VOLUME_STATE_RESIZING, stowagev1.VolumeState_VOLUME_STATE_COPYING,
		stowagev1.VolumeState_VOLUME_STATE_EXPUNGING:
		if errdefs.IsFailedPrecondition(err) || errdefs.IsConflict(err) {
			return fmt.Errorf("volume %s is busy (%s, job %s); retry when it is Ready: %w", v.GetName(), meta.VolumeStateName(v.GetState()), v.GetBusyJobId(), errdefs.ErrAborted)
		}
	}
	return err
}

// allows refuses, before any planning, an event the volume's state does not
// allow: ErrAborted while another job works on it, ErrFailedPrecondition
// otherwise.
func (s *Service) allows(v *stowagev1.Volume, event meta.VolumeEvent) error {
	if _, ok := s.db.Volumes().Machine().Next(v.GetState(), event); ok {
		return nil
	}
	return busy(v, fmt.Errorf("volume %s is %s; %s is not possible now: %w", v.GetName(), meta.VolumeStateName(v.GetState()), event, errdefs.ErrFailedPrecondition))
}

func checkSize(size int64, what string) error {
	if size <= 0 {
		return fmt.Errorf("%s size %d: a volume needs a positive size, e.g. --size 10G: %w", what, size, errdefs.ErrInvalid)
	}
	if size%512 != 0 {
		return fmt.Errorf("%s size %d is not a multiple of 512 bytes (try %d): %w", what, size, (size/512+1)*512, errdefs.ErrInvalid)
	}
	return nil
}

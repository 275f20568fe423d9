// Package snapshot is the controller's SnapshotService: take a snapshot on
// primary through the host (O(1) qcow2 external snapshot or reflink where
// the store allows), revert a volume to any of its snapshots, delete
// chain-aware (a snapshot whose file exactly one later snapshot or the
// volume reads through is merged out of the qcow2 chain, its child rebased
// onto its parent, so its space comes back (merge.go); one that several
// files read through, or that cannot be merged, is hidden, not lost, and
// removed or merged once it can be), and
// back snapshots up into an image store as content-addressed chunks with a
// manifest per backup: the first backup stores everything, later ones only
// the chunks that changed, zero chunks cost nothing.
package snapshot

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/endpoint"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/volume"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Job kinds of this service.
const (
	KindTake   = "snapshot.take"
	KindRevert = "snapshot.revert"
	KindDelete = "snapshot.delete"
	KindBackup = "snapshot.backup"
)

// Service implements SnapshotService.
type Service struct {
	db      *meta.DB
	stores  *datastore.Service
	volumes *volume.Service
	sel     *endpoint.Selector
	jobs    *jobs.Runner
	log     *slog.Logger
}

// New returns the snapshot service and registers its job handlers.
func New(db *meta.DB, stores *datastore.Service, volumes *volume.Service, sel *endpoint.Selector, runner *jobs.Runner, log *slog.Logger) *Service {
	s := &Service{db: db, stores: stores, volumes: volumes, sel: sel, jobs: runner, log: log}
	runner.Register(KindTake, takeHandler{s})
	runner.Register(KindRevert, revertHandler{s})
	runner.Register(KindDelete, deleteHandler{s})
	runner.Register(KindBackup, backupHandler{s})
	return s
}

// Get returns a snapshot and its copies.
func (s *Service) Get(ctx context.Context, id string) (*stowagev1.Snapshot, []*stowagev1.SnapshotOnStore, error) {
	if id == "" {
		return nil, nil, fmt.Errorf("a snapshot id is required: %w", errdefs.ErrInvalid)
	}
	sn, err := s.db.Snapshots().Get(ctx, id)
	if err != nil {
		return nil, nil, fmt.Errorf("snapshot %q: see `stowage snapshot list`: %w", id, err)
	}
	refs, err := s.db.SnapshotsOnStore().ListBy(ctx, meta.IndexSnapshotID, id)
	return sn, refs, err
}

// List returns up to limit snapshots (0: no limit) with ids after after,
// oldest first: those of one volume (id or name; all when volumeID is "")
// and, unless state is unspecified, in that state. It scans the volume's
// or the state's index and stops at limit.
func (s *Service) List(ctx context.Context, volumeID string, state stowagev1.SnapshotState, after string, limit int) ([]*stowagev1.Snapshot, error) {
	f := meta.Filter[*stowagev1.Snapshot]{After: after, Limit: limit}
	if state != stowagev1.SnapshotState_SNAPSHOT_STATE_UNSPECIFIED {
		f.Index, f.Value = meta.IndexState, meta.SnapshotStateName(state)
	}
	if volumeID != "" {
		v, err := s.volumes.Get(ctx, volumeID)
		if err != nil {
			return nil, err
		}
		f.Index, f.Value = meta.IndexVolumeID, v.GetId()
		if state != stowagev1.SnapshotState_SNAPSHOT_STATE_UNSPECIFIED {
			f.Where = func(sn *stowagev1.Snapshot) bool { return sn.GetState() == state }
		}
	}
	ss, err := s.db.Snapshots().List(ctx, f)
	if err != nil {
		return nil, fmt.Errorf("list snapshots: %w", err)
	}
	return ss, nil
}

func refOn(refs []*stowagev1.SnapshotOnStore, role stowagev1.StoreRole) *stowagev1.SnapshotOnStore {
	for _, r := range refs {
		if r.GetRole() == role && r.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY {
			return r
		}
	}
	return nil
}

// earlier returns the job an earlier request with idempotency key made
// (false when key is "", unused, or the request is a dry run, which
// writes nothing and so never returns a job).
func (s *Service) earlier(ctx context.Context, key string, dryRun bool) (*stowagev1.Job, bool, error) {
	if key == "" || dryRun {
		return nil, false, nil
	}
	job, err := s.jobs.ByIdempotencyKey(ctx, key)
	if errdefs.IsNotFound(err) {
		return nil, false, nil
	}
	return job, err == nil, err
}

func busy(v *stowagev1.Volume, err error) error {
	if err != nil && (errdefs.IsFailedPrecondition(err) || errdefs.IsConflict(err)) && v.GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
		return fmt.Errorf("volume %s is busy (%s, job %s); retry when it is Ready: %w", v.GetName(), meta.VolumeStateName(v.GetState()), v.GetBusyJobId(), errdefs.ErrAborted)
	}
	return err
}

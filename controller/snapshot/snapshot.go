// Package snapshot is the controller's SnapshotService: take a snapshot on
// primary through the host (O(1) qcow2 external snapshot or reflink where
// the store allows), revert a volume to any of its snapshots, delete
// chain-aware (a snapshot whose file a later snapshot or the volume still
// reads through is hidden, not lost, and removed once nothing needs it), and
// back snapshots up into an image store as content-addressed chunks with a
// manifest per backup: the first backup stores everything, later ones only
// the chunks that changed, zero chunks cost nothing.
package snapshot

import (
	"context"
	"fmt"
	"log/slog"
	"sort"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/endpoint"
	"github.com/stowage/stowage/controller/image"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/controller/volume"
	"github.com/stowage/stowage/drivers"
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

// ChunkSize is the backup chunk size.
const ChunkSize = 4 << 20

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

// List returns the snapshots of a volume (all when volumeID is ""), oldest first.
func (s *Service) List(ctx context.Context, volumeID string) ([]*stowagev1.Snapshot, error) {
	if volumeID != "" {
		v, err := s.volumes.Get(ctx, volumeID)
		if err != nil {
			return nil, err
		}
		return s.db.Snapshots().ListBy(ctx, meta.IndexVolumeID, v.GetId())
	}
	return s.db.Snapshots().List(ctx, meta.Filter[*stowagev1.Snapshot]{})
}

func refOn(refs []*stowagev1.SnapshotOnStore, role stowagev1.StoreRole) *stowagev1.SnapshotOnStore {
	for _, r := range refs {
		if r.GetRole() == role && r.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY {
			return r
		}
	}
	return nil
}

func busy(v *stowagev1.Volume, err error) error {
	if err != nil && (errdefs.IsFailedPrecondition(err) || errdefs.IsConflict(err)) && v.GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
		return fmt.Errorf("volume %s is busy (%s, job %s); retry when it is Ready: %w", v.GetName(), meta.VolumeStateName(v.GetState()), v.GetBusyJobId(), errdefs.ErrAborted)
	}
	return err
}

// Take plans and starts a snapshot of a volume.
func (s *Service) Take(ctx context.Context, req *stowagev1.TakeSnapshotRequest) (*stowagev1.TakeSnapshotResponse, error) {
	v, err := s.volumes.Get(ctx, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	name := req.GetName()
	if name == "" {
		name = v.GetName() + "-snap"
	}
	if err := image.CheckName("snapshot", name); err != nil {
		return nil, err
	}
	if v.GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
		return nil, busy(v, fmt.Errorf("volume %s is %s; snapshots are taken of Ready volumes: %w", v.GetName(), meta.VolumeStateName(v.GetState()), errdefs.ErrFailedPrecondition))
	}
	st, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return nil, err
	}
	ch, err := s.sel.Select(ctx, "", datastore.Scope(st))
	if err != nil {
		return nil, err
	}
	method, why := "copy", "a sparse copy: the store's filesystem cannot clone extents (not O(1))"
	switch {
	case v.GetFormat() == stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2:
		method, why = "qcow2-external", "O(1): the volume's file becomes the read-only snapshot, a new overlay takes its place"
	case st.GetDetails()["reflink"] == "true":
		method, why = "reflink", "O(1) extent clone on a reflink filesystem"
	}
	siblings, err := s.db.Snapshots().ListBy(ctx, meta.IndexVolumeID, v.GetId())
	if err != nil {
		return nil, err
	}
	parent := ""
	for _, sib := range siblings { // ids are time-ordered: the last one is the newest
		if sib.GetState() != stowagev1.SnapshotState_SNAPSHOT_STATE_DESTROYED {
			parent = sib.GetId()
		}
	}
	snap := &stowagev1.Snapshot{Id: meta.NewID(), VolumeId: v.GetId(), Name: name, ParentId: parent, Size: v.GetSize(), Method: method}
	key, err := s.locate(st, snap.GetId(), v)
	if err != nil {
		return nil, err
	}
	ref := &stowagev1.SnapshotOnStore{Id: meta.NewID(), SnapshotId: snap.GetId(), StoreId: st.GetId(), Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY,
		InstallPath: key, ParentRefId: v.GetHeadSnapshotRefId(), Size: v.GetSize()}
	plan := &stowagev1.Plan{Strategy: method, Priority: motion.Default.String(), Reasons: []string{why}, Steps: []*stowagev1.PlanStep{
		{Name: "snapshot", HostId: ch.HostID, Reason: fmt.Sprintf("snapshot %s of volume %s on store %s; %s", snap.GetId(), v.GetName(), st.GetName(), ch.Reason)}}}
	if method != "copy" {
		plan.Priority = motion.Highest.String()
	}
	if req.GetDryRun() {
		return &stowagev1.TakeSnapshotResponse{Snapshot: snap, Plan: plan}, nil
	}
	job := jobs.NewJob(KindTake, snap.GetId(), req.GetIdempotencyKey(), plan, nil)
	job, existing, err := s.jobs.Submit(ctx, job, func(tx *meta.Tx) error {
		if _, err := meta.Volumes.TransitionTx(tx, v.GetId(), v.GetRevision(), meta.VolumeSnapshotRequested, func(v *stowagev1.Volume) error {
			v.BusyJobId = job.GetId()
			return nil
		}); err != nil {
			return busy(v, err)
		}
		if _, err := meta.Snapshots.CreateTx(tx, snap); err != nil {
			return err
		}
		_, err := meta.SnapshotsOnStore.CreateTx(tx, ref)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("snapshot volume %s: %w", v.GetName(), err)
	}
	if existing {
		snap, _ = s.db.Snapshots().Get(ctx, job.GetTargetId())
	}
	return &stowagev1.TakeSnapshotResponse{Snapshot: snap, Job: job, Plan: job.GetPlan()}, nil
}

// locate returns the key snapshot id of volume v gets on store st (its
// driver's choice).
func (s *Service) locate(st *stowagev1.DataStore, id string, v *stowagev1.Volume) (string, error) {
	vol, err := volume.VolumeObject(st, v)
	if err != nil {
		return "", err
	}
	obj, err := s.stores.Locate(st, datastore.Object(st, drivers.ObjectSnapshot, id, vol.Format, v.GetSize(), ""))
	return obj.Key, err
}

// Revert plans and starts reverting a volume to a snapshot on primary.
func (s *Service) Revert(ctx context.Context, id string, dryRun bool) (*stowagev1.RevertSnapshotResponse, error) {
	sn, refs, err := s.Get(ctx, id)
	if err != nil {
		return nil, err
	}
	ref := refOn(refs, stowagev1.StoreRole_STORE_ROLE_PRIMARY)
	if ref == nil {
		return nil, fmt.Errorf("snapshot %s has no copy on primary to revert to; create a volume from its backup instead: %w", sn.GetId(), errdefs.ErrFailedPrecondition)
	}
	v, err := s.volumes.Get(ctx, sn.GetVolumeId())
	if err != nil {
		return nil, err
	}
	if v.GetStoreId() != ref.GetStoreId() {
		return nil, fmt.Errorf("volume %s moved to another store since snapshot %s: %w", v.GetName(), sn.GetId(), errdefs.ErrFailedPrecondition)
	}
	st, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return nil, err
	}
	ch, err := s.sel.Select(ctx, "", datastore.Scope(st))
	if err != nil {
		return nil, err
	}
	plan := &stowagev1.Plan{Strategy: "revert-" + sn.GetMethod(), Priority: motion.Default.String(), Steps: []*stowagev1.PlanStep{
		{Name: "revert", HostId: ch.HostID, Reason: fmt.Sprintf("make %s read %s; later snapshots stay valid; %s", v.GetInstallPath(), ref.GetInstallPath(), ch.Reason)}}}
	if dryRun {
		return &stowagev1.RevertSnapshotResponse{Plan: plan}, nil
	}
	job := jobs.NewJob(KindRevert, sn.GetId(), "", plan, &stowagev1.JobParams{Kind: &stowagev1.JobParams_SnapshotRevert{SnapshotRevert: &stowagev1.SnapshotRevertParams{RefId: ref.GetId()}}})
	job, _, err = s.jobs.Submit(ctx, job, func(tx *meta.Tx) error {
		_, err := meta.Volumes.TransitionTx(tx, v.GetId(), v.GetRevision(), meta.VolumeRevertSnapshotRequested, func(v *stowagev1.Volume) error {
			v.BusyJobId = job.GetId()
			return nil
		})
		return busy(v, err)
	})
	if err != nil {
		return nil, err
	}
	return &stowagev1.RevertSnapshotResponse{Job: job, Plan: plan}, nil
}

// Backup plans and starts backing a snapshot up into an image store.
func (s *Service) Backup(ctx context.Context, req *stowagev1.BackupSnapshotRequest) (*stowagev1.BackupSnapshotResponse, error) {
	sn, refs, err := s.Get(ctx, req.GetId())
	if err != nil {
		return nil, err
	}
	src := refOn(refs, stowagev1.StoreRole_STORE_ROLE_PRIMARY)
	if src == nil {
		return nil, fmt.Errorf("snapshot %s has no copy on primary to back up: %w", sn.GetId(), errdefs.ErrFailedPrecondition)
	}
	if _, ok := s.db.Snapshots().Machine().Next(sn.GetState(), meta.SnapshotBackupRequested); !ok {
		return nil, fmt.Errorf("snapshot %s is %s; it can be backed up when CreatedOnPrimary or BackedUp: %w", sn.GetId(), meta.SnapshotStateName(sn.GetState()), errdefs.ErrFailedPrecondition)
	}
	primary, err := s.db.Stores().Get(ctx, src.GetStoreId())
	if err != nil {
		return nil, err
	}
	parent, parentStore, err := s.parentBackup(ctx, sn)
	if err != nil {
		return nil, err
	}
	plan := &stowagev1.Plan{Strategy: "chunked-backup", Priority: motion.Default.String()}
	var img *stowagev1.DataStore
	switch {
	case req.GetStoreId() != "":
		if img, err = s.stores.UpStore(ctx, req.GetStoreId(), stowagev1.StoreRole_STORE_ROLE_IMAGE); err != nil {
			return nil, err
		}
		plan.Reasons = append(plan.Reasons, "store "+img.GetName()+": asked for")
		if parentStore != nil && parentStore.GetId() != img.GetId() {
			parent = nil
			plan.Reasons = append(plan.Reasons, "the parent backup is on another store: this one is full")
		}
	case parentStore != nil:
		img = parentStore
		plan.Reasons = append(plan.Reasons, "store "+img.GetName()+": holds the parent backup, so only changed chunks move")
	default:
		var reasons []string
		if img, reasons, err = s.stores.PickStore(ctx, stowagev1.StoreRole_STORE_ROLE_IMAGE, primary.GetScope().GetZone(), 0); err != nil {
			return nil, err
		}
		plan.Reasons = append(plan.Reasons, reasons...)
	}
	kind := stowagev1.SnapshotKind_SNAPSHOT_KIND_FULL
	if parent != nil {
		kind = stowagev1.SnapshotKind_SNAPSHOT_KIND_INCREMENTAL
		plan.Reasons = append(plan.Reasons, "incremental against the backup of snapshot "+parent.GetSnapshotId())
	} else {
		plan.Reasons = append(plan.Reasons, "full: no earlier backup of this volume on that store")
	}
	ch, err := s.sel.Select(ctx, "", datastore.Scope(primary), datastore.Scope(img))
	if err != nil {
		return nil, fmt.Errorf("a backup needs a host that reaches primary store %s and image store %s: %w", primary.GetName(), img.GetName(), err)
	}
	sv, err := s.db.Volumes().Get(ctx, sn.GetVolumeId())
	if err != nil {
		return nil, fmt.Errorf("volume of snapshot %s: %w", sn.GetId(), err)
	}
	key, err := s.locate(img, sn.GetId(), sv)
	if err != nil {
		return nil, err
	}
	ref := &stowagev1.SnapshotOnStore{Id: meta.NewID(), SnapshotId: sn.GetId(), StoreId: img.GetId(), Role: stowagev1.StoreRole_STORE_ROLE_IMAGE,
		InstallPath: key, Size: sn.GetSize()}
	if parent != nil {
		ref.ParentRefId = parent.GetId()
	}
	plan.Steps = []*stowagev1.PlanStep{{Name: "backup", HostId: ch.HostID, Reason: fmt.Sprintf("chunk snapshot %s into the backups of store %s (%s provider; 4 MiB sha256 chunks, zero chunks skipped); %s",
		sn.GetId(), img.GetName(), img.GetProvider(), ch.Reason)}}
	if req.GetDryRun() {
		return &stowagev1.BackupSnapshotResponse{Plan: plan}, nil
	}
	job := jobs.NewJob(KindBackup, sn.GetId(), req.GetIdempotencyKey(), plan, &stowagev1.JobParams{Kind: &stowagev1.JobParams_SnapshotBackup{SnapshotBackup: &stowagev1.SnapshotBackupParams{
		RefId: ref.GetId(), SrcRefId: src.GetId(), Kind: kind}}})
	job, _, err = s.jobs.Submit(ctx, job, func(tx *meta.Tx) error {
		if _, err := meta.Snapshots.TransitionTx(tx, sn.GetId(), sn.GetRevision(), meta.SnapshotBackupRequested, nil); err != nil {
			return err
		}
		_, err := meta.SnapshotsOnStore.CreateTx(tx, ref)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("back up snapshot %s: %w", sn.GetId(), err)
	}
	return &stowagev1.BackupSnapshotResponse{Job: job, Plan: job.GetPlan()}, nil
}

// parentBackup finds the newest Ready backup of an earlier snapshot of the
// same volume.
func (s *Service) parentBackup(ctx context.Context, sn *stowagev1.Snapshot) (*stowagev1.SnapshotOnStore, *stowagev1.DataStore, error) {
	sibs, err := s.db.Snapshots().ListBy(ctx, meta.IndexVolumeID, sn.GetVolumeId())
	if err != nil {
		return nil, nil, err
	}
	sort.Slice(sibs, func(i, j int) bool { return sibs[i].GetId() > sibs[j].GetId() })
	for _, sib := range sibs {
		if sib.GetId() >= sn.GetId() {
			continue
		}
		refs, err := s.db.SnapshotsOnStore().ListBy(ctx, meta.IndexSnapshotID, sib.GetId())
		if err != nil {
			return nil, nil, err
		}
		if r := refOn(refs, stowagev1.StoreRole_STORE_ROLE_IMAGE); r != nil {
			st, err := s.db.Stores().Get(ctx, r.GetStoreId())
			if err == nil && st.GetState() == stowagev1.StoreState_STORE_STATE_UP {
				return r, st, nil
			}
		}
	}
	return nil, nil, nil
}

// Delete plans and starts deleting a snapshot (chain-aware).
func (s *Service) Delete(ctx context.Context, id string, dryRun bool) (*stowagev1.DeleteSnapshotResponse, error) {
	sn, refs, err := s.Get(ctx, id)
	if err != nil {
		return nil, err
	}
	if _, ok := s.db.Snapshots().Machine().Next(sn.GetState(), meta.SnapshotDestroyRequested); !ok && sn.GetState() != stowagev1.SnapshotState_SNAPSHOT_STATE_DESTROYING {
		return nil, fmt.Errorf("snapshot %s is %s; wait for its job: %w", sn.GetId(), meta.SnapshotStateName(sn.GetState()), errdefs.ErrAborted)
	}
	plan := &stowagev1.Plan{Strategy: "chain-aware-delete", Priority: motion.Default.String()}
	for _, r := range refs {
		if r.GetRole() == stowagev1.StoreRole_STORE_ROLE_PRIMARY {
			if needed, by, err := s.needed(ctx, r); err != nil {
				return nil, err
			} else if needed {
				plan.Reasons = append(plan.Reasons, fmt.Sprintf("the copy on primary is read through by %s: it is hidden, and removed when nothing needs it", by))
				continue
			}
		}
		plan.Steps = append(plan.Steps, &stowagev1.PlanStep{Name: "delete-" + r.GetId(), Reason: "remove " + r.GetInstallPath() + " from store " + r.GetStoreId()})
	}
	if dryRun {
		return &stowagev1.DeleteSnapshotResponse{Plan: plan}, nil
	}
	job, _, err := s.jobs.Submit(ctx, jobs.NewJob(KindDelete, sn.GetId(), "", plan, nil), nil)
	if err != nil {
		return nil, err
	}
	return &stowagev1.DeleteSnapshotResponse{Job: job, Plan: plan}, nil
}

// needed reports whether another file reads through the primary copy r
// (a later snapshot in the qcow2 chain, or the volume's overlay).
func (s *Service) needed(ctx context.Context, r *stowagev1.SnapshotOnStore) (bool, string, error) {
	kids, err := s.db.SnapshotsOnStore().List(ctx, meta.Filter[*stowagev1.SnapshotOnStore]{Where: func(o *stowagev1.SnapshotOnStore) bool {
		return o.GetParentRefId() == r.GetId() && o.GetRole() == stowagev1.StoreRole_STORE_ROLE_PRIMARY && o.GetState() != stowagev1.ObjectState_OBJECT_STATE_DESTROYED
	}})
	if err != nil {
		return false, "", err
	}
	if len(kids) > 0 {
		return true, "snapshot " + kids[0].GetSnapshotId(), nil
	}
	vols, err := s.db.Volumes().List(ctx, meta.Filter[*stowagev1.Volume]{Where: func(v *stowagev1.Volume) bool {
		return v.GetHeadSnapshotRefId() == r.GetId()
	}})
	if err != nil {
		return false, "", err
	}
	if len(vols) > 0 {
		return true, "volume " + vols[0].GetName(), nil
	}
	return false, "", nil
}

package snapshot

import (
	"context"
	"errors"
	"fmt"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/image"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/controller/volume"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

type takeHandler struct{ s *Service }

func (h takeHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	sn, refs, err := s.Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	if sn.GetState() == stowagev1.SnapshotState_SNAPSHOT_STATE_CREATED_ON_PRIMARY {
		return nil
	}
	if len(refs) != 1 {
		return fmt.Errorf("snapshot %s: expected one primary copy, have %d: %w", sn.GetId(), len(refs), errdefs.ErrInternal)
	}
	ref := refs[0]
	v, err := s.db.Volumes().Get(ctx, sn.GetVolumeId())
	if err != nil {
		return err
	}
	st, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return err
	}
	if sn.GetState() == stowagev1.SnapshotState_SNAPSHOT_STATE_ALLOCATED {
		if _, err := s.db.Snapshots().Transition(ctx, sn.GetId(), meta.SnapshotCreateRequested, nil); err != nil {
			return err
		}
	}
	if ref.GetState() == stowagev1.ObjectState_OBJECT_STATE_ALLOCATED {
		if ref, err = s.db.SnapshotsOnStore().Transition(ctx, ref.GetId(), meta.ObjectCreateRequested, nil); err != nil {
			return err
		}
	}
	var info drivers.ObjectInfo
	if err := jobs.RunStep(ctx, job, rep, "snapshot", func(ctx context.Context) error {
		snap, pd, err := s.snapshotOf(ctx, st, v, ref)
		if err != nil {
			return err
		}
		info, err = pd.TakeSnapshot(drivers.WithHost(ctx, jobs.PlanHost(job, "snapshot")), snap)
		return err
	}); err != nil {
		return err
	}
	return s.db.Txn(ctx, func(tx *meta.Tx) error {
		if _, err := meta.SnapshotsOnStore.TransitionTx(tx, ref.GetId(), 0, meta.ObjectOperationSucceeded, func(r *stowagev1.SnapshotOnStore) error {
			r.Size, r.PhysicalSize = info.Size, info.PhysicalSize
			return nil
		}); err != nil {
			return err
		}
		if _, err := meta.Snapshots.TransitionTx(tx, sn.GetId(), 0, meta.SnapshotOperationSucceeded, func(s *stowagev1.Snapshot) error {
			s.Method, s.Size = info.Method, info.Size
			return nil
		}); err != nil {
			return err
		}
		_, err := meta.Volumes.TransitionTx(tx, v.GetId(), 0, meta.VolumeOperationSucceeded, func(v *stowagev1.Volume) error {
			v.BusyJobId = ""
			if info.Method == "qcow2-external" {
				v.HeadSnapshotRefId = ref.GetId()
			}
			return nil
		})
		return err
	})
}

// Fail: the snapshot is Error and its copy record gone (as CloudStack's
// tests demand: no ref row left behind); the volume is Ready again.
func (h takeHandler) Fail(ctx context.Context, job *stowagev1.Job, cause error) error {
	s := h.s
	sn, refs, err := s.Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	switch sn.GetState() {
	case stowagev1.SnapshotState_SNAPSHOT_STATE_ALLOCATED, stowagev1.SnapshotState_SNAPSHOT_STATE_CREATING:
	default:
		// The take finished (its last transaction committed) and the job
		// was cancelled or failed only after that, e.g. cancelled while a
		// restarted controller had not resumed it yet: the snapshot, its
		// copy and the volume's head stay as they are.
		return releaseVolume(ctx, s.db, sn.GetVolumeId(), job, cause)
	}
	var errs []error
	for _, r := range refs {
		errs = append(errs, s.db.SnapshotsOnStore().Delete(ctx, r.GetId(), 0))
	}
	if sn.GetState() == stowagev1.SnapshotState_SNAPSHOT_STATE_ALLOCATED {
		_, err = s.db.Snapshots().Transition(ctx, sn.GetId(), meta.SnapshotCreateRequested, nil)
		errs = append(errs, err)
	}
	_, err = s.db.Snapshots().Transition(ctx, sn.GetId(), meta.SnapshotOperationFailed, func(s *stowagev1.Snapshot) error {
		s.Error = cause.Error()
		return nil
	})
	errs = append(errs, err)
	errs = append(errs, releaseVolume(ctx, s.db, sn.GetVolumeId(), job, cause))
	return errors.Join(errs...)
}

// releaseVolume puts volume id back to Ready after job failed, unless
// another job holds it now (the volume was released by job's own last
// step and taken since): that job's work must not be cut short.
func releaseVolume(ctx context.Context, db *meta.DB, id string, job *stowagev1.Job, cause error) error {
	v, err := db.Volumes().Get(ctx, id)
	if err != nil {
		return err
	}
	if v.GetBusyJobId() != "" && v.GetBusyJobId() != job.GetId() {
		return nil
	}
	return volume.BackToReady(ctx, db, id, cause)
}

// snapshotOf returns snapshot copy ref of volume v (on primary store st)
// as its driver sees it, and that driver.
func (s *Service) snapshotOf(ctx context.Context, st *stowagev1.DataStore, v *stowagev1.Volume, ref *stowagev1.SnapshotOnStore) (drivers.SnapshotObject, drivers.PrimaryDriver, error) {
	pd, err := s.stores.Primary(st)
	if err != nil {
		return drivers.SnapshotObject{}, nil, err
	}
	vol, err := volume.VolumeObject(st, v)
	if err != nil {
		return drivers.SnapshotObject{}, nil, err
	}
	obj := datastore.Object(st, drivers.ObjectSnapshot, ref.GetSnapshotId(), vol.Format, v.GetSize(), ref.GetInstallPath())
	parent := ""
	if p, err := s.db.SnapshotsOnStore().Get(ctx, ref.GetParentRefId()); err == nil {
		parent = p.GetSnapshotId()
	}
	return drivers.SnapshotObject{DataObject: obj, Volume: vol, Parent: parent}, pd, nil
}

// Take plans and starts a snapshot of a volume.
func (s *Service) Take(ctx context.Context, req *stowagev1.TakeSnapshotRequest) (*stowagev1.TakeSnapshotResponse, error) {
	// A retry with the key of an earlier request returns its job before
	// any check: the volume that job made busy must not refuse it.
	if job, ok, err := s.earlier(ctx, req.GetIdempotencyKey(), req.GetDryRun()); err != nil || ok {
		if err != nil {
			return nil, err
		}
		snap, err := s.db.Snapshots().Get(ctx, job.GetTargetId())
		if err != nil && !errdefs.IsNotFound(err) {
			return nil, err
		}
		return &stowagev1.TakeSnapshotResponse{Snapshot: snap, Job: job, Plan: job.GetPlan()}, nil
	}
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
	ch, err := s.sel.Select(s.stores.WithNeeds(ctx, st), "", datastore.Scope(st))
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

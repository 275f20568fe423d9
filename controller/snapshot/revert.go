package snapshot

import (
	"context"
	"fmt"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/controller/volume"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

type revertHandler struct{ s *Service }

func (h revertHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	sn, err := s.db.Snapshots().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	ref, err := s.db.SnapshotsOnStore().Get(ctx, job.GetJobParams().GetSnapshotRevert().GetRefId())
	if err != nil {
		return err
	}
	v, err := s.db.Volumes().Get(ctx, sn.GetVolumeId())
	if err != nil {
		return err
	}
	if volume.Released(v, job) {
		// Resumed after the transaction that ended the revert committed (it
		// let the volume go): it is done.
		rep.Result("volume %s reverted to snapshot %s", v.GetName(), sn.GetId())
		return nil
	}
	st, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return err
	}
	if err := jobs.RunStep(ctx, job, rep, "revert", func(ctx context.Context) error {
		snap, pd, err := s.snapshotOf(ctx, st, v, ref)
		if err != nil {
			return err
		}
		return pd.RevertSnapshot(drivers.WithHost(ctx, jobs.PlanHost(job, "revert")), snap)
	}); err != nil {
		return err
	}
	_, err = s.db.Volumes().Transition(ctx, v.GetId(), meta.VolumeOperationSucceeded, func(v *stowagev1.Volume) error {
		v.BusyJobId, v.Error = "", ""
		if sn.GetMethod() == "qcow2-external" {
			v.HeadSnapshotRefId = ref.GetId()
		}
		return nil
	})
	rep.Result("volume %s reverted to snapshot %s", v.GetName(), sn.GetId())
	return err
}

func (h revertHandler) Fail(ctx context.Context, job *stowagev1.Job, cause error) error {
	sn, err := h.s.db.Snapshots().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	return releaseVolume(ctx, h.s.db, sn.GetVolumeId(), job, cause)
}

// Revert plans and starts reverting a volume to a snapshot on primary.
func (s *Service) Revert(ctx context.Context, id string, dryRun bool) (*stowagev1.RevertSnapshotResponse, error) {
	sn, refs, err := s.Get(ctx, id)
	if err != nil {
		return nil, err
	}
	switch sn.GetState() {
	case stowagev1.SnapshotState_SNAPSHOT_STATE_DESTROYING, stowagev1.SnapshotState_SNAPSHOT_STATE_DESTROYED:
		// Its delete job removes the copies one by one: the primary one
		// may still be Ready, but the volume must not come to read a file
		// that is about to go.
		return nil, fmt.Errorf("snapshot %s is %s: it is being deleted: %w", sn.GetId(), meta.SnapshotStateName(sn.GetState()), errdefs.ErrFailedPrecondition)
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
	ch, err := s.sel.Select(s.stores.WithNeeds(ctx, st), "", datastore.Scope(st))
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

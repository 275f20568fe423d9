package volume

import (
	"context"
	"fmt"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

type resizeHandler struct{ s *Service }

func (h resizeHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	v, err := s.db.Volumes().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	size := job.GetJobParams().GetVolumeResize().GetSizeBytes()
	if Released(v, job) {
		rep.Result("volume %s is now %d bytes", v.GetName(), v.GetSize())
		return nil
	}
	st, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return err
	}
	var info drivers.ObjectInfo
	if err := jobs.RunStep(ctx, job, rep, "resize", func(ctx context.Context) error {
		rz, err := datastore.Capability[drivers.Resizer](s.stores, st, "resize volumes")
		if err != nil {
			return err
		}
		obj, err := VolumeObject(st, v)
		if err != nil {
			return err
		}
		info, err = rz.Resize(drivers.WithHost(ctx, jobs.PlanHost(job, "resize")), obj, size)
		return err
	}); err != nil {
		return err
	}
	_, err = s.db.Volumes().Transition(ctx, v.GetId(), meta.VolumeOperationSucceeded, func(v *stowagev1.Volume) error {
		v.Size, v.BusyJobId = info.Size, ""
		return nil
	})
	rep.Result("volume %s is now %d bytes", v.GetName(), info.Size)
	return err
}

func (h resizeHandler) Fail(ctx context.Context, job *stowagev1.Job, cause error) error {
	return BackToReady(ctx, h.s.db, job.GetTargetId(), cause)
}

// Released says whether job's last transaction on v has committed: a
// job that holds a volume (Resizing, Migrating, Snapshotting, Reverting)
// lets it go, Ready, in the transaction that records its end, so a job
// resumed after a crash that finds it so has nothing left to do.
func Released(v *stowagev1.Volume, job *stowagev1.Job) bool {
	return v.GetState() == stowagev1.VolumeState_VOLUME_STATE_READY && v.GetBusyJobId() != job.GetId()
}

// BackToReady ends a failed Resizing/Migrating/Snapshotting/Reverting:
// the volume is as it was, Ready, with the error noted.
func BackToReady(ctx context.Context, db *meta.DB, id string, cause error) error {
	v, err := db.Volumes().Get(ctx, id)
	if err != nil {
		return err
	}
	if v.GetState() == stowagev1.VolumeState_VOLUME_STATE_READY {
		return nil
	}
	_, err = db.Volumes().Transition(ctx, id, meta.VolumeOperationFailed, func(v *stowagev1.Volume) error {
		v.Error, v.BusyJobId = cause.Error(), ""
		return nil
	})
	return err
}

// Resize grows a volume.
func (s *Service) Resize(ctx context.Context, idOrName string, size int64, dryRun bool) (*stowagev1.ResizeVolumeResponse, error) {
	v, err := s.Get(ctx, idOrName)
	if err != nil {
		return nil, err
	}
	if err := checkSize(size, "new"); err != nil {
		return nil, err
	}
	if err := s.allows(v, meta.VolumeResizeRequested); err != nil {
		return nil, err
	}
	if size < v.GetSize() {
		return nil, fmt.Errorf("volume %s is %d bytes; shrinking to %d would lose data and is refused: %w", v.GetName(), v.GetSize(), size, errdefs.ErrInvalid)
	}
	st, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return nil, err
	}
	ch, err := s.sel.Select(s.stores.WithNeeds(ctx, st), "", datastore.Scope(st))
	if err != nil {
		return nil, err
	}
	plan := &stowagev1.Plan{Strategy: "resize", Priority: motion.Default.String(),
		Steps: []*stowagev1.PlanStep{{Name: "resize", HostId: ch.HostID, Reason: fmt.Sprintf("grow %s to %d bytes; %s", v.GetInstallPath(), size, ch.Reason)}}}
	if dryRun {
		return &stowagev1.ResizeVolumeResponse{Volume: v, Plan: plan}, nil
	}
	job := jobs.NewJob(KindResize, v.GetId(), "", plan, &stowagev1.JobParams{Kind: &stowagev1.JobParams_VolumeResize{VolumeResize: &stowagev1.VolumeResizeParams{SizeBytes: size}}})
	job, _, err = s.jobs.Submit(ctx, job, func(tx *meta.Tx) error {
		_, err := meta.Volumes.TransitionTx(tx, v.GetId(), v.GetRevision(), meta.VolumeResizeRequested, func(v *stowagev1.Volume) error {
			v.BusyJobId = job.GetId()
			return nil
		})
		return busy(v, err)
	})
	if err != nil {
		return nil, err
	}
	v, _ = s.db.Volumes().Get(ctx, v.GetId())
	return &stowagev1.ResizeVolumeResponse{Volume: v, Job: job, Plan: plan}, nil
}

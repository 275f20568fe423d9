package volume

import (
	"context"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

type deleteHandler struct{ s *Service }

func (h deleteHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	v, err := s.db.Volumes().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	if v.GetState() == stowagev1.VolumeState_VOLUME_STATE_EXPUNGED {
		// Resumed after the transaction that ended the work committed (a
		// crash before the job's own end was recorded): nothing is left.
		return nil
	}
	if v.GetState() == stowagev1.VolumeState_VOLUME_STATE_DESTROY {
		if v, err = s.db.Volumes().Transition(ctx, v.GetId(), meta.VolumeExpungeRequested, nil); err != nil {
			return err
		}
	}
	st, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return err
	}
	refs, err := s.primarySnapshots(ctx, v)
	if err != nil {
		return err
	}
	err = jobs.RunStep(ctx, job, rep, "expunge", func(ctx context.Context) error {
		ctx = drivers.WithHost(ctx, jobs.PlanHost(job, "expunge"))
		d, err := s.stores.Driver(st)
		if err != nil {
			return err
		}
		obj, err := VolumeObject(st, v)
		if err != nil {
			return err
		}
		if err := d.Delete(ctx, obj); err != nil {
			return err
		}
		for _, r := range refs {
			so, err := s.SnapshotObject(ctx, st, r)
			if err != nil {
				return err
			}
			if err := d.Delete(ctx, so); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return s.db.Txn(ctx, func(tx *meta.Tx) error {
		for _, r := range refs {
			if err := meta.SnapshotsOnStore.DeleteTx(tx, r.GetId(), 0); err != nil && !errdefs.IsNotFound(err) {
				return err
			}
			if err := retireSnapshotTx(tx, r.GetSnapshotId()); err != nil {
				return err
			}
		}
		if v.GetBaseRefId() != "" {
			if _, err := meta.TemplatesOnStore.UpdateTx(tx, v.GetBaseRefId(), 0, func(r *stowagev1.TemplateOnStore) error {
				if r.RefCount > 0 {
					r.RefCount--
				}
				r.LastUsed = timestamppb.Now()
				return nil
			}); err != nil && !errdefs.IsNotFound(err) {
				return err
			}
		}
		_, err := meta.Volumes.TransitionTx(tx, v.GetId(), 0, meta.VolumeOperationSucceeded, func(v *stowagev1.Volume) error {
			v.BusyJobId, v.BaseRefId, v.HeadSnapshotRefId = "", "", ""
			return nil
		})
		return err
	})
}

// retireSnapshotTx ends a snapshot whose primary copy is gone: with a
// backup it stays (it can still make volumes), without one its record goes.
func retireSnapshotTx(tx *meta.Tx, snapID string) error {
	sn, err := meta.Snapshots.GetTx(tx, snapID)
	if errdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	refs, err := meta.SnapshotsOnStore.ListTx(tx, meta.Filter[*stowagev1.SnapshotOnStore]{Index: meta.IndexSnapshotID, Value: snapID})
	if err != nil {
		return err
	}
	for _, r := range refs {
		if r.GetRole() != stowagev1.StoreRole_STORE_ROLE_PRIMARY {
			return nil // a backup remains: the snapshot can still make volumes
		}
	}
	return meta.Snapshots.DeleteTx(tx, sn.GetId(), 0)
}

func (h deleteHandler) Fail(ctx context.Context, job *stowagev1.Job, cause error) error {
	// Expunging -> Destroy: the volume is still deleted to its user and a
	// second delete retries the expunge (CloudStack leaves it to a cleanup
	// thread).
	v, err := h.s.db.Volumes().Get(ctx, job.GetTargetId())
	if err != nil || v.GetState() != stowagev1.VolumeState_VOLUME_STATE_EXPUNGING {
		return err
	}
	_, err = h.s.db.Volumes().Transition(ctx, v.GetId(), meta.VolumeOperationFailed, func(v *stowagev1.Volume) error {
		v.Error, v.BusyJobId = "expunge failed: "+cause.Error(), ""
		return nil
	})
	return err
}

// Delete destroys and expunges a volume; its snapshots on primary go with
// it (their backups stay), and a cached template it was linked to loses a
// reference.
func (s *Service) Delete(ctx context.Context, idOrName string, dryRun bool) (*stowagev1.DeleteVolumeResponse, error) {
	v, err := s.Get(ctx, idOrName)
	if err != nil {
		return nil, err
	}
	if v.GetState() != stowagev1.VolumeState_VOLUME_STATE_DESTROY {
		if err := s.allows(v, meta.VolumeDestroyRequested); err != nil {
			return nil, err
		}
	}
	st, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return nil, err
	}
	plan := &stowagev1.Plan{Strategy: "expunge", Priority: motion.Default.String()}
	ch, err := s.sel.Select(s.stores.WithNeeds(ctx, st), "", datastore.Scope(st))
	if err != nil {
		return nil, err
	}
	plan.Steps = append(plan.Steps, &stowagev1.PlanStep{Name: "expunge", HostId: ch.HostID, Reason: "remove " + v.GetInstallPath() + " and the volume's snapshots on primary; " + ch.Reason})
	if dryRun {
		return &stowagev1.DeleteVolumeResponse{Plan: plan}, nil
	}
	job := jobs.NewJob(KindDelete, v.GetId(), "", plan, nil)
	job, _, err = s.jobs.Submit(ctx, job, func(tx *meta.Tx) error {
		if v.GetState() == stowagev1.VolumeState_VOLUME_STATE_DESTROY {
			return nil
		}
		_, err := meta.Volumes.TransitionTx(tx, v.GetId(), v.GetRevision(), meta.VolumeDestroyRequested, func(v *stowagev1.Volume) error {
			v.BusyJobId = job.GetId()
			return nil
		})
		return busy(v, err)
	})
	if err != nil {
		return nil, err
	}
	return &stowagev1.DeleteVolumeResponse{Job: job, Plan: plan}, nil
}

func (s *Service) primarySnapshots(ctx context.Context, v *stowagev1.Volume) ([]*stowagev1.SnapshotOnStore, error) {
	snaps, err := s.db.Snapshots().ListBy(ctx, meta.IndexVolumeID, v.GetId())
	if err != nil {
		return nil, err
	}
	var out []*stowagev1.SnapshotOnStore
	for _, sn := range snaps {
		refs, err := s.db.SnapshotsOnStore().ListBy(ctx, meta.IndexSnapshotID, sn.GetId())
		if err != nil {
			return nil, err
		}
		for _, r := range refs {
			if r.GetRole() == stowagev1.StoreRole_STORE_ROLE_PRIMARY && r.GetState() != stowagev1.ObjectState_OBJECT_STATE_DESTROYED {
				out = append(out, r)
			}
		}
	}
	return out, nil
}

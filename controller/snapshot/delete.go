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

type deleteHandler struct{ s *Service }

func (h deleteHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	sn, refs, err := s.Get(ctx, job.GetTargetId())
	if err != nil {
		if errdefs.IsNotFound(err) {
			// Resumed after the snapshot's record went (a crash before the
			// job's end was recorded): a volume it merged into may still
			// be held.
			return s.letGoAll(ctx, job)
		}
		return err
	}
	hidden, why, err := s.release(ctx, job, rep, sn, refs)
	if err != nil {
		return err
	}
	if hidden {
		// Keep every copy: the primary one is read through, and a backup of
		// a hidden snapshot still restores.
		if sn.GetState() != stowagev1.SnapshotState_SNAPSHOT_STATE_HIDDEN {
			if _, err := s.db.Snapshots().Transition(ctx, sn.GetId(), meta.SnapshotHide, nil); err != nil {
				return err
			}
		}
		rep.Result("snapshot %s hidden: %s", sn.GetId(), why)
		return nil
	}
	// The job's result is about the snapshot asked for, set last: removing
	// the hidden ones it let go reports its own steps' results first.
	if err := s.collectHidden(ctx, job, rep, sn.GetVolumeId()); err != nil {
		return err
	}
	if why != "" {
		rep.Result("snapshot %s deleted, merged out of its chain: %s", sn.GetId(), why)
	} else {
		rep.Result("snapshot %s deleted", sn.GetId())
	}
	if err := s.letGoAll(ctx, job); err != nil {
		return err
	}
	return nil
}

// letGoAll puts every volume job holds back to Ready.
func (s *Service) letGoAll(ctx context.Context, job *stowagev1.Job) error {
	vols, err := s.db.Volumes().List(ctx, meta.Filter[*stowagev1.Volume]{Where: func(v *stowagev1.Volume) bool {
		return v.GetBusyJobId() == job.GetId()
	}})
	if err != nil {
		return err
	}
	for _, v := range vols {
		if err := s.letGo(ctx, job, v.GetId()); err != nil {
			return err
		}
	}
	return nil
}

// release merges snapshot sn out of its chain where another file reads
// through its primary copy and that can be merged (see merge.go), then
// destroys it; it reports hidden, with the reason, when the primary copy is
// still needed and stays, and otherwise how it was merged ("" if it was not).
func (s *Service) release(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, sn *stowagev1.Snapshot, refs []*stowagev1.SnapshotOnStore) (bool, string, error) {
	how := ""
	for _, r := range refs {
		if r.GetRole() != stowagev1.StoreRole_STORE_ROLE_PRIMARY {
			continue
		}
		needed, by, err := s.needed(ctx, r)
		if err != nil || !needed {
			if err != nil {
				return false, "", err
			}
			continue
		}
		t, why, err := s.mergeTargetOf(ctx, job, sn, r)
		if err != nil {
			return false, "", err
		}
		if t == nil {
			return true, fmt.Sprintf("%s still reads through it and it cannot be merged: %s", by, why), nil
		}
		merged, err := s.merge(ctx, job, rep, sn, r, t)
		if err != nil {
			return false, "", err
		}
		if !merged {
			return true, by + " still reads through it and is in use or busy", nil
		}
		how = t.String()
	}
	if err := s.destroy(ctx, job, rep, sn, refs); err != nil {
		return false, "", err
	}
	return false, how, s.letGo(ctx, job, sn.GetVolumeId())
}

// collectHidden deletes hidden snapshots of a volume nothing needs any more
// (walking up the chain as children go).
func (s *Service) collectHidden(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, volumeID string) error {
	for progress := true; progress; {
		progress = false
		sibs, err := s.db.Snapshots().ListBy(ctx, meta.IndexVolumeID, volumeID)
		if err != nil {
			return err
		}
		for _, sib := range sibs {
			if sib.GetState() != stowagev1.SnapshotState_SNAPSHOT_STATE_HIDDEN {
				continue
			}
			refs, err := s.db.SnapshotsOnStore().ListBy(ctx, meta.IndexSnapshotID, sib.GetId())
			if err != nil {
				return err
			}
			hidden, _, err := s.release(ctx, job, rep, sib, refs)
			if err != nil {
				return err
			}
			progress = progress || !hidden
		}
	}
	return nil
}

// destroy moves a snapshot through Destroying to Destroyed, removing its
// copies, then drops its record.
func (s *Service) destroy(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, sn *stowagev1.Snapshot, refs []*stowagev1.SnapshotOnStore) error {
	if sn.GetState() == stowagev1.SnapshotState_SNAPSHOT_STATE_DESTROYED {
		// Resumed after its copies went and before its record did.
		if err := s.db.Snapshots().Delete(ctx, sn.GetId(), 0); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		return nil
	}
	if sn.GetState() != stowagev1.SnapshotState_SNAPSHOT_STATE_DESTROYING {
		var err error
		if sn, err = s.db.Snapshots().Transition(ctx, sn.GetId(), meta.SnapshotDestroyRequested, nil); err != nil {
			return err
		}
	}
	for _, r := range refs {
		if err := s.deleteRef(ctx, job, rep, r); err != nil {
			return err
		}
	}
	if _, err := s.db.Snapshots().Transition(ctx, sn.GetId(), meta.SnapshotOperationSucceeded, nil); err != nil {
		return err
	}
	if err := s.db.Snapshots().Delete(ctx, sn.GetId(), 0); err != nil && !errdefs.IsNotFound(err) {
		return err
	}
	return nil
}

// deleteRef removes one copy of a snapshot (a file on primary, or a backup
// manifest and its unshared chunks) and its record.
func (s *Service) deleteRef(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, r *stowagev1.SnapshotOnStore) error {
	if r.GetState() == stowagev1.ObjectState_OBJECT_STATE_DESTROYED {
		// Resumed after the copy went and before its record did.
		if err := s.db.SnapshotsOnStore().Delete(ctx, r.GetId(), 0); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		return nil
	}
	if r.GetState() != stowagev1.ObjectState_OBJECT_STATE_DESTROYING {
		var err error
		if r, err = s.db.SnapshotsOnStore().Transition(ctx, r.GetId(), meta.ObjectDestroyRequested, nil); err != nil {
			return err
		}
	}
	st, err := s.db.Stores().Get(ctx, r.GetStoreId())
	if err != nil {
		return err
	}
	err = jobs.RunStep(ctx, job, rep, "delete-"+r.GetId(), func(ctx context.Context) error {
		obj, err := s.volumes.SnapshotObject(ctx, st, r)
		if err != nil {
			return err
		}
		if r.GetRole() == stowagev1.StoreRole_STORE_ROLE_PRIMARY {
			d, err := s.stores.Driver(st)
			if err != nil {
				return err
			}
			return d.Delete(ctx, obj)
		}
		ct, err := datastore.Capability[drivers.ChunkTarget](s.stores, st, "keep backups")
		if err != nil {
			return err
		}
		stats, err := ct.DeleteBackup(ctx, obj)
		if err == nil {
			rep.Result("backup %s on store %s removed: %d chunks freed (%d bytes), %d shared chunks kept", r.GetId(), st.GetName(), stats.Chunks, stats.FreedBytes, stats.KeptShared)
		}
		return err
	})
	if err != nil {
		return err
	}
	if _, err := s.db.SnapshotsOnStore().Transition(ctx, r.GetId(), meta.ObjectOperationSucceeded, nil); err != nil {
		return err
	}
	if err := s.db.SnapshotsOnStore().Delete(ctx, r.GetId(), 0); err != nil && !errdefs.IsNotFound(err) {
		return err
	}
	return nil
}

func (h deleteHandler) Fail(ctx context.Context, job *stowagev1.Job, cause error) error {
	// Copies not yet removed keep their records; deleting again retries. A
	// volume this job took to merge a snapshot into is Ready again (its
	// file reads as before: a rebase that did not finish left it on its
	// old backing).
	vols, err := h.s.db.Volumes().List(ctx, meta.Filter[*stowagev1.Volume]{Where: func(v *stowagev1.Volume) bool {
		return v.GetBusyJobId() == job.GetId()
	}})
	if err != nil {
		return err
	}
	for _, v := range vols {
		if err := volume.BackToReady(ctx, h.s.db, v.GetId(), cause); err != nil {
			return err
		}
	}
	return nil
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
	if g, host, err := s.granted(ctx, sn.GetVolumeId()); err != nil {
		return nil, err
	} else if g != "" {
		return nil, fmt.Errorf("snapshot %s of the same volume is granted to host %s (a merge could rewrite what it reads); revoke that first: %w", g, host, errdefs.ErrFailedPrecondition)
	}
	plan := &stowagev1.Plan{Strategy: "chain-aware-delete", Priority: motion.Default.String()}
	for _, r := range refs {
		if r.GetRole() == stowagev1.StoreRole_STORE_ROLE_PRIMARY {
			if needed, by, err := s.needed(ctx, r); err != nil {
				return nil, err
			} else if needed {
				t, why, err := s.mergeTargetOf(ctx, nil, sn, r)
				if err != nil {
					return nil, err
				}
				if t == nil {
					plan.Reasons = append(plan.Reasons, fmt.Sprintf("the copy on primary is read through by %s and cannot be merged (%s): it is hidden, and removed when nothing needs it", by, why))
					continue
				}
				plan.Strategy = "chain-merge-delete"
				plan.Reasons = append(plan.Reasons, fmt.Sprintf("the copy on primary is read through by %s only: merged out of the chain, its space comes back", by))
				plan.Steps = append(plan.Steps, &stowagev1.PlanStep{Name: "merge-" + r.GetId(), Reason: t.String()})
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
	kids, vols, err := s.dependents(ctx, r)
	if err != nil {
		return false, "", err
	}
	if len(kids) > 0 {
		return true, "snapshot " + kids[0].GetSnapshotId(), nil
	}
	if len(vols) > 0 {
		return true, "volume " + vols[0].GetName(), nil
	}
	return false, "", nil
}

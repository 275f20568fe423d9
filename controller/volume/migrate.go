package volume

import (
	"context"
	"fmt"
	"strings"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/image"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"google.golang.org/protobuf/types/known/timestamppb"
)

type migrateHandler struct{ s *Service }

func (h migrateHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	v, err := s.db.Volumes().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	params := job.GetJobParams().GetVolumeMigrate()
	s.stores.Hold(params.GetDstStoreId(), job.GetId(), params.GetReservedBytes()) // as in createHandler.Run
	src, err := s.db.Stores().Get(ctx, params.GetSrcStoreId())
	if err != nil {
		return err
	}
	dst, err := s.db.Stores().Get(ctx, params.GetDstStoreId())
	if err != nil {
		return err
	}
	srcKey := params.GetSrcKey()
	format, err := formatOf(v)
	if err != nil {
		return err
	}
	srcObj := datastore.Object(src, drivers.ObjectVolume, v.GetId(), format, v.GetSize(), srcKey)
	if v.GetState() == stowagev1.VolumeState_VOLUME_STATE_MIGRATING {
		dstKey, err := s.locateVolume(dst, v.GetId(), format, v.GetSize())
		if err != nil {
			return err
		}
		dstObj := datastore.Object(dst, drivers.ObjectVolume, v.GetId(), format, v.GetSize(), dstKey)
		mv := motion.Move{Src: srcObj, Dst: dstObj, Flatten: true, Standalone: standalone(v), Prefer: jobs.PlanHost(job, "copy")}
		keep := params.GetDstBaseRefId()
		if keep != "" {
			ref, err := s.db.TemplatesOnStore().Get(ctx, keep)
			if err != nil {
				return err
			}
			base, err := s.TemplateObject(ctx, dst, ref)
			if err != nil {
				return err
			}
			mv.Flatten, mv.Standalone, mv.Backing = false, true, &base
		}
		var info drivers.ObjectInfo
		if err := jobs.RunStep(ctx, job, rep, "copy", func(ctx context.Context) error {
			info, err = s.mover.Copy(ctx, mv, rep.Bytes)
			return err
		}); err != nil {
			return err
		}
		err = s.db.Txn(ctx, func(tx *meta.Tx) error {
			// The destination's template copy was counted at submission.
			if v.GetBaseRefId() != "" {
				if _, err := meta.TemplatesOnStore.UpdateTx(tx, v.GetBaseRefId(), 0, func(r *stowagev1.TemplateOnStore) error {
					if r.RefCount > 0 {
						r.RefCount--
					}
					return nil
				}); err != nil && !errdefs.IsNotFound(err) {
					return err
				}
			}
			_, err := meta.Volumes.TransitionTx(tx, v.GetId(), 0, meta.VolumeOperationSucceeded, func(v *stowagev1.Volume) error {
				v.StoreId, v.InstallPath, v.BaseRefId, v.BusyJobId, v.Error = dst.GetId(), dstKey, keep, "", ""
				if v.InstallMethod == image.LazyMethod {
					v.InstallMethod = "full" // flattened: no longer reads the template mount
				}
				if info.Size > 0 {
					v.Size = info.Size
				}
				return nil
			})
			return err
		})
		if err != nil {
			return err
		}
	}
	// The volume now lives on dst; removing the source is cleanup.
	if err := jobs.RunStep(ctx, job, rep, "cleanup-source", func(ctx context.Context) error {
		d, err := s.stores.Driver(src)
		if err != nil {
			return err
		}
		return d.Delete(ctx, srcObj)
	}); err != nil {
		s.log.Warn("migrated volume's source copy not removed", "volume", v.GetId(), "store", src.GetName(), "err", err)
	}
	rep.Result("volume %s moved from store %s to %s", v.GetName(), src.GetName(), dst.GetName())
	return nil
}

func (h migrateHandler) Fail(ctx context.Context, job *stowagev1.Job, cause error) error {
	// The copy is written to a temporary name and renamed only when whole,
	// so a failed copy leaves nothing on dst; remove a complete one that
	// was not switched to, then stay on the source.
	v, err := h.s.db.Volumes().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	if v.GetState() == stowagev1.VolumeState_VOLUME_STATE_MIGRATING {
		if keep := job.GetJobParams().GetVolumeMigrate().GetDstBaseRefId(); keep != "" {
			// The template copy counted for the copy at submission.
			_, err := h.s.db.TemplatesOnStore().Update(ctx, keep, 0, func(r *stowagev1.TemplateOnStore) error {
				if r.RefCount > 0 {
					r.RefCount--
				}
				return nil
			})
			if err != nil && !errdefs.IsNotFound(err) {
				return err
			}
		}
		if dst, err := h.s.db.Stores().Get(ctx, job.GetJobParams().GetVolumeMigrate().GetDstStoreId()); err == nil {
			if f, err := formatOf(v); err == nil {
				if key, err := h.s.locateVolume(dst, v.GetId(), f, v.GetSize()); err == nil {
					if d, err := h.s.stores.Driver(dst); err == nil {
						_ = d.Delete(ctx, datastore.Object(dst, drivers.ObjectVolume, v.GetId(), f, v.GetSize(), key))
					}
				}
			}
		}
	}
	return BackToReady(ctx, h.s.db, job.GetTargetId(), cause)
}

// Migrate moves a volume to another primary store.
func (s *Service) Migrate(ctx context.Context, idOrName, storeID string, dryRun bool) (*stowagev1.MigrateVolumeResponse, error) {
	v, err := s.Get(ctx, idOrName)
	if err != nil {
		return nil, err
	}
	if err := s.allows(v, meta.VolumeMigrationRequested); err != nil {
		return nil, err
	}
	src, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return nil, err
	}
	dst, err := s.stores.UpStore(ctx, storeID, stowagev1.StoreRole_STORE_ROLE_PRIMARY)
	if err != nil {
		return nil, err
	}
	if dst.GetId() == src.GetId() {
		return nil, fmt.Errorf("volume %s is already on store %s: %w", v.GetName(), dst.GetName(), errdefs.ErrInvalid)
	}
	// The destination must carry the volume's storage tags and be below
	// its disable threshold (UpStore checked that).
	if err := s.stores.Admit(dst, 0, v.GetTags()); err != nil {
		return nil, fmt.Errorf("migrate volume %s: %w", v.GetName(), err)
	}
	if v.GetAttachedHostId() != "" || v.GetNbdExportUri() != "" {
		// A cold migration: the copy would miss what the host writes
		// meanwhile, and its grant would point at the removed source.
		return nil, fmt.Errorf("volume %s is attached to host %s; revoke its access first (a migration moves a detached volume): %w",
			v.GetName(), v.GetAttachedHostId(), errdefs.ErrFailedPrecondition)
	}
	snaps, err := s.primarySnapshots(ctx, v)
	if err != nil {
		return nil, err
	}
	if len(snaps) > 0 {
		return nil, fmt.Errorf("volume %s has %d snapshots on primary store %s; back them up and delete them first (their backups stay usable): %w",
			v.GetName(), len(snaps), src.GetName(), errdefs.ErrFailedPrecondition)
	}
	keep, why := s.keepChain(ctx, v, dst)
	reasons, host, _, err := s.copyPlan(ctx, src, dst, nil, standalone(v) || keep != nil, keep == nil)
	if err != nil {
		return nil, err
	}
	plan := &stowagev1.Plan{Strategy: "migrate", Priority: motion.Default.String(), Reasons: append([]string{
		"a direct copy between primary stores, never through an image store; " + why}, reasons...)}
	switch {
	case strings.Contains(reasons[0], motion.SameHost):
		plan.Strategy, plan.Priority = "migrate-same-host", motion.Highest.String()
	default:
		plan.Strategy = "migrate-agent-to-agent"
	}
	how := "copy (flattened) volume "
	if keep != nil {
		how = "copy the overlay of volume "
	} else if standalone(v) {
		how = "copy volume "
	}
	plan.Steps = []*stowagev1.PlanStep{
		{Name: "copy", HostId: host, Reason: how + v.GetName() + " to store " + dst.GetName()},
		{Name: "cleanup-source", Reason: "remove the source file once the volume points at the copy"},
	}
	if dryRun {
		return &stowagev1.MigrateVolumeResponse{Volume: v, Plan: plan}, nil
	}
	// The copy writes at most the volume's size to dst (reserved until
	// dst's report shows it).
	mp := &stowagev1.VolumeMigrateParams{SrcStoreId: src.GetId(), DstStoreId: dst.GetId(), SrcKey: v.GetInstallPath(), ReservedBytes: v.GetSize()}
	if keep != nil {
		mp.DstBaseRefId = keep.GetId()
	}
	job := jobs.NewJob(KindMigrate, v.GetId(), "", plan, &stowagev1.JobParams{Kind: &stowagev1.JobParams_VolumeMigrate{VolumeMigrate: mp}})
	if err := s.stores.Reserve(dst, job.GetId(), 0, mp.GetReservedBytes(), v.GetTags()); err != nil {
		return nil, fmt.Errorf("migrate volume %s: %w", v.GetName(), err)
	}
	submitted := job.GetId()
	job, _, err = s.jobs.Submit(ctx, job, func(tx *meta.Tx) error {
		if keep != nil {
			// Counted from now: the copy cannot be evicted or deleted
			// under the clone that will name it.
			if _, err := meta.TemplatesOnStore.UpdateTx(tx, keep.GetId(), keep.GetRevision(), func(r *stowagev1.TemplateOnStore) error {
				if r.GetState() != stowagev1.ObjectState_OBJECT_STATE_READY {
					return fmt.Errorf("template copy %s on store %s is no longer Ready: %w", r.GetId(), dst.GetName(), errdefs.ErrAborted)
				}
				r.RefCount++
				r.LastUsed = timestamppb.Now()
				return nil
			}); err != nil {
				return err
			}
		}
		_, err := meta.Volumes.TransitionTx(tx, v.GetId(), v.GetRevision(), meta.VolumeMigrationRequested, func(v *stowagev1.Volume) error {
			v.BusyJobId = job.GetId()
			return nil
		})
		return busy(v, err)
	})
	if err != nil {
		s.stores.Cancel(submitted)
		return nil, err
	}
	v, _ = s.db.Volumes().Get(ctx, v.GetId())
	return &stowagev1.MigrateVolumeResponse{Volume: v, Job: job, Plan: plan}, nil
}

// standalone says v is one self-contained file: no template or snapshot
// file under it.
func standalone(v *stowagev1.Volume) bool {
	return v.GetBaseRefId() == "" && v.GetHeadSnapshotRefId() == "" && v.GetInstallMethod() != image.LazyMethod
}

// keepChain says whether migrating v to dst keeps its backing chain, and
// why or why not: a linked clone whose template is cached and Ready on dst
// moves only its overlay, renamed onto that copy; anything else with a
// chain is flattened.
func (s *Service) keepChain(ctx context.Context, v *stowagev1.Volume, dst *stowagev1.DataStore) (*stowagev1.TemplateOnStore, string) {
	switch {
	case standalone(v):
		return nil, "volume " + v.GetName() + " is one self-contained image"
	case v.GetInstallMethod() == image.LazyMethod:
		return nil, "flattened: lazy volume " + v.GetName() + " reads its template through its host's template mount, which the copy cannot name"
	case v.GetHeadSnapshotRefId() != "" || v.GetBaseRefId() == "":
		return nil, "flattened: volume " + v.GetName() + " reads through snapshot files that stay on the source store"
	}
	src, err := s.db.TemplatesOnStore().Get(ctx, v.GetBaseRefId())
	if err != nil {
		return nil, "flattened: the template copy volume " + v.GetName() + " reads through is not on record (" + err.Error() + ")"
	}
	ref, err := s.db.TemplatesOnStore().GetBy(ctx, meta.IndexTemplateStore, meta.TemplateStoreKey(src.GetTemplateId(), dst.GetId()))
	if err != nil || ref.GetState() != stowagev1.ObjectState_OBJECT_STATE_READY {
		return nil, "flattened: template " + src.GetTemplateId() + " of linked clone " + v.GetName() + " is not cached (Ready) on store " + dst.GetName() +
			", so the copy holds the whole guest view and depends on no template copy there"
	}
	return ref, "chain kept: template " + src.GetTemplateId() + " of linked clone " + v.GetName() + " is cached on store " + dst.GetName() +
		" (copy " + ref.GetId() + "), so only the clone's overlay moves, and it names that copy as its backing file"
}

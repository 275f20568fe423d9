package volume

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/image"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

type createHandler struct{ s *Service }

func (h createHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	v, err := s.db.Volumes().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	if v.GetState() == stowagev1.VolumeState_VOLUME_STATE_READY {
		return nil
	}
	if v.GetState() == stowagev1.VolumeState_VOLUME_STATE_ALLOCATED {
		if v, err = s.db.Volumes().Transition(ctx, v.GetId(), meta.VolumeCreateRequested, nil); err != nil {
			return err
		}
	}
	st, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return err
	}
	params := job.GetJobParams().GetVolumeCreate()
	format := hostops.FormatFromProto(params.GetFormat())
	dst := datastore.Object(st, drivers.ObjectVolume, v.GetId(), format, v.GetSize(), v.GetInstallPath())
	var info drivers.ObjectInfo
	var spool *stowagev1.TemplateOnStore
	switch {
	case v.GetTemplateId() != "" && v.GetInstallMethod() == image.LazyMethod:
		err = jobs.RunStep(ctx, job, rep, "install", func(ctx context.Context) error {
			ch, err := s.sel.SelectWhere(ctx, jobs.PlanHost(job, "install"), MountShows(v.GetTemplateId()), datastore.Scope(st))
			if err != nil {
				return err
			}
			baseFormat, err := s.templateFormat(ctx, v.GetTemplateId())
			if err != nil {
				return err
			}
			cl, err := datastore.Capability[drivers.Cloner](s.stores, st, "make a lazy volume (an overlay on the host's template mount)")
			if err != nil {
				return err
			}
			dst.Format = drivers.FormatQCOW2
			base := drivers.DataObject{ID: v.GetTemplateId(), Type: drivers.ObjectTemplate, Format: baseFormat}
			info, err = cl.Clone(drivers.WithHost(ctx, ch.HostID), drivers.CloneSpec{Base: base, BaseInMount: true, Dst: dst, Mode: drivers.CloneLinked}, rep.Bytes)
			return err
		})
	case v.GetTemplateId() != "":
		if spool, err = s.ensureCached(ctx, job, rep, v, st); err != nil {
			return err
		}
		err = jobs.RunStep(ctx, job, rep, "install", func(ctx context.Context) error {
			base, err := s.templateObject(ctx, st, spool)
			if err != nil {
				return err
			}
			cl, err := datastore.Capability[drivers.Cloner](s.stores, st, "install a volume from a cached template")
			if err != nil {
				return err
			}
			info, err = cl.Clone(drivers.WithHost(ctx, jobs.PlanHost(job, "install")), drivers.CloneSpec{Base: base, Dst: dst, Mode: drivers.CloneMode(params.GetCloneMode())}, rep.Bytes)
			return err
		})
	case v.GetSnapshotId() != "":
		err = s.createFromSnapshot(ctx, job, rep, v, st, dst, &info)
	default:
		err = jobs.RunStep(ctx, job, rep, "create", func(ctx context.Context) error {
			d, err := s.stores.Driver(st)
			if err != nil {
				return err
			}
			info, err = d.Create(drivers.WithHost(ctx, jobs.PlanHost(job, "create")), dst)
			return err
		})
	}
	if err != nil {
		return err
	}
	linked := drivers.CloneMode(params.GetCloneMode()) == drivers.CloneLinked
	err = s.db.Txn(ctx, func(tx *meta.Tx) error {
		if linked && spool != nil {
			if _, err := meta.TemplatesOnStore.UpdateTx(tx, spool.GetId(), 0, func(r *stowagev1.TemplateOnStore) error {
				r.RefCount++
				r.LastUsed = timestamppb.Now()
				return nil
			}); err != nil {
				return err
			}
		}
		_, err := meta.Volumes.TransitionTx(tx, v.GetId(), 0, meta.VolumeOperationSucceeded, func(v *stowagev1.Volume) error {
			if info.Size > 0 {
				v.Size = info.Size
			}
			v.Format = hostops.FormatToProto(format)
			v.BusyJobId, v.Error = "", ""
			if linked && spool != nil {
				v.BaseRefId = spool.GetId()
			}
			return nil
		})
		return err
	})
	if err == nil {
		rep.Result("volume %s ready on store %s (%s, %d bytes, %s)", v.GetName(), st.GetName(), format, info.Size, orDefault(info.Method, v.GetInstallMethod()))
	}
	return err
}

func orDefault(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// ensureCached makes sure the volume's template is Ready on its primary
// store, copying it there once: the job that moves the spool ref to
// Creating copies; every other job waits for that one copy.
func (s *Service) ensureCached(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, v *stowagev1.Volume, st *stowagev1.DataStore) (*stowagev1.TemplateOnStore, error) {
	tmpl, err := s.db.Templates().Get(ctx, v.GetTemplateId())
	if err != nil {
		return nil, err
	}
	for attempt := 0; attempt < 3; attempt++ {
		ref, err := s.SpoolRef(ctx, tmpl.GetId(), st.GetId())
		if errdefs.IsNotFound(err) {
			key, lerr := s.locateTemplate(st, tmpl)
			if lerr != nil {
				return nil, lerr
			}
			ref, err = s.db.TemplatesOnStore().Create(ctx, &stowagev1.TemplateOnStore{Id: meta.NewID(), TemplateId: tmpl.GetId(), StoreId: st.GetId(), InstallPath: key})
			if errdefs.IsAlreadyExists(err) {
				continue
			}
		}
		if err != nil {
			return nil, err
		}
		switch ref.GetState() {
		case stowagev1.ObjectState_OBJECT_STATE_READY:
			return ref, nil
		case stowagev1.ObjectState_OBJECT_STATE_FAILED, stowagev1.ObjectState_OBJECT_STATE_DESTROYING:
			// A failed earlier copy: clear it and try once more.
			if err := s.images.DeleteCopy(ctx, job, rep, ref); err != nil {
				return nil, err
			}
			continue
		case stowagev1.ObjectState_OBJECT_STATE_ALLOCATED:
			ref, err = s.db.TemplatesOnStore().TransitionIf(ctx, ref.GetId(), ref.GetRevision(), meta.ObjectCreateRequested, nil)
			if errdefs.IsConflict(err) || errdefs.IsFailedPrecondition(err) {
				continue // another job claimed the copy
			}
			if err != nil {
				return nil, err
			}
			return ref, s.copyTemplate(ctx, job, rep, tmpl, ref, st)
		case stowagev1.ObjectState_OBJECT_STATE_CREATING:
			if ref.GetOwnerJobId() == job.GetId() {
				// This job owned the copy before a controller restart.
				return ref, s.copyTemplate(ctx, job, rep, tmpl, ref, st)
			}
			rep.Phase("waiting for the template copy to store " + st.GetName())
			if ref, err = s.waitRef(ctx, ref.GetId()); err != nil {
				return nil, err
			}
			if ref.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY {
				return ref, nil
			}
			return nil, fmt.Errorf("the copy of template %s to store %s failed: %s: %w", tmpl.GetName(), st.GetName(), ref.GetError(), errdefs.ErrFailedPrecondition)
		default:
			return nil, fmt.Errorf("cached template %s on store %s is %s: %w", tmpl.GetName(), st.GetName(), meta.ObjectStateName(ref.GetState()), errdefs.ErrFailedPrecondition)
		}
	}
	return nil, fmt.Errorf("template %s on store %s: too many concurrent changes: %w", tmpl.GetName(), st.GetName(), errdefs.ErrAborted)
}

// copyTemplate copies the template from an image store into the spool ref.
func (s *Service) copyTemplate(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, tmpl *stowagev1.Template, ref *stowagev1.TemplateOnStore, st *stowagev1.DataStore) error {
	// Mark the owner so a resumed job knows the copy is its own.
	if _, err := s.db.TemplatesOnStore().Update(ctx, ref.GetId(), 0, func(r *stowagev1.TemplateOnStore) error {
		r.OwnerJobId = job.GetId()
		return nil
	}); err != nil {
		return err
	}
	imgRef, imgStore, err := s.images.ReadyOn(ctx, tmpl.GetId(), stowagev1.StoreRole_STORE_ROLE_IMAGE)
	if err == nil {
		err = s.evictCache(ctx, job, rep, st, tmpl.GetVirtualSize())
	}
	var info drivers.ObjectInfo
	if err == nil {
		err = jobs.RunStep(ctx, job, rep, "cache-template", func(ctx context.Context) error {
			src, err := s.templateObject(ctx, imgStore, imgRef)
			if err != nil {
				return err
			}
			dst, err := s.templateObject(ctx, st, ref)
			if err != nil {
				return err
			}
			info, err = s.mover.Copy(ctx, motion.Move{Src: src, Dst: dst, Standalone: true, Prefer: jobs.PlanHost(job, "cache-template")}, rep.Bytes)
			return err
		})
	}
	if err != nil {
		_, terr := s.db.TemplatesOnStore().Transition(context.WithoutCancel(ctx), ref.GetId(), meta.ObjectOperationFailed, func(r *stowagev1.TemplateOnStore) error {
			r.Error = err.Error()
			return nil
		})
		return errors.Join(err, terr)
	}
	_, err = s.db.TemplatesOnStore().Transition(ctx, ref.GetId(), meta.ObjectOperationSucceeded, func(r *stowagev1.TemplateOnStore) error {
		r.Size, r.PhysicalSize, r.BytesDone, r.Error, r.OwnerJobId = info.Size, info.PhysicalSize, info.Size, "", ""
		r.LastUsed = timestamppb.Now()
		return nil
	})
	return err
}

func (s *Service) createFromSnapshot(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, v *stowagev1.Volume, st *stowagev1.DataStore, dst drivers.DataObject, info *drivers.ObjectInfo) error {
	ref, err := s.db.SnapshotsOnStore().Get(ctx, job.GetJobParams().GetVolumeCreate().GetSourceRefId())
	if err != nil {
		return err
	}
	src, err := s.db.Stores().Get(ctx, ref.GetStoreId())
	if err != nil {
		return err
	}
	obj, err := s.SnapshotObject(ctx, src, ref)
	if err != nil {
		return err
	}
	if ref.GetRole() == stowagev1.StoreRole_STORE_ROLE_PRIMARY {
		return jobs.RunStep(ctx, job, rep, "copy", func(ctx context.Context) error {
			*info, err = s.mover.Copy(ctx, motion.Move{Src: obj, Dst: dst, Flatten: true, Prefer: jobs.PlanHost(job, "copy")}, rep.Bytes)
			return err
		})
	}
	return jobs.RunStep(ctx, job, rep, "restore", func(ctx context.Context) error {
		*info, err = s.restore(ctx, jobs.PlanHost(job, "restore"), src, obj, st, dst, rep.Bytes)
		return err
	})
}

// restore rebuilds dst (on primary store st) from backup obj (on image
// store src) on a host that reaches st and that src's driver gives the
// backup's chunks to.
func (s *Service) restore(ctx context.Context, prefer string, src *stowagev1.DataStore, obj drivers.DataObject, st *stowagev1.DataStore, dst drivers.DataObject, progress drivers.Progress) (drivers.ObjectInfo, error) {
	ct, err := datastore.Capability[drivers.ChunkTarget](s.stores, src, "keep backups")
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	d, err := s.stores.Driver(st)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	ch, err := s.sel.Select(ctx, prefer, datastore.Scope(src), datastore.Scope(st))
	if err != nil {
		if ch, err = s.sel.Select(ctx, prefer, datastore.Scope(st)); err != nil {
			return drivers.ObjectInfo{}, err
		}
	}
	ctx = drivers.WithHost(ctx, ch.HostID)
	ba, err := ct.BackupAccess(ctx, obj, drivers.Client{HostID: ch.HostID, Purpose: drivers.PurposeRead})
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	writer := drivers.Client{HostID: ch.HostID, Purpose: drivers.PurposeWrite}
	acc, err := d.GrantAccess(ctx, dst, writer)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	ref, ok, err := hostops.ParseRef(acc.URI)
	if err != nil || !ok {
		return drivers.ObjectInfo{}, fmt.Errorf("store %s gives host %s no store object to restore into (%v): %w", st.GetName(), ch.HostID, err, errdefs.ErrNotImplemented)
	}
	ii, err := ch.Endpoint.RestoreImage(ctx, hostops.RestoreRequest{
		Chunks: hostops.ChunkStore{URI: ba.Chunks, Secret: ba.Secret}, Manifest: ba.Manifest, Dest: ref, Format: dst.Format,
	}, progress)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	return ii.Object(dst), nil
}

// Fail marks a volume that could not be created Failed, with the reason.
func (h createHandler) Fail(ctx context.Context, job *stowagev1.Job, cause error) error {
	v, err := h.s.db.Volumes().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	switch v.GetState() {
	case stowagev1.VolumeState_VOLUME_STATE_ALLOCATED, stowagev1.VolumeState_VOLUME_STATE_CREATING:
		_, err = h.s.db.Volumes().Transition(ctx, v.GetId(), meta.VolumeOperationFailed, func(v *stowagev1.Volume) error {
			v.Error, v.BusyJobId = cause.Error(), ""
			return nil
		})
	}
	return err
}

type deleteHandler struct{ s *Service }

func (h deleteHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	v, err := s.db.Volumes().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
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

type resizeHandler struct{ s *Service }

func (h resizeHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	v, err := s.db.Volumes().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	size := job.GetJobParams().GetVolumeResize().GetSizeBytes()
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

type migrateHandler struct{ s *Service }

func (h migrateHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	v, err := s.db.Volumes().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	params := job.GetJobParams().GetVolumeMigrate()
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
		var info drivers.ObjectInfo
		if err := jobs.RunStep(ctx, job, rep, "copy", func(ctx context.Context) error {
			info, err = s.mover.Copy(ctx, motion.Move{Src: srcObj, Dst: dstObj, Flatten: true, Standalone: standalone(v), Prefer: jobs.PlanHost(job, "copy")}, rep.Bytes)
			return err
		}); err != nil {
			return err
		}
		err = s.db.Txn(ctx, func(tx *meta.Tx) error {
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
				v.StoreId, v.InstallPath, v.BaseRefId, v.BusyJobId, v.Error = dst.GetId(), dstKey, "", "", ""
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

// templateFormat is the format of template id as its record says; its
// copies on stores (the cached one on primary too) have it.
func (s *Service) templateFormat(ctx context.Context, id string) (drivers.Format, error) {
	t, err := s.db.Templates().Get(ctx, id)
	if err != nil {
		return "", err
	}
	return image.FormatFromProto(t.GetFormat())
}

// snapshotFormat is the format of snapshot id's files on primary: its
// volume's format, as the volume's record says.
func (s *Service) snapshotFormat(ctx context.Context, id string) (drivers.Format, error) {
	sn, err := s.db.Snapshots().Get(ctx, id)
	if err != nil {
		return "", err
	}
	sv, err := s.db.Volumes().Get(ctx, sn.GetVolumeId())
	if err != nil {
		return "", fmt.Errorf("volume of snapshot %s: %w", id, err)
	}
	return formatOf(sv)
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

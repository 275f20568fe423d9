package snapshot

import (
	"context"
	"errors"
	"fmt"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/volume"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
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
	var errs []error
	for _, r := range refs {
		errs = append(errs, s.db.SnapshotsOnStore().Delete(ctx, r.GetId(), 0))
	}
	switch sn.GetState() {
	case stowagev1.SnapshotState_SNAPSHOT_STATE_ALLOCATED, stowagev1.SnapshotState_SNAPSHOT_STATE_CREATING:
		if sn.GetState() == stowagev1.SnapshotState_SNAPSHOT_STATE_ALLOCATED {
			_, err = s.db.Snapshots().Transition(ctx, sn.GetId(), meta.SnapshotCreateRequested, nil)
			errs = append(errs, err)
		}
		_, err = s.db.Snapshots().Transition(ctx, sn.GetId(), meta.SnapshotOperationFailed, func(s *stowagev1.Snapshot) error {
			s.Error = cause.Error()
			return nil
		})
		errs = append(errs, err)
	}
	errs = append(errs, volume.BackToReady(ctx, s.db, sn.GetVolumeId(), cause))
	return errors.Join(errs...)
}

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
	return volume.BackToReady(ctx, h.s.db, sn.GetVolumeId(), cause)
}

type backupHandler struct{ s *Service }

func (h backupHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	sn, err := s.db.Snapshots().Get(ctx, job.GetTargetId())
	if err != nil {
		return err
	}
	p := job.GetJobParams().GetSnapshotBackup()
	ref, err := s.db.SnapshotsOnStore().Get(ctx, p.GetRefId())
	if err != nil {
		return err
	}
	src, err := s.db.SnapshotsOnStore().Get(ctx, p.GetSrcRefId())
	if err != nil {
		return err
	}
	primary, err := s.db.Stores().Get(ctx, src.GetStoreId())
	if err != nil {
		return err
	}
	img, err := s.db.Stores().Get(ctx, ref.GetStoreId())
	if err != nil {
		return err
	}
	var parent *stowagev1.SnapshotOnStore
	if ref.GetParentRefId() != "" {
		if p, err := s.db.SnapshotsOnStore().Get(ctx, ref.GetParentRefId()); err == nil && p.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY {
			parent = p
		}
	}
	parentManifest := ""
	if ref.GetState() == stowagev1.ObjectState_OBJECT_STATE_ALLOCATED {
		if ref, err = s.db.SnapshotsOnStore().Transition(ctx, ref.GetId(), meta.ObjectCreateRequested, nil); err != nil {
			return err
		}
	}
	var info hostops.BackupInfo
	if err := jobs.RunStep(ctx, job, rep, "backup", func(ctx context.Context) error {
		info, parentManifest, err = s.backup(ctx, jobs.PlanHost(job, "backup"), primary, src, img, ref, parent, rep.Bytes)
		return err
	}); err != nil {
		return err
	}
	kind := stowagev1.SnapshotKind_SNAPSHOT_KIND_FULL
	if parentManifest != "" {
		kind = stowagev1.SnapshotKind_SNAPSHOT_KIND_INCREMENTAL
	}
	err = s.db.Txn(ctx, func(tx *meta.Tx) error {
		if _, err := meta.SnapshotsOnStore.TransitionTx(tx, ref.GetId(), 0, meta.ObjectOperationSucceeded, func(r *stowagev1.SnapshotOnStore) error {
			r.Size, r.PhysicalSize, r.NewBytes, r.ReusedBytes, r.Chunks, r.ZeroChunks = info.Size, info.NewBytes, info.NewBytes, info.ReusedBytes, info.Chunks, info.ZeroChunks
			return nil
		}); err != nil {
			return err
		}
		_, err := meta.Snapshots.TransitionTx(tx, sn.GetId(), 0, meta.SnapshotOperationSucceeded, func(s *stowagev1.Snapshot) error {
			s.Kind = kind
			return nil
		})
		return err
	})
	rep.Result("backup of snapshot %s: %d chunks, %d new bytes stored, %d reused, %d zero chunks skipped", sn.GetId(), info.Chunks, info.NewBytes, info.ReusedBytes, info.ZeroChunks)
	return err
}

// Fail drops the unfinished backup record and puts the snapshot back to
// what it was: CreatedOnPrimary, or BackedUp if another backup exists.
func (h backupHandler) Fail(ctx context.Context, job *stowagev1.Job, cause error) error {
	s := h.s
	var errs []error
	if ref, err := s.db.SnapshotsOnStore().Get(ctx, job.GetJobParams().GetSnapshotBackup().GetRefId()); err == nil && ref.GetState() != stowagev1.ObjectState_OBJECT_STATE_READY {
		errs = append(errs, s.db.SnapshotsOnStore().Delete(ctx, ref.GetId(), 0))
	}
	sn, refs, err := s.Get(ctx, job.GetTargetId())
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	if sn.GetState() == stowagev1.SnapshotState_SNAPSHOT_STATE_BACKING_UP {
		event := meta.SnapshotBackupFailed
		if refOn(refs, stowagev1.StoreRole_STORE_ROLE_IMAGE) != nil {
			event = meta.SnapshotBackupFailedKeep
		}
		_, err = s.db.Snapshots().Transition(ctx, sn.GetId(), event, func(s *stowagev1.Snapshot) error {
			s.Error = "backup failed: " + cause.Error()
			return nil
		})
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

type deleteHandler struct{ s *Service }

func (h deleteHandler) Run(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter) error {
	s := h.s
	sn, refs, err := s.Get(ctx, job.GetTargetId())
	if err != nil {
		if errdefs.IsNotFound(err) {
			return nil
		}
		return err
	}
	hide := false
	for _, r := range refs {
		if r.GetRole() == stowagev1.StoreRole_STORE_ROLE_PRIMARY {
			needed, _, err := s.needed(ctx, r)
			if err != nil {
				return err
			}
			hide = hide || needed
		}
	}
	if hide {
		// Keep every copy: the primary one is read through, and a backup of
		// a hidden snapshot still restores.
		if sn.GetState() != stowagev1.SnapshotState_SNAPSHOT_STATE_HIDDEN {
			if _, err := s.db.Snapshots().Transition(ctx, sn.GetId(), meta.SnapshotHide, nil); err != nil {
				return err
			}
		}
		rep.Result("snapshot %s hidden: a later snapshot or the volume still reads through it", sn.GetId())
		return nil
	}
	if err := s.destroy(ctx, job, rep, sn, refs); err != nil {
		return err
	}
	rep.Result("snapshot %s deleted", sn.GetId())
	return s.collectHidden(ctx, job, rep, sn.GetVolumeId())
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
			still := false
			for _, r := range refs {
				if n, _, err := s.needed(ctx, r); err != nil {
					return err
				} else if n {
					still = true
				}
			}
			if still {
				continue
			}
			if err := s.destroy(ctx, job, rep, sib, refs); err != nil {
				return err
			}
			progress = true
		}
	}
	return nil
}

// destroy moves a snapshot through Destroying to Destroyed, removing its
// copies, then drops its record.
func (s *Service) destroy(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, sn *stowagev1.Snapshot, refs []*stowagev1.SnapshotOnStore) error {
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
	return s.db.Snapshots().Delete(ctx, sn.GetId(), 0)
}

// deleteRef removes one copy of a snapshot (a file on primary, or a backup
// manifest and its unshared chunks) and its record.
func (s *Service) deleteRef(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, r *stowagev1.SnapshotOnStore) error {
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

func (h deleteHandler) Fail(context.Context, *stowagev1.Job, error) error {
	// Copies not yet removed keep their records; deleting again retries.
	return nil
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

// backup stores snapshot copy src (on primary store primary) as backup ref
// on image store img, incrementally on parent's backup when there is one,
// on a host that reaches the primary store and that img's driver gives the
// chunk store to. It returns what was stored and the parent's manifest
// name ("" for a full backup).
func (s *Service) backup(ctx context.Context, prefer string, primary *stowagev1.DataStore, src *stowagev1.SnapshotOnStore, img *stowagev1.DataStore,
	ref, parent *stowagev1.SnapshotOnStore, progress drivers.Progress) (hostops.BackupInfo, string, error) {
	ct, err := datastore.Capability[drivers.ChunkTarget](s.stores, img, "keep backups")
	if err != nil {
		return hostops.BackupInfo{}, "", err
	}
	pd, err := s.stores.Driver(primary)
	if err != nil {
		return hostops.BackupInfo{}, "", err
	}
	ch, err := s.sel.Select(ctx, prefer, datastore.Scope(primary), datastore.Scope(img))
	if err != nil {
		if ch, err = s.sel.Select(ctx, prefer, datastore.Scope(primary)); err != nil {
			return hostops.BackupInfo{}, "", err
		}
	}
	ctx = drivers.WithHost(ctx, ch.HostID)
	snap, err := s.volumes.SnapshotObject(ctx, primary, src)
	if err != nil {
		return hostops.BackupInfo{}, "", err
	}
	reader := drivers.Client{HostID: ch.HostID, Purpose: drivers.PurposeRead}
	acc, err := pd.GrantAccess(ctx, snap, reader)
	if err != nil {
		return hostops.BackupInfo{}, "", err
	}
	if acc.Revocable {
		defer func() { _ = pd.RevokeAccess(context.WithoutCancel(ctx), snap, reader, acc) }()
	}
	srcRef, ok, err := hostops.ParseRef(acc.URI)
	if err != nil || !ok {
		return hostops.BackupInfo{}, "", fmt.Errorf("store %s gives host %s no store object to back up from (%v): %w", primary.GetName(), ch.HostID, err, errdefs.ErrNotImplemented)
	}
	writer := drivers.Client{HostID: ch.HostID, Purpose: drivers.PurposeWrite}
	obj, err := s.volumes.SnapshotObject(ctx, img, ref)
	if err != nil {
		return hostops.BackupInfo{}, "", err
	}
	ba, err := ct.BackupAccess(ctx, obj, writer)
	if err != nil {
		return hostops.BackupInfo{}, "", err
	}
	parentManifest := ""
	if parent != nil {
		po, err := s.volumes.SnapshotObject(ctx, img, parent)
		if err != nil {
			return hostops.BackupInfo{}, "", err
		}
		pa, err := ct.BackupAccess(ctx, po, writer)
		if err != nil {
			return hostops.BackupInfo{}, "", err
		}
		if pa.Chunks == ba.Chunks {
			parentManifest = pa.Manifest
		}
	}
	info, err := ch.Endpoint.BackupImage(ctx, hostops.BackupRequest{
		Source: srcRef, SourceFormat: snap.Format, Chunks: hostops.ChunkStore{URI: ba.Chunks, Secret: ba.Secret},
		Manifest: ba.Manifest, ParentManifest: parentManifest, ChunkSize: ChunkSize,
	}, progress)
	return info, parentManifest, err
}

package snapshot

import (
	"context"
	"errors"
	"fmt"
	"sort"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/controller/volume"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

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
	if ref.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY {
		// Resumed after the transaction that recorded the backup committed
		// (a crash before the job's end was recorded): it is done.
		rep.Result("backup of snapshot %s: stored (%d chunks, %d new bytes)", sn.GetId(), ref.GetChunks(), ref.GetNewBytes())
		return nil
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
			r.ReadBytes = info.ReadBytes
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
	rep.Result("backup of snapshot %s: %d chunks, %d bytes read, %d new bytes stored, %d reused, %d zero chunks skipped", sn.GetId(), info.Chunks, info.ReadBytes, info.NewBytes, info.ReusedBytes, info.ZeroChunks)
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
	ctx = s.stores.WithNeeds(ctx, primary, img)
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
	if err != nil {
		return hostops.BackupInfo{}, "", err
	}
	var srcURI drivers.URI
	if !ok {
		srcURI = acc.URI // a granted URI (a LUN) the host reads from
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
	req := hostops.BackupRequest{
		Source: srcRef, SourceURI: srcURI, SourceFormat: snap.Format, Chunks: hostops.ChunkStore{URI: ba.Chunks, Secret: ba.Secret},
		Manifest: ba.Manifest, ParentManifest: parentManifest, ChunkSize: ChunkSize,
	}
	if parentManifest != "" {
		req.Changed, req.ChangedKnown = s.changedSince(ctx, pd, primary, src, parent)
	}
	info, err := ch.Endpoint.BackupImage(ctx, req, progress)
	return info, parentManifest, err
}

// changedSince asks the primary store's driver, when it tracks changes
// (drivers.ChangeTracker: RBD's diff), what changed in snapshot copy src
// since the snapshot parent backs up, whose copy must still be on the same
// primary store. known is false when the driver cannot say: the backup
// then reads the whole snapshot (writing only the chunks the parent lacks).
func (s *Service) changedSince(ctx context.Context, pd drivers.Driver, primary *stowagev1.DataStore, src, parent *stowagev1.SnapshotOnStore) ([]drivers.Extent, bool) {
	ct, ok := pd.(drivers.ChangeTracker)
	if !ok {
		return nil, false
	}
	prefs, err := s.db.SnapshotsOnStore().ListBy(ctx, meta.IndexSnapshotID, parent.GetSnapshotId())
	if err != nil {
		return nil, false
	}
	var since *stowagev1.SnapshotOnStore
	for _, r := range prefs {
		if r.GetStoreId() == primary.GetId() && r.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY {
			since = r
		}
	}
	sn, err := s.db.Snapshots().Get(ctx, src.GetSnapshotId())
	if since == nil || err != nil {
		return nil, false
	}
	v, err := s.db.Volumes().Get(ctx, sn.GetVolumeId())
	if err != nil {
		return nil, false
	}
	vol, err := volume.VolumeObject(primary, v)
	if err != nil {
		return nil, false
	}
	a, err1 := s.volumes.SnapshotObject(ctx, primary, src)
	b, err2 := s.volumes.SnapshotObject(ctx, primary, since)
	if err1 != nil || err2 != nil {
		return nil, false
	}
	changed, err := ct.Changed(ctx, drivers.SnapshotObject{DataObject: a, Volume: vol}, drivers.SnapshotObject{DataObject: b, Volume: vol})
	if err != nil {
		return nil, false
	}
	return changed, true
}

// ChunkSize is the backup chunk size.
const ChunkSize = 4 << 20

// Backup plans and starts backing a snapshot up into an image store.
func (s *Service) Backup(ctx context.Context, req *stowagev1.BackupSnapshotRequest) (*stowagev1.BackupSnapshotResponse, error) {
	// A retry with an earlier request's key returns its job, although the
	// snapshot that job backs up is BackingUp now.
	if job, ok, err := s.earlier(ctx, req.GetIdempotencyKey(), req.GetDryRun()); err != nil || ok {
		if err != nil {
			return nil, err
		}
		return &stowagev1.BackupSnapshotResponse{Job: job, Plan: job.GetPlan()}, nil
	}
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
	ch, err := s.sel.Select(s.stores.WithNeeds(ctx, primary, img), "", datastore.Scope(primary), datastore.Scope(img))
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

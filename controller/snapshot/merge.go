package snapshot

import (
	"context"
	"fmt"

	"github.com/stowage/stowage/controller/image"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/volume"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Merging a snapshot out of its qcow2 chain, offline, as libvirt's
// block-pull does.
//
// A qcow2-external snapshot's file is the volume's former top layer: the
// chain of a volume with snapshots s1, s2, s3 is
//
//	s1 (base, or standalone) <- s2 <- s3 <- volume (the active overlay)
//
// where each file holds only what was written between its snapshot and the
// one before. Deleting s2 cannot simply remove its file (s3 reads through
// it), and committing s2 into s1 (qemu-img commit) would change what s1
// reads, and s1 is a snapshot someone still needs. What is always
// content-safe is rebasing the one child onto s2's own backing (here s3
// onto s1): qemu-img rebase in safe mode copies into s3 exactly the
// clusters s3 does not hold itself and that read differently through s1
// than through s2, so s3's guest view is unchanged; the clusters of s2 that
// s3 overwrote are the space that comes back. Then s2's file is removed.
//
// Crash safety. The child is rebased in place by the host (hostops
// RebaseImage): qemu-img rebase writes the copied clusters first and
// rewrites the backing name in the header last, and every cluster it copies
// holds what the old chain read there, so a kill midway leaves the child on
// its old backing reading the same bytes (at worst leaked clusters that
// qemu-img check -r reclaims). The records change only after the rebase
// finished and was synced: one transaction moves the child (its parent ref,
// or the volume's head) onto s2's parent; only then is s2 no longer needed
// and destroyed the usual way (its ref Destroying, the file removed, the
// record dropped). A job resumed after a crash finds the records as they
// were, rebases again (a child already on the new backing is left alone) and
// goes on.
//
// A snapshot is merged only when exactly one file reads through it (the
// child snapshot or the volume) and nothing else needs it separately: with
// two children, pulling its data into both would store it twice, so it is
// hidden instead, as is a snapshot at the bottom of a lazy volume's chain
// (its backing is in the host's template mount, not on the store), one of
// a driver without Rebaser, or one whose child is busy or in use (a running
// VM holds its disk: qemu's lock). The bottom snapshot of a linked clone
// merges onto the template's copy on the store it reads through.

// mergeTarget is how snapshot copy r leaves its chain: its one dependent
// (a child copy or the volume) moves onto parent (nil: standalone).
type mergeTarget struct {
	kid    *stowagev1.SnapshotOnStore
	vol    *stowagev1.Volume // the dependent, when it is the volume
	owner  *stowagev1.Volume // the snapshot's volume, held busy
	parent *stowagev1.SnapshotOnStore
	// tmpl is the template copy a linked clone's bottom snapshot reads
	// through (parent nil): the dependent moves onto it.
	tmpl *stowagev1.TemplateOnStore
	st   *stowagev1.DataStore
	rb   drivers.Rebaser
}

func (t *mergeTarget) String() string {
	child := "the volume"
	if t.kid != nil {
		child = "snapshot " + t.kid.GetSnapshotId()
	}
	onto := "standalone (no backing file)"
	switch {
	case t.parent != nil:
		onto = "snapshot " + t.parent.GetSnapshotId()
	case t.tmpl != nil:
		onto = "template " + t.tmpl.GetTemplateId() + "'s copy on the store"
	}
	return fmt.Sprintf("rebase %s onto %s, copying in the data only this snapshot holds that it still reads", child, onto)
}

// dependents are the files that read through primary copy r: child copies
// and volumes whose overlay is on r.
func (s *Service) dependents(ctx context.Context, r *stowagev1.SnapshotOnStore) ([]*stowagev1.SnapshotOnStore, []*stowagev1.Volume, error) {
	kids, err := s.db.SnapshotsOnStore().List(ctx, meta.Filter[*stowagev1.SnapshotOnStore]{Where: func(o *stowagev1.SnapshotOnStore) bool {
		return o.GetParentRefId() == r.GetId() && o.GetRole() == stowagev1.StoreRole_STORE_ROLE_PRIMARY && o.GetState() != stowagev1.ObjectState_OBJECT_STATE_DESTROYED
	}})
	if err != nil {
		return nil, nil, err
	}
	vols, err := s.db.Volumes().List(ctx, meta.Filter[*stowagev1.Volume]{Where: func(v *stowagev1.Volume) bool {
		return v.GetHeadSnapshotRefId() == r.GetId()
	}})
	return kids, vols, err
}

// mergeTargetOf says how primary copy r of snapshot sn can be merged out of
// its chain, or why not (nil target, the reason).
func (s *Service) mergeTargetOf(ctx context.Context, job *stowagev1.Job, sn *stowagev1.Snapshot, r *stowagev1.SnapshotOnStore) (*mergeTarget, string, error) {
	if sn.GetMethod() != "qcow2-external" {
		return nil, "not a qcow2 external snapshot", nil
	}
	kids, vols, err := s.dependents(ctx, r)
	if err != nil {
		return nil, "", err
	}
	if n := len(kids) + len(vols); n != 1 {
		return nil, fmt.Sprintf("%d files read through it (merging copies its data into each)", n), nil
	}
	t := &mergeTarget{}
	if len(kids) == 1 {
		t.kid = kids[0]
		ksn, err := s.db.Snapshots().Get(ctx, t.kid.GetSnapshotId())
		if err != nil {
			return nil, "", err
		}
		switch ksn.GetState() {
		case stowagev1.SnapshotState_SNAPSHOT_STATE_CREATED_ON_PRIMARY, stowagev1.SnapshotState_SNAPSHOT_STATE_BACKED_UP, stowagev1.SnapshotState_SNAPSHOT_STATE_HIDDEN:
		default:
			return nil, fmt.Sprintf("its child snapshot %s is %s", ksn.GetId(), meta.SnapshotStateName(ksn.GetState())), nil
		}
		if t.kid.GetState() != stowagev1.ObjectState_OBJECT_STATE_READY || t.kid.GetStoreId() != r.GetStoreId() {
			return nil, "its child copy is not Ready on the same store", nil
		}
	} else {
		t.vol = vols[0]
		if t.vol.GetStoreId() != r.GetStoreId() {
			return nil, "the volume moved to another store", nil
		}
		// The volume's own file is rewritten: not while a host uses it
		// (an NBD export is not held off by qemu's lock).
		if t.vol.GetAttachedHostId() != "" || t.vol.GetNbdExportUri() != "" {
			return nil, fmt.Sprintf("volume %s is attached to host %s", t.vol.GetName(), t.vol.GetAttachedHostId()), nil
		}
	}
	// The snapshot's volume is held busy from the rebase until the file is
	// gone: no revert onto the snapshot, no take, no other merge of this
	// chain runs meanwhile.
	if t.owner, err = s.db.Volumes().Get(ctx, sn.GetVolumeId()); err != nil {
		if errdefs.IsNotFound(err) {
			return nil, "its volume is gone", nil
		}
		return nil, "", err
	}
	if t.owner.GetState() != stowagev1.VolumeState_VOLUME_STATE_READY && (job == nil || t.owner.GetBusyJobId() != job.GetId()) {
		return nil, fmt.Sprintf("volume %s is %s", t.owner.GetName(), meta.VolumeStateName(t.owner.GetState())), nil
	}
	if r.GetParentRefId() != "" {
		p, err := s.db.SnapshotsOnStore().Get(ctx, r.GetParentRefId())
		if err != nil {
			return nil, "", err
		}
		if p.GetState() != stowagev1.ObjectState_OBJECT_STATE_READY || p.GetStoreId() != r.GetStoreId() {
			return nil, "its parent copy is not Ready on the same store", nil
		}
		t.parent = p
	} else {
		switch v := t.owner; {
		case v.GetInstallMethod() == image.LazyMethod:
			// Its backing is the template in the host's template mount,
			// not an object of the store a driver can rebase onto.
			return nil, "it is the bottom of a lazy volume's chain (on the template mount)", nil
		case v.GetBaseRefId() != "":
			// A linked clone: the bottom snapshot reads through the
			// template's copy on the store; its dependent moves onto it.
			tos, err := s.db.TemplatesOnStore().Get(ctx, v.GetBaseRefId())
			if err != nil {
				return nil, "", err
			}
			if tos.GetState() != stowagev1.ObjectState_OBJECT_STATE_READY || tos.GetStoreId() != r.GetStoreId() {
				return nil, "its template copy is not Ready on the same store", nil
			}
			t.tmpl = tos
		}
	}
	if t.st, err = s.db.Stores().Get(ctx, r.GetStoreId()); err != nil {
		return nil, "", err
	}
	d, err := s.stores.Driver(t.st)
	if err != nil {
		return nil, "", err
	}
	rb, ok := d.(drivers.Rebaser)
	if !ok {
		return nil, "store " + t.st.GetName() + " cannot rebase", nil
	}
	t.rb = rb
	return t, "", nil
}

// merge moves t's dependent of primary copy r of sn onto r's parent (the
// files first, then the records), after which r is needed no more; the
// snapshot's volume stays busy with job until release lets it go. It
// reports false, with the volume Ready again, when the volume is taken by
// another job or the host refuses because the file is in use (a running
// VM): the snapshot is hidden then.
func (s *Service) merge(ctx context.Context, job *stowagev1.Job, rep *jobs.Reporter, sn *stowagev1.Snapshot, r *stowagev1.SnapshotOnStore, t *mergeTarget) (bool, error) {
	var err error
	if t.owner.GetState() == stowagev1.VolumeState_VOLUME_STATE_READY {
		if t.owner, err = s.db.Volumes().Transition(ctx, t.owner.GetId(), meta.VolumeSnapshotRequested, func(v *stowagev1.Volume) error {
			v.BusyJobId = job.GetId()
			return nil
		}); err != nil {
			if errdefs.IsFailedPrecondition(err) || errdefs.IsConflict(err) {
				return false, nil
			}
			return false, err
		}
	}
	var obj drivers.DataObject
	if t.vol != nil {
		obj, err = volume.VolumeObject(t.st, t.owner)
	} else {
		obj, err = s.volumes.SnapshotObject(ctx, t.st, t.kid)
	}
	if err != nil {
		return false, err
	}
	var base *drivers.DataObject
	switch {
	case t.parent != nil:
		b, err := s.volumes.SnapshotObject(ctx, t.st, t.parent)
		if err != nil {
			return false, err
		}
		base = &b
	case t.tmpl != nil:
		b, err := s.volumes.TemplateObject(ctx, t.st, t.tmpl)
		if err != nil {
			return false, err
		}
		base = &b
	}
	var info drivers.ObjectInfo
	err = jobs.RunStep(ctx, job, rep, "merge-"+r.GetId(), func(ctx context.Context) error {
		info, err = t.rb.Rebase(ctx, obj, base)
		return err
	})
	if err != nil {
		if errdefs.IsFailedPrecondition(err) {
			s.log.InfoContext(ctx, "snapshot merge refused, hiding it instead", "snapshot", sn.GetId(), "err", err)
			return false, volume.BackToReady(ctx, s.db, t.owner.GetId(), err)
		}
		return false, err
	}
	parentRef, parentSnap := "", ""
	if t.parent != nil {
		parentRef, parentSnap = t.parent.GetId(), t.parent.GetSnapshotId()
	}
	err = s.db.Txn(ctx, func(tx *meta.Tx) error {
		if t.vol != nil {
			_, err := meta.Volumes.UpdateTx(tx, t.vol.GetId(), 0, func(v *stowagev1.Volume) error {
				v.HeadSnapshotRefId = parentRef
				return nil
			})
			return err
		}
		if _, err := meta.SnapshotsOnStore.UpdateTx(tx, t.kid.GetId(), 0, func(k *stowagev1.SnapshotOnStore) error {
			k.ParentRefId = parentRef
			if info.PhysicalSize > 0 {
				k.PhysicalSize = info.PhysicalSize
			}
			return nil
		}); err != nil {
			return err
		}
		_, err := meta.Snapshots.UpdateTx(tx, t.kid.GetSnapshotId(), 0, func(k *stowagev1.Snapshot) error {
			if k.GetParentId() == sn.GetId() {
				k.ParentId = parentSnap
			}
			return nil
		})
		return err
	})
	if err != nil {
		return false, err
	}
	rep.Result("snapshot %s merged: %s", sn.GetId(), t)
	return true, nil
}

// letGo puts volume id back to Ready after job's merges, if job holds it.
func (s *Service) letGo(ctx context.Context, job *stowagev1.Job, id string) error {
	v, err := s.db.Volumes().Get(ctx, id)
	if err != nil || v.GetBusyJobId() != job.GetId() {
		return err
	}
	_, err = s.db.Volumes().Transition(ctx, id, meta.VolumeOperationSucceeded, func(v *stowagev1.Volume) error {
		v.BusyJobId, v.Error = "", ""
		return nil
	})
	return err
}

package snapshot

import (
	"context"
	"fmt"
	"time"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/volume"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Access. GrantAccess asks the primary store's driver for what a host
// reads the snapshot with, read-only (drivers.PurposeAttach of a snapshot
// object): its file for a host that reaches the store, an NBD export of its
// guest view (its backing chain read through) from an agent that does for
// one that does not — what a backup application reads. A revocable grant
// is recorded on the primary copy (SnapshotOnStore.nbd_export_uri, for
// attached_host_id): one export at a time, a grant again to the same host
// replaces it, and while one is held no snapshot of the volume is deleted
// (a merge would rewrite files the export reads). RevokeAccess ends it
// through the driver and clears the record.

// primaryRef returns snapshot id's Ready copy on a primary store, that
// store, its volume and the snapshot's data object and driver.
func (s *Service) primaryRef(ctx context.Context, id string) (*stowagev1.Snapshot, *stowagev1.SnapshotOnStore, drivers.SnapshotObject, drivers.Driver, error) {
	sn, refs, err := s.Get(ctx, id)
	if err != nil {
		return nil, nil, drivers.SnapshotObject{}, nil, err
	}
	for _, r := range refs {
		if r.GetRole() != stowagev1.StoreRole_STORE_ROLE_PRIMARY || r.GetState() != stowagev1.ObjectState_OBJECT_STATE_READY {
			continue
		}
		st, err := s.db.Stores().Get(ctx, r.GetStoreId())
		if err != nil {
			return nil, nil, drivers.SnapshotObject{}, nil, err
		}
		v, err := s.db.Volumes().Get(ctx, sn.GetVolumeId())
		if err != nil {
			return nil, nil, drivers.SnapshotObject{}, nil, err
		}
		obj, _, err := s.snapshotOf(ctx, st, v, r)
		if err != nil {
			return nil, nil, drivers.SnapshotObject{}, nil, err
		}
		d, err := s.stores.Driver(st)
		if err != nil {
			return nil, nil, drivers.SnapshotObject{}, nil, err
		}
		return sn, r, obj, d, nil
	}
	return nil, nil, drivers.SnapshotObject{}, nil, fmt.Errorf("snapshot %s has no Ready copy on a primary store (a backup is restored into a volume instead): %w", sn.GetId(), errdefs.ErrFailedPrecondition)
}

// GrantAccess returns a URI host reads snapshot id with (read-only), and
// when it stops working (zero: never).
func (s *Service) GrantAccess(ctx context.Context, id, hostID string, ttl time.Duration) (string, time.Time, error) {
	if ttl < 0 {
		return "", time.Time{}, fmt.Errorf("grant access to snapshot %s: negative TTL %s: %w", id, ttl, errdefs.ErrInvalid)
	}
	if hostID == "" {
		return "", time.Time{}, fmt.Errorf("grant access to snapshot %s: no host: %w", id, errdefs.ErrInvalid)
	}
	if _, err := s.db.Hosts().Get(ctx, hostID); err != nil {
		return "", time.Time{}, fmt.Errorf("grant host %s access to snapshot %s: %w", hostID, id, err)
	}
	sn, r, obj, d, err := s.primaryRef(ctx, id)
	if err != nil {
		return "", time.Time{}, err
	}
	switch sn.GetState() {
	case stowagev1.SnapshotState_SNAPSHOT_STATE_CREATED_ON_PRIMARY, stowagev1.SnapshotState_SNAPSHOT_STATE_BACKING_UP,
		stowagev1.SnapshotState_SNAPSHOT_STATE_BACKED_UP, stowagev1.SnapshotState_SNAPSHOT_STATE_COPYING:
	default:
		return "", time.Time{}, fmt.Errorf("snapshot %s is %s: %w", sn.GetId(), meta.SnapshotStateName(sn.GetState()), errdefs.ErrFailedPrecondition)
	}
	client := drivers.Client{HostID: hostID, Purpose: drivers.PurposeAttach, TTL: ttl}
	acc, err := d.GrantAccess(ctx, obj.DataObject, client)
	if err != nil {
		return "", time.Time{}, fmt.Errorf("grant host %s access to snapshot %s: %w", hostID, sn.GetId(), err)
	}
	if !acc.ReadOnly {
		if acc.Revocable {
			_ = d.RevokeAccess(context.WithoutCancel(ctx), obj.DataObject, client, acc)
		}
		return "", time.Time{}, fmt.Errorf("store %s granted writable access to snapshot %s; a snapshot is read only: %w", r.GetStoreId(), sn.GetId(), errdefs.ErrInternal)
	}
	var old string
	_, err = s.db.SnapshotsOnStore().Update(ctx, r.GetId(), 0, func(r *stowagev1.SnapshotOnStore) error {
		held := r.NbdExportUri != "" && r.AttachedHostId != hostID
		switch {
		case held && acc.Revocable:
			return fmt.Errorf("snapshot %s is read by host %s through an export; revoke that first: %w", sn.GetId(), r.AttachedHostId, errdefs.ErrFailedPrecondition)
		case held:
		case acc.Revocable:
			old, r.NbdExportUri, r.AttachedHostId = r.NbdExportUri, string(acc.URI), hostID
		default:
			r.AttachedHostId = hostID
		}
		return nil
	})
	if err != nil {
		if acc.Revocable {
			_ = d.RevokeAccess(context.WithoutCancel(ctx), obj.DataObject, client, acc)
		}
		return "", time.Time{}, err
	}
	if old != "" && old != string(acc.URI) {
		if err := volume.RevokeRecordedExport(ctx, s.db, d, obj.DataObject, client, old); err != nil {
			s.log.Warn("could not end the previous export", "snapshot", sn.GetId(), "err", err)
		}
	}
	return string(acc.URI), acc.Expires, nil
}

// RevokeAccess withdraws a host's access to snapshot id; an export granted
// to it is removed (its connections closed) before the record forgets it.
func (s *Service) RevokeAccess(ctx context.Context, id, hostID string) error {
	sn, r, obj, d, err := s.primaryRef(ctx, id)
	if err != nil {
		return err
	}
	client := drivers.Client{HostID: hostID, Purpose: drivers.PurposeAttach}
	uri := r.GetNbdExportUri()
	if uri != "" && r.GetAttachedHostId() == hostID {
		if err := volume.RevokeRecordedExport(ctx, s.db, d, obj.DataObject, client, uri); err != nil {
			return fmt.Errorf("revoke host %s access to snapshot %s: %w", hostID, sn.GetId(), err)
		}
	}
	_, err = s.db.SnapshotsOnStore().Update(ctx, r.GetId(), 0, func(r *stowagev1.SnapshotOnStore) error {
		if r.AttachedHostId == hostID {
			r.AttachedHostId = ""
			if r.NbdExportUri == uri {
				r.NbdExportUri = ""
			}
		}
		return nil
	})
	return err
}

// granted returns a snapshot of volume volumeID whose primary copy is
// granted to a host ("" when none).
func (s *Service) granted(ctx context.Context, volumeID string) (string, string, error) {
	sns, err := s.List(ctx, volumeID, stowagev1.SnapshotState_SNAPSHOT_STATE_UNSPECIFIED, "", 0)
	if err != nil {
		return "", "", err
	}
	for _, sn := range sns {
		_, refs, err := s.Get(ctx, sn.GetId())
		if err != nil {
			continue
		}
		for _, r := range refs {
			if r.GetAttachedHostId() != "" {
				return sn.GetId(), r.GetAttachedHostId(), nil
			}
		}
	}
	return "", "", nil
}

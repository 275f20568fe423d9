package volume

import (
	"context"
	"fmt"
	"net/url"
	"time"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Access. GrantAccess asks the volume's store driver for what a hypervisor
// on the host opens (drivers.PurposeAttach): a file:// path for a host
// that reaches a filesystem store, an nbd:// export served by an agent
// that does for one that does not, whatever another provider hands out.
// A revocable grant (an export) is recorded on the volume
// (Volume.nbd_export_uri, for attached_host_id); the serving agent is the
// host whose nbd_address is the URI's host:port. A grant again to the same
// host replaces it (so one lost by an agent restart comes back); a grant
// to another host while one is recorded is refused. RevokeAccess ends it
// through the driver and clears both fields. A grant lasts ttl (an export
// ends by itself then); zero: no expiry, since a running VM must not lose
// its disk.

// GrantAccess returns a URI host can open the volume with, and when it
// stops working (zero: never).
func (s *Service) GrantAccess(ctx context.Context, idOrName, hostID string, ttl time.Duration) (string, time.Time, error) {
	uri, acc, err := s.grantAccess(ctx, idOrName, hostID, ttl)
	return uri, acc.Expires, err
}

func (s *Service) grantAccess(ctx context.Context, idOrName, hostID string, ttl time.Duration) (string, drivers.Access, error) {
	if ttl < 0 {
		return "", drivers.Access{}, fmt.Errorf("grant access to volume %s: negative TTL %s: %w", idOrName, ttl, errdefs.ErrInvalid)
	}
	v, obj, d, err := s.object(ctx, idOrName)
	if err != nil {
		return "", drivers.Access{}, err
	}
	if v.GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
		return "", drivers.Access{}, busy(v, fmt.Errorf("volume %s is %s: %w", v.GetName(), meta.VolumeStateName(v.GetState()), errdefs.ErrFailedPrecondition))
	}
	if hostID == "" {
		return "", drivers.Access{}, fmt.Errorf("grant access to volume %s: no host: %w", v.GetName(), errdefs.ErrInvalid)
	}
	if _, err := s.db.Hosts().Get(ctx, hostID); err != nil {
		return "", drivers.Access{}, fmt.Errorf("grant host %s access to volume %s: host %s: %w", hostID, v.GetName(), hostID, err)
	}
	client := drivers.Client{HostID: hostID, Purpose: drivers.PurposeAttach, TTL: ttl}
	acc, err := d.GrantAccess(ctx, obj, client)
	if err != nil {
		return "", drivers.Access{}, fmt.Errorf("grant host %s access to volume %s: %w", hostID, v.GetName(), err)
	}
	var old string
	_, err = s.db.Volumes().Update(ctx, v.GetId(), 0, func(v *stowagev1.Volume) error {
		held := v.NbdExportUri != "" && v.AttachedHostId != hostID
		switch {
		case held && acc.Revocable:
			// One export per volume: another host holds it.
			return fmt.Errorf("volume %s is attached to host %s through an export; revoke that first: %w", v.GetName(), v.AttachedHostId, errdefs.ErrFailedPrecondition)
		case held:
			// A direct grant (file://) to another host: the export stays
			// recorded for its host.
		case acc.Revocable:
			old, v.NbdExportUri, v.AttachedHostId = v.NbdExportUri, string(acc.URI), hostID
		default:
			v.AttachedHostId = hostID
		}
		return nil
	})
	if err != nil {
		if acc.Revocable {
			_ = d.RevokeAccess(context.WithoutCancel(ctx), obj, client, acc)
		}
		return "", drivers.Access{}, err
	}
	if old != "" && old != string(acc.URI) {
		if err := s.revokeExport(ctx, d, obj, client, old); err != nil {
			s.log.Warn("could not end the previous export", "volume", v.GetId(), "err", err)
		}
	}
	return string(acc.URI), acc, nil
}

// RevokeAccess withdraws a host's access; an export granted to it is
// removed (its connections closed) before the record forgets it.
func (s *Service) RevokeAccess(ctx context.Context, idOrName, hostID string) error {
	v, obj, d, err := s.object(ctx, idOrName)
	if err != nil {
		return err
	}
	client := drivers.Client{HostID: hostID, Purpose: drivers.PurposeAttach}
	uri := v.GetNbdExportUri()
	if uri != "" && v.GetAttachedHostId() == hostID {
		if err := s.revokeExport(ctx, d, obj, client, uri); err != nil {
			return fmt.Errorf("revoke host %s access to volume %s: %w", hostID, v.GetName(), err)
		}
	} else if err := d.RevokeAccess(ctx, obj, client, drivers.Access{}); err != nil {
		return err
	}
	_, err = s.db.Volumes().Update(ctx, v.GetId(), 0, func(v *stowagev1.Volume) error {
		if v.AttachedHostId == hostID {
			v.AttachedHostId = ""
			if v.NbdExportUri == uri {
				v.NbdExportUri = ""
			}
		}
		return nil
	})
	return err
}

func (s *Service) revokeExport(ctx context.Context, d drivers.Driver, obj drivers.DataObject, client drivers.Client, uri string) error {
	return RevokeRecordedExport(ctx, s.db, d, obj, client, uri)
}

// RevokeRecordedExport ends the export at uri, recorded on obj's record,
// through the driver; the serving host is the one whose nbd_address is the
// URI's host:port (no such host: its exports ended with it).
func RevokeRecordedExport(ctx context.Context, db *meta.DB, d drivers.Driver, obj drivers.DataObject, client drivers.Client, uri string) error {
	u, err := url.Parse(uri)
	if err != nil || u.Host == "" {
		return fmt.Errorf("%q is not an export URI: %w", uri, errdefs.ErrInvalid)
	}
	hosts, err := db.Hosts().List(ctx, meta.Filter[*stowagev1.Host]{})
	if err != nil {
		return err
	}
	for _, h := range hosts {
		if h.GetNbdAddress() == u.Host {
			return d.RevokeAccess(ctx, obj, client, drivers.Access{URI: drivers.URI(uri), Revocable: true, HostID: h.GetId()})
		}
	}
	return nil
}

// object returns volume idOrName, its data object and its store's driver.
func (s *Service) object(ctx context.Context, idOrName string) (*stowagev1.Volume, drivers.DataObject, drivers.Driver, error) {
	v, err := s.Get(ctx, idOrName)
	if err != nil {
		return nil, drivers.DataObject{}, nil, err
	}
	st, err := s.db.Stores().Get(ctx, v.GetStoreId())
	if err != nil {
		return nil, drivers.DataObject{}, nil, err
	}
	d, err := s.stores.Driver(st)
	if err != nil {
		return nil, drivers.DataObject{}, nil, err
	}
	obj, err := VolumeObject(st, v)
	return v, obj, d, err
}

package volume

import (
	"context"
	"fmt"
	"net/url"
	"strings"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Access through NBD. A host outside the scope of a volume's store cannot
// open its file; GrantAccess then has an Up agent that reaches the store
// export the volume over NBD under an unguessable name and records the
// nbd:// URI on the volume (Volume.nbd_export_uri, for attached_host_id).
// The exporting agent is the host whose nbd_address is the URI's host:port.
// A grant again to the same host replaces the export (so one lost by an
// agent restart comes back); a grant to another host while one is recorded
// is refused. RevokeAccess unexports it and clears both fields.

// hostInScope reports whether hostID is known and in the scope of obj's store.
func (s *Service) hostInScope(ctx context.Context, obj drivers.DataObject, hostID string) (bool, error) {
	h, err := s.db.Hosts().Get(ctx, hostID)
	if err != nil {
		return false, fmt.Errorf("host %s: %w", hostID, err)
	}
	return obj.Store.Scope.Contains(h.GetZone(), h.GetCluster(), h.GetId()), nil
}

// grantNBD exports the volume from an agent that reaches its store and
// records the URI for hostID.
func (s *Service) grantNBD(ctx context.Context, v *stowagev1.Volume, obj drivers.DataObject, hostID string) (string, error) {
	if old := v.GetNbdExportUri(); old != "" && v.GetAttachedHostId() != hostID {
		return "", fmt.Errorf("volume %s is attached to host %s through NBD; revoke that first: %w", v.GetName(), v.GetAttachedHostId(), errdefs.ErrFailedPrecondition)
	}
	ch, err := s.sel.Select(ctx, "", obj.Store.Scope)
	if err != nil {
		return "", fmt.Errorf("no agent can serve volume %s to host %s over NBD: %w", v.GetName(), hostID, err)
	}
	h, err := s.db.Hosts().Get(ctx, ch.HostID)
	if err != nil {
		return "", err
	}
	if h.GetNbdAddress() == "" {
		return "", fmt.Errorf("host %s (which reaches store %s) serves no NBD (agent --nbd-listen): %w", ch.HostID, obj.Store.Name, errdefs.ErrUnavailable)
	}
	path := strings.TrimRight(obj.Store.Details["path"], "/") + "/" + v.GetInstallPath()
	uri, err := ch.Endpoint.ExportNBD(ctx, drivers.NBDExportRequest{Path: path, Format: obj.Format})
	if err != nil {
		return "", err
	}
	var old string
	_, err = s.db.Volumes().Update(ctx, v.GetId(), 0, func(v *stowagev1.Volume) error {
		if v.NbdExportUri != "" && v.AttachedHostId != hostID {
			return fmt.Errorf("volume %s was attached to host %s meanwhile: %w", v.GetName(), v.AttachedHostId, errdefs.ErrConflict)
		}
		old = v.NbdExportUri
		v.AttachedHostId, v.NbdExportUri = hostID, string(uri)
		return nil
	})
	if err != nil {
		_ = ch.Endpoint.UnexportNBD(context.WithoutCancel(ctx), uri)
		return "", err
	}
	if old != "" && old != string(uri) {
		if err := s.unexportNBD(ctx, old); err != nil {
			s.log.Warn("could not end the previous NBD export", "volume", v.GetId(), "uri", old, "err", err)
		}
	}
	return string(uri), nil
}

// unexportNBD ends the export at uri through the host serving it (the one
// whose nbd_address is the URI's host:port). No such host is
// errdefs.ErrNotFound (its exports ended with it); a host that is not Up is
// errdefs.ErrUnavailable, since a partitioned agent may still serve it.
func (s *Service) unexportNBD(ctx context.Context, uri string) error {
	u, err := url.Parse(uri)
	if err != nil || u.Scheme != "nbd" || u.Host == "" {
		return fmt.Errorf("%q is not an nbd:// URI: %w", uri, errdefs.ErrInvalid)
	}
	hosts, err := s.db.Hosts().List(ctx, meta.Filter[*stowagev1.Host]{})
	if err != nil {
		return err
	}
	for _, h := range hosts {
		if h.GetNbdAddress() != u.Host {
			continue
		}
		ep, err := s.sel.ForHost(ctx, h.GetId())
		if err != nil {
			return err
		}
		return ep.UnexportNBD(ctx, drivers.URI(uri))
	}
	return fmt.Errorf("no host serves NBD at %s: %w", u.Host, errdefs.ErrNotFound)
}

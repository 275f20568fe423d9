package iscsi

import (
	"context"
	"fmt"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/hostops"
)

var _ drivers.GrantLister = (*Driver)(nil)

// ListGrants implements drivers.GrantLister: the NBD exports GrantAccess
// made on the store's target host for hosts that cannot log in to iSCSI
// targets (an iSCSI grant itself is an ACL entry, nothing to list or
// revoke). Each Access names the target host; RevokeAccess ends it there.
// A target host that is not Up is errdefs.ErrUnavailable.
func (d *Driver) ListGrants(ctx context.Context, info drivers.StoreInfo) ([]drivers.Grant, error) {
	grants, err := d.listGrants(ctx, info)
	if err != nil {
		return nil, fmt.Errorf("list grants of iSCSI store %s: %w", info.ID, err)
	}
	return grants, nil
}

func (d *Driver) listGrants(ctx context.Context, info drivers.StoreInfo) ([]drivers.Grant, error) {
	s, err := storeOf(info)
	if err != nil {
		return nil, err
	}
	h, err := d.hosts.ForHost(ctx, s.targetHost)
	if err != nil {
		return nil, fmt.Errorf("target host %s: %w", s.targetHost, err)
	}
	list, err := h.ListExports(ctx, s.id)
	if err != nil {
		return nil, fmt.Errorf("target host %s: %w", s.targetHost, err)
	}
	grants := make([]drivers.Grant, 0, len(list))
	for _, x := range list {
		if x.Kind != hostops.ExportNBD {
			continue // not one GrantAccess makes
		}
		grants = append(grants, hostops.GrantOf(s.targetHost, x))
	}
	return grants, nil
}

package motion

import (
	"context"
	"fmt"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// Mover is the DataMotionService's executor: one path that moves an
// object's bytes into another object, whatever the pair of providers.
//
//  1. The destination's driver is asked first: CanCopy → a driver-native
//     copy (reflink inside one filesystem store, server-side copy inside
//     one bucket, an array clone).
//  2. Otherwise an endpoint host is picked (EndPointSelector): one in the
//     scope of both stores when there is one, else one in the
//     destination's scope. The source's driver grants that host read
//     access (store://, a presigned https:// URL, an http:// or nbd://
//     export on an agent that reaches it), the destination's driver grants
//     it write access (store://), and the host's stream engine copies URI
//     to object. Granted exports are revoked when the copy ends.
type Mover struct {
	providers *drivers.Registry
	hosts     HostPicker
}

// NewMover returns a Mover over the registered providers and the selector.
func NewMover(providers *drivers.Registry, hosts HostPicker) *Mover {
	return &Mover{providers: providers, hosts: hosts}
}

// Move is one data motion.
type Move struct {
	Src, Dst drivers.DataObject
	// Flatten makes the destination a standalone image (a qcow2 chain is
	// read through and written as one image).
	Flatten bool
	// Standalone says the source is one self-contained file (no backing
	// chain), so an export of its bytes carries all of it.
	Standalone bool
	// Prefer is the host the plan chose, if any.
	Prefer string
}

func (m *Mover) driver(obj drivers.DataObject) (drivers.Driver, error) {
	p, err := m.providers.Get(obj.Store.Provider)
	if err != nil {
		return nil, fmt.Errorf("store %s: %w", obj.Store.Name, err)
	}
	return p.Driver(), nil
}

// Copy runs mv and returns what the destination holds.
func (m *Mover) Copy(ctx context.Context, mv Move, progress drivers.Progress) (drivers.ObjectInfo, error) {
	sd, err := m.driver(mv.Src)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	dd, err := m.driver(mv.Dst)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	if !mv.Flatten && dd.CanCopy(mv.Src, mv.Dst) {
		return dd.Copy(drivers.WithHost(ctx, mv.Prefer), mv.Src, mv.Dst, progress)
	}
	ch, err := m.hosts.Select(ctx, mv.Prefer, mv.Src.Store.Scope, mv.Dst.Store.Scope)
	if err != nil {
		if ch, err = m.hosts.Select(ctx, mv.Prefer, mv.Dst.Store.Scope); err != nil {
			return drivers.ObjectInfo{}, err
		}
	}
	ctx = drivers.WithHost(ctx, ch.HostID)
	reader := drivers.Client{HostID: ch.HostID, Purpose: drivers.PurposeRead}
	src, err := sd.GrantAccess(ctx, mv.Src, reader)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("read access to %s %s for host %s: %w", mv.Src.Type, mv.Src.ID, ch.HostID, err)
	}
	defer func() {
		if src.Revocable {
			_ = sd.RevokeAccess(context.WithoutCancel(ctx), mv.Src, reader, src)
		}
	}()
	if _, local, _ := hostops.ParseRef(src.URI); !local && !mv.Standalone {
		return drivers.ObjectInfo{}, fmt.Errorf("%s %s reads through a backing chain and host %s reaches its store only through an export of one file; "+
			"no host reaches both stores: %w", mv.Src.Type, mv.Src.ID, ch.HostID, errdefs.ErrFailedPrecondition)
	}
	writer := drivers.Client{HostID: ch.HostID, Purpose: drivers.PurposeWrite}
	dst, err := dd.GrantAccess(ctx, mv.Dst, writer)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("write access to %s %s for host %s: %w", mv.Dst.Type, mv.Dst.ID, ch.HostID, err)
	}
	defer func() {
		if dst.Revocable {
			_ = dd.RevokeAccess(context.WithoutCancel(ctx), mv.Dst, writer, dst)
		}
	}()
	ref, ok, err := hostops.ParseRef(dst.URI)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	if !ok {
		return drivers.ObjectInfo{}, fmt.Errorf("store %s (provider %s) takes no stream from a host (its write access is not a store object): %w",
			mv.Dst.Store.Name, mv.Dst.Store.Provider, errdefs.ErrNotImplemented)
	}
	info, err := ch.Endpoint.CopyImage(ctx, hostops.CopyRequest{
		Source: src.URI, SourceFormat: mv.Src.Format, Dest: ref, Format: mv.Dst.Format, Flatten: mv.Flatten,
	}, progress)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	return info.Object(mv.Dst), nil
}

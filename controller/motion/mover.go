package motion

import (
	"context"
	"errors"
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
//     to object. A host that does not reach the source's store reads it
//     over NBD from one that does (Transport "nbd": block status keeps
//     holes off the wire), as its guest view when the copy flattens
//     (Client.GuestView: a qcow2 chain read through on the source's host),
//     else as stored. Granted exports are revoked when the copy ends.
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
	// Backing, when set, is an object of the destination's store that
	// reads exactly as the source's backing (the same template's copy
	// there): the source, a qcow2 overlay, travels as stored, and the copy
	// names Backing as its backing file, its chain kept. Not with Flatten.
	Backing *drivers.DataObject
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
	// A snapshot a driver copies natively comes out as its guest view
	// (the CanCopy contract), so a flattening copy of one may be native.
	if (!mv.Flatten || mv.Src.Type == drivers.ObjectSnapshot) && dd.CanCopy(mv.Src, mv.Dst) {
		return dd.Copy(drivers.WithHost(ctx, mv.Prefer), mv.Src, mv.Dst, progress)
	}
	// Only a host that reaches both stores' objects (capabilities their
	// drivers need, such as a LUN's userspace initiator) moves the bytes.
	ctx = drivers.WithNeeds(ctx, drivers.NeedsOf(sd, dd)...)
	ch, err := m.hosts.Select(ctx, mv.Prefer, mv.Src.Store.Scope, mv.Dst.Store.Scope)
	both := err == nil
	if !both {
		if ch, err = m.hosts.Select(ctx, mv.Prefer, mv.Dst.Store.Scope); err != nil {
			return drivers.ObjectInfo{}, err
		}
	}
	ctx = drivers.WithHost(ctx, ch.HostID)
	reader := drivers.Client{HostID: ch.HostID, Purpose: drivers.PurposeRead}
	if !both {
		// Agent to agent: the source over NBD, whose block status keeps
		// holes off the wire; a flattening copy reads the guest view.
		reader.Transport, reader.GuestView = "nbd", mv.Flatten
	}
	src, err := sd.GrantAccess(ctx, mv.Src, reader)
	if err != nil && reader.Transport != "" && (errdefs.IsFailedPrecondition(err) || errors.Is(err, errdefs.ErrInvalid)) {
		// A driver that reads no other way: what it gives by default.
		reader.Transport, reader.GuestView = "", false
		src, err = sd.GrantAccess(ctx, mv.Src, reader)
	}
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("read access to %s %s for host %s: %w", mv.Src.Type, mv.Src.ID, ch.HostID, err)
	}
	defer func() {
		if src.Revocable {
			_ = sd.RevokeAccess(context.WithoutCancel(ctx), mv.Src, reader, src)
		}
	}()
	srcFormat := mv.Src.Format
	if src.Format != "" {
		srcFormat = src.Format // the guest view: a chain already read through
	}
	if _, local, _ := hostops.ParseRef(src.URI); !local && !mv.Standalone && mv.Backing == nil && src.Format == "" {
		return drivers.ObjectInfo{}, fmt.Errorf("%s %s reads through a backing chain and host %s reaches its store only through an export of one file; "+
			"no host reaches both stores: %w", mv.Src.Type, mv.Src.ID, ch.HostID, errdefs.ErrFailedPrecondition)
	}
	writer := drivers.Client{HostID: ch.HostID, Purpose: drivers.PurposeWrite}
	dst, err := dd.GrantAccess(ctx, mv.Dst, writer)
	if _, isImporter := dd.(drivers.Importer); isImporter && (errdefs.IsFailedPrecondition(err) || errors.Is(err, errdefs.ErrNotImplemented)) {
		// A store that takes objects only by import (an object store),
		// from a URL the driver's default read access gives.
		if reader.Transport != "" {
			if src.Revocable {
				_ = sd.RevokeAccess(context.WithoutCancel(ctx), mv.Src, reader, src)
			}
			reader.Transport, reader.GuestView = "", false
			if src, err = sd.GrantAccess(ctx, mv.Src, reader); err != nil {
				src = drivers.Access{}
				return drivers.ObjectInfo{}, fmt.Errorf("read access to %s %s for host %s: %w", mv.Src.Type, mv.Src.ID, ch.HostID, err)
			}
		}
		return m.importInto(ctx, ch.HostID, ch.Endpoint, sd, dd.(drivers.Importer), mv, src, progress)
	}
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("write access to %s %s for host %s: %w", mv.Dst.Type, mv.Dst.ID, ch.HostID, err)
	}
	defer func() {
		if dst.Revocable {
			_ = dd.RevokeAccess(context.WithoutCancel(ctx), mv.Dst, writer, dst)
		}
	}()
	req := hostops.CopyRequest{Source: src.URI, SourceFormat: srcFormat, Format: mv.Dst.Format, Flatten: mv.Flatten}
	if req.Dest, req.DestURI, req.DestIsZero, err = hostops.WriteGrant(dst); err != nil {
		return drivers.ObjectInfo{}, err
	}
	if mv.Backing != nil {
		release, err := m.rebaseOnto(ctx, dd, ch.HostID, *mv.Backing, &req)
		if err != nil {
			return drivers.ObjectInfo{}, err
		}
		defer release()
	}
	info, err := ch.Endpoint.CopyImage(ctx, req, progress)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	return info.Object(mv.Dst), nil
}

// rebaseOnto makes req's copy name backing (an object of the destination
// store, which host reads as a store object) as its backing file; release
// ends the access it took.
func (m *Mover) rebaseOnto(ctx context.Context, dd drivers.Driver, host string, backing drivers.DataObject, req *hostops.CopyRequest) (release func(), err error) {
	if req.Flatten || req.Dest == (hostops.Ref{}) {
		return nil, fmt.Errorf("a copy onto %s %s keeps its chain: it is neither flattened nor written to a granted URI: %w", backing.Type, backing.ID, errdefs.ErrInvalid)
	}
	c := drivers.Client{HostID: host, Purpose: drivers.PurposeRead, Transport: "store"}
	a, err := dd.GrantAccess(ctx, backing, c)
	if err != nil {
		return nil, fmt.Errorf("backing %s %s for host %s: %w", backing.Type, backing.ID, host, err)
	}
	release = func() {
		if a.Revocable {
			_ = dd.RevokeAccess(context.WithoutCancel(ctx), backing, c, a)
		}
	}
	ref, local, err := hostops.ParseRef(a.URI)
	if err != nil || !local || ref.Store != req.Dest.Store {
		release()
		return nil, fmt.Errorf("backing %s %s is not an object host %s opens in store %s (%v): %w", backing.Type, backing.ID, host, req.Dest.Store, err, errdefs.ErrFailedPrecondition)
	}
	req.Backing, req.BackingFormat = ref, backing.Format
	return release, nil
}

// importInto moves mv.Src into a destination whose driver takes objects
// only by import (an object store that no host writes to): the driver
// imports from an http(s) URL of the source's bytes as the destination
// wants them. A source already readable so (a presigned URL, or an export
// of a standalone image in the wanted format) is imported from directly.
// Otherwise host h, which serves the source's store, first writes a
// standalone copy in the wanted format to a staging object of that store
// (a key its driver gives), exports it read-only over HTTP, and removes it
// when the import ends.
func (m *Mover) importInto(ctx context.Context, hostID string, h hostops.Host, sd drivers.Driver, imp drivers.Importer, mv Move, src drivers.Access, progress drivers.Progress) (drivers.ObjectInfo, error) {
	_, local, _ := hostops.ParseRef(src.URI)
	direct := !local && (mv.Standalone || !mv.Flatten) && mv.Src.Format == mv.Dst.Format
	url := string(src.URI)
	if !direct {
		if !local {
			return drivers.ObjectInfo{}, fmt.Errorf("%s %s must be flattened or converted before store %s imports it, and host %s does not serve its store: %w",
				mv.Src.Type, mv.Src.ID, mv.Dst.Store.Name, hostID, errdefs.ErrFailedPrecondition)
		}
		stage := drivers.DataObject{ID: "motion-" + mv.Dst.ID, Type: drivers.ObjectTemplate, Store: mv.Src.Store, Format: mv.Dst.Format}
		key, err := sd.Locate(stage)
		if err != nil {
			return drivers.ObjectInfo{}, fmt.Errorf("stage %s %s for store %s: %w", mv.Src.Type, mv.Src.ID, mv.Dst.Store.Name, err)
		}
		ref := hostops.Ref{Store: mv.Src.Store.ID, Key: key}
		defer func() { _ = h.DeleteObject(context.WithoutCancel(ctx), ref) }()
		if _, err := h.CopyImage(ctx, hostops.CopyRequest{Source: src.URI, SourceFormat: mv.Src.Format, Dest: ref, Format: mv.Dst.Format, Flatten: true}, nil); err != nil {
			return drivers.ObjectInfo{}, err
		}
		// Unexported when the import ends; the TTL ends it if this
		// controller does not live to.
		u, err := h.Export(ctx, ref, drivers.DefaultGrantTTL)
		if err != nil {
			return drivers.ObjectInfo{}, err
		}
		defer func() { _ = h.Unexport(context.WithoutCancel(ctx), u) }()
		url = string(u)
	}
	info, err := imp.Import(ctx, mv.Dst, drivers.ImportSource{URL: url, Internal: true}, progress)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	if info.Method == "" {
		info.Method = "import"
	}
	return info, nil
}

package filesystem

import (
	"context"
	"fmt"
	"net/url"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	"github.com/stowage/stowage/redact"
)

// snapshotRequest checks snap (a snapshot of a volume of the same primary
// store, in the volume's format) and returns the host request naming both.
func snapshotRequest(snap drivers.SnapshotObject) (hostops.SnapshotRequest, drivers.DataObject, error) {
	vol := snap.Volume
	if vol.Type != drivers.ObjectVolume {
		return hostops.SnapshotRequest{}, drivers.DataObject{}, fmt.Errorf("snapshot %s names a %s %s as its volume: %w", snap.ID, vol.Type, vol.ID, errdefs.ErrInvalid)
	}
	if vol.Store.ID != snap.Store.ID {
		return hostops.SnapshotRequest{}, drivers.DataObject{}, fmt.Errorf("snapshot %s is on store %s, its volume %s on store %s; a snapshot starts on its volume's store: %w",
			snap.ID, snap.Store.ID, vol.ID, vol.Store.ID, errdefs.ErrInvalid)
	}
	obj := snap.DataObject
	obj.Type = drivers.ObjectSnapshot
	if obj.Format == "" {
		obj.Format = vol.Format
	}
	if obj.Format != vol.Format {
		return hostops.SnapshotRequest{}, drivers.DataObject{}, fmt.Errorf("snapshot %s has format %s, its volume %s: a snapshot has its volume's format: %w",
			snap.ID, obj.Format, vol.Format, errdefs.ErrInvalid)
	}
	if vol.Store.Role != drivers.RolePrimary {
		return hostops.SnapshotRequest{}, drivers.DataObject{}, fmt.Errorf("store %s is a %s store; snapshots are taken on primary stores: %w", vol.Store.ID, vol.Store.Role, errdefs.ErrInvalid)
	}
	vref, err := objectRef(vol)
	if err != nil {
		return hostops.SnapshotRequest{}, drivers.DataObject{}, err
	}
	sref, err := objectRef(obj)
	if err != nil {
		return hostops.SnapshotRequest{}, drivers.DataObject{}, err
	}
	return hostops.SnapshotRequest{Volume: vref, Snapshot: sref, Format: vol.Format}, obj, nil
}

// TakeSnapshot has a host in scope make snap a point-in-time copy of
// snap.Volume at the snapshot's key: a qcow2 volume gets an external
// snapshot (its file becomes the snapshot, a new overlay the volume), a
// raw one a reflink or a sparse copy; ObjectInfo.Method says which.
func (d *Driver) TakeSnapshot(ctx context.Context, snap drivers.SnapshotObject) (drivers.ObjectInfo, error) {
	info, err := d.takeSnapshot(ctx, snap)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("snapshot %s of volume %s on filesystem store %s: %w", snap.ID, snap.Volume.ID, snap.Store.ID, err)
	}
	return info, nil
}

func (d *Driver) takeSnapshot(ctx context.Context, snap drivers.SnapshotObject) (drivers.ObjectInfo, error) {
	req, obj, err := snapshotRequest(snap)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	h, err := d.host(ctx, snap.Volume.Store)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	si, err := h.SnapshotImage(ctx, req)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	info := imageObject(obj, req.Snapshot.Key, si.Snapshot)
	info.Method = si.Method
	return info, nil
}

// RevertSnapshot has a host in scope make snap.Volume read what snap
// holds (a new overlay on a qcow2 snapshot, a reflink or copy of a raw
// one); the volume's other snapshots stay valid.
func (d *Driver) RevertSnapshot(ctx context.Context, snap drivers.SnapshotObject) error {
	if err := d.revertSnapshot(ctx, snap); err != nil {
		return fmt.Errorf("revert volume %s to snapshot %s on filesystem store %s: %w", snap.Volume.ID, snap.ID, snap.Store.ID, err)
	}
	return nil
}

func (d *Driver) revertSnapshot(ctx context.Context, snap drivers.SnapshotObject) error {
	req, _, err := snapshotRequest(snap)
	if err != nil {
		return err
	}
	h, err := d.host(ctx, snap.Volume.Store)
	if err != nil {
		return err
	}
	if _, err := h.RevertImage(ctx, req); err != nil {
		return fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	return nil
}

// Resize grows obj to newSize bytes on a host in scope; shrinking is
// refused by the host (errdefs.ErrInvalid).
func (d *Driver) Resize(ctx context.Context, obj drivers.DataObject, newSize int64) (drivers.ObjectInfo, error) {
	info, err := d.resize(ctx, obj, newSize)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("resize %s %s on filesystem store %s to %d bytes: %w", obj.Type, obj.ID, obj.Store.ID, newSize, err)
	}
	return info, nil
}

func (d *Driver) resize(ctx context.Context, obj drivers.DataObject, newSize int64) (drivers.ObjectInfo, error) {
	if obj.Type != drivers.ObjectVolume {
		return drivers.ObjectInfo{}, fmt.Errorf("only volumes are resized: %w", errdefs.ErrInvalid)
	}
	if newSize <= 0 || newSize%512 != 0 {
		return drivers.ObjectInfo{}, fmt.Errorf("size %d is not a positive multiple of 512 bytes: %w", newSize, errdefs.ErrInvalid)
	}
	ref, err := objectRef(obj)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	h, err := d.host(ctx, obj.Store)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	ii, err := h.ResizeImage(ctx, ref, formatOf(ref.Key), newSize)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	return imageObject(obj, ref.Key, ii), nil
}

// Clone has a host in scope make spec.Dst from spec.Base by spec.Mode:
// CloneReflink (errdefs.ErrNotImplemented where the filesystem cannot),
// CloneLinked (a qcow2 backed by the base) or CloneFull (a sparse copy in
// Dst's format). The base is a template of Dst's store, or, with
// BaseInMount, the template Base.ID in the template mount of the host
// that runs the step (drivers.WithHost names it). Dst.Size larger than the
// base's grows the clone; 0 keeps the base's.
func (d *Driver) Clone(ctx context.Context, spec drivers.CloneSpec, progress drivers.Progress) (drivers.ObjectInfo, error) {
	info, err := d.clone(ctx, spec, progress)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("clone %s %s from %s %s (%s) on filesystem store %s: %w",
			spec.Dst.Type, spec.Dst.ID, spec.Base.Type, spec.Base.ID, spec.Mode, spec.Dst.Store.ID, err)
	}
	return info, nil
}

func (d *Driver) clone(ctx context.Context, spec drivers.CloneSpec, progress drivers.Progress) (drivers.ObjectInfo, error) {
	dst, base := spec.Dst, spec.Base
	switch spec.Mode {
	case drivers.CloneReflink, drivers.CloneFull:
	case drivers.CloneLinked:
		if dst.Format != drivers.FormatQCOW2 {
			return drivers.ObjectInfo{}, fmt.Errorf("a linked clone is a qcow2 overlay, and %s has format %q: %w", dst.ID, dst.Format, errdefs.ErrInvalid)
		}
	default:
		return drivers.ObjectInfo{}, fmt.Errorf("clone mode %q is not %s, %s or %s: %w", spec.Mode, drivers.CloneReflink, drivers.CloneLinked, drivers.CloneFull, errdefs.ErrInvalid)
	}
	if base.Format == "" {
		return drivers.ObjectInfo{}, fmt.Errorf("base %s has no format: %w", base.ID, errdefs.ErrInvalid)
	}
	to, err := objectRef(dst)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	var from hostops.Ref
	if spec.BaseInMount {
		if err := checkObjectID(base.ID); err != nil {
			return drivers.ObjectInfo{}, err
		}
		from = hostops.Ref{Store: hostops.TemplateMount, Key: base.ID}
	} else {
		if base.Store.ID != dst.Store.ID {
			return drivers.ObjectInfo{}, fmt.Errorf("base %s is on store %s, not on %s's store %s; copy it there first or clone from the template mount: %w",
				base.ID, base.Store.ID, dst.ID, dst.Store.ID, errdefs.ErrInvalid)
		}
		if from, err = objectRef(base); err != nil {
			return drivers.ObjectInfo{}, err
		}
	}
	h, err := d.host(ctx, dst.Store)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	ii, err := h.CloneImage(ctx, hostops.CloneRequest{
		Base: from, BaseFormat: base.Format, Dest: to, Mode: spec.Mode, Format: dst.Format, Size: dst.Size,
	}, progress)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	return imageObject(dst, to.Key, ii), nil
}

// Import has a host in scope stream src.URL into dst (a template or ISO),
// verifying src.Checksum in-stream and dst.Format against the content; a
// qcow2 with a backing file is refused. Nothing is left on the store when
// it fails (errdefs.ErrDataLoss for a checksum mismatch). Importing the
// same object again returns it.
func (d *Driver) Import(ctx context.Context, dst drivers.DataObject, src drivers.ImportSource, progress drivers.Progress) (drivers.ObjectInfo, error) {
	info, err := d.importObject(ctx, dst, src, progress)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("import %s %s into filesystem store %s: %w", dst.Type, dst.ID, dst.Store.ID, err)
	}
	return info, nil
}

func (d *Driver) importObject(ctx context.Context, dst drivers.DataObject, src drivers.ImportSource, progress drivers.Progress) (drivers.ObjectInfo, error) {
	if dst.Type != drivers.ObjectTemplate {
		return drivers.ObjectInfo{}, fmt.Errorf("only templates and ISOs are imported, not a %s: %w", dst.Type, errdefs.ErrInvalid)
	}
	// The URL goes to the agent as it is: a file:// one stays a URL (the
	// agent reads it only beneath its --import-dir), never a bare path.
	u, err := url.Parse(src.URL)
	switch {
	case err == nil && (u.Scheme == "http" || u.Scheme == "https") && u.Host != "":
	case err == nil && u.Scheme == "file" && u.Path != "":
	default:
		return drivers.ObjectInfo{}, fmt.Errorf("source URL %s is not an http:// or https:// URL with a host, nor a file:// URL: %w", redact.URL(src.URL), errdefs.ErrInvalid)
	}
	ref, err := objectRef(dst)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	h, err := d.host(ctx, dst.Store)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	ii, err := h.FetchImage(ctx, hostops.FetchRequest{Source: src.URL, Dest: ref, Format: dst.Format, Checksum: src.Checksum}, progress)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	return imageObject(dst, ref.Key, ii), nil
}

// Rebase has a host in scope rewrite the qcow2 obj onto newBase, an
// object of the same store (nil: standalone), merging in the data of the
// layers it leaves out.
func (d *Driver) Rebase(ctx context.Context, obj drivers.DataObject, newBase *drivers.DataObject) (drivers.ObjectInfo, error) {
	info, err := d.rebase(ctx, obj, newBase)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("rebase %s %s on filesystem store %s: %w", obj.Type, obj.ID, obj.Store.ID, err)
	}
	return info, nil
}

func (d *Driver) rebase(ctx context.Context, obj drivers.DataObject, newBase *drivers.DataObject) (drivers.ObjectInfo, error) {
	ref, err := objectRef(obj)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	if formatOf(ref.Key) != drivers.FormatQCOW2 {
		return drivers.ObjectInfo{}, fmt.Errorf("only a qcow2 has a backing file to change, and %s is not one: %w", ref.Key, errdefs.ErrInvalid)
	}
	var backing hostops.Ref
	var backingFormat drivers.Format
	if newBase != nil {
		if newBase.Store.ID != obj.Store.ID {
			return drivers.ObjectInfo{}, fmt.Errorf("new base %s is on store %s; a backing file stays in its store %s: %w", newBase.ID, newBase.Store.ID, obj.Store.ID, errdefs.ErrInvalid)
		}
		if backing, err = objectRef(*newBase); err != nil {
			return drivers.ObjectInfo{}, err
		}
		if backingFormat = formatOf(backing.Key); backingFormat != drivers.FormatRaw && backingFormat != drivers.FormatQCOW2 {
			return drivers.ObjectInfo{}, fmt.Errorf("new base %s is not a raw or qcow2 image: %w", backing.Key, errdefs.ErrInvalid)
		}
	}
	h, err := d.host(ctx, obj.Store)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	ii, err := h.RebaseImage(ctx, ref, backing, backingFormat)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	return imageObject(obj, ref.Key, ii), nil
}

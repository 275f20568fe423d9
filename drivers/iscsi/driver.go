package iscsi

import (
	"context"
	"fmt"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// Driver is the iSCSI driver.
type Driver struct {
	hosts   hostops.Selector
	chapKey []byte
}

var (
	_ drivers.PrimaryDriver = (*Driver)(nil)
	_ drivers.Resizer       = (*Driver)(nil)
	_ drivers.Cloner        = (*Driver)(nil)
	_ drivers.VolumeFormats = (*Driver)(nil)
)

// HostNeeds implements drivers.HostNeeds: hosts reach LUNs through the
// userspace initiator.
func (d *Driver) HostNeeds() []drivers.Capability {
	return []drivers.Capability{drivers.CapISCSIUserspace}
}

// VolumeFormats implements drivers.VolumeFormats: a LUN is a raw disk.
func (d *Driver) VolumeFormats() []drivers.Format { return []drivers.Format{drivers.FormatRaw} }

// Locate implements drivers.Driver: luns/<type>-<id>.lun.
func (d *Driver) Locate(obj drivers.DataObject) (string, error) {
	if obj.ID == "" || strings.ContainsAny(obj.ID, "/\\\x00") || obj.ID == "." || obj.ID == ".." {
		return "", fmt.Errorf("object id %q: %w", obj.ID, errdefs.ErrInvalid)
	}
	switch obj.Type {
	case drivers.ObjectVolume, drivers.ObjectSnapshot, drivers.ObjectTemplate:
	default:
		return "", fmt.Errorf("iSCSI store %s holds volumes, snapshots and cached templates, not %q: %w", obj.Store.Name, obj.Type, errdefs.ErrInvalid)
	}
	return path.Join("luns", string(obj.Type)+"-"+obj.ID+".lun"), nil
}

func (d *Driver) key(obj drivers.DataObject) (string, error) {
	if obj.Key != "" {
		return obj.Key, nil
	}
	return d.Locate(obj)
}

// lunSize is the LUN a object needs: its size, and room for a qcow2's
// metadata when the LUN holds a qcow2 image's bytes (a cached template).
func lunSize(obj drivers.DataObject) int64 {
	n := obj.Size
	if obj.Format == drivers.FormatQCOW2 {
		n += n/8 + 16<<20
	}
	return (n + 511) &^ 511
}

// lun is the LUN of obj on store s (ErrNotFound when there is none).
func (d *Driver) lun(ctx context.Context, h hostops.Host, s store, obj drivers.DataObject) (hostops.LUNInfo, error) {
	key, err := d.key(obj)
	if err != nil {
		return hostops.LUNInfo{}, err
	}
	luns, err := h.ListLUNs(ctx, hostops.ISCSITarget{Store: s.id, IQN: s.iqn})
	if err != nil {
		return hostops.LUNInfo{}, err
	}
	for _, l := range luns {
		if l.Key == key {
			return l, nil
		}
	}
	return hostops.LUNInfo{}, fmt.Errorf("%s %s: no LUN %s on target %s: %w", obj.Type, obj.ID, key, s.iqn, errdefs.ErrNotFound)
}

func objectInfo(obj drivers.DataObject, l hostops.LUNInfo) drivers.ObjectInfo {
	return drivers.ObjectInfo{ID: obj.ID, Type: obj.Type, Key: l.Key, Format: obj.Format, Size: l.Size, PhysicalSize: l.AllocatedBytes}
}

// create makes obj's LUN (idempotent).
func (d *Driver) create(ctx context.Context, obj drivers.DataObject) (hostops.Host, store, hostops.LUNInfo, error) {
	s, err := storeOf(obj.Store)
	if err != nil {
		return nil, store{}, hostops.LUNInfo{}, err
	}
	key, err := d.key(obj)
	if err != nil {
		return nil, store{}, hostops.LUNInfo{}, err
	}
	if obj.Size <= 0 {
		return nil, store{}, hostops.LUNInfo{}, fmt.Errorf("%s %s: a LUN needs a size: %w", obj.Type, obj.ID, errdefs.ErrInvalid)
	}
	h, err := d.targetHost(ctx, s)
	if err != nil {
		return nil, store{}, hostops.LUNInfo{}, err
	}
	l, err := h.CreateLUN(ctx, hostops.LUNRequest{Target: hostops.ISCSITarget{Store: s.id, IQN: s.iqn}, Key: key, Size: lunSize(obj)})
	return h, s, l, err
}

// Create implements drivers.Driver: a raw LUN of obj.Size.
func (d *Driver) Create(ctx context.Context, obj drivers.DataObject) (drivers.ObjectInfo, error) {
	if obj.Type == drivers.ObjectVolume && obj.Format != drivers.FormatRaw {
		return drivers.ObjectInfo{}, fmt.Errorf("iSCSI store %s holds raw volumes, not %s: %w", obj.Store.Name, obj.Format, errdefs.ErrInvalid)
	}
	_, _, l, err := d.create(ctx, obj)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	return objectInfo(obj, l), nil
}

// Delete implements drivers.Driver: the LUN and its file.
func (d *Driver) Delete(ctx context.Context, obj drivers.DataObject) error {
	s, err := storeOf(obj.Store)
	if err != nil {
		return err
	}
	key, err := d.key(obj)
	if err != nil {
		return err
	}
	h, err := d.targetHost(ctx, s)
	if err != nil {
		return err
	}
	return h.DeleteLUN(ctx, hostops.LUNRequest{Target: hostops.ISCSITarget{Store: s.id, IQN: s.iqn}, Key: key})
}

// ListObjects implements drivers.Driver: the store's LUNs.
func (d *Driver) ListObjects(ctx context.Context, info drivers.StoreInfo) ([]drivers.ObjectInfo, error) {
	s, err := storeOf(info)
	if err != nil {
		return nil, err
	}
	h, err := d.targetHost(ctx, s)
	if err != nil {
		return nil, err
	}
	luns, err := h.ListLUNs(ctx, hostops.ISCSITarget{Store: s.id, IQN: s.iqn})
	if err != nil {
		return nil, err
	}
	var out []drivers.ObjectInfo
	for _, l := range luns {
		name := strings.TrimSuffix(path.Base(l.Key), ".lun")
		typ, id, ok := strings.Cut(name, "-")
		if !ok || !strings.HasPrefix(l.Key, "luns/") {
			continue
		}
		out = append(out, drivers.ObjectInfo{ID: id, Type: drivers.ObjectType(typ), Key: l.Key, Size: l.Size, PhysicalSize: l.AllocatedBytes})
	}
	return out, nil
}

// Stat implements drivers.Driver.
func (d *Driver) Stat(ctx context.Context, obj drivers.DataObject) (drivers.ObjectInfo, error) {
	s, err := storeOf(obj.Store)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	h, err := d.targetHost(ctx, s)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	l, err := d.lun(ctx, h, s, obj)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	return objectInfo(obj, l), nil
}

// GrantAccess implements drivers.Driver: the LUN's iscsi:// URI for the
// client host, whose initiator the target's ACL and CHAP now admit. A
// write grant makes the LUN first (a copy's destination).
func (d *Driver) GrantAccess(ctx context.Context, obj drivers.DataObject, c drivers.Client) (drivers.Access, error) {
	var (
		h      hostops.Host
		s      store
		l      hostops.LUNInfo
		err    error
		zeroed bool
	)
	if c.Purpose == drivers.PurposeWrite {
		h, s, l, err = d.create(ctx, obj)
		zeroed = err == nil && l.AllocatedBytes == 0
	} else {
		if s, err = storeOf(obj.Store); err == nil {
			if h, err = d.targetHost(ctx, s); err == nil {
				l, err = d.lun(ctx, h, s, obj)
			}
		}
	}
	if err != nil {
		return drivers.Access{}, err
	}
	attachKernel := c.Purpose == drivers.PurposeAttach && d.hostHas(ctx, obj.Store.Scope, c.HostID, drivers.CapISCSIKernel, false)
	if c.Purpose == drivers.PurposeAttach && !attachKernel && !d.hostHas(ctx, obj.Store.Scope, c.HostID, drivers.CapISCSIUserspace, true) {
		// A host without the userspace initiator: its target host serves
		// the LUN's file over NBD (with the same TLS as every NBD grant).
		key, err := d.key(obj)
		if err != nil {
			return drivers.Access{}, err
		}
		uri, err := h.ExportNBD(ctx, hostops.NBDExportRequest{Ref: hostops.Ref{Store: s.id, Key: key}, Format: drivers.FormatRaw, TTL: c.GrantTTL()})
		if err != nil {
			return drivers.Access{}, fmt.Errorf("host %s cannot log in to iSCSI targets; NBD export of %s %s: %w", c.HostID, obj.Type, obj.ID, err)
		}
		a := drivers.Access{URI: uri, HostID: c.HostID, Revocable: true}
		if ttl := c.GrantTTL(); ttl > 0 {
			a.Expires = time.Now().Add(ttl)
		}
		return a, nil
	}
	t, err := d.target(s, c.HostID)
	if err != nil {
		return drivers.Access{}, err
	}
	if err := h.EnsureTarget(ctx, t); err != nil {
		return drivers.Access{}, fmt.Errorf("admit host %s to target %s: %w", c.HostID, s.iqn, err)
	}
	uri, err := d.lunURI(s, c.HostID, l.Number)
	if err != nil {
		return drivers.Access{}, err
	}
	if attachKernel {
		// The host's kernel initiator logs in (the os-brick sequence) and
		// the hypervisor gets the block device.
		ch, err := d.hosts.ForHost(ctx, c.HostID)
		if err != nil {
			return drivers.Access{}, err
		}
		dev, err := ch.ConnectLUN(ctx, uri)
		if err != nil {
			return drivers.Access{}, fmt.Errorf("host %s: log in to LUN %d of %s: %w", c.HostID, l.Number, s.iqn, err)
		}
		return drivers.Access{URI: dev, HostID: c.HostID, Revocable: true}, nil
	}
	return drivers.Access{URI: uri, ReadOnly: c.Purpose == drivers.PurposeRead, HostID: c.HostID, Zeroed: zeroed}, nil
}

// RevokeAccess implements drivers.Driver: an NBD export (a host that cannot
// log in) ends; an iSCSI grant has nothing to undo (a host keeps its login
// rights to the store: its ACL entry and CHAP account).
func (d *Driver) RevokeAccess(ctx context.Context, obj drivers.DataObject, c drivers.Client, a drivers.Access) error {
	if strings.HasPrefix(string(a.URI), "file://") {
		// A kernel login: the host logs out (when no other LUN of the
		// target is in use there) with the grant's target and LUN.
		return d.disconnect(ctx, obj, c)
	}
	if !strings.HasPrefix(string(a.URI), "nbd") {
		return ctx.Err()
	}
	s, err := storeOf(obj.Store)
	if err != nil {
		return err
	}
	h, err := d.hosts.ForHost(ctx, s.targetHost)
	if err != nil {
		return err
	}
	return h.UnexportNBD(ctx, a.URI)
}

// hostHas says whether host hostID, Up in scope, reported capability c;
// for a host not Up in scope it answers unknown.
func (d *Driver) hostHas(ctx context.Context, scope drivers.Scope, hostID string, c drivers.Capability, unknown bool) bool {
	up, err := d.hosts.AllInScope(ctx, scope)
	if err != nil || !slices.ContainsFunc(up, func(h hostops.Host) bool { return h.HostID() == hostID }) {
		return unknown
	}
	able, _ := d.hosts.AllInScope(drivers.WithNeeds(ctx, c), scope)
	return slices.ContainsFunc(able, func(h hostops.Host) bool { return h.HostID() == hostID })
}

// disconnect has host c log out of obj's LUN.
func (d *Driver) disconnect(ctx context.Context, obj drivers.DataObject, c drivers.Client) error {
	s, err := storeOf(obj.Store)
	if err != nil {
		return err
	}
	h, err := d.targetHost(ctx, s)
	if err != nil {
		return err
	}
	l, err := d.lun(ctx, h, s, obj)
	if err != nil {
		return err
	}
	uri, err := d.lunURI(s, c.HostID, l.Number)
	if err != nil {
		return err
	}
	ch, err := d.hosts.ForHost(ctx, c.HostID)
	if err != nil {
		return err
	}
	return ch.DisconnectLUN(ctx, uri)
}

// CanCopy implements drivers.Driver: tgt copies nothing itself.
func (d *Driver) CanCopy(src, dst drivers.DataObject) bool { return false }

// Copy implements drivers.Driver (never called: CanCopy is false).
func (d *Driver) Copy(ctx context.Context, src, dst drivers.DataObject, progress drivers.Progress) (drivers.ObjectInfo, error) {
	return drivers.ObjectInfo{}, fmt.Errorf("iSCSI store %s copies nothing natively: %w", dst.Store.Name, errdefs.ErrNotImplemented)
}

// Resize implements drivers.Resizer: the LUN grows (its file, then the
// target re-reads the size; initiators see it at their next rescan).
func (d *Driver) Resize(ctx context.Context, obj drivers.DataObject, newSize int64) (drivers.ObjectInfo, error) {
	s, err := storeOf(obj.Store)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	key, err := d.key(obj)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	h, err := d.targetHost(ctx, s)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	l, err := h.ResizeLUN(ctx, hostops.LUNRequest{Target: hostops.ISCSITarget{Store: s.id, IQN: s.iqn}, Key: key, Size: newSize})
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	return objectInfo(obj, l), nil
}

// copyLUN writes the guest view of src (a LUN of this store, of its
// format) into dst's LUN as raw, through the userspace initiator of a host
// in the store's scope.
func (d *Driver) copyLUN(ctx context.Context, src, dst drivers.DataObject, dstIsZero bool, progress drivers.Progress) (drivers.ObjectInfo, error) {
	h, err := d.hosts.ForScope(drivers.WithNeeds(ctx, d.HostNeeds()...), dst.Store.Scope)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	reader := drivers.Client{HostID: h.HostID(), Purpose: drivers.PurposeRead}
	in, err := d.GrantAccess(ctx, src, reader)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	out, err := d.GrantAccess(ctx, dst, drivers.Client{HostID: h.HostID(), Purpose: drivers.PurposeWrite})
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	info, err := h.CopyImage(ctx, hostops.CopyRequest{Source: in.URI, SourceFormat: src.Format, DestURI: out.URI, DestIsZero: dstIsZero && out.Zeroed, Format: drivers.FormatRaw}, progress)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	got, err := d.Stat(ctx, dst)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	got.Format, got.Method = drivers.FormatRaw, info.Method
	return got, nil
}

// Clone implements drivers.Cloner: a full copy of the cached template (a
// LUN of this store) into the volume's LUN; a LUN has no reflinks or
// backing files, so other modes are refused.
func (d *Driver) Clone(ctx context.Context, spec drivers.CloneSpec, progress drivers.Progress) (drivers.ObjectInfo, error) {
	if spec.Mode != drivers.CloneFull || spec.BaseInMount {
		return drivers.ObjectInfo{}, fmt.Errorf("iSCSI store %s makes full copies only, not %s clones: %w", spec.Dst.Store.Name, spec.Mode, errdefs.ErrNotImplemented)
	}
	if spec.Dst.Format != drivers.FormatRaw {
		return drivers.ObjectInfo{}, fmt.Errorf("iSCSI store %s holds raw volumes, not %s: %w", spec.Dst.Store.Name, spec.Dst.Format, errdefs.ErrInvalid)
	}
	dst := spec.Dst
	if dst.Size == 0 {
		dst.Size = spec.Base.Size // the template's size
	}
	return d.copyLUN(ctx, spec.Base, dst, true, progress)
}

// TakeSnapshot implements drivers.PrimaryDriver: tgt has no snapshots, so
// a snapshot is a full copy of the volume's LUN into a LUN of its own
// (declared as such, O(size), not O(1)).
func (d *Driver) TakeSnapshot(ctx context.Context, snap drivers.SnapshotObject) (drivers.ObjectInfo, error) {
	src := snap.Volume
	dst := snap.DataObject
	if dst.Size == 0 {
		dst.Size = src.Size
	}
	dst.Format = drivers.FormatRaw
	info, err := d.copyLUN(ctx, src, dst, true, nil)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("snapshot %s of volume %s (a full copy: tgt has no snapshots): %w", snap.ID, src.ID, err)
	}
	info.Method = "full copy (the target has no snapshots)"
	return info, nil
}

// RevertSnapshot implements drivers.PrimaryDriver: the snapshot's LUN is
// copied back over the volume's.
func (d *Driver) RevertSnapshot(ctx context.Context, snap drivers.SnapshotObject) error {
	src := snap.DataObject
	src.Format = drivers.FormatRaw
	_, err := d.copyLUN(ctx, src, snap.Volume, false, nil)
	return err
}

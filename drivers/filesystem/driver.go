package filesystem

import (
	"context"
	"fmt"
	"path"
	"sort"
	"strings"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// Driver creates, lists, deletes and grants access to the objects of
// filesystem stores. It is a drivers.PrimaryDriver whose snapshot
// operations are not implemented yet.
type Driver struct {
	eps drivers.Endpoints
}

// ListObjects lists the files of the store's object directories (volumes/,
// templates/, snapshots/; not tmp/), skipping directories and dot files.
// ID is the file name without its extension, Format follows the extension
// ("" when unknown), PhysicalSize is the bytes allocated.
//
// Size is the virtual size: the file size for raw and ISO files, the
// header's size for qcow2 (read on the host).
func (d *Driver) ListObjects(ctx context.Context, store drivers.StoreInfo) ([]drivers.ObjectInfo, error) {
	objs, err := d.list(ctx, store)
	if err != nil {
		return nil, fmt.Errorf("list objects of filesystem store %s: %w", store.ID, err)
	}
	return objs, nil
}

func (d *Driver) list(ctx context.Context, store drivers.StoreInfo) ([]drivers.ObjectInfo, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	root, err := storePath(store)
	if err != nil {
		return nil, err
	}
	ep, err := d.eps.ForScope(ctx, store.Scope)
	if err != nil {
		return nil, err
	}
	return d.listObjects(ctx, ep, store, root)
}

// listObjects lists the objects of store at root through ep.
func (d *Driver) listObjects(ctx context.Context, ep drivers.Endpoint, store drivers.StoreInfo, root string) ([]drivers.ObjectInfo, error) {
	dirs, err := objectDirs(store.Role)
	if err != nil {
		return nil, err
	}
	objs := []drivers.ObjectInfo{}
	for _, dir := range dirs {
		files, err := ep.ListDir(ctx, path.Join(root, dir))
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			name := path.Base(f.Path)
			if f.IsDir || strings.HasPrefix(name, ".") {
				continue
			}
			ext := path.Ext(name)
			o := drivers.ObjectInfo{
				ID:           strings.TrimSuffix(name, ext),
				Type:         dirType(dir),
				Path:         dir + "/" + name,
				Format:       formatOf(ext),
				PhysicalSize: f.AllocatedBytes,
				ModifiedAt:   f.ModifiedAt,
			}
			o.Size = f.VirtualSize
			if f.Format == drivers.FormatQCOW2 {
				o.Format = drivers.FormatQCOW2
			}
			objs = append(objs, o)
		}
	}
	sort.Slice(objs, func(i, j int) bool { return objs[i].Path < objs[j].Path })
	return objs, nil
}

func dirType(dir string) drivers.ObjectType {
	for t, d := range typeDirs {
		if d == dir {
			return t
		}
	}
	return ""
}

// Create makes a blank volume: a sparse raw file or an empty qcow2 of
// obj.Size bytes (a positive multiple of 512) at volumes/<id>.<raw|qcow2>
// on a primary store. Creating the same volume again returns it; a volume
// of that id with another size or format is errdefs.ErrAlreadyExists.
// Templates and snapshots are not created this way
// (errdefs.ErrNotImplemented): they arrive by download, copy or snapshot.
func (d *Driver) Create(ctx context.Context, obj drivers.DataObject) (drivers.ObjectInfo, error) {
	info, err := d.create(ctx, obj)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("create %s %s on filesystem store %s: %w", obj.Type, obj.ID, obj.Store.ID, err)
	}
	return info, nil
}

func (d *Driver) create(ctx context.Context, obj drivers.DataObject) (drivers.ObjectInfo, error) {
	if err := ctx.Err(); err != nil {
		return drivers.ObjectInfo{}, err
	}
	if obj.Type != drivers.ObjectVolume {
		return drivers.ObjectInfo{}, fmt.Errorf("the filesystem provider creates only blank volumes; a %s arrives by download, copy or snapshot: %w",
			obj.Type, errdefs.ErrNotImplemented)
	}
	if obj.Store.Role != drivers.RolePrimary {
		return drivers.ObjectInfo{}, fmt.Errorf("store %s is a %s store; volumes live on primary stores: %w", obj.Store.ID, obj.Store.Role, errdefs.ErrInvalid)
	}
	if err := checkObjectID(obj.ID); err != nil {
		return drivers.ObjectInfo{}, err
	}
	if obj.Format != drivers.FormatRaw && obj.Format != drivers.FormatQCOW2 {
		return drivers.ObjectInfo{}, fmt.Errorf("format %q: a blank volume is %s or %s: %w", obj.Format, drivers.FormatRaw, drivers.FormatQCOW2, errdefs.ErrInvalid)
	}
	if obj.Size <= 0 || obj.Size%512 != 0 {
		return drivers.ObjectInfo{}, fmt.Errorf("size %d is not a positive multiple of 512 bytes: %w", obj.Size, errdefs.ErrInvalid)
	}
	rel := dirVolumes + "/" + obj.ID + extensions[obj.Format]
	if obj.Path != "" && obj.Path != rel {
		return drivers.ObjectInfo{}, fmt.Errorf("path %q given; a filesystem volume %s lives at %q: %w", obj.Path, obj.ID, rel, errdefs.ErrInvalid)
	}
	root, err := storePath(obj.Store)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	ep, err := d.eps.ForScope(ctx, obj.Store.Scope)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	// One id, one volume: refuse a second file under the other format's name.
	for f, ext := range extensions {
		if f == obj.Format {
			continue
		}
		other := dirVolumes + "/" + obj.ID + ext
		_, err := ep.StatPath(ctx, path.Join(root, other))
		if err == nil {
			return drivers.ObjectInfo{}, fmt.Errorf("volume %s already exists as %s: %w", obj.ID, other, errdefs.ErrAlreadyExists)
		}
		if !errdefs.IsNotFound(err) {
			return drivers.ObjectInfo{}, err
		}
	}
	fi, err := ep.CreateImage(ctx, path.Join(root, rel), obj.Format, obj.Size)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	return drivers.ObjectInfo{
		ID:           obj.ID,
		Type:         drivers.ObjectVolume,
		Path:         rel,
		Format:       obj.Format,
		Size:         obj.Size,
		PhysicalSize: fi.AllocatedBytes,
		ModifiedAt:   fi.ModifiedAt,
	}, nil
}

// Delete removes the object's file (obj.Path, or the path its type, id and
// format give); a missing file is not an error.
func (d *Driver) Delete(ctx context.Context, obj drivers.DataObject) error {
	if err := d.delete(ctx, obj); err != nil {
		return fmt.Errorf("delete %s %s on filesystem store %s: %w", obj.Type, obj.ID, obj.Store.ID, err)
	}
	return nil
}

func (d *Driver) delete(ctx context.Context, obj drivers.DataObject) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	rel, err := objectPath(obj)
	if err != nil {
		return err
	}
	root, err := storePath(obj.Store)
	if err != nil {
		return err
	}
	ep, err := d.eps.ForScope(ctx, obj.Store.Scope)
	if err != nil {
		return err
	}
	return ep.DeletePath(ctx, path.Join(root, rel))
}

// GrantAccess returns the object's file:// URI for host client.HostID,
// which must be Up and reach the store: the Endpoints interface knows no
// zones, so whether the host is in the store's scope is checked by probing
// the store's marker from that host. A host that does not reach it is
// errdefs.ErrFailedPrecondition; a missing object errdefs.ErrNotFound.
func (d *Driver) GrantAccess(ctx context.Context, obj drivers.DataObject, client drivers.Client) (drivers.URI, error) {
	uri, err := d.grantAccess(ctx, obj, client)
	if err != nil {
		return "", fmt.Errorf("grant host %s access to %s %s on filesystem store %s: %w", client.HostID, obj.Type, obj.ID, obj.Store.ID, err)
	}
	return uri, nil
}

func (d *Driver) grantAccess(ctx context.Context, obj drivers.DataObject, client drivers.Client) (drivers.URI, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if client.HostID == "" {
		return "", fmt.Errorf("no host to grant access to: %w", errdefs.ErrInvalid)
	}
	rel, err := objectPath(obj)
	if err != nil {
		return "", err
	}
	root, err := storePath(obj.Store)
	if err != nil {
		return "", err
	}
	ep, err := d.eps.ForHost(ctx, client.HostID)
	if err != nil {
		return "", err
	}
	if _, err := ep.ProbeStore(ctx, root, obj.Store.ID); err != nil {
		if cerr := ctx.Err(); cerr != nil {
			return "", cerr
		}
		return "", fmt.Errorf("store %s is not reachable from host %s (%v): %w", obj.Store.ID, client.HostID, err, errdefs.ErrFailedPrecondition)
	}
	full := path.Join(root, rel)
	if _, err := ep.StatPath(ctx, full); err != nil {
		return "", err
	}
	return fileURI(full), nil
}

// RevokeAccess does nothing: access to a file is not gated per host — any
// host that mounts the directory can open the file — so there is nothing to
// take back. Fencing a host off shared storage is the job of a provider
// with per-host exports (NFS export rules, iSCSI ACLs).
func (d *Driver) RevokeAccess(ctx context.Context, obj drivers.DataObject, client drivers.Client) error {
	return ctx.Err()
}

// CanCopy is false: copies between filesystem stores arrive with the
// stream engine, and the motion service picks another strategy meanwhile.
func (d *Driver) CanCopy(src, dst drivers.DataObject) bool { return false }

// Copy is not implemented yet (see CanCopy).
func (d *Driver) Copy(ctx context.Context, src, dst drivers.DataObject) (drivers.ObjectInfo, error) {
	return drivers.ObjectInfo{}, fmt.Errorf("copy %s %s to filesystem store %s: copies arrive with the stream engine: %w",
		src.Type, src.ID, dst.Store.ID, errdefs.ErrNotImplemented)
}

// TakeSnapshot is not implemented yet: qcow2 internal/external snapshots
// and reflink snapshots come with the snapshot service.
func (d *Driver) TakeSnapshot(ctx context.Context, snap drivers.SnapshotObject) (drivers.ObjectInfo, error) {
	return drivers.ObjectInfo{}, fmt.Errorf("snapshot %s of volume %s on filesystem store %s: %w",
		snap.ID, snap.Volume.ID, snap.Store.ID, errdefs.ErrNotImplemented)
}

// RevertSnapshot is not implemented yet (see TakeSnapshot).
func (d *Driver) RevertSnapshot(ctx context.Context, snap drivers.SnapshotObject) error {
	return fmt.Errorf("revert volume %s to snapshot %s on filesystem store %s: %w",
		snap.Volume.ID, snap.ID, snap.Store.ID, errdefs.ErrNotImplemented)
}

package filesystem

import (
	"context"
	"fmt"
	"path"
	"sort"
	"strings"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// Driver creates, describes, copies, snapshots and grants access to the
// objects of filesystem stores, through hosts in each store's scope.
type Driver struct {
	hosts hostops.Selector
}

var (
	_ drivers.PrimaryDriver  = (*Driver)(nil)
	_ drivers.Resizer        = (*Driver)(nil)
	_ drivers.Cloner         = (*Driver)(nil)
	_ drivers.Importer       = (*Driver)(nil)
	_ drivers.Rebaser        = (*Driver)(nil)
	_ drivers.ChunkTarget    = (*Driver)(nil)
	_ drivers.ChunkCollector = (*Driver)(nil)
)

// objectRef returns the hostops reference of obj: its store and key.
func objectRef(obj drivers.DataObject) (hostops.Ref, error) {
	if err := checkStore(obj.Store); err != nil {
		return hostops.Ref{}, err
	}
	key, err := keyOf(obj)
	if err != nil {
		return hostops.Ref{}, err
	}
	return hostops.Ref{Store: obj.Store.ID, Key: key}, nil
}

// host returns an Up host in the scope of store (the step's host when the
// context names one, see drivers.WithHost).
func (d *Driver) host(ctx context.Context, store drivers.StoreInfo) (hostops.Host, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	h, err := d.hosts.ForScope(ctx, store.Scope)
	if err != nil {
		return nil, fmt.Errorf("no Up host in scope %s: %w", scopeName(store.Scope), err)
	}
	return h, nil
}

// imageObject turns a host's ImageInfo on obj into an ObjectInfo.
func imageObject(obj drivers.DataObject, key string, ii hostops.ImageInfo) drivers.ObjectInfo {
	o := ii.Object(obj)
	o.Key = key
	if o.Format == "" {
		o.Format = obj.Format
	}
	return o
}

// fileObject turns a host's FileInfo of the file key into an ObjectInfo.
// The format is the one the key declares, never the file's content: a
// guest can write a qcow2 header into its raw volume.
func fileObject(id string, typ drivers.ObjectType, key string, fi hostops.FileInfo) drivers.ObjectInfo {
	o := drivers.ObjectInfo{
		ID: id, Type: typ, Key: key, Format: formatOf(key),
		Size: fi.Size, PhysicalSize: fi.AllocatedBytes, StoredSize: fi.Size, ModifiedAt: fi.ModifiedAt,
	}
	if o.Format == drivers.FormatQCOW2 && fi.Format == drivers.FormatQCOW2 {
		o.Size = fi.VirtualSize
	}
	if strings.HasSuffix(key, manifestSuffix) {
		o.Format = ""
	}
	return o
}

// Locate returns the key obj has, or will have, on its store (see the
// package doc): volumes/<id>.<ext>, templates/<id>.<ext>,
// snapshots/<id>.<ext> on a primary store and
// snapshots/manifests/<id>.manifest.json (a backup) on an image store. It
// does no I/O; an object the layout has no place for is errdefs.ErrInvalid.
func (d *Driver) Locate(obj drivers.DataObject) (string, error) {
	key, err := locate(obj)
	if err != nil {
		return "", fmt.Errorf("locate %s %s on filesystem store %s: %w", obj.Type, obj.ID, obj.Store.ID, err)
	}
	return key, nil
}

// Create makes a blank volume: a sparse raw file or an empty qcow2 of
// obj.Size bytes (a positive multiple of 512) at its key on a primary
// store. Creating the same volume again returns it; a volume of that id with
// another size or format is errdefs.ErrAlreadyExists. Templates and
// snapshots are not created this way (errdefs.ErrNotImplemented): they
// arrive by import, copy, clone or snapshot.
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
		return drivers.ObjectInfo{}, fmt.Errorf("the filesystem provider creates only blank volumes; a %s arrives by import, copy, clone or snapshot: %w",
			obj.Type, errdefs.ErrNotImplemented)
	}
	if obj.Size <= 0 || obj.Size%512 != 0 {
		return drivers.ObjectInfo{}, fmt.Errorf("size %d is not a positive multiple of 512 bytes: %w", obj.Size, errdefs.ErrInvalid)
	}
	ref, err := objectRef(obj)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	if want, _ := locate(obj); obj.Key != "" && obj.Key != want {
		return drivers.ObjectInfo{}, fmt.Errorf("key %q given; a new filesystem volume %s lives at %q: %w", obj.Key, obj.ID, want, errdefs.ErrInvalid)
	}
	h, err := d.host(ctx, obj.Store)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	// One id, one volume: refuse a second file under the other format's name.
	for _, f := range []drivers.Format{drivers.FormatRaw, drivers.FormatQCOW2} {
		if f == obj.Format {
			continue
		}
		other := hostops.Ref{Store: ref.Store, Key: dirVolumes + "/" + obj.ID + extensions[f]}
		_, err := h.StatObject(ctx, other)
		if err == nil {
			return drivers.ObjectInfo{}, fmt.Errorf("volume %s already exists as %s: %w", obj.ID, other.Key, errdefs.ErrAlreadyExists)
		}
		if !errdefs.IsNotFound(err) {
			return drivers.ObjectInfo{}, fmt.Errorf("host %s: %w", h.HostID(), err)
		}
	}
	fi, err := h.CreateImage(ctx, ref, obj.Format, obj.Size)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	o := fileObject(obj.ID, obj.Type, ref.Key, fi)
	o.Format, o.Size = obj.Format, obj.Size
	return o, nil
}

// Delete removes the object's file (a backup's manifest and unshared
// chunks go through DeleteBackup instead); a missing file is not an error.
func (d *Driver) Delete(ctx context.Context, obj drivers.DataObject) error {
	if err := d.delete(ctx, obj); err != nil {
		return fmt.Errorf("delete %s %s on filesystem store %s: %w", obj.Type, obj.ID, obj.Store.ID, err)
	}
	return nil
}

func (d *Driver) delete(ctx context.Context, obj drivers.DataObject) error {
	ref, err := objectRef(obj)
	if err != nil {
		return err
	}
	h, err := d.host(ctx, obj.Store)
	if err != nil {
		return err
	}
	if err := h.DeleteObject(ctx, ref); err != nil {
		return fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	return nil
}

// Stat describes the object's file: Format is the one its key declares,
// Size the virtual size (a qcow2's header size, else the file size; a
// backup manifest's file size), PhysicalSize the bytes allocated. A
// missing object is errdefs.ErrNotFound.
func (d *Driver) Stat(ctx context.Context, obj drivers.DataObject) (drivers.ObjectInfo, error) {
	info, err := d.stat(ctx, obj)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("stat %s %s on filesystem store %s: %w", obj.Type, obj.ID, obj.Store.ID, err)
	}
	return info, nil
}

func (d *Driver) stat(ctx context.Context, obj drivers.DataObject) (drivers.ObjectInfo, error) {
	ref, err := objectRef(obj)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	h, err := d.host(ctx, obj.Store)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	fi, err := h.StatObject(ctx, ref)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	if fi.IsDir {
		return drivers.ObjectInfo{}, fmt.Errorf("%s is a directory: %w", ref, errdefs.ErrNotFound)
	}
	return fileObject(obj.ID, obj.Type, ref.Key, fi), nil
}

// ListObjects lists the files of the store's object directories
// (volumes/, templates/ and snapshots/ with the per-volume directories of
// older snapshots on a primary store; templates/, snapshots/ and
// snapshots/manifests/ on an image store), skipping dot files and the
// files of steps in progress. ID is the file name without its extension
// (or ".manifest.json"), Format follows the extension ("" when unknown),
// Size and PhysicalSize are as Stat's.
func (d *Driver) ListObjects(ctx context.Context, store drivers.StoreInfo) ([]drivers.ObjectInfo, error) {
	objs, err := d.list(ctx, store)
	if err != nil {
		return nil, fmt.Errorf("list objects of filesystem store %s: %w", store.ID, err)
	}
	return objs, nil
}

func (d *Driver) list(ctx context.Context, store drivers.StoreInfo) ([]drivers.ObjectInfo, error) {
	if err := checkStore(store); err != nil {
		return nil, err
	}
	h, err := d.host(ctx, store)
	if err != nil {
		return nil, err
	}
	return d.listObjects(ctx, h, store)
}

// listObjects lists the objects of store through h.
func (d *Driver) listObjects(ctx context.Context, h hostops.Host, store drivers.StoreInfo) ([]drivers.ObjectInfo, error) {
	objs := []drivers.ObjectInfo{}
	var walk func(dir string, typ drivers.ObjectType, depth int, optional bool) error
	walk = func(dir string, typ drivers.ObjectType, depth int, optional bool) error {
		files, err := h.ListObjects(ctx, hostops.Ref{Store: store.ID, Key: dir})
		if err != nil {
			if optional && errdefs.IsNotFound(err) && ctx.Err() == nil {
				return nil
			}
			return fmt.Errorf("host %s: %w", h.HostID(), err)
		}
		for _, f := range files {
			name := path.Base(f.Key)
			key := dir + "/" + name
			switch {
			case strings.HasPrefix(name, "."):
			case f.IsDir:
				// Older snapshots: snapshots/<volume id>/<snapshot id>.<ext>.
				if depth == 0 && store.Role == drivers.RolePrimary && dir == dirSnapshots {
					if err := walk(key, typ, 1, true); err != nil {
						return err
					}
				}
			default:
				objs = append(objs, fileObject(idOf(name), typ, key, f))
			}
		}
		return nil
	}
	for _, od := range objectDirs(store.Role) {
		if err := walk(od.dir, od.typ, 0, od.dir == dirManifests); err != nil {
			return nil, err
		}
	}
	sort.Slice(objs, func(i, j int) bool { return objs[i].Key < objs[j].Key })
	return objs, nil
}

// CanCopy reports whether Copy can copy src to dst natively: both on the
// same filesystem store, whose filesystem shares extents
// (Details["reflink"] == "true"), in the same format. A snapshot is never
// copied natively: its file is one link of a qcow2 chain, and a reflink
// of it would not read as the snapshot. It does no I/O.
func (d *Driver) CanCopy(src, dst drivers.DataObject) bool {
	return src.Type != drivers.ObjectSnapshot &&
		src.Store.ID != "" && src.Store.ID == dst.Store.ID &&
		src.Store.Provider == Name && dst.Store.Provider == Name &&
		dst.Store.Details["reflink"] == "true" &&
		src.Format != "" && src.Format == dst.Format
}

// Copy reflinks src to dst inside one store on a host in its scope (see
// CanCopy; any other pair is errdefs.ErrNotImplemented, for the
// controller's generic data motion).
func (d *Driver) Copy(ctx context.Context, src, dst drivers.DataObject, progress drivers.Progress) (drivers.ObjectInfo, error) {
	info, err := d.copy(ctx, src, dst, progress)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("copy %s %s of store %s to %s %s on filesystem store %s: %w",
			src.Type, src.ID, src.Store.ID, dst.Type, dst.ID, dst.Store.ID, err)
	}
	return info, nil
}

func (d *Driver) copy(ctx context.Context, src, dst drivers.DataObject, progress drivers.Progress) (drivers.ObjectInfo, error) {
	if err := ctx.Err(); err != nil {
		return drivers.ObjectInfo{}, err
	}
	if !d.CanCopy(src, dst) {
		return drivers.ObjectInfo{}, fmt.Errorf("only a reflink inside one store that shares extents, keeping the format, is a native copy; use the generic data motion: %w",
			errdefs.ErrNotImplemented)
	}
	from, err := objectRef(src)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	to, err := objectRef(dst)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	h, err := d.host(ctx, dst.Store)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	ii, err := h.CloneImage(ctx, hostops.CloneRequest{
		Base: from, BaseFormat: src.Format, Dest: to, Mode: drivers.CloneReflink, Format: dst.Format,
	}, progress)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	return imageObject(dst, to.Key, ii), nil
}

//go:build ceph

package rbd

import (
	"context"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"syscall"

	"github.com/ceph/go-ceph/rados"
	cephrbd "github.com/ceph/go-ceph/rbd"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// baseSnapshot is the protected snapshot of a template image its clones
// hang from.
const baseSnapshot = "stowage-base"

// Driver is the RBD driver: every object is an image of the store's pool.
type Driver struct {
	conns *connections
	// fetch reads operators' URLs (the address policy), peer the URLs
	// Stowage made (agents' exports, which answer the controller's
	// certificate): Import.
	fetch, peer *http.Client
	// hosts are the agents that serve images over NBD (GrantAccess).
	hosts hostops.Selector
	// bases are the sizes of the protected base snapshots of templates
	// already cloned, by store id/image (Clone).
	bases sync.Map
}

var (
	_ drivers.PrimaryDriver = (*Driver)(nil)
	_ drivers.Resizer       = (*Driver)(nil)
	_ drivers.Cloner        = (*Driver)(nil)
	_ drivers.VolumeFormats = (*Driver)(nil)
	_ drivers.ObjectFormats = (*Driver)(nil)
	_ drivers.GrantLister   = (*Driver)(nil)
)

// withPool runs fn with an I/O context on store's pool. librados calls
// take no context: ctx is checked before, and the connection's timeouts
// bound each call.
func (d *Driver) withPool(ctx context.Context, store drivers.StoreInfo, fn func(*cluster, *rados.IOContext) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	loc, err := parseLocation(store.URL, store.Details)
	if err != nil {
		return err
	}
	cl, err := d.conns.open(loc)
	if err != nil {
		return err
	}
	io, err := cl.conn.OpenIOContext(loc.pool)
	if err != nil {
		if errno(err) != syscall.ENOENT {
			d.conns.drop(loc)
		}
		return fmt.Errorf("pool %s: %w", loc.pool, classify(err))
	}
	defer io.Destroy()
	return fn(cl, io)
}

// VolumeFormats implements drivers.VolumeFormats: an image is raw.
func (d *Driver) VolumeFormats() []drivers.Format { return []drivers.Format{drivers.FormatRaw} }

// ObjectFormats implements drivers.ObjectFormats: a template cached in
// the pool is a raw image too (the data motion converts it).
func (d *Driver) ObjectFormats() []drivers.Format { return []drivers.Format{drivers.FormatRaw} }

// Locate implements drivers.Driver: "<type>-<id>", a snapshot's name for
// a snapshot.
func (d *Driver) Locate(obj drivers.DataObject) (string, error) {
	if !objectID.MatchString(obj.ID) {
		return "", fmt.Errorf("object id %q is not 1-100 letters, digits, '.', '_' or '-': %w", obj.ID, errdefs.ErrInvalid)
	}
	switch obj.Type {
	case drivers.ObjectVolume, drivers.ObjectTemplate:
		return imageName(obj), nil
	case drivers.ObjectSnapshot:
		return "snap-" + obj.ID, nil
	}
	return "", fmt.Errorf("an rbd store holds no %s: %w", obj.Type, errdefs.ErrInvalid)
}

// imageFeatures are those of every image Stowage makes, Ceph's default
// set: layering (clones); exclusive-lock, object-map and fast-diff, with
// which a diff (rbd diff, DiffIterate, qemu's block status over an NBD
// export) reads the object map instead of listing objects, so holes are
// known without reading; deep-flatten.
const imageFeatures = cephrbd.FeatureLayering | cephrbd.FeatureExclusiveLock | cephrbd.FeatureObjectMap | cephrbd.FeatureFastDiff | cephrbd.FeatureDeepFlatten

var objectID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$`)

func checkRaw(obj drivers.DataObject) error {
	if obj.Format != drivers.FormatRaw && obj.Format != "" {
		return fmt.Errorf("an rbd image is raw, not %s: %w", obj.Format, errdefs.ErrInvalid)
	}
	return nil
}

// Create implements drivers.Driver: a thin image of obj.Size bytes (4 MiB
// objects, layering). Creating it again with the same size is a no-op.
func (d *Driver) Create(ctx context.Context, obj drivers.DataObject) (drivers.ObjectInfo, error) {
	if err := checkRaw(obj); err != nil {
		return drivers.ObjectInfo{}, err
	}
	if obj.Size <= 0 {
		return drivers.ObjectInfo{}, fmt.Errorf("image size %d: %w", obj.Size, errdefs.ErrInvalid)
	}
	name, err := d.Locate(obj)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	var info drivers.ObjectInfo
	err = d.withPool(ctx, obj.Store, func(_ *cluster, io *rados.IOContext) error {
		opts := cephrbd.NewRbdImageOptions()
		defer opts.Destroy()
		if err := opts.SetUint64(cephrbd.ImageOptionOrder, 22); err != nil {
			return classify(err)
		}
		if err := opts.SetUint64(cephrbd.ImageOptionFeatures, imageFeatures); err != nil {
			return classify(err)
		}
		if err := cephrbd.CreateImage(io, name, uint64(obj.Size), opts); err != nil && errno(err) != syscall.EEXIST {
			return fmt.Errorf("create image %s: %w", name, classify(err))
		}
		var serr error
		info, serr = stat(io, obj, name)
		if serr == nil && info.Size != obj.Size {
			return fmt.Errorf("image %s exists with %d bytes, not %d: %w", name, info.Size, obj.Size, errdefs.ErrAlreadyExists)
		}
		return serr
	})
	return info, err
}

// stat describes image name of the pool as obj.
func stat(io *rados.IOContext, obj drivers.DataObject, name string) (drivers.ObjectInfo, error) {
	return statTarget(io, obj, target{image: name})
}

// statTarget describes an image, or a snapshot of one, as obj.
func statTarget(io *rados.IOContext, obj drivers.DataObject, t target) (drivers.ObjectInfo, error) {
	snap, name, key := cephrbd.NoSnapshot, t.String(), t.image
	if t.snap != "" {
		snap, key = t.snap, t.snap
	}
	img, err := cephrbd.OpenImageReadOnly(io, t.image, snap)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("image %s: %w", name, classify(err))
	}
	defer img.Close()
	size, err := img.GetSize()
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("image %s: %w", name, classify(err))
	}
	var used uint64
	err = img.DiffIterate(cephrbd.DiffIterateConfig{Offset: 0, Length: size, Callback: func(_, length uint64, exists int, _ interface{}) int {
		if exists != 0 {
			used += length
		}
		return 0
	}})
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("image %s: allocated extents: %w", name, classify(err))
	}
	return drivers.ObjectInfo{ID: obj.ID, Type: obj.Type, Key: key, Format: drivers.FormatRaw, Size: int64(size),
		PhysicalSize: int64(used), StoredSize: int64(size)}, nil
}

// Stat implements drivers.Driver.
func (d *Driver) Stat(ctx context.Context, obj drivers.DataObject) (drivers.ObjectInfo, error) {
	if _, err := d.Locate(obj); err != nil {
		return drivers.ObjectInfo{}, err
	}
	var info drivers.ObjectInfo
	err := d.withPool(ctx, obj.Store, func(_ *cluster, io *rados.IOContext) error {
		t, err := d.resolve(io, obj)
		if err != nil {
			return err
		}
		info, err = statTarget(io, obj, t)
		return err
	})
	return info, err
}

// ListObjects implements drivers.Driver: the images Stowage made.
func (d *Driver) ListObjects(ctx context.Context, store drivers.StoreInfo) ([]drivers.ObjectInfo, error) {
	var out []drivers.ObjectInfo
	err := d.withPool(ctx, store, func(_ *cluster, io *rados.IOContext) error {
		names, err := cephrbd.GetImageNames(io)
		if err != nil {
			return fmt.Errorf("list images: %w", classify(err))
		}
		for _, n := range names {
			typ, id, ok := strings.Cut(n, "-")
			if !ok || !ours(n) {
				continue
			}
			info, err := stat(io, drivers.DataObject{ID: id, Type: drivers.ObjectType(typ), Store: store}, n)
			if errdefs.IsNotFound(err) {
				continue // removed meanwhile
			}
			if err != nil {
				return err
			}
			out = append(out, info)
		}
		return nil
	})
	return out, err
}

// Delete implements drivers.Driver: the image and its snapshots; a
// template with clones is refused (their data hangs from it). A missing
// image is not an error.
func (d *Driver) Delete(ctx context.Context, obj drivers.DataObject) error {
	name, err := d.Locate(obj)
	if err != nil {
		return err
	}
	return d.withPool(ctx, obj.Store, func(_ *cluster, io *rados.IOContext) error {
		if obj.Type == drivers.ObjectSnapshot {
			return deleteSnapshot(io, name)
		}
		d.bases.Delete(obj.Store.ID + "/" + name)
		img, err := cephrbd.OpenImage(io, name, cephrbd.NoSnapshot)
		if errno(err) == syscall.ENOENT {
			return nil
		}
		if err != nil {
			return fmt.Errorf("image %s: %w", name, classify(err))
		}
		snaps, err := img.GetSnapshotNames()
		if err != nil {
			img.Close()
			return fmt.Errorf("image %s: snapshots: %w", name, classify(err))
		}
		for _, s := range snaps {
			snap := img.GetSnapshot(s.Name)
			if s.Name == baseSnapshot {
				// A template's clones are the volumes made from it: they
				// keep it (the controller deletes a template no volume
				// uses).
				if prot, _ := snap.IsProtected(); prot {
					if err := snap.Unprotect(); err != nil {
						img.Close()
						if errno(err) == syscall.EBUSY {
							return fmt.Errorf("image %s has clones hanging from snapshot %s: delete them first: %w", name, s.Name, errdefs.ErrFailedPrecondition)
						}
						return fmt.Errorf("image %s: unprotect %s: %w", name, s.Name, classify(err))
					}
				}
			} else if err := unprotect(io, name, s.Name, snap); err != nil {
				img.Close()
				return err
			}
			if err := snap.Remove(); err != nil {
				img.Close()
				return fmt.Errorf("image %s: remove snapshot %s: %w", name, s.Name, classify(err))
			}
			if err := unindexSnapshot(io, s.Name); err != nil {
				img.Close()
				return err
			}
		}
		if err := img.Close(); err != nil {
			return fmt.Errorf("image %s: %w", name, classify(err))
		}
		if err := cephrbd.RemoveImage(io, name); err != nil && errno(err) != syscall.ENOENT {
			return fmt.Errorf("remove image %s: %w", name, classify(err))
		}
		return nil
	})
}

// CanCopy implements drivers.Driver: a snapshot of a volume becomes a new
// raw volume of the same store as an RBD clone of the snapshot, no byte
// copied (a volume from a template in the pool is a Clone). Any other
// pair goes through the generic data motion.
func (d *Driver) CanCopy(src, dst drivers.DataObject) bool {
	return src.Type == drivers.ObjectSnapshot && dst.Type == drivers.ObjectVolume &&
		src.Store.ID != "" && src.Store.ID == dst.Store.ID &&
		src.Store.Provider == Name && dst.Store.Provider == Name &&
		(dst.Format == "" || dst.Format == drivers.FormatRaw)
}

// Copy implements drivers.Driver (see CanCopy): the snapshot is protected
// (once) and cloned; the clone reads as the snapshot, grows to dst.Size
// when that is larger, and stands alone whatever happens to the snapshot
// later (deleting a snapshot flattens its clones first). A clone already
// there (a retried copy) is kept.
func (d *Driver) Copy(ctx context.Context, src, dst drivers.DataObject, progress drivers.Progress) (drivers.ObjectInfo, error) {
	if !d.CanCopy(src, dst) {
		return drivers.ObjectInfo{}, fmt.Errorf("rbd: only a snapshot to a raw volume of its own store is a native copy; use the generic data motion: %w",
			errdefs.ErrNotImplemented)
	}
	dname, err := d.Locate(dst)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	var info drivers.ObjectInfo
	err = d.withPool(ctx, dst.Store, func(_ *cluster, io *rados.IOContext) error {
		t, err := d.resolve(io, src)
		if err != nil {
			return err
		}
		size, err := protectSnapshot(io, t)
		if err != nil {
			return err
		}
		err = cloneImage(io, t.image, t.snap, dname)
		existed := errno(err) == syscall.EEXIST
		if err != nil && !existed {
			return fmt.Errorf("clone %s to %s: %w", t, dname, classify(err))
		}
		if dst.Size > int64(size) {
			img, err := cephrbd.OpenImage(io, dname, cephrbd.NoSnapshot)
			if err != nil {
				return fmt.Errorf("image %s: %w", dname, classify(err))
			}
			cur, err := img.GetSize()
			if err == nil && int64(cur) < dst.Size {
				err = img.Resize(uint64(dst.Size))
			}
			if cerr := img.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("grow clone %s: %w", dname, classify(err))
			}
		}
		if info, err = stat(io, dst, dname); err != nil {
			return err
		}
		info.Method = "rbd-clone"
		return nil
	})
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("copy snapshot %s to volume %s on rbd store %s: %w", src.ID, dst.ID, dst.Store.ID, err)
	}
	return info, nil
}

// protectSnapshot protects snapshot t (one protected already is left as
// it is) and returns its size.
func protectSnapshot(io *rados.IOContext, t target) (uint64, error) {
	img, err := cephrbd.OpenImage(io, t.image, cephrbd.NoSnapshot)
	if err != nil {
		return 0, fmt.Errorf("image %s: %w", t.image, classify(err))
	}
	defer img.Close()
	snap := img.GetSnapshot(t.snap)
	prot, err := snap.IsProtected()
	if err != nil {
		return 0, fmt.Errorf("snapshot %s: %w", t, classify(err))
	}
	if !prot {
		if err := snap.Protect(); err != nil && errno(err) != syscall.EBUSY {
			return 0, fmt.Errorf("protect %s: %w", t, classify(err))
		}
	}
	at, err := cephrbd.OpenImageReadOnly(io, t.image, t.snap)
	if err != nil {
		return 0, fmt.Errorf("snapshot %s: %w", t, classify(err))
	}
	defer at.Close()
	size, err := at.GetSize()
	if err != nil {
		return 0, fmt.Errorf("snapshot %s: %w", t, classify(err))
	}
	return size, nil
}

// Resize implements drivers.Resizer: an image only grows.
func (d *Driver) Resize(ctx context.Context, obj drivers.DataObject, newSize int64) (drivers.ObjectInfo, error) {
	name, err := d.Locate(obj)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	var info drivers.ObjectInfo
	err = d.withPool(ctx, obj.Store, func(_ *cluster, io *rados.IOContext) error {
		img, err := cephrbd.OpenImage(io, name, cephrbd.NoSnapshot)
		if err != nil {
			return fmt.Errorf("image %s: %w", name, classify(err))
		}
		size, err := img.GetSize()
		if err == nil && int64(size) > newSize {
			err = fmt.Errorf("image %s is %d bytes: shrinking to %d would lose data: %w", name, size, newSize, errdefs.ErrInvalid)
		} else if err == nil && int64(size) < newSize {
			err = img.Resize(uint64(newSize))
			if err != nil {
				err = fmt.Errorf("resize image %s: %w", name, classify(err))
			}
		}
		if cerr := img.Close(); err == nil && cerr != nil {
			err = classify(cerr)
		}
		if err != nil {
			return err
		}
		info, err = stat(io, obj, name)
		return err
	})
	return info, err
}

// TakeSnapshot implements drivers.PrimaryDriver: an RBD snapshot of the
// volume's image (taking it again is a no-op).
func (d *Driver) TakeSnapshot(ctx context.Context, snap drivers.SnapshotObject) (drivers.ObjectInfo, error) {
	vol, err := d.Locate(snap.Volume)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	sname, _ := d.Locate(snap.DataObject)
	var info drivers.ObjectInfo
	err = d.withPool(ctx, snap.Volume.Store, func(_ *cluster, io *rados.IOContext) error {
		img, err := cephrbd.OpenImage(io, vol, cephrbd.NoSnapshot)
		if err != nil {
			return fmt.Errorf("image %s: %w", vol, classify(err))
		}
		defer img.Close()
		if err := indexSnapshot(io, sname, vol); err != nil {
			return err
		}
		if _, err := img.CreateSnapshot(sname); err != nil && errno(err) != syscall.EEXIST {
			return fmt.Errorf("snapshot %s@%s: %w", vol, sname, classify(err))
		}
		size, err := img.GetSize()
		if err != nil {
			return classify(err)
		}
		info = drivers.ObjectInfo{ID: snap.ID, Type: drivers.ObjectSnapshot, Key: sname, Format: drivers.FormatRaw,
			Size: int64(size), StoredSize: int64(size), Method: "rbd-snapshot"}
		return nil
	})
	return info, err
}

// RevertSnapshot implements drivers.PrimaryDriver: rollback of the image
// to the snapshot.
func (d *Driver) RevertSnapshot(ctx context.Context, snap drivers.SnapshotObject) error {
	vol, err := d.Locate(snap.Volume)
	if err != nil {
		return err
	}
	sname, _ := d.Locate(snap.DataObject)
	return d.withPool(ctx, snap.Volume.Store, func(_ *cluster, io *rados.IOContext) error {
		img, err := cephrbd.OpenImage(io, vol, cephrbd.NoSnapshot)
		if err != nil {
			return fmt.Errorf("image %s: %w", vol, classify(err))
		}
		defer img.Close()
		if err := img.GetSnapshot(sname).Rollback(); err != nil {
			return fmt.Errorf("roll %s back to %s: %w", vol, sname, classify(err))
		}
		return nil
	})
}

// Clone implements drivers.Cloner: the volume is an RBD clone of the
// template's protected base snapshot (made the first time), O(1), no
// byte copied; CloneFull flattens it (the cluster copies the parent's
// data into it). A template in a host's mount cannot be cloned here.
func (d *Driver) Clone(ctx context.Context, spec drivers.CloneSpec, progress drivers.Progress) (drivers.ObjectInfo, error) {
	if spec.BaseInMount {
		return drivers.ObjectInfo{}, fmt.Errorf("rbd: a lazy volume over a host's template mount is not an rbd image: %w", errdefs.ErrNotImplemented)
	}
	if err := checkRaw(spec.Dst); err != nil {
		return drivers.ObjectInfo{}, err
	}
	base, err := d.Locate(spec.Base)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	dst, err := d.Locate(spec.Dst)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	var info drivers.ObjectInfo
	err = d.withPool(ctx, spec.Dst.Store, func(_ *cluster, io *rados.IOContext) error {
		// The base snapshot, once protected, never changes: its size is
		// remembered, and a clone is then one librbd call.
		key := spec.Dst.Store.ID + "/" + base
		v, known := d.bases.Load(key)
		size, _ := v.(uint64)
		if !known {
			var err error
			if size, err = protectBase(io, base); err != nil {
				return err
			}
			d.bases.Store(key, size)
		}
		err := cloneImage(io, base, baseSnapshot, dst)
		if known && errno(err) == syscall.ENOENT {
			// The base snapshot went (the template was removed and
			// imported again): made anew.
			d.bases.Delete(key)
			if size, err = protectBase(io, base); err != nil {
				return err
			}
			d.bases.Store(key, size)
			err = cloneImage(io, base, baseSnapshot, dst)
		}
		existed := errno(err) == syscall.EEXIST
		if err != nil && !existed {
			return fmt.Errorf("clone %s@%s to %s: %w", base, baseSnapshot, dst, classify(err))
		}
		if !existed && spec.Mode != drivers.CloneFull && spec.Dst.Size <= int64(size) {
			// A new clone: nothing of its own yet.
			info = drivers.ObjectInfo{ID: spec.Dst.ID, Type: spec.Dst.Type, Key: dst, Format: drivers.FormatRaw,
				Size: int64(size), StoredSize: int64(size), Method: "rbd-clone"}
			return nil
		}
		img, err := cephrbd.OpenImage(io, dst, cephrbd.NoSnapshot)
		if err != nil {
			return fmt.Errorf("image %s: %w", dst, classify(err))
		}
		method := "rbd-clone"
		if spec.Dst.Size > 0 {
			if size, err := img.GetSize(); err == nil && int64(size) < spec.Dst.Size {
				if err := img.Resize(uint64(spec.Dst.Size)); err != nil {
					img.Close()
					return fmt.Errorf("grow clone %s: %w", dst, classify(err))
				}
			}
		}
		if spec.Mode == drivers.CloneFull {
			method = "rbd-clone-flatten"
			if err := img.Flatten(); err != nil {
				img.Close()
				return fmt.Errorf("flatten %s: %w", dst, classify(err))
			}
		}
		if err := img.Close(); err != nil {
			return classify(err)
		}
		info, err = stat(io, spec.Dst, dst)
		info.Method = method
		return err
	})
	return info, err
}

// cloneImage clones snapshot snap of image base as dst, with Stowage's
// features.
func cloneImage(io *rados.IOContext, base, snap, dst string) error {
	opts := cephrbd.NewRbdImageOptions()
	defer opts.Destroy()
	if err := opts.SetUint64(cephrbd.ImageOptionFeatures, imageFeatures); err != nil {
		return classify(err)
	}
	return cephrbd.CloneImage(io, base, snap, io, dst, opts)
}

// protectBase makes the base snapshot of image base, protected, once, and
// returns its size.
func protectBase(io *rados.IOContext, base string) (uint64, error) {
	img, err := cephrbd.OpenImage(io, base, cephrbd.NoSnapshot)
	if err != nil {
		return 0, fmt.Errorf("template image %s: %w", base, classify(err))
	}
	defer img.Close()
	size, err := img.GetSize()
	if err != nil {
		return 0, fmt.Errorf("template image %s: %w", base, classify(err))
	}
	snap := img.GetSnapshot(baseSnapshot)
	if _, err := img.CreateSnapshot(baseSnapshot); err != nil && errno(err) != syscall.EEXIST {
		return 0, fmt.Errorf("snapshot %s@%s: %w", base, baseSnapshot, classify(err))
	}
	prot, err := snap.IsProtected()
	if err != nil {
		return 0, fmt.Errorf("snapshot %s@%s: %w", base, baseSnapshot, classify(err))
	}
	if !prot {
		if err := snap.Protect(); err != nil && errno(err) != syscall.EBUSY {
			return 0, fmt.Errorf("protect %s@%s: %w", base, baseSnapshot, classify(err))
		}
	}
	return size, nil
}

//go:build ceph

package rbd

import (
	"context"
	"fmt"
	"sort"
	"syscall"

	"github.com/ceph/go-ceph/rados"
	cephrbd "github.com/ceph/go-ceph/rbd"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// A snapshot object is the RBD snapshot "snap-<id>" of its volume's image.
// Calls that name the snapshot alone (Stat, Delete, GrantAccess) find the
// image through an index in the omap of the pool's marker object
// (snapIndexPrefix + snapshot name -> image name), written before the
// snapshot is made, removed after it is deleted; a snapshot missing from
// it is looked for in every image of Stowage's.
const snapIndexPrefix = "snap:"

var _ drivers.ChangeTracker = (*Driver)(nil)

// indexSnapshot records that snapshot sname is of image.
func indexSnapshot(io *rados.IOContext, sname, image string) error {
	if err := io.SetOmap(markerObject, map[string][]byte{snapIndexPrefix + sname: []byte(image)}); err != nil {
		return fmt.Errorf("index snapshot %s of %s: %w", sname, image, classify(err))
	}
	return nil
}

// unindexSnapshot forgets snapshot sname.
func unindexSnapshot(io *rados.IOContext, sname string) error {
	if err := io.RmOmapKeys(markerObject, []string{snapIndexPrefix + sname}); err != nil && errno(err) != syscall.ENOENT {
		return fmt.Errorf("unindex snapshot %s: %w", sname, classify(err))
	}
	return nil
}

// snapshotImage returns the image holding snapshot sname
// (errdefs.ErrNotFound when none does).
func snapshotImage(io *rados.IOContext, sname string) (string, error) {
	vals, err := io.GetOmapValues(markerObject, "", snapIndexPrefix+sname, 2)
	if err != nil {
		return "", fmt.Errorf("snapshot index: %w", classify(err))
	}
	if v, ok := vals[snapIndexPrefix+sname]; ok {
		if has, err := hasSnapshot(io, string(v), sname); err != nil || has {
			return string(v), err
		}
	}
	names, err := cephrbd.GetImageNames(io)
	if err != nil {
		return "", fmt.Errorf("list images: %w", classify(err))
	}
	for _, n := range names {
		if !ours(n) {
			continue
		}
		if has, err := hasSnapshot(io, n, sname); err != nil {
			return "", err
		} else if has {
			return n, nil
		}
	}
	return "", fmt.Errorf("snapshot %s: no image of the pool has it: %w", sname, errdefs.ErrNotFound)
}

// hasSnapshot says whether image has snapshot sname (false for a missing image).
func hasSnapshot(io *rados.IOContext, image, sname string) (bool, error) {
	img, err := cephrbd.OpenImageReadOnly(io, image, cephrbd.NoSnapshot)
	if errno(err) == syscall.ENOENT {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("image %s: %w", image, classify(err))
	}
	defer img.Close()
	snaps, err := img.GetSnapshotNames()
	if err != nil {
		return false, fmt.Errorf("image %s: snapshots: %w", image, classify(err))
	}
	for _, s := range snaps {
		if s.Name == sname {
			return true, nil
		}
	}
	return false, nil
}

// target is what an object is in the pool: an image, or a snapshot of one.
type target struct {
	image, snap string
}

func (t target) String() string {
	if t.snap == "" {
		return t.image
	}
	return t.image + "@" + t.snap
}

// resolve finds obj in the pool: its image, and for a snapshot the image
// it is of.
func (d *Driver) resolve(io *rados.IOContext, obj drivers.DataObject) (target, error) {
	name, err := d.Locate(obj)
	if err != nil {
		return target{}, err
	}
	if obj.Type != drivers.ObjectSnapshot {
		return target{image: name}, nil
	}
	image, err := snapshotImage(io, name)
	if err != nil {
		return target{}, err
	}
	return target{image: image, snap: name}, nil
}

// deleteSnapshot removes snapshot sname of its image (a missing one is
// not an error). A protected snapshot with clones is refused.
func deleteSnapshot(io *rados.IOContext, sname string) error {
	image, err := snapshotImage(io, sname)
	if errdefs.IsNotFound(err) {
		return unindexSnapshot(io, sname)
	}
	if err != nil {
		return err
	}
	img, err := cephrbd.OpenImage(io, image, cephrbd.NoSnapshot)
	if err != nil {
		return fmt.Errorf("image %s: %w", image, classify(err))
	}
	defer img.Close()
	snap := img.GetSnapshot(sname)
	if err := unprotect(io, image, sname, snap); err != nil {
		return err
	}
	if err := snap.Remove(); err != nil && errno(err) != syscall.ENOENT {
		return fmt.Errorf("remove snapshot %s@%s: %w", image, sname, classify(err))
	}
	return unindexSnapshot(io, sname)
}

// unprotect unprotects snapshot sname of image (one not protected is left
// as it is). Clones hanging from it are flattened first, and only then:
// each gets its own copy of the data it reads from the snapshot, so the
// snapshot can go without them losing anything.
func unprotect(io *rados.IOContext, image, sname string, snap *cephrbd.Snapshot) error {
	prot, err := snap.IsProtected()
	if err != nil {
		return fmt.Errorf("snapshot %s@%s: %w", image, sname, classify(err))
	}
	if !prot {
		return nil
	}
	err = snap.Unprotect()
	if errno(err) == syscall.EBUSY {
		if err := flattenChildren(io, image, sname); err != nil {
			return err
		}
		err = snap.Unprotect()
	}
	if err != nil {
		return fmt.Errorf("unprotect %s@%s: %w", image, sname, classify(err))
	}
	return nil
}

// flattenChildren flattens the clones of snapshot sname of image. A clone
// in another pool is refused: this store's user may not write there.
func flattenChildren(io *rados.IOContext, image, sname string) error {
	img, err := cephrbd.OpenImageReadOnly(io, image, sname)
	if err != nil {
		return fmt.Errorf("image %s@%s: %w", image, sname, classify(err))
	}
	pools, children, err := img.ListChildren()
	img.Close()
	if err != nil {
		return fmt.Errorf("clones of %s@%s: %w", image, sname, classify(err))
	}
	pool, err := io.GetPoolName()
	if err != nil {
		return classify(err)
	}
	for i, child := range children {
		if pools[i] != pool {
			return fmt.Errorf("snapshot %s@%s has a clone in another pool (%s/%s): flatten or delete it first: %w",
				image, sname, pools[i], child, errdefs.ErrFailedPrecondition)
		}
		c, err := cephrbd.OpenImage(io, child, cephrbd.NoSnapshot)
		if err != nil {
			return fmt.Errorf("clone %s of %s@%s: %w", child, image, sname, classify(err))
		}
		err = c.Flatten()
		c.Close()
		if err != nil {
			return fmt.Errorf("flatten clone %s of %s@%s: %w", child, image, sname, classify(err))
		}
	}
	return nil
}

// Changed implements drivers.ChangeTracker with RBD's diff between two
// snapshots of an image (librbd's diff_iterate, which reads the object
// map or lists the objects, never the data): the ranges written after
// since and before snap. Adjacent ranges are merged.
func (d *Driver) Changed(ctx context.Context, snap, since drivers.SnapshotObject) ([]drivers.Extent, error) {
	sname, err := d.Locate(snap.DataObject)
	if err != nil {
		return nil, err
	}
	fromName, err := d.Locate(since.DataObject)
	if err != nil {
		return nil, err
	}
	var out []drivers.Extent
	err = d.withPool(ctx, snap.Volume.Store, func(_ *cluster, io *rados.IOContext) error {
		image, err := snapshotImage(io, sname)
		if err != nil {
			return err
		}
		if has, err := hasSnapshot(io, image, fromName); err != nil {
			return err
		} else if !has {
			return fmt.Errorf("snapshot %s of image %s is gone: %w", fromName, image, errdefs.ErrNotFound)
		}
		img, err := cephrbd.OpenImageReadOnly(io, image, sname)
		if err != nil {
			return fmt.Errorf("image %s@%s: %w", image, sname, classify(err))
		}
		defer img.Close()
		size, err := img.GetSize()
		if err != nil {
			return classify(err)
		}
		err = img.DiffIterate(cephrbd.DiffIterateConfig{SnapName: fromName, Offset: 0, Length: size,
			Callback: func(off, length uint64, _ int, _ interface{}) int {
				// exists == 0 is a discarded range: changed too (it reads as zeros now).
				out = append(out, drivers.Extent{Offset: int64(off), Length: int64(length)})
				return 0
			}})
		if err != nil {
			return fmt.Errorf("diff %s@%s since %s: %w", image, sname, fromName, classify(err))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return mergeExtents(out), nil
}

// mergeExtents sorts xs and merges the ranges that touch or overlap.
func mergeExtents(xs []drivers.Extent) []drivers.Extent {
	sort.Slice(xs, func(i, j int) bool { return xs[i].Offset < xs[j].Offset })
	var out []drivers.Extent
	for _, x := range xs {
		if n := len(out); n > 0 && out[n-1].Offset+out[n-1].Length >= x.Offset {
			if end := x.Offset + x.Length; end > out[n-1].Offset+out[n-1].Length {
				out[n-1].Length = end - out[n-1].Offset
			}
			continue
		}
		out = append(out, x)
	}
	return out
}

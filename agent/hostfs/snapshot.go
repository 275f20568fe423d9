package hostfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
)

// SnapshotImage takes a snapshot of the volume at req.Volume, an image of
// req.Format (opened as that, never probed), into req.Snapshot. The volume
// must not be in use (qemu-img's lock; a running
// VM's disk is snapshotted through the hypervisor instead):
//
//   - qcow2: an external snapshot in O(1). A new empty overlay is made
//     first (staged, backed by the snapshot path that does not exist yet),
//     then the volume file is renamed to the snapshot path and made
//     read-only (0444), then the overlay is renamed to the volume path with
//     the volume's owner and mode. A crash between the two renames leaves
//     the snapshot and no volume; running the step again finishes it.
//     A relative backing file name of the volume is made absolute first,
//     so the snapshot still finds it from its own directory. Volume and
//     snapshot must be on one filesystem (errdefs.ErrFailedPrecondition)
//     and in one store (errdefs.ErrInvalid). The volume's backing chain
//     must pass checkChain.
//   - raw: a reflink of the volume where the filesystem can share extents,
//     a sparse copy otherwise (Method "reflink" or "copy"), read-only.
//
// A snapshot already taken (the volume is an overlay on req.Snapshot, or
// for raw a raw snapshot of the volume's size exists) is returned as it is.
func (l *Local) SnapshotImage(ctx context.Context, req SnapshotRequest) (SnapshotInfo, error) {
	info, err := l.snapshotImage(ctx, req)
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("snapshot %s to %s on host %s: %w", req.Volume, req.Snapshot, l.hostID, err)
	}
	return info, nil
}

func (l *Local) snapshotImage(ctx context.Context, req SnapshotRequest) (SnapshotInfo, error) {
	format, err := snapshotFormat(req)
	if err != nil {
		return SnapshotInfo{}, err
	}
	vol, snap, unlock, err := l.lockPair(ctx, req)
	if err != nil {
		return SnapshotInfo{}, err
	}
	defer unlock()
	volOK, err := exists(vol)
	if err != nil {
		return SnapshotInfo{}, err
	}
	snapOK, err := exists(snap)
	if err != nil {
		return SnapshotInfo{}, err
	}
	if !volOK && !snapOK {
		return SnapshotInfo{}, fmt.Errorf("volume %s does not exist: %w", req.Volume, errdefs.ErrNotFound)
	}
	if snapOK {
		if !volOK {
			if format != qemuimg.FormatQCOW2 {
				return SnapshotInfo{}, fmt.Errorf("volume %s does not exist: %w", req.Volume, errdefs.ErrNotFound)
			}
			// A crash between the two renames: finish the snapshot.
			si, err := l.openDeclared(ctx, snap, format, false)
			if err != nil {
				return SnapshotInfo{}, err
			}
			removeStage(stagePath(vol, "snap"))
			if err := l.newOverlay(ctx, snap, si.VirtualSize, vol, ""); err != nil {
				return SnapshotInfo{}, err
			}
			return l.snapshotResult(ctx, req, vol, snap, format, "qcow2-external")
		}
		si, err := l.qemu.Info(ctx, snap, qemuimg.AssumeFormat(format), qemuimg.ForceShare())
		if err != nil {
			return SnapshotInfo{}, fmt.Errorf("%s exists and is not a %s snapshot (%v): %w", req.Snapshot, format, err, errdefs.ErrAlreadyExists)
		}
		vi, err := l.qemu.Info(ctx, vol, qemuimg.AssumeFormat(format), qemuimg.ForceShare())
		if err != nil {
			return SnapshotInfo{}, err
		}
		switch {
		case format == qemuimg.FormatQCOW2 && backingOf(vi) == snap:
			return l.snapshotResult(ctx, req, vol, snap, format, "qcow2-external")
		case format == qemuimg.FormatRaw && vi.VirtualSize == si.VirtualSize:
			return l.snapshotResult(ctx, req, vol, snap, format, "existing")
		}
		return SnapshotInfo{}, fmt.Errorf("%s exists and is not a snapshot of %s: %w", req.Snapshot, req.Volume, errdefs.ErrAlreadyExists)
	}

	// Exclusive: a volume a VM holds open fails here (FailedPrecondition).
	vi, err := l.openDeclared(ctx, vol, format, true)
	if err != nil {
		return SnapshotInfo{}, err
	}
	switch format {
	case qemuimg.FormatQCOW2:
		// The volume will be backed by the snapshot: it must be in the
		// volume's store, or every later step on the volume is refused.
		if st, ok := l.storeOf(vol); !ok || !within(snap, st) {
			return SnapshotInfo{}, fmt.Errorf("snapshot %s of qcow2 volume %s must be inside the volume's store (the volume becomes an overlay on it): %w", req.Snapshot, req.Volume, errdefs.ErrInvalid)
		}
		if vi.BackingFilename != "" && !filepath.IsAbs(vi.BackingFilename) && filepath.Dir(vol) != filepath.Dir(snap) {
			if err := l.absoluteBacking(ctx, vol, vi); err != nil {
				return SnapshotInfo{}, err
			}
		}
		stage := stagePath(vol, "snap")
		removeStage(stage)
		defer removeStage(stage)
		if err := l.qemu.Create(ctx, stage, qemuimg.FormatQCOW2, vi.VirtualSize,
			qemuimg.BackingFile(snap, qemuimg.FormatQCOW2), qemuimg.SkipBackingCheck()); err != nil {
			return SnapshotInfo{}, err
		}
		if err := sameOwner(vol, stage); err != nil {
			return SnapshotInfo{}, err
		}
		if err := durable.SyncFile(stage); err != nil {
			return SnapshotInfo{}, classed(err)
		}
		if err := ctx.Err(); err != nil {
			return SnapshotInfo{}, err
		}
		if err := durable.RenameNoReplace(vol, snap); err != nil {
			if errors.Is(err, unix.EXDEV) {
				return SnapshotInfo{}, fmt.Errorf("volume and snapshot are on different filesystems; a qcow2 snapshot renames the volume: %w", errdefs.ErrFailedPrecondition)
			}
			return SnapshotInfo{}, classed(err)
		}
		if err := os.Chmod(snap, 0o440); err != nil {
			return SnapshotInfo{}, classed(err)
		}
		if err := durable.SyncDir(filepath.Dir(snap)); err != nil {
			return SnapshotInfo{}, classed(err)
		}
		// From here the step is committed: finish it even if ctx ended.
		if err := durable.RenameNoReplace(stage, vol); err != nil {
			return SnapshotInfo{}, classed(err)
		}
		if err := durable.SyncDir(filepath.Dir(vol)); err != nil {
			return SnapshotInfo{}, classed(err)
		}
		return l.snapshotResult(ctx, req, vol, snap, format, "qcow2-external")
	default: // raw: its bytes, whatever they look like
		stage := stagePath(snap, "snap")
		defer removeStage(stage)
		res, err := streamCopy(ctx, vol, stream.SourceOptions{Format: qemuimg.FormatRaw}, stage, stream.Options{})
		if err != nil {
			return SnapshotInfo{}, err
		}
		if err := os.Chmod(stage, 0o440); err != nil {
			return SnapshotInfo{}, classed(err)
		}
		if err := publish(ctx, stage, snap); err != nil {
			return SnapshotInfo{}, err
		}
		method := "copy"
		if res.Method == "reflink" {
			method = "reflink"
		}
		return l.snapshotResult(ctx, req, vol, snap, format, method)
	}
}

// snapshotFormat is the qemu-img format of req's volume and snapshots:
// raw or qcow2, as declared.
func snapshotFormat(req SnapshotRequest) (string, error) {
	format, err := declared("volume", req.Format)
	if err != nil {
		return "", err
	}
	if format != qemuimg.FormatRaw && format != qemuimg.FormatQCOW2 {
		return "", fmt.Errorf("volume %s is %s; snapshots are made of raw and qcow2 volumes: %w", req.Volume, req.Format, errdefs.ErrInvalid)
	}
	return format, nil
}

// lockPair checks the paths of req and locks both objects.
func (l *Local) lockPair(ctx context.Context, req SnapshotRequest) (vol, snap string, unlock func(), err error) {
	if vol, err = l.objectPath(req.Volume); err != nil {
		return "", "", nil, err
	}
	if snap, err = l.objectPath(req.Snapshot); err != nil {
		return "", "", nil, err
	}
	if vol == snap {
		return "", "", nil, fmt.Errorf("volume and snapshot are the same path: %w", errdefs.ErrInvalid)
	}
	if err := l.makeDir(snap, req.Snapshot); err != nil {
		return "", "", nil, err
	}
	if err := needDir(vol, req.Volume); err != nil {
		return "", "", nil, err
	}
	unlock, err = l.locks.lock(ctx, vol, snap)
	return vol, snap, unlock, err
}

// newOverlay makes an empty qcow2 overlay backed by backing (a qcow2) of
// size bytes at final, replacing what is there, with the owner and mode of
// like ("" leaves the defaults).
func (l *Local) newOverlay(ctx context.Context, backing string, size int64, final, like string) error {
	stage := stagePath(final, "revert")
	removeStage(stage)
	defer removeStage(stage)
	if err := l.qemu.Create(ctx, stage, qemuimg.FormatQCOW2, size, qemuimg.BackingFile(backing, qemuimg.FormatQCOW2)); err != nil {
		return err
	}
	if like != "" {
		if err := sameOwner(like, stage); err != nil {
			return err
		}
	}
	return replace(stage, final)
}

func (l *Local) snapshotResult(ctx context.Context, req SnapshotRequest, vol, snap, format, method string) (SnapshotInfo, error) {
	si, _, err := l.imageInfo(ctx, req.Snapshot, snap, format, qemuimg.ForceShare())
	if err != nil {
		return SnapshotInfo{}, err
	}
	vi, _, err := l.imageInfo(ctx, req.Volume, vol, format, qemuimg.ForceShare())
	if err != nil {
		return SnapshotInfo{}, err
	}
	si.Method, vi.Method = method, method
	return SnapshotInfo{Snapshot: si, Volume: vi, Method: method}, nil
}

// RevertImage makes the volume at req.Volume read what req.Snapshot holds;
// both are of req.Format (opened as that, never probed; a qcow2 snapshot's
// chain must pass checkChain). The volume must not be in use. For a qcow2 snapshot the volume becomes a
// new empty overlay on it (the volume's current overlay is discarded; the
// snapshot and every other snapshot stay as they are); for a raw snapshot
// it becomes a reflink or sparse copy of it. Either way the new volume is
// staged and renamed over the old one, with its owner and mode. A volume
// that already is an empty overlay on the snapshot is left alone.
func (l *Local) RevertImage(ctx context.Context, req SnapshotRequest) (ImageInfo, error) {
	info, err := l.revertImage(ctx, req)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("revert %s to %s on host %s: %w", req.Volume, req.Snapshot, l.hostID, err)
	}
	return info, nil
}

func (l *Local) revertImage(ctx context.Context, req SnapshotRequest) (ImageInfo, error) {
	format, err := snapshotFormat(req)
	if err != nil {
		return ImageInfo{}, err
	}
	vol, snap, unlock, err := l.lockPair(ctx, req)
	if err != nil {
		return ImageInfo{}, err
	}
	defer unlock()
	si, err := l.openDeclared(ctx, snap, format, false)
	if err != nil {
		return ImageInfo{}, err
	}
	volOK, err := exists(vol)
	if err != nil {
		return ImageInfo{}, err
	}
	like := ""
	var vi qemuimg.Info
	if volOK {
		like = vol
		// Exclusive: a volume a VM holds open fails here (FailedPrecondition).
		if vi, err = l.qemu.Info(ctx, vol, qemuimg.AssumeFormat(format)); err != nil {
			return ImageInfo{}, err
		}
	}
	var method string
	switch format {
	case qemuimg.FormatQCOW2:
		method = "qcow2-external"
		if volOK && backingOf(vi) == snap {
			// qemu-img map reads the volume's chain: check it first.
			if err := l.checkChain(ctx, vol, vi); err != nil {
				return ImageInfo{}, err
			}
			empty, err := l.emptyOverlay(ctx, vol)
			if err != nil {
				return ImageInfo{}, err
			}
			if empty && vi.VirtualSize == si.VirtualSize {
				info, _, err := l.imageInfo(ctx, req.Volume, vol, format)
				info.Method = "existing"
				return info, err
			}
		}
		if err := ctx.Err(); err != nil {
			return ImageInfo{}, err
		}
		if err := l.newOverlay(ctx, snap, si.VirtualSize, vol, like); err != nil {
			return ImageInfo{}, err
		}
	default: // raw: the snapshot's bytes, whatever they look like
		stage := stagePath(vol, "revert")
		defer removeStage(stage)
		res, err := streamCopy(ctx, snap, stream.SourceOptions{Format: qemuimg.FormatRaw}, stage, stream.Options{})
		if err != nil {
			return ImageInfo{}, err
		}
		if like != "" {
			if err := sameOwner(like, stage); err != nil {
				return ImageInfo{}, err
			}
		} else if err := os.Chmod(stage, 0o640); err != nil {
			return ImageInfo{}, classed(err)
		}
		if err := replace(stage, vol); err != nil {
			return ImageInfo{}, err
		}
		method = "copy"
		if res.Method == "reflink" {
			method = "reflink"
		}
	}
	info, _, err := l.imageInfo(ctx, req.Volume, vol, format)
	if err != nil {
		return ImageInfo{}, err
	}
	info.Method = method
	return info, nil
}

// emptyOverlay reports whether the qcow2 at host holds no data of its own.
func (l *Local) emptyOverlay(ctx context.Context, host string) (bool, error) {
	m, err := l.qemu.Map(ctx, host, qemuimg.FormatQCOW2)
	if err != nil {
		return false, err
	}
	for _, e := range m {
		if e.Depth == 0 && e.Present {
			return false, nil
		}
	}
	return true, nil
}

// sameOwner gives dst the owner and mode of src (a new overlay replacing a
// volume must stay usable by the VM's user).
func sameOwner(src, dst string) error {
	fi, err := os.Stat(src)
	if err != nil {
		return classed(err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	if err := os.Chown(dst, int(st.Uid), int(st.Gid)); err != nil && !errors.Is(err, fs.ErrPermission) {
		return classed(err)
	}
	return classed(os.Chmod(dst, fi.Mode().Perm()|0o200))
}

package hostfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/datapath/qcow2"
	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// CloneImage creates the volume req.Dest from the image req.Base, opened
// as req.BaseFormat (never probed; a qcow2 base's chain must pass
// checkChain):
//
//   - CloneReflink clones Base's file with FICLONE (the same format;
//     errdefs.ErrNotImplemented where the filesystem cannot share extents);
//   - CloneLinked creates a qcow2 whose backing file is Base, recorded with
//     req.BaseFormat; Base must be in Dest's store (checkChain of the new
//     image);
//   - CloneFull copies what Base's guest sees into a standalone image of
//     req.Format: the copy engine for raw, qemu-img convert for qcow2.
//
// req.Size 0 keeps Base's virtual size, a larger one grows the volume, a
// smaller one is errdefs.ErrInvalid.
func (l *Local) CloneImage(ctx context.Context, req CloneRequest, progress drivers.Progress) (ImageInfo, error) {
	info, err := l.cloneImage(ctx, req, progress)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("%s clone of %s to %s on host %s: %w", req.Mode, req.Base, req.Dest, l.hostID, err)
	}
	return info, nil
}

func (l *Local) cloneImage(ctx context.Context, req CloneRequest, progress drivers.Progress) (ImageInfo, error) {
	final, err := l.objectPath(req.Dest)
	if err != nil {
		return ImageInfo{}, err
	}
	base, err := l.existingPath(req.Base)
	if err != nil {
		return ImageInfo{}, err
	}
	baseFormat, err := declared("base", req.BaseFormat)
	if err != nil {
		return ImageInfo{}, err
	}
	switch req.Format {
	case "", drivers.FormatRaw, drivers.FormatQCOW2:
	default:
		return ImageInfo{}, fmt.Errorf("format %q is not raw or qcow2: %w", req.Format, errdefs.ErrInvalid)
	}
	if req.Size < 0 || req.Size%qemuimg.SectorSize != 0 {
		return ImageInfo{}, fmt.Errorf("size %d is not a multiple of %d bytes: %w", req.Size, qemuimg.SectorSize, errdefs.ErrInvalid)
	}
	unlock, err := l.lockDest(ctx, final, req.Dest)
	if err != nil {
		return ImageInfo{}, err
	}
	defer unlock()
	// The base may be the backing file of running VMs: read it shared.
	bi, err := l.openBase(ctx, base, baseFormat)
	if err != nil {
		return ImageInfo{}, err
	}
	if bi.DataFile != "" {
		return ImageInfo{}, fmt.Errorf("base %s has an external data file (%s): %w", req.Base, bi.DataFile, errdefs.ErrInvalid)
	}
	size := req.Size
	if size == 0 {
		size = bi.VirtualSize
	}
	if size < bi.VirtualSize {
		return ImageInfo{}, fmt.Errorf("size %d is smaller than the base's %d: %w", size, bi.VirtualSize, errdefs.ErrInvalid)
	}
	format := req.Format
	if foreign := formatOf(baseFormat); foreign.Foreign() && req.Mode == drivers.CloneLinked {
		// A reflink keeps the bytes and the format (a template's copy,
		// never a volume: the planner makes a volume by a full clone).
		return ImageInfo{}, fmt.Errorf("base %s is %s, which only qemu-img convert reads: no qcow2 overlay is backed by it; make a full clone (raw or qcow2): %w", req.Base, foreign, errdefs.ErrInvalid)
	}
	switch req.Mode {
	case drivers.CloneLinked:
		if format != "" && format != drivers.FormatQCOW2 {
			return ImageInfo{}, fmt.Errorf("a linked clone is qcow2, not %s: %w", format, errdefs.ErrInvalid)
		}
		format = drivers.FormatQCOW2
		// The clone's chain is the base's, from the clone's store.
		if err := l.checkChain(ctx, final, qemuimg.Info{BackingFilename: base, BackingFormat: baseFormat}); err != nil {
			return ImageInfo{}, err
		}
	case drivers.CloneReflink:
		if format != "" && string(format) != baseFormat {
			return ImageInfo{}, fmt.Errorf("a reflink clone keeps the base's format %s, not %s: %w", baseFormat, format, errdefs.ErrInvalid)
		}
		format = formatOf(baseFormat)
	case drivers.CloneFull:
		if format == "" {
			format = formatOf(baseFormat)
		}
		if format.Foreign() {
			// A volume is never in a foreign format: converted to qcow2.
			format = drivers.FormatQCOW2
		}
	default:
		return ImageInfo{}, fmt.Errorf("clone mode %q is not reflink, linked or full: %w", req.Mode, errdefs.ErrInvalid)
	}

	if ok, err := exists(final); err != nil {
		return ImageInfo{}, err
	} else if ok {
		info, qi, err := l.imageInfo(ctx, req.Dest, final, string(format), qemuimg.ForceShare())
		if err != nil || qi.VirtualSize != size ||
			(req.Mode == drivers.CloneLinked) != (backingOf(qi) == base) {
			return ImageInfo{}, fmt.Errorf("%s exists and is not this clone: %w", req.Dest, errdefs.ErrAlreadyExists)
		}
		info.Method = "existing"
		return info, nil
	}

	stage := stagePath(final, "clone")
	removeStage(stage)
	defer removeStage(stage)
	var res stream.Result
	switch req.Mode {
	case drivers.CloneReflink:
		if err := reflinkFile(base, stage); err != nil {
			return ImageInfo{}, err
		}
		res.Method = "reflink"
	case drivers.CloneLinked:
		// Written in Go (~0.5 ms with its fsync; qemu-img create took
		// ~9 ms): the base was opened above as its declared format, which
		// the overlay records.
		if err := qcow2.Create(stage, qcow2.Overlay{Size: size, BackingFile: base, BackingFormat: baseFormat}, 0o644); err != nil {
			return ImageInfo{}, classed(err)
		}
		res.Method = "linked"
	case drivers.CloneFull:
		if res, err = l.fullCopy(ctx, base, bi, stage, format, progress); err != nil {
			return ImageInfo{}, err
		}
	}
	if req.Mode != drivers.CloneLinked && size > bi.VirtualSize {
		if err := l.qemu.Resize(ctx, stage, string(format), size); err != nil {
			return ImageInfo{}, err
		}
	}
	var info ImageInfo
	if req.Mode == drivers.CloneLinked {
		// The overlay just made from these arguments: describe it from
		// them rather than run qemu-img info on it.
		info, err = l.publishOverlay(ctx, stage, final, req.Dest, base, size)
	} else {
		info, err = l.publishImage(ctx, stage, final, req.Dest, string(format))
	}
	if err != nil {
		return ImageInfo{}, err
	}
	info.BytesWritten, info.BytesSkipped, info.Method = res.BytesWritten, res.BytesHoles+res.BytesZero, res.Method
	return info, nil
}

// fullCopy writes what the guest of the image at src sees into a new
// standalone image of format at stage. si is src's info, read with its
// declared format asserted (si.Format is that format), its chain checked.
func (l *Local) fullCopy(ctx context.Context, src string, si qemuimg.Info, stage string, format drivers.Format, progress drivers.Progress) (stream.Result, error) {
	if format == drivers.FormatRaw && (si.Format == qemuimg.FormatRaw || si.Format == qemuimg.FormatQCOW2) {
		// The copy engine reads raw and qcow2 only; vhd, vhdx and vmdk
		// go to qemu-img convert with their declared format below.
		res, err := streamCopy(ctx, src, stream.SourceOptions{Format: si.Format}, stage, stream.Options{Progress: copyProgress(progress)})
		if err == nil || !errors.Is(err, errdefs.ErrNotImplemented) {
			return res, err
		}
		// The Go qcow2 reader cannot read this image: qemu-img can.
	}
	err := l.qemu.Convert(ctx, src, stage, string(format), qemuimg.SourceFormat(si.Format),
		qemuimg.MinSparse("4k"), percentProgress(progress, si.VirtualSize))
	return stream.Result{Method: "qemu-img convert"}, err
}

// reflinkFile makes dst (new) share src's extents (FICLONE).
func reflinkFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return classed(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o644)
	if err != nil {
		return classed(err)
	}
	err = unix.IoctlFileClone(int(out.Fd()), int(in.Fd()))
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) ||
			errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EBADF) {
			return fmt.Errorf("reflink %s: the filesystem cannot share extents between these files (%v): %w", src, err, errdefs.ErrNotImplemented)
		}
		return fmt.Errorf("reflink %s: %w", src, classed(err))
	}
	return nil
}

// publishOverlay publishes stage, a qcow2 overlay of size bytes on backing
// file base made (and synced) by this step, as final, and describes it as
// made.
func (l *Local) publishOverlay(ctx context.Context, stage, final, dest, base string, size int64) (ImageInfo, error) {
	if err := ctx.Err(); err != nil {
		return ImageInfo{}, err
	}
	// qcow2.Create synced it: only the rename and the directory's sync.
	if err := publishSynced(ctx, stage, final); err != nil {
		return ImageInfo{}, err
	}
	info := ImageInfo{Path: dest, Format: drivers.FormatQCOW2, VirtualSize: size, BackingFile: l.callerPath(base)}
	var st unix.Stat_t
	if err := unix.Stat(final, &st); err != nil {
		return ImageInfo{}, classed(err)
	}
	info.PhysicalSize = st.Blocks * 512
	return info, nil
}

package hostfs

import (
	"context"
	"fmt"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// ResizeImage grows the image at path, opened as format (a qcow2's chain
// must pass checkChain), to size bytes in place (qemu-img resize: a
// metadata change for qcow2, a truncate for raw). The same size is a
// no-op; shrinking is errdefs.ErrInvalid. An image a VM holds open is
// errdefs.ErrFailedPrecondition (qemu-img's lock).
func (l *Local) ResizeImage(ctx context.Context, path string, format drivers.Format, size int64) (ImageInfo, error) {
	info, err := l.resizeImage(ctx, path, format, size)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("resize %s to %d bytes on host %s: %w", path, size, l.hostID, err)
	}
	return info, nil
}

func (l *Local) resizeImage(ctx context.Context, path string, format drivers.Format, size int64) (ImageInfo, error) {
	host, err := l.objectPath(path)
	if err != nil {
		return ImageInfo{}, err
	}
	f, err := declared("image", format)
	if err != nil {
		return ImageInfo{}, err
	}
	if format.Foreign() {
		return ImageInfo{}, fmt.Errorf("a %s image is kept as uploaded and never resized: %w", format, errdefs.ErrInvalid)
	}
	if size <= 0 || size%qemuimg.SectorSize != 0 {
		return ImageInfo{}, fmt.Errorf("size %d is not a positive multiple of %d bytes: %w", size, qemuimg.SectorSize, errdefs.ErrInvalid)
	}
	unlock, err := l.locks.lock(ctx, host)
	if err != nil {
		return ImageInfo{}, err
	}
	defer unlock()
	qi, err := l.openDeclared(ctx, host, f, true)
	if err != nil {
		return ImageInfo{}, err
	}
	if size < qi.VirtualSize {
		return ImageInfo{}, fmt.Errorf("the image has %d bytes; shrinking is refused: %w", qi.VirtualSize, errdefs.ErrInvalid)
	}
	if size > qi.VirtualSize {
		if err := l.qemu.Resize(ctx, host, f, size); err != nil {
			return ImageInfo{}, err
		}
		if err := durable.SyncFile(host); err != nil {
			return ImageInfo{}, classed(err)
		}
	}
	info, _, err := l.imageInfo(ctx, path, host, f)
	if err == nil && format == drivers.FormatISO {
		info.Format = drivers.FormatISO
	}
	return info, err
}

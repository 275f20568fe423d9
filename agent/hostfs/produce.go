package hostfs

import (
	"context"
	"fmt"

	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// Produce makes the image at dest (a path of this host, not yet there) by
// running write on a staging file beside it, and publishes it as format
// only when write succeeded: a failed or killed write leaves no object
// visible. An image already at dest is returned as it is ("existing"),
// so a step retried after a crash does the work once. It is how bytes that
// only another tool can read (a LUN through the userspace initiator)
// become an object.
func (l *Local) Produce(ctx context.Context, dest string, format drivers.Format, write func(ctx context.Context, stage string) error) (ImageInfo, error) {
	final, err := l.objectPath(dest)
	if err != nil {
		return ImageInfo{}, err
	}
	switch format {
	case drivers.FormatRaw, drivers.FormatQCOW2:
	default:
		return ImageInfo{}, fmt.Errorf("produce %s: format %q is not raw or qcow2: %w", dest, format, errdefs.ErrInvalid)
	}
	unlock, err := l.lockDest(ctx, final, dest)
	if err != nil {
		return ImageInfo{}, err
	}
	defer unlock()
	if ok, err := exists(final); err != nil {
		return ImageInfo{}, err
	} else if ok {
		info, _, err := l.imageInfo(ctx, dest, final, diskFormat(format), qemuimg.ForceShare())
		if err != nil {
			return ImageInfo{}, fmt.Errorf("%s exists and is not a %s image (%v): %w", dest, format, err, errdefs.ErrAlreadyExists)
		}
		info.Method = "existing"
		return info, nil
	}
	stage := stagePath(final, "produce")
	removeStage(stage)
	defer removeStage(stage)
	if err := write(ctx, stage); err != nil {
		return ImageInfo{}, fmt.Errorf("produce %s on host %s: %w", dest, l.hostID, err)
	}
	return l.publishImage(ctx, stage, final, dest, diskFormat(format), qemuimg.ForceShare())
}

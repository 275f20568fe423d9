package hostfs

import (
	"context"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// InspectImage describes the image at path, opened as format (qemu-img
// info -f; read shared, so an image in use by a VM can be inspected). It
// reads the image's metadata only, never its backing chain.
func (l *Local) InspectImage(ctx context.Context, path string, format drivers.Format) (ImageInfo, error) {
	info, err := l.inspectImage(ctx, path, format)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("inspect %s on host %s: %w", path, l.hostID, err)
	}
	return info, nil
}

func (l *Local) inspectImage(ctx context.Context, path string, format drivers.Format) (ImageInfo, error) {
	host, err := l.existingPath(path)
	if err != nil {
		return ImageInfo{}, err
	}
	f, err := declared("image", format)
	if err != nil {
		return ImageInfo{}, err
	}
	info, _, err := l.imageInfo(ctx, path, host, f, qemuimg.ForceShare())
	if err != nil {
		return ImageInfo{}, err
	}
	if format == drivers.FormatISO {
		info.Format = drivers.FormatISO
	}
	return info, nil
}

// imageInfo describes the image at host (path as the caller named it),
// opened as format (a qemu-img format; never probed).
func (l *Local) imageInfo(ctx context.Context, path, host, format string, opts ...qemuimg.InfoOption) (ImageInfo, qemuimg.Info, error) {
	if format == "" {
		return ImageInfo{}, qemuimg.Info{}, fmt.Errorf("image info of %s without a format: %w", path, errdefs.ErrInternal)
	}
	qi, err := l.qemu.Info(ctx, host, append([]qemuimg.InfoOption{qemuimg.AssumeFormat(format)}, opts...)...)
	if err != nil {
		return ImageInfo{}, qi, err
	}
	out := ImageInfo{Path: path, Format: formatOf(qi.Format), VirtualSize: qi.VirtualSize, PhysicalSize: qi.ActualSize}
	if qi.BackingFilename != "" {
		out.BackingFile = qi.FullBackingFilename
		if out.BackingFile == "" {
			out.BackingFile = qi.BackingFilename
		}
		out.BackingFile = l.callerPath(out.BackingFile)
	}
	var st unix.Stat_t
	if unix.Stat(host, &st) == nil {
		out.PhysicalSize = st.Blocks * 512
	}
	return out, qi, nil
}

// backingOf is the resolved backing file of qi ("" when standalone).
func backingOf(qi qemuimg.Info) string {
	if qi.BackingFilename == "" {
		return ""
	}
	if qi.FullBackingFilename != "" {
		return qi.FullBackingFilename
	}
	return qi.BackingFilename
}

// formatOf maps a qemu-img format name to drivers.Format (others as they are).
func formatOf(name string) drivers.Format {
	switch name {
	case qemuimg.FormatRaw:
		return drivers.FormatRaw
	case qemuimg.FormatQCOW2:
		return drivers.FormatQCOW2
	case qemuimg.FormatVPC:
		return drivers.FormatVHD
	}
	return drivers.Format(name)
}

// diskFormat is the qemu-img format of an object format (an ISO is raw).
func diskFormat(f drivers.Format) string {
	switch f {
	case drivers.FormatISO:
		return qemuimg.FormatRaw
	case drivers.FormatVHD:
		return qemuimg.FormatVPC
	}
	return string(f)
}

package hostfs

import (
	"context"
	"fmt"

	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// CopyToURIRequest copies an image into a writable export a driver granted
// this host (an RBD image served over NBD): the guest view of the source,
// as raw bytes, written in place.
type CopyToURIRequest struct {
	// Source is a path on this host or a URI (see CopyImage), an image
	// of SourceFormat: a local qcow2 is read through its backing chain; a
	// remote source must be raw (an NBD export's guest view is).
	Source       string
	SourceFormat drivers.Format
	// Dest is the nbd:// or nbds:// URI of the export.
	Dest string
	// DestIsZero says the destination reads as zeros (made empty for this
	// copy): the source's holes and zero blocks are not written.
	DestIsZero bool
}

// CopyToURI copies req.Source into the export req.Dest with the copy
// engine: sparse (holes and zero blocks become NBD write-zeroes, or
// nothing on a zeroed destination), every byte hashed. The destination is
// written in place, so a failed copy leaves it partly written: its owner
// (the controller's workflow) keeps it out of use and removes or rewrites
// it. A source the Go qcow2 reader cannot read is ErrNotImplemented.
func (l *Local) CopyToURI(ctx context.Context, req CopyToURIRequest, progress drivers.Progress) (ImageInfo, error) {
	info, err := l.copyToURI(ctx, req, progress)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("copy %s to %s on host %s: %w", redact.URL(req.Source), redact.URL(req.Dest), l.hostID, err)
	}
	return info, nil
}

func (l *Local) copyToURI(ctx context.Context, req CopyToURIRequest, progress drivers.Progress) (ImageInfo, error) {
	srcFormat, err := declared("source", req.SourceFormat)
	if err != nil {
		return ImageInfo{}, err
	}
	if srcFormat != qemuimg.FormatRaw && srcFormat != qemuimg.FormatQCOW2 {
		return ImageInfo{}, fmt.Errorf("source format %s: only raw and qcow2 are copied into an export: %w", srcFormat, errdefs.ErrInvalid)
	}
	target, local, err := l.resolveSource(req.Source)
	if err != nil {
		return ImageInfo{}, err
	}
	var src stream.Source
	if local {
		// A local image's chain is checked as every declared qcow2's.
		if _, err := l.openDeclared(ctx, target, srcFormat, false); err != nil {
			return ImageInfo{}, err
		}
		src, err = stream.OpenSource(ctx, target, stream.SourceOptions{Format: srcFormat})
	} else {
		if srcFormat != qemuimg.FormatRaw {
			return ImageInfo{}, fmt.Errorf("a remote %s source is not read through into an export (export its guest view): %w", srcFormat, errdefs.ErrNotImplemented)
		}
		src, err = stream.OpenSource(ctx, target, l.peerSource(qemuimg.FormatRaw))
	}
	if err != nil {
		return ImageInfo{}, err
	}
	defer src.Close()
	sink, err := stream.OpenSink(ctx, req.Dest, src.Size(), stream.SinkOptions{})
	if err != nil {
		return ImageInfo{}, err
	}
	if req.DestIsZero {
		sink = zeroedSink{sink}
	}
	res, err := stream.Copy(ctx, src, sink, stream.Options{SHA256: true, CheckpointInterval: -1, Progress: copyProgress(progress)})
	if err != nil {
		return ImageInfo{}, err
	}
	return ImageInfo{Format: drivers.FormatRaw, VirtualSize: src.Size(), SHA256: res.SHA256, BytesWritten: res.BytesWritten,
		BytesSkipped: res.BytesHoles + res.BytesZero, Method: "stream into an nbd export"}, nil
}

// zeroedSink is a sink known to read as zeros before the copy.
type zeroedSink struct{ stream.Sink }

func (zeroedSink) KnownZero() bool { return true }

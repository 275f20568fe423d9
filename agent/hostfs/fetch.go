package hostfs

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/stowage/stowage/datapath/checksum"
	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// FetchImage downloads req.Source (http://, https://, file:// or a path on
// this host; or reads req.SourceFile, an open file Source names) into req.Dest through the copy engine: ranged, parallel,
// retried, resumable (see the staging rule above). The SHA-256 is always
// computed in-stream and checked there when req.Checksum is a sha256; a
// sha512 or md5 checksum is checked by reading the downloaded file once
// more before it is published. The result must then pass validateImage for
// req.Format. On any failure nothing is left at req.Dest; a checksum or
// format failure also removes the partial download, and so do a full store
// (errdefs.ErrResourceExhausted) and a source that stayed away for the
// whole retry window (WithFetchRetryWindow; stream.ErrRetriesExhausted).
// A cancelled or interrupted one keeps it (hidden) for the retry.
func (l *Local) FetchImage(ctx context.Context, req FetchRequest, progress drivers.Progress) (ImageInfo, error) {
	info, err := l.fetchImage(ctx, req, progress)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("fetch %s into %s on host %s: %w", redact.URL(req.Source), req.Dest, l.hostID, err)
	}
	return info, nil
}

func (l *Local) fetchImage(ctx context.Context, req FetchRequest, progress drivers.Progress) (ImageInfo, error) {
	if req.SourceFile != nil {
		defer req.SourceFile.Close() // also when the source never opens it (a double Close is harmless)
	}
	final, err := l.objectPath(req.Dest)
	if err != nil {
		return ImageInfo{}, err
	}
	switch req.Format {
	case drivers.FormatRaw, drivers.FormatQCOW2, drivers.FormatISO, drivers.FormatVHD, drivers.FormatVHDX, drivers.FormatVMDK:
	default:
		return ImageInfo{}, fmt.Errorf("format %q is not raw, qcow2, iso, vhd, vhdx or vmdk: %w", req.Format, errdefs.ErrInvalid)
	}
	sum, err := checksum.Parse(req.Checksum)
	if err != nil {
		return ImageInfo{}, err
	}
	var target string
	if req.SourceFile == nil {
		if target, _, err = l.resolveSource(req.Source); err != nil {
			return ImageInfo{}, err
		}
	}
	unlock, err := l.lockDest(ctx, final, req.Dest)
	if err != nil {
		return ImageInfo{}, err
	}
	defer unlock()
	if ok, err := exists(final); err != nil {
		return ImageInfo{}, err
	} else if ok {
		return l.existingFetch(ctx, req, final, sum)
	}

	stage := stagePath(final, "fetch")
	opts := stream.Options{SHA256: true, Progress: copyProgress(progress)}
	if sum.Algo == "sha256" {
		opts.ExpectSHA256 = sum.Hex
	}
	srcOpts := l.fetchSource(qemuimg.FormatRaw)
	var src stream.Source
	if req.SourceFile != nil {
		// Read as it is: the bytes are copied, never interpreted (format
		// checks run on the staged copy below).
		src, err = stream.NewFileSource(req.SourceFile, redact.URL(req.Source), stream.ReadAuto)
	} else {
		src, err = stream.OpenSource(ctx, target, srcOpts)
	}
	if err != nil {
		return ImageInfo{}, err
	}
	res, err := streamCopyFrom(ctx, src, stage, opts)
	if err != nil {
		discardIfCancelled(ctx, stage)
		return ImageInfo{}, err
	}
	// The download is complete at stage; from here a failure discards it.
	defer removeStage(stage)
	if sum.Algo == "sha512" || sum.Algo == "md5" {
		if err := verifyChecksum(ctx, stage, sum); err != nil {
			return ImageInfo{}, err
		}
	}
	if _, err := l.validateImage(ctx, stage, req.Format); err != nil {
		return ImageInfo{}, err
	}
	info, err := l.publishImage(ctx, stage, final, req.Dest, diskFormat(req.Format))
	if err != nil {
		return ImageInfo{}, err
	}
	info.Format = req.Format
	info.SHA256 = res.SHA256
	info.BytesWritten, info.BytesSkipped, info.Method = res.BytesWritten, res.BytesHoles+res.BytesZero, res.Method
	return info, nil
}

// existingFetch accepts an image already at final when it is a valid image
// of the declared format with the expected checksum (a retried step).
func (l *Local) existingFetch(ctx context.Context, req FetchRequest, final string, sum checksum.Sum) (ImageInfo, error) {
	if _, err := l.validateImage(ctx, final, req.Format); err != nil {
		return ImageInfo{}, fmt.Errorf("%s exists and is not the image asked for (%v): %w", req.Dest, err, errdefs.ErrAlreadyExists)
	}
	var sha string
	if sum.Algo != "" {
		if err := verifyChecksum(ctx, final, sum); err != nil {
			if errors.Is(err, errdefs.ErrDataLoss) {
				return ImageInfo{}, fmt.Errorf("%s exists with other content (%v): %w", req.Dest, err, errdefs.ErrAlreadyExists)
			}
			return ImageInfo{}, err
		}
		if sum.Algo == "sha256" {
			sha = sum.Hex
		}
	}
	info, _, err := l.imageInfo(ctx, req.Dest, final, diskFormat(req.Format))
	if err != nil {
		return ImageInfo{}, err
	}
	info.Format, info.SHA256, info.Method = req.Format, sha, "existing"
	return info, nil
}

// isoMagic is the ISO 9660 primary volume descriptor's standard identifier,
// at byte 1 of sector 16 (2048-byte sectors).
const (
	isoMagic       = "CD001"
	isoMagicOffset = 16*2048 + 1
)

// validateImage checks that the file at host is an acceptable image of the
// declared format: what qemu-img detects when it probes must be that format
// (a raw image must not carry a qcow2 header a guest could have written),
// an ISO must carry the ISO 9660 signature, and a qcow2 must be standalone
// (no backing file, no external data file), unencrypted and pass qemu-img
// check. Failures are errdefs.ErrInvalid.
func (l *Local) validateImage(ctx context.Context, host string, format drivers.Format) (qemuimg.Info, error) {
	if format.Foreign() {
		// The signature first: probing a vmdk descriptor would open the
		// extent files it names.
		if err := foreignMagic(host, format); err != nil {
			return qemuimg.Info{}, err
		}
	}
	probed, err := l.qemu.Info(ctx, host)
	if err != nil {
		return probed, err
	}
	want := diskFormat(format)
	if probed.Format != want {
		if format == drivers.FormatRaw || format == drivers.FormatISO {
			return probed, fmt.Errorf("declared %s, but the content is a %s image; refusing it (a raw image must not start with another format's header): %w", format, probed.Format, errdefs.ErrInvalid)
		}
		return probed, fmt.Errorf("declared %s, but the content is %s: %w", format, probed.Format, errdefs.ErrInvalid)
	}
	switch format {
	case drivers.FormatISO:
		f, err := os.Open(host)
		if err != nil {
			return probed, classed(err)
		}
		defer f.Close()
		var b [len(isoMagic)]byte
		if n, _ := f.ReadAt(b[:], isoMagicOffset); n != len(b) || string(b[:]) != isoMagic {
			return probed, fmt.Errorf("declared iso, but there is no ISO 9660 signature %q at byte %d: %w", isoMagic, isoMagicOffset, errdefs.ErrInvalid)
		}
	case drivers.FormatQCOW2:
		qi, err := l.qemu.Info(ctx, host, qemuimg.AssumeFormat(qemuimg.FormatQCOW2))
		if err != nil {
			return probed, err
		}
		switch {
		case qi.BackingFilename != "":
			return qi, fmt.Errorf("qcow2 template has a backing file (%s); templates must be standalone: %w", qi.BackingFilename, errdefs.ErrInvalid)
		case qi.DataFile != "":
			return qi, fmt.Errorf("qcow2 image has an external data file (%s); images must hold their own data: %w", qi.DataFile, errdefs.ErrInvalid)
		case qi.Encrypted:
			return qi, fmt.Errorf("qcow2 image is encrypted: %w", errdefs.ErrInvalid)
		case qi.Corrupt:
			return qi, fmt.Errorf("qcow2 image is marked corrupt: %w", errdefs.ErrInvalid)
		}
		r, err := l.qemu.Check(ctx, host, qemuimg.FormatQCOW2)
		if err != nil {
			return qi, err
		}
		if !r.OK() {
			return qi, fmt.Errorf("qcow2 image fails qemu-img check (%d corruptions, %d errors): %w", r.Corruptions, r.CheckErrors, errdefs.ErrInvalid)
		}
		return qi, nil
	case drivers.FormatVHD, drivers.FormatVHDX, drivers.FormatVMDK:
		return l.validateForeign(ctx, host, format)
	}
	return probed, nil
}

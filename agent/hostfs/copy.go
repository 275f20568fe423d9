package hostfs

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"strings"

	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// CopyImage copies req.Source (a path on this host, file://, or a URI such
// as another agent's export), an image of req.SourceFormat, to req.Dest.
// Without a format change (and, for a qcow2 with a backing file, without
// req.Flatten) the image's bytes are copied as they are by the copy engine:
// sparse, reflinked when both ends share a filesystem that can. Otherwise
// qemu-img converts the source (-f req.SourceFormat) into a standalone
// image of req.Format. A remote source is first copied as it is, then
// opened as req.SourceFormat and converted when needed. The source is never
// probed, and a qcow2 source's backing chain must pass checkChain (a local
// source in its store; a downloaded one in the destination's store).
func (l *Local) CopyImage(ctx context.Context, req CopyRequest, progress drivers.Progress) (ImageInfo, error) {
	info, err := l.copyImage(ctx, req, progress)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("copy %s to %s on host %s: %w", redact.URL(req.Source), req.Dest, l.hostID, err)
	}
	return info, nil
}

func (l *Local) copyImage(ctx context.Context, req CopyRequest, progress drivers.Progress) (ImageInfo, error) {
	final, err := l.objectPath(req.Dest)
	if err != nil {
		return ImageInfo{}, err
	}
	switch {
	case req.Format == "", req.Format == drivers.FormatRaw, req.Format == drivers.FormatQCOW2, req.Format == drivers.FormatISO:
	case req.Format.Foreign() && req.Format == req.SourceFormat:
		// A vhd, vhdx or vmdk template copied as it is (the template
		// cache on a primary store); it is converted when installed.
	case req.Format.Foreign():
		return ImageInfo{}, fmt.Errorf("format %s is only kept as uploaded, never written from %q: convert to raw or qcow2: %w", req.Format, req.SourceFormat, errdefs.ErrInvalid)
	default:
		return ImageInfo{}, fmt.Errorf("format %q is not raw, qcow2, iso, vhd, vhdx or vmdk: %w", req.Format, errdefs.ErrInvalid)
	}
	srcFormat, err := declared("source", req.SourceFormat)
	if err != nil {
		return ImageInfo{}, err
	}
	// The copy's format: req.Format, or the source's.
	outFormat := req.Format
	if outFormat == "" {
		outFormat = req.SourceFormat
	}
	target, local, err := l.resolveSource(req.Source)
	if err != nil {
		return ImageInfo{}, err
	}
	var backing, backingFormat string
	if req.Backing != "" {
		if req.Flatten || srcFormat != qemuimg.FormatQCOW2 || diskFormat(outFormat) != qemuimg.FormatQCOW2 {
			return ImageInfo{}, fmt.Errorf("only a qcow2 overlay copied as qcow2, not flattened, takes a new backing file: %w", errdefs.ErrInvalid)
		}
		if backingFormat, err = declared("new backing file", req.BackingFormat); err != nil {
			return ImageInfo{}, err
		}
		if backing, err = l.existingPath(req.Backing); err != nil {
			return ImageInfo{}, err
		}
	}
	unlock, err := l.lockDest(ctx, final, req.Dest)
	if err != nil {
		return ImageInfo{}, err
	}
	defer unlock()

	var src qemuimg.Info
	if local {
		if src, err = l.openDeclared(ctx, target, srcFormat, false); err != nil {
			return ImageInfo{}, err
		}
	}
	if ok, err := exists(final); err != nil {
		return ImageInfo{}, err
	} else if ok {
		return l.existingCopy(ctx, req, final, outFormat, src)
	}

	stage := stagePath(final, "copy")
	var res stream.Result
	if !local || !needsConvert(req, srcFormat, src) {
		res, err = streamCopy(ctx, target, l.peerSource(qemuimg.FormatRaw), stage, stream.Options{Progress: copyProgress(progress)})
		if err != nil {
			discardIfCancelled(ctx, stage)
			return ImageInfo{}, err
		}
		defer removeStage(stage)
		if backing != "" {
			// The copy names the destination's copy of the same
			// template; its chain is checked below (remote) or when
			// it is published.
			if err := l.qemu.Rebase(ctx, stage, backing, backingFormat, qemuimg.UnsafeRebase()); err != nil {
				return ImageInfo{}, err
			}
			if local {
				if src, err = l.openDeclared(ctx, stage, srcFormat, false); err != nil {
					return ImageInfo{}, err
				}
			}
		} else if local && src.BackingFilename != "" && !filepath.IsAbs(src.BackingFilename) && filepath.Dir(target) != filepath.Dir(final) {
			// A relative backing file name would point elsewhere from the
			// new directory: record the same file by its absolute name.
			if err := l.absoluteBacking(ctx, stage, src); err != nil {
				return ImageInfo{}, err
			}
		}
		if !local {
			// The download is the source's file as it was: open it as the
			// declared format only, its chain checked in this store.
			if src, err = l.openDeclared(ctx, stage, srcFormat, false); err != nil {
				return ImageInfo{}, err
			}
			target = stage
		}
	}
	if needsConvert(req, srcFormat, src) {
		conv := stagePath(final, "convert")
		defer removeStage(conv)
		removeStage(conv)
		if err := l.qemu.Convert(ctx, target, conv, diskFormat(outFormat), qemuimg.SourceFormat(srcFormat),
			qemuimg.MinSparse("4k"), percentProgress(progress, src.VirtualSize)); err != nil {
			return ImageInfo{}, err
		}
		if local {
			res = stream.Result{}
		}
		res.Method = "qemu-img convert"
		stage = conv
	}
	info, err := l.publishImage(ctx, stage, final, req.Dest, diskFormat(outFormat), qemuimg.ForceShare())
	if err != nil {
		return ImageInfo{}, err
	}
	if outFormat == drivers.FormatISO {
		info.Format = drivers.FormatISO
	}
	info.BytesWritten, info.BytesSkipped, info.Method = res.BytesWritten, res.BytesHoles+res.BytesZero, res.Method
	return info, nil
}

// needsConvert reports whether copying src (of the qemu-img format
// srcFormat, src its info; zero for a remote source not downloaded yet) for
// req needs qemu-img convert.
func needsConvert(req CopyRequest, srcFormat string, src qemuimg.Info) bool {
	if req.Format != "" && diskFormat(req.Format) != srcFormat {
		return true
	}
	return req.Flatten && src.BackingFilename != ""
}

// existingCopy accepts an image at final that is what the copy would make:
// an image of outFormat (opened as that, never probed) of the source's size.
func (l *Local) existingCopy(ctx context.Context, req CopyRequest, final string, outFormat drivers.Format, src qemuimg.Info) (ImageInfo, error) {
	info, qi, err := l.imageInfo(ctx, req.Dest, final, diskFormat(outFormat), qemuimg.ForceShare())
	if err != nil {
		return ImageInfo{}, fmt.Errorf("%s exists and is not a %s image (%v): %w", req.Dest, outFormat, err, errdefs.ErrAlreadyExists)
	}
	switch {
	case src.Format != "" && qi.VirtualSize != src.VirtualSize,
		req.Flatten && qi.BackingFilename != "":
		return ImageInfo{}, fmt.Errorf("%s exists as a %s image of %d bytes: %w", req.Dest, qi.Format, qi.VirtualSize, errdefs.ErrAlreadyExists)
	}
	if outFormat == drivers.FormatISO {
		info.Format = drivers.FormatISO
	}
	info.Method = "existing"
	return info, nil
}

// copyProgress adapts the copy engine's progress to a drivers.Progress.
func copyProgress(p drivers.Progress) func(stream.Progress) {
	if p == nil {
		return nil
	}
	return func(s stream.Progress) { p(s.Done, s.Total) }
}

// percentProgress adapts qemu-img's percentage to bytes of total.
func percentProgress(p drivers.Progress, total int64) qemuimg.ConvertOption {
	return qemuimg.ConvertProgress(func(pct float64) {
		if p != nil {
			p(int64(pct/100*float64(total)), total)
		}
	})
}

// resolveSource turns a step's source (a path on this host, file://, or
// another URI) into what the copy engine opens; local reports a file here.
func (l *Local) resolveSource(src string) (target string, local bool, err error) {
	if !strings.Contains(src, "://") {
		host, err := l.existingPath(src)
		return host, true, err
	}
	u, err := url.Parse(src)
	if err != nil {
		return "", false, fmt.Errorf("source %q: %w", src, errors.Join(err, errdefs.ErrInvalid))
	}
	if strings.EqualFold(u.Scheme, "file") {
		if u.Host != "" && u.Host != "localhost" {
			return "", false, fmt.Errorf("source %q: file URLs name local paths (file:///path): %w", src, errdefs.ErrInvalid)
		}
		host, err := l.existingPath(u.Path)
		return host, true, err
	}
	return src, false, nil
}

// streamCopy copies target (raw bytes, never interpreted) into the
// staging file stage, resuming an interrupted copy to the same stage.
func streamCopy(ctx context.Context, target string, srcOpts stream.SourceOptions, stage string, opts stream.Options) (stream.Result, error) {
	src, err := stream.OpenSource(ctx, target, srcOpts)
	if err != nil {
		return stream.Result{}, err
	}
	return streamCopyFrom(ctx, src, stage, opts)
}

// streamCopyFrom copies src into the staging file stage as streamCopy
// does, and closes src. Two failures leave nothing: a copy that filled the
// store (the partial stage would keep it full; the engine aborts such a
// copy, and this also covers a Commit that ran out of space), and one
// whose source stayed away for its whole retry window
// (stream.ErrRetriesExhausted: the step fails for good, and nothing would
// resume the stage). A cancelled or killed copy keeps its stage, and the
// same step run again resumes it.
func streamCopyFrom(ctx context.Context, src stream.Source, stage string, opts stream.Options) (stream.Result, error) {
	defer src.Close()
	sink, err := stream.OpenSink(ctx, stage, src.Size(), stream.SinkOptions{Resume: true})
	if err != nil {
		return stream.Result{}, err
	}
	opts.Resume = true
	res, err := stream.Copy(ctx, src, sink, opts)
	if errors.Is(err, errdefs.ErrResourceExhausted) || (errors.Is(err, stream.ErrRetriesExhausted) && ctx.Err() == nil) {
		removeStage(stage)
	}
	return res, err
}

package hostfs

import (
	"context"
	"crypto/md5"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// The image steps (drivers.ImageOps) share these rules, on top of the
// package's path contract:
//
//   - A step that makes an object writes it under a staging name in the
//     destination's directory (stagePath: TempPrefix + step + "." + name;
//     the copy engine's own work files for it start with "." + TempPrefix),
//     fsyncs it and renames it into place without replacing anything. A
//     staging name is the same for every attempt at the same destination,
//     so a download interrupted by a dropped connection or a cancelled step
//     resumes from the copy engine's checkpoint on the next attempt;
//     DeletePath of the destination removes those leftovers.
//   - Steps on one object path run one at a time (per-path locks that
//     honour the context); steps on different objects run in parallel.
//   - A destination that already exists is accepted when it is what the
//     step would have made (format, size, backing file, checksum when one
//     was asked for) and refused with errdefs.ErrAlreadyExists otherwise.

// stagePath is the staging name of step for the object at final (a path
// on this machine).
func stagePath(final, step string) string {
	base := filepath.Base(final)
	name := TempPrefix + step + "." + base
	if len(name)+len(".stowage-ckpt")+1 > 255 {
		sum := sha256.Sum256([]byte(base))
		name = TempPrefix + step + "." + hex.EncodeToString(sum[:])
	}
	return filepath.Join(filepath.Dir(final), name)
}

// stageSteps are the steps that stage objects; DeletePath clears their leftovers.
var stageSteps = []string{"fetch", "copy", "convert", "clone", "snap", "revert", "restore", "restore-raw"}

// removeStaged removes what an interrupted step left for the object at
// final (staging files and the copy engine's work files), unless a step on
// final is running.
func (l *Local) removeStaged(final string) {
	unlock, ok := l.locks.tryLock(final)
	if !ok {
		return
	}
	defer unlock()
	for _, step := range stageSteps {
		removeStage(stagePath(final, step))
	}
}

// removeStage removes a staging file and the copy engine's files for it.
func removeStage(stage string) {
	dir, base := filepath.Split(stage)
	os.Remove(stage)
	for _, suffix := range []string{".stowage-tmp", ".stowage-ckpt", ".stowage-raw"} {
		os.Remove(filepath.Join(dir, "."+base+suffix))
	}
}

// objectPath checks path (the package's path contract, and not a reserved
// name) and returns it on this machine.
func (l *Local) objectPath(path string) (string, error) {
	if err := checkPath(path); err != nil {
		return "", err
	}
	if b := filepath.Base(path); isTemp(b) || b == MarkerFile {
		return "", fmt.Errorf("name %s is reserved by Stowage: %w", b, errdefs.ErrInvalid)
	}
	return l.onHost(path), nil
}

// existingPath checks path and returns it on this machine.
func (l *Local) existingPath(path string) (string, error) {
	if err := checkPath(path); err != nil {
		return "", err
	}
	return l.onHost(path), nil
}

// callerPath maps a path on this machine back to the caller's view.
func (l *Local) callerPath(host string) string {
	if l.root == "" || host == "" {
		return host
	}
	if rel, ok := strings.CutPrefix(host, l.root); ok && strings.HasPrefix(rel, "/") {
		return rel
	}
	return host
}

// needDir checks that the directory of final exists.
func needDir(final, callerPath string) error {
	fi, err := os.Stat(filepath.Dir(final))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("directory %s does not exist: %w", filepath.Dir(callerPath), errdefs.ErrNotFound)
		}
		return classed(err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory: %w", filepath.Dir(callerPath), errdefs.ErrFailedPrecondition)
	}
	return nil
}

// makeDir makes sure the directory of final exists. Missing directories are
// created (0755, made durable) only inside a store, that is below a
// directory carrying the store marker, so that a step writing
// snapshots/<volume>/<snapshot>.qcow2 needs no separate mkdir while a
// mistyped path outside any store still fails with errdefs.ErrNotFound.
func (l *Local) makeDir(final, callerPath string) error {
	err := needDir(final, callerPath)
	if !errors.Is(err, errdefs.ErrNotFound) {
		return err
	}
	dir := filepath.Dir(final)
	if !l.inStore(dir) {
		return fmt.Errorf("directory %s does not exist and is not inside a store: %w", filepath.Dir(callerPath), errdefs.ErrNotFound)
	}
	created, err := mkdirAll(dir)
	if err != nil {
		return classed(err)
	}
	for _, d := range created {
		if err := durable.SyncDir(filepath.Dir(d)); err != nil {
			return classed(err)
		}
	}
	return nil
}

// inStore reports whether dir (on this machine) is inside a store
// directory: one of its existing ancestors carries MarkerFile.
func (l *Local) inStore(dir string) bool {
	for d := filepath.Dir(dir); ; d = filepath.Dir(d) {
		if l.root != "" && !strings.HasPrefix(d+"/", l.root+"/") {
			return false
		}
		if fi, err := os.Lstat(filepath.Join(d, MarkerFile)); err == nil && fi.Mode().IsRegular() {
			return true
		}
		if d == filepath.Dir(d) {
			return false
		}
	}
}

// exists reports whether something is at p.
func exists(p string) (bool, error) {
	_, err := os.Lstat(p)
	if err == nil {
		return true, nil
	}
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return false, classed(err)
}

// publish makes the staged file tmp visible as final: fsync, a rename that
// never replaces, a directory fsync. An existing final is fs.ErrExist.
func publish(tmp, final string) error {
	if err := durable.SyncFile(tmp); err != nil {
		return classed(err)
	}
	if err := durable.RenameNoReplace(tmp, final); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%s appeared meanwhile: %w", final, errors.Join(err, errdefs.ErrAlreadyExists))
		}
		return classed(err)
	}
	return classed(durable.SyncDir(filepath.Dir(final)))
}

// replace makes tmp visible as final, replacing what is there.
func replace(tmp, final string) error {
	if err := durable.SyncFile(tmp); err != nil {
		return classed(err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return classed(err)
	}
	return classed(durable.SyncDir(filepath.Dir(final)))
}

// formatOf maps a qemu-img format name to drivers.Format (others as they are).
func formatOf(name string) drivers.Format {
	switch name {
	case qemuimg.FormatRaw:
		return drivers.FormatRaw
	case qemuimg.FormatQCOW2:
		return drivers.FormatQCOW2
	}
	return drivers.Format(name)
}

// diskFormat is the qemu-img format of an object format (an ISO is raw).
func diskFormat(f drivers.Format) string {
	if f == drivers.FormatISO {
		return qemuimg.FormatRaw
	}
	return string(f)
}

// imageInfo describes the image at host (path as the caller named it),
// opened as format (a qemu-img format; never probed).
func (l *Local) imageInfo(ctx context.Context, path, host, format string, opts ...qemuimg.InfoOption) (drivers.ImageInfo, qemuimg.Info, error) {
	if format == "" {
		return drivers.ImageInfo{}, qemuimg.Info{}, fmt.Errorf("image info of %s without a format: %w", path, errdefs.ErrInternal)
	}
	qi, err := l.qemu.Info(ctx, host, append([]qemuimg.InfoOption{qemuimg.AssumeFormat(format)}, opts...)...)
	if err != nil {
		return drivers.ImageInfo{}, qi, err
	}
	out := drivers.ImageInfo{Path: path, Format: formatOf(qi.Format), VirtualSize: qi.VirtualSize, PhysicalSize: qi.ActualSize}
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
	defer src.Close()
	sink, err := stream.OpenSink(ctx, stage, src.Size(), stream.SinkOptions{Resume: true})
	if err != nil {
		return stream.Result{}, err
	}
	opts.Resume = true
	return stream.Copy(ctx, src, sink, opts)
}

// checksum is an expected digest of a download.
type checksum struct {
	algo string // "sha256", "sha512", "md5"; "" for none
	hex  string
}

func (c checksum) String() string { return c.algo + ":" + c.hex }

// parseChecksum reads "sha256:HEX", "sha512:HEX", "md5:HEX", CloudStack's
// "{SHA-256}HEX" and a bare HEX (md5, sha256 or sha512 by its length).
func parseChecksum(s string) (checksum, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return checksum{}, nil
	}
	var algo, val string
	switch {
	case strings.HasPrefix(s, "{"):
		i := strings.IndexByte(s, '}')
		if i < 0 {
			return checksum{}, fmt.Errorf("checksum %q: unclosed {: %w", s, errdefs.ErrInvalid)
		}
		algo, val = s[1:i], s[i+1:]
	case strings.Contains(s, ":"):
		algo, val, _ = strings.Cut(s, ":")
	default:
		val = s
		switch len(s) {
		case 2 * md5.Size:
			algo = "md5"
		case 2 * sha256.Size:
			algo = "sha256"
		case 2 * sha512.Size:
			algo = "sha512"
		}
	}
	algo = strings.ReplaceAll(strings.ToLower(algo), "-", "")
	val = strings.ToLower(val)
	want := map[string]int{"md5": md5.Size, "sha256": sha256.Size, "sha512": sha512.Size}[algo]
	if want == 0 {
		return checksum{}, fmt.Errorf("checksum %q: want sha256:, sha512: or md5: and hex digits: %w", s, errdefs.ErrInvalid)
	}
	if b, err := hex.DecodeString(val); err != nil || len(b) != want {
		return checksum{}, fmt.Errorf("checksum %q: want %d hex digits for %s: %w", s, 2*want, algo, errdefs.ErrInvalid)
	}
	return checksum{algo: algo, hex: val}, nil
}

func newHash(algo string) hash.Hash {
	switch algo {
	case "sha512":
		return sha512.New()
	case "md5":
		return md5.New()
	}
	return sha256.New()
}

// hashFile computes the algo digest of the file at p.
func hashFile(ctx context.Context, p, algo string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", classed(err)
	}
	defer f.Close()
	_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_SEQUENTIAL)
	h := newHash(algo)
	buf := make([]byte, 1<<20)
	for {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n, err := f.Read(buf)
		h.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", classed(err)
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// verifyChecksum checks the file at p against sum (ErrDataLoss on mismatch).
func verifyChecksum(ctx context.Context, p string, sum checksum) error {
	got, err := hashFile(ctx, p, sum.algo)
	if err != nil {
		return err
	}
	if subtle.ConstantTimeCompare([]byte(got), []byte(sum.hex)) != 1 {
		return fmt.Errorf("checksum mismatch: got %s:%s, expected %s: %w", sum.algo, got, sum, errdefs.ErrDataLoss)
	}
	return nil
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
	}
	return probed, nil
}

// FetchImage downloads req.Source (http://, https://, file:// or a path on
// this host) into req.Dest through the copy engine: ranged, parallel,
// retried, resumable (see the staging rule above). The SHA-256 is always
// computed in-stream and checked there when req.Checksum is a sha256; a
// sha512 or md5 checksum is checked by reading the downloaded file once
// more before it is published. The result must then pass validateImage for
// req.Format. On any failure nothing is left at req.Dest; a checksum or
// format failure also removes the partial download, a transient one keeps
// it (hidden) for the retry.
func (l *Local) FetchImage(ctx context.Context, req drivers.FetchRequest, progress drivers.Progress) (drivers.ImageInfo, error) {
	info, err := l.fetchImage(ctx, req, progress)
	if err != nil {
		return drivers.ImageInfo{}, fmt.Errorf("fetch %s into %s on host %s: %w", redact(req.Source), req.Dest, l.hostID, err)
	}
	return info, nil
}

// redact drops the user information of a URL for messages.
func redact(s string) string {
	if u, err := url.Parse(s); err == nil && u.User != nil {
		return u.Redacted()
	}
	return s
}

func (l *Local) fetchImage(ctx context.Context, req drivers.FetchRequest, progress drivers.Progress) (drivers.ImageInfo, error) {
	final, err := l.objectPath(req.Dest)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	switch req.Format {
	case drivers.FormatRaw, drivers.FormatQCOW2, drivers.FormatISO:
	default:
		return drivers.ImageInfo{}, fmt.Errorf("format %q is not raw, qcow2 or iso: %w", req.Format, errdefs.ErrInvalid)
	}
	sum, err := parseChecksum(req.Checksum)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	target, _, err := l.resolveSource(req.Source)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	if err := l.makeDir(final, req.Dest); err != nil {
		return drivers.ImageInfo{}, err
	}
	unlock, err := l.locks.lock(ctx, final)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	defer unlock()
	if ok, err := exists(final); err != nil {
		return drivers.ImageInfo{}, err
	} else if ok {
		return l.existingFetch(ctx, req, final, sum)
	}

	stage := stagePath(final, "fetch")
	opts := stream.Options{SHA256: true, Progress: copyProgress(progress)}
	if sum.algo == "sha256" {
		opts.ExpectSHA256 = sum.hex
	}
	res, err := streamCopy(ctx, target, stream.SourceOptions{Format: qemuimg.FormatRaw}, stage, opts)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	// The download is complete at stage; from here a failure discards it.
	defer removeStage(stage)
	if sum.algo == "sha512" || sum.algo == "md5" {
		if err := verifyChecksum(ctx, stage, sum); err != nil {
			return drivers.ImageInfo{}, err
		}
	}
	if _, err := l.validateImage(ctx, stage, req.Format); err != nil {
		return drivers.ImageInfo{}, err
	}
	if err := ctx.Err(); err != nil {
		return drivers.ImageInfo{}, err
	}
	if err := publish(stage, final); err != nil {
		return drivers.ImageInfo{}, err
	}
	info, _, err := l.imageInfo(ctx, req.Dest, final, diskFormat(req.Format))
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	info.Format = req.Format
	info.SHA256 = res.SHA256
	info.BytesWritten, info.BytesSkipped, info.Method = res.BytesWritten, res.BytesHoles+res.BytesZero, res.Method
	return info, nil
}

// existingFetch accepts an image already at final when it is a valid image
// of the declared format with the expected checksum (a retried step).
func (l *Local) existingFetch(ctx context.Context, req drivers.FetchRequest, final string, sum checksum) (drivers.ImageInfo, error) {
	if _, err := l.validateImage(ctx, final, req.Format); err != nil {
		return drivers.ImageInfo{}, fmt.Errorf("%s exists and is not the image asked for (%v): %w", req.Dest, err, errdefs.ErrAlreadyExists)
	}
	var sha string
	if sum.algo != "" {
		if err := verifyChecksum(ctx, final, sum); err != nil {
			if errors.Is(err, errdefs.ErrDataLoss) {
				return drivers.ImageInfo{}, fmt.Errorf("%s exists with other content (%v): %w", req.Dest, err, errdefs.ErrAlreadyExists)
			}
			return drivers.ImageInfo{}, err
		}
		if sum.algo == "sha256" {
			sha = sum.hex
		}
	}
	info, _, err := l.imageInfo(ctx, req.Dest, final, diskFormat(req.Format))
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	info.Format, info.SHA256, info.Method = req.Format, sha, "existing"
	return info, nil
}

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
func (l *Local) CopyImage(ctx context.Context, req drivers.CopyRequest, progress drivers.Progress) (drivers.ImageInfo, error) {
	info, err := l.copyImage(ctx, req, progress)
	if err != nil {
		return drivers.ImageInfo{}, fmt.Errorf("copy %s to %s on host %s: %w", redact(req.Source), req.Dest, l.hostID, err)
	}
	return info, nil
}

func (l *Local) copyImage(ctx context.Context, req drivers.CopyRequest, progress drivers.Progress) (drivers.ImageInfo, error) {
	final, err := l.objectPath(req.Dest)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	switch req.Format {
	case "", drivers.FormatRaw, drivers.FormatQCOW2, drivers.FormatISO:
	default:
		return drivers.ImageInfo{}, fmt.Errorf("format %q is not raw, qcow2 or iso: %w", req.Format, errdefs.ErrInvalid)
	}
	srcFormat, err := declared("source", req.SourceFormat)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	// The copy's format: req.Format, or the source's.
	outFormat := req.Format
	if outFormat == "" {
		outFormat = req.SourceFormat
	}
	target, local, err := l.resolveSource(req.Source)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	if err := l.makeDir(final, req.Dest); err != nil {
		return drivers.ImageInfo{}, err
	}
	unlock, err := l.locks.lock(ctx, final)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	defer unlock()

	var src qemuimg.Info
	if local {
		if src, err = l.openDeclared(ctx, target, srcFormat, false); err != nil {
			return drivers.ImageInfo{}, err
		}
	}
	if ok, err := exists(final); err != nil {
		return drivers.ImageInfo{}, err
	} else if ok {
		return l.existingCopy(ctx, req, final, outFormat, src)
	}

	stage := stagePath(final, "copy")
	var res stream.Result
	if !local || !needsConvert(req, srcFormat, src) {
		res, err = streamCopy(ctx, target, stream.SourceOptions{Format: qemuimg.FormatRaw}, stage, stream.Options{Progress: copyProgress(progress)})
		if err != nil {
			return drivers.ImageInfo{}, err
		}
		defer removeStage(stage)
		if local && src.BackingFilename != "" && !filepath.IsAbs(src.BackingFilename) && filepath.Dir(target) != filepath.Dir(final) {
			// A relative backing file name would point elsewhere from the
			// new directory: record the same file by its absolute name.
			if err := l.absoluteBacking(ctx, stage, src); err != nil {
				return drivers.ImageInfo{}, err
			}
		}
		if !local {
			// The download is the source's file as it was: open it as the
			// declared format only, its chain checked in this store.
			if src, err = l.openDeclared(ctx, stage, srcFormat, false); err != nil {
				return drivers.ImageInfo{}, err
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
			return drivers.ImageInfo{}, err
		}
		if local {
			res = stream.Result{}
		}
		res.Method = "qemu-img convert"
		stage = conv
	}
	if err := ctx.Err(); err != nil {
		return drivers.ImageInfo{}, err
	}
	if err := publish(stage, final); err != nil {
		return drivers.ImageInfo{}, err
	}
	info, _, err := l.imageInfo(ctx, req.Dest, final, diskFormat(outFormat), qemuimg.ForceShare())
	if err != nil {
		return drivers.ImageInfo{}, err
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
func needsConvert(req drivers.CopyRequest, srcFormat string, src qemuimg.Info) bool {
	if req.Format != "" && diskFormat(req.Format) != srcFormat {
		return true
	}
	return req.Flatten && src.BackingFilename != ""
}

// existingCopy accepts an image at final that is what the copy would make:
// an image of outFormat (opened as that, never probed) of the source's size.
func (l *Local) existingCopy(ctx context.Context, req drivers.CopyRequest, final string, outFormat drivers.Format, src qemuimg.Info) (drivers.ImageInfo, error) {
	info, qi, err := l.imageInfo(ctx, req.Dest, final, diskFormat(outFormat), qemuimg.ForceShare())
	if err != nil {
		return drivers.ImageInfo{}, fmt.Errorf("%s exists and is not a %s image (%v): %w", req.Dest, outFormat, err, errdefs.ErrAlreadyExists)
	}
	switch {
	case src.Format != "" && qi.VirtualSize != src.VirtualSize,
		req.Flatten && qi.BackingFilename != "":
		return drivers.ImageInfo{}, fmt.Errorf("%s exists as a %s image of %d bytes: %w", req.Dest, qi.Format, qi.VirtualSize, errdefs.ErrAlreadyExists)
	}
	if outFormat == drivers.FormatISO {
		info.Format = drivers.FormatISO
	}
	info.Method = "existing"
	return info, nil
}

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
func (l *Local) CloneImage(ctx context.Context, req drivers.CloneRequest, progress drivers.Progress) (drivers.ImageInfo, error) {
	info, err := l.cloneImage(ctx, req, progress)
	if err != nil {
		return drivers.ImageInfo{}, fmt.Errorf("%s clone of %s to %s on host %s: %w", req.Mode, req.Base, req.Dest, l.hostID, err)
	}
	return info, nil
}

func (l *Local) cloneImage(ctx context.Context, req drivers.CloneRequest, progress drivers.Progress) (drivers.ImageInfo, error) {
	final, err := l.objectPath(req.Dest)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	base, err := l.existingPath(req.Base)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	baseFormat, err := declared("base", req.BaseFormat)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	switch req.Format {
	case "", drivers.FormatRaw, drivers.FormatQCOW2:
	default:
		return drivers.ImageInfo{}, fmt.Errorf("format %q is not raw or qcow2: %w", req.Format, errdefs.ErrInvalid)
	}
	if req.Size < 0 || req.Size%qemuimg.SectorSize != 0 {
		return drivers.ImageInfo{}, fmt.Errorf("size %d is not a multiple of %d bytes: %w", req.Size, qemuimg.SectorSize, errdefs.ErrInvalid)
	}
	if err := l.makeDir(final, req.Dest); err != nil {
		return drivers.ImageInfo{}, err
	}
	unlock, err := l.locks.lock(ctx, final)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	defer unlock()
	// The base may be the backing file of running VMs: read it shared.
	bi, err := l.openDeclared(ctx, base, baseFormat, false)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	if bi.DataFile != "" {
		return drivers.ImageInfo{}, fmt.Errorf("base %s has an external data file (%s): %w", req.Base, bi.DataFile, errdefs.ErrInvalid)
	}
	size := req.Size
	if size == 0 {
		size = bi.VirtualSize
	}
	if size < bi.VirtualSize {
		return drivers.ImageInfo{}, fmt.Errorf("size %d is smaller than the base's %d: %w", size, bi.VirtualSize, errdefs.ErrInvalid)
	}
	format := req.Format
	switch req.Mode {
	case drivers.CloneLinked:
		if format != "" && format != drivers.FormatQCOW2 {
			return drivers.ImageInfo{}, fmt.Errorf("a linked clone is qcow2, not %s: %w", format, errdefs.ErrInvalid)
		}
		format = drivers.FormatQCOW2
		// The clone's chain is the base's, from the clone's store.
		if err := l.checkChain(ctx, final, qemuimg.Info{BackingFilename: base, BackingFormat: baseFormat}); err != nil {
			return drivers.ImageInfo{}, err
		}
	case drivers.CloneReflink:
		if format != "" && string(format) != baseFormat {
			return drivers.ImageInfo{}, fmt.Errorf("a reflink clone keeps the base's format %s, not %s: %w", baseFormat, format, errdefs.ErrInvalid)
		}
		format = formatOf(baseFormat)
	case drivers.CloneFull:
		if format == "" {
			format = formatOf(baseFormat)
		}
	default:
		return drivers.ImageInfo{}, fmt.Errorf("clone mode %q is not reflink, linked or full: %w", req.Mode, errdefs.ErrInvalid)
	}

	if ok, err := exists(final); err != nil {
		return drivers.ImageInfo{}, err
	} else if ok {
		info, qi, err := l.imageInfo(ctx, req.Dest, final, string(format), qemuimg.ForceShare())
		if err != nil || qi.VirtualSize != size ||
			(req.Mode == drivers.CloneLinked) != (backingOf(qi) == base) {
			return drivers.ImageInfo{}, fmt.Errorf("%s exists and is not this clone: %w", req.Dest, errdefs.ErrAlreadyExists)
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
			return drivers.ImageInfo{}, err
		}
		res.Method = "reflink"
	case drivers.CloneLinked:
		sz := size
		if sz == bi.VirtualSize {
			sz = 0
		}
		if err := l.qemu.Create(ctx, stage, qemuimg.FormatQCOW2, sz, qemuimg.BackingFile(base, baseFormat)); err != nil {
			return drivers.ImageInfo{}, err
		}
		res.Method = "linked"
	case drivers.CloneFull:
		if res, err = l.fullCopy(ctx, base, bi, stage, format, progress); err != nil {
			return drivers.ImageInfo{}, err
		}
	}
	if req.Mode != drivers.CloneLinked && size > bi.VirtualSize {
		if err := l.qemu.Resize(ctx, stage, string(format), size); err != nil {
			return drivers.ImageInfo{}, err
		}
	}
	if err := ctx.Err(); err != nil {
		return drivers.ImageInfo{}, err
	}
	if err := publish(stage, final); err != nil {
		return drivers.ImageInfo{}, err
	}
	info, _, err := l.imageInfo(ctx, req.Dest, final, string(format))
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	info.BytesWritten, info.BytesSkipped, info.Method = res.BytesWritten, res.BytesHoles+res.BytesZero, res.Method
	return info, nil
}

// fullCopy writes what the guest of the image at src sees into a new
// standalone image of format at stage. si is src's info, read with its
// declared format asserted (si.Format is that format), its chain checked.
func (l *Local) fullCopy(ctx context.Context, src string, si qemuimg.Info, stage string, format drivers.Format, progress drivers.Progress) (stream.Result, error) {
	if format == drivers.FormatRaw {
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
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
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

// InspectImage describes the image at path, opened as format (qemu-img
// info -f; read shared, so an image in use by a VM can be inspected). It
// reads the image's metadata only, never its backing chain.
func (l *Local) InspectImage(ctx context.Context, path string, format drivers.Format) (drivers.ImageInfo, error) {
	info, err := l.inspectImage(ctx, path, format)
	if err != nil {
		return drivers.ImageInfo{}, fmt.Errorf("inspect %s on host %s: %w", path, l.hostID, err)
	}
	return info, nil
}

func (l *Local) inspectImage(ctx context.Context, path string, format drivers.Format) (drivers.ImageInfo, error) {
	host, err := l.existingPath(path)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	f, err := declared("image", format)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	info, _, err := l.imageInfo(ctx, path, host, f, qemuimg.ForceShare())
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	if format == drivers.FormatISO {
		info.Format = drivers.FormatISO
	}
	return info, nil
}

// ResizeImage grows the image at path, opened as format (a qcow2's chain
// must pass checkChain), to size bytes in place (qemu-img resize: a
// metadata change for qcow2, a truncate for raw). The same size is a
// no-op; shrinking is errdefs.ErrInvalid. An image a VM holds open is
// errdefs.ErrFailedPrecondition (qemu-img's lock).
func (l *Local) ResizeImage(ctx context.Context, path string, format drivers.Format, size int64) (drivers.ImageInfo, error) {
	info, err := l.resizeImage(ctx, path, format, size)
	if err != nil {
		return drivers.ImageInfo{}, fmt.Errorf("resize %s to %d bytes on host %s: %w", path, size, l.hostID, err)
	}
	return info, nil
}

func (l *Local) resizeImage(ctx context.Context, path string, format drivers.Format, size int64) (drivers.ImageInfo, error) {
	host, err := l.objectPath(path)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	f, err := declared("image", format)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	if size <= 0 || size%qemuimg.SectorSize != 0 {
		return drivers.ImageInfo{}, fmt.Errorf("size %d is not a positive multiple of %d bytes: %w", size, qemuimg.SectorSize, errdefs.ErrInvalid)
	}
	unlock, err := l.locks.lock(ctx, host)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	defer unlock()
	qi, err := l.openDeclared(ctx, host, f, true)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	if size < qi.VirtualSize {
		return drivers.ImageInfo{}, fmt.Errorf("the image has %d bytes; shrinking is refused: %w", qi.VirtualSize, errdefs.ErrInvalid)
	}
	if size > qi.VirtualSize {
		if err := l.qemu.Resize(ctx, host, f, size); err != nil {
			return drivers.ImageInfo{}, err
		}
		if err := durable.SyncFile(host); err != nil {
			return drivers.ImageInfo{}, classed(err)
		}
	}
	info, _, err := l.imageInfo(ctx, path, host, f)
	if err == nil && format == drivers.FormatISO {
		info.Format = drivers.FormatISO
	}
	return info, err
}

// RebaseImage moves the qcow2 at path onto newBacking, an image of
// backingFormat ("" makes it standalone), with qemu-img rebase in safe
// mode, which copies into the image whatever the new chain would read
// differently. Both the old chain and the new one must pass checkChain
// (inside the image's store, formats recorded). When the new backing reads
// exactly as the old one (qemu-img compare says so, and it stops at the
// first difference) only the name is rewritten (rebase -u). An image
// already on newBacking is left alone.
func (l *Local) RebaseImage(ctx context.Context, path, newBacking string, backingFormat drivers.Format) (drivers.ImageInfo, error) {
	info, err := l.rebaseImage(ctx, path, newBacking, backingFormat)
	if err != nil {
		return drivers.ImageInfo{}, fmt.Errorf("rebase %s onto %q on host %s: %w", path, newBacking, l.hostID, err)
	}
	return info, nil
}

func (l *Local) rebaseImage(ctx context.Context, path, newBacking string, backingFormat drivers.Format) (drivers.ImageInfo, error) {
	host, err := l.objectPath(path)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	var nb, nbFormat string
	if newBacking != "" {
		if nb, err = l.existingPath(newBacking); err != nil {
			return drivers.ImageInfo{}, err
		}
		if nbFormat, err = declared("new backing file", backingFormat); err != nil {
			return drivers.ImageInfo{}, err
		}
	}
	unlock, err := l.locks.lock(ctx, host)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	defer unlock()
	qi, err := l.openDeclared(ctx, host, qemuimg.FormatQCOW2, true)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	old := backingOf(qi)
	method := "unchanged"
	if old != nb {
		var opts []qemuimg.RebaseOption
		method = "rebase"
		if nb != "" {
			// The chain the image will have must pass the same rule.
			if err := l.checkChain(ctx, host, qemuimg.Info{BackingFilename: nb, BackingFormat: nbFormat}); err != nil {
				return drivers.ImageInfo{}, err
			}
			if old != "" {
				same, err := l.qemu.Compare(ctx, old, qi.BackingFormat, nb, nbFormat)
				if err == nil && same {
					opts = append(opts, qemuimg.UnsafeRebase())
					method = "rebase -u"
				}
			}
		}
		if err := l.qemu.Rebase(ctx, host, nb, nbFormat, opts...); err != nil {
			return drivers.ImageInfo{}, err
		}
		if err := durable.SyncFile(host); err != nil {
			return drivers.ImageInfo{}, classed(err)
		}
	}
	info, _, err := l.imageInfo(ctx, path, host, qemuimg.FormatQCOW2)
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	info.Method = method
	return info, nil
}

// absoluteBacking records the backing file of the qcow2 at host (whose
// info is qi, its chain checked) by its absolute name: the same file, so
// rebase -u is exact. The backing format stays as recorded (never probed).
func (l *Local) absoluteBacking(ctx context.Context, host string, qi qemuimg.Info) error {
	if qi.BackingFormat == "" {
		return fmt.Errorf("backing file %s of %s is recorded without its format: %w", qi.BackingFilename, l.callerPath(host), errdefs.ErrInvalid)
	}
	return l.qemu.Rebase(ctx, host, backingOf(qi), qi.BackingFormat, qemuimg.UnsafeRebase())
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

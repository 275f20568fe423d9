package hostfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// CreateImage creates an empty (sparse) raw or qcow2 image of virtual size
// bytes at path, whose directory must exist. The image is made under a
// TempPrefix name in the same directory and renamed into place without
// replacing anything, so no partial image is ever visible at path. When
// path exists, CreateImage succeeds if it is already a blank image of that
// format and size (a retried step) and fails with errdefs.ErrAlreadyExists
// otherwise. An ISO cannot be created empty (errdefs.ErrInvalid); sizes must
// be positive multiples of qemuimg.SectorSize.
func (l *Local) CreateImage(ctx context.Context, path string, format drivers.Format, size int64) (FileInfo, error) {
	fi, err := l.createImage(ctx, path, format, size)
	if err != nil {
		return FileInfo{}, fmt.Errorf("create %s image %s of %d bytes on host %s: %w", format, path, size, l.hostID, err)
	}
	return fi, nil
}

func (l *Local) createImage(ctx context.Context, path string, format drivers.Format, size int64) (FileInfo, error) {
	if err := checkPath(path); err != nil {
		return FileInfo{}, err
	}
	switch format {
	case drivers.FormatRaw, drivers.FormatQCOW2:
	case drivers.FormatISO:
		return FileInfo{}, fmt.Errorf("an ISO cannot be created empty; ISOs are registered from a URL: %w", errdefs.ErrInvalid)
	default:
		return FileInfo{}, fmt.Errorf("format %q is not %s or %s: %w", format, drivers.FormatRaw, drivers.FormatQCOW2, errdefs.ErrInvalid)
	}
	if size <= 0 || size%qemuimg.SectorSize != 0 {
		return FileInfo{}, fmt.Errorf("size %d is not a positive multiple of %d bytes: %w", size, qemuimg.SectorSize, errdefs.ErrInvalid)
	}
	if isTemp(filepath.Base(path)) || filepath.Base(path) == MarkerFile {
		return FileInfo{}, fmt.Errorf("name %s is reserved by Stowage: %w", filepath.Base(path), errdefs.ErrInvalid)
	}
	if err := ctx.Err(); err != nil {
		return FileInfo{}, err
	}
	final := l.onHost(path)
	dir := filepath.Dir(final)
	if fi, err := os.Stat(dir); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return FileInfo{}, fmt.Errorf("directory %s does not exist: %w", filepath.Dir(path), errdefs.ErrNotFound)
		}
		return FileInfo{}, classed(err)
	} else if !fi.IsDir() {
		return FileInfo{}, fmt.Errorf("%s is not a directory: %w", filepath.Dir(path), errdefs.ErrFailedPrecondition)
	}
	if _, err := os.Lstat(final); err == nil {
		return l.existingImage(ctx, path, final, format, size)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return FileInfo{}, classed(err)
	}

	tmp := tempName(dir, filepath.Base(final))
	defer os.Remove(tmp) // a no-op once renamed
	if err := l.qemu.Create(ctx, tmp, string(format), size); err != nil {
		return FileInfo{}, err
	}
	if err := durable.SyncFile(tmp); err != nil {
		return FileInfo{}, classed(err)
	}
	if err := ctx.Err(); err != nil {
		return FileInfo{}, err
	}
	if err := durable.RenameNoReplace(tmp, final); err != nil {
		if errors.Is(err, fs.ErrExist) {
			// A concurrent CreateImage of the same path won.
			return l.existingImage(ctx, path, final, format, size)
		}
		return FileInfo{}, classed(err)
	}
	if err := durable.SyncDir(dir); err != nil {
		return FileInfo{}, classed(err)
	}
	fi, err := os.Lstat(final)
	if err != nil {
		return FileInfo{}, classed(err)
	}
	return fileInfo(path, fi), nil
}

// existingImage accepts the file at final if it is a blank image of format
// and size, the result of an earlier identical CreateImage.
func (l *Local) existingImage(ctx context.Context, path, final string, format drivers.Format, size int64) (FileInfo, error) {
	fi, err := os.Lstat(final)
	if err != nil {
		return FileInfo{}, classed(err)
	}
	if !fi.Mode().IsRegular() {
		return FileInfo{}, fmt.Errorf("%s exists and is not a regular file: %w", path, errdefs.ErrAlreadyExists)
	}
	info, err := l.qemu.Info(ctx, final, qemuimg.AssumeFormat(string(format)), qemuimg.ForceShare())
	if errors.Is(err, errdefs.ErrInvalid) {
		return FileInfo{}, fmt.Errorf("%s exists and is not a %s image: %w", path, format, errdefs.ErrAlreadyExists)
	}
	if err != nil {
		return FileInfo{}, err
	}
	if info.VirtualSize != size || info.BackingFilename != "" {
		what := fmt.Sprintf("a %s image of %d bytes", info.Format, info.VirtualSize)
		if info.BackingFilename != "" {
			what += " backed by " + info.BackingFilename
		}
		return FileInfo{}, fmt.Errorf("%s exists as %s: %w", path, what, errdefs.ErrAlreadyExists)
	}
	return fileInfo(path, fi), nil
}

// DeletePath removes the file (or empty directory) at path, and what an
// interrupted image step left in staging for it; a missing one is not an
// error. A non-empty directory is errdefs.ErrFailedPrecondition. The
// store marker is not removed this way: ReleaseStore does that.
func (l *Local) DeletePath(ctx context.Context, path string) error {
	if err := l.deletePath(ctx, path); err != nil {
		return fmt.Errorf("delete %s on host %s: %w", path, l.hostID, err)
	}
	return nil
}

func (l *Local) deletePath(ctx context.Context, path string) error {
	if err := checkPath(path); err != nil {
		return err
	}
	if filepath.Base(path) == MarkerFile {
		return fmt.Errorf("a store marker is removed by ReleaseStore only: %w", errdefs.ErrInvalid)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	p := l.onHost(path)
	// What an interrupted image step left for this object goes with it.
	l.removeStaged(p)
	if err := os.Remove(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return classed(err)
	}
	return classed(durable.SyncDir(filepath.Dir(p)))
}

// ListDir lists the directory path, sorted by name, without the temporary
// files (isTemp) being written in it. A missing directory is errdefs.ErrNotFound.
// Entries are not followed: a symbolic link is reported as itself.
func (l *Local) ListDir(ctx context.Context, path string) ([]FileInfo, error) {
	out, err := l.listDir(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("list %s on host %s: %w", path, l.hostID, err)
	}
	return out, nil
}

func (l *Local) listDir(ctx context.Context, path string) ([]FileInfo, error) {
	if err := checkPath(path); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	dir := l.onHost(path)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, classed(err)
	}
	out := make([]FileInfo, 0, len(entries))
	for i, e := range entries {
		if isTemp(e.Name()) {
			continue
		}
		if i%256 == 255 {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
		}
		fi, err := os.Lstat(filepath.Join(dir, e.Name()))
		if errors.Is(err, fs.ErrNotExist) {
			continue // removed since ReadDir
		}
		if err != nil {
			return nil, classed(err)
		}
		out = append(out, fileInfo(filepath.Join(path, e.Name()), fi))
	}
	return out, nil
}

// StatPath describes the file at path without following a final symbolic
// link. A missing file is errdefs.ErrNotFound.
func (l *Local) StatPath(ctx context.Context, path string) (FileInfo, error) {
	if err := checkPath(path); err != nil {
		return FileInfo{}, fmt.Errorf("stat %s on host %s: %w", path, l.hostID, err)
	}
	if err := ctx.Err(); err != nil {
		return FileInfo{}, fmt.Errorf("stat %s on host %s: %w", path, l.hostID, err)
	}
	fi, err := os.Lstat(l.onHost(path))
	if err != nil {
		return FileInfo{}, fmt.Errorf("stat %s on host %s: %w", path, l.hostID, classed(err))
	}
	return fileInfo(path, fi), nil
}

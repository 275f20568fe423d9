package hostfs

import (
	"context"
	"fmt"
	"os"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// RebaseImage moves the qcow2 at path onto newBacking, an image of
// backingFormat ("" makes it standalone), with qemu-img rebase in safe
// mode, which copies into the image whatever the new chain would read
// differently. Both the old chain and the new one must pass checkChain
// (inside the image's store, formats recorded). When the new backing reads
// exactly as the old one (qemu-img compare says so, and it stops at the
// first difference) only the name is rewritten (rebase -u). An image
// already on newBacking is left alone.
func (l *Local) RebaseImage(ctx context.Context, path, newBacking string, backingFormat drivers.Format) (ImageInfo, error) {
	info, err := l.rebaseImage(ctx, path, newBacking, backingFormat)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("rebase %s onto %q on host %s: %w", path, newBacking, l.hostID, err)
	}
	return info, nil
}

func (l *Local) rebaseImage(ctx context.Context, path, newBacking string, backingFormat drivers.Format) (ImageInfo, error) {
	host, err := l.objectPath(path)
	if err != nil {
		return ImageInfo{}, err
	}
	var nb, nbFormat string
	if newBacking != "" {
		if nb, err = l.existingPath(newBacking); err != nil {
			return ImageInfo{}, err
		}
		if nbFormat, err = declared("new backing file", backingFormat); err != nil {
			return ImageInfo{}, err
		}
	}
	unlock, err := l.locks.lock(ctx, host)
	if err != nil {
		return ImageInfo{}, err
	}
	defer unlock()
	qi, err := l.openDeclared(ctx, host, qemuimg.FormatQCOW2, true)
	if err != nil {
		return ImageInfo{}, err
	}
	old := backingOf(qi)
	method := "unchanged"
	if old != nb {
		// A snapshot's file is read-only (0440); merging a snapshot out of
		// the chain rebases its child, so the owner may write it while the
		// rebase runs (its mode is put back after).
		restore, err := ownerWritable(host)
		if err != nil {
			return ImageInfo{}, err
		}
		defer restore()
		var opts []qemuimg.RebaseOption
		method = "rebase"
		if nb != "" {
			// The chain the image will have must pass the same rule.
			if err := l.checkChain(ctx, host, qemuimg.Info{BackingFilename: nb, BackingFormat: nbFormat}); err != nil {
				return ImageInfo{}, err
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
			return ImageInfo{}, err
		}
		if err := durable.SyncFile(host); err != nil {
			return ImageInfo{}, classed(err)
		}
	}
	info, _, err := l.imageInfo(ctx, path, host, qemuimg.FormatQCOW2)
	if err != nil {
		return ImageInfo{}, err
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

// ownerWritable lets the owner write the file at host until restore puts
// its mode back (nothing to do when it already may).
func ownerWritable(host string) (restore func(), err error) {
	fi, err := os.Stat(host)
	if err != nil {
		return nil, classed(err)
	}
	mode := fi.Mode().Perm()
	if mode&0o200 != 0 {
		return func() {}, nil
	}
	if err := os.Chmod(host, mode|0o200); err != nil {
		return nil, classed(err)
	}
	return func() { _ = os.Chmod(host, mode) }, nil
}

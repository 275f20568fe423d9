package nbd

import (
	"context"
	"fmt"
	"syscall"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
)

// Qcow2Backend serves the guest view of a qcow2 image and its backing
// chain read-only, in Go (datapath/stream's qcow2 reader): reads and block
// status come from the cluster map, no daemon in between. Each layer is
// opened as the format its child records; the caller checks the chain
// first (formats recorded, nothing outside what it may serve). An image
// the reader cannot read (an external data file, encryption, an unknown
// incompatible feature) is errdefs.ErrNotImplemented: serve it through a
// qemu-storage-daemon instead (UpstreamBackend).
//
// The image must not change while it is served (a template, a snapshot, a
// volume no guest writes): the reader caches the cluster map.
type Qcow2Backend struct {
	src *stream.Qcow2Source
}

var (
	_ Backend         = (*Qcow2Backend)(nil)
	_ Extenter        = (*Qcow2Backend)(nil)
	_ SkipHolesOnRead = (*Qcow2Backend)(nil)
)

// SkipHolesOnRead implements SkipHolesOnRead: the reader walks the
// cluster map for every read already, and a client that wants holes asks
// BLOCK_STATUS (nbdcopy, qemu-img do).
func (b *Qcow2Backend) SkipHolesOnRead() bool { return true }

// OpenQcow2Backend opens the qcow2 image at path.
func OpenQcow2Backend(path string) (*Qcow2Backend, error) {
	src, err := stream.OpenQcow2Source(path)
	if err != nil {
		return nil, err
	}
	return &Qcow2Backend{src: src}, nil
}

// Size is the virtual size.
func (b *Qcow2Backend) Size() int64 { return b.src.Size() }

// ReadAt reads the guest view.
func (b *Qcow2Backend) ReadAt(p []byte, off int64) (int, error) { return b.src.ReadAt(p, off) }

// WriteAt refuses: the export is read-only.
func (b *Qcow2Backend) WriteAt(p []byte, off int64) (int, error) {
	return 0, fmt.Errorf("qcow2 export is read-only: %w", syscall.EPERM)
}

// Sync has nothing to make durable.
func (b *Qcow2Backend) Sync() error { return nil }

// Extents maps zero and unallocated clusters to holes, at most max extents.
func (b *Qcow2Backend) Extents(ctx context.Context, off, n int64, max int) ([]stream.Extent, error) {
	x, err := b.src.Extents(ctx, off, n)
	if err != nil {
		return nil, err
	}
	if len(x) == 0 {
		return nil, fmt.Errorf("qcow2 map at %d: no extent: %w", off, errdefs.ErrInternal)
	}
	if len(x) > max {
		x = x[:max]
	}
	return x, nil
}

// Close closes the image.
func (b *Qcow2Backend) Close() error { return b.src.Close() }

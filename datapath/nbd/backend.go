package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
)

// Backend is what an export serves: a fixed-size range of bytes. ReadAt and
// WriteAt must be safe for concurrent use; all connections to one export
// share one Backend, which is what makes NBD_FLAG_CAN_MULTI_CONN true (a
// Sync covers writes made through every connection).
//
// Optional capabilities are one-method interfaces found by type assertion:
// Zeroer, Trimmer, Extenter and Cacher. A backend without them still serves
// WRITE_ZEROES (by writing zeros), BLOCK_STATUS (all data) and CACHE (no-op).
type Backend interface {
	io.ReaderAt
	io.WriterAt
	// Size is the export size in bytes; it does not change while served.
	Size() int64
	// Sync makes completed writes durable (fdatasync).
	Sync() error
	Close() error
}

// Zeroer zeroes a range without writing buffers. With punch it may
// deallocate (punch a hole); without it the range must stay allocated.
// It returns an error of class errdefs.ErrNotImplemented, with the range
// untouched, when it cannot do this quickly; the server then writes zeros.
type Zeroer interface {
	ZeroRange(off, n int64, punch bool) error
}

// Trimmer discards a range (NBD_CMD_TRIM). Content there is unspecified
// afterwards.
type Trimmer interface {
	Trim(off, n int64) error
}

// Extenter reports which parts of [off, off+n) are holes that read as zeros.
// The extents cover the range in order without gaps; at most max of them are
// returned, the last one then ending early.
type Extenter interface {
	Extents(ctx context.Context, off, n int64, max int) ([]stream.Extent, error)
}

// FUAWriter writes with forced unit access in one step (an upstream NBD
// server takes the FUA flag itself); without it a FUA write is WriteAt and
// then Sync.
type FUAWriter interface {
	WriteAtFUA(p []byte, off int64) (int, error)
}

// SkipHolesOnRead is a backend whose Extents costs a round trip (one NBD
// server in front of another): when it says so, reads send data without
// looking holes up first, and clients that want holes ask BLOCK_STATUS.
type SkipHolesOnRead interface {
	SkipHolesOnRead() bool
}

// Cacher prefetches a range (NBD_CMD_CACHE).
type Cacher interface {
	Cache(off, n int64) error
}

// FileBackend serves a regular file or a block device through one file
// descriptor: pread/pwrite, fdatasync, fallocate and SEEK_DATA/SEEK_HOLE.
type FileBackend struct {
	f     *os.File
	size  int64
	block bool
}

var (
	_ Backend  = (*FileBackend)(nil)
	_ Zeroer   = (*FileBackend)(nil)
	_ Trimmer  = (*FileBackend)(nil)
	_ Extenter = (*FileBackend)(nil)
	_ Cacher   = (*FileBackend)(nil)
)

// OpenFileBackend opens path for an export, read-only or read-write. The
// export size is the file's size now (a block device's capacity).
func OpenFileBackend(path string, readOnly bool) (*FileBackend, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("export file %s: %w", path, classifyOpen(err))
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("export file %s: %w", path, err)
	}
	b := &FileBackend{f: f}
	switch {
	case st.Mode().IsRegular():
		b.size = st.Size()
	case st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0:
		b.block = true
		end, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("export device %s: size: %w", path, err)
		}
		b.size = end
	default:
		f.Close()
		return nil, fmt.Errorf("export %s: not a regular file or block device: %w", path, errdefs.ErrInvalid)
	}
	return b, nil
}

func classifyOpen(err error) error {
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("%w: %w", err, errdefs.ErrNotFound)
	case errors.Is(err, os.ErrPermission), errors.Is(err, syscall.EROFS):
		return fmt.Errorf("%w: %w", err, errdefs.ErrPermissionDenied)
	}
	return err
}

// File is the open file.
func (b *FileBackend) File() *os.File { return b.f }

// Size is the export size.
func (b *FileBackend) Size() int64 { return b.size }

// ReadAt reads exactly len(p) bytes; a short file gives io.ErrUnexpectedEOF.
func (b *FileBackend) ReadAt(p []byte, off int64) (int, error) {
	n, err := b.f.ReadAt(p, off)
	if err == io.EOF && n < len(p) {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// WriteAt writes p at off.
func (b *FileBackend) WriteAt(p []byte, off int64) (int, error) { return b.f.WriteAt(p, off) }

// Sync is fdatasync.
func (b *FileBackend) Sync() error {
	if err := unix.Fdatasync(int(b.f.Fd())); err != nil {
		return fmt.Errorf("fdatasync %s: %w", b.f.Name(), err)
	}
	return nil
}

// Close closes the file.
func (b *FileBackend) Close() error { return b.f.Close() }

// ZeroRange punches a hole (punch) or zeroes in place with
// FALLOC_FL_ZERO_RANGE, keeping the size.
func (b *FileBackend) ZeroRange(off, n int64, punch bool) error {
	fd := int(b.f.Fd())
	if punch {
		err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		if err == nil {
			return nil
		}
		if !unsupported(err) {
			return fmt.Errorf("punch hole %s [%d,+%d): %w", b.f.Name(), off, n, err)
		}
	}
	err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == nil {
		return nil
	}
	if unsupported(err) {
		return fmt.Errorf("zero range %s: %w: %w", b.f.Name(), err, errdefs.ErrNotImplemented)
	}
	return fmt.Errorf("zero range %s [%d,+%d): %w", b.f.Name(), off, n, err)
}

// unsupported reports fallocate errors that mean "not here" (filesystem
// without the mode, unaligned range on a block device).
func unsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) ||
		errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENODEV)
}

// Trim punches a hole; where that is unsupported it does nothing (a trim
// is a hint).
func (b *FileBackend) Trim(off, n int64) error {
	err := unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err != nil && !unsupported(err) {
		return fmt.Errorf("trim %s [%d,+%d): %w", b.f.Name(), off, n, err)
	}
	return nil
}

// Cache asks the kernel to read the range ahead.
func (b *FileBackend) Cache(off, n int64) error {
	return unix.Fadvise(int(b.f.Fd()), off, n, unix.FADV_WILLNEED)
}

// Extents lists holes and data with SEEK_DATA/SEEK_HOLE. A block device, or
// a filesystem without SEEK_DATA, is all data.
func (b *FileBackend) Extents(ctx context.Context, off, n int64, max int) ([]stream.Extent, error) {
	end := off + n
	if b.block {
		return []stream.Extent{{Off: off, Len: n}}, nil
	}
	fd := int(b.f.Fd())
	var out []stream.Extent
	add := func(x stream.Extent) {
		if k := len(out) - 1; k >= 0 && out[k].Hole == x.Hole && out[k].End() == x.Off {
			out[k].Len += x.Len
			return
		}
		out = append(out, x)
	}
	pos := off
	for pos < end {
		if len(out) >= max {
			break
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) { // no data after pos
				add(stream.Extent{Off: pos, Len: end - pos, Hole: true})
				break
			}
			// no SEEK_DATA: all data
			add(stream.Extent{Off: pos, Len: end - pos})
			break
		}
		if data > pos {
			h := min(data, end)
			add(stream.Extent{Off: pos, Len: h - pos, Hole: true})
			pos = h
			if pos >= end || len(out) >= max {
				break
			}
		}
		hole, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if err != nil || hole <= pos {
			hole = end
		}
		d := min(hole, end)
		add(stream.Extent{Off: pos, Len: d - pos})
		pos = d
	}
	if len(out) == 0 {
		out = append(out, stream.Extent{Off: off, Len: n})
	}
	return out, nil
}

package stream

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/lima-vm/go-qcow2reader"
	"github.com/lima-vm/go-qcow2reader/image"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/errdefs"
)

// qcow2Magic starts every qcow2 image.
var qcow2Magic = []byte{'Q', 'F', 'I', 0xfb}

// isQcow2 reports whether f starts with the qcow2 magic.
func isQcow2(f io.ReaderAt) bool {
	var b [4]byte
	n, _ := f.ReadAt(b[:], 0)
	return n == 4 && bytes.Equal(b[:], qcow2Magic)
}

// Qcow2Source reads the guest-visible content of a qcow2 image (backing
// files included) through github.com/lima-vm/go-qcow2reader; its extents
// come from the cluster map, so unallocated and zero clusters are holes.
type Qcow2Source struct {
	f        *os.File
	img      image.Image
	path     string
	identity string
}

var _ Source = (*Qcow2Source)(nil)

// OpenQcow2Source opens the qcow2 image at path.
func OpenQcow2Source(path string) (*Qcow2Source, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("open source %s: %w", path, errors.Join(err, errdefs.ErrNotFound))
		}
		return nil, fmt.Errorf("open source %s: %w", path, err)
	}
	var hdr [32]byte
	if n, _ := f.ReadAt(hdr[:], 0); n == len(hdr) && bytes.Equal(hdr[:4], qcow2Magic) && binary.BigEndian.Uint64(hdr[24:]) == 0 {
		// an empty image has no L1 table, which the reader refuses
		st, _ := f.Stat()
		return &Qcow2Source{f: f, path: path, identity: fmt.Sprintf("qcow2:%s:size=0:file-size=%d:mtime=%d", path, st.Size(), st.ModTime().UnixNano())}, nil
	}
	img, err := qcow2reader.OpenWithType(f, "qcow2")
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open qcow2 %s: %w", path, errors.Join(err, errdefs.ErrInvalid))
	}
	if err := img.Readable(); err != nil {
		img.Close()
		f.Close()
		return nil, fmt.Errorf("qcow2 %s cannot be read in Go (convert it with qemu-img first): %w", path, errors.Join(err, errdefs.ErrNotImplemented))
	}
	st, _ := f.Stat()
	return &Qcow2Source{f: f, img: img, path: path,
		identity: fmt.Sprintf("qcow2:%s:size=%d:file-size=%d:mtime=%d", path, img.Size(), st.Size(), st.ModTime().UnixNano())}, nil
}

// Size is the virtual size.
func (s *Qcow2Source) Size() int64 {
	if s.img == nil {
		return 0
	}
	return s.img.Size()
}

// Identity names path, sizes and mtime.
func (s *Qcow2Source) Identity() string { return s.identity }

// ReadAt reads guest-visible bytes.
func (s *Qcow2Source) ReadAt(p []byte, off int64) (int, error) {
	size := s.Size()
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := int(min(int64(len(p)), size-off))
	n, err := s.img.ReadAt(p[:want], off)
	if err == io.EOF && n == want {
		err = nil
	}
	if err != nil {
		return n, fmt.Errorf("read qcow2 %s at %d: %w", s.path, off, err)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// Extents maps zero and unallocated clusters to holes.
func (s *Qcow2Source) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	end := min(off+length, s.Size())
	var out []Extent
	for pos := off; pos < end; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		x, err := s.img.Extent(pos, end-pos)
		if err != nil {
			return nil, fmt.Errorf("qcow2 %s map at %d: %w", s.path, pos, err)
		}
		if x.Length <= 0 {
			return nil, fmt.Errorf("qcow2 %s map at %d: empty extent: %w", s.path, pos, errdefs.ErrInternal)
		}
		n := min(x.Length, end-pos)
		out = append(out, Extent{Off: pos, Len: n, Hole: x.Zero})
		pos += n
	}
	return mergeExtents(out), nil
}

// Close closes the image and the file.
func (s *Qcow2Source) Close() error {
	if s.img != nil {
		s.img.Close() // closes the file too
	}
	if err := s.f.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
		return err
	}
	return nil
}

// Qcow2Sink produces a qcow2 image: the engine writes a sparse raw staging
// file (resumable like any file sink), and Commit has qemu-img convert it
// into a temporary qcow2 that is synced and renamed into place.
type Qcow2Sink struct {
	*FileSink
	final   string
	staging string
	qemu    *qemuimg.Tool
}

var _ Sink = (*Qcow2Sink)(nil)

// OpenQcow2Sink opens a qcow2 destination of virtual size size.
func OpenQcow2Sink(path string, size int64, opts SinkOptions) (*Qcow2Sink, error) {
	if size%qemuimg.SectorSize != 0 {
		return nil, fmt.Errorf("qcow2 %s: virtual size %d is not a multiple of %d: %w", path, size, qemuimg.SectorSize, errdefs.ErrInvalid)
	}
	staging := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".stowage-raw")
	fs, err := OpenFileSink(staging, size, opts)
	if err != nil {
		return nil, err
	}
	if fs.block {
		fs.Abort()
		return nil, fmt.Errorf("qcow2 output to a block device: %w", errdefs.ErrInvalid)
	}
	return &Qcow2Sink{FileSink: fs, final: path, staging: staging, qemu: qemuimg.New()}, nil
}

// Commit converts the staging file into the final qcow2.
func (s *Qcow2Sink) Commit(ctx context.Context) error {
	if err := s.FileSink.Commit(ctx); err != nil {
		return err
	}
	defer os.Remove(s.staging)
	tmp := TempPath(s.final)
	if err := s.qemu.Convert(ctx, s.staging, tmp, qemuimg.FormatQCOW2, qemuimg.SourceFormat(qemuimg.FormatRaw)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write qcow2 %s: %w", s.final, err)
	}
	if err := durable.SyncFile(tmp); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("sync %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, s.final); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("rename %s to %s: %w", tmp, s.final, err)
	}
	if err := durable.SyncDir(filepath.Dir(s.final)); err != nil {
		return fmt.Errorf("sync directory %s: %w", filepath.Dir(s.final), err)
	}
	return nil
}

// Abort removes the staging file and the checkpoint.
func (s *Qcow2Sink) Abort() error {
	err := s.FileSink.Abort()
	os.Remove(s.staging)
	return err
}

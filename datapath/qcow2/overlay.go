// Package qcow2 writes qcow2 images without running qemu-img. Today it
// makes one kind: an empty overlay on a backing file (a linked clone or a
// lazy volume), the file `qemu-img create -f qcow2 -b B -F FMT` writes, in
// one process-free step of a few system calls instead of a ~9 ms qemu-img
// run.
//
// An overlay is laid out as qemu-img 7.2 lays it out (docs/interop/qcow2.txt
// in the QEMU tree, version 3):
//
//	cluster 0   header (112 bytes), the backing format header extension,
//	            the end-of-extensions marker, then the backing file name
//	cluster 1   refcount table: one entry, the refcount block's offset
//	cluster 2   refcount block: 16-bit refcounts, 1 for clusters 0 to 2
//	            and for each cluster of the L1 table
//	cluster 3…  L1 table: ceil(size / 512 MiB) entries, all zero (no L2
//	            table yet: every guest read falls through to the backing file)
//
// with 64 KiB clusters, refcount order 4, no feature bits, zlib
// compression type and no feature name table (qemu writes one for its
// error messages; readers do not need it). The file ends where the L1
// table does, as qemu-img's does; the parts that are zero are left as
// holes. The result passes `qemu-img check` with no errors and no leaks,
// and its header fields equal those of qemu-img's (overlay_test.go).
//
// Nothing here probes or opens the backing file: the caller has opened it
// with its declared format and checked its chain, and records that format.
package qcow2

import (
	"encoding/binary"
	"fmt"
	"os"
	"strings"
	"syscall"

	"github.com/stowage/stowage/errdefs"
)

// The layout constants of an overlay.
const (
	ClusterBits = 16
	ClusterSize = 1 << ClusterBits // 64 KiB, qemu-img's default
	// MaxBackingName is the longest backing file name qemu accepts (1023 bytes).
	MaxBackingName = 1023
	// MaxL1Bytes is qemu's bound on an L1 table (QCOW_MAX_L1_SIZE): with
	// 64 KiB clusters an overlay is at most 2 PiB.
	MaxL1Bytes = 32 << 20

	headerLength  = 112 // version 3 header up to and including the compression type, padded to 8
	refcountOrder = 4   // 16-bit refcounts
	extBackingFmt = 0xe2792aca
	l2Entries     = ClusterSize / 8         // L2 entries per table
	l2Span        = l2Entries * ClusterSize // guest bytes one L2 table maps (512 MiB)
	refTableAt    = 1 * ClusterSize
	refBlockAt    = 2 * ClusterSize
	l1At          = 3 * ClusterSize
)

// The backing formats an overlay records (the chain rules of agent/hostfs
// allow no other).
const (
	FormatRaw   = "raw"
	FormatQCOW2 = "qcow2"
)

// Overlay is an empty qcow2 overlay to write.
type Overlay struct {
	// Size is the virtual size in bytes, a multiple of 512 (qemu-img
	// rounds other sizes up; callers must say what they mean).
	Size int64
	// BackingFile is recorded as given: an absolute path, or one relative
	// to the overlay's directory. It is not opened.
	BackingFile string
	// BackingFormat is FormatRaw or FormatQCOW2: qemu opens the backing
	// file as this format, never probing it.
	BackingFormat string
}

// chunk is bytes at an offset of the file; everything else reads as zero.
type chunk struct {
	off  int64
	data []byte
}

// layout checks o and returns the non-zero parts of the file and its length.
func (o Overlay) layout() ([]chunk, int64, error) {
	switch {
	case o.Size < 0 || o.Size%512 != 0:
		return nil, 0, fmt.Errorf("qcow2 overlay: size %d is not a non-negative multiple of 512: %w", o.Size, errdefs.ErrInvalid)
	case o.BackingFile == "":
		return nil, 0, fmt.Errorf("qcow2 overlay: no backing file: %w", errdefs.ErrInvalid)
	case len(o.BackingFile) > MaxBackingName:
		return nil, 0, fmt.Errorf("qcow2 overlay: backing file name is %d bytes, more than %d: %w", len(o.BackingFile), MaxBackingName, errdefs.ErrInvalid)
	case strings.IndexByte(o.BackingFile, 0) >= 0:
		return nil, 0, fmt.Errorf("qcow2 overlay: backing file name contains a NUL byte: %w", errdefs.ErrInvalid)
	case o.BackingFormat != FormatRaw && o.BackingFormat != FormatQCOW2:
		return nil, 0, fmt.Errorf("qcow2 overlay: backing format %q is not %s or %s: %w", o.BackingFormat, FormatRaw, FormatQCOW2, errdefs.ErrInvalid)
	}
	l1Size := (o.Size + l2Span - 1) / l2Span
	if l1Size*8 > MaxL1Bytes {
		return nil, 0, fmt.Errorf("qcow2 overlay: size %d needs an L1 table of %d bytes, more than qemu's %d: %w", o.Size, l1Size*8, MaxL1Bytes, errdefs.ErrInvalid)
	}
	l1Clusters := (l1Size*8 + ClusterSize - 1) / ClusterSize
	var l1Offset int64
	length := int64(l1At)
	if l1Size > 0 {
		l1Offset = l1At
		length = l1At + l1Size*8
	}

	// Cluster 0: header, backing format extension, end marker, backing name.
	fmtLen := len(o.BackingFormat)
	extEnd := headerLength + 8 + pad8(fmtLen) + 8
	h := make([]byte, extEnd+len(o.BackingFile))
	be := binary.BigEndian
	copy(h[0:], "QFI\xfb")
	be.PutUint32(h[4:], 3)                           // version
	be.PutUint64(h[8:], uint64(extEnd))              // backing_file_offset
	be.PutUint32(h[16:], uint32(len(o.BackingFile))) // backing_file_size
	be.PutUint32(h[20:], ClusterBits)                // cluster_bits
	be.PutUint64(h[24:], uint64(o.Size))             // size
	// 32: crypt_method 0
	be.PutUint32(h[36:], uint32(l1Size))   // l1_size
	be.PutUint64(h[40:], uint64(l1Offset)) // l1_table_offset
	be.PutUint64(h[48:], refTableAt)       // refcount_table_offset
	be.PutUint32(h[56:], 1)                // refcount_table_clusters
	// 60: nb_snapshots 0; 64: snapshots_offset 0
	// 72, 80, 88: incompatible, compatible, autoclear features 0
	be.PutUint32(h[96:], refcountOrder) // refcount_order
	be.PutUint32(h[100:], headerLength) // header_length
	// 104: compression_type 0 (zlib), then padding
	be.PutUint32(h[headerLength:], extBackingFmt)
	be.PutUint32(h[headerLength+4:], uint32(fmtLen))
	copy(h[headerLength+8:], o.BackingFormat)
	// extEnd-8: the end-of-extensions marker (type 0, length 0)
	copy(h[extEnd:], o.BackingFile)

	// Cluster 1: the refcount table's one entry.
	rt := make([]byte, 8)
	be.PutUint64(rt, refBlockAt)
	// Cluster 2: refcount 1 for the header, the two refcount clusters and the L1 table.
	used := 3 + l1Clusters
	rb := make([]byte, 2*used)
	for i := range used {
		be.PutUint16(rb[2*i:], 1)
	}
	return []chunk{{0, h}, {refTableAt, rt}, {refBlockAt, rb}}, length, nil
}

func pad8(n int) int { return (n + 7) &^ 7 }

// Write writes o into f, an empty file opened for writing: its few
// non-zero parts, then its length (the rest is a hole). It does not sync.
func (o Overlay) Write(f *os.File) error {
	chunks, length, err := o.layout()
	if err != nil {
		return err
	}
	for _, c := range chunks {
		if _, err := f.WriteAt(c.data, c.off); err != nil {
			return err
		}
	}
	return f.Truncate(length)
}

// Create writes o as a new file at path (perm before the umask), which
// must not exist (an error matching fs.ErrExist), and fsyncs it; a failed
// Create removes what it made. Like durable.WriteNew it is the first half
// of a publish: the caller renames path into place and syncs the directory.
func Create(path string, o Overlay, perm os.FileMode) error {
	if _, _, err := o.layout(); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, perm)
	if err != nil {
		return err
	}
	err = o.Write(f)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
	}
	return err
}

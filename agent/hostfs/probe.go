package hostfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// reflinkKey names one store directory on one mounted filesystem, so that a
// remount with another filesystem is probed again.
type reflinkKey struct {
	dir   string
	dev   uint64
	magic uint32
}

// probe reads what the host sees of the store directory dir (a path on this machine).
func (l *Local) probe(ctx context.Context, dir string) (StoreProbe, error) {
	if err := ctx.Err(); err != nil {
		return StoreProbe{}, err
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return StoreProbe{}, classed(&fs.PathError{Op: "statfs", Path: dir, Err: err})
	}
	// f_blocks and f_bavail count fragments of f_frsize bytes; Linux fills
	// f_frsize (equal to f_bsize on all common filesystems) since 2.6.
	unit := st.Frsize
	if unit == 0 {
		unit = st.Bsize
	}
	magic := uint32(st.Type)
	// Capacity is what can be allocated: the blocks reserved for root
	// (f_bfree - f_bavail) are left out, as df's Use% leaves them out, so
	// capacity - available is the space in use and used/capacity is the
	// figure operators know from df (and what capacity thresholds judge).
	reserved := uint64(0)
	if st.Bfree > st.Bavail {
		reserved = st.Bfree - st.Bavail
	}
	p := StoreProbe{
		CapacityBytes:  int64(st.Blocks-reserved) * unit,
		AvailableBytes: int64(st.Bavail) * unit,
		FSType:         FSTypeName(magic),
	}
	if err := ctx.Err(); err != nil {
		return StoreProbe{}, err
	}
	p.Reflink = l.reflinkSupported(dir, magic)
	return p, nil
}

// reflinkSupported answers whether files in dir can share extents
// (FICLONE), by trying it once per directory and filesystem for the life of
// the process. A failure that says nothing about the filesystem (a full or
// read-only disk) answers false and is not remembered.
func (l *Local) reflinkSupported(dir string, magic uint32) bool {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return false
	}
	key := reflinkKey{dir: dir, dev: st.Dev, magic: magic}
	l.mu.Lock()
	v, ok := l.reflink[key]
	l.mu.Unlock()
	if ok {
		return v
	}
	// Probe in the store's tmp area when it has one, else at its root.
	area := filepath.Join(dir, "tmp")
	if fi, err := os.Stat(area); err != nil || !fi.IsDir() {
		area = dir
	}
	supported, definitive := tryClone(area)
	if definitive {
		l.mu.Lock()
		l.reflink[key] = supported
		l.mu.Unlock()
	}
	return supported
}

// tryClone clones one small file into another in dir with FICLONE.
func tryClone(dir string) (supported, definitive bool) {
	src, err := os.CreateTemp(dir, TempPrefix+"reflink-probe-*")
	if err != nil {
		return false, false
	}
	defer os.Remove(src.Name())
	defer src.Close()
	block := make([]byte, 4096) // one block: clone ranges must be block aligned
	block[0] = 1
	if _, err := src.Write(block); err != nil {
		return false, false
	}
	dst, err := os.CreateTemp(dir, TempPrefix+"reflink-probe-*")
	if err != nil {
		return false, false
	}
	defer os.Remove(dst.Name())
	defer dst.Close()
	err = unix.IoctlFileClone(int(dst.Fd()), int(src.Fd()))
	switch {
	case err == nil:
		return true, true
	case errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ENOTTY), errors.Is(err, unix.EINVAL),
		errors.Is(err, unix.EXDEV), errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EBADF):
		return false, true
	default:
		return false, false
	}
}

// fsNames maps statfs f_type magics to the names mount(8) uses.
var fsNames = map[uint32]string{
	unix.EXT4_SUPER_MAGIC:      "ext4", // also ext2 and ext3: one magic
	unix.XFS_SUPER_MAGIC:       "xfs",
	unix.BTRFS_SUPER_MAGIC:     "btrfs",
	unix.BCACHEFS_SUPER_MAGIC:  "bcachefs",
	unix.F2FS_SUPER_MAGIC:      "f2fs",
	unix.TMPFS_MAGIC:           "tmpfs",
	unix.RAMFS_MAGIC:           "ramfs",
	unix.NFS_SUPER_MAGIC:       "nfs",
	unix.CIFS_SUPER_MAGIC:      "cifs",
	unix.SMB2_SUPER_MAGIC:      "smb3",
	unix.V9FS_MAGIC:            "9p",
	unix.CEPH_SUPER_MAGIC:      "ceph",
	unix.OCFS2_SUPER_MAGIC:     "ocfs2",
	unix.OVERLAYFS_SUPER_MAGIC: "overlay",
	unix.FUSE_SUPER_MAGIC:      "fuse",
	unix.EXFAT_SUPER_MAGIC:     "exfat",
	unix.MSDOS_SUPER_MAGIC:     "vfat",
	unix.SQUASHFS_MAGIC:        "squashfs",
	unix.ISOFS_SUPER_MAGIC:     "iso9660",
	0x2fc12fc1:                 "zfs",
	0x01161970:                 "gfs2",
	0x47504653:                 "gpfs",
	0x0bd00bd0:                 "lustre",
}

// FSTypeName names the filesystem with statfs magic f_type, or returns the
// magic in hex ("0x1234abcd") when it is not one Stowage knows.
func FSTypeName(magic uint32) string {
	if n, ok := fsNames[magic]; ok {
		return n
	}
	return fmt.Sprintf("%#x", magic)
}

// Package durable publishes files so that a crash never leaves a
// half-written file under its final name.
//
// What it guarantees, on a filesystem that honours fsync:
//
//   - WriteFile: after it returns nil, path holds exactly data and survives
//     a crash (the file and the directory entry are both fsynced). Before
//     that, a reader of path sees the old file or nothing, never a torn one:
//     the data goes to a temporary file in the same directory, named
//     ".tmp-<base>-<random>", which is renamed over path once fsynced. A
//     failed call removes its temporary file; a crash may leave one behind.
//   - WriteNew: creates a file that must not exist yet (fs.ErrExist) with
//     data, fsynced; on failure it removes what it created. It is the first
//     half of a no-replace publish: WriteNew a temporary name, then
//     RenameNoReplace it to the final one, then SyncDir.
//   - PublishNew: that whole no-replace publish in one call, for a file
//     made once (a CA, a key) that readers may open while it is written:
//     they see nothing or the whole file, and so does the next start after
//     a crash.
//   - RenameNoReplace: renames old to new unless new exists, atomically;
//     an existing new is an error matching fs.ErrExist and leaves both names
//     as they were. Where the filesystem or kernel lacks renameat2
//     RENAME_NOREPLACE (NFS, older kernels) it links new to old and unlinks
//     old, which is as atomic for the new name (link fails with EEXIST).
//   - SyncDir, SyncFile: fsync a directory (so that entries created, renamed
//     or removed in it survive a crash) or a file written by someone else
//     (another process such as qemu-img).
//
// Errors are the operating system's (*fs.PathError, *os.LinkError), so
// errors.Is finds fs.ErrExist, fs.ErrNotExist and the errno; the package
// adds no error class: callers classify at their edge.
package durable

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// SyncDir fsyncs the directory dir so that entries created, renamed or
// removed in it survive a crash.
func SyncDir(dir string) error {
	return SyncFile(dir)
}

// SyncFile fsyncs the file (or directory) at path, for a file written by
// another process (qemu-img) or closed without a sync.
func SyncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// RenameNoReplace renames oldpath to newpath unless newpath exists (an
// error matching fs.ErrExist). Where the filesystem lacks RENAME_NOREPLACE
// (renameat2 fails with EINVAL, ENOSYS or EOPNOTSUPP: NFS, older kernels)
// it links and unlinks instead, which is as atomic.
func RenameNoReplace(oldpath, newpath string) error {
	err := unix.Renameat2(unix.AT_FDCWD, oldpath, unix.AT_FDCWD, newpath, unix.RENAME_NOREPLACE)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EOPNOTSUPP) {
		return &os.LinkError{Op: "rename", Old: oldpath, New: newpath, Err: err}
	}
	return linkUnlink(oldpath, newpath)
}

// linkUnlink is RenameNoReplace's fallback: link newpath to oldpath (which
// fails with EEXIST when newpath exists) and remove oldpath.
func linkUnlink(oldpath, newpath string) error {
	if err := os.Link(oldpath, newpath); err != nil {
		return err
	}
	return os.Remove(oldpath)
}

// WriteNew creates path, which must not exist (fs.ErrExist), with data and
// permissions perm (before the umask), and fsyncs it. On failure the file
// is removed. The directory is not synced: WriteNew writes the temporary
// file of a publish that ends with a rename and SyncDir.
func WriteNew(path string, data []byte, perm fs.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, perm)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
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

// PublishNew creates path, which must not exist (fs.ErrExist), with data and
// permissions perm (before the umask), crash-safely: the data is written
// and fsynced under a temporary name in the same directory, which is then
// renamed to path without replacing anything, and the directory is
// fsynced. Readers of path see nothing or all of data, never a torn file.
func PublishNew(path string, data []byte, perm fs.FileMode) error {
	dir, base := filepath.Dir(path), filepath.Base(path)
	tmp := filepath.Join(dir, ".tmp-"+base+"-"+randomHex(8))
	if err := WriteNew(tmp, data, perm); err != nil {
		return err
	}
	if err := RenameNoReplace(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return SyncDir(dir)
}

// WriteFile replaces path with data, crash-safely: it writes a temporary
// file in the same directory with permissions perm (before the umask),
// fsyncs it, renames it over path and fsyncs the directory. Readers of path
// see the old content or the new, never a mix.
func WriteFile(path string, data []byte, perm fs.FileMode) error {
	dir, base := filepath.Dir(path), filepath.Base(path)
	tmp := filepath.Join(dir, ".tmp-"+base+"-"+randomHex(8))
	if err := WriteNew(tmp, data, perm); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return SyncDir(dir)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return hex.EncodeToString(b)
}

// WriteJSON replaces path with v as indented JSON, private (0600, its
// directory made 0700 if missing), crash-safely as WriteFile does: the
// state files of a process (exports, grants) use it.
func WriteJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return WriteFile(path, append(b, '\n'), 0o600)
}

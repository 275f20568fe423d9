// Package hostfs does the agent's host work on the local kernel, on host
// paths: it lays out and probes store directories, creates, fetches,
// copies, clones, snapshots, backs up and exports disk images, and lists,
// stats and deletes files. It never sees the wire: the agent's LocalHost
// (package agent) resolves every (store, key) of a hostops request beneath
// a store root it serves and calls Local with the resulting paths. It is
// the real implementation, not a fake: every call does the host work.
//
// Contract:
//
//   - Every path is absolute and clean (filepath.Clean(p) == p, so no "..",
//     "//" or trailing "/"), and is not "/". Anything else is
//     errdefs.ErrInvalid, before any work is done.
//   - A store directory carries a marker file, MarkerFile, naming the store
//     that owns it ({"store_id": ..., "created_at": ...}). PrepareStore
//     writes it, ProbeStore requires it, ReleaseStore removes it last.
//   - Nothing half-written is ever visible under its final name: markers and
//     images are written under a TempPrefix name in the same directory,
//     fsynced, renamed into place without replacing anything
//     (renameat2 RENAME_NOREPLACE, or link+unlink where the filesystem lacks
//     it, as on NFS), and the directory is fsynced. ListDir hides TempPrefix
//     names; ReleaseStore removes stale ones left by a crash.
//   - Every call is idempotent: preparing a prepared store, creating an
//     identical image or deleting a missing file succeeds.
//   - Errors wrap an errdefs class and keep the OS error (errors.Is finds
//     fs.ErrNotExist as well as errdefs.ErrNotFound).
//   - ProbeStore answers whether the store's filesystem shares extents
//     (reflink) by cloning a small file with FICLONE, in the store's tmp/
//     when it has one, once per directory and filesystem for the process.
//   - Local implements the image steps (imageOps, requests.go; the rules
//     shared by the image steps in images.go; one file per step: fetch.go, copy.go, clone.go,
//     inspect.go, resize.go, rebase.go, snapshot.go, backup.go, export.go):
//     downloads and copies through the copy engine (datapath/stream),
//     clones, snapshots, rebases and conversions through qemu-img, backups
//     into a content-addressed chunk store (datapath/chunkstore), and
//     read-only HTTP exports through an Exporter (WithExporter). Image
//     steps stage their output under deterministic temporary names so an
//     interrupted download resumes, and lock the object paths they touch
//     (per path, honouring ctx).
//   - Image steps never probe the format of an existing image: they open it
//     as the format the request declares (qemu-img -f/-F, the copy engine's
//     Format), and a declared qcow2's backing chain must stay inside its
//     store, each layer's backing format recorded (chain.go, checkChain).
//     A raw volume's guest cannot make a step read a file of its choosing.
//   - A cancelled context stops a call before it starts blocking work;
//     ProbeStore returns at once when the context ends even if the kernel is
//     stuck in statfs on a dead NFS server.
package hostfs

import (
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/stowage/stowage/datapath/netguard"
	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// MarkerFile is the name of the marker at the root of a store directory.
const MarkerFile = ".stowage-store"

// TempPrefix starts the names of files being written; they are not objects.
// The copy engine's own work files for such a name ("." + name + suffix)
// start with "." + TempPrefix and are temporary too (isTemp).
const TempPrefix = ".stowage-tmp-"

// isTemp reports whether a directory entry is a temporary file of a step
// in progress (or left by a crash): hidden from ListDir, removed by
// ReleaseStore and by DeletePath of the object it was becoming.
func isTemp(name string) bool {
	return strings.HasPrefix(name, TempPrefix) || strings.HasPrefix(name, "."+TempPrefix)
}

// Local runs endpoint steps on this machine. It is safe for concurrent use;
// concurrent steps on the same path are safe too (no-replace renames).
type Local struct {
	hostID string
	root   string
	qemu   *qemuimg.Tool

	mu      sync.Mutex
	reflink map[reflinkKey]bool // per store directory and filesystem, for the process

	locks    keyedLocks // per object path, for the image steps
	bases    baseInfos  // qemu-img info of base images (baseinfo.go)
	exporter Exporter
	// fetchGuard checks every address a download of a user-supplied URL
	// connects to (WithFetchGuard); nil: none.
	fetchGuard *netguard.Guard
	fetchRetry time.Duration // WithFetchRetryWindow
	peerTLS    *tls.Config
	webTLS     *tls.Config
	nbd        NBDExporter

	// backingRoots are read-only directories outside any store that a
	// volume's backing chain may end in: the host's FUSE template mount,
	// whose files are templates the controller's records describe (lazy
	// volumes). Set when the agent learns the mount (SetBackingRoots).
	backingRoots []string
}

// SetBackingRoots replaces the directories outside stores that backing
// chains may enter (see checkChain): the host's template mount.
func (l *Local) SetBackingRoots(dirs ...string) {
	var clean []string
	for _, d := range dirs {
		if d != "" {
			clean = append(clean, filepath.Clean(l.onHost(d)))
		}
	}
	l.mu.Lock()
	l.backingRoots = clean
	l.mu.Unlock()
}

// backingRoot returns the backing root holding p (a path on this machine)
// and its resolved form, if any.
func (l *Local) backingRoot(p string) (root, real string, ok bool) {
	l.mu.Lock()
	roots := l.backingRoots
	l.mu.Unlock()
	for _, r := range roots {
		if within(p, r) {
			real, err := filepath.EvalSymlinks(r)
			if err != nil {
				return "", "", false
			}
			return r, real, true
		}
	}
	return "", "", false
}

var _ imageOps = (*Local)(nil)

// Option configures a Local.
type Option func(*Local)

// WithFetchGuard makes FetchImage connect only where g allows (loopback,
// private and link-local addresses refused unless allowed): a template
// URL is the operator's input, not trust.
func WithFetchGuard(g *netguard.Guard) Option { return func(l *Local) { l.fetchGuard = g } }

// WithQemuImg makes Local create and inspect images with q instead of the
// qemu-img found in $PATH.
func WithQemuImg(q *qemuimg.Tool) Option { return func(l *Local) { l.qemu = q } }

// WithRoot resolves every path under dir, so that several Locals on one
// machine each see their own tree, as separate hosts would (stowage dev with
// several hosts, tests of a store that one host cannot reach). Paths in
// results stay as the caller gave them. It is not a security boundary:
// symbolic links inside dir may point out of it.
func WithRoot(dir string) Option { return func(l *Local) { l.root = filepath.Clean(dir) } }

// New returns the endpoint of host hostID on this machine.
func New(hostID string, opts ...Option) *Local {
	l := &Local{hostID: hostID, reflink: map[reflinkKey]bool{}}
	for _, o := range opts {
		o(l)
	}
	if l.qemu == nil {
		l.qemu = qemuimg.New()
	}
	if l.root == "/" {
		l.root = ""
	}
	return l
}

// HostID is the id of the host this endpoint runs steps on.
func (l *Local) HostID() string { return l.hostID }

// onHost maps a caller's path to the path on this machine.
func (l *Local) onHost(path string) string {
	if l.root == "" {
		return path
	}
	return l.root + path
}

// checkPath enforces the path contract of the package doc.
func checkPath(path string) error {
	switch {
	case path == "":
		return fmt.Errorf("empty path: %w", errdefs.ErrInvalid)
	case strings.IndexByte(path, 0) >= 0:
		return fmt.Errorf("path %q contains a NUL byte: %w", path, errdefs.ErrInvalid)
	case !filepath.IsAbs(path):
		return fmt.Errorf("path %q is not absolute: %w", path, errdefs.ErrInvalid)
	case filepath.Clean(path) != path:
		return fmt.Errorf("path %q is not clean (want %q): %w", path, filepath.Clean(path), errdefs.ErrInvalid)
	case path == "/":
		return fmt.Errorf("path / is the root of the host, never a store or an object: %w", errdefs.ErrInvalid)
	}
	return nil
}

// checkStoreID rejects an empty or unprintable store id.
func checkStoreID(id string) error {
	if id == "" {
		return fmt.Errorf("empty store id: %w", errdefs.ErrInvalid)
	}
	if len(id) > 256 || strings.ContainsFunc(id, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return fmt.Errorf("store id %q is longer than 256 bytes or has control characters: %w", id, errdefs.ErrInvalid)
	}
	return nil
}

// tempName returns a fresh TempPrefix name in dir for a file that will become base.
func tempName(dir, base string) string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	name := TempPrefix + hex.EncodeToString(b[:])
	if len(name)+1+len(base) <= 255 {
		name += "." + base
	}
	return filepath.Join(dir, name)
}

// hostError keeps an OS error's text and chain and adds an errdefs class.
type hostError struct {
	err   error
	class error
}

func (e *hostError) Error() string   { return e.err.Error() }
func (e *hostError) Unwrap() []error { return []error{e.err, e.class} }

// classed adds an errdefs class to an OS error that has none.
func classed(err error) error {
	if err == nil || errdefs.Class(err) != nil {
		return err
	}
	return &hostError{err: err, class: classOf(err)}
}

func classOf(err error) error {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		if errors.Is(err, fs.ErrNotExist) {
			return errdefs.ErrNotFound
		}
		return errdefs.ErrInternal
	}
	switch errno {
	case syscall.ENOENT:
		return errdefs.ErrNotFound
	case syscall.EEXIST:
		return errdefs.ErrAlreadyExists
	case syscall.EACCES, syscall.EPERM:
		return errdefs.ErrPermissionDenied
	case syscall.ENOSPC, syscall.EDQUOT:
		return errdefs.ErrResourceExhausted
	case syscall.EROFS, syscall.ENOTEMPTY, syscall.EBUSY, syscall.ENOTDIR, syscall.EISDIR:
		return errdefs.ErrFailedPrecondition
	case syscall.ENAMETOOLONG, syscall.EINVAL:
		return errdefs.ErrInvalid
	case syscall.EIO, syscall.ESTALE, syscall.ETIMEDOUT, syscall.EHOSTDOWN, syscall.EHOSTUNREACH, syscall.ENOTCONN:
		return errdefs.ErrUnavailable
	}
	return errdefs.ErrInternal
}

// fileInfo converts an lstat result into the FileInfo of path, as the caller named it.
func fileInfo(path string, fi fs.FileInfo) FileInfo {
	out := FileInfo{
		Path:       path,
		Size:       fi.Size(),
		IsDir:      fi.IsDir(),
		ModifiedAt: fi.ModTime(),
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		out.AllocatedBytes = st.Blocks * 512 // st_blocks is in 512-byte units whatever the block size
	}
	if fi.Mode().IsRegular() {
		out.VirtualSize = out.Size
		if size, ok := qcow2VirtualSize(path); ok {
			out.Format, out.VirtualSize = drivers.FormatQCOW2, size
		}
	}
	return out
}

// qcow2VirtualSize reads the virtual size from a qcow2 header (magic
// "QFI\xfb", size as a big-endian uint64 at byte 24), without running qemu-img.
func qcow2VirtualSize(path string) (int64, bool) {
	f, err := os.Open(path)
	if err != nil {
		return 0, false
	}
	defer f.Close()
	var hdr [32]byte
	if _, err := io.ReadFull(f, hdr[:]); err != nil {
		return 0, false
	}
	if string(hdr[:4]) != "QFI\xfb" {
		return 0, false
	}
	return int64(binary.BigEndian.Uint64(hdr[24:32])), true
}

// nowUTC is the marker's creation time, to the second.
func nowUTC() time.Time { return time.Now().UTC().Truncate(time.Second) }

package imagecache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/errdefs"
)

// fuseMaxIO is the largest READ the kernel sends and its read-ahead
// window (go-fuse clamps it to the kernel's max_pages_limit).
const fuseMaxIO = 1 << 20

// MountOptions tune a FUSE mount of a Cache.
type MountOptions struct {
	// AllowOther lets users other than the mounting one reach the mount;
	// with default_permissions the kernel then grants reading to the
	// files' Owner and Group only (mode 0440, directory 0550): set Group
	// to the hypervisor's (QEMU's) group. Templates are never
	// world-readable.
	AllowOther bool
	// Owner and Group own the mount's files (uid and gid; 0: root).
	Owner, Group uint32
	// NoPassthrough serves complete templates through this process even
	// when the kernel supports FUSE passthrough (for measurements).
	NoPassthrough bool
	// Debug logs every FUSE request.
	Debug bool
	// Logger receives read failures (default the cache's logger).
	Logger *slog.Logger
}

// Mount is a read-only FUSE filesystem showing a Cache's templates as
// files named by id, at their real size. Reads of missing chunks fetch
// them; once a template is complete, new opens are served by the kernel
// from the cached data file (FUSE passthrough) without reaching this
// process, or, on a kernel without passthrough, with the page cache kept
// across opens.
type Mount struct {
	c     *Cache
	dir   string
	srv   *fuse.Server
	root  *rootNode
	log   *slog.Logger
	pt    bool
	reads atomic.Int64
	// What the mount's readers got: bytes served from cached chunks (hit)
	// or that waited for the origin (miss), and opens handed to the kernel
	// (passthrough), whose reads this process never sees.
	hitBytes, missBytes, ptOpens atomic.Int64
	// owner and group own every file of the mount (MountOptions).
	owner, group uint32
}

// MountCache mounts c at dir (DirectMountStrict: no fusermount). A stale
// mount left at dir by a crashed daemon is detached first. ctx bounds
// only the mounting itself.
func MountCache(ctx context.Context, c *Cache, dir string, o MountOptions) (*Mount, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := CleanStaleMount(dir); err != nil {
		return nil, err
	}
	m := &Mount{c: c, dir: dir, log: o.Logger, owner: o.Owner, group: o.Group}
	if m.log == nil {
		m.log = c.log
	}
	m.root = &rootNode{m: m}
	ttl := 10 * time.Second
	var neg time.Duration
	srv, err := fs.Mount(dir, m.root, &fs.Options{
		EntryTimeout: &ttl, AttrTimeout: &ttl, NegativeTimeout: &neg,
		MountOptions: fuse.MountOptions{
			DirectMountStrict: true,
			AllowOther:        o.AllowOther,
			FsName:            "stowage-imagecache",
			Name:              "stowage",
			// default_permissions: the kernel checks the files' owner,
			// group and mode (0440) for every open, so allow_other does
			// not make the templates world-readable.
			Options: []string{"ro", "default_permissions"},
			Debug:   o.Debug,
			// READs of up to 1 MiB (max_read, MaxPages) and a 1 MiB
			// kernel read-ahead window instead of 128 KiB (MaxReadAhead
			// and setReadAhead below: the kernel only lowers its default
			// from max_readahead): a cold sequential reader costs an
			// eighth as many round trips through this process.
			// Passthrough opens are read by the kernel from the data
			// file and are not affected.
			MaxWrite:     fuseMaxIO,
			MaxReadAhead: fuseMaxIO,
			// A 1 MiB READ plus its header does not fit the 1 MiB pipe
			// limit: go-fuse's splice attempt failed (and logged) on every
			// READ before falling back to a copy. Copy straight away.
			DisableSplice: true,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("mount image cache at %s: %w", dir, errors.Join(err, errdefs.ErrUnavailable))
	}
	m.srv = srv
	m.pt = !o.NoPassthrough && srv.KernelSettings().Flags64()&fuse.CAP_PASSTHROUGH != 0
	if err := setReadAhead(dir, fuseMaxIO); err != nil {
		m.log.Debug("image cache: mount read-ahead left at the kernel default", "mount", dir, "err", err)
	}
	c.watchComplete(func(t *Template) {
		// From now on opens are passthrough and read the data file; the
		// pages the lazy opens left in the FUSE file's own page cache are
		// a second copy of the same bytes. Drop them now, off any reader's
		// path: left in place, the kernel dropped them on the first
		// passthrough open, and that first read ran at a third of the
		// data file's speed (bench/README.md, the warm row).
		ch := m.root.GetChild(t.id)
		if ch == nil || ch.StableAttr().Ino != t.gen {
			return
		}
		if errno := ch.NotifyContent(0, 0); errno != 0 && errno != syscall.ENOENT {
			m.log.Debug("image cache: page cache invalidation failed", "template", t.id, "errno", errno)
		}
	})
	c.Watch(func(id string) {
		// The listing is computed on demand; only the kernel's cached
		// entry (positive or negative) needs to go.
		if errno := m.root.NotifyEntry(id); errno != 0 && errno != syscall.ENOENT {
			m.log.Debug("image cache: entry invalidation failed", "template", id, "errno", errno)
		}
	})
	return m, nil
}

// setReadAhead sets the read-ahead window of the mount at dir (its
// backing device info, /sys/class/bdi/MAJOR:MINOR/read_ahead_kb) to n
// bytes. The kernel starts a FUSE mount at min(max_readahead, its default
// 128 KiB), so MaxReadAhead alone cannot raise it, and buffered readers of
// a lazy template then cost one 128 KiB READ round trip each. Measured on
// a cold 512 MiB template (2 vCPU): 4 KiB reads 364 -> 665 MiB/s, 1 MiB
// reads 697 -> 759 MiB/s, 8x fewer READs. Needs root; best effort.
func setReadAhead(dir string, n int) error {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return err
	}
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	return os.WriteFile(p, []byte(fmt.Sprintf("%d\n", n>>10)), 0o644)
}

// CleanStaleMount detaches a dead FUSE mount at dir (statfs fails with
// ENOTCONN when its daemon is gone; stat alone may be answered from the
// kernel's attribute cache for a while).
func CleanStaleMount(dir string) error {
	var sfs unix.Statfs_t
	err := unix.Statfs(dir, &sfs)
	if !errors.Is(err, syscall.ENOTCONN) {
		if _, serr := os.Stat(dir); !errors.Is(serr, syscall.ENOTCONN) {
			return nil
		}
	}
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach stale mount %s: %w", dir, errors.Join(err, errdefs.ErrFailedPrecondition))
	}
	return nil
}

// Dir is the mount point.
func (m *Mount) Dir() string { return m.dir }

// Passthrough reports whether complete templates are served with FUSE
// passthrough.
func (m *Mount) Passthrough() bool { return m.pt }

// Reads is the number of READ requests this process has served.
func (m *Mount) Reads() int64 { return m.reads.Load() }

// MountCounters are what a mount's readers got, cumulative since it was
// mounted.
type MountCounters struct {
	// Reads is the number of READ requests this process served.
	Reads int64
	// HitBytes were served from cached chunks; MissBytes waited for bytes
	// from the origin. Reads of a complete template opened with
	// passthrough never reach this process and are in neither.
	HitBytes, MissBytes int64
	// PassthroughOpens are opens of complete templates handed to the
	// kernel (FUSE passthrough): every read through them is a hit.
	PassthroughOpens int64
}

// Counters returns the mount's counters.
func (m *Mount) Counters() MountCounters {
	return MountCounters{Reads: m.reads.Load(), HitBytes: m.hitBytes.Load(), MissBytes: m.missBytes.Load(), PassthroughOpens: m.ptOpens.Load()}
}

// Wait returns when the filesystem is unmounted.
func (m *Mount) Wait() { m.srv.Wait() }

// Unmount unmounts, retrying while files are busy for up to timeout, then
// detaching lazily.
func (m *Mount) Unmount(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = m.srv.Unmount(); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if derr := unix.Unmount(m.dir, unix.MNT_DETACH); derr != nil {
		return fmt.Errorf("unmount %s: %w", m.dir, errors.Join(err, derr, errdefs.ErrUnavailable))
	}
	return nil
}

type rootNode struct {
	fs.Inode
	m *Mount
}

var (
	_ fs.NodeLookuper  = (*rootNode)(nil)
	_ fs.NodeReaddirer = (*rootNode)(nil)
	_ fs.NodeGetattrer = (*rootNode)(nil)
)

func (r *rootNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o550
	out.Uid, out.Gid = r.m.owner, r.m.group
	return 0
}

func (r *rootNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	t, ok := r.m.c.Get(name)
	if !ok {
		return nil, syscall.ENOENT
	}
	n := &fileNode{t: t, m: r.m}
	n.fill(&out.Attr)
	return r.NewInode(ctx, n, fs.StableAttr{Mode: syscall.S_IFREG, Ino: t.gen}), 0
}

func (r *rootNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	ts := r.m.c.List()
	es := make([]fuse.DirEntry, 0, len(ts))
	for _, t := range ts {
		es = append(es, fuse.DirEntry{Name: t.id, Mode: syscall.S_IFREG, Ino: t.gen})
	}
	return fs.NewListDirStream(es), 0
}

// fileNode is one template.
type fileNode struct {
	fs.Inode
	t *Template
	m *Mount

	// omu guards cached, the opens of this inode in the kernel's cached
	// io mode (lazy opens, and complete opens served by this process).
	// The kernel refuses a passthrough open (ETXTBSY, which open(2)
	// returns as EIO) while any cached-mode open of the inode is held, so
	// a complete template is opened with passthrough only when cached is
	// 0: a VM that opened the template while it was being fetched keeps
	// its file open for its lifetime, and every later open of the same
	// template must not fail for it.
	omu    sync.Mutex
	cached int
}

var (
	_ fs.NodeGetattrer = (*fileNode)(nil)
	_ fs.NodeOpener    = (*fileNode)(nil)
	_ fs.NodeReader    = (*fileNode)(nil)
	_ fs.NodeReleaser  = (*fileNode)(nil)
)

func (n *fileNode) fill(a *fuse.Attr) {
	a.Mode = syscall.S_IFREG | 0o440
	a.Uid, a.Gid = n.m.owner, n.m.group
	a.Size = uint64(n.t.size)
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = uint32(min(n.t.cs, 1<<20))
	a.Nlink = 1
	sec, nsec := uint64(n.t.added.Unix()), uint32(n.t.added.Nanosecond())
	a.Mtime, a.Ctime, a.Atime = sec, sec, sec
	a.Mtimensec, a.Ctimensec, a.Atimensec = nsec, nsec, nsec
}

func (n *fileNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.fill(&out.Attr)
	return 0
}

func (n *fileNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EROFS
	}
	// An open template is never evicted: count the open before looking at
	// Complete (see Template.evict), and until Release.
	n.t.opens.Add(1)
	n.t.touch()
	// The bytes of a template never change, so the page cache stays valid
	// across opens.
	n.omu.Lock()
	defer n.omu.Unlock()
	if !n.t.Complete() {
		n.cached++
		n.m.log.Debug("image cache: open (lazy)", "template", n.t.id)
		return &lazyFile{}, fuse.FOPEN_KEEP_CACHE, 0
	}
	pt := n.m.pt && n.cached == 0
	n.m.log.Debug("image cache: open (complete)", "template", n.t.id, "passthrough", pt)
	f, err := os.Open(n.t.DataPath())
	if err != nil {
		n.t.opens.Add(-1)
		n.m.log.Error("image cache: open cached template", "template", n.t.id, "err", err)
		return nil, 0, syscall.EIO
	}
	if pt {
		n.m.ptOpens.Add(1)
	} else {
		n.cached++
	}
	return &completeFile{f: f, m: n.m, pt: pt, size: n.t.size}, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *fileNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if cf, ok := fh.(*completeFile); ok {
		return cf.Read(ctx, dest, off)
	}
	n.m.reads.Add(1)
	ra := &n.t.ra
	if lf, ok := fh.(*lazyFile); ok {
		ra = &lf.ra
		if got, ok := n.t.readDirect(ctx, dest, off, ra); ok {
			n.m.missBytes.Add(int64(got))
			return fuse.ReadResultData(dest[:got]), 0
		}
	}
	got, missed, err := n.t.readAt(ctx, dest, off, ra)
	if err != nil && got < len(dest) && !errors.Is(err, io.EOF) {
		n.m.log.Error("image cache: read failed", "template", n.t.id, "offset", off, "length", len(dest), "err", err)
		return nil, syscall.EIO
	}
	if missed {
		n.m.missBytes.Add(int64(got))
	} else {
		n.m.hitBytes.Add(int64(got))
	}
	return fuse.ReadResultData(dest[:got]), 0
}

// lazyFile is an open incomplete template, read through Template.ReadAt.
// It is a handle at all so that its Release reaches us, and it carries the
// open's own sequential read-ahead state.
type lazyFile struct{ ra readahead }

// Release ends an open (of either kind).
func (n *fileNode) Release(ctx context.Context, fh fs.FileHandle) syscall.Errno {
	cachedMode := true
	if cf, ok := fh.(*completeFile); ok {
		cf.f.Close()
		cachedMode = !cf.pt
	}
	if cachedMode {
		n.omu.Lock()
		n.cached--
		last := n.cached == 0
		n.omu.Unlock()
		if last && n.t.Complete() {
			// The template completed while this open was reading: its
			// reads after the invalidation at completion (a sequential
			// reader's last chunks arrive, fetched ahead, before the
			// reader does) put pages back into the FUSE file's page
			// cache, which the next, passthrough, open would drop inside
			// its reader's time. Drop them now, after this request (a
			// notify from inside a handler may wait on the kernel).
			go n.invalidateContent()
		}
	}
	n.t.opens.Add(-1)
	return 0
}

// invalidateContent drops the FUSE file's own page cache: once the template
// is complete it duplicates the data file's pages.
func (n *fileNode) invalidateContent() {
	if errno := n.NotifyContent(0, 0); errno != 0 && errno != syscall.ENOENT {
		n.m.log.Debug("image cache: page cache invalidation failed", "template", n.t.id, "errno", errno)
	}
}

// completeFile is an open complete template: the kernel reads its data
// file directly (passthrough), or this process does (no passthrough on
// this kernel, or a cached-mode open of the inode is still held).
type completeFile struct {
	f    *os.File
	m    *Mount
	pt   bool  // opened with passthrough
	size int64 // the template's
}

var (
	_ fs.FilePassthroughFder = (*completeFile)(nil)
	_ fs.FileReader          = (*completeFile)(nil)
)

func (f *completeFile) PassthroughFd() (int, bool) {
	if !f.pt {
		return -1, false
	}
	return int(f.f.Fd()), true
}

func (f *completeFile) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	f.m.reads.Add(1)
	f.m.hitBytes.Add(max(0, min(int64(len(dest)), f.size-off)))
	return fuse.ReadResultFd(f.f.Fd(), off, len(dest)), 0
}

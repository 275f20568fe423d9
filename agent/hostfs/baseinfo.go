package hostfs

import (
	"context"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/datapath/qemuimg"
)

// Base images are read-only by contract: the base of a clone (a template,
// its copy on a store, a template on the host's template mount) and every
// layer below the top of a backing chain are never written while images
// depend on them (a VM writes only the top of its chain; a rebase or a
// commit that rewrites a layer changes its file). Their qemu-img info is
// what a linked clone or a lazy volume spends most of its create on (two
// runs of ~5-7 ms each on a qcow2 base: the base, then the base again as
// the first layer of the new overlay's chain), so it is cached per file
// version: the path, the format asserted, and the device, inode, size,
// modification and change times of the file, read from a descriptor
// opened for it (an open revalidates the attributes on NFS, close-to-open).
//
// A result is cached only when the file did not change while qemu-img
// read it (the same attributes before and after) and its change time is
// older than racyWindow when qemu-img started: a later write or rename then
// shows as a new change time (the kernel's clock has moved past the cached
// one) or a new inode, and misses. The cache holds at most maxBaseInfos
// entries and is cleared when full (the bases of one host are few).

// racyWindow is how old a file's change time must be for its info to be
// cached: well above the timestamp granularity of any filesystem.
const racyWindow = time.Second

// maxBaseInfos bounds the base info cache.
const maxBaseInfos = 512

// fileVersion identifies one version of a file: where it is, how it was
// opened, and its attributes.
type fileVersion struct {
	path, format string
	dev, ino     uint64
	size         int64
	mtime, ctime unix.Timespec
}

// baseInfos caches qemu-img info of base images by fileVersion.
type baseInfos struct {
	mu sync.Mutex
	m  map[fileVersion]qemuimg.Info
}

// versionOf opens path and returns its version, and its change time.
func versionOf(path, format string) (fileVersion, time.Time, bool) {
	// Non-blocking: a FIFO in a base's place must not hang the step
	// (qemu-img then refuses it).
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return fileVersion{}, time.Time{}, false
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fileVersion{}, time.Time{}, false
	}
	return fileVersion{path: path, format: format, dev: st.Dev, ino: st.Ino, size: st.Size, mtime: st.Mtim, ctime: st.Ctim},
		time.Unix(st.Ctim.Unix()), true
}

// baseInfo is qemu-img info of the base image at host (a path on this
// machine) read shared with its format asserted as format, from the cache
// when this version of the file was read before.
func (l *Local) baseInfo(ctx context.Context, host, format string) (qemuimg.Info, error) {
	start := time.Now()
	before, ctime, ok := versionOf(host, format)
	if ok {
		l.bases.mu.Lock()
		qi, hit := l.bases.m[before]
		l.bases.mu.Unlock()
		if hit {
			return qi, nil
		}
	}
	qi, err := l.qemu.Info(ctx, host, qemuimg.AssumeFormat(format), qemuimg.ForceShare())
	if err != nil || !ok || start.Sub(ctime) < racyWindow {
		return qi, err
	}
	if after, _, ok := versionOf(host, format); !ok || after != before {
		return qi, nil
	}
	l.bases.mu.Lock()
	if l.bases.m == nil || len(l.bases.m) >= maxBaseInfos {
		l.bases.m = map[fileVersion]qemuimg.Info{}
	}
	l.bases.m[before] = qi
	l.bases.mu.Unlock()
	return qi, nil
}

package imagecache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stowage/stowage/internal/envtest"
	"golang.org/x/sys/unix"
)

// requireFUSE skips unless the test can mount FUSE (root and /dev/fuse).
func requireFUSE(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		envtest.Skip(t, "needs root for FUSE mounts")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		envtest.Skip(t, "no /dev/fuse")
	}
}

func requireTool(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		envtest.Skipf(t, "%s not installed", name)
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// mount mounts c in a temporary directory, unmounted at cleanup.
func mount(t *testing.T, c *Cache) *Mount {
	t.Helper()
	mnt := t.TempDir()
	m, err := MountCache(context.Background(), c, mnt, MountOptions{AllowOther: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Unmount(5 * time.Second); err != nil {
			t.Error(err)
		}
		m.Wait()
	})
	return m
}

// images makes a raw and a qcow2 image with known data written by qemu-io.
func images(t *testing.T) (raw, qcow []byte) {
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	dir := t.TempDir()
	rp, qp := filepath.Join(dir, "t.raw"), filepath.Join(dir, "t.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "raw", rp, "6M")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", qp, "16M")
	for _, w := range [][3]string{{"0xa1", "0", "1M"}, {"0x5c", "3M", "700k"}, {"0xee", "5M", "1M"}} {
		run(t, "qemu-io", "-f", "raw", "-c", "write -P "+w[0]+" "+w[1]+" "+w[2], rp)
		run(t, "qemu-io", "-f", "qcow2", "-c", "write -P "+w[0]+" "+w[1]+" "+w[2], qp)
	}
	raw, err := os.ReadFile(rp)
	if err != nil {
		t.Fatal(err)
	}
	// Random bytes too, so that misplaced chunks cannot look right.
	copy(raw[1<<20+4096:], randBytes(1<<20, 7))
	qcow, err = os.ReadFile(qp)
	if err != nil {
		t.Fatal(err)
	}
	return raw, qcow
}

func TestMountLazyPrefetchPassthroughClone(t *testing.T) {
	requireFUSE(t)
	raw, qcow := images(t)
	o := newOrigin(t)
	rawURL, qcowURL := o.put("t.raw", raw), o.put("t.qcow2", qcow)
	opts := testOptions(t.TempDir())
	opts.PrefetchRate = 4 << 20 // slow enough to read during the prefetch
	c, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	m := mount(t, c)
	ctx := context.Background()
	rt, err := c.Add(ctx, "t.raw", rawURL, 0)
	if err != nil {
		t.Fatal(err)
	}
	qt, err := c.Add(ctx, "t.qcow2", qcowURL, int64(len(qcow)))
	if err != nil {
		t.Fatal(err)
	}
	names := func() []string {
		es, err := os.ReadDir(m.Dir())
		if err != nil {
			t.Fatal(err)
		}
		var ns []string
		for _, e := range es {
			ns = append(ns, e.Name())
		}
		return ns
	}
	if got := names(); !slices.Equal(got, []string{"t.qcow2", "t.raw"}) {
		t.Fatalf("listing %v", got)
	}
	st, err := os.Stat(filepath.Join(m.Dir(), "t.raw"))
	if err != nil || st.Size() != int64(len(raw)) {
		t.Fatalf("stat: %v %v", st, err)
	}

	// Random reads while the prefetch is running.
	f, err := os.Open(filepath.Join(m.Dir(), "t.raw"))
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(9, 9))
	for range 40 {
		off := r.Int64N(int64(len(raw)))
		p := make([]byte, r.IntN(300<<10)+1)
		n, err := f.ReadAt(p, off)
		if err != nil && off+int64(n) != int64(len(raw)) {
			t.Fatalf("read at %d: %v", off, err)
		}
		if !bytes.Equal(p[:n], raw[off:off+int64(n)]) {
			t.Fatalf("bytes differ at %d", off)
		}
	}
	if rt.Complete() {
		t.Log("template completed before the random reads ended; prefetch faster than expected")
	}
	f.Close()
	if w := writeErr(filepath.Join(m.Dir(), "t.raw")); w == nil {
		t.Fatal("write open succeeded on a read-only mount")
	}

	// qemu-img on the mounted qcow2, during the prefetch.
	mq := filepath.Join(m.Dir(), "t.qcow2")
	if out := run(t, "qemu-img", "info", mq); !bytes.Contains([]byte(out), []byte("file format: qcow2")) {
		t.Fatalf("qemu-img info: %s", out)
	}
	src := filepath.Join(t.TempDir(), "src.qcow2")
	if err := os.WriteFile(src, qcow, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", src, mq)
	run(t, "cmp", filepath.Join(m.Dir(), "t.qcow2"), src)

	// Linked clone backed by the mounted template.
	clone := filepath.Join(t.TempDir(), "clone.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", mq, "-F", "qcow2", clone)
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", clone, src)

	// Complete: new opens go through passthrough and reach us no more.
	waitComplete(t, rt)
	waitComplete(t, qt)
	before := m.Reads()
	rawSrc := filepath.Join(t.TempDir(), "src.raw")
	if err := os.WriteFile(rawSrc, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	// Drop the page cache of the mounted file so reads must go somewhere.
	_ = os.WriteFile("/proc/sys/vm/drop_caches", []byte("1"), 0)
	run(t, "cmp", filepath.Join(m.Dir(), "t.raw"), rawSrc)
	if m.Passthrough() {
		if n := m.Reads() - before; n != 0 {
			t.Fatalf("%d READ requests reached the daemon for a complete template with passthrough", n)
		}
		t.Logf("passthrough active: 0 READ requests for a cold cmp of the complete template (%d before completion)", before)
	} else {
		t.Log("kernel without FUSE passthrough: complete templates are read through the daemon")
	}

	// Remove changes the listing without a remount.
	if err := c.Remove(ctx, "t.qcow2"); err != nil {
		t.Fatal(err)
	}
	if got := names(); !slices.Equal(got, []string{"t.raw"}) {
		t.Fatalf("listing after remove %v", got)
	}
	if _, err := os.Stat(mq); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("stat of removed template: %v", err)
	}
	if _, err := c.Add(ctx, "t.qcow2", qcowURL, 0); err != nil {
		t.Fatal(err)
	}
	run(t, "cmp", mq, src)
}

func writeErr(p string) error {
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err == nil {
		f.Close()
	}
	return err
}

func TestMountSourceFailureGivesEIOThenRecovers(t *testing.T) {
	requireFUSE(t)
	o := newOrigin(t)
	data := randBytes(1<<20, 11)
	url := o.put("f.raw", data)
	c, err := New(testOptions(t.TempDir())) // no prefetch
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	m := mount(t, c)
	if _, err := c.Add(context.Background(), "f.raw", url, 0); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(m.Dir(), "f.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := make([]byte, 4096)
	if _, err := f.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	o.fail.Store(true)
	if _, err := f.ReadAt(p, 512<<10); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read from failing source: %v, want EIO", err)
	}
	// Other (cached) ranges still read.
	if _, err := f.ReadAt(p, 0); err != nil || !bytes.Equal(p, data[:4096]) {
		t.Fatalf("cached read during failure: %v", err)
	}
	o.fail.Store(false)
	if _, err := f.ReadAt(p, 512<<10); err != nil || !bytes.Equal(p, data[512<<10:512<<10+4096]) {
		t.Fatalf("read after recovery: %v", err)
	}
}

func TestCleanStaleMountNoop(t *testing.T) {
	if err := CleanStaleMount(t.TempDir()); err != nil {
		t.Fatal(err)
	}
}

// abortFUSE kills the FUSE connection behind mnt the way a crashed daemon
// leaves it: through fusectl's abort, without unmounting.
func abortFUSE(t *testing.T, mnt string) {
	t.Helper()
	const ctl = "/sys/fs/fuse/connections"
	if es, _ := os.ReadDir(ctl); len(es) == 0 {
		err := syscall.Mount("none", ctl, "fusectl", 0, "")
		if err != nil && !errors.Is(err, syscall.EBUSY) {
			t.Skipf("no fusectl: %v", err)
		}
		if err == nil {
			// Leave the host as the test found it.
			t.Cleanup(func() { _ = syscall.Unmount(ctl, 0) })
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(mnt, &st); err != nil {
		t.Fatal(err)
	}
	abort := filepath.Join(ctl, strconv.FormatUint(uint64(unix.Minor(st.Dev)), 10), "abort")
	if err := os.WriteFile(abort, []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
}

func TestMountRecoversStaleMount(t *testing.T) {
	requireFUSE(t)
	o := newOrigin(t)
	data := randBytes(1<<20, 13)
	url := o.put("s.raw", data)
	c, err := New(testOptions(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Add(context.Background(), "s.raw", url, 0); err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	m, err := MountCache(context.Background(), c, mnt, MountOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 4096)
	f, err := os.Open(filepath.Join(mnt, "s.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	f.Close()

	// Crash: the connection dies, the mount stays.
	abortFUSE(t, mnt)
	m.Wait()
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(mnt, &sfs); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("statfs of a dead mount: %v, want ENOTCONN", err)
	}

	// The next start detaches it and mounts again at the same path.
	m2, err := MountCache(context.Background(), c, mnt, MountOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m2.Unmount(5 * time.Second); err != nil {
			t.Error(err)
		}
		m2.Wait()
	})
	got, err := os.ReadFile(filepath.Join(mnt, "s.raw"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read through the new mount: %v", err)
	}
	if out := run(t, "grep", "-c", " "+mnt+" ", "/proc/self/mountinfo"); out != "1\n" {
		t.Fatalf("%s mounted %s times, want once", mnt, out)
	}
}

// TestMountOpenWhileLazyOpenHeld: a file opened while its template was
// being fetched (a VM booted from it) stays open after the template
// completes. The kernel refuses passthrough opens of an inode while such
// an open is held, so later opens must not ask for passthrough then (they
// failed with EIO), and must again once it is closed.
func TestMountOpenWhileLazyOpenHeld(t *testing.T) {
	requireFUSE(t)
	data := randBytes(3<<20+777, 7)
	o := newOrigin(t)
	url := o.put("a.raw", data)
	c, err := New(testOptions(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	m := mount(t, c)
	tm, err := c.Add(context.Background(), "a.raw", url, 0)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(m.Dir(), "a.raw")
	lazy, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer lazy.Close()
	got := make([]byte, len(data))
	if _, err := lazy.ReadAt(got, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("lazy read differs")
	}
	waitComplete(t, tm)

	readAll := func(what string) {
		t.Helper()
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if !bytes.Equal(b, data) {
			t.Fatalf("%s: bytes differ", what)
		}
	}
	readAll("open of the complete template while a lazy open is held")
	if err := lazy.Close(); err != nil {
		t.Fatal(err)
	}
	waitReleased(t, m, "a.raw")
	before := m.Reads()
	_ = os.WriteFile("/proc/sys/vm/drop_caches", []byte("1"), 0)
	readAll("open after the lazy open was closed")
	if m.Passthrough() {
		if n := m.Reads() - before; n != 0 {
			t.Fatalf("%d READ requests reached the daemon after the last lazy open closed: no passthrough", n)
		}
	}
}

// TestMountCounters: a cold read is a miss, the same bytes read again once
// cached are a hit, what came from the origin is counted, and an open of
// the complete template handed to the kernel is counted as such. Reads go
// through a file with kernel read-ahead off (FADV_RANDOM), so that each
// read is exactly one READ of its own bytes.
func TestMountCounters(t *testing.T) {
	requireFUSE(t)
	data := randBytes(2<<20, 7)
	o := newOrigin(t)
	url := o.put("t.raw", data)
	c, err := New(testOptions(t.TempDir())) // no prefetch: chunks come on demand only
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	m := mount(t, c)
	tm, err := c.Add(context.Background(), "t.raw", url, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(m.Dir(), "t.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_RANDOM); err != nil {
		t.Fatal(err)
	}
	read := func(off int64) {
		t.Helper()
		p := make([]byte, 4096)
		if _, err := f.ReadAt(p, off); err != nil || !bytes.Equal(p, data[off:off+4096]) {
			t.Fatalf("read at %d: %v (equal %v)", off, err, bytes.Equal(p, data[off:off+4096]))
		}
	}
	const off = 1 << 20
	read(off)
	if got := m.Counters(); got.MissBytes != 4096 || got.HitBytes != 0 {
		t.Fatalf("after a cold 4 KiB read: %+v, want 4096 missed, 0 hit", got)
	}
	deadline := time.Now().Add(10 * time.Second)
	for tm.Stats().CachedChunks == 0 { // the chunk is fetched behind the direct read
		if time.Now().After(deadline) {
			t.Fatal("the chunk behind a direct read was never cached")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	read(off)
	if got := m.Counters(); got.MissBytes != 4096 || got.HitBytes != 4096 {
		t.Fatalf("after the same read with its chunk cached: %+v, want 4096 missed, 4096 hit", got)
	}
	if got := c.Counters().FetchedBytes; got < 4096+64<<10 {
		t.Fatalf("fetched %d bytes, want at least the direct read and its chunk (%d)", got, 4096+64<<10)
	}

	if _, err := tm.Ensure(context.Background(), 0, int64(len(data))); err != nil {
		t.Fatal(err)
	}
	waitComplete(t, tm)
	f.Close() // passthrough only once no open reads through this process
	waitReleased(t, m, "t.raw")
	f2, err := os.Open(filepath.Join(m.Dir(), "t.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer f2.Close()
	before := m.Counters()
	if m.Passthrough() {
		if before.PassthroughOpens != 1 {
			t.Fatalf("complete template opened with passthrough: %+v, want 1 passthrough open", before)
		}
		return
	}
	p := make([]byte, 4096)
	unix.Fadvise(int(f2.Fd()), 0, 0, unix.FADV_RANDOM)
	if _, err := f2.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	if got := m.Counters(); got.HitBytes-before.HitBytes != 4096 || got.MissBytes != before.MissBytes {
		t.Fatalf("read of the complete template: %+v then %+v, want 4096 more hit bytes", before, got)
	}
}

// waitReleased waits until the daemon has seen the RELEASE of every
// cached-mode open of a template. close(2) returns before the kernel sends
// RELEASE (it is asynchronous for a non-block FUSE mount), and an open
// that arrives in between is, rightly, not a passthrough one.
func waitReleased(t *testing.T, m *Mount, id string) {
	t.Helper()
	ch := m.root.GetChild(id)
	if ch == nil {
		t.Fatalf("no inode for %s", id)
	}
	n := ch.Operations().(*fileNode)
	deadline := time.Now().Add(10 * time.Second)
	for {
		n.omu.Lock()
		cached := n.cached
		n.omu.Unlock()
		if cached == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d cached-mode opens still held 10 s after their close", id, cached)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

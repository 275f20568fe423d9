package hostfs

import (
	"context"
	"encoding/json"
	"errors"
	"github.com/stowage/stowage/datapath/chunkstore"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/internal/envtest"
)

var layout = []string{"volumes", "snapshots", "templates", "tmp"}

func needQemuImg(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath(qemuimg.DefaultBinary); err != nil {
		envtest.Skipf(t, "qemu-img is not installed (apt-get install qemu-utils): %v", err)
	}
}

// tree lists every path under dir, relative, for before/after comparisons.
func tree(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		out = append(out, rel)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sameTree(t *testing.T, dir string, before []string) {
	t.Helper()
	after := tree(t, dir)
	if strings.Join(after, "\n") != strings.Join(before, "\n") {
		t.Errorf("tree of %s changed:\nbefore %q\nafter  %q", dir, before, after)
	}
}

func TestPathsMustBeAbsoluteAndClean(t *testing.T) {
	ctx := t.Context()
	base := t.TempDir()
	l := New("h1")
	before := tree(t, base)
	bad := []string{"", "relative/store", "./x", base + "/a/../b", base + "/a/", base + "//a", base + "/./a", "/", base + "/a\x00b"}
	for _, p := range bad {
		if _, err := l.PrepareStore(ctx, p, "s1", layout); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("PrepareStore(%q): err = %v, want ErrInvalid", p, err)
		}
		if _, err := l.ProbeStore(ctx, p, "s1"); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("ProbeStore(%q): err = %v, want ErrInvalid", p, err)
		}
		if err := l.ReleaseStore(ctx, p, "s1", layout); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("ReleaseStore(%q): err = %v, want ErrInvalid", p, err)
		}
		if _, err := l.CreateImage(ctx, p, drivers.FormatRaw, 1<<20); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("CreateImage(%q): err = %v, want ErrInvalid", p, err)
		}
		if err := l.DeletePath(ctx, p); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("DeletePath(%q): err = %v, want ErrInvalid", p, err)
		}
		if _, err := l.ListDir(ctx, p); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("ListDir(%q): err = %v, want ErrInvalid", p, err)
		}
		if _, err := l.StatPath(ctx, p); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("StatPath(%q): err = %v, want ErrInvalid", p, err)
		}
	}
	for _, sd := range [][]string{{"../escape"}, {"/abs"}, {"a/../b"}, {""}, {"."}, {MarkerFile}, {TempPrefix + "x"}} {
		if _, err := l.PrepareStore(ctx, filepath.Join(base, "s"), "s1", sd); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("PrepareStore with subdirs %q: err = %v, want ErrInvalid", sd, err)
		}
	}
	for _, id := range []string{"", "a\nb", strings.Repeat("x", 300)} {
		if _, err := l.PrepareStore(ctx, filepath.Join(base, "s"), id, layout); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("PrepareStore with store id %q: err = %v, want ErrInvalid", id, err)
		}
	}
	sameTree(t, base, before)
}

func TestPrepareStore(t *testing.T) {
	ctx := t.Context()
	base := t.TempDir()
	store := filepath.Join(base, "deep", "primary")
	l := New("h1")

	p, err := l.PrepareStore(ctx, store, "store-1", layout)
	if err != nil {
		t.Fatal(err)
	}
	if p.CapacityBytes <= 0 || p.AvailableBytes <= 0 || p.AvailableBytes > p.CapacityBytes || p.FSType == "" {
		t.Errorf("probe = %+v, want capacity >= available > 0 and a filesystem type", p)
	}
	for _, sd := range layout {
		if fi, err := os.Stat(filepath.Join(store, sd)); err != nil || !fi.IsDir() {
			t.Errorf("subdir %s: %v", sd, err)
		}
	}
	b, err := os.ReadFile(filepath.Join(store, MarkerFile))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("marker %q: %v", b, err)
	}
	if m["store_id"] != "store-1" {
		t.Errorf("marker store_id = %v", m["store_id"])
	}
	if ts, _ := m["created_at"].(string); ts == "" {
		t.Errorf("marker has no created_at: %s", b)
	} else if _, err := time.Parse(time.RFC3339, ts); err != nil {
		t.Errorf("marker created_at %q: %v", ts, err)
	}

	// Again: idempotent, and a lost subdir comes back; the marker is kept.
	if err := os.Remove(filepath.Join(store, "tmp")); err != nil {
		t.Fatal(err)
	}
	if _, err := l.PrepareStore(ctx, store, "store-1", layout); err != nil {
		t.Fatalf("second PrepareStore: %v", err)
	}
	if _, err := os.Stat(filepath.Join(store, "tmp")); err != nil {
		t.Errorf("tmp not recreated: %v", err)
	}
	if b2, _ := os.ReadFile(filepath.Join(store, MarkerFile)); string(b2) != string(b) {
		t.Errorf("marker rewritten: %s -> %s", b, b2)
	}

	// Another store's directory is refused and left alone.
	before := tree(t, base)
	_, err = l.PrepareStore(ctx, store, "store-2", []string{"other"})
	if !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("PrepareStore by another store: err = %v, want ErrFailedPrecondition", err)
	}
	if want := "already belongs to store store-1; pick another path or delete that store"; !strings.Contains(err.Error(), want) {
		t.Errorf("message %q does not say %q", err, want)
	}
	sameTree(t, base, before)

	// No temporary files remain.
	for _, p := range tree(t, base) {
		if strings.Contains(p, TempPrefix) {
			t.Errorf("temporary file left: %s", p)
		}
	}
}

func TestPrepareStoreRefusesAFile(t *testing.T) {
	base := t.TempDir()
	f := filepath.Join(base, "file")
	if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	l := New("h1")
	for _, p := range []string{f, filepath.Join(f, "below")} {
		if _, err := l.PrepareStore(t.Context(), p, "s1", layout); !errors.Is(err, errdefs.ErrFailedPrecondition) {
			t.Errorf("PrepareStore(%s): err = %v, want ErrFailedPrecondition", p, err)
		}
	}
}

func TestPrepareStoreLeavesNothingWhenItFails(t *testing.T) {
	base := t.TempDir()
	before := tree(t, base)
	store := filepath.Join(base, "new", "store")
	// The second subdirectory's name is too long for the filesystem: the
	// store directory, its parent and volumes/ are made before that fails.
	_, err := New("h1").PrepareStore(t.Context(), store, "s1", []string{"volumes", strings.Repeat("x", 300)})
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("err = %v, want ErrInvalid (name too long)", err)
	}
	sameTree(t, base, before)
}

func TestProbeStore(t *testing.T) {
	ctx := t.Context()
	base := t.TempDir()
	store := filepath.Join(base, "s")
	l := New("h1")
	if _, err := l.ProbeStore(ctx, store, "s1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("missing directory: err = %v, want ErrNotFound", err)
	}
	if err := os.Mkdir(store, 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := l.ProbeStore(ctx, store, "s1")
	if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "no store marker") {
		t.Errorf("no marker: err = %v, want ErrNotFound saying there is no marker", err)
	}
	if _, err := l.PrepareStore(ctx, store, "s1", layout); err != nil {
		t.Fatal(err)
	}
	if _, err := l.ProbeStore(ctx, store, "s2"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("other store's marker: err = %v, want ErrFailedPrecondition", err)
	}
	p, err := l.ProbeStore(ctx, store, "s1")
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(store, &st); err != nil {
		t.Fatal(err)
	}
	if want := FSTypeName(uint32(st.Type)); p.FSType != want {
		t.Errorf("FSType = %q, want %q", p.FSType, want)
	}
	// The root reserve (f_bfree - f_bavail) is not capacity.
	if want := int64(st.Blocks-(st.Bfree-st.Bavail)) * st.Frsize; p.CapacityBytes != want {
		t.Errorf("CapacityBytes = %d, want %d (blocks less the root reserve)", p.CapacityBytes, want)
	}
	if err := os.WriteFile(filepath.Join(store, MarkerFile), []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := l.ProbeStore(ctx, store, "s1"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("damaged marker: err = %v, want ErrFailedPrecondition", err)
	}
}

// /tmp on this kind of machine is ext4, overlay or tmpfs: no reflink.
func TestReflinkFalseOnTmp(t *testing.T) {
	base := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(base, &st); err != nil {
		t.Fatal(err)
	}
	fsType := FSTypeName(uint32(st.Type))
	switch fsType {
	case "ext4", "overlay", "tmpfs":
	default:
		t.Skipf("%s is on %s, which may support reflinks; this test wants ext4, overlay or tmpfs", base, fsType)
	}
	l := New("h1")
	store := filepath.Join(base, "s")
	p, err := l.PrepareStore(t.Context(), store, "s1", layout)
	if err != nil {
		t.Fatal(err)
	}
	if p.Reflink || p.FSType != fsType {
		t.Errorf("probe = %+v, want no reflink on %s", p, fsType)
	}
	if left := tree(t, filepath.Join(store, "tmp")); len(left) != 1 {
		t.Errorf("reflink probe left files in tmp/: %q", left)
	}
}

// TestReflinkTrueOnXFS makes an XFS with reflink=1 on a loop device.
func TestReflinkTrueOnXFS(t *testing.T) {
	mnt := mountXFS(t)
	l := New("h1")
	store := filepath.Join(mnt, "primary")
	p, err := l.PrepareStore(t.Context(), store, "s1", layout)
	if err != nil {
		t.Fatal(err)
	}
	if !p.Reflink || p.FSType != "xfs" {
		t.Fatalf("probe = %+v, want reflink on xfs", p)
	}
	// The answer is cached for the process.
	l.mu.Lock()
	cached := len(l.reflink)
	l.mu.Unlock()
	if cached != 1 {
		t.Errorf("reflink cache holds %d entries, want 1", cached)
	}
	p, err = l.ProbeStore(t.Context(), store, "s1")
	if err != nil || !p.Reflink {
		t.Fatalf("second probe = %+v, %v; want reflink", p, err)
	}
	for _, e := range tree(t, store) {
		if strings.Contains(e, TempPrefix) {
			t.Errorf("reflink probe left %s", e)
		}
	}
}

// mountXFS mounts a fresh reflink-capable XFS and returns its mount point;
// cleanup unmounts it and detaches the loop device. It skips unless root.
func mountXFS(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		envtest.Skip(t, "needs root for losetup and mount")
	}
	for _, tool := range []string{"losetup", "mkfs.xfs", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			envtest.Skipf(t, "%s is not installed: %v", tool, err)
		}
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "xfs.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	// mkfs.xfs wants at least 300 MiB; the file is sparse.
	if err := f.Truncate(512 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		envtest.Skipf(t, "cannot attach a loop device here: %v: %s", err, out)
	}
	loop := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "--detach", loop).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v: %s", loop, err, out)
		}
	})
	if out, err := exec.Command("mkfs.xfs", "-q", "-f", "-m", "reflink=1", loop).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.xfs: %v: %s", err, out)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "xfs", loop, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount %s: %v: %s", loop, err, out)
	}
	t.Cleanup(func() { // runs before the detach above
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", mnt, err, out)
		}
	})
	return mnt
}

func TestReleaseStore(t *testing.T) {
	ctx := t.Context()
	base := t.TempDir()
	store := filepath.Join(base, "s")
	l := New("h1")
	if _, err := l.PrepareStore(ctx, store, "s1", layout); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(store, "volumes", "v1.raw")
	if err := os.WriteFile(data, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(store, "tmp", TempPrefix+"0123.v2.raw")
	if err := os.WriteFile(stale, nil, 0o644); err != nil {
		t.Fatal(err)
	}

	err := l.ReleaseStore(ctx, store, "s1", layout)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "1 entries (volumes/: 1)") {
		t.Fatalf("release with data: err = %v, want ErrFailedPrecondition counting volumes/: 1", err)
	}
	if _, err := os.Stat(data); err != nil {
		t.Fatalf("release removed data: %v", err)
	}
	if _, err := l.ProbeStore(ctx, store, "s1"); err != nil {
		t.Fatalf("refused release damaged the store: %v", err)
	}
	if err := l.ReleaseStore(ctx, store, "s2", layout); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("release by another store: err = %v, want ErrFailedPrecondition", err)
	}

	if err := os.Remove(data); err != nil {
		t.Fatal(err)
	}
	// The lock a chunk collection or a backup leaves is not data.
	if err := os.WriteFile(filepath.Join(store, "snapshots", chunkstore.LockFile), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := l.ReleaseStore(ctx, store, "s1", layout); err != nil {
		t.Fatal(err)
	}
	if left := tree(t, store); len(left) != 1 {
		t.Errorf("after release the store directory holds %q, want it empty", left)
	}
	if err := l.ReleaseStore(ctx, store, "s1", layout); err != nil {
		t.Errorf("second release: %v", err)
	}
	if _, err := l.ProbeStore(ctx, store, "s1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("probe after release: err = %v, want ErrNotFound", err)
	}
}

func TestCreateImage(t *testing.T) {
	needQemuImg(t)
	ctx := t.Context()
	dir := t.TempDir()
	l := New("h1")
	const size = 100<<20 + 3*512

	raw := filepath.Join(dir, "v1.raw")
	fi, err := l.CreateImage(ctx, raw, drivers.FormatRaw, size)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Path != raw || fi.Size != size || fi.AllocatedBytes >= size/2 || fi.IsDir || fi.ModifiedAt.IsZero() {
		t.Errorf("raw FileInfo = %+v, want a sparse %d-byte file", fi, size)
	}
	again, err := l.CreateImage(ctx, raw, drivers.FormatRaw, size)
	if err != nil || again.Size != size {
		t.Errorf("identical CreateImage again = %+v, %v; want success", again, err)
	}

	q := filepath.Join(dir, "v2.qcow2")
	if _, err := l.CreateImage(ctx, q, drivers.FormatQCOW2, size); err != nil {
		t.Fatal(err)
	}
	info, err := qemuimg.New().Info(ctx, q)
	if err != nil || info.Format != "qcow2" || info.VirtualSize != size {
		t.Errorf("qcow2 Info = %+v, %v", info, err)
	}
	if _, err := l.CreateImage(ctx, q, drivers.FormatQCOW2, size); err != nil {
		t.Errorf("identical qcow2 again: %v", err)
	}

	for _, c := range []struct {
		path   string
		format drivers.Format
		size   int64
	}{
		{raw, drivers.FormatRaw, size + 512},
		{raw, drivers.FormatQCOW2, size},
		{q, drivers.FormatRaw, size},
		{q, drivers.FormatQCOW2, 2 * size},
		{dir, drivers.FormatRaw, size},
	} {
		if _, err := l.CreateImage(ctx, c.path, c.format, c.size); !errors.Is(err, errdefs.ErrAlreadyExists) {
			t.Errorf("CreateImage(%s, %s, %d) over another image: err = %v, want ErrAlreadyExists", c.path, c.format, c.size, err)
		}
	}
	if st, _ := os.Stat(raw); st.Size() != size {
		t.Errorf("refused CreateImage changed %s to %d bytes", raw, st.Size())
	}

	for _, c := range []struct {
		format drivers.Format
		size   int64
	}{{drivers.FormatISO, size}, {"vmdk", size}, {drivers.FormatRaw, 0}, {drivers.FormatRaw, -512}, {drivers.FormatRaw, 1000001}} {
		if _, err := l.CreateImage(ctx, filepath.Join(dir, "bad"), c.format, c.size); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("CreateImage(%s, %d): err = %v, want ErrInvalid", c.format, c.size, err)
		}
	}
	if _, err := l.CreateImage(ctx, filepath.Join(dir, "nodir", "v.raw"), drivers.FormatRaw, size); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("CreateImage in a missing directory: err = %v, want ErrNotFound", err)
	}
	if _, err := l.CreateImage(ctx, filepath.Join(dir, MarkerFile), drivers.FormatRaw, size); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("CreateImage over the marker name: err = %v, want ErrInvalid", err)
	}
	if got := tree(t, dir); strings.Join(got, " ") != ". v1.raw v2.qcow2" {
		t.Errorf("directory holds %q, want only the two images", got)
	}
}

func TestCreateImageConcurrent(t *testing.T) {
	needQemuImg(t)
	dir := t.TempDir()
	l := New("h1")
	p := filepath.Join(dir, "v.qcow2")
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Go(func() {
			_, errs[i] = l.CreateImage(t.Context(), p, drivers.FormatQCOW2, 1<<30)
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("creator %d: %v", i, err)
		}
	}
	if got := tree(t, dir); strings.Join(got, " ") != ". v.qcow2" {
		t.Errorf("directory holds %q, want one image and no temporary files", got)
	}
}

func TestListStatDelete(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	l := New("h1")
	write := func(name string, n int) {
		if err := os.WriteFile(filepath.Join(dir, name), make([]byte, n), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("b.raw", 8192)
	write("a.qcow2", 100)
	write(TempPrefix+"1234.c.raw", 10)
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	write("sub/x", 1)

	list, err := l.ListDir(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, fi := range list {
		names = append(names, filepath.Base(fi.Path))
		if filepath.Dir(fi.Path) != dir {
			t.Errorf("Path %s is not under %s", fi.Path, dir)
		}
		if fi.Path == filepath.Join(dir, "b.raw") && (fi.Size != 8192 || fi.AllocatedBytes < 8192 || fi.ModifiedAt.IsZero()) {
			t.Errorf("b.raw = %+v", fi)
		}
		if fi.Path == filepath.Join(dir, "sub") && !fi.IsDir {
			t.Errorf("sub = %+v, want a directory", fi)
		}
	}
	if strings.Join(names, " ") != "a.qcow2 b.raw sub" {
		t.Errorf("ListDir names = %q, want a.qcow2 b.raw sub (no temporary file)", names)
	}
	if _, err := l.ListDir(ctx, filepath.Join(dir, "missing")); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("ListDir of a missing directory: err = %v, want ErrNotFound", err)
	}
	if _, err := l.ListDir(ctx, filepath.Join(dir, "b.raw")); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("ListDir of a file: err = %v, want ErrFailedPrecondition", err)
	}

	fi, err := l.StatPath(ctx, filepath.Join(dir, "a.qcow2"))
	if err != nil || fi.Size != 100 {
		t.Errorf("StatPath = %+v, %v", fi, err)
	}
	_, err = l.StatPath(ctx, filepath.Join(dir, "missing"))
	if !errors.Is(err, errdefs.ErrNotFound) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("StatPath of a missing file: err = %v, want ErrNotFound and fs.ErrNotExist", err)
	}

	if err := l.DeletePath(ctx, filepath.Join(dir, "a.qcow2")); err != nil {
		t.Fatal(err)
	}
	if err := l.DeletePath(ctx, filepath.Join(dir, "a.qcow2")); err != nil {
		t.Errorf("second DeletePath: %v", err)
	}
	if err := l.DeletePath(ctx, filepath.Join(dir, "sub")); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("DeletePath of a non-empty directory: err = %v, want ErrFailedPrecondition", err)
	}
	if err := l.DeletePath(ctx, filepath.Join(dir, MarkerFile)); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("DeletePath of a marker: err = %v, want ErrInvalid", err)
	}
}

func TestCanceledContext(t *testing.T) {
	base := t.TempDir()
	before := tree(t, base)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	l := New("h1")
	p := filepath.Join(base, "s")
	checks := map[string]error{}
	_, checks["PrepareStore"] = l.PrepareStore(ctx, p, "s1", layout)
	_, checks["ProbeStore"] = l.ProbeStore(ctx, p, "s1")
	checks["ReleaseStore"] = l.ReleaseStore(ctx, p, "s1", layout)
	_, checks["CreateImage"] = l.CreateImage(ctx, filepath.Join(base, "v.raw"), drivers.FormatRaw, 1<<20)
	checks["DeletePath"] = l.DeletePath(ctx, p)
	_, checks["ListDir"] = l.ListDir(ctx, base)
	_, checks["StatPath"] = l.StatPath(ctx, base)
	for op, err := range checks {
		if !errors.Is(err, context.Canceled) {
			t.Errorf("%s with a cancelled context: err = %v, want context.Canceled", op, err)
		}
	}
	sameTree(t, base, before)
}

// Two Locals with their own roots behave as two hosts.
func TestWithRoot(t *testing.T) {
	ctx := t.Context()
	r1, r2 := t.TempDir(), t.TempDir()
	h1, h2 := New("h1", WithRoot(r1)), New("h2", WithRoot(r2))
	if _, err := h1.PrepareStore(ctx, "/srv/primary", "s1", layout); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(r1, "srv/primary", MarkerFile)); err != nil {
		t.Fatalf("marker not under the root: %v", err)
	}
	if _, err := h1.ProbeStore(ctx, "/srv/primary", "s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := h2.ProbeStore(ctx, "/srv/primary", "s1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("h2 sees h1's store: err = %v", err)
	}
	list, err := h1.ListDir(ctx, "/srv/primary")
	if err != nil || len(list) != len(layout)+1 || !strings.HasPrefix(list[0].Path, "/srv/primary/") {
		t.Fatalf("ListDir = %+v, %v; want paths as the caller named them", list, err)
	}
}

func TestFSTypeName(t *testing.T) {
	for magic, want := range map[uint32]string{0xef53: "ext4", 0x58465342: "xfs", 0x6969: "nfs", 0x794c7630: "overlay", 0x12345678: "0x12345678"} {
		if got := FSTypeName(magic); got != want {
			t.Errorf("FSTypeName(%#x) = %q, want %q", magic, got, want)
		}
	}
}

// TestInStore: what the exporters check before serving an export again
// after a restart.
func TestInStore(t *testing.T) {
	base := t.TempDir()
	store := filepath.Join(base, "primary")
	l := New("h1")
	if _, err := l.PrepareStore(t.Context(), store, "s1", []string{"volumes"}); err != nil {
		t.Fatal(err)
	}
	vol := filepath.Join(store, "volumes", "v.raw")
	outside := filepath.Join(base, "outside.raw")
	for _, p := range []string{vol, outside} {
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	link := filepath.Join(store, "volumes", "link.raw")
	if err := os.Symlink(outside, link); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		path string
		want error
	}{
		{vol, nil},
		{outside, errdefs.ErrPermissionDenied},
		{link, errdefs.ErrInvalid},
		{filepath.Join(store, MarkerFile), errdefs.ErrInvalid},
		{filepath.Join(store, "volumes", "gone.raw"), errdefs.ErrNotFound},
	} {
		if err := l.InStore(c.path); (c.want == nil && err != nil) || (c.want != nil && !errors.Is(err, c.want)) {
			t.Errorf("InStore(%s) = %v, want %v", c.path, err, c.want)
		}
	}
}

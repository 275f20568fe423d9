package main

// A primary store that fills up during a copy: the job fails with
// resource exhausted naming the store, the partial object is removed and
// the store's filesystem is as full as before.

import (
	"context"
	"crypto/rand"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/internal/envtest"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// loopFS mounts a fresh ext4 filesystem of size bytes at dir (a loop
// device over a file in the test's directory); cleanup unmounts it and
// detaches the loop device, both only the ones made here.
func loopFS(t *testing.T, dir string, size int64) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("a loop-mounted filesystem needs root")
		}
		envtest.Skip(t, "a loop-mounted filesystem needs root")
	}
	needTools(t, "mkfs.ext4", "losetup", "mount", "umount")
	img := dir + ".img"
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	run(t, "mkfs.ext4", "-q", "-m", "0", img)
	dev := strings.TrimSpace(run(t, "losetup", "-f", "--show", img))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "mount", dev, dir)
	t.Cleanup(func() { // registered after the detach: runs before it
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
}

// fsUsed is what df calls used: (blocks - free) * block size.
func fsUsed(t *testing.T, dir string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

// smallStore is a controller and agent h1 with an image store "img", a
// primary store "small" (scoped to h1) on a loop-mounted ext4 of its own,
// and a dense raw template "dense" of random bytes (nothing to skip as
// zeros) registered from an HTTP server on loopback.
type smallStore struct {
	a      *clientAPI
	server string
	store  *stowagev1.DataStore // "small"
	mnt    string               // its filesystem's mount point
	tmpl   *stowagev1.Template  // "dense"
}

// newSmallStore starts a smallStore under root with a template of tsize
// bytes and a filesystem of fsSize bytes.
func newSmallStore(t *testing.T, root string, tsize, fsSize int64) *smallStore {
	t.Helper()
	web := filepath.Join(root, "web")
	if err := os.MkdirAll(web, 0o755); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, tsize)
	rand.Read(buf)
	rawT := filepath.Join(web, "dense.raw")
	if err := os.WriteFile(rawT, buf, 0o644); err != nil {
		t.Fatal(err)
	}
	origin := httptest.NewServer(http.StripPrefix("/t/", http.FileServer(http.Dir(web))))
	t.Cleanup(origin.Close)
	w := &smallStore{mnt: filepath.Join(root, "small")}
	loopFS(t, w.mnt, fsSize)

	addr := freePort(t)
	w.server = "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "controller"))
	agentProc(t, w.server, "h1", "z1", "c1", filepath.Join(root, "a1"))
	waitFor(t, "h1 Up", 20*time.Second, func() bool { return hostState(t, w.server, "h1") == "HOST_STATE_UP" })
	w.a = newAPI(w.server)
	addStore(t, w.a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), &stowagev1.Scope{Zone: "z1"})
	w.store = addStore(t, w.a, "small", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(w.mnt, "pz"),
		&stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h1"})
	reg, err := w.a.images.RegisterTemplate(context.Background(), connect.NewRequest(&stowagev1.RegisterTemplateRequest{
		Name: "dense", Url: origin.URL + "/t/dense.raw", Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW,
		Checksum: "sha256:" + sha256File(t, rawT)}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, w.a, reg.Msg.GetJob())
	w.tmpl = reg.Msg.GetTemplate()
	return w
}

// treeOf lists every path beneath dir (relative, sorted).
func treeOf(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

func TestDiskFullEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "qemu-img")
	root := t.TempDir()
	ctx := context.Background()

	// A 64 MiB dense raw template; the primary store on a 48 MiB ext4.
	w := newSmallStore(t, root, 64<<20, 48<<20)
	a, small, mnt := w.a, w.store, w.mnt

	layout := treeOf(t, mnt)
	before := fsUsed(t, mnt)
	var st unix.Statfs_t
	_ = unix.Statfs(mnt, &st)
	t.Logf("store %s: %d bytes used, %d free before the copy; layout %v", small.GetId(), before, int64(st.Bavail)*st.Bsize, layout)

	cv, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{
		Name: "too-big", TemplateId: w.tmpl.GetId(), StoreId: small.GetId(), Strategy: "full"}))
	if err != nil {
		t.Fatalf("create volume: %v", err)
	}
	start := time.Now()
	j := waitJob(t, a, cv.Msg.GetJob())
	msg := j.GetError()
	t.Logf("job %s ended %s after %v: %s", j.GetId(), j.GetState(), time.Since(start).Round(time.Millisecond), msg)
	if j.GetState() != stowagev1.JobState_JOB_STATE_FAILED {
		t.Fatalf("job ended %s, want FAILED", j.GetState())
	}
	for _, want := range []string{"resource exhausted", "store " + small.GetId() + " is full", "no space left on device"} {
		if !strings.Contains(msg, want) {
			t.Errorf("job error %q does not say %q", msg, want)
		}
	}

	// Nothing of the copy is left: the same tree, the same usage (ext4's
	// metadata may move by a block or two).
	if got := treeOf(t, mnt); strings.Join(got, "\n") != strings.Join(layout, "\n") {
		t.Errorf("store tree after the failed copy:\n%v\nbefore:\n%v", got, layout)
	}
	after := fsUsed(t, mnt)
	t.Logf("used bytes: before %d, after %d (difference %d)", before, after, after-before)
	if d := after - before; d > 16<<10 || d < -16<<10 {
		t.Errorf("store usage changed by %d bytes (before %d, after %d)", d, before, after)
	}
	v, err := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: cv.Msg.GetVolume().GetId()}))
	if err == nil && v.Msg.GetVolume().GetState() == stowagev1.VolumeState_VOLUME_STATE_READY {
		t.Errorf("volume is Ready after a failed create: %v", v.Msg.GetVolume())
	}
}

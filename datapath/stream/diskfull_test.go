package stream

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/errdefs"
)

// smallFS mounts a fresh ext4 filesystem of size bytes (a loop device over
// a file in the test's directory) and returns its mount point; cleanup
// unmounts it and detaches the loop device.
func smallFS(t *testing.T, size int64) string {
	t.Helper()
	needRoot(t)
	needTool(t, "mkfs.ext4")
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	run(t, "mkfs.ext4", "-q", "-m", "0", img)
	dev := loopDevice(t, img)
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", dev, mnt).CombinedOutput(); err != nil {
		t.Skipf("mount %s: %v: %s", dev, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", mnt).Run() }) // runs before the loop device's detach
	return mnt
}

// usedBytes is what df calls used: (blocks - free) * block size.
func usedBytes(t testing.TB, dir string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

// TestDiskFullAbortsAndFrees copies a dense image bigger than the
// destination's filesystem: the copy fails with ErrResourceExhausted, and
// the partial file and its checkpoint are gone (a resumable copy would
// otherwise keep them), so the filesystem's usage is what it was.
func TestDiskFullAbortsAndFrees(t *testing.T) {
	mnt := smallFS(t, 16<<20)
	path, _ := makeImage(t, t.TempDir(), layout{name: "dense", size: 24 << 20, parts: []part{{0, 24 << 20, false}}}, 7)
	before := usedBytes(t, mnt)
	for _, mode := range []WriteMode{WriteBuffered, WriteDirect, WriteEvict} {
		ctx := context.Background()
		src, err := OpenSource(ctx, path, SourceOptions{})
		if err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(mnt, "out.raw")
		dst, err := OpenSink(ctx, out, src.Size(), SinkOptions{Resume: true, WriteMode: mode})
		if err != nil {
			t.Fatal(err)
		}
		o := testOptions()
		o.Resume = true
		_, err = Copy(ctx, src, dst, o)
		src.Close()
		if !errors.Is(err, errdefs.ErrResourceExhausted) || !errors.Is(err, unix.ENOSPC) {
			t.Fatalf("mode %v: copy into a full filesystem: %v, want resource exhausted (ENOSPC)", mode, err)
		}
		if names := onlyFiles(t, mnt); len(names) != 1 || names[0] != "lost+found" {
			t.Fatalf("mode %v: left %v on the full filesystem", mode, names)
		}
		if after := usedBytes(t, mnt); after-before > 64<<10 || before-after > 64<<10 {
			t.Fatalf("mode %v: used %d bytes before, %d after", mode, before, after)
		}
	}
}

func TestSpaceClass(t *testing.T) {
	for _, c := range []struct {
		err  error
		want error
	}{
		{&os.PathError{Op: "write", Path: "/x", Err: unix.ENOSPC}, errdefs.ErrResourceExhausted},
		{&os.PathError{Op: "write", Path: "/x", Err: unix.EDQUOT}, errdefs.ErrResourceExhausted},
		{&os.PathError{Op: "write", Path: "/x", Err: unix.EIO}, nil},
		{errors.Join(unix.ENOSPC, errdefs.ErrUnavailable), errdefs.ErrUnavailable}, // a class already given stays
	} {
		if got := errdefs.Class(spaceClass(c.err)); got != c.want {
			t.Errorf("spaceClass(%v): class %v, want %v", c.err, got, c.want)
		}
	}
	if spaceClass(nil) != nil {
		t.Error("spaceClass(nil) != nil")
	}
	if resumableFailure(spaceClass(unix.ENOSPC)) {
		t.Error("a full destination must not keep its partial file")
	}
}

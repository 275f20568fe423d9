package hostfs

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
)

// A snapshot merge rebases the child in place (RebaseImage). The crash
// argument rests on qemu-img rebase's order: the clusters the child now
// needs are copied in first, each holding what the old chain read there,
// and the backing name is rewritten last. This kills a real qemu-img rebase
// midway and checks the child still reads the same bytes on its old
// backing, then that RebaseImage finishes the job and puts back the
// snapshot's read-only mode.
func TestRebaseKilledMidwayKeepsTheChain(t *testing.T) {
	needQemuIO(t)
	ctx := t.Context()
	dir := storeDir(t, t.TempDir())
	base := filepath.Join(dir, "s1.qcow2")
	qcreate(t, base, "qcow2", 512<<20)
	qio(t, base, "qcow2", "write -P 0x11 0 1M")
	mid := filepath.Join(dir, "s2.qcow2")
	qcreate(t, mid, "qcow2", 0, qemuimg.BackingFile(base, "qcow2"))
	qio(t, mid, "qcow2", "write -P 0x22 1M 384M")
	top := filepath.Join(dir, "s3.qcow2")
	qcreate(t, top, "qcow2", 0, qemuimg.BackingFile(mid, "qcow2"))
	qio(t, top, "qcow2", "write -P 0x33 2M 64k")
	flat := filepath.Join(dir, "want.raw")
	if err := qemuimg.New().Convert(ctx, top, flat, "raw", qemuimg.SourceFormat("qcow2")); err != nil {
		t.Fatal(err)
	}
	blocks := func() int64 {
		fi, err := os.Stat(top)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Sys().(*syscall.Stat_t).Blocks * 512
	}
	start := blocks()

	cmd := exec.Command("qemu-img", "rebase", "-f", "qcow2", "-F", "qcow2", "-b", base, top)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for blocks() < start+(16<<20) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	grown := blocks() - start
	_ = cmd.Process.Signal(syscall.SIGKILL)
	err := cmd.Wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("qemu-img rebase was not killed midway (%v): the test proves nothing", err)
	}
	t.Logf("qemu-img rebase killed after copying %d bytes into the child", grown)
	if grown < 16<<20 {
		t.Fatalf("the child grew %d bytes before the kill, want a rebase midway", grown)
	}
	qi, err := qemuimg.New().Info(ctx, top, qemuimg.AssumeFormat("qcow2"))
	if err != nil || qi.BackingFilename != mid {
		t.Fatalf("after the kill the child is backed by %q (%v), want its old backing %s", qi.BackingFilename, err, mid)
	}
	if !qemuCompare(t, top, "qcow2", flat, "raw") {
		t.Fatal("the child reads differently after a killed rebase")
	}
	// Leaked clusters (exit 3) are allowed; corruption (exit 2) is not.
	if out, err := exec.Command("qemu-img", "check", "-f", "qcow2", top).CombinedOutput(); err != nil {
		if !errors.As(err, &exit) || exit.ExitCode() != 3 {
			t.Fatalf("qemu-img check after the kill: %v\n%s", err, out)
		}
	}

	// The merge run again finishes it; the snapshot stays read-only.
	if err := os.Chmod(top, 0o440); err != nil {
		t.Fatal(err)
	}
	info, err := New("h1").RebaseImage(ctx, top, base, drivers.FormatQCOW2)
	if err != nil || info.BackingFile != base || !strings.HasPrefix(info.Method, "rebase") {
		t.Fatalf("rebase after the kill: %+v %v", info, err)
	}
	if !qemuCompare(t, top, "qcow2", flat, "raw") {
		t.Fatal("the rebased child reads differently")
	}
	if fi, err := os.Stat(top); err != nil || fi.Mode().Perm() != 0o440 {
		t.Fatalf("child mode after the rebase: %v %v, want 0440", fi.Mode(), err)
	}
}

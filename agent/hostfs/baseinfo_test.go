package hostfs

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
)

// countingQemuImg returns a qemu-img that logs each run's subcommand to
// the returned file and runs the real one.
func countingQemuImg(t *testing.T) (bin, log string) {
	t.Helper()
	real, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Skip(err)
	}
	dir := t.TempDir()
	bin, log = filepath.Join(dir, "qemu-img"), filepath.Join(dir, "runs")
	script := "#!/bin/sh\necho \"$1\" >> " + log + "\nexec " + real + " \"$@\"\n"
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return bin, log
}

func runsOf(t *testing.T, log, sub string) int {
	t.Helper()
	b, err := os.ReadFile(log)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return strings.Count(string(b), sub+"\n")
}

// TestLinkedCloneRunsNoQemuImg: a linked clone writes its overlay in Go
// and reads its base's info once per version of the base file; a base
// changed since (a new change time or inode) is read again, and a base
// changed within racyWindow is not cached.
func TestLinkedCloneRunsNoQemuImg(t *testing.T) {
	needQemuIO(t)
	ctx := t.Context()
	dir := storeDir(t, t.TempDir())
	bin, log := countingQemuImg(t)
	l := New("h1", WithQemuImg(qemuimg.New(qemuimg.WithBinary(bin))))
	base := filepath.Join(dir, "tmpl.qcow2")
	qcreate(t, base, "qcow2", 4<<20)
	qio(t, base, "qcow2", "write -P 0x33 0 512k")
	clone := func(name string) {
		t.Helper()
		if _, err := l.CloneImage(ctx, CloneRequest{Base: base, BaseFormat: drivers.FormatQCOW2, Dest: filepath.Join(dir, name), Mode: drivers.CloneLinked}, nil); err != nil {
			t.Fatal(err)
		}
		if !qemuCompare(t, base, "qcow2", filepath.Join(dir, name), "qcow2") {
			t.Fatalf("%s does not read as its base", name)
		}
	}
	// Just written: read every time (twice a clone: the base, then the
	// base as the new overlay's first layer).
	clone("fresh1.qcow2")
	clone("fresh2.qcow2")
	if n := runsOf(t, log, "info"); n != 4 {
		t.Errorf("clones of a base changed within %v ran qemu-img info %d times, want 4", racyWindow, n)
	}
	old := time.Now().Add(-time.Hour)
	if err := os.Chtimes(base, old, old); err != nil {
		t.Fatal(err)
	}
	time.Sleep(racyWindow + 100*time.Millisecond) // the change time of the Chtimes
	os.Truncate(log, 0)
	for _, name := range []string{"a.qcow2", "b.qcow2", "c.qcow2"} {
		clone(name)
	}
	if n := runsOf(t, log, "info"); n != 1 {
		t.Errorf("three clones of an unchanged base ran qemu-img info %d times, want 1", n)
	}
	if n := runsOf(t, log, "create"); n != 0 {
		t.Errorf("linked clones ran qemu-img create %d times", n)
	}
	// Rewritten in place: a new change time misses.
	qio(t, base, "qcow2", "write -P 0x44 1M 64k")
	time.Sleep(racyWindow + 100*time.Millisecond)
	os.Truncate(log, 0)
	clone("d.qcow2")
	clone("e.qcow2")
	if n := runsOf(t, log, "info"); n != 1 {
		t.Errorf("clones of a rewritten base ran qemu-img info %d times, want 1", n)
	}
	// Replaced by another file: a new inode misses, and the new base's
	// info is what the clone sees (a larger virtual size here).
	next := filepath.Join(dir, "next.qcow2")
	qcreate(t, next, "qcow2", 8<<20)
	if err := os.Chtimes(next, old, old); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(next, base); err != nil {
		t.Fatal(err)
	}
	os.Truncate(log, 0)
	info, err := l.CloneImage(ctx, CloneRequest{Base: base, BaseFormat: drivers.FormatQCOW2, Dest: filepath.Join(dir, "f.qcow2"), Mode: drivers.CloneLinked}, nil)
	if err != nil || info.VirtualSize != 8<<20 {
		t.Fatalf("clone of the replaced base: %+v %v", info, err)
	}
	if n := runsOf(t, log, "info"); n == 0 {
		t.Errorf("a replaced base's info came from the cache")
	}
}

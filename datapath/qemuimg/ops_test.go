package qemuimg

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/internal/envtest"
)

// qemuIO writes into an image with qemu-io, skipping when it is missing.
func qemuIO(t *testing.T, path, format, cmd string) {
	t.Helper()
	if _, err := exec.LookPath("qemu-io"); err != nil {
		envtest.Skipf(t, "qemu-io is not installed: %v", err)
	}
	if out, err := exec.Command("qemu-io", "-f", format, "-c", cmd, path).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io %s %q: %v: %s", path, cmd, err, out)
	}
}

func TestResize(t *testing.T) {
	q := needQemuImg(t)
	ctx := t.Context()
	for _, format := range []string{FormatRaw, FormatQCOW2} {
		p := filepath.Join(t.TempDir(), "img")
		if err := q.Create(ctx, p, format, 1<<20); err != nil {
			t.Fatal(err)
		}
		if err := q.Resize(ctx, p, format, 2<<20); err != nil {
			t.Fatalf("%s grow: %v", format, err)
		}
		if info, err := q.Info(ctx, p, AssumeFormat(format)); err != nil || info.VirtualSize != 2<<20 {
			t.Fatalf("%s after grow: %+v %v", format, info, err)
		}
		if err := q.Resize(ctx, p, format, 2<<20); err != nil {
			t.Fatalf("%s same size: %v", format, err)
		}
		if err := q.Resize(ctx, p, format, 1<<20); !errors.Is(err, errdefs.ErrInvalid) {
			t.Fatalf("%s shrink: err = %v, want ErrInvalid", format, err)
		}
		if err := q.Resize(ctx, p, format, 3<<20+1); !errors.Is(err, errdefs.ErrInvalid) {
			t.Fatalf("%s unaligned: err = %v, want ErrInvalid", format, err)
		}
	}
}

func TestRebaseAndCompare(t *testing.T) {
	q := needQemuImg(t)
	ctx := t.Context()
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	mid := filepath.Join(dir, "mid.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	if err := q.Create(ctx, base, FormatQCOW2, 1<<20); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, base, FormatQCOW2, "write -P 0x11 0 64k")
	if err := q.Create(ctx, mid, FormatQCOW2, 0, BackingFile(base, FormatQCOW2)); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, mid, FormatQCOW2, "write -P 0x22 64k 64k")
	if err := q.Create(ctx, top, FormatQCOW2, 0, BackingFile(mid, FormatQCOW2)); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, top, FormatQCOW2, "write -P 0x33 128k 64k")
	flat := filepath.Join(dir, "flat.raw")
	if err := q.Convert(ctx, top, flat, FormatRaw, SourceFormat(FormatQCOW2)); err != nil {
		t.Fatal(err)
	}
	if same, err := q.Compare(ctx, top, FormatQCOW2, base, FormatQCOW2); err != nil || same {
		t.Fatalf("compare top/base = %v, %v; want different", same, err)
	}
	// Drop mid from the chain: top now sits on base and reads the same.
	if err := q.Rebase(ctx, top, base, FormatQCOW2); err != nil {
		t.Fatal(err)
	}
	info, err := q.Info(ctx, top, AssumeFormat(FormatQCOW2))
	if err != nil || info.BackingFilename != base {
		t.Fatalf("after rebase: %+v %v", info, err)
	}
	if same, err := q.Compare(ctx, top, FormatQCOW2, flat, FormatRaw); err != nil || !same {
		t.Fatalf("compare after rebase = %v, %v; want identical", same, err)
	}
	// Standalone.
	if err := q.Rebase(ctx, top, "", ""); err != nil {
		t.Fatal(err)
	}
	if info, _ := q.Info(ctx, top, AssumeFormat(FormatQCOW2)); info.BackingFilename != "" {
		t.Fatalf("standalone rebase left backing %q", info.BackingFilename)
	}
	if same, err := q.Compare(ctx, top, FormatQCOW2, flat, FormatRaw); err != nil || !same {
		t.Fatalf("compare after standalone rebase = %v, %v", same, err)
	}
	if _, err := q.Compare(ctx, filepath.Join(dir, "missing"), FormatRaw, flat, FormatRaw); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("compare missing: %v", err)
	}
	if err := q.Rebase(ctx, top, base, ""); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("rebase without backing format: %v", err)
	}
}

func TestCheck(t *testing.T) {
	q := needQemuImg(t)
	ctx := t.Context()
	p := filepath.Join(t.TempDir(), "c.qcow2")
	if err := q.Create(ctx, p, FormatQCOW2, 1<<20); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, p, FormatQCOW2, "write -P 0x11 0 64k")
	r, err := q.Check(ctx, p, FormatQCOW2)
	if err != nil || !r.OK() {
		t.Fatalf("check clean image: %+v %v", r, err)
	}
	// Overwrite the refcount table offset with garbage: qemu-img reports errors or refuses.
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0, 0, 0, 0, 0, 0, 0, 0}, 48); err != nil {
		t.Fatal(err)
	}
	f.Close()
	r, err = q.Check(ctx, p, FormatQCOW2)
	if err == nil && r.OK() {
		t.Fatalf("check of a broken image: %+v, want not OK or an error", r)
	}
}

func TestConvertProgressAndDataFile(t *testing.T) {
	q := needQemuImg(t)
	ctx := t.Context()
	dir := t.TempDir()
	src := filepath.Join(dir, "src.qcow2")
	if err := q.Create(ctx, src, FormatQCOW2, 4<<20); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, src, FormatQCOW2, "write -P 0x11 0 1M")
	var mu sync.Mutex
	var got []float64
	err := q.Convert(ctx, src, filepath.Join(dir, "dst.raw"), FormatRaw, SourceFormat(FormatQCOW2),
		ConvertProgress(func(p float64) { mu.Lock(); got = append(got, p); mu.Unlock() }))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) == 0 || got[len(got)-1] != 100 {
		t.Fatalf("progress = %v, want it to end at 100", got)
	}
	// An external data file shows in Info.
	ext := filepath.Join(dir, "ext.qcow2")
	if out, err := exec.Command(DefaultBinary, "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "data.raw"), ext, "1M").CombinedOutput(); err != nil {
		t.Fatalf("create with data file: %v: %s", err, out)
	}
	info, err := q.Info(ctx, ext)
	if err != nil || info.DataFile != filepath.Join(dir, "data.raw") {
		t.Fatalf("info of an image with a data file: %+v %v", info, err)
	}
}

func TestCreateSkipBackingCheck(t *testing.T) {
	q := needQemuImg(t)
	ctx := t.Context()
	dir := t.TempDir()
	ovl := filepath.Join(dir, "ovl.qcow2")
	missing := filepath.Join(dir, "not-yet.qcow2")
	if err := q.Create(ctx, ovl, FormatQCOW2, 1<<20, BackingFile(missing, FormatQCOW2)); err == nil {
		t.Fatal("create on a missing backing file succeeded without SkipBackingCheck")
	}
	if err := q.Create(ctx, ovl, FormatQCOW2, 0, BackingFile(missing, FormatQCOW2), SkipBackingCheck()); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("unchecked backing without size: %v", err)
	}
	if err := q.Create(ctx, ovl, FormatQCOW2, 1<<20, BackingFile(missing, FormatQCOW2), SkipBackingCheck()); err != nil {
		t.Fatal(err)
	}
	info, err := q.Info(ctx, ovl, AssumeFormat(FormatQCOW2))
	if err != nil || info.BackingFilename != missing || info.VirtualSize != 1<<20 {
		t.Fatalf("overlay: %+v %v", info, err)
	}
}

package hostfs

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v: %s", args, err, out)
	}
}

// TestForeignFormats: vhd, vhdx and vmdk images are fetched as uploaded
// when they are what they are declared to be and hold their own data; an
// image of another format, a VMDK descriptor naming a separate extent file
// and a differencing VHD are refused as invalid and leave nothing. A full
// clone or a copy converts one to raw or qcow2 with qemu-img convert; a
// linked clone of one is refused, and so is a reflink to another format.
func TestForeignFormats(t *testing.T) {
	needQemuImg(t)
	ctx := context.Background()
	src := t.TempDir()
	raw := filepath.Join(src, "t.raw")
	data := make([]byte, 4<<20)
	for i := 1 << 20; i < 3<<20; i++ {
		data[i] = byte(i*7 + 1)
	}
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	qemuImg(t, "convert", "-q", "-f", "raw", "-O", "vpc", "-o", "force_size=on", raw, filepath.Join(src, "t.vhd"))
	qemuImg(t, "convert", "-q", "-f", "raw", "-O", "vhdx", raw, filepath.Join(src, "t.vhdx"))
	qemuImg(t, "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, filepath.Join(src, "so.vmdk"))
	qemuImg(t, "convert", "-q", "-f", "raw", "-O", "vmdk", raw, filepath.Join(src, "sparse.vmdk"))
	qemuImg(t, "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat", raw, filepath.Join(src, "flat.vmdk"))
	qemuImg(t, "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", raw, filepath.Join(src, "split.vmdk"))
	// A differencing VHD: a dynamic one whose footers say type 4.
	diff, err := os.ReadFile(filepath.Join(src, "t.vhd"))
	if err != nil {
		t.Fatal(err)
	}
	qemuImg(t, "convert", "-q", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", raw, filepath.Join(src, "dyn.vhd"))
	if diff, err = os.ReadFile(filepath.Join(src, "dyn.vhd")); err != nil {
		t.Fatal(err)
	}
	for _, off := range []int{0, len(diff) - 512} {
		if string(diff[off:off+8]) == vhdCookie {
			diff[off+63] = vhdDiffing
		}
	}
	if err := os.WriteFile(filepath.Join(src, "diff.vhd"), diff, 0o644); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.FileServer(http.Dir(src))) // loopback
	defer srv.Close()
	l := New("h1")
	dst := t.TempDir()

	for _, c := range []struct {
		file string
		f    drivers.Format
	}{{"t.vhd", drivers.FormatVHD}, {"dyn.vhd", drivers.FormatVHD}, {"t.vhdx", drivers.FormatVHDX}, {"so.vmdk", drivers.FormatVMDK}, {"sparse.vmdk", drivers.FormatVMDK}} {
		dest := filepath.Join(dst, c.file)
		info, err := l.FetchImage(ctx, FetchRequest{Source: srv.URL + "/" + c.file, Dest: dest, Format: c.f}, nil)
		if err != nil {
			t.Fatalf("fetch %s: %v", c.file, err)
		}
		if info.Format != c.f || info.VirtualSize < 4<<20 || info.BackingFile != "" {
			t.Errorf("fetch %s: %+v", c.file, info)
		}
		if a, _, _ := digest(t, dest); a != func() string { s, _, _ := digest(t, filepath.Join(src, c.file)); return s }() {
			t.Errorf("fetch %s: not kept as uploaded", c.file)
		}
		// Installed: converted to raw and qcow2, reading as the original.
		for _, out := range []drivers.Format{drivers.FormatRaw, drivers.FormatQCOW2} {
			cp := filepath.Join(dst, c.file+".copy."+string(out))
			ci, err := l.CopyImage(ctx, CopyRequest{Source: dest, SourceFormat: c.f, Dest: cp, Format: out}, nil)
			if err != nil || ci.Format != out || ci.Method != "qemu-img convert" {
				t.Fatalf("copy %s to %s: %+v %v", c.file, out, ci, err)
			}
			qemuImg(t, "compare", "-q", "-f", "raw", "-F", string(out), raw, cp)
			cl := filepath.Join(dst, c.file+".clone."+string(out))
			ki, err := l.CloneImage(ctx, CloneRequest{Base: dest, BaseFormat: c.f, Dest: cl, Mode: drivers.CloneFull, Format: out}, nil)
			if err != nil || ki.Format != out {
				t.Fatalf("full clone %s to %s: %+v %v", c.file, out, ki, err)
			}
			qemuImg(t, "compare", "-q", "-f", "raw", "-F", string(out), raw, cl)
		}
		if _, err := l.CloneImage(ctx, CloneRequest{Base: dest, BaseFormat: c.f, Dest: filepath.Join(dst, "x-linked"), Mode: drivers.CloneLinked}, nil); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("linked clone of %s: %v, want invalid", c.file, err)
		}
		if _, err := l.CloneImage(ctx, CloneRequest{Base: dest, BaseFormat: c.f, Dest: filepath.Join(dst, "x-reflink"), Mode: drivers.CloneReflink, Format: drivers.FormatRaw}, nil); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("reflink clone of %s to raw: %v, want invalid", c.file, err)
		}
		if _, err := l.CopyImage(ctx, CopyRequest{Source: raw, SourceFormat: drivers.FormatRaw, Dest: filepath.Join(dst, "x.conv"), Format: c.f}, nil); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("copy raw into %s: %v, want invalid", c.f, err)
		}
	}

	bad := t.TempDir()
	for _, c := range []struct {
		name, file string
		f          drivers.Format
		inText     string
	}{
		{"raw declared vhd", "t.raw", drivers.FormatVHD, "no VHD footer"},
		{"raw declared vhdx", "t.raw", drivers.FormatVHDX, "no VHDX signature"},
		{"raw declared vmdk", "t.raw", drivers.FormatVMDK, "sparse extent header"},
		{"vhd declared vhdx", "t.vhd", drivers.FormatVHDX, "VHDX signature"},
		{"vhdx declared vhd", "t.vhdx", drivers.FormatVHD, "VHD footer"},
		{"vmdk declared raw", "so.vmdk", drivers.FormatRaw, "vmdk"},
		{"vhd declared raw", "t.vhd", drivers.FormatRaw, "vpc"},
		{"flat vmdk", "flat.vmdk", drivers.FormatVMDK, "descriptor file"},
		{"split vmdk", "split.vmdk", drivers.FormatVMDK, "descriptor file"},
		{"differencing vhd", "diff.vhd", drivers.FormatVHD, "differencing"},
	} {
		_, err := l.FetchImage(ctx, FetchRequest{Source: srv.URL + "/" + c.file, Dest: filepath.Join(bad, "x.img"), Format: c.f}, nil)
		if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), c.inText) {
			t.Errorf("%s: err = %v, want invalid mentioning %q", c.name, err, c.inText)
		}
		onlyEntries(t, bad)
	}
}

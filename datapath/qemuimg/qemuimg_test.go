package qemuimg

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/internal/envtest"
)

// needQemuImg skips the test when qemu-img is not installed.
func needQemuImg(t *testing.T) *Tool {
	t.Helper()
	if _, err := exec.LookPath(DefaultBinary); err != nil {
		envtest.Skipf(t, "qemu-img is not installed (apt-get install qemu-utils): %v", err)
	}
	return New()
}

func TestVersion(t *testing.T) {
	q := needQemuImg(t)
	v, err := q.Version(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^[0-9]+\.[0-9]+(\.[0-9]+)*$`).MatchString(v) {
		t.Fatalf("Version = %q, want a dotted version", v)
	}
	if pv, err := Version(t.Context()); err != nil || pv != v {
		t.Fatalf("package Version = %q, %v; want %q", pv, err, v)
	}
}

func TestMissingBinaryIsUnavailable(t *testing.T) {
	for _, bin := range []string{"/nonexistent/qemu-img", "qemu-img-that-is-not-installed"} {
		_, err := New(WithBinary(bin)).Version(t.Context())
		if !errors.Is(err, errdefs.ErrUnavailable) {
			t.Errorf("Version with %s: err = %v, want ErrUnavailable", bin, err)
		}
		err = New(WithBinary(bin)).Create(t.Context(), filepath.Join(t.TempDir(), "x"), FormatRaw, 1<<20)
		if !errors.Is(err, errdefs.ErrUnavailable) {
			t.Errorf("Create with %s: err = %v, want ErrUnavailable", bin, err)
		}
	}
}

func TestNotQemuImgIsUnavailable(t *testing.T) {
	_, err := New(WithBinary("true")).Version(t.Context())
	if !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("Version of /bin/true: err = %v, want ErrUnavailable", err)
	}
}

func TestCreateRawIsSparse(t *testing.T) {
	q := needQemuImg(t)
	ctx := t.Context()
	p := filepath.Join(t.TempDir(), "v.raw")
	const size = 64<<20 + 7*SectorSize
	if err := q.Create(ctx, p, FormatRaw, size); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != size {
		t.Errorf("file size = %d, want %d", st.Size, size)
	}
	if alloc := st.Blocks * 512; alloc >= size/2 {
		t.Errorf("raw image allocates %d of %d bytes; want a sparse file", alloc, size)
	}
	info, err := q.Info(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if info.Format != FormatRaw || info.VirtualSize != size || info.DirtyFlag || info.BackingFilename != "" {
		t.Errorf("Info = %+v, want raw of %d bytes without backing file", info, size)
	}
}

func TestCreateQCOW2AndBackingChain(t *testing.T) {
	q := needQemuImg(t)
	ctx := t.Context()
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	const size = 10<<20 + SectorSize
	if err := q.Create(ctx, base, FormatQCOW2, size, ClusterSize(128<<10), Preallocation("metadata")); err != nil {
		t.Fatal(err)
	}
	info, err := q.Info(ctx, base, AssumeFormat(FormatQCOW2))
	if err != nil {
		t.Fatal(err)
	}
	if info.Format != FormatQCOW2 || info.VirtualSize != size || info.ClusterSize != 128<<10 || info.Corrupt {
		t.Errorf("base Info = %+v", info)
	}
	if info.ActualSize <= 0 {
		t.Errorf("base ActualSize = %d, want > 0", info.ActualSize)
	}

	// An overlay with a relative backing file takes the base's size.
	top := filepath.Join(dir, "top.qcow2")
	if err := q.Create(ctx, top, FormatQCOW2, 0, BackingFile("base.qcow2", FormatQCOW2)); err != nil {
		t.Fatal(err)
	}
	info, err = q.Info(ctx, top)
	if err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != size || info.BackingFilename != "base.qcow2" ||
		info.FullBackingFilename != base || info.BackingFormat != FormatQCOW2 {
		t.Errorf("overlay Info = %+v, want backing base.qcow2 -> %s of %d bytes", info, base, size)
	}
}

func TestCreateRefusesBadInput(t *testing.T) {
	q := needQemuImg(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "x")
	cases := []struct {
		name   string
		format string
		size   int64
		opts   []CreateOption
	}{
		{"unknown format", "vmdk2", 1 << 20, nil},
		{"iso", "iso", 1 << 20, nil},
		{"negative size", FormatRaw, -1, nil},
		{"zero size", FormatRaw, 0, nil},
		{"odd size", FormatRaw, 1000001, nil},
		{"backing on raw", FormatRaw, 1 << 20, []CreateOption{BackingFile("/b", FormatRaw)}},
		{"backing without format", FormatQCOW2, 1 << 20, []CreateOption{BackingFile("/b", "")}},
		{"comma in option", FormatQCOW2, 1 << 20, []CreateOption{Preallocation("off,cluster_size=512")}},
		// qemu-img itself refuses these.
		{"bad preallocation", FormatQCOW2, 1 << 20, []CreateOption{Preallocation("bogus")}},
		{"cluster size on raw", FormatRaw, 1 << 20, []CreateOption{ClusterSize(65536)}},
	}
	for _, c := range cases {
		err := q.Create(t.Context(), p, c.format, c.size, c.opts...)
		if !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%s: err = %v, want ErrInvalid", c.name, err)
		}
	}
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("refused creates left %s behind (stat err %v)", p, err)
	}
}

func TestCreateMissingDirIsNotFound(t *testing.T) {
	q := needQemuImg(t)
	err := q.Create(t.Context(), filepath.Join(t.TempDir(), "no", "such", "x.raw"), FormatRaw, 1<<20)
	if !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("err = %v, want ErrNotFound", err)
	}
	var qe *Error
	if !errors.As(err, &qe) || qe.Op != "create" || !strings.Contains(qe.Stderr, "No such file or directory") {
		t.Fatalf("err = %#v, want an *Error keeping qemu-img's stderr", err)
	}
	if strings.Contains(err.Error(), "qemu-img: ") {
		t.Errorf("message %q keeps qemu-img's prefix", err)
	}
}

func TestInfoErrors(t *testing.T) {
	q := needQemuImg(t)
	ctx := t.Context()
	dir := t.TempDir()
	if _, err := q.Info(ctx, filepath.Join(dir, "missing")); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Info of a missing file: err = %v, want ErrNotFound", err)
	}
	raw := filepath.Join(dir, "r.raw")
	if err := q.Create(ctx, raw, FormatRaw, 1<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := q.Info(ctx, raw, AssumeFormat(FormatQCOW2)); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("Info of raw as qcow2: err = %v, want ErrInvalid", err)
	}
	if _, err := q.Info(ctx, ""); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("Info of empty path: err = %v, want ErrInvalid", err)
	}
}

// A relative name that looks like a qemu protocol is still a plain file.
func TestRelativePathIsAFile(t *testing.T) {
	q := needQemuImg(t)
	dir := t.TempDir()
	t.Chdir(dir)
	for _, name := range []string{"nbd:localhost:1", "-v.raw"} {
		if err := q.Create(t.Context(), name, FormatRaw, 1<<20); err != nil {
			t.Fatalf("Create %q: %v", name, err)
		}
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Fatalf("Create %q did not write a file of that name: %v", name, err)
		}
		info, err := q.Info(t.Context(), name)
		if err != nil || info.VirtualSize != 1<<20 {
			t.Fatalf("Info %q = %+v, %v", name, info, err)
		}
	}
}

func TestCanceledContext(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err := New().Version(ctx)
	if !errors.Is(err, context.Canceled) || errdefs.Class(err) != context.Canceled {
		t.Fatalf("Version with a cancelled ctx: err = %v (class %v), want context.Canceled", err, errdefs.Class(err))
	}
}

// A qemu-img that hangs is killed when the context ends.
func TestDeadlineKillsProcess(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "slow-qemu-img")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\nexec sleep 30\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := New(WithBinary(bin)).Info(ctx, "/x")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("Info returned after %v; the process was not killed", d)
	}
}

func TestClassify(t *testing.T) {
	cases := map[string]error{
		"Could not open '/x': Could not open '/x': No such file or directory":                                errdefs.ErrNotFound,
		"Could not open '/x': Permission denied":                                                             errdefs.ErrPermissionDenied,
		"Could not open 'a.raw': Image is not in qcow2 format":                                               errdefs.ErrInvalid,
		"x: Unknown file format 'bogus'":                                                                     errdefs.ErrInvalid,
		"z.qcow2: Parameter 'preallocation' does not accept value 'bogus'":                                   errdefs.ErrInvalid,
		"Could not open '/x': Failed to get shared \"write\" lock; Is another process using the image [/x]?": errdefs.ErrFailedPrecondition,
		"/x: Could not resize image: No space left on device":                                                errdefs.ErrResourceExhausted,
		"something new": errdefs.ErrInternal,
	}
	for msg, want := range cases {
		if got := classify(msg); got != want {
			t.Errorf("classify(%q) = %v, want %v", msg, got, want)
		}
	}
}

// qemu-img info runs under an address-space and CPU limit when prlimit is
// installed, and still answers.
func TestInfoRunsLimited(t *testing.T) {
	if prlimit() == "" {
		envtest.Skip(t, "prlimit (util-linux) is not installed")
	}
	tool := New()
	cmd := tool.command(t.Context(), "info", []string{"info", "x"})
	if cmd.Path != prlimit() || !strings.Contains(strings.Join(cmd.Args, " "), "--as=1073741824 --cpu=30 -- ") {
		t.Fatalf("info command: %v", cmd.Args)
	}
	for _, op := range []string{"check"} {
		if c := tool.command(t.Context(), op, []string{op}); c.Path != prlimit() || !strings.Contains(strings.Join(c.Args, " "), "--as=1073741824 --cpu=30 -- ") {
			t.Errorf("%s command: %v", op, c.Args)
		}
	}
	// Copies are bounded in address space only: a CPU limit would kill a
	// long legitimate convert.
	for _, op := range []string{"convert", "compare", "map"} {
		c := tool.command(t.Context(), op, []string{op})
		if args := strings.Join(c.Args, " "); c.Path != prlimit() || !strings.Contains(args, "--as=4294967296 -- ") || strings.Contains(args, "--cpu") {
			t.Errorf("%s command: %v", op, c.Args)
		}
	}
	for _, op := range []string{"create", "resize", "rebase", "version"} {
		if c := tool.command(t.Context(), op, []string{op}); strings.Contains(c.Path, "prlimit") {
			t.Errorf("%s runs limited: %v", op, c.Args)
		}
	}
	if _, err := exec.LookPath(DefaultBinary); err != nil {
		t.Skip("no qemu-img")
	}
	p := filepath.Join(t.TempDir(), "a.qcow2")
	if err := tool.Create(t.Context(), p, FormatQCOW2, 1<<20); err != nil {
		t.Fatal(err)
	}
	if info, err := tool.Info(t.Context(), p, AssumeFormat(FormatQCOW2)); err != nil || info.VirtualSize != 1<<20 {
		t.Fatalf("limited info: %+v %v", info, err)
	}
	// The limited commands still do their work: check, a parallel
	// out-of-order convert, map and compare.
	if r, err := tool.Check(t.Context(), p, FormatQCOW2); err != nil || !r.OK() {
		t.Fatalf("limited check: %+v %v", r, err)
	}
	raw := filepath.Join(t.TempDir(), "a.raw")
	if err := tool.Convert(t.Context(), p, raw, FormatRaw, SourceFormat(FormatQCOW2), Parallel(16, true)); err != nil {
		t.Fatalf("limited convert: %v", err)
	}
	if _, err := tool.Map(t.Context(), p, FormatQCOW2); err != nil {
		t.Fatalf("limited map: %v", err)
	}
	if same, err := tool.Compare(t.Context(), p, FormatQCOW2, raw, FormatRaw); err != nil || !same {
		t.Fatalf("limited compare: %v %v", same, err)
	}
}

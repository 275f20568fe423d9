package agent

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

func TestImportDir(t *testing.T) {
	base := t.TempDir()
	policy, err := NewRootPolicy([]string{base}, filepath.Join(base, "agent"))
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(base, "import")
	outside := filepath.Join(base, "outside")
	for _, d := range []string{dir, filepath.Join(dir, "sub"), outside} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	write := func(p, s string) {
		if err := os.WriteFile(p, []byte(s), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(dir, "good.raw"), "image")
	write(filepath.Join(dir, "sub", "nested.raw"), "nested")
	write(filepath.Join(outside, "secret"), "secret")
	os.Symlink(filepath.Join(outside, "secret"), filepath.Join(dir, "link.raw"))
	os.Symlink("good.raw", filepath.Join(dir, "rel-link.raw")) // even one staying inside
	os.Symlink(outside, filepath.Join(dir, "outdir"))
	os.Symlink("/etc", filepath.Join(dir, "etc"))
	if err := os.Link(filepath.Join(outside, "secret"), filepath.Join(dir, "hard.raw")); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(dir, "fifo.raw"), 0o600); err != nil {
		t.Fatal(err)
	}

	d, err := NewImportDir(dir, policy)
	if err != nil {
		t.Fatal(err)
	}
	for rel, want := range map[string]string{"good.raw": "image", "sub/nested.raw": "nested"} {
		f, err := d.Open("file://" + filepath.Join(dir, rel))
		if err != nil {
			t.Fatalf("Open(%s): %v", rel, err)
		}
		b, _ := io.ReadAll(f)
		f.Close()
		if string(b) != want {
			t.Errorf("Open(%s) read %q", rel, b)
		}
	}
	for rel, why := range map[string]string{
		"link.raw": "symbolic link", "rel-link.raw": "symbolic link", "outdir/secret": "symbolic link",
		"etc/shadow": "symbolic link", "hard.raw": "hard links", "fifo.raw": "not a regular file", "sub": "not a regular file",
		"../outside/secret": `".."`,
	} {
		f, err := d.Open("file://" + dir + "/" + rel)
		if err == nil {
			f.Close()
		}
		if !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), hostops.ImportRule) || !strings.Contains(err.Error(), why) {
			t.Errorf("Open(%s) = %v, want permission denied naming the rule and %q", rel, err, why)
		}
	}
	if _, err := d.Open("file://" + filepath.Join(dir, "missing.raw")); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("missing file: %v, want not found", err)
	}
	none, _ := NewImportDir("", policy)
	if _, err := none.Open("file://" + filepath.Join(dir, "good.raw")); !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), "no --import-dir") {
		t.Errorf("no import dir: %v, want permission denied", err)
	}
	// The directory itself passes the store roots' policy.
	for _, bad := range []string{"/etc", "/", t.TempDir(), filepath.Join(base, "agent", "x")} {
		if _, err := NewImportDir(bad, policy); !errors.Is(err, errdefs.ErrPermissionDenied) && !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("NewImportDir(%s): %v, want refused", bad, err)
		}
	}
}

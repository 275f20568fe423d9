package durable

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// entries lists the names in dir.
func entries(t *testing.T, dir string) []string {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, de := range des {
		names = append(names, de.Name())
	}
	return names
}

func TestWriteFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	if err := WriteFile(p, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, p); got != "one" {
		t.Fatalf("content %q, want %q", got, "one")
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	// A second write replaces the first and leaves no temporary file.
	if err := WriteFile(p, []byte("two, longer"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, p); got != "two, longer" {
		t.Fatalf("content %q after replace", got)
	}
	if names := entries(t, dir); len(names) != 1 || names[0] != "state.json" {
		t.Errorf("directory holds %q, want only state.json", names)
	}
}

func TestWriteFileRelative(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	if err := WriteFile("rel", []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, filepath.Join(dir, "rel")); got != "x" {
		t.Fatalf("content %q", got)
	}
}

func TestWriteFileFailureLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	// The final name is a non-empty directory: the rename fails after the
	// temporary file was written, which must then be gone.
	p := filepath.Join(dir, "busy")
	if err := os.MkdirAll(filepath.Join(p, "child"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(p, []byte("x"), 0o644); err == nil {
		t.Fatal("WriteFile over a non-empty directory succeeded")
	}
	if names := entries(t, dir); len(names) != 1 || names[0] != "busy" {
		t.Errorf("directory holds %q after a failed write, want only busy", names)
	}
	// A missing directory is fs.ErrNotExist.
	err := WriteFile(filepath.Join(dir, "missing", "f"), nil, 0o644)
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("WriteFile in a missing directory: %v, want fs.ErrNotExist", err)
	}
}

func TestWriteNew(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	if err := WriteNew(p, []byte("first"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := WriteNew(p, []byte("second"), 0o644)
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("WriteNew over an existing file: %v, want fs.ErrExist", err)
	}
	if got := readFile(t, p); got != "first" {
		t.Errorf("existing file changed to %q", got)
	}
}

// TestPublishNew: the file appears whole with its permissions, an existing
// one is neither replaced nor changed, and no temporary name is left.
func TestPublishNew(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "ca.key")
	if err := PublishNew(p, []byte("first"), 0o600); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("published file: %v, %v", fi, err)
	}
	err := PublishNew(p, []byte("second"), 0o600)
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("PublishNew over an existing file: %v, want fs.ErrExist", err)
	}
	if got := readFile(t, p); got != "first" {
		t.Errorf("existing file changed to %q", got)
	}
	if names := entries(t, dir); len(names) != 1 {
		t.Errorf("directory holds %v, want only ca.key", names)
	}
}

func TestRenameNoReplace(t *testing.T) {
	testRenameNoReplace(t, RenameNoReplace)
}

// TestLinkUnlink runs the same checks on the fallback used where
// RENAME_NOREPLACE is missing, except the error's type (link's own).
func TestLinkUnlink(t *testing.T) {
	testRenameNoReplace(t, linkUnlink)
}

func testRenameNoReplace(t *testing.T, rename func(oldpath, newpath string) error) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	if err := os.WriteFile(a, []byte("a"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := rename(a, b); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(a); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old name still there after rename: %v", err)
	}
	if got := readFile(t, b); got != "a" {
		t.Errorf("new name holds %q", got)
	}

	// An existing target is fs.ErrExist and nothing moves.
	if err := os.WriteFile(a, []byte("again"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := rename(a, b)
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("rename onto an existing file: %v, want fs.ErrExist", err)
	}
	if got := readFile(t, a); got != "again" {
		t.Errorf("old name holds %q after a refused rename", got)
	}
	if got := readFile(t, b); got != "a" {
		t.Errorf("existing target replaced: holds %q", got)
	}

	// A missing source is fs.ErrNotExist.
	err = rename(filepath.Join(dir, "missing"), filepath.Join(dir, "c"))
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("rename of a missing file: %v, want fs.ErrNotExist", err)
	}
	var le *os.LinkError
	if !errors.As(err, &le) {
		t.Errorf("rename of a missing file: %#v, want an *os.LinkError", err)
	}
}

func TestSync(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := SyncFile(p); err != nil {
		t.Errorf("SyncFile: %v", err)
	}
	if err := SyncDir(dir); err != nil {
		t.Errorf("SyncDir: %v", err)
	}
	err := SyncDir(filepath.Join(dir, "missing"))
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "missing") {
		t.Errorf("SyncDir of a missing directory: %v, want fs.ErrNotExist naming it", err)
	}
}

// WriteNew never writes through a symbolic link planted at its path.
func TestWriteNewRefusesSymlink(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	if err := os.WriteFile(target, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := WriteNew(link, []byte("evil"), 0o600); err == nil {
		t.Fatal("WriteNew wrote through a symlink")
	}
	if b, _ := os.ReadFile(target); string(b) != "keep" {
		t.Fatalf("the link's target was changed: %q", b)
	}
}

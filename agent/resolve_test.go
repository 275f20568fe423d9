package agent

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

func TestCheckKey(t *testing.T) {
	for _, k := range []string{"a", "volumes/v.raw", "snapshots/v1/s1.qcow2", "a.b/c..d", ".hidden"} {
		if err := CheckKey(k); err != nil {
			t.Errorf("CheckKey(%q): %v", k, err)
		}
	}
	for _, k := range []string{"", ".", "/", "/etc/hostname", "..", "../x", "a/../b", "a/..", "../../etc/hostname",
		"a//b", "a/", "./a", "a/./b", "a\x00b", hostfs.MarkerFile, "v/" + hostfs.MarkerFile, hostfs.TempPrefix + "1",
		"v/." + hostfs.TempPrefix + "x.stowage-ckpt", strings.Repeat("a", 4097)} {
		if err := CheckKey(k); !errors.Is(err, errdefs.ErrPermissionDenied) {
			t.Errorf("CheckKey(%q) = %v, want permission denied", k, err)
		}
	}
}

// resolverRig is a Resolver serving store s1 at <base>/s1, with links out
// of it, and a directory outside.
func resolverRig(t *testing.T) (r *Resolver, base, store, outside string) {
	t.Helper()
	base = t.TempDir()
	store = filepath.Join(base, "s1")
	outside = t.TempDir()
	for _, d := range []string{"volumes/sub", "templates"} {
		if err := os.MkdirAll(filepath.Join(store, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(store, "volumes", "v.raw"), []byte("v"), 0o644)
	os.WriteFile(filepath.Join(store, "volumes", "file"), []byte("f"), 0o644)
	os.WriteFile(filepath.Join(outside, "secret"), []byte("s"), 0o644)
	for link, target := range map[string]string{
		"volumes/out":   outside,                                  // a directory out
		"volumes/sec":   filepath.Join(outside, "secret"),         // a file out
		"volumes/in":    filepath.Join(store, "volumes", "v.raw"), // a file in: no links at all
		"volumes/rel":   "../../" + filepath.Base(base) + "/s1/volumes/v.raw",
		"volumes/dang":  filepath.Join(outside, "missing"), // dangling
		"templates/etc": "/etc",
	} {
		if err := os.Symlink(target, filepath.Join(store, link)); err != nil {
			t.Fatal(err)
		}
	}
	policy, err := NewRootPolicy([]string{base})
	if err != nil {
		t.Fatal(err)
	}
	r = NewResolver(policy, nil)
	r.Serve("s1", store)
	return r, base, store, outside
}

func TestResolver(t *testing.T) {
	r, _, store, _ := resolverRig(t)
	s1 := func(key string) hostops.Ref { return hostops.Ref{Store: "s1", Key: key} }
	for _, c := range []struct {
		ref  hostops.Ref
		use  Use
		want string // path, or "" with err
		err  error
	}{
		{s1("volumes/v.raw"), UseObject, "volumes/v.raw", nil},
		{s1("volumes/new.raw"), UseObject, "volumes/new.raw", nil},             // to be created
		{s1("snapshots/v1/s1.qcow2"), UseObject, "snapshots/v1/s1.qcow2", nil}, // directories to be created
		{s1("volumes/sub"), UseSource, "volumes/sub", nil},
		{s1("volumes/out"), UseObject, "", errdefs.ErrPermissionDenied},
		{s1("volumes/out/secret"), UseObject, "", errdefs.ErrPermissionDenied},
		{s1("volumes/out/new/x"), UseObject, "", errdefs.ErrPermissionDenied},
		{s1("volumes/sec"), UseSource, "", errdefs.ErrPermissionDenied},
		{s1("volumes/in"), UseSource, "", errdefs.ErrPermissionDenied},
		{s1("volumes/rel"), UseSource, "", errdefs.ErrPermissionDenied},
		{s1("volumes/dang"), UseObject, "", errdefs.ErrPermissionDenied},
		{s1("templates/etc/hostname"), UseSource, "", errdefs.ErrPermissionDenied},
		{s1("../s1/volumes/v.raw"), UseSource, "", errdefs.ErrPermissionDenied},
		{s1(store + "/volumes/v.raw"), UseSource, "", errdefs.ErrPermissionDenied},
		{s1("volumes/file/x"), UseObject, "", errdefs.ErrFailedPrecondition},
		{hostops.Ref{Store: "s2", Key: "volumes/v.raw"}, UseSource, "", errdefs.ErrPermissionDenied},
		{hostops.Ref{Store: "", Key: "volumes/v.raw"}, UseSource, "", errdefs.ErrPermissionDenied},
		{hostops.Ref{Store: hostops.TemplateMount, Key: "t1"}, UseObject, "", errdefs.ErrPermissionDenied},
		{hostops.Ref{Store: hostops.TemplateMount, Key: "t1"}, UseSource, "", errdefs.ErrFailedPrecondition}, // no mount known
	} {
		got, err := r.Resolve(c.ref, c.use)
		if c.err != nil {
			if !errors.Is(err, c.err) {
				t.Errorf("Resolve(%v, %d) = %q, %v; want %v", c.ref, c.use, got, err, c.err)
			}
			continue
		}
		if err != nil || got != filepath.Join(store, c.want) {
			t.Errorf("Resolve(%v, %d) = %q, %v; want %s", c.ref, c.use, got, err, c.want)
		}
	}

	// The template mount: one level of template ids, read only.
	mount := t.TempDir()
	os.WriteFile(filepath.Join(mount, "t1"), []byte("t"), 0o444)
	os.Symlink("/etc/hostname", filepath.Join(mount, "t2"))
	r.SetTemplateMount(mount)
	tm := func(key string) hostops.Ref { return hostops.Ref{Store: hostops.TemplateMount, Key: key} }
	if got, err := r.Resolve(tm("t1"), UseSource); err != nil || got != filepath.Join(mount, "t1") {
		t.Errorf("template t1: %q %v", got, err)
	}
	for _, k := range []string{"t2", "a/b", "../t1", "/t1", ""} {
		if got, err := r.Resolve(tm(k), UseSource); !errors.Is(err, errdefs.ErrPermissionDenied) {
			t.Errorf("template %q: %q %v", k, got, err)
		}
	}

	// Released: nothing of the store resolves any more.
	r.Forget("s1", "/elsewhere") // another root: kept
	if _, err := r.Resolve(s1("volumes/v.raw"), UseSource); err != nil {
		t.Fatal(err)
	}
	r.Forget("s1", store)
	if _, err := r.Resolve(s1("volumes/v.raw"), UseSource); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("forgotten store: %v", err)
	}
}

// The walk used where openat2 is missing (old kernels, seccomp filters)
// refuses what openat2 refuses.
func TestWalkBeneathMatchesOpenat2(t *testing.T) {
	_, _, store, _ := resolverRig(t)
	rfd, err := unix.Open(store, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(rfd)
	for _, c := range []struct {
		rel   string
		flags int
	}{
		{".", unix.O_DIRECTORY}, {"volumes", unix.O_DIRECTORY}, {"volumes/v.raw", 0}, {"volumes/v.raw", unix.O_DIRECTORY},
		{"volumes/out", 0}, {"volumes/out/secret", 0}, {"volumes/sec", 0}, {"volumes/in", 0}, {"volumes/dang", 0},
		{"volumes/missing", 0}, {"volumes/file/x", 0}, {"templates/etc/hostname", 0}, {"volumes/sub", unix.O_DIRECTORY},
	} {
		fd1, err1 := openBeneath(rfd, c.rel, c.flags)
		fd2, err2 := walkBeneath(rfd, c.rel, c.flags)
		for _, fd := range []int{fd1, fd2} {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
		if err1 != err2 {
			t.Errorf("%s (flags %#x): openat2 %v, walk %v", c.rel, c.flags, err1, err2)
		}
	}
}

func TestRootPolicy(t *testing.T) {
	for _, bad := range [][]string{{"/"}, {"/etc"}, {"/usr/local"}, {"/lib64"}, {"/libexec/x"}, {"relative"}, {}} {
		if _, err := NewRootPolicy(bad); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("NewRootPolicy(%q): %v", bad, err)
		}
	}
	base := t.TempDir()
	state := filepath.Join(base, "agent")
	p, err := NewRootPolicy([]string{base, "/srv"}, state)
	if err != nil {
		t.Fatal(err)
	}
	os.Symlink("/etc", filepath.Join(base, "etc"))
	os.Symlink(t.TempDir(), filepath.Join(base, "elsewhere"))
	linked := filepath.Join(t.TempDir(), "data")
	os.Symlink(base, linked)
	for _, ok := range []string{filepath.Join(base, "p1"), filepath.Join(base, "a", "b"), "/srv/p1"} {
		if err := p.Check(ok, ok); err != nil {
			t.Errorf("Check(%s): %v", ok, err)
		}
	}
	for _, c := range []struct {
		path string
		want error
	}{
		{"/etc", errdefs.ErrPermissionDenied},
		{"/etc/stowage", errdefs.ErrPermissionDenied},
		{"/", errdefs.ErrPermissionDenied},
		{"/proc/1", errdefs.ErrPermissionDenied},
		{"/sys/x", errdefs.ErrPermissionDenied},
		{"/dev/shm", errdefs.ErrPermissionDenied},
		{"/boot/x", errdefs.ErrPermissionDenied},
		{"/usr/share/x", errdefs.ErrPermissionDenied},
		{"/lib/x", errdefs.ErrPermissionDenied},
		{"/lib32", errdefs.ErrPermissionDenied},
		{"/var/lib/other", errdefs.ErrPermissionDenied},
		{"/srv", nil},
		{filepath.Dir(base), errdefs.ErrPermissionDenied},
		{state, errdefs.ErrPermissionDenied},
		{filepath.Join(state, "tasks"), errdefs.ErrPermissionDenied},
		{filepath.Join(base, "etc"), errdefs.ErrPermissionDenied},            // a link to /etc
		{filepath.Join(base, "etc", "stowage"), errdefs.ErrPermissionDenied}, // through it
		{filepath.Join(base, "elsewhere", "p"), errdefs.ErrPermissionDenied}, // a link out of the allowed roots
		{filepath.Join(linked, "p1"), errdefs.ErrPermissionDenied},           // not beneath an allowed root as named
		{"rel/p", errdefs.ErrInvalid},
		{base + "/../x", errdefs.ErrInvalid},
		{"", errdefs.ErrInvalid},
	} {
		if err := p.Check(c.path, c.path); !errors.Is(err, c.want) && (c.want != nil || err != nil) {
			t.Errorf("Check(%q) = %v, want %v", c.path, err, c.want)
		}
	}

	// Store roots of two stores never overlap.
	r := NewResolver(p, nil)
	r.Serve("s1", filepath.Join(base, "s1"))
	for _, c := range []struct {
		id, root string
		want     error
	}{
		{"s1", filepath.Join(base, "s1"), nil},
		{"s2", filepath.Join(base, "s2"), nil},
		{"s2", filepath.Join(base, "s1", "inner"), errdefs.ErrFailedPrecondition},
		{"s2", base, errdefs.ErrPermissionDenied}, // holds the agent's state
		{"s2", filepath.Join(base, "s1"), errdefs.ErrFailedPrecondition},
	} {
		if err := r.CheckRoot(c.id, c.root); !errors.Is(err, c.want) && (c.want != nil || err != nil) {
			t.Errorf("CheckRoot(%s, %s) = %v, want %v", c.id, c.root, err, c.want)
		}
	}
}

package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/stowage/stowage/errdefs"
)

// DefaultStoreRoots are the directories store roots may lie in when the
// agent is given none (--store-roots).
var DefaultStoreRoots = []string{"/var/lib/stowage", "/srv", "/mnt", "/data"}

// systemDirs are never a store root nor inside one, whatever the
// configuration says: the host's own files. Any top-level directory whose
// name starts with "lib" (lib, lib32, lib64, libx32) is one too.
var systemDirs = []string{"/etc", "/proc", "/sys", "/dev", "/boot", "/usr", "/bin", "/sbin"}

// RootPolicy decides which directories an agent accepts as store roots
// (PrepareStore, ProbeStore, ReleaseStore, the controller's store
// assignments): a root must be one of the allowed directories or lie
// beneath one, must not be a system directory (/, /etc, /proc, /sys, /dev,
// /boot, /usr, /bin, /sbin, /lib*) or lie beneath one, and must neither
// contain nor lie in a reserved directory (the agent's own state, and in
// `stowage dev` the controller's database). The rule holds for the path as
// given and, where it exists, for the path with its symbolic links
// resolved. Anything else is errdefs.ErrPermissionDenied.
type RootPolicy struct {
	allowed  []string
	reserved []string
}

// NewRootPolicy returns the policy for allowed store roots and reserved
// directories (absolute paths; "" entries are skipped). An allowed root that
// is relative, "/" or a system directory is errdefs.ErrInvalid: the agent
// refuses to start rather than silently ignore it.
func NewRootPolicy(allowed []string, reserved ...string) (*RootPolicy, error) {
	p := &RootPolicy{}
	for _, a := range allowed {
		a = strings.TrimSpace(a)
		if a == "" {
			continue
		}
		if !filepath.IsAbs(a) {
			return nil, fmt.Errorf("store root %q is not an absolute path: %w", a, errdefs.ErrInvalid)
		}
		a = filepath.Clean(a)
		if isSystemDir(a) {
			return nil, fmt.Errorf("store root %s is / or a system directory (/etc, /proc, /sys, /dev, /boot, /usr, /bin, /sbin, /lib*), never allowed: %w", a, errdefs.ErrInvalid)
		}
		p.allowed = append(p.allowed, a)
	}
	if len(p.allowed) == 0 {
		return nil, fmt.Errorf("no store roots allowed (--store-roots): %w", errdefs.ErrInvalid)
	}
	for _, r := range reserved {
		if r == "" {
			continue
		}
		if abs, err := filepath.Abs(r); err == nil {
			p.reserved = append(p.reserved, abs)
		}
	}
	return p, nil
}

// Allowed returns the allowed store roots.
func (p *RootPolicy) Allowed() []string { return append([]string(nil), p.allowed...) }

// Check decides whether the directory path may be a store root. onHost is
// where path lies on this machine (path itself, except under
// hostfs.WithRoot, a test device: then only the path as given is checked).
func (p *RootPolicy) Check(path, onHost string) error {
	switch {
	case path == "":
		return fmt.Errorf("empty store root: %w", errdefs.ErrInvalid)
	case strings.IndexByte(path, 0) >= 0 || !filepath.IsAbs(path) || filepath.Clean(path) != path:
		return fmt.Errorf("store root %q is not an absolute clean path: %w", path, errdefs.ErrInvalid)
	}
	if err := p.check(path, p.allowed); err != nil {
		return err
	}
	if onHost != path {
		return nil
	}
	real, err := resolveExisting(path)
	if errors.Is(err, syscall.ENOTDIR) {
		return fmt.Errorf("store root %s: a file is in the way: %w", path, errors.Join(err, errdefs.ErrFailedPrecondition))
	}
	if err != nil {
		return fmt.Errorf("store root %s: %w", path, errors.Join(err, errdefs.ErrPermissionDenied))
	}
	if real == path {
		return nil
	}
	// Through a symbolic link: the real place must be allowed too (an
	// allowed root may itself be a link, say /data -> /mnt/disk1).
	allowed := make([]string, 0, 2*len(p.allowed))
	for _, a := range p.allowed {
		allowed = append(allowed, a)
		if r, err := resolveExisting(a); err == nil && r != a {
			allowed = append(allowed, r)
		}
	}
	if err := p.check(real, allowed); err != nil {
		return fmt.Errorf("store root %s resolves to %s: %w", path, real, err)
	}
	return nil
}

func (p *RootPolicy) check(path string, allowed []string) error {
	if isSystemDir(path) {
		return fmt.Errorf("%s is / or a system directory (/etc, /proc, /sys, /dev, /boot, /usr, /bin, /sbin, /lib*), never a store root: %w", path, errdefs.ErrPermissionDenied)
	}
	ok := false
	for _, a := range allowed {
		ok = ok || path == a || within(path, a)
	}
	if !ok {
		return fmt.Errorf("%s is not beneath an allowed store root (%s; the agent's --store-roots): %w",
			path, strings.Join(p.allowed, ", "), errdefs.ErrPermissionDenied)
	}
	for _, r := range p.reserved {
		if path == r || within(path, r) || within(r, path) {
			return fmt.Errorf("%s overlaps %s, which Stowage keeps its own state in: %w", path, r, errdefs.ErrPermissionDenied)
		}
	}
	return nil
}

// isSystemDir reports whether the absolute clean path p is "/" or lies in
// (or is) a system directory.
func isSystemDir(p string) bool {
	if p == "/" {
		return true
	}
	for _, s := range systemDirs {
		if p == s || within(p, s) {
			return true
		}
	}
	first, _, _ := strings.Cut(strings.TrimPrefix(p, "/"), "/")
	return strings.HasPrefix(first, "lib")
}

// within reports whether p is strictly below dir (both absolute and clean).
func within(p, dir string) bool {
	if dir == "/" {
		return p != "/"
	}
	return strings.HasPrefix(p, dir+"/")
}

// resolveExisting resolves the symbolic links of the longest existing
// prefix of the absolute path p and appends the rest.
func resolveExisting(p string) (string, error) {
	rest := ""
	for d := p; ; d = filepath.Dir(d) {
		real, err := filepath.EvalSymlinks(d)
		if err == nil {
			return filepath.Join(real, rest), nil
		}
		if !errors.Is(err, fs.ErrNotExist) || d == "/" {
			return "", err
		}
		rest = filepath.Join(filepath.Base(d), rest)
	}
}

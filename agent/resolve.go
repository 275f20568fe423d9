package agent

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// Use is what a step does with the object a Ref names.
type Use int

const (
	// UseObject reads or writes an object of a store the agent serves.
	UseObject Use = iota
	// UseSource only reads the object: it may also be a template of the
	// host's template mount (hostops.TemplateMount), the base of a clone or
	// the source of a copy, an inspection or a stat.
	UseSource
)

// Resolver turns the Refs of the wire into paths on this host. It knows
// the roots of the stores the agent serves (store id -> directory, learned
// from PrepareStore and ProbeStore once hostfs found the store's marker
// there, and from the controller's store assignments the same way) and the
// host's template mount.
//
// A Ref resolves only beneath its store's root. The key must be a relative,
// clean path of at most 4096 bytes: not empty, not ".", no ".." component,
// no NUL byte, no component that is the store marker or a temporary name
// (hostfs.MarkerFile, hostfs.TempPrefix). Then, from a descriptor of the
// store's root, openat2(2) with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|
// RESOLVE_NO_MAGICLINKS (O_PATH, nothing is opened for reading or
// writing) checks that the key's deepest existing directory, and the key
// itself when it exists, are reached without leaving the root and without
// following any symbolic link. Kernels without openat2 get the same walk
// one component at a time with O_NOFOLLOW. An unknown store, a bad key or
// a key that escapes is errdefs.ErrPermissionDenied, before anything is
// read or written.
//
// What is left: the check and the step's own path-based work (agent/hostfs)
// are two system calls apart, so a process of this host that can write
// inside a store could swap a checked directory for a symbolic link in
// between. Requests from the wire cannot: they create no links. Closing
// that window means hostfs working from the descriptors this check opens.
type Resolver struct {
	policy *RootPolicy
	onHost func(string) string

	mu     sync.RWMutex
	stores map[string]string // store id -> root, as hostfs names it
	mount  string            // the template mount ("" when unknown)
}

// NewResolver returns a Resolver serving no store yet. onHost maps a path
// as hostfs is given it to the path on this machine
// ((*hostfs.Local).OnHost; nil: the identity).
func NewResolver(policy *RootPolicy, onHost func(string) string) *Resolver {
	if onHost == nil {
		onHost = func(p string) string { return p }
	}
	return &Resolver{policy: policy, onHost: onHost, stores: map[string]string{}}
}

// Policy is the rule store roots must follow.
func (r *Resolver) Policy() *RootPolicy { return r.policy }

// CheckRoot decides whether root may become (or stay) the root of store
// id: the policy (errdefs.ErrPermissionDenied), and no overlap with the
// root of another store the agent serves (errdefs.ErrFailedPrecondition),
// which would let one store's keys reach the other's objects.
func (r *Resolver) CheckRoot(id, root string) error {
	if err := r.policy.Check(root, r.onHost(root)); err != nil {
		return err
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	for other, dir := range r.stores {
		if other != id && dir == root {
			return fmt.Errorf("directory %s belongs to store %s: %w", root, other, errdefs.ErrFailedPrecondition)
		}
		if other != id && (within(dir, root) || within(root, dir)) {
			return fmt.Errorf("store root %s overlaps %s, the root of store %s: %w", root, dir, other, errdefs.ErrFailedPrecondition)
		}
	}
	return nil
}

// Serve records root as the directory of store id (after hostfs found the
// store's marker there). A later root for the same id replaces it.
func (r *Resolver) Serve(id, root string) {
	r.mu.Lock()
	r.stores[id] = root
	r.mu.Unlock()
}

// Forget stops serving store id at root (released); another root recorded
// for the id meanwhile stays.
func (r *Resolver) Forget(id, root string) {
	r.mu.Lock()
	if r.stores[id] == root {
		delete(r.stores, id)
	}
	r.mu.Unlock()
}

// Stores returns the stores served, id -> root.
func (r *Resolver) Stores() map[string]string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make(map[string]string, len(r.stores))
	for id, dir := range r.stores {
		out[id] = dir
	}
	return out
}

// SetTemplateMount records the host's template mount ("" for none).
func (r *Resolver) SetTemplateMount(dir string) {
	if dir != "" {
		dir = filepath.Clean(dir)
	}
	r.mu.Lock()
	r.mount = dir
	r.mu.Unlock()
}

// Resolve returns the path (as hostfs is given it) of the object ref
// names, checked as the type's doc says. Only UseSource may name the
// template mount.
func (r *Resolver) Resolve(ref hostops.Ref, use Use) (string, error) {
	p, err := r.resolve(ref, use)
	if err != nil {
		return "", fmt.Errorf("%s: %w", ref, err)
	}
	return p, nil
}

func (r *Resolver) resolve(ref hostops.Ref, use Use) (string, error) {
	r.mu.RLock()
	root, ok := r.stores[ref.Store]
	mount := r.mount
	r.mu.RUnlock()
	if ref.Store == hostops.TemplateMount {
		if use != UseSource {
			return "", fmt.Errorf("the template mount is read-only: only the base of a clone or the source of a read may name it: %w", errdefs.ErrPermissionDenied)
		}
		if err := CheckKey(ref.Key); err != nil {
			return "", err
		}
		if strings.Contains(ref.Key, "/") {
			return "", fmt.Errorf("a template mount key is a template id, not a path: %w", errdefs.ErrPermissionDenied)
		}
		if mount == "" {
			return "", fmt.Errorf("this host reports no template mount: %w", errdefs.ErrFailedPrecondition)
		}
		root = mount
	} else if !ok {
		return "", fmt.Errorf("store %q is not served by this agent (never prepared, probed or assigned here): %w", ref.Store, errdefs.ErrPermissionDenied)
	}
	if err := CheckKey(ref.Key); err != nil {
		return "", err
	}
	if err := beneath(r.onHost(root), ref.Key); err != nil {
		return "", err
	}
	return filepath.Join(root, ref.Key), nil
}

// CheckKey enforces the lexical rules on an object key (see Resolver).
func CheckKey(key string) error {
	bad := func(why string) error {
		return fmt.Errorf("key %q %s: %w", key, why, errdefs.ErrPermissionDenied)
	}
	switch {
	case key == "" || key == ".":
		return bad("names no object")
	case len(key) > 4096:
		return bad("is longer than 4096 bytes")
	case strings.IndexByte(key, 0) >= 0:
		return bad("contains a NUL byte")
	case filepath.IsAbs(key):
		return bad("is absolute; keys are relative to their store's root")
	case !filepath.IsLocal(key):
		return bad("leaves its store")
	case filepath.Clean(key) != key:
		return bad("is not clean")
	}
	for _, c := range strings.Split(key, "/") {
		if c == hostfs.MarkerFile || strings.HasPrefix(c, hostfs.TempPrefix) || strings.HasPrefix(c, "."+hostfs.TempPrefix) {
			return bad("uses a name reserved by Stowage")
		}
	}
	return nil
}

// beneath checks, from a descriptor of root (a directory on this machine),
// that key's deepest existing directory and key itself (when it exists)
// are reached without leaving root or following a symbolic link.
func beneath(root, key string) error {
	rfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("store root %s: %w", root, errors.Join(err, classOf(err)))
	}
	defer unix.Close(rfd)
	dir := filepath.Dir(key)
	for {
		fd, err := openBeneath(rfd, dir, unix.O_DIRECTORY)
		if err == nil {
			unix.Close(fd)
			break
		}
		if err == unix.ENOENT && dir != "." {
			dir = filepath.Dir(dir) // to be created inside the store by the step
			continue
		}
		return keyError(key, err)
	}
	if dir != filepath.Dir(key) {
		return nil // the leaf's directory is missing: so is the leaf
	}
	fd, err := openBeneath(rfd, key, 0)
	if err == unix.ENOENT {
		return nil
	}
	if err != nil {
		return keyError(key, err)
	}
	unix.Close(fd)
	return nil
}

// openBeneath opens rel (O_PATH, plus flags) beneath the directory rfd
// without following symbolic links.
func openBeneath(rfd int, rel string, flags int) (int, error) {
	how := unix.OpenHow{
		Flags:   uint64(unix.O_PATH | unix.O_CLOEXEC | flags),
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	}
	for range 8 {
		fd, err := unix.Openat2(rfd, rel, &how)
		switch err {
		case unix.EINTR, unix.EAGAIN: // a concurrent rename somewhere: try again
			continue
		case unix.ENOSYS, unix.EPERM: // no openat2 (old kernel, or a seccomp filter)
			if err == unix.EPERM && probeOpenat2() {
				return -1, err
			}
			return walkBeneath(rfd, rel, flags)
		}
		return fd, err
	}
	return -1, unix.EAGAIN
}

var (
	openat2Once sync.Once
	openat2OK   bool
)

// probeOpenat2 reports whether openat2 works at all here (a seccomp filter
// may answer EPERM instead of ENOSYS).
func probeOpenat2() bool {
	openat2Once.Do(func() {
		fd, err := unix.Openat2(unix.AT_FDCWD, "/", &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC})
		if err == nil {
			unix.Close(fd)
		}
		openat2OK = err == nil
	})
	return openat2OK
}

// walkBeneath is openBeneath without openat2: one component at a time,
// O_NOFOLLOW, refusing symbolic links (keys have no ".." by then).
func walkBeneath(rfd int, rel string, flags int) (int, error) {
	cur, err := unix.Dup(rfd)
	if err != nil {
		return -1, err
	}
	if rel == "." {
		return cur, nil
	}
	parts := strings.Split(rel, "/")
	for i, c := range parts {
		fd, err := unix.Openat(cur, c, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		unix.Close(cur)
		if err != nil {
			return -1, err
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			unix.Close(fd)
			return -1, err
		}
		last := i == len(parts)-1
		switch {
		case st.Mode&unix.S_IFMT == unix.S_IFLNK:
			unix.Close(fd)
			return -1, unix.ELOOP
		case (!last || flags&unix.O_DIRECTORY != 0) && st.Mode&unix.S_IFMT != unix.S_IFDIR:
			unix.Close(fd)
			return -1, unix.ENOTDIR
		}
		cur = fd
	}
	return cur, nil
}

// keyError classes a failed check of key.
func keyError(key string, err error) error {
	switch err {
	case unix.ELOOP, unix.EXDEV:
		return fmt.Errorf("key %q goes through a symbolic link or leaves its store: %w", key, errdefs.ErrPermissionDenied)
	case unix.ENOTDIR:
		return fmt.Errorf("key %q: a component is not a directory: %w", key, errdefs.ErrFailedPrecondition)
	}
	return fmt.Errorf("key %q: %w", key, errors.Join(err, classOf(err)))
}

// classOf is the errdefs class of an errno met while checking a key.
func classOf(err error) error {
	switch err {
	case unix.ENOENT:
		return errdefs.ErrFailedPrecondition // a store root that is gone (not mounted?)
	case unix.EACCES, unix.EPERM:
		return errdefs.ErrPermissionDenied
	case unix.EIO, unix.ESTALE, unix.ETIMEDOUT, unix.ENOTCONN, unix.EHOSTDOWN:
		return errdefs.ErrUnavailable
	case unix.ENOTDIR:
		return errdefs.ErrFailedPrecondition
	}
	return errdefs.ErrInternal
}

package agent

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	"github.com/stowage/stowage/redact"
)

// ImportDir is the directory file:// template and ISO URLs are read from
// (the agent's --import-dir). An agent without one refuses every file://
// task with errdefs.ErrPermissionDenied.
//
// A URL passes hostops.ImportPath (the same lexical rule the controller
// applies at registration: absolute, no "." or "..", no NUL, beneath the
// directory); then the file is opened from a descriptor of the directory
// with openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS)
// (the Resolver's openBeneath, also for kernels without openat2), so a
// symbolic link inside the directory pointing to /etc/shadow, or anywhere
// else, is refused. It must be a regular file with a single link: a hard
// link is another name of a file that may lie outside the directory. The
// descriptor checked is the one read (reopened through /proc/self/fd, which
// names the same open file, not the path again).
type ImportDir struct {
	dir string // "" for none
}

// NewImportDir returns the import directory dir ("" for none), which must
// pass policy as a store root would (never /, /etc, /proc, ..., nor the
// agent's state; beneath --store-roots) and be a directory.
func NewImportDir(dir string, policy *RootPolicy) (*ImportDir, error) {
	if dir == "" {
		return &ImportDir{}, nil
	}
	if err := policy.Check(dir, dir); err != nil {
		return nil, fmt.Errorf("import directory: %w", err)
	}
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("import directory %s: %w", dir, errors.Join(err, errdefs.ErrFailedPrecondition))
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("import directory %s is not a directory: %w", dir, errdefs.ErrFailedPrecondition)
	}
	return &ImportDir{dir: dir}, nil
}

// Dir is the directory ("" for none).
func (d *ImportDir) Dir() string { return d.dir }

// Open opens the file rawURL (file://) names for reading, checked as the
// type's doc says; the caller closes it.
func (d *ImportDir) Open(rawURL string) (*os.File, error) {
	f, err := d.open(rawURL)
	if err != nil {
		return nil, fmt.Errorf("import %s: %w", redact.URL(rawURL), err)
	}
	return f, nil
}

func (d *ImportDir) open(rawURL string) (*os.File, error) {
	if d == nil || d.dir == "" {
		return nil, fmt.Errorf("%s: this agent has no --import-dir, so it reads no file:// URL: %w", hostops.ImportRule, errdefs.ErrPermissionDenied)
	}
	rel, err := hostops.ImportPath(rawURL, d.dir)
	if err != nil {
		return nil, err
	}
	rfd, err := unix.Open(d.dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("import directory %s: %w", d.dir, errors.Join(err, classOf(err)))
	}
	defer unix.Close(rfd)
	pfd, err := openBeneath(rfd, rel, 0)
	if err != nil {
		switch err {
		case unix.ELOOP, unix.EXDEV:
			return nil, fmt.Errorf("%s (%s), without following symbolic links: %s goes through a symbolic link or leaves it: %w", hostops.ImportRule, d.dir, rel, errdefs.ErrPermissionDenied)
		case unix.ENOENT:
			return nil, fmt.Errorf("%s is not in the import directory %s: %w", rel, d.dir, errors.Join(err, errdefs.ErrNotFound))
		}
		return nil, fmt.Errorf("%s in the import directory %s: %w", rel, d.dir, errors.Join(err, classOf(err)))
	}
	defer unix.Close(pfd)
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return nil, fmt.Errorf("%s in the import directory %s: %w", rel, d.dir, errors.Join(err, classOf(err)))
	}
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return nil, fmt.Errorf("%s (%s): %s is not a regular file: %w", hostops.ImportRule, d.dir, rel, errdefs.ErrPermissionDenied)
	case st.Nlink > 1:
		return nil, fmt.Errorf("%s (%s): %s has %d hard links, and another name may lie outside the directory: %w", hostops.ImportRule, d.dir, rel, st.Nlink, errdefs.ErrPermissionDenied)
	}
	f, err := os.OpenFile("/proc/self/fd/"+strconv.Itoa(pfd), os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s in the import directory %s: %w", rel, d.dir, errors.Join(err, errdefs.ErrUnavailable))
	}
	return f, nil
}

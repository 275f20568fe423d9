package hostfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/agent/nbdexports"
	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/failpoint"
)

// Exporter serves files of this host read-only over HTTP under
// unguessable URLs; agent/exports.Server is the agent's.
type Exporter interface {
	// Export serves the file at path (on this machine) until expires
	// (zero: never) for owner, and returns its URL.
	Export(path string, expires time.Time, owner exports.Owner) (string, error)
	// Unexport ends an export; an unknown one is not an error.
	Unexport(url string) error
	// List returns the live exports.
	List() []exports.Info
}

// WithExporter makes Export and Unexport work through x; without it they
// are errdefs.ErrNotImplemented.
func WithExporter(x Exporter) Option { return func(l *Local) { l.exporter = x } }

// Export serves the file at path read-only over HTTP (Range, HEAD) until
// Unexport or expires (zero: never), and returns its URL; the export
// records owner. Exporting an exported path again returns the same URL.
func (l *Local) Export(ctx context.Context, path string, expires time.Time, owner exports.Owner) (drivers.URI, error) {
	if l.exporter == nil {
		return "", fmt.Errorf("export %s on host %s: this endpoint serves no exports: %w", path, l.hostID, errdefs.ErrNotImplemented)
	}
	host, err := l.existingPath(path)
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		return "", fmt.Errorf("export %s on host %s: %w", path, l.hostID, err)
	}
	u, err := l.exporter.Export(host, expires, owner)
	if err == nil {
		err = failpoint.Hit(failpoint.ExportAfterGrant)
	}
	if err != nil {
		return "", fmt.Errorf("export %s on host %s: %w", path, l.hostID, err)
	}
	return drivers.URI(u), nil
}

// Unexport ends the export at uri; an unknown export is not an error.
func (l *Local) Unexport(ctx context.Context, uri drivers.URI) error {
	if l.exporter == nil {
		return fmt.Errorf("unexport %s on host %s: this endpoint serves no exports: %w", uri, l.hostID, errdefs.ErrNotImplemented)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := l.exporter.Unexport(string(uri)); err != nil {
		return fmt.Errorf("unexport %s on host %s: %w", uri, l.hostID, err)
	}
	return nil
}

// NBDExporter serves files of this host over NBD under unguessable names;
// agent/nbdexports.Server is the agent's.
type NBDExporter interface {
	// ExportFormat serves the image at path (on this machine) of the
	// declared format (nbdexports.FormatRaw: its bytes; FormatQcow2: its
	// guest view) under a new name until expires (zero: never) for owner,
	// and returns its nbd:// or nbds:// URI.
	ExportFormat(path, format string, readOnly bool, expires time.Time, owner exports.Owner) (string, error)
	// ExportRBD serves a Ceph RBD image (through qemu's rbd driver) as
	// ExportFormat serves a file.
	ExportRBD(img nbdexports.RBDImage, readOnly bool, expires time.Time, owner exports.Owner) (string, error)
	// Unexport removes an export and closes its connections; an unknown one
	// is not an error.
	Unexport(uri string) error
	// List returns the live exports.
	List() []nbdexports.Info
}

// WithNBDExporter makes ExportNBD and UnexportNBD work through x; without
// it they are errdefs.ErrNotImplemented.
func WithNBDExporter(x NBDExporter) Option { return func(l *Local) { l.nbd = x } }

// ExportNBD serves the image at req.Path over NBD until UnexportNBD and
// returns its nbd:// URI: a raw image's bytes, or a qcow2's guest view
// through its backing chain, which must pass the chain check of every
// declared qcow2 (a lazy volume's chain ends in the template mount). The
// path must be a regular file (not a symbolic link) inside a store of this
// host, and not its marker; every call makes a new export name.
func (l *Local) ExportNBD(ctx context.Context, req NBDExportRequest) (drivers.URI, error) {
	fail := func(err error) (drivers.URI, error) {
		return "", fmt.Errorf("nbd export %s on host %s: %w", req.Path, l.hostID, err)
	}
	if l.nbd == nil {
		return fail(fmt.Errorf("this agent serves no NBD exports: %w", errdefs.ErrNotImplemented))
	}
	format := nbdexports.FormatRaw
	switch req.Format {
	case drivers.FormatRaw:
	case drivers.FormatQCOW2:
		format = nbdexports.FormatQcow2
	case "":
		return fail(fmt.Errorf("no declared format: %w", errdefs.ErrInvalid))
	default:
		return fail(fmt.Errorf("format %q is not served over NBD: %w", req.Format, errdefs.ErrInvalid))
	}
	host, err := l.existingPath(req.Path)
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		return fail(err)
	}
	if filepath.Base(host) == MarkerFile || isTemp(filepath.Base(host)) {
		return fail(fmt.Errorf("not an image: %w", errdefs.ErrInvalid))
	}
	store, ok := l.storeOf(host)
	if !ok {
		return fail(fmt.Errorf("not inside a store (no %s above it): %w", MarkerFile, errdefs.ErrInvalid))
	}
	fi, err := os.Lstat(host)
	if err != nil {
		return fail(classed(err))
	}
	if !fi.Mode().IsRegular() {
		return fail(fmt.Errorf("not a regular file: %w", errdefs.ErrInvalid))
	}
	// No symbolic link on the way may lead out of the store.
	realStore, err1 := filepath.EvalSymlinks(store)
	realPath, err2 := filepath.EvalSymlinks(host)
	if err := errors.Join(err1, err2); err != nil {
		return fail(classed(err))
	}
	if !within(realPath, realStore) {
		return fail(fmt.Errorf("resolves to %s, outside its store: %w", l.callerPath(realPath), errdefs.ErrInvalid))
	}
	if format == nbdexports.FormatQcow2 {
		if _, err := l.openDeclared(ctx, realPath, qemuimg.FormatQCOW2, false); err != nil {
			return fail(err)
		}
	}
	u, err := l.nbd.ExportFormat(realPath, format, req.ReadOnly, req.Expires, req.Owner)
	if err == nil {
		err = failpoint.Hit(failpoint.ExportAfterGrant)
	}
	if err != nil {
		return fail(err)
	}
	return drivers.URI(u), nil
}

// ExportRBD serves a Ceph RBD image over NBD (see NBDExporter.ExportRBD):
// no file of this host is involved; the image's name and the cluster's
// monitors come from the controller, which the agent trusts for what it
// asks (over mutual TLS), and the key is kept private to the agent.
func (l *Local) ExportRBD(ctx context.Context, img nbdexports.RBDImage, readOnly bool, expires time.Time, owner exports.Owner) (drivers.URI, error) {
	what := "rbd:" + img.Pool + "/" + img.Image
	if l.nbd == nil {
		return "", fmt.Errorf("nbd export %s on host %s: this agent serves no NBD exports: %w", what, l.hostID, errdefs.ErrNotImplemented)
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	u, err := l.nbd.ExportRBD(img, readOnly, expires, owner)
	if err == nil {
		err = failpoint.Hit(failpoint.ExportAfterGrant)
	}
	if err != nil {
		return "", fmt.Errorf("nbd export %s on host %s: %w", what, l.hostID, err)
	}
	return drivers.URI(u), nil
}

// UnexportNBD removes the NBD export at uri and closes its connections; an
// unknown export is not an error.
func (l *Local) UnexportNBD(ctx context.Context, uri drivers.URI) error {
	if l.nbd == nil {
		return fmt.Errorf("nbd unexport %s on host %s: this agent serves no NBD exports: %w", uri, l.hostID, errdefs.ErrNotImplemented)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := l.nbd.Unexport(string(uri)); err != nil {
		return fmt.Errorf("nbd unexport %s on host %s: %w", uri, l.hostID, err)
	}
	return nil
}

// ExportKind is how an export serves its file.
type ExportKind int

// The export kinds.
const (
	ExportHTTP ExportKind = iota + 1 // Export: http(s)://…/exports/<token>
	ExportNBD                        // ExportNBD: nbd(s)://…/<name>
)

// String implements fmt.Stringer.
func (k ExportKind) String() string {
	switch k {
	case ExportHTTP:
		return "http"
	case ExportNBD:
		return "nbd"
	}
	return "unknown"
}

// ExportInfo is one live export of this host (ListExports).
type ExportInfo struct {
	Kind ExportKind
	// URI as Export or ExportNBD returned it: what Unexport and
	// UnexportNBD accept. It is the capability: never log it.
	URI      drivers.URI
	Path     string // on this machine
	ReadOnly bool
	Owner    exports.Owner
	// SharedWith are the owners of the later Exports that joined an HTTP
	// export (exports.Server shares one export per file).
	SharedWith []exports.Owner
	Created    time.Time // zero: made before exports recorded it
	Expires    time.Time // zero: never
}

// ListExports returns the live exports of this host, HTTP then NBD (none
// of a kind this endpoint does not serve).
func (l *Local) ListExports(ctx context.Context) ([]ExportInfo, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var out []ExportInfo
	if l.exporter != nil {
		for _, x := range l.exporter.List() {
			out = append(out, ExportInfo{Kind: ExportHTTP, URI: drivers.URI(x.URL), Path: x.Path, ReadOnly: true, Owner: x.Owner,
				SharedWith: x.SharedWith, Created: x.Created, Expires: x.Expires})
		}
	}
	if l.nbd != nil {
		for _, x := range l.nbd.List() {
			out = append(out, ExportInfo{Kind: ExportNBD, URI: drivers.URI(x.URI), Path: x.Path, ReadOnly: x.ReadOnly, Owner: x.Owner,
				Created: x.Created, Expires: x.Expires})
		}
	}
	return out, nil
}

// InStore checks that path (a path on this machine, as the exporters hold
// it) is a regular file inside a store of this host (below a directory
// holding MarkerFile, also after resolving symbolic links), and not the
// marker or a temporary file: what the exporters check before serving an
// export again after a restart (exports.Server.Load,
// nbdexports.Server.Load), since a store may have been removed meanwhile.
func (l *Local) InStore(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return classed(err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s: not a regular file: %w", l.callerPath(path), errdefs.ErrInvalid)
	}
	if base := filepath.Base(path); base == MarkerFile || isTemp(base) {
		return fmt.Errorf("%s: not an object: %w", l.callerPath(path), errdefs.ErrInvalid)
	}
	store, ok := l.storeOf(path)
	if !ok {
		return fmt.Errorf("%s: not inside a store (no %s above it): %w", l.callerPath(path), MarkerFile, errdefs.ErrPermissionDenied)
	}
	realStore, err1 := filepath.EvalSymlinks(store)
	realPath, err2 := filepath.EvalSymlinks(path)
	if err := errors.Join(err1, err2); err != nil {
		return classed(err)
	}
	if !within(realPath, realStore) {
		return fmt.Errorf("%s: resolves outside its store: %w", l.callerPath(path), errdefs.ErrPermissionDenied)
	}
	return nil
}

package hostfs

import (
	"context"
	"fmt"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// Exporter serves files of this host read-only over HTTP under
// unguessable URLs; agent/exports.Server is the agent's.
type Exporter interface {
	// Export serves the file at path (on this machine) and returns its URL.
	Export(path string) (string, error)
	// Unexport ends an export; an unknown one is not an error.
	Unexport(url string) error
}

// WithExporter makes Export and Unexport work through x; without it they
// are errdefs.ErrNotImplemented.
func WithExporter(x Exporter) Option { return func(l *Local) { l.exporter = x } }

// Export serves the file at path read-only over HTTP (Range, HEAD) until
// Unexport, and returns its URL. Exporting an exported path again returns
// the same URL.
func (l *Local) Export(ctx context.Context, path string) (drivers.URI, error) {
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
	u, err := l.exporter.Export(host)
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

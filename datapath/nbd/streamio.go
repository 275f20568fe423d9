package nbd

import (
	"context"
	"fmt"
	"net/url"
	"sync/atomic"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// DefaultStreamConnections is how many connections OpenSource and OpenSink
// open when the server allows several (nbdcopy's default).
const DefaultStreamConnections = 4

// Source reads an NBD export for the copy engine: reads through
// ReadAtContext, holes from base:allocation block status.
type Source struct {
	c *Client
}

var (
	_ stream.Source          = (*Source)(nil)
	_ stream.ContextReaderAt = (*Source)(nil)
	_ stream.Sink            = (*Sink)(nil)
)

// OpenSource connects to the export rawURL names.
func OpenSource(ctx context.Context, rawURL string, opts ClientOptions) (*Source, error) {
	c, err := Dial(ctx, rawURL, streamOpts(opts))
	if err != nil {
		return nil, err
	}
	return &Source{c: c}, nil
}

func streamOpts(o ClientOptions) ClientOptions {
	if o.Connections == 0 {
		o.Connections = DefaultStreamConnections
	}
	return o
}

// Client is the underlying client.
func (s *Source) Client() *Client { return s.c }

// ReadAt reads len(p) bytes at off.
func (s *Source) ReadAt(p []byte, off int64) (int, error) { return s.c.ReadAt(p, off) }

// ReadAtContext reads len(p) bytes at off until ctx ends.
func (s *Source) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	return s.c.ReadAtContext(ctx, p, off)
}

// Size is the export size.
func (s *Source) Size() int64 { return s.c.Size() }

// Extents asks the server's base:allocation context; ranges that read as
// zeros are holes.
func (s *Source) Extents(ctx context.Context, off, length int64) ([]stream.Extent, error) {
	return s.c.BlockStatus(ctx, off, length)
}

// Identity is the URL and size: NBD cannot name content, so a checkpoint
// resumes against whatever the same export serves.
func (s *Source) Identity() string { return fmt.Sprintf("nbd %s size %d", s.c.target, s.c.size) }

// Close disconnects.
func (s *Source) Close() error { return s.c.Close() }

// Sink writes an NBD export for the copy engine. Writes land on the export
// as they happen: Commit flushes and disconnects, Abort only disconnects
// (there is nothing to roll back).
type Sink struct {
	c    *Client
	size int64
	done atomic.Bool
}

// OpenSink connects to the export rawURL names for writing size bytes; the
// export must be writable and at least that large.
func OpenSink(ctx context.Context, rawURL string, size int64, opts ClientOptions) (*Sink, error) {
	c, err := Dial(ctx, rawURL, streamOpts(opts))
	if err != nil {
		return nil, err
	}
	if c.ReadOnly() {
		c.Close()
		return nil, fmt.Errorf("nbd %s: export is read-only: %w", c.target, errdefs.ErrPermissionDenied)
	}
	if size > c.Size() {
		c.Close()
		return nil, fmt.Errorf("nbd %s: export has %d bytes, need %d: %w", c.target, c.Size(), size, errdefs.ErrInvalid)
	}
	return &Sink{c: c, size: size}, nil
}

// Client is the underlying client.
func (s *Sink) Client() *Client { return s.c }

// WriteAt writes p at off.
func (s *Sink) WriteAt(p []byte, off int64) (int, error) { return s.c.WriteAt(p, off) }

// Zero makes the range read as zeros, letting the server punch a hole.
func (s *Sink) Zero(off, length int64) error {
	return s.c.Zero(s.c.ctx, off, length, ZeroOptions{})
}

// Sync flushes.
func (s *Sink) Sync() error { return s.c.Flush(s.c.ctx) }

// Commit flushes and disconnects.
func (s *Sink) Commit(ctx context.Context) error {
	if !s.done.CompareAndSwap(false, true) {
		return fmt.Errorf("nbd %s: sink already ended: %w", s.c.target, errdefs.ErrFailedPrecondition)
	}
	err := s.c.Flush(ctx)
	s.c.Close()
	return err
}

// Abort disconnects; what was written stays written. It is a no-op after
// Commit.
func (s *Sink) Abort() error {
	if !s.done.CompareAndSwap(false, true) {
		return nil
	}
	return s.c.Close()
}

// streamSource is the stream.SourceOpener of nbd[s]:// and nbd[s]+unix://
// connecting with opts.
func streamSource(opts ClientOptions) stream.SourceOpener {
	return func(ctx context.Context, u *url.URL, o stream.SourceOptions) (stream.Source, error) {
		if o.Format != "" && o.Format != "raw" {
			return nil, fmt.Errorf("source %s: NBD exports are read as raw, not %s: %w", redact.URL(u.String()), o.Format, errdefs.ErrNotImplemented)
		}
		ep, err := endpointOf(u)
		if err != nil {
			return nil, err
		}
		c, err := dial(ctx, u, ep, streamOpts(opts))
		if err != nil {
			return nil, err
		}
		return &Source{c: c}, nil
	}
}

// streamSink is the stream.SinkOpener of nbd[s]:// and nbd[s]+unix://
// connecting with opts.
func streamSink(opts ClientOptions) stream.SinkOpener {
	return func(ctx context.Context, u *url.URL, size int64, o stream.SinkOptions) (stream.Sink, error) {
		if o.Format != "" && o.Format != "raw" {
			return nil, fmt.Errorf("destination %s: NBD exports are written raw, not %s: %w", redact.URL(u.String()), o.Format, errdefs.ErrNotImplemented)
		}
		if o.Resume {
			return nil, fmt.Errorf("destination %s: resuming into an NBD export is not supported: %w", redact.URL(u.String()), errdefs.ErrNotImplemented)
		}
		return OpenSink(ctx, u.String(), size, opts)
	}
}

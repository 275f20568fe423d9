package imagecache

import (
	"context"
	"fmt"

	"github.com/stowage/stowage/datapath/stream"
)

// Source is where a template's bytes come from: an HTTP(S) URL read with
// Range requests, or a local file.
//
// ReadAtContext must be safe for concurrent use and read exactly len(p)
// bytes unless it fails or reaches the end of the source.
type Source interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
	Size() int64
	// Identity names the exact content served (URL and ETag, path size and
	// mtime); a cached template whose identity changed is fetched again.
	Identity() string
	Close() error
}

// OpenFunc opens the source of a template.
type OpenFunc func(ctx context.Context, url string) (Source, error)

// OpenStream opens url (http://, https://, file:// or a local path) with
// the stream package, always as raw bytes, never interpreting qcow2: the
// cache serves the template file as it is. Local files are read with
// O_DIRECT (falling back to buffered reads where the filesystem refuses
// it): the cache keeps its own copy, so the source's pages in the page
// cache would be a second copy of every byte, and allocating and copying
// them cost a cold read through the mount a third of its speed
// (bench/README.md).
func OpenStream(o stream.HTTPOptions) OpenFunc {
	return func(ctx context.Context, url string) (Source, error) {
		s, err := stream.OpenSource(ctx, url, stream.SourceOptions{Format: "raw", HTTP: o, ReadMode: stream.ReadDirect})
		if err != nil {
			return nil, fmt.Errorf("open source: %w", err)
		}
		return streamSource{s}, nil
	}
}

// streamSource adapts a stream.Source.
type streamSource struct{ stream.Source }

func (s streamSource) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if c, ok := s.Source.(stream.ContextReaderAt); ok {
		return c.ReadAtContext(ctx, p, off)
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	return s.Source.ReadAt(p, off)
}

// checksum returns the whole-file sha256 the source announces, if any.
func checksum(s Source) string {
	if ss, ok := s.(streamSource); ok {
		if c, ok := ss.Source.(stream.Checksummed); ok {
			if sum, ok := c.SourceChecksum(); ok {
				return sum
			}
		}
	}
	return ""
}

package stream

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"sort"
	"strings"
	"sync"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// SourceOptions tune OpenSource.
type SourceOptions struct {
	// ReadMode for local files and block devices.
	ReadMode ReadMode
	// Format is "" to detect (qcow2 by its magic, raw otherwise), "raw" to
	// read a file as it is, or "qcow2".
	Format string
	// HTTP tunes http:// and https:// sources.
	HTTP HTTPOptions
}

// SourceOpener opens a Source for a URL of one scheme.
type SourceOpener func(ctx context.Context, u *url.URL, opts SourceOptions) (Source, error)

// SinkOpener opens a Sink of size bytes for a URL of one scheme.
type SinkOpener func(ctx context.Context, u *url.URL, size int64, opts SinkOptions) (Sink, error)

var (
	registryMu    sync.RWMutex
	sourceOpeners = map[string]SourceOpener{
		"file":  func(_ context.Context, u *url.URL, o SourceOptions) (Source, error) { return openPathSource(u.Path, o) },
		"http":  openHTTPURL,
		"https": openHTTPURL,
	}
	sinkOpeners = map[string]SinkOpener{
		"file": func(_ context.Context, u *url.URL, size int64, o SinkOptions) (Sink, error) {
			return openPathSink(u.Path, size, o)
		},
	}
)

// RegisterSource adds the opener for a URL scheme (nbd, s3, ...). It panics
// when the scheme already has one: wiring happens once, at start.
func RegisterSource(scheme string, fn SourceOpener) {
	registryMu.Lock()
	defer registryMu.Unlock()
	if _, dup := sourceOpeners[scheme]; dup {
		panic("stream: source scheme registered twice: " + scheme)
	}
	sourceOpeners[scheme] = fn
}

// RegisterSink adds the opener for a URL scheme; it panics on duplicates.
func RegisterSink(scheme string, fn SinkOpener) {
	registryMu.Lock()
	defer registryMu.Unlock()
	if _, dup := sinkOpeners[scheme]; dup {
		panic("stream: sink scheme registered twice: " + scheme)
	}
	sinkOpeners[scheme] = fn
}

func openHTTPURL(ctx context.Context, u *url.URL, o SourceOptions) (Source, error) {
	s, err := OpenHTTPSource(ctx, u.String(), o.HTTP)
	if err != nil {
		return nil, err
	}
	if o.Format == "qcow2" {
		s.Close()
		return nil, fmt.Errorf("source %s: qcow2 over HTTP is not supported yet; download it raw first: %w", redact.URL(u.String()), errdefs.ErrNotImplemented)
	}
	return s, nil
}

// parseTarget splits a path or URL into a scheme and a URL ("file" for
// plain paths).
func parseTarget(target string) (*url.URL, error) {
	if target == "" {
		return nil, fmt.Errorf("empty path or URL: %w", errdefs.ErrInvalid)
	}
	if !strings.Contains(target, "://") {
		return &url.URL{Scheme: "file", Path: target}, nil
	}
	u, err := url.Parse(target)
	if err != nil {
		return nil, fmt.Errorf("URL %q: %w", target, errdefs.ErrInvalid)
	}
	u.Scheme = strings.ToLower(u.Scheme)
	if u.Scheme == "file" && u.Host != "" && u.Host != "localhost" {
		return nil, fmt.Errorf("URL %q: file URLs name local paths (file:///path): %w", target, errdefs.ErrInvalid)
	}
	return u, nil
}

func schemes[V any](m map[string]V) string {
	var s []string
	for k := range m {
		s = append(s, k)
	}
	sort.Strings(s)
	return strings.Join(s, ", ")
}

// OpenSource opens a path or URL (file://, http://, https://, and the
// schemes added with RegisterSource) for reading.
func OpenSource(ctx context.Context, target string, opts SourceOptions) (Source, error) {
	u, err := parseTarget(target)
	if err != nil {
		return nil, err
	}
	registryMu.RLock()
	fn, ok := sourceOpeners[u.Scheme]
	all := schemes(sourceOpeners)
	registryMu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("source %s: scheme %q is not supported (have %s): %w", redact.URL(u.String()), u.Scheme, all, errdefs.ErrNotImplemented)
	}
	return fn(ctx, u, opts)
}

func openPathSource(path string, o SourceOptions) (Source, error) {
	switch o.Format {
	case "", "raw", "qcow2":
	default:
		return nil, fmt.Errorf("source format %q: want raw or qcow2: %w", o.Format, errdefs.ErrInvalid)
	}
	fs, err := OpenFileSource(path, o.ReadMode)
	if err != nil {
		return nil, err
	}
	qcow := o.Format == "qcow2" || (o.Format == "" && !fs.block && isQcow2(fs.f))
	if !qcow {
		return fs, nil
	}
	fs.Close()
	return OpenQcow2Source(path)
}

// OpenSink opens a path or URL for writing an object of size bytes.
func OpenSink(ctx context.Context, target string, size int64, opts SinkOptions) (Sink, error) {
	u, err := parseTarget(target)
	if err != nil {
		return nil, err
	}
	registryMu.RLock()
	fn, ok := sinkOpeners[u.Scheme]
	all := schemes(sinkOpeners)
	registryMu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("destination %s: scheme %q is not supported (have %s): %w", redact.URL(u.String()), u.Scheme, all, errdefs.ErrNotImplemented)
	}
	sink, err := fn(ctx, u, size, opts)
	return sink, spaceClass(err)
}

func openPathSink(path string, size int64, o SinkOptions) (Sink, error) {
	switch o.Format {
	case "", "raw":
		return OpenFileSink(path, size, o)
	case "qcow2":
		if st, err := os.Stat(path); err == nil && st.Mode()&os.ModeDevice != 0 {
			return nil, fmt.Errorf("qcow2 output to device %s: %w", path, errdefs.ErrInvalid)
		}
		return OpenQcow2Sink(path, size, o)
	}
	return nil, fmt.Errorf("destination format %q: want raw or qcow2: %w", o.Format, errdefs.ErrInvalid)
}

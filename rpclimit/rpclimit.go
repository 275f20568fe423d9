// Package rpclimit bounds what a Stowage process reads from its callers:
// one Limits value per process (built in cmd/stowage from
// --max-request-bytes) gives the Connect handler options and the HTTP
// wrapper installed on every Connect handler the process serves, and
// NewServer gives the http.Server settings every listener shares.
//
// What bounds a request:
//
//   - the message: connect.WithReadMaxBytes(MaxRequestBytes). In connect-go
//     (v1.21, compression.go compressionPool.Decompress, protocol_connect.go
//     connectUnaryUnmarshaler, envelope.go envelopeReader.Read) the limit is
//     checked twice: on the bytes read from the wire (a Connect unary body,
//     or a gRPC/streaming envelope's length prefix) and, for a compressed
//     message, on the decompressed bytes, which are read through
//     io.LimitReader(max+1). A message larger than the limit either way is
//     CodeResourceExhausted (HTTP 429 in the Connect protocol, grpc-status 8
//     in gRPC).
//   - the decompression work: past the limit, connect-go drains the rest of
//     the decompressor to report the full size, which for a gzip bomb means
//     inflating gigabytes into io.Discard (CPU, not memory). The gzip
//     decompressor installed here stops with an error once it produced
//     MaxRequestBytes+1 bytes, so connect-go answers resource_exhausted
//     without inflating further.
//   - the body: a Content-Length over MaxRequestBytes plus room for framing
//     is refused before anything is read; any other body is read through
//     http.MaxBytesReader at that size, so a caller cannot stream a body
//     (which connect-go would otherwise drain to its end to report its
//     size) forever; connect-go maps *http.MaxBytesError to
//     CodeResourceExhausted too.
//   - the time: reading a request body has BodyTimeout (a read deadline set
//     through http.ResponseController and cleared once the body has been
//     read). Connect reads a unary or server-streaming request to its end
//     before calling the handler, so long RPCs (RunTask, WatchJob) are not
//     cut by it, which a server-wide http.Server.ReadTimeout would do.
package rpclimit

import (
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"connectrpc.com/connect"
)

// DefaultMaxRequestBytes is the largest request message by default: 4 MiB.
const DefaultMaxRequestBytes = 4 << 20

// Server timeouts shared by every listener (NewServer).
const (
	// ReadHeaderTimeout bounds reading a request's headers.
	ReadHeaderTimeout = 10 * time.Second
	// IdleTimeout closes a keep-alive connection with no request.
	IdleTimeout = 2 * time.Minute
	// MaxHeaderBytes bounds a request's headers (HTTP/1 and HTTP/2).
	MaxHeaderBytes = 64 << 10
	// DefaultBodyTimeout bounds reading one request body.
	DefaultBodyTimeout = 30 * time.Second
)

// framing is what the body may hold besides the message: a gRPC or Connect
// streaming envelope (5 bytes) and end-of-stream frames.
const framing = 64 << 10

// Limits are the bounds of one process's Connect handlers.
type Limits struct {
	// MaxRequestBytes is the largest request message, after
	// decompression (0: DefaultMaxRequestBytes).
	MaxRequestBytes int
	// BodyTimeout bounds reading one request body (0: DefaultBodyTimeout).
	BodyTimeout time.Duration
}

// Default returns the default limits.
func Default() Limits {
	return Limits{MaxRequestBytes: DefaultMaxRequestBytes, BodyTimeout: DefaultBodyTimeout}
}

func (l Limits) maxBytes() int {
	if l.MaxRequestBytes <= 0 {
		return DefaultMaxRequestBytes
	}
	return l.MaxRequestBytes
}

func (l Limits) bodyTimeout() time.Duration {
	if l.BodyTimeout <= 0 {
		return DefaultBodyTimeout
	}
	return l.BodyTimeout
}

// Check validates the limits as flags give them.
func (l Limits) Check() error {
	if l.MaxRequestBytes < 0 {
		return fmt.Errorf("max request bytes %d: must be positive (0: the default %d)", l.MaxRequestBytes, DefaultMaxRequestBytes)
	}
	if l.BodyTimeout < 0 {
		return fmt.Errorf("body timeout %s: must be positive", l.BodyTimeout)
	}
	return nil
}

// HandlerOptions are the options every Connect handler of the process gets:
// the read limit and gzip that inflates no further than it.
func (l Limits) HandlerOptions() connect.HandlerOption {
	limit := int64(l.maxBytes()) + 1 // connect-go reads max+1 to see it exceeded
	return connect.WithHandlerOptions(
		connect.WithReadMaxBytes(l.maxBytes()),
		// Replace the built-in gzip (removed first so that it is advertised once).
		connect.WithCompression("gzip", nil, nil),
		connect.WithCompression("gzip",
			func() connect.Decompressor { return &cappedGzip{limit: limit} },
			func() connect.Compressor { return gzip.NewWriter(io.Discard) }),
	)
}

// Wrap bounds the body of every request h serves: MaxRequestBytes plus
// framing, read within BodyTimeout. A body whose Content-Length is over
// the limit is refused before a byte of it is read (resource_exhausted in
// the caller's RPC protocol, 413 for other requests) and the connection
// closed.
func (l Limits) Wrap(h http.Handler) http.Handler {
	maxBody := int64(l.maxBytes()) + framing
	timeout := l.bodyTimeout()
	errw := connect.NewErrorWriter()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength > maxBody {
			if r.ProtoMajor == 1 {
				w.Header().Set("Connection", "close") // do not drain it
			}
			err := fmt.Errorf("request body of %d bytes is larger than the limit %d (message limit %d)", r.ContentLength, maxBody, l.maxBytes())
			if errw.IsSupported(r) {
				_ = errw.Write(w, r, connect.NewError(connect.CodeResourceExhausted, err))
			} else {
				http.Error(w, err.Error(), http.StatusRequestEntityTooLarge)
			}
			return
		}
		if r.Body != nil && r.Body != http.NoBody {
			rc := http.NewResponseController(w)
			// Not every ResponseWriter can (httptest recorders); then only
			// the size is bounded.
			if rc.SetReadDeadline(time.Now().Add(timeout)) == nil {
				r.Body = &deadlineBody{ReadCloser: http.MaxBytesReader(w, r.Body, maxBody), rc: rc}
			} else {
				r.Body = http.MaxBytesReader(w, r.Body, maxBody)
			}
		}
		h.ServeHTTP(w, r)
	})
}

// deadlineBody clears the read deadline once the body has been read (to
// its end or an error), so a long handler is not cut by it.
type deadlineBody struct {
	io.ReadCloser
	rc      *http.ResponseController
	cleared bool
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && !b.cleared {
		b.cleared = true
		_ = b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}

// NewServer returns an http.Server for h with the shared header and idle
// bounds. It sets no ReadTimeout or WriteTimeout: bodies are bounded by
// Wrap, and RunTask and WatchJob answer for as long as a task or job runs.
func NewServer(h http.Handler, protocols *http.Protocols) *http.Server {
	return &http.Server{
		Handler:           h,
		Protocols:         protocols,
		ReadHeaderTimeout: ReadHeaderTimeout,
		IdleTimeout:       IdleTimeout,
		MaxHeaderBytes:    MaxHeaderBytes,
	}
}

// errTooLarge ends a decompression that passed the limit.
var errTooLarge = errors.New("decompressed message exceeds the read limit")

// cappedGzip is a gzip reader that produces at most limit bytes, then
// fails instead of inflating the rest.
type cappedGzip struct {
	zr    gzip.Reader
	n     int64
	limit int64
}

var _ connect.Decompressor = (*cappedGzip)(nil)

func (c *cappedGzip) Read(p []byte) (int, error) {
	if c.n >= c.limit {
		return 0, fmt.Errorf("%w (%d bytes)", errTooLarge, c.limit-1)
	}
	if rest := c.limit - c.n; int64(len(p)) > rest {
		p = p[:rest]
	}
	n, err := c.zr.Read(p)
	c.n += int64(n)
	return n, err
}

func (c *cappedGzip) Reset(r io.Reader) error {
	c.n = 0
	return c.zr.Reset(r)
}

func (c *cappedGzip) Close() error { return c.zr.Close() }

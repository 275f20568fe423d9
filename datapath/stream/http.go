package stream

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stowage/stowage/datapath/internal/pace"
	"github.com/stowage/stowage/errdefs"
)

// HTTPOptions tune an HTTP(S) source. The zero value is a good default.
type HTTPOptions struct {
	// Client to use; by default one with a connection pool sized for
	// parallel range requests and no overall timeout.
	Client *http.Client
	// Header is added to every request (authorization, ...).
	Header http.Header
	// MaxRetries is how often one read is retried after a dropped
	// connection, a 5xx answer or a stall (default 5); negative: never.
	MaxRetries int
	// RetryBase and RetryMax bound the exponential backoff between retries
	// (defaults 200ms and 5s). The defaults give up on a source that stays
	// away for about 6 s (0.2+0.4+0.8+1.6+3.2 s of pauses).
	RetryBase, RetryMax time.Duration
	// RetryFor keeps a failing read (and the opening probe) retrying at
	// least this long after its first failure, RetryMax apart, even past
	// MaxRetries: the window in which a source that went away (a template
	// server restarting, a link flapping) may come back and the copy
	// resumes where it stopped. 0: MaxRetries alone bounds the retries.
	RetryFor time.Duration
	// StallTimeout fails an attempt when no byte arrived for this long
	// (default 30s).
	StallTimeout time.Duration
	// TLS is the client TLS configuration of the default Client (nil: Go's
	// defaults): roots beyond the system's, a client certificate.
	TLS *tls.Config
}

func (o HTTPOptions) withDefaults() HTTPOptions {
	if o.MaxRetries == 0 {
		o.MaxRetries = 5
	}
	if o.MaxRetries < 0 {
		o.MaxRetries, o.RetryFor = 0, 0
	}
	if o.RetryBase <= 0 {
		o.RetryBase = 200 * time.Millisecond
	}
	if o.RetryMax <= 0 {
		o.RetryMax = 5 * time.Second
	}
	if o.StallTimeout <= 0 {
		o.StallTimeout = 30 * time.Second
	}
	if o.Client == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.MaxIdleConnsPerHost = 64
		t.ResponseHeaderTimeout = o.StallTimeout
		t.DialContext = (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext
		if o.TLS != nil {
			t.TLSClientConfig = o.TLS.Clone()
		}
		o.Client = &http.Client{Transport: t}
	}
	return o
}

// HTTPSource reads an HTTP(S) URL with Range requests, in parallel, each
// read retried from where it stopped. A server without Range support is read
// front to back (Sequential) and restarted from the beginning on a failure.
type HTTPSource struct {
	url     string
	o       HTTPOptions
	ctx     context.Context
	size    int64
	ranges  bool
	etag    string
	lastMod string
	sha     string
	retries atomic.Int64

	seqMu   sync.Mutex
	seqBody io.ReadCloser
	seqPos  int64
	seqStop func()
}

var (
	_ Source          = (*HTTPSource)(nil)
	_ ContextReaderAt = (*HTTPSource)(nil)
	_ Checksummed     = (*HTTPSource)(nil)
	_ Sequential      = (*HTTPSource)(nil)
)

// OpenHTTPSource probes url (a one-byte Range GET, retried like any read)
// for its size, Range support, validators and announced checksum. ctx bounds
// the probe and later ReadAt calls; the engine uses ReadAtContext.
func OpenHTTPSource(ctx context.Context, url string, o HTTPOptions) (*HTTPSource, error) {
	s := &HTTPSource{url: url, o: o.withDefaults(), ctx: ctx}
	if err := s.attempts(ctx, "open "+url, func() (int, error) { return 0, s.probe(ctx) }); err != nil {
		return nil, err
	}
	return s, nil
}

// errTransient marks an attempt that may succeed when repeated.
var errTransient = errors.New("transient")

// ErrRetriesExhausted is in the error of a read (or open) that failed
// transiently until its retries and retry window (HTTPOptions.RetryFor)
// were used up, with errdefs.ErrUnavailable: the source is gone for now,
// and another attempt right away would only wait out the same window.
var ErrRetriesExhausted = errors.New("retries exhausted")

func retryable(err error) bool { return errors.Is(err, errTransient) }

func (s *HTTPSource) newRequest(ctx context.Context) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url, nil)
	if err != nil {
		return nil, fmt.Errorf("source %s: %w", s.url, errors.Join(err, errdefs.ErrInvalid))
	}
	for k, v := range s.o.Header {
		req.Header[k] = v
	}
	return req, nil
}

func (s *HTTPSource) probe(ctx context.Context) error {
	req, err := s.newRequest(ctx)
	if err != nil {
		return err
	}
	req.Header.Set("Range", "bytes=0-0")
	resp, err := s.o.Client.Do(req)
	if err != nil {
		if errors.Is(err, errdefs.ErrPermissionDenied) {
			// A policy refused the connection (a guarded dialer): final.
			return fmt.Errorf("source %s: %w", s.url, err)
		}
		return fmt.Errorf("source %s: %w", s.url, errors.Join(err, errTransient))
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusPartialContent:
		total, err := contentRangeTotal(resp.Header.Get("Content-Range"))
		if err != nil {
			return fmt.Errorf("source %s: %w", s.url, err)
		}
		s.size, s.ranges = total, true
	case http.StatusOK:
		if resp.ContentLength < 0 {
			return fmt.Errorf("source %s: the server gives no size and no Range support: %w", s.url, errdefs.ErrNotImplemented)
		}
		s.size = resp.ContentLength
	case http.StatusRequestedRangeNotSatisfiable:
		total, err := contentRangeTotal(resp.Header.Get("Content-Range"))
		if err != nil || total != 0 {
			return fmt.Errorf("source %s: range not satisfiable: %w", s.url, errdefs.ErrInvalid)
		}
		s.size, s.ranges = 0, true
	default:
		return statusError(s.url, resp)
	}
	s.etag, s.lastMod = resp.Header.Get("ETag"), resp.Header.Get("Last-Modified")
	s.sha = announcedSHA256(resp.Header)
	return nil
}

func statusError(url string, resp *http.Response) error {
	err := fmt.Errorf("source %s: %s", url, resp.Status)
	switch {
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone:
		return errors.Join(err, errdefs.ErrNotFound)
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		return errors.Join(err, errdefs.ErrPermissionDenied)
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		return errors.Join(err, errTransient)
	}
	return errors.Join(err, errdefs.ErrInvalid)
}

// contentRangeTotal parses the total of "bytes a-b/total" or "bytes */total".
func contentRangeTotal(v string) (int64, error) {
	i := strings.LastIndexByte(v, '/')
	if !strings.HasPrefix(v, "bytes ") || i < 0 {
		return 0, fmt.Errorf("bad Content-Range %q: %w", v, errdefs.ErrInvalid)
	}
	n, err := strconv.ParseInt(v[i+1:], 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("Content-Range %q without a total size: %w", v, errdefs.ErrNotImplemented)
	}
	return n, nil
}

// contentRangeStart parses a of "bytes a-b/total".
func contentRangeStart(v string) (int64, bool) {
	v = strings.TrimPrefix(v, "bytes ")
	i := strings.IndexByte(v, '-')
	if i < 0 {
		return 0, false
	}
	n, err := strconv.ParseInt(v[:i], 10, 64)
	return n, err == nil
}

// announcedSHA256 returns the hex SHA-256 a server announces for the whole
// representation: Repr-Digest (RFC 9530), Digest (RFC 3230) or
// X-Checksum-Sha256.
func announcedSHA256(h http.Header) string {
	for _, field := range h.Values("Repr-Digest") {
		for _, m := range strings.Split(field, ",") {
			k, v, ok := strings.Cut(strings.TrimSpace(m), "=")
			if ok && strings.EqualFold(k, "sha-256") {
				if b, err := base64.StdEncoding.DecodeString(strings.Trim(v, ":")); err == nil && len(b) == 32 {
					return hex.EncodeToString(b)
				}
			}
		}
	}
	for _, field := range h.Values("Digest") {
		for _, m := range strings.Split(field, ",") {
			k, v, ok := strings.Cut(strings.TrimSpace(m), "=")
			if ok && strings.EqualFold(k, "sha-256") {
				if b, err := base64.StdEncoding.DecodeString(v); err == nil && len(b) == 32 {
					return hex.EncodeToString(b)
				}
			}
		}
	}
	if v := strings.TrimSpace(h.Get("X-Checksum-Sha256")); v != "" {
		if b, err := hex.DecodeString(v); err == nil && len(b) == 32 {
			return strings.ToLower(v)
		}
	}
	return ""
}

// Size is the size the server reported.
func (s *HTTPSource) Size() int64 { return s.size }

// Identity is the URL with size and validators.
func (s *HTTPSource) Identity() string {
	return fmt.Sprintf("http:%s:size=%d:etag=%s:last-modified=%s", s.url, s.size, s.etag, s.lastMod)
}

// SourceChecksum is the SHA-256 the server announced, if any.
func (s *HTTPSource) SourceChecksum() (string, bool) { return s.sha, s.sha != "" }

// Sequential is true when the server does not serve ranges.
func (s *HTTPSource) Sequential() bool { return !s.ranges }

// Retries is how many attempts were repeated so far.
func (s *HTTPSource) Retries() int64 { return s.retries.Load() }

// Extents reports everything as data: HTTP has no block status.
func (s *HTTPSource) Extents(_ context.Context, off, length int64) ([]Extent, error) {
	length = min(length, s.size-off)
	if length <= 0 {
		return nil, nil
	}
	return []Extent{{Off: off, Len: length}}, nil
}

// Close releases an open sequential response.
func (s *HTTPSource) Close() error {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	s.closeSeq()
	return nil
}

// ReadAt reads with the context given to OpenHTTPSource.
func (s *HTTPSource) ReadAt(p []byte, off int64) (int, error) {
	return s.ReadAtContext(s.ctx, p, off)
}

// ReadAtContext reads len(p) bytes at off, retrying dropped or stalled
// transfers from the byte where they stopped.
func (s *HTTPSource) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off >= s.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := int(min(int64(len(p)), s.size-off))
	var n int
	var err error
	if s.ranges {
		n, err = s.readRanged(ctx, p[:want], off)
	} else {
		n, err = s.readSequential(ctx, p[:want], off)
	}
	if err != nil {
		return n, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (s *HTTPSource) backoff(ctx context.Context, attempt int) error {
	d := s.o.RetryBase << min(attempt-1, 20)
	if d > s.o.RetryMax || d <= 0 {
		d = s.o.RetryMax
	}
	return pace.Sleep(ctx, d)
}

// resetRetriesAfter is how much an attempt must transfer before a later
// failure gets a fresh retry budget: a long read over a flaky link keeps
// going, a server that trickles a few bytes per connection does not.
const resetRetriesAfter = 1 << 20

// attempts runs fn until it succeeds, fails permanently, or the retries are
// used up; fn reports how many bytes it transferred, and an attempt that
// moved at least resetRetriesAfter bytes resets the budget.
// With RetryFor, retries go on until that long after the first failure of
// the current run of failures, too.
func (s *HTTPSource) attempts(ctx context.Context, what string, fn func() (progressed int, err error)) error {
	failures := 0
	var first time.Time
	for {
		progressed, err := fn()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !retryable(err) {
			return err
		}
		if progressed >= resetRetriesAfter {
			failures = 0
		}
		if failures == 0 {
			first = time.Now()
		}
		failures++
		if failures > s.o.MaxRetries && time.Since(first) >= s.o.RetryFor {
			return &gaveUp{what: what, attempts: failures, window: time.Since(first), last: err}
		}
		s.retries.Add(1)
		metricRetries.Inc()
		if err := s.backoff(ctx, failures); err != nil {
			return err
		}
	}
}

func (s *HTTPSource) readRanged(ctx context.Context, p []byte, off int64) (int, error) {
	got := 0
	err := s.attempts(ctx, fmt.Sprintf("read %s at %d", s.url, off), func() (int, error) {
		start := got
		err := s.rangeOnce(ctx, p, off, &got)
		return got - start, err
	})
	return got, err
}

// rangeOnce requests p[*got:] and reads as much of it as arrives.
func (s *HTTPSource) rangeOnce(ctx context.Context, p []byte, off int64, got *int) error {
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req, err := s.newRequest(rctx)
	if err != nil {
		return err
	}
	from := off + int64(*got)
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", from, off+int64(len(p))-1))
	if s.etag != "" && !strings.HasPrefix(s.etag, "W/") {
		req.Header.Set("If-Range", s.etag)
	} else if s.lastMod != "" {
		req.Header.Set("If-Range", s.lastMod)
	}
	stall := time.AfterFunc(s.o.StallTimeout, cancel)
	defer stall.Stop()
	resp, err := s.o.Client.Do(req)
	if err != nil {
		return s.transportError(ctx, rctx, err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusPartialContent:
		if a, ok := contentRangeStart(resp.Header.Get("Content-Range")); !ok || a != from {
			return fmt.Errorf("source %s: asked for bytes from %d, got Content-Range %q: %w", s.url, from, resp.Header.Get("Content-Range"), errdefs.ErrInvalid)
		}
	case http.StatusOK:
		return fmt.Errorf("source %s changed during the copy (a range request got the whole object): %w", s.url, errdefs.ErrAborted)
	default:
		return statusError(s.url, resp)
	}
	return s.readBody(ctx, rctx, resp.Body, p, got, stall)
}

// readBody reads body into p[*got:], restarting the stall timer on every
// read; it returns nil once p is full.
func (s *HTTPSource) readBody(ctx, rctx context.Context, body io.Reader, p []byte, got *int, stall *time.Timer) error {
	for *got < len(p) {
		stall.Reset(s.o.StallTimeout)
		k, err := body.Read(p[*got:])
		*got += k
		if *got == len(p) {
			return nil
		}
		if err == io.EOF {
			return fmt.Errorf("source %s: connection closed early: %w", s.url, errors.Join(io.ErrUnexpectedEOF, errTransient))
		}
		if err != nil {
			return s.transportError(ctx, rctx, err)
		}
	}
	return nil
}

func (s *HTTPSource) transportError(ctx, rctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if rctx.Err() != nil {
		return fmt.Errorf("source %s: no data for %s: %w", s.url, s.o.StallTimeout, errTransient)
	}
	if errors.Is(err, errdefs.ErrPermissionDenied) {
		return fmt.Errorf("source %s: %w", s.url, err) // a policy refused it: final
	}
	return fmt.Errorf("source %s: %w", s.url, errors.Join(err, errTransient))
}

// readSequential serves in-order reads from one streaming response, which
// is reopened (and read up to the position again) after a failure.
func (s *HTTPSource) readSequential(ctx context.Context, p []byte, off int64) (int, error) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	if off < s.seqPos {
		s.closeSeq()
	}
	got := 0
	err := s.attempts(ctx, fmt.Sprintf("read %s at %d", s.url, off), func() (int, error) {
		start := got
		err := s.seqOnce(ctx, p, off, &got)
		if err != nil {
			s.closeSeq()
		}
		return got - start, err
	})
	return got, err
}

func (s *HTTPSource) closeSeq() {
	if s.seqBody != nil {
		s.seqBody.Close()
		s.seqStop()
		s.seqBody, s.seqPos = nil, 0
	}
}

func (s *HTTPSource) seqOnce(ctx context.Context, p []byte, off int64, got *int) error {
	if s.seqBody == nil {
		rctx, cancel := context.WithCancel(ctx)
		req, err := s.newRequest(rctx)
		if err != nil {
			cancel()
			return err
		}
		resp, err := s.o.Client.Do(req)
		if err != nil {
			cancel()
			return s.transportError(ctx, rctx, err)
		}
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			cancel()
			return statusError(s.url, resp)
		}
		s.seqBody, s.seqPos, s.seqStop = resp.Body, 0, cancel
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The closure runs on its own goroutine when rctx ends, possibly after
	// this read returned and closeSeq cleared s.seqBody: it closes the body
	// it was made for, not whatever the field holds then (a data race, and
	// a nil dereference, found by the race-built e2e binaries).
	body := s.seqBody
	stop := context.AfterFunc(rctx, func() { body.Close() })
	defer stop()
	stall := time.AfterFunc(s.o.StallTimeout, cancel)
	defer stall.Stop()
	target := off + int64(*got)
	if s.seqPos < target {
		k, err := io.CopyN(io.Discard, s.seqBody, target-s.seqPos)
		s.seqPos += k
		if err != nil {
			return s.transportError(ctx, rctx, err)
		}
	}
	before := *got
	err := s.readBody(ctx, rctx, s.seqBody, p, got, stall)
	s.seqPos += int64(*got - before)
	return err
}

// gaveUp is the error of a read whose retries ran out: unavailable, and
// ErrRetriesExhausted, saying so first (before the last attempt's error).
type gaveUp struct {
	what     string
	attempts int
	window   time.Duration
	last     error
}

func (e *gaveUp) Error() string {
	last := strings.ReplaceAll(e.last.Error(), "\n"+errTransient.Error(), "")
	return fmt.Sprintf("%s: source unavailable: gave up after %d failed attempts in %s: %s",
		e.what, e.attempts, e.window.Round(time.Millisecond), last)
}

func (e *gaveUp) Unwrap() []error {
	return []error{e.last, ErrRetriesExhausted, errdefs.ErrUnavailable}
}

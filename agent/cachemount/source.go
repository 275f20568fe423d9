package cachemount

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/stowage/stowage/datapath/imagecache"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// scheme names a template's source by template id in the cache's index,
// so that where the bytes come from (which agent exports them, over HTTP or
// NBD) can change without dropping the chunks cached so far.
const scheme = "stowage-template:"

// resolver maps template ids to where their bytes are now. The cache opens
// "stowage-template:<id>"; each read goes to the template's current URL.
type resolver struct {
	open imagecache.OpenFunc // opens a concrete URL (http, nbd, file)
	// moveWait is how long a read whose source failed waits for the
	// template's location to move (the serving agent restarted and the
	// controller exported it again) before it fails with EIO.
	moveWait time.Duration

	mu    sync.Mutex
	where map[string]location
	moved chan struct{} // closed and replaced when any location's URL changes
}

type location struct {
	url      string
	size     int64
	identity string
}

func newResolver(open imagecache.OpenFunc) *resolver {
	return &resolver{open: open, moveWait: 15 * time.Second, where: map[string]location{}, moved: make(chan struct{})}
}

func (r *resolver) set(id string, l location) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if old, ok := r.where[id]; ok && old.url != l.url {
		close(r.moved)
		r.moved = make(chan struct{})
	}
	r.where[id] = l
}

// waitMove waits until template id's URL is no longer url, for at most
// r.moveWait; it reports whether it moved.
func (r *resolver) waitMove(ctx context.Context, id, url string) bool {
	deadline := time.NewTimer(r.moveWait)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		l, ok := r.where[id]
		moved := r.moved
		r.mu.Unlock()
		if !ok {
			return false
		}
		if l.url != url {
			return true
		}
		select {
		case <-moved:
		case <-deadline.C:
			return false
		case <-ctx.Done():
			return false
		}
	}
}

func (r *resolver) forget(id string) {
	r.mu.Lock()
	delete(r.where, id)
	r.mu.Unlock()
}

func (r *resolver) get(id string) (location, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	l, ok := r.where[id]
	return l, ok
}

// Open is the cache's imagecache.OpenFunc. It does no I/O: the template's
// location may be unreachable right now (the serving agent restarts), and
// the mount must still show the file; reads fail until it is back.
func (r *resolver) Open(ctx context.Context, url string) (imagecache.Source, error) {
	id, ok := strings.CutPrefix(url, scheme)
	if !ok {
		return nil, fmt.Errorf("source %q: the template mount opens %s<id> only: %w", url, scheme, errdefs.ErrInvalid)
	}
	l, ok := r.get(id)
	if !ok {
		return nil, fmt.Errorf("template %s: no location known: %w", id, errdefs.ErrNotFound)
	}
	return &source{r: r, id: id, size: l.size, identity: l.identity}, nil
}

// source reads a template from wherever the resolver says it is now,
// reopening the concrete source when the location changes or after a
// failed read.
type source struct {
	r        *resolver
	id       string
	size     int64
	identity string

	mu     sync.Mutex
	cur    imagecache.Source
	curURL string
	old    []imagecache.Source // replaced; closed with the source (readers may still use them)
}

var _ imagecache.Source = (*source)(nil)

// concrete returns the source at the template's current location, and
// that location's URL ("" when the template is gone).
func (s *source) concrete(ctx context.Context) (imagecache.Source, string, error) {
	l, ok := s.r.get(s.id)
	if !ok {
		return nil, "", fmt.Errorf("template %s: removed from the mount: %w", s.id, errdefs.ErrNotFound)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur != nil && s.curURL == l.url {
		return s.cur, l.url, nil
	}
	src, err := s.r.open(ctx, l.url)
	if err != nil {
		return nil, l.url, fmt.Errorf("template %s: %w", s.id, err)
	}
	if src.Size() != s.size {
		src.Close()
		return nil, "", fmt.Errorf("template %s: %s has %d bytes, the records say %d: %w", s.id, redact.URL(l.url), src.Size(), s.size, errdefs.ErrDataLoss)
	}
	if s.cur != nil {
		s.old = append(s.old, s.cur)
	}
	s.cur, s.curURL = src, l.url
	return src, l.url, nil
}

// drop forgets src after a failed read, so the next read opens the
// location afresh (it may have moved).
func (s *source) drop(src imagecache.Source) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == src {
		s.old = append(s.old, s.cur)
		s.cur, s.curURL = nil, ""
	}
}

// ReadAtContext reads from the current location. When that fails (the
// serving agent went away), it waits a bounded time for the location to
// move (the controller exports the template again elsewhere or after the
// agent's restart) and reads once more from there.
func (s *source) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	n, url, err := s.readOnce(ctx, p, off)
	if err == nil || ctx.Err() != nil || url == "" || !s.r.waitMove(ctx, s.id, url) {
		return n, err
	}
	n, _, err = s.readOnce(ctx, p, off)
	return n, err
}

func (s *source) readOnce(ctx context.Context, p []byte, off int64) (int, string, error) {
	src, url, err := s.concrete(ctx)
	if err != nil {
		return 0, url, err
	}
	n, err := src.ReadAtContext(ctx, p, off)
	if err != nil && ctx.Err() == nil && n < len(p) && off+int64(n) < s.size {
		s.drop(src)
	}
	return n, url, err
}

func (s *source) Size() int64 { return s.size }

// Identity is the template's content identity from the controller, not a
// URL: chunks stay valid when the template is served from elsewhere.
func (s *source) Identity() string { return scheme + s.id + "@" + s.identity }

func (s *source) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, o := range append(s.old, s.cur) {
		if o != nil {
			errs = append(errs, o.Close())
		}
	}
	s.old, s.cur = nil, nil
	return errors.Join(errs...)
}

package imagecache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/stowage/stowage/datapath/internal/pace"
	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
)

// Options configure a Cache. Only Dir is required.
type Options struct {
	// Dir holds one subdirectory per template; it is created if missing.
	Dir string
	// ChunkSize is the unit of fetching and of the presence bitmap
	// (default 1 MiB). Changing it discards what a template cached before.
	ChunkSize int64
	// PrefetchRate bounds the background prefetch of all templates
	// together, in bytes per second; 0 means unlimited, negative disables
	// prefetching (chunks are then only fetched on demand).
	PrefetchRate int64
	// MaxFetches bounds concurrent ranged fetches over the whole cache
	// (default 8).
	MaxFetches int
	// MaxMerge bounds how many bytes of adjacent missing chunks one ranged
	// fetch covers (default 8 MiB, at least one chunk).
	MaxMerge int64
	// ReadAhead bounds the window fetched ahead of a sequential reader
	// (default 32 MiB; negative disables). The window starts at 4 MiB (at
	// least one chunk) and doubles on each sequential step up to ReadAhead;
	// a random access resets it. Read-ahead fetches run in the background,
	// MaxMerge bytes per ranged request, under the MaxFetches bound.
	ReadAhead int64
	// CommitInterval is how often fetched chunks are made durable in the
	// index (default 1s). Chunks fetched since the last commit are fetched
	// again after a crash.
	CommitInterval time.Duration
	// CapacityBytes bounds the bytes the cache allocates on disk (the data
	// files' allocated blocks); 0 means unlimited. Past it, whole templates
	// are evicted, least recently read first, skipping pinned templates
	// (see Cache.Pin), templates open through the mount and templates
	// with fetches in flight. An evicted template stays listed and is
	// fetched again on demand. The limit is soft: when nothing can be
	// evicted the cache grows past it.
	CapacityBytes int64
	// Open opens a template's source (default OpenStream with default HTTP
	// options: retries of dropped connections and 5xx answers).
	Open OpenFunc
	// Logger receives fetch failures and prefetch progress (default
	// slog.Default()).
	Logger *slog.Logger
}

func (o Options) withDefaults() (Options, error) {
	if o.Dir == "" {
		return o, fmt.Errorf("image cache: no directory: %w", errdefs.ErrInvalid)
	}
	if o.ChunkSize == 0 {
		o.ChunkSize = 1 << 20
	}
	if o.ChunkSize < 4096 || o.ChunkSize%4096 != 0 {
		return o, fmt.Errorf("image cache: chunk size %d: want a multiple of 4096: %w", o.ChunkSize, errdefs.ErrInvalid)
	}
	if o.MaxFetches <= 0 {
		o.MaxFetches = 8
	}
	if o.MaxMerge <= 0 {
		o.MaxMerge = 8 << 20
	}
	o.MaxMerge = max(o.MaxMerge/o.ChunkSize, 1) * o.ChunkSize
	if o.ReadAhead == 0 {
		o.ReadAhead = 32 << 20
	}
	if o.CommitInterval <= 0 {
		o.CommitInterval = time.Second
	}
	if o.Open == nil {
		o.Open = OpenStream(stream.HTTPOptions{})
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o, nil
}

// Cache is a directory of lazily fetched templates. Its methods are safe
// for concurrent use.
type Cache struct {
	o      Options
	log    *slog.Logger
	ctx    context.Context // ends at Close; bounds prefetching and commits
	cancel context.CancelFunc
	sem    *semaphore.Weighted
	rate   *pace.Limiter
	bufs   sync.Pool // *[]byte of MaxMerge bytes
	wg     sync.WaitGroup

	clock   atomic.Uint64 // LRU clock: bumped by every read
	fetched atomic.Int64  // bytes read from origins, all templates
	corrupt atomic.Int64  // cached chunks found not matching their checksum
	evictMu sync.Mutex    // one eviction pass at a time

	mu       sync.Mutex
	tmpls    map[string]*Template
	pins     map[string]int
	gen      uint64
	watchers []func(id string)
	onDone   []func(t *Template) // told when a template becomes complete
	closed   bool
}

// New opens the cache over o.Dir. Templates cached there before come back
// when they are added again with the same source.
func New(o Options) (*Cache, error) {
	o, err := o.withDefaults()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("image cache %s: %w", o.Dir, errors.Join(err, errdefs.ErrUnavailable))
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Cache{
		o: o, log: o.Logger, ctx: ctx, cancel: cancel,
		sem:   semaphore.NewWeighted(int64(o.MaxFetches)),
		rate:  pace.NewLimiter(o.PrefetchRate),
		tmpls: map[string]*Template{},
		pins:  map[string]int{},
		gen:   1, // FUSE inode 1 is the root
	}
	c.bufs.New = func() any { b := make([]byte, o.MaxMerge); return &b }
	c.wg.Add(1)
	go c.committer()
	return c, nil
}

// Counters are the cache's cumulative counters since New, over every
// template it held (removed ones included).
type Counters struct {
	// FetchedBytes were read from the templates' origins: demand reads,
	// read-ahead, prefetch and direct reads alike.
	FetchedBytes int64
	// CorruptChunks were cached chunks whose bytes did not match their
	// recorded checksum when read back; each was dropped and fetched again.
	CorruptChunks int64
}

// Counters returns the cache's counters.
func (c *Cache) Counters() Counters {
	return Counters{FetchedBytes: c.fetched.Load(), CorruptChunks: c.corrupt.Load()}
}

// ChunkSize is the cache's chunk size in bytes.
func (c *Cache) ChunkSize() int64 { return c.o.ChunkSize }

// Watch registers fn to be called with a template's id after it was added
// or removed. The FUSE layer uses it to invalidate the kernel's entries.
func (c *Cache) Watch(fn func(id string)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.watchers = append(c.watchers, fn)
}

// watchComplete registers fn to be called (from the finishing goroutine)
// each time a template becomes complete.
func (c *Cache) watchComplete(fn func(t *Template)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.onDone = append(c.onDone, fn)
}

func (c *Cache) notifyComplete(t *Template) {
	c.mu.Lock()
	fns := slices.Clone(c.onDone)
	c.mu.Unlock()
	for _, fn := range fns {
		fn(t)
	}
}

func (c *Cache) notify(id string) {
	c.mu.Lock()
	ws := slices.Clone(c.watchers)
	c.mu.Unlock()
	for _, fn := range ws {
		fn(id)
	}
}

// validID reports whether id can be a file name in the mount.
func validID(id string) error {
	if id == "" || id == "." || id == ".." || len(id) > 255 || strings.ContainsAny(id, "/\x00") {
		return fmt.Errorf("template id %q: want a file name: %w", id, errdefs.ErrInvalid)
	}
	return nil
}

// Add makes the template id, whose bytes are at url, available. size is
// its size in bytes, or 0 to take the source's; a mismatch is an error.
// Chunks cached in an earlier life of the cache are kept when the source's
// identity is unchanged. Adding an id again with the same url returns the
// existing template. ctx bounds opening the source.
func (c *Cache) Add(ctx context.Context, id, url string, size int64) (*Template, error) {
	if err := validID(id); err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, fmt.Errorf("template %s: image cache is closed: %w", id, errdefs.ErrFailedPrecondition)
	}
	if t, ok := c.tmpls[id]; ok {
		c.mu.Unlock()
		if t.url == url && (size == 0 || size == t.size) {
			return t, nil
		}
		return nil, fmt.Errorf("template %s: already cached from %s: %w", id, t.url, errdefs.ErrAlreadyExists)
	}
	c.gen++
	gen := c.gen
	c.mu.Unlock()

	src, err := c.o.Open(ctx, url)
	if err != nil {
		return nil, fmt.Errorf("template %s: %w", id, err)
	}
	if size == 0 {
		size = src.Size()
	}
	if size != src.Size() {
		src.Close()
		return nil, fmt.Errorf("template %s: source %s has %d bytes, want %d: %w", id, url, src.Size(), size, errdefs.ErrFailedPrecondition)
	}
	t, err := openTemplate(c, id, url, size, gen, src)
	if err != nil {
		src.Close()
		return nil, err
	}
	c.mu.Lock()
	if _, dup := c.tmpls[id]; dup || c.closed {
		c.mu.Unlock()
		t.close()
		return nil, fmt.Errorf("template %s: added concurrently or cache closed: %w", id, errdefs.ErrConflict)
	}
	c.tmpls[id] = t
	c.mu.Unlock()
	t.touch()
	t.start()
	c.notify(id)
	return t, nil
}

// Remove forgets template id and deletes its cached bytes. Files already
// open through FUSE passthrough keep working; other open files fail with
// EIO. Removing a missing id succeeds.
func (c *Cache) Remove(ctx context.Context, id string) error {
	c.mu.Lock()
	t, ok := c.tmpls[id]
	delete(c.tmpls, id)
	c.mu.Unlock()
	if !ok {
		return nil
	}
	c.notify(id)
	t.close()
	if err := os.RemoveAll(t.dir); err != nil {
		return fmt.Errorf("template %s: remove cache: %w", id, errors.Join(err, errdefs.ErrUnavailable))
	}
	return ctx.Err()
}

// Get returns template id.
func (c *Cache) Get(id string) (*Template, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.tmpls[id]
	return t, ok
}

// List returns the templates ordered by id.
func (c *Cache) List() []*Template {
	c.mu.Lock()
	ts := make([]*Template, 0, len(c.tmpls))
	for _, t := range c.tmpls {
		ts = append(ts, t)
	}
	c.mu.Unlock()
	slices.SortFunc(ts, func(a, b *Template) int { return strings.Compare(a.id, b.id) })
	return ts
}

// Close stops prefetching, commits what was fetched and closes every
// template. The directory keeps the cached chunks for the next Cache.
func (c *Cache) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	ts := make([]*Template, 0, len(c.tmpls))
	for _, t := range c.tmpls {
		ts = append(ts, t)
	}
	c.mu.Unlock()
	c.cancel()
	var errs []error
	for _, t := range ts {
		errs = append(errs, t.close())
	}
	c.wg.Wait()
	return errors.Join(errs...)
}

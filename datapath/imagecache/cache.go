package imagecache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/semaphore"
	"golang.org/x/sys/unix"

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
	rate   *limiter
	bufs   sync.Pool // *[]byte of MaxMerge bytes
	wg     sync.WaitGroup

	clock   atomic.Uint64 // LRU clock: bumped by every read
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
		rate:  newLimiter(o.PrefetchRate),
		tmpls: map[string]*Template{},
		pins:  map[string]int{},
		gen:   1, // FUSE inode 1 is the root
	}
	c.bufs.New = func() any { b := make([]byte, o.MaxMerge); return &b }
	c.wg.Add(1)
	go c.committer()
	return c, nil
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

// Pin keeps template id from being evicted until a matching Unpin; pins
// nest and may be taken before the template is added. The agent pins the
// template of every running volume, and the template a linked-clone volume
// uses as its backing file for as long as the volume exists, unless that
// template is also complete elsewhere on the host (then losing the cached
// copy costs a refetch, not the volume). Pin before the volume is started:
// an eviction pass already under way may still evict the template, which is
// then fetched again on demand.
func (c *Cache) Pin(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pins[id]++
}

// Unpin releases one Pin of id.
func (c *Cache) Unpin(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pins[id] <= 1 {
		delete(c.pins, id)
	} else {
		c.pins[id]--
	}
}

func (c *Cache) pinned(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pins[id] > 0
}

// enforceCapacity evicts least recently used templates, never except, until
// the allocated bytes fit CapacityBytes.
func (c *Cache) enforceCapacity(except *Template) {
	if c.o.CapacityBytes <= 0 || !c.evictMu.TryLock() {
		return
	}
	defer c.evictMu.Unlock()
	ts := c.List()
	var total int64
	alloc := make(map[*Template]int64, len(ts))
	for _, t := range ts {
		a := t.allocated()
		alloc[t] = a
		total += a
	}
	if total <= c.o.CapacityBytes {
		return
	}
	slices.SortFunc(ts, func(a, b *Template) int { return cmpU64(a.lastUse.Load(), b.lastUse.Load()) })
	for _, t := range ts {
		if total <= c.o.CapacityBytes {
			return
		}
		if t == except || alloc[t] == 0 {
			continue
		}
		if t.evict() {
			c.log.Info("image cache: evicted template", "template", t.id, "bytes", alloc[t],
				"cache_bytes", total, "capacity", c.o.CapacityBytes)
			total -= alloc[t]
		}
	}
	if total <= c.o.CapacityBytes {
		return
	}
	c.log.Warn("image cache: over capacity; every remaining template is pinned, open or busy",
		"cache_bytes", total, "capacity", c.o.CapacityBytes)
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
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

// committer makes fetched chunks durable every CommitInterval.
func (c *Cache) committer() {
	defer c.wg.Done()
	tick := time.NewTicker(c.o.CommitInterval)
	defer tick.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-tick.C:
		}
		for _, t := range c.List() {
			if err := t.commit(); err != nil {
				c.log.Warn("image cache: commit failed", "template", t.id, "err", err)
			}
		}
	}
}

// call is one in-flight ranged fetch; every chunk it covers points to it.
type call struct {
	done chan struct{}
	err  error
	// ahead marks a read-ahead fetch: its failure is not the waiters'
	// failure, they claim the chunks again and fetch them themselves.
	ahead bool
}

// Template is one cached template.
type Template struct {
	c       *Cache
	id, url string
	ident   string
	size    int64
	cs      int64
	nchunks int
	gen     uint64
	dir     string
	src     Source
	data    *os.File
	wantSHA string

	lastUse atomic.Uint64 // Cache.clock at the last read
	ra      readahead     // sequential detection for ReadAt callers without a handle
	opens   atomic.Int64  // files open through the mount
	// readMu is held shared from Ensure to the read of the data file, and
	// exclusively by eviction, which truncates the data file.
	readMu sync.RWMutex

	fetches atomic.Int64 // ranged requests sent to the source
	fetched atomic.Int64 // bytes received from the source
	corrupt atomic.Int64 // cached chunks that failed verification and were dropped

	ctx      context.Context // ends at close
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	commitMu sync.Mutex
	// writeMu serialises writes to the data file: concurrent pwrites of
	// one file contend on its inode lock in the kernel, where the waiter
	// spins on a CPU (measured 8% of a cold read's CPU time on 2 vCPUs);
	// a Go mutex parks it and lets the other fetches receive meanwhile.
	writeMu sync.Mutex

	mu    sync.Mutex
	sums  [][]byte  // crc32c of each present chunk (4 bytes), nil when missing
	added time.Time // when this process added it: the file's times in the mount
	// lastRead is the chunk after the most recent demand read, or -1: the
	// prefetcher continues from there.
	lastRead atomic.Int64
	npresent int
	// checked marks present chunks whose bytes in the data file were
	// hashed by this process (fetched here, or verified on first read);
	// chunks from an earlier life are verified before they are served.
	checked     []bool
	nchecked    int
	inflight    map[int]*call
	dirty       bool
	finishing   bool
	verified    bool
	prefetching bool
	evicted     bool  // dropped by eviction; no prefetch until read again
	failed      error // whole-file digest mismatch: the template is unusable
	complete    atomic.Bool
	closed      bool
}

// indexVersion 2: per-chunk crc32c (version 1 had sha256; such an index is
// discarded and its chunks fetched again).
const indexVersion = 2

// castagnoli is the CRC-32C table (hardware-accelerated on amd64 and arm64).
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// chunkSum is a chunk's checksum: CRC-32C, as Ceph BlueStore uses for its
// data blocks. It guards the cached copy against the local disk (bit rot,
// a torn write, a crash), not against a malicious writer: at ~27 GB/s a
// core against ~1.8 GB/s for sha256 it takes a third less CPU off a cold
// read on a two-vCPU host. An announced whole-file digest is still checked
// with sha256 (finish).
func chunkSum(b []byte) []byte {
	return binary.BigEndian.AppendUint32(nil, crc32.Checksum(b, castagnoli))
}

// index is the persistent form of a template's presence bitmap.
type index struct {
	Version   int      `json:"version"`
	URL       string   `json:"url"`
	Identity  string   `json:"identity"`
	Size      int64    `json:"size"`
	ChunkSize int64    `json:"chunk_size"`
	SHA256    string   `json:"sha256,omitempty"`   // announced by the source
	Verified  bool     `json:"verified,omitempty"` // SHA256 checked over all chunks
	Chunks    []string `json:"chunks"`             // hex crc32c per chunk, "" when missing
}

func openTemplate(c *Cache, id, url string, size int64, gen uint64, src Source) (*Template, error) {
	cs := c.o.ChunkSize
	t := &Template{
		c: c, id: id, url: url, ident: src.Identity(), size: size, cs: cs,
		nchunks: int((size + cs - 1) / cs), gen: gen,
		dir: filepath.Join(c.o.Dir, id), src: src, wantSHA: checksum(src),
		inflight: map[int]*call{}, added: time.Now(),
	}
	t.lastRead.Store(-1)
	t.sums = make([][]byte, t.nchunks)
	t.checked = make([]bool, t.nchunks)
	fail := func(err error) (*Template, error) {
		if t.data != nil {
			t.data.Close()
		}
		return nil, fmt.Errorf("template %s: %w", id, errors.Join(err, errdefs.ErrUnavailable))
	}
	if err := os.MkdirAll(t.dir, 0o700); err != nil {
		return fail(err)
	}
	f, err := os.OpenFile(filepath.Join(t.dir, "data"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fail(err)
	}
	t.data = f
	kept := t.load()
	if !kept {
		// Nothing trusted: start from an all-hole file, so that zero chunks
		// can stay holes.
		if err := f.Truncate(0); err != nil {
			return fail(err)
		}
	}
	if err := f.Truncate(size); err != nil {
		return fail(err)
	}
	if !kept {
		t.dirty = true
		if err := t.commit(); err != nil {
			return fail(err)
		}
	}
	// A template cached in full in an earlier life is not complete (served
	// by passthrough, out of our sight) until the background pass has
	// verified every chunk; see start.
	t.ctx, t.cancel = context.WithCancel(c.ctx)
	c.log.Info("image cache: template added", "template", id, "source", url, "size", size,
		"chunks", t.nchunks, "cached_chunks", t.npresent, "complete", t.complete.Load())
	return t, nil
}

// load reads the index; false when there is none or it does not match.
func (t *Template) load() bool {
	b, err := os.ReadFile(filepath.Join(t.dir, "index"))
	if err != nil {
		return false
	}
	var ix index
	if err := json.Unmarshal(b, &ix); err != nil || ix.Version != indexVersion || ix.URL != t.url ||
		ix.Identity != t.ident || ix.Size != t.size || ix.ChunkSize != t.cs || len(ix.Chunks) != t.nchunks {
		t.c.log.Info("image cache: discarding cached chunks of a different source or layout", "template", t.id)
		return false
	}
	for i, h := range ix.Chunks {
		if h == "" {
			continue
		}
		sum, err := hex.DecodeString(h)
		if err != nil || len(sum) != crc32.Size {
			return false
		}
		t.sums[i] = sum
		t.npresent++
	}
	t.verified = ix.Verified && ix.SHA256 == t.wantSHA
	return true
}

// start launches the background prefetch. With prefetching disabled, a
// template whose chunks are all cached still gets a local verification
// pass, so that it can become complete.
func (t *Template) start() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.complete.Load() || t.closed || t.prefetching {
		return
	}
	verifyOnly := t.c.o.PrefetchRate < 0
	if verifyOnly && t.npresent != t.nchunks {
		return
	}
	t.prefetching = true
	t.wg.Add(1)
	go t.prefetch(verifyOnly)
}

// ID is the template's id, its file name in the mount.
func (t *Template) ID() string { return t.id }

// Size is the template's size in bytes.
func (t *Template) Size() int64 { return t.size }

// Complete reports whether every chunk is cached and checked and, when the
// source announced a digest, the whole file verified. The index commit that
// makes it durable runs right after (a crash before it costs a refetch).
func (t *Template) Complete() bool { return t.complete.Load() }

// DataPath is the file holding the cached bytes; it is the whole template
// once Complete.
func (t *Template) DataPath() string { return t.data.Name() }

// Stats reports progress.
type Stats struct {
	Chunks, CachedChunks int
	Fetches              int64 // ranged requests sent to the source
	FetchedBytes         int64
	// CorruptChunks counts cached chunks whose bytes did not match their
	// recorded checksum when first read in this process; each was dropped
	// and fetched again.
	CorruptChunks int64
}

// Stats returns the template's progress.
func (t *Template) Stats() Stats {
	t.mu.Lock()
	defer t.mu.Unlock()
	return Stats{Chunks: t.nchunks, CachedChunks: t.npresent, Fetches: t.fetches.Load(), FetchedBytes: t.fetched.Load(),
		CorruptChunks: t.corrupt.Load()}
}

// touch marks the template as just used, for LRU eviction.
func (t *Template) touch() { t.lastUse.Store(t.c.clock.Add(1)) }

// allocated is the number of bytes the data file occupies on disk.
func (t *Template) allocated() int64 {
	st, err := t.data.Stat()
	if err != nil {
		return 0
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		return sys.Blocks * 512
	}
	return st.Size()
}

// evict drops every cached chunk of the template and frees its blocks,
// unless it is pinned, open, being read or fetched, or being finished. The
// template stays listed; reads fetch its chunks again and restart its
// prefetch. A crash between the truncation and the index commit is caught
// by the verification of chunks on their first read.
func (t *Template) evict() bool {
	if !t.readMu.TryLock() {
		return false
	}
	defer t.readMu.Unlock()
	t.mu.Lock()
	wasComplete := t.complete.Load()
	if t.closed || len(t.inflight) > 0 || t.npresent == 0 || (t.finishing && !wasComplete) {
		t.mu.Unlock()
		return false
	}
	// Store before checking opens; Open increments opens before it loads
	// complete, so one of the two sees the other.
	t.complete.Store(false)
	if t.opens.Load() > 0 || t.c.pinned(t.id) {
		t.complete.Store(wasComplete)
		t.mu.Unlock()
		return false
	}
	for i := range t.sums {
		t.sums[i] = nil
		t.checked[i] = false
	}
	t.npresent, t.nchecked = 0, 0
	t.finishing, t.verified = false, false
	t.evicted, t.dirty = true, true
	err := t.data.Truncate(0)
	if err == nil {
		err = t.data.Truncate(t.size)
	}
	t.mu.Unlock()
	if err != nil {
		t.c.log.Error("image cache: evict: truncate data file", "template", t.id, "err", err)
	}
	if err := t.commit(); err != nil {
		t.c.log.Warn("image cache: commit failed", "template", t.id, "err", err)
	}
	return true
}

// ReadAt reads len(p) bytes at off, fetching missing chunks first. It
// returns io.EOF at the end of the template like os.File.
func (t *Template) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	return t.readAt(ctx, p, off, &t.ra)
}

// readAt is ReadAt with the read-ahead state of one reader (an open file
// of the mount, or the template's own for ReadAt).
func (t *Template) readAt(ctx context.Context, p []byte, off int64, ra *readahead) (int, error) {
	t.readMu.RLock()
	defer t.readMu.RUnlock()
	t.touch()
	t.mu.Lock()
	restart := t.evicted
	t.evicted = false
	t.mu.Unlock()
	if restart {
		t.start()
	}
	if !t.complete.Load() {
		t.readAhead(ra, off, int64(len(p)))
	}
	n, err := t.Ensure(ctx, off, int64(len(p)))
	if err != nil {
		return 0, err
	}
	if !t.complete.Load() {
		t.lastRead.Store((off + n + t.cs - 1) / t.cs)
	}
	got, err := t.data.ReadAt(p[:n], off)
	if err != nil && !(errors.Is(err, io.EOF) && got == int(n)) {
		return got, fmt.Errorf("template %s: read cache: %w", t.id, errors.Join(err, errdefs.ErrUnavailable))
	}
	if got < len(p) {
		return got, io.EOF
	}
	return got, nil
}

// Ensure makes [off, off+n) present in the data file, fetching missing
// chunks, and returns how many bytes of the range lie inside the template.
func (t *Template) Ensure(ctx context.Context, off, n int64) (int64, error) {
	if off < 0 || n < 0 {
		return 0, fmt.Errorf("template %s: read at %d: %w", t.id, off, errdefs.ErrInvalid)
	}
	if off >= t.size {
		return 0, nil
	}
	n = min(n, t.size-off)
	if n == 0 || t.complete.Load() {
		return n, nil
	}
	first, last := int(off/t.cs), int((off+n-1)/t.cs)
	for {
		t.mu.Lock()
		if t.failed != nil {
			t.mu.Unlock()
			return 0, t.failed
		}
		if t.closed {
			t.mu.Unlock()
			return 0, fmt.Errorf("template %s: removed: %w", t.id, errdefs.ErrNotFound)
		}
		var waits []*call
		type run struct {
			first, count int
			cl           *call
		}
		var runs []run
		var checks []run
		maxRun := int(t.c.o.MaxMerge / t.cs)
		for i := first; i <= last; i++ {
			if t.sums[i] != nil && t.checked[i] {
				continue
			}
			if cl := t.inflight[i]; cl != nil {
				if len(waits) == 0 || waits[len(waits)-1] != cl {
					waits = append(waits, cl)
				}
				continue
			}
			if t.sums[i] != nil {
				// Cached in an earlier life: verify before serving.
				cl := &call{done: make(chan struct{})}
				checks = append(checks, run{first: i, count: 1, cl: cl})
				t.inflight[i] = cl
				continue
			}
			if k := len(runs) - 1; k >= 0 && runs[k].first+runs[k].count == i && runs[k].count < maxRun {
				runs[k].count++
			} else {
				runs = append(runs, run{first: i, count: 1, cl: &call{done: make(chan struct{})}})
			}
			t.inflight[i] = runs[len(runs)-1].cl
		}
		t.mu.Unlock()
		if len(runs) == 0 && len(waits) == 0 && len(checks) == 0 {
			return n, nil
		}
		g := new(errgroup.Group)
		for _, r := range runs {
			g.Go(func() error { return t.fetch(ctx, r.first, r.count, r.cl) })
		}
		for _, r := range checks {
			g.Go(func() error { return t.check(r.first, r.cl) })
		}
		err := g.Wait()
		for _, cl := range waits {
			select {
			case <-cl.done:
				if cl.err != nil && !cl.ahead && err == nil && ctx.Err() == nil && !isCtxErr(cl.err) {
					err = cl.err
				}
			case <-ctx.Done():
				return 0, ctx.Err()
			}
		}
		if err != nil {
			return 0, err
		}
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		// Loop: chunks another caller failed to fetch because its context
		// ended are claimed again.
	}
}

func isCtxErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// readyLocked reports whether every chunk is present and checked and, if
// so, claims the finishing of the template; the caller then runs
// go t.finish().
func (t *Template) readyLocked() bool {
	if t.npresent != t.nchunks || t.nchecked != t.nchunks || t.finishing || t.closed || t.complete.Load() {
		return false
	}
	t.finishing = true
	t.wg.Add(1)
	return true
}

// check verifies chunk i, cached in an earlier life, against its recorded
// checksum and completes cl. A mismatching chunk is dropped, so that the
// caller's next pass fetches it again.
func (t *Template) check(i int, cl *call) (err error) {
	ok := false
	defer func() {
		t.mu.Lock()
		delete(t.inflight, i)
		finish := false
		if err == nil && t.sums[i] != nil && !t.checked[i] {
			if ok {
				t.checked[i] = true
				t.nchecked++
				finish = t.readyLocked()
			} else {
				t.sums[i] = nil
				t.npresent--
				t.dirty = true
			}
		}
		t.mu.Unlock()
		cl.err = err
		close(cl.done)
		if finish {
			go t.finish()
		}
	}()
	off := int64(i) * t.cs
	n := min(t.cs, t.size-off)
	bp := t.c.bufs.Get().(*[]byte)
	defer t.c.bufs.Put(bp)
	buf := (*bp)[:n]
	if _, err := t.data.ReadAt(buf, off); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("template %s: verify chunk %d: %w", t.id, i, errors.Join(err, errdefs.ErrUnavailable))
	}
	s := chunkSum(buf)
	t.mu.Lock()
	want := t.sums[i]
	t.mu.Unlock()
	ok = want != nil && bytes.Equal(s, want)
	if !ok && want != nil {
		t.corrupt.Add(1)
		t.c.log.Warn("image cache: cached chunk does not match its checksum; fetching it again",
			"template", t.id, "chunk", i, "offset", off)
	}
	return nil
}

// fetch reads count chunks from first with one ranged request, stores and
// hashes them, marks them present and completes cl.
func (t *Template) fetch(ctx context.Context, first, count int, cl *call) (err error) {
	var sums [][]byte
	defer func() {
		t.mu.Lock()
		for i := first; i < first+count; i++ {
			delete(t.inflight, i)
			if err == nil && t.sums[i] == nil {
				t.sums[i] = sums[i-first]
				t.npresent++
				t.dirty = true
				t.checked[i] = true
				t.nchecked++
			}
		}
		finish := err == nil && t.readyLocked()
		t.mu.Unlock()
		cl.err = err
		close(cl.done)
		if finish {
			go t.finish()
		}
		if err == nil {
			t.c.enforceCapacity(t)
		}
	}()
	off := int64(first) * t.cs
	n := min(int64(count)*t.cs, t.size-off)
	if err := t.c.sem.Acquire(ctx, 1); err != nil {
		return err
	}
	defer t.c.sem.Release(1)
	bp := t.c.bufs.Get().(*[]byte)
	defer t.c.bufs.Put(bp)
	buf := (*bp)[:n]
	t.fetches.Add(1)
	got, rerr := t.src.ReadAtContext(ctx, buf, off)
	t.fetched.Add(int64(max(got, 0)))
	if int64(got) < n || (rerr != nil && !errors.Is(rerr, io.EOF)) {
		if rerr == nil || errors.Is(rerr, io.EOF) {
			rerr = fmt.Errorf("short read (%d of %d bytes)", got, n)
		}
		if errdefs.Class(rerr) == nil {
			rerr = errors.Join(rerr, errdefs.ErrUnavailable)
		}
		return fmt.Errorf("template %s: fetch %d bytes at %d: %w", t.id, n, off, rerr)
	}
	sums = make([][]byte, count)
	for i := range count {
		b := buf[int64(i)*t.cs : min(int64(i+1)*t.cs, n)]
		sums[i] = chunkSum(b)
		if err := t.store(b, off+int64(i)*t.cs); err != nil {
			return fmt.Errorf("template %s: store chunk %d: %w", t.id, first+i, errors.Join(err, errdefs.ErrUnavailable))
		}
	}
	return nil
}

var zeroChunk [64 << 10]byte

func allZero(b []byte) bool {
	for len(b) > 0 {
		k := min(len(b), len(zeroChunk))
		if !bytes.Equal(b[:k], zeroChunk[:k]) {
			return false
		}
		b = b[k:]
	}
	return true
}

// store writes one chunk at off; a zero chunk becomes a hole.
func (t *Template) store(b []byte, off int64) error {
	t.writeMu.Lock()
	defer t.writeMu.Unlock()
	if allZero(b) {
		err := unix.Fallocate(int(t.data.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, int64(len(b)))
		if err == nil {
			return nil
		}
	}
	if _, err := t.data.WriteAt(b, off); err != nil {
		return err
	}
	// Start the writeback of these bytes now (asynchronously), so that
	// dirty pages never pile up: the commit's fdatasync then has little
	// left to write, and a template that just became complete is not read
	// by passthrough while a second of fetched data is being flushed.
	_ = unix.SyncFileRange(int(t.data.Fd()), off, int64(len(b)), unix.SYNC_FILE_RANGE_WRITE)
	return nil
}

// commit makes the chunks marked present durable: data first, then the
// index by temp+fsync+rename.
func (t *Template) commit() error {
	t.commitMu.Lock()
	defer t.commitMu.Unlock()
	t.mu.Lock()
	if !t.dirty {
		t.mu.Unlock()
		return nil
	}
	ix := index{Version: indexVersion, URL: t.url, Identity: t.ident, Size: t.size, ChunkSize: t.cs,
		SHA256: t.wantSHA, Verified: t.verified, Chunks: make([]string, t.nchunks)}
	for i, s := range t.sums {
		if s != nil {
			ix.Chunks[i] = hex.EncodeToString(s)
		}
	}
	t.dirty = false
	t.mu.Unlock()
	err := t.writeIndex(&ix)
	if err != nil {
		t.mu.Lock()
		t.dirty = true
		t.mu.Unlock()
		return fmt.Errorf("template %s: commit index: %w", t.id, errors.Join(err, errdefs.ErrUnavailable))
	}
	return nil
}

func (t *Template) writeIndex(ix *index) error {
	if err := unix.Fdatasync(int(t.data.Fd())); err != nil {
		return err
	}
	b, err := json.Marshal(ix)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(t.dir, "index.wip-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), filepath.Join(t.dir, "index")); err != nil {
		return err
	}
	d, err := os.Open(t.dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// finish runs once every chunk is present: commit, verify the announced
// digest, and mark the template complete.
func (t *Template) finish() {
	defer t.wg.Done()
	log := t.c.log.With("template", t.id)
	if t.wantSHA != "" && !t.verified {
		h := sha256.New()
		if _, err := io.Copy(h, io.NewSectionReader(t.data, 0, t.size)); err != nil {
			log.Error("image cache: verify failed", "err", err)
			return
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != t.wantSHA {
			t.mu.Lock()
			t.failed = fmt.Errorf("template %s: sha256 %s, source announced %s: %w", t.id, got, t.wantSHA, errdefs.ErrDataLoss)
			for i := range t.sums {
				t.sums[i] = nil
				t.checked[i] = false
			}
			t.npresent, t.nchecked = 0, 0
			t.dirty = true
			t.mu.Unlock()
			log.Error("image cache: template does not match its digest; discarded", "err", t.failed)
			if err := t.commit(); err != nil {
				log.Warn("image cache: commit failed", "err", err)
			}
			return
		}
		t.mu.Lock()
		t.verified = true
		t.dirty = true
		t.mu.Unlock()
	}
	// Complete first, commit second: every byte of the data file is
	// already hashed (and the whole file checked against an announced
	// digest), so serving it by passthrough is right whether or not the
	// index is durable yet; a crash before the commit only costs a refetch.
	// Committing first kept new opens off passthrough for as long as the
	// fdatasync of the whole data file took (seconds for 1 GiB of dirty
	// pages on this disk), so a read right after the cold one went through
	// the FUSE page cache at a third of the direct read's speed.
	t.complete.Store(true)
	log.Info("image cache: template complete", "fetches", t.fetches.Load(), "fetched_bytes", t.fetched.Load())
	t.c.notifyComplete(t)
	if err := t.commit(); err != nil {
		// The next commit tick retries.
		log.Warn("image cache: commit failed", "err", err)
	}
}

// close stops the prefetch, commits and releases the files.
func (t *Template) close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	t.mu.Unlock()
	if t.cancel != nil {
		t.cancel()
	}
	t.wg.Wait()
	err := t.commit()
	// In-flight reads may still use the data file; they were started under
	// contexts we do not own, so wait for them through the claim map.
	for {
		t.mu.Lock()
		var cl *call
		for _, c := range t.inflight {
			cl = c
			break
		}
		t.mu.Unlock()
		if cl == nil {
			break
		}
		<-cl.done
	}
	return errors.Join(err, t.src.Close(), t.data.Close())
}

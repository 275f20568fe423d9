package imagecache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
)

// origin is a loopback HTTP server of files with Range support, a request
// counter and a switch that makes it answer 500.
type origin struct {
	ranges []string // Range headers of ranged GETs, in arrival order (under mu)
	t      *testing.T
	srv    *httptest.Server
	mu     sync.Mutex
	files  map[string][]byte
	ranged atomic.Int64 // range requests, the one-byte probes excluded
	fail   atomic.Bool
}

func newOrigin(t *testing.T) *origin {
	o := &origin{t: t, files: map[string][]byte{}}
	o.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if o.fail.Load() {
			http.Error(w, "injected failure", http.StatusInternalServerError)
			return
		}
		o.mu.Lock()
		b, ok := o.files[strings.TrimPrefix(r.URL.Path, "/")]
		o.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		if rg := r.Header.Get("Range"); rg != "" && rg != "bytes=0-0" {
			o.ranged.Add(1)
			o.mu.Lock()
			o.ranges = append(o.ranges, rg)
			o.mu.Unlock()
		}
		http.ServeContent(w, r, "", time.Unix(1700000000, 0), bytes.NewReader(b))
	}))
	t.Cleanup(o.srv.Close)
	return o
}

func (o *origin) put(name string, b []byte) string {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.files[name] = b
	return o.srv.URL + "/" + name
}

func randBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for k := 0; k < 8 && i+k < n; k++ {
			b[i+k] = byte(v >> (8 * k))
		}
	}
	// A zero region, stored as a hole.
	clear(b[n/2 : n/2+n/8])
	return b
}

func testOptions(dir string) Options {
	return Options{
		Dir: dir, ChunkSize: 64 << 10, PrefetchRate: -1, MaxMerge: 256 << 10,
		CommitInterval: 50 * time.Millisecond,
		Open:           OpenStream(stream.HTTPOptions{MaxRetries: -1}),
	}
}

func TestCacheReadsMergeDedupAndRestart(t *testing.T) {
	ctx := context.Background()
	o := newOrigin(t)
	data := randBytes(3<<20+12345, 1)
	url := o.put("a.raw", data)
	dir := t.TempDir()
	c, err := New(testOptions(dir))
	if err != nil {
		t.Fatal(err)
	}
	tm, err := c.Add(ctx, "a.raw", url, 0)
	if err != nil {
		t.Fatal(err)
	}
	if tm.Size() != int64(len(data)) {
		t.Fatalf("size %d, want %d", tm.Size(), len(data))
	}

	// Four missing adjacent chunks: one ranged request.
	buf := make([]byte, 4*64<<10)
	if _, err := tm.ReadAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, data[:len(buf)]) {
		t.Fatal("bytes differ")
	}
	if n := o.ranged.Load(); n != 1 {
		t.Fatalf("%d range requests for 4 adjacent chunks, want 1", n)
	}

	// Many readers missing the same chunk: one fetch.
	before := o.ranged.Load()
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			p := make([]byte, 100)
			if _, err := tm.ReadAt(ctx, p, 1<<20+17); err != nil {
				t.Error(err)
			}
			if !bytes.Equal(p, data[1<<20+17:1<<20+117]) {
				t.Error("bytes differ")
			}
		})
	}
	wg.Wait()
	if n := o.ranged.Load() - before; n != 1 {
		t.Fatalf("%d fetches for one chunk read by 16 readers, want 1", n)
	}

	// Random reads, including the tail.
	r := rand.New(rand.NewPCG(2, 2))
	for range 50 {
		off := r.Int64N(int64(len(data)))
		p := make([]byte, r.IntN(200<<10)+1)
		n, err := tm.ReadAt(ctx, p, off)
		if err != nil && !(errors.Is(err, io.EOF) && off+int64(n) == int64(len(data))) {
			t.Fatalf("read %d at %d: %v", len(p), off, err)
		}
		if !bytes.Equal(p[:n], data[off:off+int64(n)]) {
			t.Fatalf("bytes differ at %d", off)
		}
	}
	st := tm.Stats()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}

	// Restart: what was fetched is not fetched again.
	c2, err := New(testOptions(dir))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	tm2, err := c2.Add(ctx, "a.raw", url, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	if got := tm2.Stats().CachedChunks; got != st.CachedChunks {
		t.Fatalf("after restart %d chunks cached, want %d", got, st.CachedChunks)
	}
	before = o.ranged.Load()
	if _, err := tm2.ReadAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	if n := o.ranged.Load() - before; n != 0 {
		t.Fatalf("%d fetches of cached chunks after restart, want 0", n)
	}
	if !bytes.Equal(buf, data[:len(buf)]) {
		t.Fatal("bytes differ after restart")
	}
}

func TestCacheSourceFailureAndPrefetch(t *testing.T) {
	ctx := context.Background()
	o := newOrigin(t)
	data := randBytes(2<<20, 3)
	url := o.put("b.raw", data)
	c, err := New(testOptions(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tm, err := c.Add(ctx, "b.raw", url, 0)
	if err != nil {
		t.Fatal(err)
	}
	o.fail.Store(true)
	p := make([]byte, 4096)
	if _, err := tm.ReadAt(ctx, p, 8192); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("read from failing source: %v, want unavailable", err)
	}
	o.fail.Store(false)
	if _, err := tm.ReadAt(ctx, p, 8192); err != nil || !bytes.Equal(p, data[8192:8192+4096]) {
		t.Fatalf("read after recovery: %v", err)
	}

	if _, err := c.Add(ctx, "bad/id", url, 0); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("bad id: %v", err)
	}
	if _, err := c.Add(ctx, "c.raw", url, 5); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("wrong size: %v", err)
	}

	// Prefetch completes a template.
	o2 := testOptions(t.TempDir())
	o2.PrefetchRate = 0
	c2, err := New(o2)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	tm2, err := c2.Add(ctx, "b.raw", url, 0)
	if err != nil {
		t.Fatal(err)
	}
	waitComplete(t, tm2)
	got, err := os.ReadFile(filepath.Join(o2.Dir, "b.raw", "data"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("complete data file differs: %v", err)
	}
}

func waitComplete(t *testing.T, tm *Template) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !tm.Complete() {
		if time.Now().After(deadline) {
			t.Fatalf("template %s not complete: %+v", tm.ID(), tm.Stats())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestCacheCorruptChunkRefetchedAfterRestart(t *testing.T) {
	ctx := context.Background()
	o := newOrigin(t)
	data := randBytes(1<<20, 5)
	url := o.put("v.raw", data)
	dir := t.TempDir()
	c, err := New(testOptions(dir)) // no prefetch
	if err != nil {
		t.Fatal(err)
	}
	tm, err := c.Add(ctx, "v.raw", url, 0)
	if err != nil {
		t.Fatal(err)
	}
	all := make([]byte, len(data))
	if _, err := tm.ReadAt(ctx, all, 0); err != nil || !bytes.Equal(all, data) {
		t.Fatalf("first read: %v", err)
	}
	waitComplete(t, tm)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}

	// Flip one byte of chunk 1 behind the cache's back.
	const bad = 64<<10 + 1234
	f, err := os.OpenFile(filepath.Join(dir, "v.raw", "data"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{data[bad] ^ 0xff}, bad); err != nil {
		t.Fatal(err)
	}
	f.Close()

	// Count from before the restart: the background verification pass may
	// find and refetch the corrupt chunk before the first read.
	before := o.ranged.Load()
	c2, err := New(testOptions(dir))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	tm2, err := c2.Add(ctx, "v.raw", url, 0)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 4096)
	if _, err := tm2.ReadAt(ctx, p, bad-100); err != nil || !bytes.Equal(p, data[bad-100:bad-100+4096]) {
		t.Fatalf("read of the corrupted range: %v, bytes equal %v", err, bytes.Equal(p, data[bad-100:bad-100+4096]))
	}
	if _, err := tm2.ReadAt(ctx, all, 0); err != nil || !bytes.Equal(all, data) {
		t.Fatalf("full read after restart: %v", err)
	}
	waitComplete(t, tm2) // the verification pass completes it
	if n := o.ranged.Load() - before; n != 1 {
		t.Fatalf("%d fetches after restart, want 1 (the corrupt chunk)", n)
	}
	if st := tm2.Stats(); st.CorruptChunks != 1 || st.Fetches != 1 {
		t.Fatalf("stats %+v, want 1 corrupt chunk and 1 fetch", st)
	}
	if cn := c2.Counters(); cn.CorruptChunks != 1 || cn.FetchedBytes != tm2.Stats().FetchedBytes {
		t.Fatalf("cache counters %+v, want 1 corrupt chunk and the template's %d fetched bytes", cn, tm2.Stats().FetchedBytes)
	}
	got, err := os.ReadFile(filepath.Join(dir, "v.raw", "data"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data file not repaired: %v", err)
	}
}

func TestCacheEvictsLeastRecentlyUsedUnpinned(t *testing.T) {
	ctx := context.Background()
	o := newOrigin(t)
	opts := testOptions(t.TempDir())
	// Each template is 512 KiB with one 64 KiB zero chunk (a hole): 448
	// KiB allocated. Two fit, three do not.
	opts.CapacityBytes = 1 << 20
	c, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	datas := map[string][]byte{}
	tms := map[string]*Template{}
	for i, id := range []string{"a", "b", "c"} {
		datas[id] = randBytes(512<<10, uint64(20+i))
		tm, err := c.Add(ctx, id, o.put(id, datas[id]), 0)
		if err != nil {
			t.Fatal(err)
		}
		tms[id] = tm
	}
	readAll := func(id string) {
		t.Helper()
		p := make([]byte, len(datas[id]))
		if _, err := tms[id].ReadAt(ctx, p, 0); err != nil || !bytes.Equal(p, datas[id]) {
			t.Fatalf("read %s: %v", id, err)
		}
	}
	cached := func(id string) int { return tms[id].Stats().CachedChunks }

	c.Pin("a")
	readAll("a")
	readAll("b")
	// A template is not evicted while it is being finished (digest,
	// commit): wait until a and b are complete, so that the pass c's
	// fetch triggers has a deterministic choice.
	for _, id := range []string{"a", "b"} {
		deadline := time.Now().Add(10 * time.Second)
		for !tms[id].Complete() {
			if time.Now().After(deadline) {
				t.Fatalf("%s not complete after reading it all", id)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	readAll("c") // over capacity: b is the LRU unpinned template
	if cached("a") != 8 || cached("b") != 0 || cached("c") != 8 {
		t.Fatalf("after reading c: cached a=%d b=%d c=%d, want 8 0 8", cached("a"), cached("b"), cached("c"))
	}
	// The evicted template is still listed and reads back by refetching.
	if _, ok := c.Get("b"); !ok {
		t.Fatal("evicted template no longer listed")
	}
	before := o.ranged.Load()
	readAll("b") // evicts c, never the pinned a
	if o.ranged.Load() == before {
		t.Fatal("evicted template read without a fetch")
	}
	if cached("a") != 8 || cached("b") != 8 || cached("c") != 0 {
		t.Fatalf("after rereading b: cached a=%d b=%d c=%d, want 8 8 0", cached("a"), cached("b"), cached("c"))
	}
	readAll("a")

	// Unpinned, a is the least recently used once b and c are read.
	c.Unpin("a")
	readAll("b")
	readAll("c")
	if cached("a") != 0 || cached("b") != 8 || cached("c") != 8 {
		t.Fatalf("after unpin: cached a=%d b=%d c=%d, want 0 8 8", cached("a"), cached("b"), cached("c"))
	}
	readAll("a")
	var total int64
	for _, tm := range c.List() {
		total += tm.allocated()
	}
	if total > opts.CapacityBytes {
		t.Fatalf("%d bytes allocated, capacity %d", total, opts.CapacityBytes)
	}
}

func TestCacheSequentialReadAhead(t *testing.T) {
	ctx := context.Background()
	o := newOrigin(t)
	const size = 32 << 20
	data := randBytes(size, 7)
	url := o.put("s.raw", data)
	opts := testOptions(t.TempDir())
	opts.ChunkSize, opts.MaxMerge = 1<<20, 8<<20 // the defaults
	c, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	// Sequential 128 KiB reads of a cold 32 MiB template: a growing window
	// of merged read-ahead fetches, not one fetch per 1 MiB chunk.
	tm, err := c.Add(ctx, "s.raw", url, 0)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 128<<10)
	for off := int64(0); off < size; off += int64(len(p)) {
		if _, err := tm.ReadAt(ctx, p, off); err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
		if !bytes.Equal(p, data[off:off+int64(len(p))]) {
			t.Fatalf("bytes differ at %d", off)
		}
	}
	if n := o.ranged.Load(); n > 8 {
		t.Fatalf("%d range requests for a sequential read of 32 chunks, want <= 8", n)
	}
	if st := tm.Stats(); st.CachedChunks != 32 || st.FetchedBytes != size {
		t.Fatalf("after sequential read: %+v, want 32 chunks fetched once", st)
	}

	// Backwards reads are not sequential: no read-ahead, one fetch per chunk.
	before := o.ranged.Load()
	tm2, err := c.Add(ctx, "r.raw", o.put("r.raw", data), 0)
	if err != nil {
		t.Fatal(err)
	}
	for off := int64(size) - int64(len(p)); off >= 0; off -= 8 * int64(len(p)) {
		if _, err := tm2.ReadAt(ctx, p, off); err != nil || !bytes.Equal(p, data[off:off+int64(len(p))]) {
			t.Fatalf("read at %d: %v", off, err)
		}
	}
	if n := o.ranged.Load() - before; n != 32 {
		t.Fatalf("%d range requests for 32 backward chunk reads, want 32 (no read-ahead)", n)
	}
}

// The prefetcher follows the reader: after a demand read in the middle of
// a template, its next fetch starts right after that read, not at the
// lowest missing chunk; and it still fills every chunk.
func TestPrefetchFollowsTheReader(t *testing.T) {
	ctx := context.Background()
	o := newOrigin(t)
	data := randBytes(4<<20, 9)
	opts := testOptions(t.TempDir())
	opts.PrefetchRate = 1 << 20 // one 256 KiB run per 250 ms
	opts.ReadAhead = -1
	c, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tm, err := c.Add(ctx, "t", o.put("t", data), 0)
	if err != nil {
		t.Fatal(err)
	}
	// The first prefetch run (chunks 0-3) goes out at once; the next one
	// waits for the rate when the demand read comes.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		o.mu.Lock()
		n := len(o.ranges)
		o.mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no prefetch request")
		}
	}
	const at = 40 << 16 // chunk 40 of 64
	p := make([]byte, 64<<10)
	if _, err := tm.ReadAt(ctx, p, at); err != nil || !bytes.Equal(p, data[at:at+len(p)]) {
		t.Fatalf("demand read: %v", err)
	}
	o.mu.Lock()
	demand := len(o.ranges) // the demand read's request is in the log
	o.mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	var next string
	for next == "" && time.Now().Before(deadline) {
		o.mu.Lock()
		for _, rg := range o.ranges[demand:] {
			// Skip the demand read itself, and the second run (chunks
			// 4-7) in case a slow machine let it out before the read.
			if !strings.HasPrefix(rg, fmt.Sprintf("bytes=%d-", at)) && !strings.HasPrefix(rg, fmt.Sprintf("bytes=%d-", 4<<16)) {
				next = rg
				break
			}
		}
		o.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
	}
	if want := fmt.Sprintf("bytes=%d-", at+64<<10); !strings.HasPrefix(next, want) {
		o.mu.Lock()
		t.Fatalf("first prefetch after the demand read asked %q, want %s...; all: %v", next, want, o.ranges)
	}
	for !tm.Complete() {
		if time.Now().After(deadline.Add(20 * time.Second)) {
			t.Fatalf("prefetch did not complete the template: %+v", tm.Stats())
		}
		time.Sleep(20 * time.Millisecond)
	}
	got := make([]byte, len(data))
	if _, err := tm.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("whole template after prefetch: %v", err)
	}
}

// TestReadDirectServesSmallColdReads: a small read of chunks nobody has
// fetched is served from the source at once while the chunks are fetched
// behind it; reads of cached or in-flight chunks, large reads and reads
// from a failing source are left to the cache path.
func TestReadDirectServesSmallColdReads(t *testing.T) {
	ctx := context.Background()
	o := newOrigin(t)
	data := randBytes(1<<20+999, 21)
	url := o.put("d.raw", data)
	c, err := New(testOptions(t.TempDir())) // 64 KiB chunks, no prefetch
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	tm, err := c.Add(ctx, "d.raw", url, 0)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 4096)
	off := int64(300 << 10)
	n, ok := tm.readDirect(ctx, p, off, &readahead{})
	if !ok || n != len(p) || !bytes.Equal(p, data[off:off+4096]) {
		t.Fatalf("direct read: ok %v n %d equal %v", ok, n, bytes.Equal(p, data[off:off+4096]))
	}
	chunk := int(off / tm.cs)
	deadline := time.Now().Add(10 * time.Second)
	for {
		tm.mu.Lock()
		present := tm.sums[chunk] != nil
		tm.mu.Unlock()
		if present {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the chunk behind a direct read was never fetched")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, ok := tm.readDirect(ctx, p, off, &readahead{}); ok {
		t.Fatal("a cached chunk was read from the source")
	}
	if _, ok := tm.readDirect(ctx, make([]byte, directMax+1), 0, &readahead{}); ok {
		t.Fatal("a large read was served directly")
	}
	o.fail.Store(true)
	if _, ok := tm.readDirect(ctx, p, 900<<10, &readahead{}); ok {
		t.Fatal("a failed source read was reported as served")
	}
	o.fail.Store(false)
	got := make([]byte, len(data))
	if _, err := tm.ReadAt(ctx, got, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("template differs after direct reads")
	}
}

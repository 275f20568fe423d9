package imagecache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/errdefs"
)

// call is one in-flight ranged fetch; every chunk it covers points to it.
type call struct {
	done chan struct{}
	err  error
	// ahead marks a read-ahead fetch: its failure is not the waiters'
	// failure, they claim the chunks again and fetch them themselves.
	ahead bool
}

// ReadAt reads len(p) bytes at off, fetching missing chunks first. It
// returns io.EOF at the end of the template like os.File.
func (t *Template) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, _, err := t.readAt(ctx, p, off, &t.ra)
	return n, err
}

// readAt is ReadAt with the read-ahead state of one reader (an open file
// of the mount, or the template's own for ReadAt). missed reports that the
// read waited for bytes from the origin (a cache miss).
func (t *Template) readAt(ctx context.Context, p []byte, off int64, ra *readahead) (got int, missed bool, err error) {
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
	n, missed, err := t.ensure(ctx, off, int64(len(p)))
	if err != nil {
		return 0, missed, err
	}
	if !t.complete.Load() {
		t.lastRead.Store((off + n + t.cs - 1) / t.cs)
	}
	got, err = t.data.ReadAt(p[:n], off)
	if err != nil && !(errors.Is(err, io.EOF) && got == int(n)) {
		return got, missed, fmt.Errorf("template %s: read cache: %w", t.id, errors.Join(err, errdefs.ErrUnavailable))
	}
	if got < len(p) {
		return got, missed, io.EOF
	}
	return got, missed, nil
}

// Ensure makes [off, off+n) present in the data file, fetching missing
// chunks, and returns how many bytes of the range lie inside the template.
func (t *Template) Ensure(ctx context.Context, off, n int64) (int64, error) {
	n, _, err := t.ensure(ctx, off, n)
	return n, err
}

// ensure is Ensure; missed reports that it fetched chunks or waited for
// fetches in flight (chunks cached in an earlier life, only verified, are
// not a miss).
func (t *Template) ensure(ctx context.Context, off, n int64) (int64, bool, error) {
	if off < 0 || n < 0 {
		return 0, false, fmt.Errorf("template %s: read at %d: %w", t.id, off, errdefs.ErrInvalid)
	}
	if off >= t.size {
		return 0, false, nil
	}
	n = min(n, t.size-off)
	if n == 0 || t.complete.Load() {
		return n, false, nil
	}
	first, last := int(off/t.cs), int((off+n-1)/t.cs)
	missed := false
	for {
		t.mu.Lock()
		if t.failed != nil {
			t.mu.Unlock()
			return 0, missed, t.failed
		}
		if t.closed {
			t.mu.Unlock()
			return 0, missed, fmt.Errorf("template %s: removed: %w", t.id, errdefs.ErrNotFound)
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
			return n, missed, nil
		}
		missed = missed || len(runs) > 0 || len(waits) > 0
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
				return 0, missed, ctx.Err()
			}
		}
		if err != nil {
			return 0, missed, err
		}
		if err := ctx.Err(); err != nil {
			return 0, missed, err
		}
		// Loop: chunks another caller failed to fetch because its context
		// ended are claimed again.
	}
}

func isCtxErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
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
		t.c.corrupt.Add(1)
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
	t.c.fetched.Add(int64(max(got, 0)))
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

// directMax bounds the demand reads that readDirect serves from the
// source.
const directMax = 256 << 10

// readDirect serves a small read (at most directMax bytes) whose chunks
// are all missing and not being fetched, straight from the source, while
// those chunks are fetched into the cache in the background; it reports
// false (and the caller reads through the cache) otherwise, or when the
// source read fails. A reader's first byte then waits for its own few
// KiB, not for whole chunks: a cold 1 MiB chunk from an origin that reads
// its disk cold took 10-40 ms here, its first 4 KiB a few ms, and curl's
// first byte is the bar (BENCH.md). The bytes are as trusted as a fresh
// chunk's, which are served unverified too (their CRC-32C is computed on
// arrival; an announced whole-file digest is checked at completion). The
// cost is the read's bytes fetched twice. Sequential readers rarely get
// here: read-ahead has their next chunks in flight.
func (t *Template) readDirect(ctx context.Context, p []byte, off int64, ra *readahead) (int, bool) {
	if len(p) == 0 || len(p) > directMax || off < 0 || off >= t.size || t.complete.Load() {
		return 0, false
	}
	n := min(int64(len(p)), t.size-off)
	first, last := int(off/t.cs), int((off+n-1)/t.cs)
	t.mu.Lock()
	if t.closed || t.failed != nil || t.evicted {
		t.mu.Unlock()
		return 0, false
	}
	for i := first; i <= last; i++ {
		if t.sums[i] != nil || t.inflight[i] != nil {
			t.mu.Unlock()
			return 0, false
		}
	}
	t.wg.Add(1)
	t.mu.Unlock()
	t.touch()
	t.readAhead(ra, off, n)
	t.fetches.Add(1)
	got, err := t.src.ReadAtContext(ctx, p[:n], off)
	t.fetched.Add(int64(max(got, 0)))
	t.c.fetched.Add(int64(max(got, 0)))
	if int64(got) < n || (err != nil && !errors.Is(err, io.EOF)) {
		t.wg.Done()
		return 0, false
	}
	t.lastRead.Store((off + n + t.cs - 1) / t.cs)
	// Fetch the chunks only now: started together, the chunk's request
	// competed with this read for the origin (its cold disk) and delayed it.
	go func() {
		defer t.wg.Done()
		if _, err := t.Ensure(t.ctx, off, n); err != nil && !isCtxErr(err) {
			t.c.log.Debug("image cache: fetch behind a direct read failed; demand reads retry",
				"template", t.id, "offset", off, "err", err)
		}
	}()
	return int(n), true
}

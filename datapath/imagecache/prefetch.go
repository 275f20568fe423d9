package imagecache

import (
	"time"
)

// prefetch fetches the missing chunks, MaxMerge bytes at a time, at the
// cache's PrefetchRate, retrying failures with backoff. It follows the
// readers: each run starts at the first missing chunk after the most recent
// demand read (a booting guest reads near where it just read), and it
// wraps around to the start until no chunk is missing. It also verifies
// chunks cached in an earlier life (a local read, not paced), so that a
// fully cached template becomes complete. With verifyOnly it only
// verifies; missing chunks are left to demand reads.
func (t *Template) prefetch(verifyOnly bool) {
	defer t.wg.Done()
	// Every exit clears prefetching in the critical section that decided
	// it, so that start after an eviction never sees a stale true.
	exited := false
	defer func() {
		if !exited {
			t.mu.Lock()
			t.prefetching = false
			t.mu.Unlock()
		}
	}()
	ctx := t.ctx
	log := t.c.log.With("template", t.id)
	maxRun := int(t.c.o.MaxMerge / t.cs)
	backoff := time.Second
	todo := func(i int) bool {
		if t.sums[i] == nil {
			return !verifyOnly
		}
		return !t.checked[i]
	}
	paid := false // the rate was paid for a run that a reader's move superseded
	for i := 0; ; {
		if h := t.lastRead.Swap(-1); h >= 0 && h < int64(t.nchunks) {
			i = int(h) // follow the most recent reader
		}
		t.mu.Lock()
		for i < t.nchunks && !todo(i) {
			i++
		}
		if i >= t.nchunks {
			// Past the end: anything left before where we started?
			for i = 0; i < t.nchunks && !todo(i); i++ {
			}
		}
		j := i
		local := true // every chunk of the run is cached: verify only
		for j < t.nchunks && todo(j) && j-i < maxRun {
			local = local && t.sums[j] != nil
			j++
		}
		if i >= t.nchunks || t.failed != nil || t.evicted {
			t.prefetching = false
			exited = true
			t.mu.Unlock()
			return
		}
		t.mu.Unlock()
		off := int64(i) * t.cs
		n := min(int64(j)*t.cs, t.size) - off
		if !local && !paid {
			// An unlimited rate returns at once, even after ctx ended.
			if err := t.c.rate.Wait(ctx, n); err != nil || ctx.Err() != nil {
				return
			}
			if t.lastRead.Load() >= 0 {
				// A reader moved while we waited: fetch near it instead,
				// with the rate already paid.
				paid = true
				continue
			}
		}
		paid = false
		if _, err := t.Ensure(ctx, off, n); err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Warn("image cache: prefetch failed; retrying", "offset", off, "err", err, "retry_in", backoff)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 30*time.Second)
			continue
		}
		backoff = time.Second
		i = j
	}
}

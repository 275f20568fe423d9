package imagecache

import "sync"

// readahead is the sequential-read detector of one reader: an open file of
// the mount, or a template's ReadAt callers together.
type readahead struct {
	mu         sync.Mutex
	started    bool
	prev, next int64 // offset and end of the previous read
	win        int   // window in chunks; 0 until a sequential step
	end        int   // first chunk past what read-ahead has claimed
}

// raInitial is the first read-ahead window, before doubling.
const raInitial = 4 << 20

// readAhead notes a read of [off, off+n) by ra and, when the reader is
// sequential (it starts past its previous read's offset and where that read
// ended, give or take a chunk, as concurrent kernel reads may arrive out of
// order; re-reads of one offset by concurrent readers are not) and nears the
// end of what was already fetched ahead, claims the next window of chunks
// and fetches them in the background. The window doubles on every step up
// to Options.ReadAhead; a random access resets it. The read itself only
// waits for its own chunks (Ensure), some of which may be in flight here.
func (t *Template) readAhead(ra *readahead, off, n int64) {
	if t.c.o.ReadAhead < 0 || off < 0 || n <= 0 || off >= t.size {
		return
	}
	n = min(n, t.size-off)
	maxWin := max(int(t.c.o.ReadAhead/t.cs), 1)
	initWin := min(max(int(raInitial/t.cs), 1), maxWin)
	ra.mu.Lock()
	seq := ra.started && off > ra.prev && off <= ra.next+t.cs
	ra.started, ra.prev, ra.next = true, off, off+n
	if !seq {
		ra.win, ra.end = 0, 0
		ra.mu.Unlock()
		return
	}
	if ra.win == 0 {
		ra.win = initWin
	}
	last := int((off + n - 1) / t.cs)
	if last+ra.win/2 < ra.end {
		// Still well inside the window already fetched ahead.
		ra.mu.Unlock()
		return
	}
	from := max(ra.end, last+1)
	to := min(from+ra.win, t.nchunks)
	ra.end = max(to, ra.end)
	ra.win = min(2*ra.win, maxWin)
	ra.mu.Unlock()
	if from < to {
		t.fetchAhead(from, to)
	}
}

// fetchAhead claims the missing, unclaimed chunks of [from, to) and
// fetches them in the background, MaxMerge bytes per ranged request, under
// the template's context (so Remove and Close cancel them) and the cache's
// fetch semaphore. Chunks cached in an earlier life are left to the
// verification of demand reads.
func (t *Template) fetchAhead(from, to int) {
	type run struct {
		first, count int
		cl           *call
	}
	var runs []run
	maxRun := int(t.c.o.MaxMerge / t.cs)
	t.mu.Lock()
	if t.closed || t.failed != nil {
		t.mu.Unlock()
		return
	}
	for i := from; i < to; i++ {
		if t.sums[i] != nil || t.inflight[i] != nil {
			continue
		}
		if k := len(runs) - 1; k >= 0 && runs[k].first+runs[k].count == i && runs[k].count < maxRun {
			runs[k].count++
		} else {
			runs = append(runs, run{first: i, count: 1, cl: &call{done: make(chan struct{}), ahead: true}})
		}
		t.inflight[i] = runs[len(runs)-1].cl
	}
	t.wg.Add(len(runs))
	t.mu.Unlock()
	for _, r := range runs {
		go func() {
			defer t.wg.Done()
			if err := t.fetch(t.ctx, r.first, r.count, r.cl); err != nil && !isCtxErr(err) {
				t.c.log.Debug("image cache: read-ahead failed; demand reads retry",
					"template", t.id, "chunk", r.first, "chunks", r.count, "err", err)
			}
		}()
	}
}

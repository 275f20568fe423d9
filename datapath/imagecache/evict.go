package imagecache

import (
	"slices"
	"syscall"
)

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

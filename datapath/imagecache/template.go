package imagecache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/stowage/stowage/errdefs"
)

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
	f, err := os.OpenFile(filepath.Join(t.dir, "data"), os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
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

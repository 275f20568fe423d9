package stream

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/stowage/stowage/errdefs"
)

// VerifyOptions tune Verify; the zero value is a good default.
type VerifyOptions struct {
	Workers   int
	ChunkSize int
	// Progress, if set, is called every ProgressInterval and once at the end.
	Progress         func(Progress)
	ProgressInterval time.Duration
}

// VerifyResult is the outcome of Verify.
type VerifyResult struct {
	SizeA         int64   `json:"size_a"`
	SizeB         int64   `json:"size_b"`
	Equal         bool    `json:"equal"`
	FirstDiff     int64   `json:"first_difference"` // -1 when equal
	BytesCompared int64   `json:"bytes_compared"`
	BytesSkipped  int64   `json:"bytes_skipped_holes"` // holes on both sides
	Seconds       float64 `json:"seconds"`
}

// Verify compares the content of a and b by extents: ranges that are holes
// on both sides are equal without a read, a hole on one side is compared
// against zeros, data is read and compared. When the contents differ it
// returns the result (Equal false, FirstDiff the lowest differing offset)
// and an error wrapping errdefs.ErrDataLoss.
func Verify(ctx context.Context, a, b Source, opts VerifyOptions) (VerifyResult, error) {
	start := time.Now()
	if opts.Workers <= 0 {
		opts.Workers = DefaultWorkers
	}
	if opts.ChunkSize <= 0 {
		opts.ChunkSize = DefaultChunkSize
	}
	if opts.ProgressInterval <= 0 {
		opts.ProgressInterval = DefaultProgressInterval
	}
	res := VerifyResult{SizeA: a.Size(), SizeB: b.Size(), FirstDiff: -1}
	size := min(res.SizeA, res.SizeB)
	cs := int64(opts.ChunkSize)
	nchunks := (size + cs - 1) / cs
	var firstDiff atomic.Int64
	firstDiff.Store(-1)
	var compared, skipped, done atomic.Int64
	setDiff := func(off int64) {
		for {
			cur := firstDiff.Load()
			if cur >= 0 && cur <= off {
				return
			}
			if firstDiff.CompareAndSwap(cur, off) {
				return
			}
		}
	}

	g, gctx := errgroup.WithContext(ctx)
	type job struct {
		off, n int64
		ea, eb []Extent
	}
	jobs := make(chan job)
	g.Go(func() error {
		defer close(jobs)
		const window = 64
		for first := int64(0); first < nchunks; first += window {
			if firstDiff.Load() >= 0 {
				return nil
			}
			off := first * cs
			end := min((first+window)*cs, size)
			ea, err := a.Extents(gctx, off, end-off)
			if err != nil {
				return fmt.Errorf("extents of A at %d: %w", off, err)
			}
			eb, err := b.Extents(gctx, off, end-off)
			if err != nil {
				return fmt.Errorf("extents of B at %d: %w", off, err)
			}
			for c := off; c < end; c += cs {
				n := min(cs, end-c)
				j := job{off: c, n: n, ea: clip(ea, c, n), eb: clip(eb, c, n)}
				select {
				case jobs <- j:
				case <-gctx.Done():
					return gctx.Err()
				}
				if firstDiff.Load() >= 0 {
					return nil
				}
			}
		}
		return nil
	})
	for range opts.Workers {
		g.Go(func() error {
			ba, err := buffers.get(opts.ChunkSize)
			if err != nil {
				return err
			}
			defer buffers.put(ba)
			bb, err := buffers.get(opts.ChunkSize)
			if err != nil {
				return err
			}
			defer buffers.put(bb)
			for j := range jobs {
				if allHoles(j.ea) && allHoles(j.eb) {
					skipped.Add(j.n)
					done.Add(j.n)
					continue
				}
				if err := fillChunk(gctx, a, j.ea, ba, j.off); err != nil {
					return fmt.Errorf("A: %w", err)
				}
				if err := fillChunk(gctx, b, j.eb, bb, j.off); err != nil {
					return fmt.Errorf("B: %w", err)
				}
				compared.Add(j.n)
				done.Add(j.n)
				if !bytes.Equal(ba[:j.n], bb[:j.n]) {
					i := 0
					for i < int(j.n) && ba[i] == bb[i] {
						i++
					}
					setDiff(j.off + int64(i))
				}
			}
			return nil
		})
	}
	stop := make(chan struct{})
	var bg sync.WaitGroup
	if opts.Progress != nil {
		bg.Add(1)
		go func() {
			defer bg.Done()
			reportProgress(opts.ProgressInterval, stop, 0, func(now time.Time) Progress {
				return Progress{Total: size, Done: done.Load(), Read: 2 * compared.Load(), Elapsed: now.Sub(start)}
			}, opts.Progress)
		}()
	}
	err := g.Wait()
	close(stop)
	bg.Wait()
	res.BytesCompared, res.BytesSkipped = compared.Load(), skipped.Load()
	res.Seconds = time.Since(start).Seconds()
	if opts.Progress != nil {
		opts.Progress(Progress{Total: size, Done: done.Load(), Read: 2 * res.BytesCompared, Elapsed: time.Since(start), Final: true})
	}
	if err != nil {
		return res, err
	}
	res.FirstDiff = firstDiff.Load()
	if res.FirstDiff < 0 && res.SizeA != res.SizeB {
		res.FirstDiff = size
	}
	res.Equal = res.FirstDiff < 0
	switch {
	case res.SizeA != res.SizeB && res.FirstDiff == size:
		return res, fmt.Errorf("sizes differ: %d and %d bytes: %w", res.SizeA, res.SizeB, errdefs.ErrDataLoss)
	case !res.Equal:
		return res, fmt.Errorf("contents differ at byte %d: %w", res.FirstDiff, errdefs.ErrDataLoss)
	}
	return res, nil
}

// clip returns the parts of exts inside [off, off+n).
func clip(exts []Extent, off, n int64) []Extent {
	var out []Extent
	for _, x := range exts {
		if x.End() <= off || x.Off >= off+n {
			continue
		}
		s, t := max(x.Off, off), min(x.End(), off+n)
		out = append(out, Extent{Off: s, Len: t - s, Hole: x.Hole})
	}
	return out
}

func allHoles(exts []Extent) bool {
	for _, x := range exts {
		if !x.Hole {
			return false
		}
	}
	return true
}

// fillChunk fills buf with the bytes of the extents exts (which start at
// off): data is read, holes are zeroed.
func fillChunk(ctx context.Context, src Source, exts []Extent, buf []byte, off int64) error {
	for _, x := range exts {
		b := buf[x.Off-off : x.End()-off]
		if x.Hole {
			clear(b)
			continue
		}
		var n int
		var err error
		if cr, ok := src.(ContextReaderAt); ok {
			n, err = cr.ReadAtContext(ctx, b, x.Off)
		} else {
			n, err = src.ReadAt(b, x.Off)
		}
		if n == len(b) && (err == nil || err == io.EOF) {
			continue
		}
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("read at %d: %w", x.Off, err)
	}
	return nil
}

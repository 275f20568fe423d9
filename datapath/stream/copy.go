package stream

import (
	"context"
	"crypto/sha256"
	"encoding"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"math/bits"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/zeebo/xxh3"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/datapath/internal/pace"
	"github.com/stowage/stowage/errdefs"
)

// Copy copies src to dst and ends dst: on success it is committed (durable
// and visible under its final name); on failure it is aborted, or suspended
// with its checkpoint when the failure is one a later Resume can get past
// (cancellation, an unavailable source, an I/O error). A checksum mismatch
// always aborts, and its error wraps errdefs.ErrDataLoss.
//
// Copy does not close src.
func Copy(ctx context.Context, src Source, dst Sink, opts Options) (res Result, err error) {
	start := time.Now()
	o, err := opts.normalize()
	if err != nil {
		_ = dst.Abort()
		return res, err
	}
	e := &engine{src: src, dst: dst, o: o, log: o.Logger, start: start, size: src.Size()}
	res, err = e.run(ctx)
	err = spaceClass(err)
	res.Seconds = time.Since(start).Seconds()
	if res.Seconds > 0 {
		res.MiBPerS = float64(res.Size) / (1 << 20) / res.Seconds
	}
	result := "ok"
	switch {
	case err == nil:
		if cerr := dst.Commit(ctx); cerr != nil {
			err = fmt.Errorf("commit destination: %w", spaceClass(cerr))
			result = "error"
		}
	case errors.Is(err, errdefs.ErrDataLoss):
		_ = dst.Abort()
		result = "checksum_mismatch"
	default:
		result = "error"
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			result = "canceled"
		}
		if r, ok := dst.(Resumable); ok && e.ckptPath != "" && resumableFailure(err) {
			_ = r.Suspend()
		} else {
			_ = dst.Abort()
		}
	}
	metricCopies.WithLabelValues(res.Method, result).Inc()
	metricSeconds.Observe(res.Seconds)
	metricBytes.WithLabelValues("read").Add(float64(res.BytesRead))
	metricBytes.WithLabelValues("written").Add(float64(res.BytesWritten))
	metricBytes.WithLabelValues("hole").Add(float64(res.BytesHoles))
	metricBytes.WithLabelValues("zero").Add(float64(res.BytesZero))
	metricBytes.WithLabelValues("reflink").Add(float64(res.BytesReflink))
	metricBytes.WithLabelValues("resumed").Add(float64(res.BytesResumed))
	return res, err
}

// resumableFailure reports whether partial work should be kept for Resume.
// A full destination is not: keeping the partial file would keep the
// store full.
func resumableFailure(err error) bool {
	switch errdefs.Class(err) {
	case errdefs.ErrInvalid, errdefs.ErrNotFound, errdefs.ErrDataLoss, errdefs.ErrAborted, errdefs.ErrNotImplemented,
		errdefs.ErrResourceExhausted:
		return false
	}
	return true
}

// spaceClass is where the copy engine classes a full destination: an
// error caused by ENOSPC or EDQUOT (a sink's write, zeroing, sync or
// rename, or the checkpoint's) that carries no class yet gets
// errdefs.ErrResourceExhausted. Sinks return plain OS errors; OpenSink
// calls this for their creation, Copy once for the copy and once for
// Commit.
func spaceClass(err error) error {
	if err == nil || errdefs.Class(err) != nil {
		return err
	}
	if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT) {
		return fmt.Errorf("%w: %w", err, errdefs.ErrResourceExhausted)
	}
	return err
}

func (o Options) normalize() (Options, error) {
	if o.Workers <= 0 {
		o.Workers = DefaultWorkers
	}
	if o.Workers > 64 {
		return o, fmt.Errorf("workers %d: at most 64: %w", o.Workers, errdefs.ErrInvalid)
	}
	if o.ChunkSize == 0 {
		o.ChunkSize = DefaultChunkSize
	}
	if o.ChunkSize < 64<<10 || o.ChunkSize > 256<<20 || bits.OnesCount(uint(o.ChunkSize)) != 1 {
		return o, fmt.Errorf("chunk size %d: want a power of two from 64 KiB to 256 MiB: %w", o.ChunkSize, errdefs.ErrInvalid)
	}
	if o.ZeroBlock == 0 {
		o.ZeroBlock = DefaultZeroBlock
	}
	if o.ZeroBlock < 512 || o.ZeroBlock > o.ChunkSize || bits.OnesCount(uint(o.ZeroBlock)) != 1 {
		return o, fmt.Errorf("zero block %d: want a power of two from 512 to the chunk size: %w", o.ZeroBlock, errdefs.ErrInvalid)
	}
	if o.ExpectSHA256 != "" {
		h := strings.ToLower(strings.TrimPrefix(o.ExpectSHA256, "sha256:"))
		if b, err := hex.DecodeString(h); err != nil || len(b) != sha256.Size {
			return o, fmt.Errorf("expected checksum %q: want sha256:<64 hex digits>: %w", o.ExpectSHA256, errdefs.ErrInvalid)
		}
		o.ExpectSHA256 = h
	}
	if o.Dense {
		o.NoZeroDetect = true
		if o.Mode == CopyAuto {
			o.Mode = CopyReadWrite
		}
	}
	if o.CheckpointInterval == 0 {
		o.CheckpointInterval = DefaultCheckpointInterval
	}
	if o.ProgressInterval <= 0 {
		o.ProgressInterval = DefaultProgressInterval
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o, nil
}

// engine is the state of one Copy.
type engine struct {
	src   Source
	dst   Sink
	o     Options
	log   *slog.Logger
	start time.Time
	size  int64

	nchunks   int64
	zeroKnown bool
	wantSHA   bool
	srcSum    string
	ckptPath  string
	limiter   *pace.Limiter
	cfr       bool
	srcFD     int
	dstFD     int
	mapper    Mapper       // the source lends views of cached data
	direct    DirectWriter // the sink writes them without a copy

	mu     sync.Mutex // guards done, hashes
	done   []byte
	hashes []byte

	shaMu     sync.Mutex // guards sha, shaOffset
	sha       hash.Hash
	shaOffset int64

	read, written, holes, zeros, resumed, doneBytes atomic.Int64
	redone                                          atomic.Int64
}

// item is one chunk of work: the extents of chunk idx.
type item struct {
	idx      int64
	off, n   int64
	ext      []Extent
	hashOnly bool // already copied (resumed); read only to feed the SHA-256
}

func (e *engine) run(ctx context.Context) (Result, error) {
	o := e.o
	res := Result{Size: e.size, Workers: o.Workers, ChunkSize: o.ChunkSize, Method: "read-write"}
	if fs, ok := e.dst.(*FileSink); ok {
		res.WriteMode = fs.mode.String()
	}
	if c, ok := e.src.(Checksummed); ok && !o.IgnoreSourceChecksum {
		if sum, ok := c.SourceChecksum(); ok {
			e.srcSum = strings.ToLower(sum)
		}
	}
	e.wantSHA = o.SHA256 || o.ExpectSHA256 != "" || e.srcSum != ""
	if s, ok := e.src.(Sequential); ok && s.Sequential() {
		o.Workers = 1
		e.o.Workers = 1
		res.Workers = 1
	}
	if e.size == 0 {
		return e.finish(res)
	}

	// Reflink: the whole object in one ioctl when both ends allow it.
	if o.Mode == CopyAuto || o.Mode == CopyReflink {
		ok, err := e.tryReflink()
		if err != nil {
			return res, err
		}
		if ok {
			res.Method = "reflink"
			e.doneBytes.Store(e.size)
			res.BytesReflink = e.size
			if e.wantSHA {
				if err := e.hashSource(ctx); err != nil {
					return res, err
				}
			}
			return e.finish(res)
		}
		if o.Mode == CopyReflink {
			return res, fmt.Errorf("reflink: the filesystem cannot share extents between these files: %w", errdefs.ErrNotImplemented)
		}
	}
	if o.Mode == CopyCFR {
		sf, ok1 := e.src.(FileBacked)
		df, ok2 := e.dst.(FileBacked)
		if !ok1 || !ok2 {
			return res, fmt.Errorf("copy_file_range needs two local files: %w", errdefs.ErrInvalid)
		}
		e.cfr, e.srcFD, e.dstFD = true, int(sf.File().Fd()), int(df.File().Fd())
		res.Method = "copy_file_range"
	}

	e.nchunks = (e.size + int64(o.ChunkSize) - 1) / int64(o.ChunkSize)
	e.done = make([]byte, (e.nchunks+7)/8)
	e.hashes = make([]byte, 8*e.nchunks)
	if kz, ok := e.dst.(KnownZeroer); ok {
		e.zeroKnown = kz.KnownZero()
	}
	if r, ok := e.dst.(Resumable); ok && o.CheckpointInterval > 0 {
		e.ckptPath = r.CheckpointPath()
		if e.ckptPath != "" && o.Resume && r.Resumed() {
			if err := e.loadResume(ctx); err != nil {
				e.log.Warn("stream: not resuming: checkpoint unusable", "checkpoint", e.ckptPath, "err", err)
			}
		}
	}
	res.Resumed = e.resumed.Load() > 0
	if e.wantSHA && e.sha == nil {
		e.sha = sha256.New()
	}
	e.limiter = pace.NewLimiter(o.RateLimit)
	if m, ok := e.src.(Mapper); ok && !e.cfr {
		e.mapper = m
		e.direct, _ = e.dst.(DirectWriter)
	}

	err := e.copyChunks(ctx)
	res.BytesRead, res.BytesWritten = e.read.Load(), e.written.Load()
	res.BytesHoles, res.BytesZero, res.BytesResumed = e.holes.Load(), e.zeros.Load(), e.resumed.Load()
	res.ChunksRedone = e.redone.Load()
	if rc, ok := e.src.(interface{ Retries() int64 }); ok {
		res.ReadRetries = rc.Retries()
	}
	if err != nil {
		if e.ckptPath != "" && resumableFailure(err) {
			if serr := e.saveCheckpoint(); serr != nil {
				e.log.Warn("stream: saving checkpoint after failure", "err", serr)
			}
		}
		return res, err
	}
	return e.finish(res)
}

// finish checks the SHA-256 against what was expected.
func (e *engine) finish(res Result) (Result, error) {
	if !e.wantSHA {
		return res, nil
	}
	if e.sha == nil { // empty object or reflink without hashing
		e.sha = sha256.New()
	}
	e.shaMu.Lock()
	sum := hex.EncodeToString(e.sha.Sum(nil))
	e.shaMu.Unlock()
	res.SHA256 = sum
	if e.o.ExpectSHA256 != "" && sum != e.o.ExpectSHA256 {
		return res, fmt.Errorf("checksum mismatch: got sha256:%s, expected sha256:%s: %w", sum, e.o.ExpectSHA256, errdefs.ErrDataLoss)
	}
	if e.srcSum != "" {
		if sum != e.srcSum {
			return res, fmt.Errorf("checksum mismatch: got sha256:%s, the source announced sha256:%s: %w", sum, e.srcSum, errdefs.ErrDataLoss)
		}
		res.SourceChecked = true
	}
	return res, nil
}

// loadResume marks the chunks of a matching checkpoint done, after
// checking each against its recorded hash when the sink can be read back.
func (e *engine) loadResume(ctx context.Context) error {
	c, err := loadCheckpoint(e.ckptPath)
	if err != nil {
		return err
	}
	switch {
	case c.Identity != e.src.Identity():
		return fmt.Errorf("source changed: checkpoint is for %q, source is %q", c.Identity, e.src.Identity())
	case c.Size != e.size, c.ChunkSize != e.o.ChunkSize:
		return fmt.Errorf("checkpoint is for size %d chunk %d, copy has size %d chunk %d", c.Size, c.ChunkSize, e.size, e.o.ChunkSize)
	case int64(len(c.Done)) != int64(len(e.done)), int64(len(c.Hashes)) != int64(len(e.hashes)):
		return fmt.Errorf("checkpoint bitmap has the wrong length")
	}
	if e.wantSHA && len(c.SHAState) > 0 {
		h := sha256.New()
		if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(c.SHAState); err == nil && c.SHAOffset%int64(e.o.ChunkSize) == 0 {
			e.sha, e.shaOffset = h, c.SHAOffset
		}
	}
	copy(e.done, c.Done)
	copy(e.hashes, c.Hashes)
	ra, canVerify := e.dst.(io.ReaderAt)
	var buf []byte
	if canVerify && !e.o.NoResumeVerify {
		if buf, err = buffers.get(e.o.ChunkSize); err != nil {
			return err
		}
		defer buffers.put(buf)
	}
	for i := int64(0); i < e.nchunks; i++ {
		if !bitGet(e.done, i) {
			continue
		}
		off, n := e.chunkRange(i)
		if buf != nil {
			if err := ctx.Err(); err != nil {
				return err
			}
			k, err := ra.ReadAt(buf[:n], off)
			if (err != nil && err != io.EOF) || int64(k) != n || xxh3.Hash(buf[:n]) != binary.LittleEndian.Uint64(e.hashes[8*i:]) {
				bitClear(e.done, i)
				e.redone.Add(1)
				continue
			}
		}
		e.resumed.Add(n)
		e.doneBytes.Add(n)
	}
	if e.sha == nil && e.wantSHA {
		e.sha = sha256.New()
		e.shaOffset = 0
	}
	e.log.Debug("stream: resuming", "checkpoint", e.ckptPath, "bytes_done", e.resumed.Load(), "chunks_redone", e.redone.Load())
	return nil
}

func (e *engine) chunkRange(i int64) (off, n int64) {
	off = i * int64(e.o.ChunkSize)
	return off, min(int64(e.o.ChunkSize), e.size-off)
}

// copyChunks runs the producer, the workers, the in-order hasher, the
// checkpointer and the progress reporter until every chunk is done.
func (e *engine) copyChunks(ctx context.Context) error {
	o := e.o
	g, gctx := errgroup.WithContext(ctx)
	items := make(chan item)
	nbuf := o.Workers
	if e.wantSHA {
		nbuf = 2*o.Workers + 1
	}
	free := make(chan []byte, nbuf)
	var all [][]byte
	defer func() {
		for _, b := range all {
			buffers.put(b)
		}
	}()
	for range nbuf {
		b, err := buffers.get(o.ChunkSize)
		if err != nil {
			return fmt.Errorf("allocate buffers: %w", err)
		}
		all = append(all, b)
		free <- b
	}

	// the in-order SHA-256
	type hashed struct {
		idx  int64
		buf  []byte // the worker's buffer, returned to free once hashed
		segs []seg
	}
	var hashCh chan hashed
	shaStartIdx := e.nchunks
	if e.wantSHA {
		hashCh = make(chan hashed, nbuf)
		shaStartIdx = e.shaOffset / int64(o.ChunkSize)
		g.Go(func() error {
			pending := map[int64]hashed{}
			next := shaStartIdx
			for next < e.nchunks {
				var h hashed
				select {
				case h = <-hashCh:
				case <-gctx.Done():
					return gctx.Err()
				}
				pending[h.idx] = h
				for {
					p, ok := pending[next]
					if !ok {
						break
					}
					delete(pending, next)
					if err := e.hashInOrder(p.segs); err != nil {
						return err
					}
					free <- p.buf
					next++
				}
			}
			return nil
		})
	}

	// producer: chunks in order, with their extents
	g.Go(func() error {
		defer close(items)
		const window = 64 // chunks per Extents call
		shaStart := int64(-1)
		if e.wantSHA {
			shaStart = e.shaOffset / int64(o.ChunkSize)
		}
		for first := int64(0); first < e.nchunks; first += window {
			last := min(first+window, e.nchunks)
			// skip windows that are entirely done and need no hashing
			need := false
			for i := first; i < last && !need; i++ {
				need = !e.isDone(i) || (shaStart >= 0 && i >= shaStart)
			}
			if !need {
				continue
			}
			off := first * int64(o.ChunkSize)
			end := min(last*int64(o.ChunkSize), e.size)
			exts, err := e.src.Extents(gctx, off, end-off)
			if err != nil {
				return fmt.Errorf("source extents at %d: %w", off, err)
			}
			if err := checkExtents(exts, off, end); err != nil {
				return err
			}
			for i := first; i < last; i++ {
				done := e.isDone(i)
				if done && !(shaStart >= 0 && i >= shaStart) {
					continue
				}
				co, cn := e.chunkRange(i)
				it := item{idx: i, off: co, n: cn, hashOnly: done}
				for len(exts) > 0 && exts[0].End() <= co {
					exts = exts[1:]
				}
				for _, x := range exts {
					if x.Off >= co+cn {
						break
					}
					s, t := max(x.Off, co), min(x.End(), co+cn)
					it.ext = append(it.ext, Extent{Off: s, Len: t - s, Hole: x.Hole})
				}
				select {
				case items <- it:
				case <-gctx.Done():
					return gctx.Err()
				}
			}
		}
		return nil
	})

	// workers
	var wg sync.WaitGroup
	for range o.Workers {
		wg.Add(1)
		g.Go(func() error {
			defer wg.Done()
			for {
				var buf []byte
				select {
				case buf = <-free:
				case <-gctx.Done():
					return gctx.Err()
				}
				var it item
				var ok bool
				select {
				case it, ok = <-items:
				case <-gctx.Done():
					return gctx.Err()
				}
				if !ok {
					free <- buf
					return nil
				}
				segs, err := e.doChunk(gctx, it, buf)
				if err != nil {
					return err
				}
				if hashCh != nil && it.idx >= shaStartIdx {
					h := hashed{idx: it.idx, buf: buf, segs: segs}
					select {
					case hashCh <- h:
					case <-gctx.Done():
						return gctx.Err()
					}
				} else {
					free <- buf
				}
			}
		})
	}

	// checkpointer and progress reporter
	stop := make(chan struct{})
	var bg sync.WaitGroup
	if e.ckptPath != "" {
		bg.Add(1)
		go func() {
			defer bg.Done()
			t := time.NewTicker(o.CheckpointInterval)
			defer t.Stop()
			for {
				select {
				case <-stop:
					return
				case <-t.C:
					if err := e.saveCheckpoint(); err != nil {
						e.log.Warn("stream: checkpoint", "path", e.ckptPath, "err", err)
					}
				}
			}
		}()
	}
	if o.Progress != nil {
		bg.Add(1)
		go func() {
			defer bg.Done()
			reportProgress(o.ProgressInterval, stop, e.doneBytes.Load(), func(time.Time) Progress { return e.progress() }, o.Progress)
		}()
	}
	err := g.Wait()
	close(stop)
	bg.Wait()
	if o.Progress != nil {
		p := e.progress()
		p.Final = true
		if s := p.Elapsed.Seconds(); s > 0 {
			p.BytesPerS = float64(p.Done) / s
		}
		o.Progress(p)
	}
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("copy interrupted: %w", ctx.Err())
		}
		return err
	}
	return nil
}

// reportProgress calls report every interval until stop is closed, with
// the progress snap returns at that tick and BytesPerS, the rate of Done
// since the previous tick (from Done = last at the start).
func reportProgress(interval time.Duration, stop <-chan struct{}, last int64, snap func(now time.Time) Progress, report func(Progress)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	lastT := time.Now()
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			p := snap(now)
			if dt := now.Sub(lastT).Seconds(); dt > 0 {
				p.BytesPerS = float64(p.Done-last) / dt
			}
			last, lastT = p.Done, now
			report(p)
		}
	}
}

func (e *engine) progress() Progress {
	return Progress{Total: e.size, Done: e.doneBytes.Load(), Read: e.read.Load(), Written: e.written.Load(), Elapsed: time.Since(e.start)}
}

func (e *engine) isDone(i int64) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return bitGet(e.done, i)
}

func checkExtents(exts []Extent, off, end int64) error {
	pos := off
	for _, x := range exts {
		if x.Off > pos || x.Len <= 0 {
			return fmt.Errorf("source extents leave a gap at %d: %w", pos, errdefs.ErrInternal)
		}
		pos = max(pos, x.End())
	}
	if pos < end {
		return fmt.Errorf("source extents end at %d before %d: %w", pos, end, errdefs.ErrInternal)
	}
	return nil
}

// seg is a piece of a chunk's content, in order: data bytes (in the
// worker's buffer, or lent by a Mapper) or a run of zeros.
type seg struct {
	data  []byte
	zeros int64
}

// mappedFault, deferred after debug.SetPanicOnFault(true), turns the
// fault of a read from a mapped source file that was truncated under us
// into an errdefs.ErrAborted error in *err; any other panic goes on.
func mappedFault(err *error) {
	if r := recover(); r != nil {
		if _, ok := r.(interface{ Addr() uintptr }); !ok {
			panic(r)
		}
		*err = fmt.Errorf("source changed during the copy (mapped read faulted): %v: %w", r, errdefs.ErrAborted)
	}
}

// doChunk copies one chunk and returns its content as segments (for the
// hashes); data segments point into buf or into the source's mapping.
func (e *engine) doChunk(ctx context.Context, it item, buf []byte) (segs []seg, err error) {
	if e.mapper != nil {
		// a mapped source file truncated under us faults: make it an error
		defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
		defer mappedFault(&err)
	}
	needBytes := !e.cfr || e.wantSHA
	for _, x := range it.ext {
		if x.Hole {
			segs = append(segs, seg{zeros: x.Len})
			if !it.hashOnly {
				if e.o.Dense {
					if err := e.writeZeros(x.Off, x.Len); err != nil {
						return nil, err
					}
				} else if !e.zeroKnown {
					if err := e.dst.Zero(x.Off, x.Len); err != nil {
						return nil, fmt.Errorf("zero destination at %d: %w", x.Off, err)
					}
				}
				e.holes.Add(x.Len)
			}
			continue
		}
		if e.cfr && !it.hashOnly {
			if err := e.copyRange(ctx, x); err != nil {
				return nil, err
			}
			e.written.Add(x.Len)
			if !e.wantSHA {
				segs = append(segs, seg{}) // data whose bytes were not seen
				continue
			}
		}
		if err := e.limiter.Wait(ctx, x.Len); err != nil {
			return nil, err
		}
		var b []byte
		mapped := false
		if e.mapper != nil && !e.cfr {
			b, mapped = e.mapper.MapRange(x.Off, x.Len)
		}
		if !mapped {
			b = buf[x.Off-it.off : x.End()-it.off]
			if err := e.readFull(ctx, b, x.Off); err != nil {
				return nil, err
			}
		}
		e.read.Add(x.Len)
		segs = append(segs, seg{data: b})
		if it.hashOnly || e.cfr {
			continue
		}
		write := e.dst.WriteAt
		if mapped && e.direct != nil {
			write = e.direct.WriteAtDirect
		}
		if e.o.NoZeroDetect {
			if _, err := write(b, x.Off); err != nil {
				return nil, fmt.Errorf("write destination at %d: %w", x.Off, err)
			}
			e.written.Add(x.Len)
			continue
		}
		err := zeroRuns(b, x.Off, e.o.ZeroBlock, func(s, t int, zero bool) error {
			off := x.Off + int64(s)
			if zero {
				e.zeros.Add(int64(t - s))
				if !e.zeroKnown {
					if err := e.dst.Zero(off, int64(t-s)); err != nil {
						return fmt.Errorf("zero destination at %d: %w", off, err)
					}
				}
				return nil
			}
			if _, err := write(b[s:t], off); err != nil {
				return fmt.Errorf("write destination at %d: %w", off, err)
			}
			e.written.Add(int64(t - s))
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	if it.hashOnly {
		return segs, nil
	}
	var h uint64
	switch {
	case allZeros(segs):
		h = zeroHash(it.n)
	case !needBytes:
		h = 0 // bytes not seen (copy_file_range): resume cannot verify this chunk
	case len(segs) == 1:
		h = xxh3.Hash(segs[0].data)
	default:
		hs := xxh3.New()
		writeSegs(hs, segs)
		h = hs.Sum64()
	}
	e.mu.Lock()
	bitSet(e.done, it.idx)
	binary.LittleEndian.PutUint64(e.hashes[8*it.idx:], h)
	e.mu.Unlock()
	e.doneBytes.Add(it.n)
	return segs, nil
}

func allZeros(segs []seg) bool {
	for _, s := range segs {
		if s.zeros == 0 {
			return false
		}
	}
	return true
}

// writeSegs feeds the content of segs to w.
func writeSegs(w io.Writer, segs []seg) {
	for _, s := range segs {
		if s.data != nil {
			w.Write(s.data)
			continue
		}
		for left := s.zeros; left > 0; {
			k := min(left, int64(len(zeroPage)))
			w.Write(zeroPage[:k])
			left -= k
		}
	}
}

// hashInOrder feeds the next chunk's content to the SHA-256.
func (e *engine) hashInOrder(segs []seg) (err error) {
	if e.mapper != nil {
		defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
		defer mappedFault(&err)
	}
	var n int64
	for _, s := range segs {
		n += int64(len(s.data)) + s.zeros
	}
	e.shaMu.Lock()
	defer e.shaMu.Unlock()
	writeSegs(e.sha, segs)
	e.shaOffset += n
	return nil
}

// writeZeros writes n zero bytes at off (Dense copies).
func (e *engine) writeZeros(off, n int64) error {
	for n > 0 {
		k := min(n, int64(len(zeroPage)))
		if _, err := e.dst.WriteAt(zeroPage[:k], off); err != nil {
			return fmt.Errorf("write destination at %d: %w", off, err)
		}
		e.written.Add(k)
		off += k
		n -= k
	}
	return nil
}

// readFull fills b from the source at off.
func (e *engine) readFull(ctx context.Context, b []byte, off int64) error {
	var n int
	var err error
	if cr, ok := e.src.(ContextReaderAt); ok {
		n, err = cr.ReadAtContext(ctx, b, off)
	} else {
		n, err = e.src.ReadAt(b, off)
	}
	if n == len(b) && (err == nil || err == io.EOF) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read source at %d: %w", off, err)
}

func (e *engine) copyRange(ctx context.Context, x Extent) error {
	roff, woff := x.Off, x.Off
	for left := x.Len; left > 0; {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := unix.CopyFileRange(e.srcFD, &roff, e.dstFD, &woff, int(min(left, 1<<30)), 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("copy_file_range at %d: %w", roff, err)
		}
		if n == 0 {
			return fmt.Errorf("copy_file_range at %d: %w", roff, io.ErrUnexpectedEOF)
		}
		left -= int64(n)
	}
	return nil
}

var zeroHashes sync.Map // int64 length -> uint64

// zeroHash is the xxh3 of n zero bytes, cached per length.
func zeroHash(n int64) uint64 {
	if v, ok := zeroHashes.Load(n); ok {
		return v.(uint64)
	}
	h := xxh3.New()
	for left := n; left > 0; {
		k := min(left, int64(len(zeroPage)))
		h.Write(zeroPage[:k])
		left -= k
	}
	v := h.Sum64()
	zeroHashes.Store(n, v)
	return v
}

// saveCheckpoint syncs the sink and records the chunks done so far.
func (e *engine) saveCheckpoint() error {
	c := &checkpoint{Version: checkpointVersion, Identity: e.src.Identity(), Size: e.size, ChunkSize: e.o.ChunkSize}
	if e.wantSHA {
		e.shaMu.Lock()
		if m, ok := e.sha.(encoding.BinaryMarshaler); ok {
			if st, err := m.MarshalBinary(); err == nil {
				c.SHAState, c.SHAOffset = st, e.shaOffset
			}
		}
		e.shaMu.Unlock()
	}
	e.mu.Lock()
	c.Done = append([]byte(nil), e.done...)
	c.Hashes = append([]byte(nil), e.hashes...)
	e.mu.Unlock()
	if err := e.dst.Sync(); err != nil {
		return err
	}
	return c.save(e.ckptPath)
}

// tryReflink clones the whole source into the sink when both are regular
// files on one filesystem that supports FICLONE.
func (e *engine) tryReflink() (bool, error) {
	ss, ok1 := e.src.(*FileSource)
	ds, ok2 := e.dst.(*FileSink)
	if !ok1 || !ok2 || ss.block || ds.block {
		return false, nil
	}
	var a, b unix.Stat_t
	if unix.Fstat(int(ss.f.Fd()), &a) != nil || unix.Fstat(int(ds.f.Fd()), &b) != nil || a.Dev != b.Dev {
		return false, nil
	}
	err := unix.IoctlFileClone(int(ds.f.Fd()), int(ss.f.Fd()))
	if err == nil {
		return true, nil
	}
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOTTY) {
		e.log.Debug("stream: reflink not possible, copying", "err", err)
		return false, nil
	}
	return false, fmt.Errorf("reflink %s: %w", ds.tmp, err)
}

// hashSource computes the SHA-256 of the source by reading its data
// extents in order (used after a reflink).
func (e *engine) hashSource(ctx context.Context) error {
	buf, err := buffers.get(e.o.ChunkSize)
	if err != nil {
		return err
	}
	defer buffers.put(buf)
	e.sha = sha256.New()
	exts, err := e.src.Extents(ctx, 0, e.size)
	if err != nil {
		return fmt.Errorf("source extents: %w", err)
	}
	for _, x := range exts {
		for off := x.Off; off < x.End(); {
			n := min(int64(len(buf)), x.End()-off)
			if x.Hole {
				for left := n; left > 0; {
					k := min(left, int64(len(zeroPage)))
					e.sha.Write(zeroPage[:k])
					left -= k
				}
			} else {
				if err := e.readFull(ctx, buf[:n], off); err != nil {
					return err
				}
				e.read.Add(n)
				e.sha.Write(buf[:n])
			}
			off += n
		}
	}
	return nil
}

package chunkstore

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stowage/stowage/failpoint"

	"golang.org/x/sync/errgroup"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
)

// Source is what Backup reads: a flat disk image of Size bytes. A
// stream.Source (a file, a qcow2 chain, ...) is one.
type Source interface {
	io.ReaderAt
	Size() int64
}

// Extenter is implemented by sources that know where their holes are
// (stream.Source does): a chunk that is all holes is recorded as zero
// without reading it.
type Extenter interface {
	Extents(ctx context.Context, off, length int64) ([]stream.Extent, error)
}

// BackupOptions tune Backup. The zero value is a good default.
type BackupOptions struct {
	// ChunkSize is the chunk size (DefaultChunkSize; Parent's when a Parent
	// is given and ChunkSize is 0). With a Parent it must equal Parent's.
	ChunkSize int64
	// Workers is how many chunks are read, hashed and written at once.
	Workers int
	// Parent is the manifest of an earlier backup of the same disk.
	Parent *Manifest
	// ParentUnchanged, with Parent, reports whether [off, off+length) of
	// the source reads exactly as it did when Parent was taken (for a
	// qcow2 snapshot whose backing file Parent backed up: the range is not
	// allocated in the top layer). Such a chunk is taken from Parent
	// without reading when Parent's chunk is still stored.
	ParentUnchanged func(off, length int64) bool
	// Progress is called about twice a second and once at the end with the
	// bytes of the source handled so far and its size.
	Progress func(done, total int64)
	// Source is recorded in the manifest (Manifest.Source).
	Source string
}

// Stats describe what a Backup did.
type Stats struct {
	Size         int64 // virtual size of the image
	Chunks       int64 // chunks in the manifest
	ZeroChunks   int64 // all-zero chunks (not stored)
	NewChunks    int64 // chunks this backup wrote
	NewBytes     int64 // bytes this backup wrote
	ReusedChunks int64 // data chunks that were already stored
	ReusedBytes  int64 // their bytes
	ParentChunks int64 // chunks taken from the parent manifest without reading
	ReadBytes    int64 // bytes read from the source
}

// Backup cuts src into chunks, stores the new ones and writes the manifest
// name (a directory store: an absolute path whose directory exists; S3: a
// relative name). An existing manifest is errdefs.ErrAlreadyExists. It
// returns the manifest and what it cost.
func (s *Store) Backup(ctx context.Context, src Source, name string, opts BackupOptions) (*Manifest, Stats, error) {
	size := src.Size()
	chunk := opts.ChunkSize
	if chunk == 0 {
		chunk = DefaultChunkSize
		if opts.Parent != nil {
			chunk = opts.Parent.ChunkSize
		}
	}
	if err := checkChunkSize(chunk); err != nil {
		return nil, Stats{}, err
	}
	if opts.Parent != nil {
		if err := opts.Parent.Validate(); err != nil {
			return nil, Stats{}, fmt.Errorf("parent manifest: %v: %w", err, errdefs.ErrInvalid)
		}
		if opts.Parent.ChunkSize != chunk {
			return nil, Stats{}, fmt.Errorf("chunk size %d differs from the parent's %d: %w", chunk, opts.Parent.ChunkSize, errdefs.ErrInvalid)
		}
	}
	if size < 0 {
		return nil, Stats{}, fmt.Errorf("source size %d: %w", size, errdefs.ErrInvalid)
	}
	workers := opts.Workers
	if workers <= 0 {
		workers = DefaultWorkers
	}
	if _, err := s.b.ReadManifest(ctx, name); err == nil {
		return nil, Stats{}, fmt.Errorf("manifest %s: %w", name, errdefs.ErrAlreadyExists)
	} else if !errors.Is(err, errdefs.ErrNotFound) {
		return nil, Stats{}, err
	}

	ctx, unlock, err := s.lock(ctx, LockShared)
	if err != nil {
		return nil, Stats{}, err
	}
	defer unlock()

	m := &Manifest{Version: ManifestVersion, Size: size, ChunkSize: chunk,
		Chunks: make([]string, numChunks(size, chunk)), CreatedAt: time.Now().UTC().Truncate(time.Second), Source: opts.Source}
	b := &backup{s: s, src: src, m: m, opts: opts, claimed: map[string]bool{}}
	b.ext, _ = src.(Extenter)

	stop := make(chan struct{})
	finished := progressLoop(opts.Progress, size, b.done.Load, stop)
	err = b.run(ctx, workers)
	close(stop)
	<-finished
	st := b.stats()
	if err != nil {
		return nil, st, err
	}
	if err := s.syncChunks(ctx); err != nil {
		return nil, st, err
	}
	enc, err := encodeManifest(name, m)
	if err != nil {
		return nil, st, err
	}
	if err := failpoint.Hit(failpoint.ChunksBeforeManifest); err != nil {
		return nil, Stats{}, err
	}
	if err := s.b.CreateManifest(ctx, name, enc); err != nil {
		return nil, st, err
	}
	return m, st, nil
}

// backup is the state of one Backup.
type backup struct {
	s    *Store
	src  Source
	ext  Extenter
	m    *Manifest
	opts BackupOptions

	mu      sync.Mutex
	claimed map[string]bool // hashes this backup stored or is storing

	done, zero, newChunks, newBytes, reused, reusedBytes, parent, read atomic.Int64
}

func (b *backup) stats() Stats {
	return Stats{Size: b.m.Size, Chunks: int64(len(b.m.Chunks)), ZeroChunks: b.zero.Load(),
		NewChunks: b.newChunks.Load(), NewBytes: b.newBytes.Load(),
		ReusedChunks: b.reused.Load(), ReusedBytes: b.reusedBytes.Load(),
		ParentChunks: b.parent.Load(), ReadBytes: b.read.Load()}
}

func (b *backup) run(ctx context.Context, workers int) error {
	g, gctx := errgroup.WithContext(ctx)
	idx := make(chan int)
	g.Go(func() error {
		defer close(idx)
		for i := range b.m.Chunks {
			select {
			case idx <- i:
			case <-gctx.Done():
				return gctx.Err()
			}
		}
		return nil
	})
	for range workers {
		g.Go(func() error {
			buf := make([]byte, b.m.ChunkSize)
			for i := range idx {
				if err := b.chunk(gctx, i, buf); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("backup interrupted: %w", interruption(ctx))
		}
		return err
	}
	return nil
}

// chunk backs up chunk i using buf.
func (b *backup) chunk(ctx context.Context, i int, buf []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	off := int64(i) * b.m.ChunkSize
	n := b.m.chunkLen(i)
	defer b.done.Add(n)

	// Unchanged since the parent: take its entry without reading.
	if p := b.opts.Parent; p != nil && b.opts.ParentUnchanged != nil && i < len(p.Chunks) && p.chunkLen(i) == n && b.opts.ParentUnchanged(off, n) {
		h := p.Chunks[i]
		if h == ZeroChunk {
			b.m.Chunks[i] = ZeroChunk
			b.zero.Add(1)
			b.parent.Add(1)
			return nil
		}
		has, err := b.s.has(ctx, h, n)
		if err != nil {
			return err
		}
		if has {
			b.m.Chunks[i] = h
			b.parent.Add(1)
			b.reused.Add(1)
			b.reusedBytes.Add(n)
			return nil
		}
		// The parent's chunk is gone: read this one.
	}

	data := buf[:n]
	exts := []stream.Extent{{Off: off, Len: n}}
	if b.ext != nil {
		var err error
		if exts, err = b.ext.Extents(ctx, off, n); err != nil {
			return fmt.Errorf("source extents at %d: %w", off, err)
		}
	}
	allHole := true
	pos := off
	for _, x := range exts {
		s, e := max(x.Off, off), min(x.End(), off+n)
		if s >= e {
			continue
		}
		if s != pos {
			return fmt.Errorf("source extents leave a gap at %d: %w", pos, errdefs.ErrInternal)
		}
		part := data[s-off : e-off]
		if x.Hole {
			clear(part)
		} else {
			allHole = false
			if err := readFull(ctx, b.src, part, s); err != nil {
				return err
			}
			b.read.Add(e - s)
		}
		pos = e
	}
	if pos != off+n {
		return fmt.Errorf("source extents end at %d before %d: %w", pos, off+n, errdefs.ErrInternal)
	}
	if allHole || isZero(data) {
		b.m.Chunks[i] = ZeroChunk
		b.zero.Add(1)
		return nil
	}
	sum := sha256.Sum256(data)
	h := hex.EncodeToString(sum[:])
	b.m.Chunks[i] = h

	b.mu.Lock()
	mine := !b.claimed[h]
	b.claimed[h] = true
	b.mu.Unlock()
	if mine {
		has, err := b.s.has(ctx, h, n)
		if err != nil {
			return err
		}
		mine = !has
	}
	if !mine {
		b.reused.Add(1)
		b.reusedBytes.Add(n)
		return nil
	}
	if err := b.s.b.PutChunk(ctx, h, data); err != nil {
		return err
	}
	if err := failpoint.Hit(failpoint.ChunkAfterPut); err != nil {
		return err
	}
	b.newChunks.Add(1)
	b.newBytes.Add(n)
	return nil
}

// readFull fills p from src at off, with the context when src takes one.
func readFull(ctx context.Context, src Source, p []byte, off int64) error {
	var n int
	var err error
	if cr, ok := src.(stream.ContextReaderAt); ok {
		n, err = cr.ReadAtContext(ctx, p, off)
	} else {
		n, err = src.ReadAt(p, off)
	}
	if n == len(p) && (err == nil || err == io.EOF) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read source at %d: %w", off, err)
}

// isZero reports whether b is all zero bytes.
func isZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// RestoreOptions tune Restore.
type RestoreOptions struct {
	// Workers is how many chunks are read, verified and written at once.
	Workers int
	// Progress is called about twice a second and once at the end.
	Progress func(done, total int64)
}

// zeroer is implemented by destinations that can make a range read as
// zeros cheaply (stream.Sink punches a hole).
type zeroer interface {
	Zero(off, length int64) error
}

// zeroBlock is the unit in which Restore leaves zeros unwritten.
const zeroBlock = 4096

// Restore writes the image m describes into dst, verifying every chunk
// (errdefs.ErrDataLoss when one is missing, short or corrupt). When dst
// reads as zeros where nothing was written (a stream.KnownZeroer that says
// so, e.g. a fresh stream file sink), zero chunks and zero blocks are not
// written and stay holes; otherwise zero chunks are zeroed (dst's Zero
// when it has one). Restore does not sync or commit dst.
func (s *Store) Restore(ctx context.Context, m *Manifest, dst io.WriterAt, opts RestoreOptions) error {
	if err := m.Validate(); err != nil {
		return fmt.Errorf("manifest: %v: %w", err, errdefs.ErrInvalid)
	}
	workers := opts.Workers
	if workers <= 0 {
		workers = DefaultWorkers
	}
	knownZero := false
	if kz, ok := dst.(stream.KnownZeroer); ok {
		knownZero = kz.KnownZero()
	}
	z, canZero := dst.(zeroer)

	ctx, unlock, err := s.lock(ctx, LockShared)
	if err != nil {
		return err
	}
	defer unlock()

	var done atomic.Int64
	stop := make(chan struct{})
	finished := progressLoop(opts.Progress, m.Size, done.Load, stop)
	defer func() { close(stop); <-finished }()

	g, gctx := errgroup.WithContext(ctx)
	idx := make(chan int)
	g.Go(func() error {
		defer close(idx)
		for i := range m.Chunks {
			select {
			case idx <- i:
			case <-gctx.Done():
				return gctx.Err()
			}
		}
		return nil
	})
	for range workers {
		g.Go(func() error {
			buf := make([]byte, m.ChunkSize)
			for i := range idx {
				if err := gctx.Err(); err != nil {
					return err
				}
				off, n := int64(i)*m.ChunkSize, m.chunkLen(i)
				if m.Chunks[i] == ZeroChunk {
					if !knownZero {
						if err := zeroRange(dst, z, canZero, buf, off, n); err != nil {
							return err
						}
					}
					done.Add(n)
					continue
				}
				data := buf[:n]
				if err := s.readChunk(gctx, m.Chunks[i], data); err != nil {
					return fmt.Errorf("chunk %d (offset %d): %w", i, off, err)
				}
				if err := writeChunk(dst, data, off, knownZero); err != nil {
					return err
				}
				done.Add(n)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("restore interrupted: %w", interruption(ctx))
		}
		return err
	}
	return nil
}

// writeChunk writes data at off; on a known-zero destination it leaves out
// the all-zero blocks.
func writeChunk(dst io.WriterAt, data []byte, off int64, knownZero bool) error {
	if !knownZero {
		if _, err := dst.WriteAt(data, off); err != nil {
			return fmt.Errorf("write destination at %d: %w", off, err)
		}
		return nil
	}
	start := -1 // start of the pending non-zero run
	flush := func(end int) error {
		if start < 0 {
			return nil
		}
		if _, err := dst.WriteAt(data[start:end], off+int64(start)); err != nil {
			return fmt.Errorf("write destination at %d: %w", off+int64(start), err)
		}
		start = -1
		return nil
	}
	for p := 0; p < len(data); p += zeroBlock {
		e := min(p+zeroBlock, len(data))
		if isZero(data[p:e]) {
			if err := flush(p); err != nil {
				return err
			}
			continue
		}
		if start < 0 {
			start = p
		}
	}
	return flush(len(data))
}

// zeroRange makes [off, off+n) of dst read as zeros.
func zeroRange(dst io.WriterAt, z zeroer, canZero bool, buf []byte, off, n int64) error {
	if canZero {
		if err := z.Zero(off, n); err != nil {
			return fmt.Errorf("zero destination at %d: %w", off, err)
		}
		return nil
	}
	clear(buf[:n])
	if _, err := dst.WriteAt(buf[:n], off); err != nil {
		return fmt.Errorf("write destination at %d: %w", off, err)
	}
	return nil
}

// DeleteStats describe what a Delete removed.
type DeleteStats struct {
	Size          int64 // virtual size of the deleted backup
	Chunks        int64 // chunks in its manifest
	ZeroChunks    int64
	RemovedChunks int64 // chunks no other manifest referred to, now removed
	RemovedBytes  int64
	KeptChunks    int64 // distinct chunks other manifests still use
}

// Delete removes the manifest name and the chunks that no other manifest
// that may share them (ListManifests) refers to. A missing manifest is not
// an error (nothing to do). Chunks go first and the manifest last, so a
// Delete interrupted by a crash is finished by running it again.
func (s *Store) Delete(ctx context.Context, name string) (DeleteStats, error) {
	ctx, unlock, err := s.lock(ctx, LockExclusive)
	if err != nil {
		return DeleteStats{}, err
	}
	defer unlock()
	m, err := s.Manifest(ctx, name)
	if errors.Is(err, errdefs.ErrNotFound) {
		return DeleteStats{}, nil
	}
	if err != nil {
		return DeleteStats{}, err
	}
	names, err := s.b.ListManifests(ctx, name)
	if err != nil {
		return DeleteStats{}, err
	}
	used := map[[32]byte]struct{}{}
	if _, err := s.referenced(ctx, names, name, func(k [32]byte) { used[k] = struct{}{} }); err != nil {
		return DeleteStats{}, err
	}
	st := DeleteStats{Size: m.Size, Chunks: int64(len(m.Chunks))}
	seen := map[string]bool{}
	for i, h := range m.Chunks {
		if h == ZeroChunk {
			st.ZeroChunks++
			continue
		}
		if seen[h] {
			continue
		}
		seen[h] = true
		if _, ok := used[hashKey(h)]; ok {
			st.KeptChunks++
			continue
		}
		if i%64 == 0 {
			if err := ctx.Err(); err != nil {
				return st, interruption(ctx)
			}
		}
		n, err := s.b.RemoveChunk(ctx, h)
		if errors.Is(err, errdefs.ErrNotFound) {
			continue
		}
		if err != nil {
			return st, err
		}
		st.RemovedChunks++
		st.RemovedBytes += n
	}
	if err := s.syncChunks(ctx); err != nil {
		return st, err
	}
	if err := s.b.RemoveManifest(ctx, name); err != nil {
		return st, err
	}
	return st, nil
}

// interruption is why ctx ended: its cause (a lost lease) or its error.
func interruption(ctx context.Context) error {
	if c := context.Cause(ctx); c != nil {
		return c
	}
	return ctx.Err()
}

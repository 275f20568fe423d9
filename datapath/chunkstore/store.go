// Package chunkstore keeps disk images as content-addressed chunks: an image
// is cut into fixed-size chunks (DefaultChunkSize, 4 MiB), each stored once
// under its SHA-256 as <dir>/<first two hex digits>/<hash>, and a backup is
// a Manifest (JSON) listing the chunks in order. All-zero chunks are never
// stored; the manifest says "zero". A chunk already in the store is not
// written again, so a second backup of a disk that changed a little writes
// only the changed chunks, and backups of a whole snapshot chain share what
// they have in common.
//
//	s, err := chunkstore.Open("/srv/image/backups/chunks")
//	m, stats, err := s.Backup(ctx, src, "/srv/image/backups/vol1/snap2.json",
//		chunkstore.BackupOptions{Parent: snap1Manifest, ParentUnchanged: unchanged})
//	err = s.Restore(ctx, m, dst, chunkstore.RestoreOptions{})
//	stats, err := s.Delete(ctx, "/srv/image/backups/vol1/snap1.json")
//
// Rules the package keeps:
//
//   - Nothing is visible half-written. A chunk is written to a temporary
//     name in its directory, fsynced and renamed to its hash; the directories
//     are fsynced before the manifest is written the same way, so a
//     manifest never names a chunk that a crash can lose.
//   - Restore verifies every chunk's SHA-256 and length before writing it;
//     a bad or missing chunk is errdefs.ErrDataLoss.
//   - Delete removes a manifest and the chunks no other manifest in the same
//     directory refers to. Manifests that share a chunk directory must
//     therefore live in one manifests directory, which holds only manifests
//     (and hidden temporary files); a file there that is not a manifest
//     stops Delete (errdefs.ErrFailedPrecondition) rather than risk data.
//   - Backup and Restore hold a shared lock on the store (flock on
//     <dir>/.lock), Delete an exclusive one, so a backup that found a chunk
//     already present cannot lose it to a concurrent delete before its own
//     manifest is written. The lock works across processes and, with NFSv4
//     locks, across hosts.
//
// Work is spread over a bounded number of workers (BackupOptions.Workers,
// default 4), each with one chunk buffer.
package chunkstore

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/errdefs"
)

// DefaultWorkers is the number of chunks processed at once by default.
const DefaultWorkers = 4

// Store is a chunk directory. It is safe for concurrent use.
type Store struct {
	dir string
}

// Open returns the store in dir, creating the directory if needed.
func Open(dir string) (*Store, error) {
	if dir == "" || !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("chunk store %q: want an absolute directory: %w", dir, errdefs.ErrInvalid)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("chunk store %s: %w", dir, classOf(err))
	}
	return &Store{dir: dir}, nil
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

// ChunkPath is where the chunk with SHA-256 hash (lower-case hex) lives.
func (s *Store) ChunkPath(hash string) string {
	return filepath.Join(s.dir, hash[:2], hash)
}

// has reports whether the chunk is stored with the right length. A chunk
// of the wrong length (a damaged store) counts as missing and is written
// again.
func (s *Store) has(hash string, n int64) bool {
	fi, err := os.Stat(s.ChunkPath(hash))
	return err == nil && fi.Mode().IsRegular() && fi.Size() == n
}

// put stores data under hash: temporary file, fsync, rename. The caller
// fsyncs the chunk's directory (syncer) before relying on it.
func (s *Store) put(hash string, data []byte, dirs *dirSyncer) error {
	dir := filepath.Join(s.dir, hash[:2])
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("chunk directory %s: %w", dir, classOf(err))
	} else if err == nil {
		dirs.add(s.dir)
	}
	tmp := filepath.Join(dir, ".tmp-"+randomHex(8))
	if err := writeFileSync(tmp, data, 0o444); err != nil {
		return fmt.Errorf("write chunk %s: %w", hash, classOf(err))
	}
	// Replacing is fine: the name is the content (and heals a damaged chunk).
	if err := os.Rename(tmp, s.ChunkPath(hash)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write chunk %s: %w", hash, classOf(err))
	}
	dirs.add(dir)
	return nil
}

// readChunk reads chunk hash of length n into buf[:n] and verifies it.
func (s *Store) readChunk(hash string, buf []byte) error {
	p := s.ChunkPath(hash)
	f, err := os.Open(p)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("chunk %s is missing: %w", hash, errors.Join(err, errdefs.ErrDataLoss))
		}
		return fmt.Errorf("chunk %s: %w", hash, classOf(err))
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("chunk %s: %w", hash, classOf(err))
	}
	if fi.Size() != int64(len(buf)) {
		return fmt.Errorf("chunk %s holds %d bytes, the manifest needs %d: %w", hash, fi.Size(), len(buf), errdefs.ErrDataLoss)
	}
	if _, err := io.ReadFull(f, buf); err != nil {
		return fmt.Errorf("read chunk %s: %w", hash, classOf(err))
	}
	sum := sha256.Sum256(buf)
	if got := hex.EncodeToString(sum[:]); got != hash {
		return fmt.Errorf("chunk %s is corrupt: its content hashes to %s: %w", p, got, errdefs.ErrDataLoss)
	}
	return nil
}

// dirSyncer collects directories to fsync once at the end.
type dirSyncer struct {
	mu   sync.Mutex
	dirs map[string]bool
}

func (d *dirSyncer) add(dir string) {
	d.mu.Lock()
	if d.dirs == nil {
		d.dirs = map[string]bool{}
	}
	d.dirs[dir] = true
	d.mu.Unlock()
}

func (d *dirSyncer) sync() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for dir := range d.dirs {
		if err := syncDir(dir); err != nil {
			return fmt.Errorf("sync %s: %w", dir, classOf(err))
		}
	}
	d.dirs = nil
	return nil
}

// lock takes the store's flock (shared or exclusive), polling so that ctx
// can end the wait. The returned function releases it.
func (s *Store) lock(ctx context.Context, exclusive bool) (func(), error) {
	f, err := os.OpenFile(filepath.Join(s.dir, ".lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("chunk store %s: lock: %w", s.dir, classOf(err))
	}
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	wait := time.Millisecond
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil // closing releases the lock
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("chunk store %s: lock: %w", s.dir, classOf(err))
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			f.Close()
			return nil, fmt.Errorf("chunk store %s: waiting for the lock: %w", s.dir, ctx.Err())
		case <-t.C:
		}
		wait = min(2*wait, 100*time.Millisecond)
	}
}

// classOf adds an errdefs class to an OS error.
func classOf(err error) error {
	if err == nil || errdefs.Class(err) != nil {
		return err
	}
	var class error = errdefs.ErrInternal
	var errno unix.Errno
	switch {
	case errors.Is(err, fs.ErrNotExist):
		class = errdefs.ErrNotFound
	case errors.As(err, &errno):
		switch errno {
		case unix.EACCES, unix.EPERM:
			class = errdefs.ErrPermissionDenied
		case unix.ENOSPC, unix.EDQUOT:
			class = errdefs.ErrResourceExhausted
		case unix.EROFS, unix.ENOTDIR, unix.EISDIR:
			class = errdefs.ErrFailedPrecondition
		case unix.EIO, unix.ESTALE, unix.ETIMEDOUT, unix.EHOSTDOWN, unix.EHOSTUNREACH, unix.ENOTCONN:
			class = errdefs.ErrUnavailable
		}
	}
	return errors.Join(err, class)
}

// progressLoop calls fn with done() every interval until stop is closed,
// then once more; it returns when the last call returned.
func progressLoop(fn func(done, total int64), total int64, done func() int64, stop <-chan struct{}) <-chan struct{} {
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		if fn == nil {
			<-stop
			return
		}
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				fn(done(), total)
				return
			case <-t.C:
				fn(done(), total)
			}
		}
	}()
	return finished
}

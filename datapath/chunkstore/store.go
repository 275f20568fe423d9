// Package chunkstore keeps disk images as content-addressed chunks: an image
// is cut into fixed-size chunks (DefaultChunkSize, 4 MiB), each stored once
// under its SHA-256, and a backup is a Manifest (JSON) listing the chunks
// in order. All-zero chunks are never stored; the manifest says "zero". A
// chunk already in the store is not written again, so a second backup of a
// disk that changed a little writes only the changed chunks, and backups
// of a whole snapshot chain share what they have in common.
//
// The backup, restore and delete logic (Store) runs over a small Backend
// (ChunkBackend + ManifestBackend, with the optional roles Locker and
// Syncer). Two backends come with the package:
//
//   - a directory (Open): chunks are <dir>/<first two hex digits>/<hash>;
//     a manifest is named by its absolute file path, anywhere, and the
//     manifests that share chunks are the files of one directory.
//
//   - an S3 bucket and prefix (OpenS3): chunks are PREFIX/chunks/<hh>/<hash>,
//     manifests PREFIX/manifests/<name>.json named by a relative name
//     ("vol1/snap2"); every manifest under the prefix shares the chunks.
//
//     s, err := chunkstore.Open("/srv/image/backups/chunks")
//     m, stats, err := s.Backup(ctx, src, "/srv/image/backups/vol1/snap2.json",
//     chunkstore.BackupOptions{Parent: snap1Manifest, ParentUnchanged: unchanged})
//     err = s.Restore(ctx, m, dst, chunkstore.RestoreOptions{})
//     stats, err := s.Delete(ctx, "/srv/image/backups/vol1/snap1.json")
//     cstats, err := s.Collect(ctx, "/srv/image/backups/vol1/any.json")
//
//     s3s, err := chunkstore.OpenS3(ctx, chunkstore.S3Config{Endpoint: "http://127.0.0.1:9000",
//     Bucket: "backups", Prefix: "zone1", AccessKey: ak, SecretKey: sk})
//     m, stats, err := s3s.Backup(ctx, src, "vol1/snap2", chunkstore.BackupOptions{})
//
// Rules the package keeps:
//
//   - Nothing is visible half-written. In a directory a chunk is written to
//     a temporary name, fsynced and renamed to its hash, and the directories
//     are fsynced before the manifest is written the same way; on S3 each
//     chunk and the manifest is one PUT, and the manifest is PUT (with
//     If-None-Match: *) only after every chunk it names is stored. So a
//     manifest never names a chunk that a crash can lose.
//   - Restore verifies every chunk's SHA-256 and length before writing it;
//     a bad or missing chunk is errdefs.ErrDataLoss.
//   - Delete removes a manifest and the chunks no other manifest that may
//     share them refers to (ManifestBackend.ListManifests). Something among
//     those manifests that is not a manifest stops Delete
//     (errdefs.ErrFailedPrecondition) rather than risk data.
//   - Collect removes the chunks no manifest refers to (what a backup that
//     died before its manifest left behind), under the same rules: every
//     manifest must be readable or nothing is removed.
//   - Backup and Restore hold a shared lock on the store, Delete and
//     Collect an exclusive one, so a backup that found a chunk already present cannot
//     lose it to a concurrent delete before its own manifest is written.
//     In a directory the lock is flock on <dir>/.lock (across processes
//     and, with NFSv4 locks, across hosts). S3 has no locks: the S3 backend
//     keeps leases as objects under PREFIX/locks/ (see OpenS3 for the
//     protocol and what it does not cover).
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
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/errdefs"
)

// DefaultWorkers is the number of chunks processed at once by default.
const DefaultWorkers = 4

// Store is backup, restore and delete over a Backend. It is safe for
// concurrent use.
type Store struct {
	b   Backend
	dir string // the directory backend's directory, else ""
}

// New returns a store over b.
func New(b Backend) *Store { return &Store{b: b} }

// Open returns the store in the directory dir, creating it if needed.
// Manifests are named by absolute file paths.
func Open(dir string) (*Store, error) {
	if dir == "" || !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("chunk store %q: want an absolute directory: %w", dir, errdefs.ErrInvalid)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("chunk store %s: %w", dir, classOf(err))
	}
	return &Store{b: &dirBackend{dir: dir}, dir: dir}, nil
}

// Backend is the store's backend.
func (s *Store) Backend() Backend { return s.b }

// Dir is the directory of a store opened with Open, else "".
func (s *Store) Dir() string { return s.dir }

// ChunkPath is where the chunk with SHA-256 hash (lower-case hex) lives in
// a store opened with Open ("" for other stores).
func (s *Store) ChunkPath(hash string) string {
	if s.dir == "" {
		return ""
	}
	return filepath.Join(s.dir, hash[:2], hash)
}

// Manifest reads and validates the manifest name (errdefs.ErrNotFound when
// there is none, errdefs.ErrDataLoss when it is not a valid manifest).
func (s *Store) Manifest(ctx context.Context, name string) (*Manifest, error) {
	b, err := s.b.ReadManifest(ctx, name)
	if err != nil {
		return nil, err
	}
	return parseManifest(name, b)
}

// ListManifests returns the names of the manifests that may share chunks
// with near (see ManifestBackend.ListManifests; S3 ignores near).
func (s *Store) ListManifests(ctx context.Context, near string) ([]string, error) {
	return s.b.ListManifests(ctx, near)
}

// has reports whether the chunk is stored with the right length. A chunk
// of the wrong length (a damaged store) counts as missing and is written
// again.
func (s *Store) has(ctx context.Context, hash string, n int64) (bool, error) {
	got, err := s.b.StatChunk(ctx, hash)
	if errors.Is(err, errdefs.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return got == n, nil
}

// readChunk reads chunk hash of length len(buf) into buf and verifies it.
func (s *Store) readChunk(ctx context.Context, hash string, buf []byte) error {
	if err := s.b.ReadChunk(ctx, hash, buf); err != nil {
		if errors.Is(err, errdefs.ErrNotFound) {
			// %v: the class is data loss, not "not found".
			return fmt.Errorf("chunk %s is missing: %v: %w", hash, err, errdefs.ErrDataLoss)
		}
		return err
	}
	sum := sha256.Sum256(buf)
	if got := hex.EncodeToString(sum[:]); got != hash {
		return fmt.Errorf("chunk %s is corrupt: its content hashes to %s: %w", hash, got, errdefs.ErrDataLoss)
	}
	return nil
}

// lock takes the backend's lock when it has one. The returned context is
// the one to work under.
func (s *Store) lock(ctx context.Context, mode LockMode) (context.Context, func(), error) {
	if l, ok := s.b.(Locker); ok {
		return l.Lock(ctx, mode)
	}
	return ctx, func() {}, nil
}

// syncChunks makes stored chunks durable when the backend needs it.
func (s *Store) syncChunks(ctx context.Context) error {
	if sy, ok := s.b.(Syncer); ok {
		return sy.SyncChunks(ctx)
	}
	return nil
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

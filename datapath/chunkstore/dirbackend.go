package chunkstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/errdefs"
)

// LockFile is the file in a chunk directory that backups lock shared and
// deletes and collections exclusive: not data, and left behind by them.
const LockFile = ".lock"

// dirBackend keeps chunks as <dir>/<hh>/<hash> and manifests as files at
// absolute paths anywhere (a manifest's siblings are the files of its
// directory). Writes are temporary file, fsync, rename; directories are
// fsynced by SyncChunks before a manifest names their chunks.
type dirBackend struct {
	dir  string
	dirs dirSyncer // directories with entries not yet fsynced
}

var (
	_ Backend = (*dirBackend)(nil)
	_ Locker  = (*dirBackend)(nil)
	_ Syncer  = (*dirBackend)(nil)
)

func (d *dirBackend) String() string { return "chunk store " + d.dir }

func (d *dirBackend) chunkPath(hash string) string {
	return filepath.Join(d.dir, hash[:2], hash)
}

func (d *dirBackend) StatChunk(_ context.Context, hash string) (int64, error) {
	fi, err := os.Stat(d.chunkPath(hash))
	if err != nil {
		return 0, fmt.Errorf("chunk %s: %w", hash, classOf(err))
	}
	if !fi.Mode().IsRegular() {
		// Not a chunk (a damaged store): counts as missing, written again.
		return 0, fmt.Errorf("chunk %s is not a regular file: %w", hash, errdefs.ErrNotFound)
	}
	return fi.Size(), nil
}

func (d *dirBackend) PutChunk(_ context.Context, hash string, data []byte) error {
	dir := filepath.Join(d.dir, hash[:2])
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("chunk directory %s: %w", dir, classOf(err))
	} else if err == nil {
		d.dirs.add(d.dir)
	}
	tmp := filepath.Join(dir, ".tmp-"+randomHex(8))
	if err := durable.WriteNew(tmp, data, 0o444); err != nil {
		return fmt.Errorf("write chunk %s: %w", hash, classOf(err))
	}
	// Replacing is fine: the name is the content (and heals a damaged chunk).
	if err := os.Rename(tmp, d.chunkPath(hash)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write chunk %s: %w", hash, classOf(err))
	}
	d.dirs.add(dir)
	return nil
}

func (d *dirBackend) ReadChunk(_ context.Context, hash string, buf []byte) error {
	p := d.chunkPath(hash)
	f, err := os.Open(p)
	if err != nil {
		return fmt.Errorf("chunk %s: %w", p, classOf(err))
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("chunk %s: %w", p, classOf(err))
	}
	if fi.Size() != int64(len(buf)) {
		return fmt.Errorf("chunk %s holds %d bytes, the manifest needs %d: %w", p, fi.Size(), len(buf), errdefs.ErrDataLoss)
	}
	if _, err := io.ReadFull(f, buf); err != nil {
		return fmt.Errorf("read chunk %s: %w", p, classOf(err))
	}
	return nil
}

func (d *dirBackend) RemoveChunk(_ context.Context, hash string) (int64, error) {
	p := d.chunkPath(hash)
	fi, err := os.Stat(p)
	if err != nil {
		return 0, fmt.Errorf("chunk %s: %w", hash, classOf(err))
	}
	if err := os.Remove(p); err != nil {
		return 0, fmt.Errorf("remove chunk %s: %w", hash, classOf(err))
	}
	d.dirs.add(filepath.Dir(p))
	return fi.Size(), nil
}

// ListChunks reads the chunk directories <dir>/<hh> one at a time: only
// regular files named by a hash that starts with their directory's name
// are chunks.
func (d *dirBackend) ListChunks(ctx context.Context, fn func(hash string) error) error {
	top, err := os.ReadDir(d.dir)
	if err != nil {
		return fmt.Errorf("list chunks of %s: %w", d.dir, classOf(err))
	}
	for _, e := range top {
		if !e.IsDir() || len(e.Name()) != 2 || !isHex(e.Name()) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		sub := filepath.Join(d.dir, e.Name())
		entries, err := os.ReadDir(sub)
		if err != nil {
			return fmt.Errorf("list chunks of %s: %w", sub, classOf(err))
		}
		for _, c := range entries {
			if !c.Type().IsRegular() || !isHash(c.Name()) || c.Name()[:2] != e.Name() {
				continue
			}
			if err := fn(c.Name()); err != nil {
				return err
			}
		}
	}
	return nil
}

// isHex reports whether s is lower-case hex digits.
func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// SyncChunks fsyncs the directories chunks were added to or removed from.
func (d *dirBackend) SyncChunks(context.Context) error { return d.dirs.sync() }

// manifestPath checks that name is an absolute path.
func manifestPath(name string) (string, error) {
	if name == "" || !filepath.IsAbs(name) {
		return "", fmt.Errorf("manifest %q: want an absolute path: %w", name, errdefs.ErrInvalid)
	}
	return filepath.Clean(name), nil
}

func (d *dirBackend) ReadManifest(_ context.Context, name string) ([]byte, error) {
	p, err := manifestPath(name)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", p, classOf(err))
	}
	return b, nil
}

// CreateManifest: a temporary file in the same directory, fsync, a rename
// that never replaces an existing manifest, and a directory fsync.
func (d *dirBackend) CreateManifest(_ context.Context, name string, b []byte) error {
	p, err := manifestPath(name)
	if err != nil {
		return err
	}
	return createFile(p, b)
}

func createFile(path string, b []byte) error {
	dir := filepath.Dir(path)
	tmp := filepath.Join(dir, "."+filepath.Base(path)+".tmp-"+randomHex(8))
	if err := durable.WriteNew(tmp, b, 0o644); err != nil {
		return fmt.Errorf("manifest %s: %w", path, classOf(err))
	}
	if err := durable.RenameNoReplace(tmp, path); err != nil {
		os.Remove(tmp)
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("manifest %s: %w", path, errors.Join(err, errdefs.ErrAlreadyExists))
		}
		return fmt.Errorf("manifest %s: %w", path, classOf(err))
	}
	if err := durable.SyncDir(dir); err != nil {
		return fmt.Errorf("manifest %s: %w", path, classOf(err))
	}
	return nil
}

func (d *dirBackend) RemoveManifest(_ context.Context, name string) error {
	p, err := manifestPath(name)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove manifest %s: %w", p, classOf(err))
	}
	if err := durable.SyncDir(filepath.Dir(p)); err != nil {
		return fmt.Errorf("sync %s: %w", filepath.Dir(p), classOf(err))
	}
	return nil
}

// ListManifests lists the regular files of near's directory whose names
// do not start with "." (temporary files).
func (d *dirBackend) ListManifests(_ context.Context, near string) ([]string, error) {
	p, err := manifestPath(near)
	if err != nil {
		return nil, err
	}
	dir := filepath.Dir(p)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("manifests directory %s: %w", dir, classOf(err))
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") || !e.Type().IsRegular() {
			continue
		}
		out = append(out, filepath.Join(dir, e.Name()))
	}
	return out, nil
}

// Lock takes the store's flock (shared or exclusive), polling so that ctx
// can end the wait. The lock works across processes and, with NFSv4
// locks, across hosts; it is never lost while held.
func (d *dirBackend) Lock(ctx context.Context, mode LockMode) (context.Context, func(), error) {
	f, err := os.OpenFile(filepath.Join(d.dir, LockFile), os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o644)
	if err != nil {
		return nil, nil, fmt.Errorf("chunk store %s: lock: %w", d.dir, classOf(err))
	}
	how := unix.LOCK_SH
	if mode == LockExclusive {
		how = unix.LOCK_EX
	}
	wait := time.Millisecond
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return ctx, func() { f.Close() }, nil // closing releases the lock
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, nil, fmt.Errorf("chunk store %s: lock: %w", d.dir, classOf(err))
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			f.Close()
			return nil, nil, fmt.Errorf("chunk store %s: waiting for the lock: %w", d.dir, ctx.Err())
		case <-t.C:
		}
		wait = min(2*wait, 100*time.Millisecond)
	}
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
		if err := durable.SyncDir(dir); err != nil {
			return fmt.Errorf("sync %s: %w", dir, classOf(err))
		}
		delete(d.dirs, dir)
	}
	return nil
}

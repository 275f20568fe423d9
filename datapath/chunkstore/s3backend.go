package chunkstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/stowage/stowage/datapath/s3conn"
	"github.com/stowage/stowage/errdefs"
)

// S3Config says which bucket and prefix an S3 store lives in and how to
// reach it. Its String and LogValue leave the keys out.
type S3Config = s3conn.Config

// LeaseTTL is how old a lock object of the S3 backend may get before
// others treat it as left behind by a crashed holder (see OpenS3).
const LeaseTTL = 10 * time.Minute

// Lease renewal; variables for the tests.
var (
	// leaseRenew is how often a holder rewrites its lock object.
	leaseRenew = LeaseTTL / 10
	// leaseGiveUp is how long a holder goes on without a successful
	// renewal before it cancels its own work (well before LeaseTTL).
	leaseGiveUp = LeaseTTL / 2
	// leaseWriteTimeout bounds one write of a lease by Lock, which a
	// caller's ctx does not cut short.
	leaseWriteTimeout = 30 * time.Second
)

// OpenS3 returns the store in cfg's bucket under cfg.Prefix, after
// checking that the bucket exists and the keys work. Manifests are named
// by relative names of letters, digits, '.', '_', '-' and '/'
// ("vol1/snap2" is PREFIX/manifests/vol1/snap2.json).
//
// S3 has no locks, so the backend keeps leases as objects:
// PREFIX/locks/<shared|exclusive>-<random>. To lock, a client PUTs its
// lock object, then lists PREFIX/locks/; a shared lock yields to any live
// exclusive one, an exclusive lock to any other live lock, by removing its
// object and trying again after a random pause. Because each side writes
// before it lists (and S3 lists are strongly consistent after a PUT),
// of a Backup and a Delete that start together at least one sees the other,
// so a Delete never removes a chunk that a running Backup found present
// and will name in its manifest. A lock object is rewritten every
// LeaseTTL/10; one older than LeaseTTL (by the server's clock, compared
// with the LastModified of the object just written) is taken for a crashed
// holder's and ignored. A holder that cannot renew for LeaseTTL/2 cancels
// its own work (errdefs.ErrAborted) before others may ignore its lease.
//
// What this does not cover: clients that do not take these locks (other
// tools writing under the prefix); a holder paused for longer than
// LeaseTTL/2 between a renewal check and a write (a stopped VM); and an S3
// service whose listings lag behind its writes. A stream of backups can
// keep a Delete waiting (readers are preferred); the Delete's ctx bounds
// the wait.
func OpenS3(ctx context.Context, cfg S3Config) (*Store, error) {
	c, err := cfg.NewClient()
	if err != nil {
		return nil, err
	}
	if err := s3conn.Ping(ctx, c, cfg); err != nil {
		return nil, fmt.Errorf("chunk store: %w", err)
	}
	return New(&s3Backend{c: c, cfg: cfg}), nil
}

// s3Backend keeps chunks and manifests as objects.
type s3Backend struct {
	c   *minio.Client
	cfg S3Config
}

var (
	_ Backend = (*s3Backend)(nil)
	_ Locker  = (*s3Backend)(nil)
)

func (b *s3Backend) String() string { return "chunk store " + b.cfg.String() }

func (b *s3Backend) chunkKey(hash string) string {
	return b.cfg.Key("chunks/" + hash[:2] + "/" + hash)
}

// wrap adds where and the error's class.
func (b *s3Backend) wrap(what string, err error) error {
	return fmt.Errorf("%s: %s: %w", b, what, s3conn.Class(err))
}

func (b *s3Backend) StatChunk(ctx context.Context, hash string) (int64, error) {
	info, err := b.c.StatObject(ctx, b.cfg.Bucket, b.chunkKey(hash), minio.StatObjectOptions{})
	if err != nil {
		return 0, b.wrap("chunk "+hash, err)
	}
	return info.Size, nil
}

func (b *s3Backend) PutChunk(ctx context.Context, hash string, data []byte) error {
	_, err := b.c.PutObject(ctx, b.cfg.Bucket, b.chunkKey(hash), bytes.NewReader(data), int64(len(data)),
		minio.PutObjectOptions{ContentType: "application/octet-stream", DisableMultipart: true, SendContentMd5: true})
	if err != nil {
		return b.wrap("write chunk "+hash, err)
	}
	return nil
}

func (b *s3Backend) ReadChunk(ctx context.Context, hash string, buf []byte) error {
	obj, err := b.c.GetObject(ctx, b.cfg.Bucket, b.chunkKey(hash), minio.GetObjectOptions{})
	if err != nil {
		return b.wrap("chunk "+hash, err)
	}
	defer obj.Close()
	info, err := obj.Stat()
	if err != nil {
		return b.wrap("chunk "+hash, err)
	}
	if info.Size != int64(len(buf)) {
		return fmt.Errorf("%s: chunk %s holds %d bytes, the manifest needs %d: %w", b, hash, info.Size, len(buf), errdefs.ErrDataLoss)
	}
	if _, err := io.ReadFull(obj, buf); err != nil {
		return b.wrap("read chunk "+hash, err)
	}
	return nil
}

func (b *s3Backend) RemoveChunk(ctx context.Context, hash string) (int64, error) {
	n, err := b.StatChunk(ctx, hash)
	if err != nil {
		return 0, err
	}
	if err := b.c.RemoveObject(ctx, b.cfg.Bucket, b.chunkKey(hash), minio.RemoveObjectOptions{}); err != nil {
		return 0, b.wrap("remove chunk "+hash, err)
	}
	return n, nil
}

// ListChunks lists PREFIX/chunks/ page by page (the listing is not held
// in memory): only keys <hh>/<hash> whose hash starts with hh are chunks.
func (b *s3Backend) ListChunks(ctx context.Context, fn func(hash string) error) error {
	dir := b.cfg.Key("chunks/")
	ctx, cancel := context.WithCancel(ctx) // ends the listing when fn stops it
	defer cancel()
	for o := range b.c.ListObjects(ctx, b.cfg.Bucket, minio.ListObjectsOptions{Prefix: dir, Recursive: true}) {
		if o.Err != nil {
			return b.wrap("list chunks", o.Err)
		}
		hh, hash, ok := strings.Cut(strings.TrimPrefix(o.Key, dir), "/")
		if !ok || !isHash(hash) || hash[:2] != hh {
			continue
		}
		if err := fn(hash); err != nil {
			return err
		}
	}
	// A listing cut short by ctx may just end: not a full listing.
	return ctx.Err()
}

// manifestKey checks name and returns its key.
func (b *s3Backend) manifestKey(name string) (string, error) {
	if err := checkManifestName(name); err != nil {
		return "", err
	}
	return b.cfg.Key("manifests/" + name + ".json"), nil
}

// checkManifestName: segments of [A-Za-z0-9._-], not starting with '.',
// separated by single slashes.
func checkManifestName(name string) error {
	ok := name != "" && len(name) <= 512
	for _, seg := range strings.Split(name, "/") {
		if !ok {
			break
		}
		ok = seg != "" && seg[0] != '.'
		for i := 0; ok && i < len(seg); i++ {
			c := seg[i]
			ok = c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-'
		}
	}
	if !ok {
		return fmt.Errorf("manifest name %q: want segments of letters, digits, '.', '_' or '-' (not starting with '.') separated by '/': %w", name, errdefs.ErrInvalid)
	}
	return nil
}

func (b *s3Backend) ReadManifest(ctx context.Context, name string) ([]byte, error) {
	key, err := b.manifestKey(name)
	if err != nil {
		return nil, err
	}
	obj, err := b.c.GetObject(ctx, b.cfg.Bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return nil, b.wrap("manifest "+name, err)
	}
	defer obj.Close()
	data, err := io.ReadAll(obj)
	if err != nil {
		return nil, b.wrap("manifest "+name, err)
	}
	return data, nil
}

// CreateManifest is one PUT with If-None-Match: * (a server that ignores
// the condition still gets Backup's earlier existence check).
func (b *s3Backend) CreateManifest(ctx context.Context, name string, data []byte) error {
	key, err := b.manifestKey(name)
	if err != nil {
		return err
	}
	opts := minio.PutObjectOptions{ContentType: "application/json", SendContentMd5: true}
	opts.SetMatchETagExcept("*")
	_, err = b.c.PutObject(ctx, b.cfg.Bucket, key, bytes.NewReader(data), int64(len(data)), opts)
	if err != nil {
		if errors.Is(s3conn.Class(err), errdefs.ErrFailedPrecondition) {
			return fmt.Errorf("%s: manifest %s: %w", b, name, errdefs.ErrAlreadyExists)
		}
		return b.wrap("write manifest "+name, err)
	}
	return nil
}

func (b *s3Backend) RemoveManifest(ctx context.Context, name string) error {
	key, err := b.manifestKey(name)
	if err != nil {
		return err
	}
	if err := b.c.RemoveObject(ctx, b.cfg.Bucket, key, minio.RemoveObjectOptions{}); err != nil && !s3conn.IsNotFound(err) {
		return b.wrap("remove manifest "+name, err)
	}
	return nil
}

// ListManifests lists every manifest under the prefix; near is not used.
func (b *s3Backend) ListManifests(ctx context.Context, _ string) ([]string, error) {
	dir := b.cfg.Key("manifests/")
	var out []string
	for o := range b.c.ListObjects(ctx, b.cfg.Bucket, minio.ListObjectsOptions{Prefix: dir, Recursive: true}) {
		if o.Err != nil {
			return nil, b.wrap("list manifests", o.Err)
		}
		name, ok := strings.CutSuffix(strings.TrimPrefix(o.Key, dir), ".json")
		if !ok || checkManifestName(name) != nil {
			return nil, fmt.Errorf("%s: %s is not a manifest (only manifests belong under %s; refusing to guess): %w", b, o.Key, dir, errdefs.ErrFailedPrecondition)
		}
		out = append(out, name)
	}
	return out, nil
}

// Lock takes a lease (see OpenS3). The returned context is cancelled with
// an errdefs.ErrAborted cause when the lease cannot be renewed.
func (b *s3Backend) Lock(ctx context.Context, mode LockMode) (context.Context, func(), error) {
	dir := b.cfg.Key("locks/")
	key := dir + mode.String() + "-" + randomHex(8)
	pause := 20 * time.Millisecond
	for {
		// The lease is written whatever happens to ctx meanwhile: a PUT
		// given up by the client may still land on the server after the
		// delete that was to undo it, and a lease left behind holds
		// exclusive lockers off for LeaseTTL. ctx is checked after.
		wctx, wcancel := context.WithTimeout(context.WithoutCancel(ctx), leaseWriteTimeout)
		now, err := b.putLease(wctx, key)
		wcancel()
		if err == nil && ctx.Err() != nil {
			err = fmt.Errorf("%s: taking the %s lock: %w", b, mode, ctx.Err())
		}
		if err != nil {
			b.dropLease(ctx, key)
			return nil, nil, err
		}
		blocker, err := b.blockingLease(ctx, dir, key, mode, now)
		if err == nil && blocker == "" {
			break
		}
		b.dropLease(ctx, key)
		if err != nil {
			return nil, nil, err
		}
		// Random pauses so that two exclusive lockers do not keep
		// yielding to each other.
		t := time.NewTimer(pause/2 + rand.N(pause))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, nil, fmt.Errorf("%s: waiting for the %s lock (held: %s): %w", b, mode, blocker, ctx.Err())
		case <-t.C:
		}
		pause = min(2*pause, 2*time.Second)
	}

	lctx, cancel := context.WithCancelCause(ctx)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		last := time.Now()
		t := time.NewTicker(leaseRenew)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-lctx.Done():
				return
			case <-t.C:
			}
			rctx, rcancel := context.WithTimeout(lctx, leaseRenew)
			_, err := b.putLease(rctx, key)
			rcancel()
			if err == nil {
				last = time.Now()
			} else if time.Since(last) > leaseGiveUp {
				cancel(fmt.Errorf("%s: %s lock lease not renewed for %s (%v): %w", b, mode, time.Since(last).Round(time.Second), err, errdefs.ErrAborted))
				return
			}
		}
	}()
	unlock := func() {
		close(stop)
		<-done
		cancel(nil)
		b.dropLease(ctx, key)
	}
	return lctx, unlock, nil
}

// putLease writes the lease object and returns its LastModified (the
// server's clock).
func (b *s3Backend) putLease(ctx context.Context, key string) (time.Time, error) {
	if _, err := b.c.PutObject(ctx, b.cfg.Bucket, key, bytes.NewReader(nil), 0, minio.PutObjectOptions{}); err != nil {
		return time.Time{}, b.wrap("write lock "+key, err)
	}
	info, err := b.c.StatObject(ctx, b.cfg.Bucket, key, minio.StatObjectOptions{})
	if err != nil {
		return time.Time{}, b.wrap("lock "+key, err)
	}
	return info.LastModified, nil
}

// blockingLease returns the key of a live lease that mode must yield to,
// or "".
func (b *s3Backend) blockingLease(ctx context.Context, dir, mine string, mode LockMode, now time.Time) (string, error) {
	for o := range b.c.ListObjects(ctx, b.cfg.Bucket, minio.ListObjectsOptions{Prefix: dir, Recursive: true}) {
		if o.Err != nil {
			return "", b.wrap("list locks", o.Err)
		}
		if o.Key == mine {
			continue
		}
		if now.Sub(o.LastModified) > LeaseTTL {
			b.dropLease(ctx, o.Key) // a crashed holder's
			continue
		}
		if mode == LockExclusive || strings.HasPrefix(strings.TrimPrefix(o.Key, dir), LockExclusive.String()+"-") {
			return o.Key, nil
		}
	}
	return "", nil
}

// dropLease removes a lease object, best effort: one left behind expires
// after LeaseTTL.
func (b *s3Backend) dropLease(ctx context.Context, key string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	// A lease left behind blocks the other lockers until it is stale
	// (LeaseTTL), so a failed delete is tried twice more.
	for attempt, pause := 1, 100*time.Millisecond; ; attempt, pause = attempt+1, pause*2 {
		err := b.c.RemoveObject(ctx, b.cfg.Bucket, key, minio.RemoveObjectOptions{})
		if err == nil || ctx.Err() != nil || attempt == 3 {
			return
		}
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

package s3

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/stowage/stowage/datapath/s3conn"
	"github.com/stowage/stowage/errdefs"
)

// Store is one bucket and prefix. It is safe for concurrent use.
type Store struct {
	c   *minio.Client
	cfg s3conn.Config
}

// Open returns the store cfg describes after checking that the bucket
// exists and the keys work.
func Open(ctx context.Context, cfg s3conn.Config) (*Store, error) {
	c, err := cfg.NewClient()
	if err != nil {
		return nil, err
	}
	if err := s3conn.Ping(ctx, c, cfg); err != nil {
		return nil, err
	}
	return &Store{c: c, cfg: cfg}, nil
}

// Config is the store's settings.
func (s *Store) Config() s3conn.Config { return s.cfg }

func (s *Store) String() string { return s.cfg.String() }

// wrap adds the store, what was done and the error's class.
func (s *Store) wrap(what string, err error) error {
	return fmt.Errorf("%s: %s: %w", s, what, s3conn.Class(err))
}

// checkKey validates a key relative to the prefix.
func checkKey(key string) error {
	ok := key != "" && len(key) <= 900
	for _, seg := range strings.Split(key, "/") {
		if !ok {
			break
		}
		ok = seg != "" && seg != "." && seg != ".."
		for _, r := range seg {
			if r < 0x20 || r == 0x7f || r == '\\' {
				ok = false
			}
		}
	}
	if !ok {
		return fmt.Errorf("object key %q: want segments separated by single slashes, no . or .. segment, no control characters or backslash: %w", key, errdefs.ErrInvalid)
	}
	return nil
}

// ObjectInfo describes a stored object.
type ObjectInfo struct {
	Key     string // relative to the store's prefix
	Size    int64
	ETag    string
	ModTime time.Time
	// SHA256 and Format are what Import recorded ("" for objects it did
	// not write).
	SHA256 string
	Format Format
}

// Metadata Import records on an object (x-amz-meta-…).
const (
	metaSHA256 = "Stowage-Sha256"
	metaFormat = "Stowage-Format"
)

func (s *Store) info(o minio.ObjectInfo) ObjectInfo {
	return ObjectInfo{Key: strings.TrimPrefix(o.Key, s.cfg.Key("")), Size: o.Size, ETag: o.ETag, ModTime: o.LastModified,
		SHA256: o.UserMetadata[metaSHA256], Format: Format(o.UserMetadata[metaFormat])}
}

// Stat describes the object key (errdefs.ErrNotFound when there is none).
func (s *Store) Stat(ctx context.Context, key string) (ObjectInfo, error) {
	if err := checkKey(key); err != nil {
		return ObjectInfo{}, err
	}
	o, err := s.c.StatObject(ctx, s.cfg.Bucket, s.cfg.Key(key), minio.StatObjectOptions{})
	if err != nil {
		return ObjectInfo{}, s.wrap("stat "+key, err)
	}
	o.Key = s.cfg.Key(key)
	return s.info(o), nil
}

// Delete removes the object key; a missing one is not an error.
func (s *Store) Delete(ctx context.Context, key string) error {
	if err := checkKey(key); err != nil {
		return err
	}
	if err := s.c.RemoveObject(ctx, s.cfg.Bucket, s.cfg.Key(key), minio.RemoveObjectOptions{}); err != nil && !s3conn.IsNotFound(err) {
		return s.wrap("delete "+key, err)
	}
	return nil
}

// List returns every object whose key (relative to the store's prefix)
// starts with prefix, in key order. Import's metadata is not listed
// (Stat has it).
func (s *Store) List(ctx context.Context, prefix string) ([]ObjectInfo, error) {
	var out []ObjectInfo
	for o := range s.c.ListObjects(ctx, s.cfg.Bucket, minio.ListObjectsOptions{Prefix: s.cfg.Key(prefix), Recursive: true}) {
		if o.Err != nil {
			return nil, s.wrap("list "+prefix, o.Err)
		}
		out = append(out, s.info(o))
	}
	return out, nil
}

// maxCopyObject is the largest object one CopyObject may copy (S3's 5 GiB);
// larger ones are copied part by part (ComposeObject, UploadPartCopy). A
// variable for the tests.
var maxCopyObject int64 = 5 << 30

// Copy copies the object src to dst on the server (no bytes pass through
// this process), metadata included, and describes the copy.
func (s *Store) Copy(ctx context.Context, src, dst string) (ObjectInfo, error) {
	if err := checkKey(src); err != nil {
		return ObjectInfo{}, err
	}
	if err := checkKey(dst); err != nil {
		return ObjectInfo{}, err
	}
	from, err := s.Stat(ctx, src)
	if err != nil {
		return ObjectInfo{}, err
	}
	srcOpts := minio.CopySrcOptions{Bucket: s.cfg.Bucket, Object: s.cfg.Key(src), MatchETag: from.ETag}
	dstOpts := minio.CopyDestOptions{Bucket: s.cfg.Bucket, Object: s.cfg.Key(dst)}
	if from.Size > maxCopyObject {
		// Composing does not carry the metadata over by itself.
		dstOpts.ReplaceMetadata = true
		dstOpts.UserMetadata = map[string]string{}
		if from.SHA256 != "" {
			dstOpts.UserMetadata[metaSHA256] = from.SHA256
		}
		if from.Format != "" {
			dstOpts.UserMetadata[metaFormat] = string(from.Format)
		}
		if _, err := s.composeObject(ctx, dstOpts, srcOpts, from.Size); err != nil {
			return ObjectInfo{}, s.wrap(fmt.Sprintf("copy %s to %s", src, dst), err)
		}
	} else if _, err := s.c.CopyObject(ctx, dstOpts, srcOpts); err != nil {
		return ObjectInfo{}, s.wrap(fmt.Sprintf("copy %s to %s", src, dst), err)
	}
	return s.Stat(ctx, dst)
}

// composeObject copies one large source in ranges of at most
// maxCopyObject (UploadPartCopy).
func (s *Store) composeObject(ctx context.Context, dst minio.CopyDestOptions, src minio.CopySrcOptions, size int64) (minio.UploadInfo, error) {
	var parts []minio.CopySrcOptions
	for off := int64(0); off < size; off += maxCopyObject {
		p := src
		p.MatchRange, p.Start, p.End = true, off, min(off+maxCopyObject, size)-1
		parts = append(parts, p)
	}
	return s.c.ComposeObject(ctx, dst, parts...)
}

// Presign limits.
const (
	MinPresignExpiry = time.Second
	MaxPresignExpiry = 7 * 24 * time.Hour // SigV4's limit
)

// PresignGet returns a URL that GETs the object key without credentials
// until expiry has passed. The URL is a bearer secret: give it only to
// whoever should read the object, and never log it (its query holds the
// signature). A missing object is errdefs.ErrNotFound.
func (s *Store) PresignGet(ctx context.Context, key string, expiry time.Duration) (*url.URL, error) {
	if err := checkKey(key); err != nil {
		return nil, err
	}
	if expiry < MinPresignExpiry || expiry > MaxPresignExpiry {
		return nil, fmt.Errorf("presign %s: expiry %s: want %s to %s: %w", key, expiry, MinPresignExpiry, MaxPresignExpiry, errdefs.ErrInvalid)
	}
	if _, err := s.Stat(ctx, key); err != nil {
		return nil, err
	}
	u, err := s.c.PresignedGetObject(ctx, s.cfg.Bucket, s.cfg.Key(key), expiry, nil)
	if err != nil {
		return nil, s.wrap("presign "+key, err)
	}
	return u, nil
}

// classOS adds an errdefs class to a file system error.
func classOS(err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return errors.Join(err, errdefs.ErrNotFound)
	case errors.Is(err, fs.ErrPermission):
		return errors.Join(err, errdefs.ErrPermissionDenied)
	}
	return errors.Join(err, errdefs.ErrInternal)
}

package chunkstore

import "context"

// ChunkBackend keeps chunks by their SHA-256 (lower-case hex). Content
// checks are the Store's: a backend stores and returns bytes.
type ChunkBackend interface {
	// StatChunk returns the stored length of chunk hash;
	// errdefs.ErrNotFound when there is none.
	StatChunk(ctx context.Context, hash string) (int64, error)
	// PutChunk stores data as chunk hash. Replacing a stored chunk is
	// allowed (the name is the content). A chunk is durable once a later
	// Syncer.SyncChunks (when the backend has one) has returned.
	PutChunk(ctx context.Context, hash string, data []byte) error
	// ReadChunk fills buf with chunk hash: errdefs.ErrNotFound when it is
	// missing, errdefs.ErrDataLoss when its length is not len(buf).
	ReadChunk(ctx context.Context, hash string, buf []byte) error
	// RemoveChunk removes chunk hash and returns the bytes it held;
	// errdefs.ErrNotFound when there is none.
	RemoveChunk(ctx context.Context, hash string) (int64, error)
	// ListChunks calls fn with the hash of every stored chunk, in no
	// particular order, and stops at the first error fn returns (returned
	// as it is). What is not a chunk (a temporary file, a foreign name) is
	// left out. fn may remove the chunk it is called with.
	ListChunks(ctx context.Context, fn func(hash string) error) error
}

// ManifestBackend keeps manifests by name. What a name is belongs to the
// backend: an absolute file path for the directory backend (Open), a
// relative name like "vol1/snap2" for S3 (OpenS3).
type ManifestBackend interface {
	// ReadManifest returns the encoded manifest; errdefs.ErrNotFound when
	// there is none.
	ReadManifest(ctx context.Context, name string) ([]byte, error)
	// CreateManifest stores an encoded manifest in one step (never seen
	// half-written) and never replaces one: errdefs.ErrAlreadyExists.
	CreateManifest(ctx context.Context, name string, b []byte) error
	// RemoveManifest removes a manifest; a missing one is not an error.
	RemoveManifest(ctx context.Context, name string) error
	// ListManifests returns the names of every manifest that may share
	// chunks with near (near itself included when it exists): the files of
	// near's directory for the directory backend, every manifest under the
	// prefix for S3. Something there that cannot be a manifest is
	// errdefs.ErrFailedPrecondition.
	ListManifests(ctx context.Context, near string) ([]string, error)
}

// Backend is where a Store keeps chunks and manifests.
type Backend interface {
	ChunkBackend
	ManifestBackend
}

// LockMode says whether a lock is shared (backup, restore) or exclusive
// (delete).
type LockMode int

// The lock modes.
const (
	LockShared LockMode = iota
	LockExclusive
)

func (m LockMode) String() string {
	if m == LockExclusive {
		return "exclusive"
	}
	return "shared"
}

// Locker is implemented by backends that can keep a Delete from removing
// chunks a running Backup counts on. Lock waits for the lock while ctx
// allows and returns a context for the locked work, which the backend may
// cancel when it loses the lock (a lease that could not be renewed), and
// the function that releases it.
type Locker interface {
	Lock(ctx context.Context, mode LockMode) (context.Context, func(), error)
}

// Syncer is implemented by backends whose PutChunk is not durable on its
// own: SyncChunks makes every chunk put so far durable. Backup calls it
// before it writes the manifest.
type Syncer interface {
	SyncChunks(ctx context.Context) error
}

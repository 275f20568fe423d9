package chunkstore

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/stowage/stowage/errdefs"
)

// CollectStats describe what a Collect found and removed.
type CollectStats struct {
	Manifests     int64 // manifests read
	Chunks        int64 // chunks found in the store
	KeptChunks    int64 // chunks some manifest refers to
	RemovedChunks int64 // chunks no manifest refers to, now removed
	RemovedBytes  int64
}

// Collect removes every chunk that no manifest sharing the store refers
// to: what a Backup that died before writing its manifest left behind.
// The manifests are those of ListManifests(near) (a directory store: near
// is the path of any manifest of the directory whose manifests share the
// chunks, existing or not; S3 ignores it).
//
// Collect holds the store's exclusive lock throughout, so no Backup is
// writing chunks it has not yet named in a manifest. Every manifest must
// be readable: one that is not (or something among the manifests that is
// not one) stops Collect with errdefs.ErrFailedPrecondition before any
// chunk is removed, since it may name chunks that would otherwise look
// unused. Memory is one 32-byte key per distinct chunk the manifests name;
// the chunks are listed as a stream. Removals are made durable
// (Syncer) before Collect returns, also when it fails part way.
func (s *Store) Collect(ctx context.Context, near string) (CollectStats, error) {
	ctx, unlock, err := s.lock(ctx, LockExclusive)
	if err != nil {
		return CollectStats{}, err
	}
	defer unlock()
	var st CollectStats
	names, err := s.b.ListManifests(ctx, near)
	if err != nil {
		return st, err
	}
	used := map[[32]byte]struct{}{}
	st.Manifests, err = s.referenced(ctx, names, "", func(k [32]byte) { used[k] = struct{}{} })
	if err != nil {
		return st, err
	}
	err = s.b.ListChunks(ctx, func(h string) error {
		st.Chunks++
		if _, ok := used[hashKey(h)]; ok {
			st.KeptChunks++
			return nil
		}
		if err := ctx.Err(); err != nil {
			return interruption(ctx)
		}
		n, err := s.b.RemoveChunk(ctx, h)
		if errors.Is(err, errdefs.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		st.RemovedChunks++
		st.RemovedBytes += n
		return nil
	})
	// Sync what was removed even when the walk failed part way.
	if serr := s.syncChunks(ctx); err == nil {
		err = serr
	}
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("collect interrupted after removing %d chunks: %w", st.RemovedChunks, interruption(ctx))
	}
	return st, err
}

// referenced reads every manifest in names except skip and calls add with
// the key of each chunk they name (zero chunks left out); it returns how
// many manifests it read. A manifest removed since the listing is passed
// over; one that cannot be read is errdefs.ErrFailedPrecondition: the
// caller must not remove chunks it may use.
func (s *Store) referenced(ctx context.Context, names []string, skip string, add func([32]byte)) (int64, error) {
	var n int64
	for _, name := range names {
		if name == skip {
			continue
		}
		m, err := s.Manifest(ctx, name)
		if errors.Is(err, errdefs.ErrNotFound) {
			continue // removed meanwhile
		}
		if err != nil {
			return n, fmt.Errorf("%v (every manifest that shares the chunks must be readable; refusing to delete chunks it may use): %w", err, errdefs.ErrFailedPrecondition)
		}
		n++
		for _, h := range m.Chunks {
			if h != ZeroChunk {
				add(hashKey(h))
			}
		}
	}
	return n, nil
}

// hashKey is the 32 bytes of a hash (validated: a manifest's or a listed
// chunk's).
func hashKey(h string) [32]byte {
	var k [32]byte
	hex.Decode(k[:], []byte(h))
	return k
}

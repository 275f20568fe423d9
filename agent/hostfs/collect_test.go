package hostfs

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stowage/stowage/datapath/chunkstore"
	"github.com/stowage/stowage/errdefs"
)

// The edges of CollectChunks: a chunk directory that does not exist holds
// nothing to collect; a missing manifest directory next to chunks is a
// refusal (every chunk would look unused); relative paths are refused.
func TestCollectChunksEdges(t *testing.T) {
	ctx := t.Context()
	l := New("h1")
	dir := t.TempDir()
	chunks, mdir := filepath.Join(dir, "chunks"), filepath.Join(dir, "manifests")
	if ci, err := l.CollectChunks(ctx, CollectChunksRequest{ChunkDir: chunks, ManifestDir: mdir}); err != nil || ci != (CollectInfo{}) {
		t.Fatalf("CollectChunks without a chunk directory = %+v, %v; want nothing and no error", ci, err)
	}
	if _, err := os.Stat(chunks); !os.IsNotExist(err) {
		t.Errorf("CollectChunks created %s: %v", chunks, err)
	}
	store, err := chunkstore.Open(chunks)
	if err != nil {
		t.Fatal(err)
	}
	data := []byte("an orphan chunk")
	sum := sha256.Sum256(data)
	if err := store.Backend().PutChunk(ctx, hex.EncodeToString(sum[:]), data); err != nil {
		t.Fatal(err)
	}
	if _, err := l.CollectChunks(ctx, CollectChunksRequest{ChunkDir: chunks, ManifestDir: mdir}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("CollectChunks without a manifest directory: %v, want ErrFailedPrecondition", err)
	}
	if _, err := store.Backend().StatChunk(ctx, hex.EncodeToString(sum[:])); err != nil {
		t.Fatalf("a refused CollectChunks removed the chunk: %v", err)
	}
	if err := os.Mkdir(mdir, 0o755); err != nil {
		t.Fatal(err)
	}
	ci, err := l.CollectChunks(ctx, CollectChunksRequest{ChunkDir: chunks, ManifestDir: mdir})
	if want := (CollectInfo{Chunks: 1, RemovedChunks: 1, RemovedBytes: int64(len(data))}); err != nil || ci != want {
		t.Fatalf("CollectChunks = %+v, %v; want %+v", ci, err, want)
	}
	if _, err := l.CollectChunks(ctx, CollectChunksRequest{ChunkDir: "chunks", ManifestDir: mdir}); !errors.Is(err, errdefs.ErrInvalid) && !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("CollectChunks of a relative path: %v, want a refusal", err)
	}
}

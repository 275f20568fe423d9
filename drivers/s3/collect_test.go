package s3_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/minio/minio-go/v7"

	"github.com/stowage/stowage/datapath/chunkstore"
	"github.com/stowage/stowage/datapath/s3conn"
	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/driverstest"
	"github.com/stowage/stowage/drivers/s3"
	"github.com/stowage/stowage/drivers/s3/s3test"
	"github.com/stowage/stowage/errdefs"
)

// CollectChunks against a real S3 server: two backups written through the
// access BackupAccess gives (as an agent does), orphans as a backup killed
// before its manifest leaves them; exactly the orphans go, both backups
// restore byte-equal, and a manifest that cannot be read makes it refuse
// and remove nothing.
func TestCollectChunks(t *testing.T) {
	ctx := t.Context()
	srv := s3test.Start(t)
	p := s3.New(driverstest.NewHosts(hostOnly{id: "h1"}))
	info, err := p.LifeCycle().Initialize(ctx, drivers.StoreSpec{ID: "s3-gc", Name: "gc", Role: drivers.RoleImage,
		URL: "s3://" + srv.Bucket + "/stores/gc", Scope: drivers.Scope{Zone: "z1"},
		Details: map[string]string{s3.DetailEndpoint: srv.Endpoint, s3.DetailRegion: srv.Region, s3.DetailCredentialsFile: credentials(t, srv)}})
	if err != nil {
		t.Fatal(err)
	}
	d := p.Driver()
	cc := d.(drivers.ChunkCollector)
	ct := d.(drivers.ChunkTarget)
	if st, err := cc.CollectChunks(ctx, info); err != nil || st != (drivers.BackupStats{}) {
		t.Fatalf("CollectChunks of a fresh store = %+v, %v", st, err)
	}

	const cs = chunkstore.MinChunkSize
	dir := t.TempDir()
	img1 := make([]byte, 4*cs)
	rand.Read(img1)
	img2 := bytes.Clone(img1)
	rand.Read(img2[3*cs:]) // the last chunk differs: 5 distinct chunks in all
	var store *chunkstore.Store
	var cfg s3conn.Config
	var manifests []string
	for i, data := range [][]byte{img1, img2} {
		a, err := ct.BackupAccess(ctx, drivers.DataObject{ID: "snap-" + string(rune('1'+i)), Type: drivers.ObjectSnapshot, Store: info},
			drivers.Client{HostID: "h1", Purpose: drivers.PurposeWrite})
		if err != nil {
			t.Fatal(err)
		}
		if cfg, err = s3conn.ParseURI(string(a.Chunks), a.Secret); err != nil {
			t.Fatal(err)
		}
		if store, err = chunkstore.OpenS3(ctx, cfg); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, a.Manifest+".raw")
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		src, err := stream.OpenSource(ctx, path, stream.SourceOptions{Format: "raw"})
		if err != nil {
			t.Fatal(err)
		}
		_, _, err = store.Backup(ctx, src, a.Manifest, chunkstore.BackupOptions{ChunkSize: cs})
		src.Close()
		if err != nil {
			t.Fatal(err)
		}
		manifests = append(manifests, a.Manifest)
	}
	orphans := func(n int) {
		for range n {
			data := make([]byte, cs)
			rand.Read(data)
			sum := sha256.Sum256(data)
			if err := store.Backend().PutChunk(ctx, hex.EncodeToString(sum[:]), data); err != nil {
				t.Fatal(err)
			}
		}
	}
	count := func() int {
		n := 0
		if err := store.Backend().ListChunks(ctx, func(string) error { n++; return nil }); err != nil {
			t.Fatal(err)
		}
		return n
	}
	orphans(3)
	st, err := cc.CollectChunks(ctx, info)
	if want := (drivers.BackupStats{Chunks: 3, FreedBytes: 3 * cs, KeptShared: 5}); err != nil || st != want {
		t.Fatalf("CollectChunks = %+v, %v; want %+v", st, err, want)
	}
	if n := count(); n != 5 {
		t.Fatalf("after CollectChunks the chunk store holds %d chunks, want the 5 live ones", n)
	}
	for i, want := range [][]byte{img1, img2} {
		m, err := store.Manifest(ctx, manifests[i])
		if err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(dir, "restored"+string(rune('1'+i)))
		sink, err := stream.OpenSink(ctx, out, m.Size, stream.SinkOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := store.Restore(ctx, m, sink, chunkstore.RestoreOptions{}); err != nil {
			sink.Abort()
			t.Fatalf("restore of %s after CollectChunks: %v", manifests[i], err)
		}
		if err := sink.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		if got, _ := os.ReadFile(out); !bytes.Equal(got, want) {
			t.Fatalf("%s restored after CollectChunks differs", manifests[i])
		}
	}

	// A manifest that cannot be read: refused, nothing removed.
	orphans(2)
	key := cfg.Key("manifests/" + manifests[1] + ".json")
	if _, err := srv.Client().PutObject(ctx, srv.Bucket, key, strings.NewReader("{}"), 2, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	if st, err := cc.CollectChunks(ctx, info); !errors.Is(err, errdefs.ErrFailedPrecondition) || st != (drivers.BackupStats{}) {
		t.Fatalf("CollectChunks next to an unreadable manifest = %+v, %v; want ErrFailedPrecondition", st, err)
	}
	if n := count(); n != 7 {
		t.Fatalf("a refused CollectChunks changed the store: %d chunks, want 7", n)
	}
}

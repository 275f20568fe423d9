package filesystem

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stowage/stowage/datapath/chunkstore"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/driverstest"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// CollectChunks through the real host work (agent.LocalHost over
// agent/hostfs): two backups sharing chunks, orphans as a backup killed
// before its manifest leaves them; exactly the orphans go, both backups
// restore byte-equal, and a manifest the host cannot read makes it refuse
// and remove nothing.
func TestCollectChunks(t *testing.T) {
	needQemuImg(t)
	ctx := t.Context()
	hosts := driverstest.NewHosts(newLocalHost(t, "h1"))
	hosts.Place("h1", "z1", "")
	p := New(hosts)
	info, err := p.LifeCycle().Initialize(ctx, drivers.StoreSpec{ID: "i1", Role: drivers.RoleImage, Scope: zone1,
		URL: "file://" + filepath.Join(t.TempDir(), "image")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.LifeCycle().Attach(ctx, info, zone1); err != nil {
		t.Fatal(err)
	}
	d := p.drv
	root := p.HostRoot(info, "h1")

	// Nothing stored yet: nothing to do.
	if st, err := d.CollectChunks(ctx, info); err != nil || st != (drivers.BackupStats{}) {
		t.Fatalf("CollectChunks of a fresh store = %+v, %v", st, err)
	}

	const mib = 1 << 20
	img1 := make([]byte, 4*mib)
	rand.Read(img1)
	img2 := bytes.Clone(img1)
	rand.Read(img2[3*mib:]) // the last chunk differs: 5 distinct chunks in all
	h, err := hosts.ForScope(ctx, zone1)
	if err != nil {
		t.Fatal(err)
	}
	var access []drivers.BackupAccess
	for i, data := range [][]byte{img1, img2} {
		key := "templates/src" + string(rune('1'+i)) + ".raw"
		if err := os.WriteFile(filepath.Join(root, key), data, 0o644); err != nil {
			t.Fatal(err)
		}
		b := drivers.DataObject{ID: "snap-" + string(rune('1'+i)), Type: drivers.ObjectSnapshot, Store: info}
		a, err := d.BackupAccess(ctx, b, drivers.Client{HostID: "h1"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h.BackupImage(ctx, hostops.BackupRequest{Source: hostops.Ref{Store: info.ID, Key: key}, SourceFormat: drivers.FormatRaw,
			Chunks: hostops.ChunkStore{URI: a.Chunks}, Manifest: a.Manifest, ChunkSize: mib}, nil); err != nil {
			t.Fatal(err)
		}
		access = append(access, a)
	}

	store, err := chunkstore.Open(filepath.Join(root, "snapshots", "chunks"))
	if err != nil {
		t.Fatal(err)
	}
	orphans := func(n int) {
		for range n {
			data := make([]byte, mib)
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
	if n := count(); n != 8 {
		t.Fatalf("the chunk store holds %d chunks, want 5 live + 3 orphans", n)
	}
	st, err := d.CollectChunks(ctx, info)
	if want := (drivers.BackupStats{Chunks: 3, FreedBytes: 3 * mib, KeptShared: 5}); err != nil || st != want {
		t.Fatalf("CollectChunks = %+v, %v; want %+v", st, err, want)
	}
	if n := count(); n != 5 {
		t.Fatalf("after CollectChunks the chunk store holds %d chunks, want the 5 live ones", n)
	}
	for i, want := range [][]byte{img1, img2} {
		key := "templates/restored" + string(rune('1'+i)) + ".raw"
		if _, err := h.RestoreImage(ctx, hostops.RestoreRequest{Chunks: hostops.ChunkStore{URI: access[i].Chunks}, Manifest: access[i].Manifest,
			Dest: hostops.Ref{Store: info.ID, Key: key}, Format: drivers.FormatRaw}, nil); err != nil {
			t.Fatalf("restore of %s after CollectChunks: %v", access[i].Manifest, err)
		}
		if got, err := os.ReadFile(filepath.Join(root, key)); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s restored after CollectChunks differs (%v)", access[i].Manifest, err)
		}
	}

	// A manifest that cannot be read: refused, nothing removed.
	orphans(2)
	if err := os.WriteFile(filepath.Join(root, "snapshots", "manifests", access[1].Manifest), []byte("not a manifest"), 0o644); err != nil {
		t.Fatal(err)
	}
	if st, err := d.CollectChunks(ctx, info); !errors.Is(err, errdefs.ErrFailedPrecondition) || st != (drivers.BackupStats{}) {
		t.Fatalf("CollectChunks next to an unreadable manifest = %+v, %v; want ErrFailedPrecondition", st, err)
	}
	if n := count(); n != 7 {
		t.Fatalf("a refused CollectChunks changed the store: %d chunks, want 7", n)
	}

	// Only image stores keep backups.
	prim := info
	prim.Role = drivers.RolePrimary
	if _, err := d.CollectChunks(ctx, prim); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("CollectChunks on a primary store: %v, want ErrInvalid", err)
	}
}

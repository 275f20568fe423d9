package chunkstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/stowage/stowage/drivers/s3/s3test"
	"github.com/stowage/stowage/errdefs"
)

const testPrefix = "zone1/backups"

// openS3 starts a versitygw and opens a store under testPrefix.
func openS3(t *testing.T) (*Store, *s3test.Server) {
	t.Helper()
	srv := s3test.Start(t)
	s, err := OpenS3(t.Context(), s3Config(srv))
	if err != nil {
		t.Fatal(err)
	}
	return s, srv
}

func s3Config(srv *s3test.Server) S3Config {
	return S3Config{Endpoint: srv.Endpoint, Region: srv.Region, Bucket: srv.Bucket,
		Prefix: testPrefix, AccessKey: srv.AccessKey, SecretKey: srv.SecretKey}
}

// keys lists the bucket's keys under prefix, sorted.
func keys(t *testing.T, srv *s3test.Server, prefix string) []string {
	t.Helper()
	var out []string
	for o := range srv.Client().ListObjects(t.Context(), srv.Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		out = append(out, o.Key)
	}
	slices.Sort(out)
	return out
}

func chunkKeys(hashes ...string) []string {
	var out []string
	for _, h := range hashes {
		out = append(out, testPrefix+"/chunks/"+h[:2]+"/"+h)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func TestS3BackupIncrementalRestoreDelete(t *testing.T) {
	ctx := t.Context()
	s, srv := openS3(t)
	dir := t.TempDir()
	chunkPuts := func() int { return srv.CountRequests("PutObject", testPrefix+"/chunks/") }

	// 8 chunks: 2 holes, 1 written zero, chunks 0 and 7 identical.
	img := filepath.Join(dir, "disk.raw")
	fill := func(i int) byte { return []byte{9, 2, 0, 4, 0, 6, 0, 9}[i] }
	image(t, img, 8, fill, 6)
	m1, st1, err := s.Backup(ctx, openSource(t, img), "vol1/snap1", BackupOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if st1.NewChunks != 4 || st1.ZeroChunks != 3 || st1.ReusedChunks != 1 {
		t.Errorf("first backup stats %+v: want 4 new, 3 zero, 1 reused", st1)
	}
	if n := chunkPuts(); n != 4 {
		t.Errorf("first backup: the server saw %d chunk PUTs, want 4", n)
	}

	// Change one chunk: the second backup uploads exactly that one.
	img2 := filepath.Join(dir, "disk2.raw")
	image(t, img2, 8, func(i int) byte {
		if i == 3 {
			return 44
		}
		return fill(i)
	}, 6)
	m2, st2, err := s.Backup(ctx, openSource(t, img2), "vol1/snap2", BackupOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if st2.NewChunks != 1 {
		t.Errorf("second backup stats %+v: want 1 new chunk", st2)
	}
	if n := chunkPuts(); n != 5 {
		t.Errorf("after the second backup the server saw %d chunk PUTs, want 5 (1 new)", n)
	}
	if n := srv.CountRequests("PutObject", testPrefix+"/manifests/"); n != 2 {
		t.Errorf("manifest PUTs: %d, want 2 (one per backup)", n)
	}
	if got, want := keys(t, srv, testPrefix+"/manifests/"), []string{testPrefix + "/manifests/vol1/snap1.json", testPrefix + "/manifests/vol1/snap2.json"}; !slices.Equal(got, want) {
		t.Errorf("manifests %v, want %v", got, want)
	}

	// Manifests read back equal; restores are byte-equal.
	if got, err := s.Manifest(ctx, "vol1/snap2"); err != nil || !slices.Equal(got.Chunks, m2.Chunks) {
		t.Fatalf("manifest read back: %v", err)
	}
	for i, c := range []struct {
		m   *Manifest
		img string
	}{{m1, img}, {m2, img2}} {
		out := filepath.Join(dir, fmt.Sprintf("out%d.raw", i))
		if err := restoreFile(t, s, c.m, out); err != nil {
			t.Fatal(err)
		}
		sameFile(t, c.img, out)
	}

	// A backup under an existing name is refused.
	if _, _, err := s.Backup(ctx, openSource(t, img), "vol1/snap1", BackupOptions{ChunkSize: cs}); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("backup over an existing manifest: %v", err)
	}

	// Deleting snap1 removes only its unshared chunk (the old chunk 3).
	before := keys(t, srv, testPrefix+"/chunks/")
	dst, err := s.Delete(ctx, "vol1/snap1")
	if err != nil {
		t.Fatal(err)
	}
	if dst.RemovedChunks != 1 || dst.RemovedBytes != cs || dst.KeptChunks != 3 {
		t.Errorf("delete stats %+v: want 1 removed (%d bytes), 3 kept", dst, cs)
	}
	after := keys(t, srv, testPrefix+"/chunks/")
	gone := slices.DeleteFunc(slices.Clone(before), func(k string) bool { return slices.Contains(after, k) })
	if want := chunkKeys(m1.Chunks[3]); !slices.Equal(gone, want) {
		t.Errorf("delete removed %v, want %v", gone, want)
	}
	if want := chunkKeys(m2.Chunks[0], m2.Chunks[1], m2.Chunks[3], m2.Chunks[5]); !slices.Equal(after, want) {
		t.Errorf("chunks left %v, want snap2's %v", after, want)
	}
	if err := restoreFile(t, s, m2, filepath.Join(dir, "again.raw")); err != nil {
		t.Fatalf("restore of the kept backup after the delete: %v", err)
	}
	// Deleting again is a no-op; deleting the last backup empties the store
	// (no lock objects are left behind either).
	if st, err := s.Delete(ctx, "vol1/snap1"); err != nil || st != (DeleteStats{}) {
		t.Errorf("second delete: %+v %v", st, err)
	}
	if _, err := s.Delete(ctx, "vol1/snap2"); err != nil {
		t.Fatal(err)
	}
	if left := keys(t, srv, testPrefix+"/"); len(left) != 0 {
		t.Errorf("after deleting every backup the prefix holds %v", left)
	}
}

func TestS3RestoreDetectsCorruptAndMissingChunks(t *testing.T) {
	ctx := t.Context()
	s, srv := openS3(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	image(t, img, 4, func(i int) byte { return byte(i + 1) })
	m, _, err := s.Backup(ctx, openSource(t, img), "a", BackupOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	c := srv.Client()
	key := chunkKeys(m.Chunks[2])[0]

	// Same length, other bytes.
	bad := bytes.Repeat([]byte{0xee}, cs)
	if _, err := c.PutObject(ctx, srv.Bucket, key, bytes.NewReader(bad), cs, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	err = restoreFile(t, s, m, filepath.Join(dir, "o1"))
	if !errors.Is(err, errdefs.ErrDataLoss) || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("restore over a corrupt chunk: %v", err)
	}
	// Short.
	if _, err := c.PutObject(ctx, srv.Bucket, key, bytes.NewReader(bad[:100]), 100, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := restoreFile(t, s, m, filepath.Join(dir, "o2")); !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("restore over a short chunk: %v", err)
	}
	// Missing: data loss, not "not found".
	if err := c.RemoveObject(ctx, srv.Bucket, key, minio.RemoveObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	err = restoreFile(t, s, m, filepath.Join(dir, "o3"))
	if errdefs.Class(err) != errdefs.ErrDataLoss {
		t.Fatalf("restore with a missing chunk: %v (class %v)", err, errdefs.Class(err))
	}
	// A later backup heals the damaged store (the chunk counts as missing).
	if _, st, err := s.Backup(ctx, openSource(t, img), "b", BackupOptions{ChunkSize: cs}); err != nil || st.NewChunks != 1 {
		t.Fatalf("healing backup: %+v %v", st, err)
	}
	if err := restoreFile(t, s, m, filepath.Join(dir, "o4")); err != nil {
		t.Fatal(err)
	}
}

func TestS3DeleteRefusesUnknownObjects(t *testing.T) {
	ctx := t.Context()
	s, srv := openS3(t)
	img := filepath.Join(t.TempDir(), "disk.raw")
	image(t, img, 2, func(i int) byte { return 7 })
	if _, _, err := s.Backup(ctx, openSource(t, img), "a", BackupOptions{ChunkSize: cs}); err != nil {
		t.Fatal(err)
	}
	c := srv.Client()
	if _, err := c.PutObject(ctx, srv.Bucket, testPrefix+"/manifests/notes.txt", strings.NewReader("hi"), 2, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Delete(ctx, "a"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("delete next to a non-manifest: %v", err)
	}
	c.RemoveObject(ctx, srv.Bucket, testPrefix+"/manifests/notes.txt", minio.RemoveObjectOptions{})
	// A .json that is not a manifest stops it too.
	if _, err := c.PutObject(ctx, srv.Bucket, testPrefix+"/manifests/b.json", strings.NewReader("{}"), 2, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Delete(ctx, "a"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("delete next to a bad manifest: %v", err)
	}
	if n := len(keys(t, srv, testPrefix+"/chunks/")); n != 1 {
		t.Fatalf("a refused delete removed chunks: %d left", n)
	}
	for _, bad := range []string{"", "/a", "a/", "../a", "a//b", ".hidden", "a b", "a/./b"} {
		if _, err := s.Delete(ctx, bad); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("delete %q: %v, want invalid", bad, err)
		}
	}
}

func TestS3Locks(t *testing.T) {
	ctx := t.Context()
	s, srv := openS3(t)
	l := s.Backend().(Locker)

	_, unlockX, err := l.Lock(ctx, LockExclusive)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	if _, _, err := l.Lock(short, LockShared); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("shared lock while an exclusive one is held: %v", err)
	}
	cancel()
	unlockX()

	// Shared locks share; an exclusive one waits for both to go.
	_, unlock1, err := l.Lock(ctx, LockShared)
	if err != nil {
		t.Fatal(err)
	}
	_, unlock2, err := l.Lock(ctx, LockShared)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		_, unlock, err := l.Lock(ctx, LockExclusive)
		if err == nil {
			unlock()
		}
		got <- err
	}()
	unlock1()
	select {
	case err := <-got:
		t.Fatalf("exclusive lock taken while a shared one is held: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	unlock2()
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("exclusive lock not taken after the shared ones went")
	}

	// A lease older than LeaseTTL (a crashed holder's) is ignored and removed.
	stale := testPrefix + "/locks/exclusive-crashed"
	if _, err := srv.Client().PutObject(ctx, srv.Bucket, stale, bytes.NewReader(nil), 0, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-2 * LeaseTTL)
	if err := os.Chtimes(filepath.Join(srv.Root, srv.Bucket, stale), old, old); err != nil {
		t.Fatal(err)
	}
	short, cancel = context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, unlock, err := l.Lock(short, LockShared)
	if err != nil {
		t.Fatalf("lock next to a stale lease: %v", err)
	}
	unlock()
	if left := keys(t, srv, testPrefix+"/locks/"); len(left) != 0 {
		t.Errorf("lock objects left: %v", left)
	}
}

func TestS3SecretsStayOut(t *testing.T) {
	srv := s3test.Start(t)
	cfg := s3Config(srv)
	for _, s := range []string{cfg.String(), fmt.Sprintf("%v %+v %#v %s", cfg, cfg, cfg, cfg)} {
		if strings.Contains(s, cfg.SecretKey) || strings.Contains(s, cfg.AccessKey) {
			t.Errorf("config printed with a key: %s", s)
		}
	}
	wrong := cfg
	wrong.SecretKey = "not-the-secret-" + strings.Repeat("x", 20)
	_, err := OpenS3(t.Context(), wrong)
	if !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("open with a wrong secret: %v", err)
	}
	t.Logf("wrong secret: %v", err)
	if strings.Contains(err.Error(), wrong.SecretKey) || strings.Contains(err.Error(), cfg.SecretKey) {
		t.Errorf("error shows the secret: %v", err)
	}
	cfg.Bucket = "no-such-bucket"
	if _, err := OpenS3(t.Context(), cfg); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("open of a missing bucket: %v", err)
	}
}

func TestS3CreateManifestNeverReplaces(t *testing.T) {
	s, _ := openS3(t)
	b := s.Backend()
	if err := b.CreateManifest(t.Context(), "x", []byte("1")); err != nil {
		t.Fatal(err)
	}
	if err := b.CreateManifest(t.Context(), "x", []byte("2")); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("second create: %v", err)
	}
	if got, err := b.ReadManifest(t.Context(), "x"); err != nil || string(got) != "1" {
		t.Fatalf("manifest now %q (%v), want the first", got, err)
	}
}

// A delete racing a backup of the same data never leaves the backup's
// manifest naming a removed chunk: the leases serialise them.
func TestS3DeleteRacingBackup(t *testing.T) {
	ctx := t.Context()
	s, _ := openS3(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	image(t, img, 16, func(i int) byte { return byte(i + 1) })
	for round := range 3 {
		first, second := fmt.Sprintf("r%d/a", round), fmt.Sprintf("r%d/b", round)
		if _, _, err := s.Backup(ctx, openSource(t, img), first, BackupOptions{ChunkSize: cs}); err != nil {
			t.Fatal(err)
		}
		errs := make(chan error, 2)
		var m *Manifest
		go func() {
			var err error
			m, _, err = s.Backup(ctx, openSource(t, img), second, BackupOptions{ChunkSize: cs, Workers: 1})
			errs <- err
		}()
		go func() { _, err := s.Delete(ctx, first); errs <- err }()
		for range 2 {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		if err := restoreFile(t, s, m, filepath.Join(dir, "out")); err != nil {
			t.Fatalf("round %d: restore of the backup that raced a delete: %v", round, err)
		}
		if _, err := s.Delete(ctx, second); err != nil {
			t.Fatal(err)
		}
	}
}

// A holder that cannot renew its lease cancels its own work.
func TestS3LostLeaseCancelsWork(t *testing.T) {
	s, srv := openS3(t)
	defer func(r, g time.Duration) { leaseRenew, leaseGiveUp = r, g }(leaseRenew, leaseGiveUp)
	leaseRenew, leaseGiveUp = 50*time.Millisecond, 300*time.Millisecond
	ctx, unlock, err := s.Backend().(Locker).Lock(t.Context(), LockShared)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	srv.Stop()
	select {
	case <-ctx.Done():
		if err := context.Cause(ctx); !errors.Is(err, errdefs.ErrAborted) {
			t.Errorf("cause %v, want aborted", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the lock's context outlived a lease it could not renew")
	}
}

// TestS3LockCancelledLeavesNoLease: a Lock whose ctx ends while it writes
// its lease (the PUT reached the server, the reply or the stat did not)
// must not leave the lease behind: an exclusive locker (a delete, the
// collector) would wait LeaseTTL, ten minutes, for it. CI saw the
// exclusive lock of TestS3Locks time out after its 300 ms shared probe.
// Deadlines spread over the lease write's time hit it at every point.
func TestS3LockCancelledLeavesNoLease(t *testing.T) {
	s, srv := openS3(t)
	l := s.Backend().(Locker)
	for i := range 60 {
		ctx, cancel := context.WithTimeout(t.Context(), time.Duration(i%30)*time.Millisecond/2)
		_, unlock, err := l.Lock(ctx, LockShared)
		cancel()
		if err == nil {
			unlock()
		}
		if left := keys(t, srv, testPrefix+"/locks/"); len(left) != 0 {
			t.Fatalf("attempt %d (deadline %v, err %v): lock objects left: %v", i, time.Duration(i%30)*time.Millisecond/2, err, left)
		}
	}
}

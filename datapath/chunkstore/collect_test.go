package chunkstore

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
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

// collectCase is one backend under the Collect test.
type collectCase struct {
	s *Store
	// manifest is the name of backup b in the store.
	manifest func(b string) string
	near     string
	// spoil makes the manifest name unreadable (not a manifest).
	spoil func(t *testing.T, name string)
}

// putOrphans stores n chunks of random bytes that no manifest names, as a
// backup killed before its manifest leaves them, and returns their hashes.
func putOrphans(t *testing.T, s *Store, n int) []string {
	t.Helper()
	var out []string
	for range n {
		data := make([]byte, cs)
		rand.Read(data)
		sum := sha256.Sum256(data)
		h := hex.EncodeToString(sum[:])
		if err := s.Backend().PutChunk(t.Context(), h, data); err != nil {
			t.Fatal(err)
		}
		out = append(out, h)
	}
	if err := s.syncChunks(t.Context()); err != nil {
		t.Fatal(err)
	}
	return out
}

func listChunks(t *testing.T, s *Store) []string {
	t.Helper()
	var out []string
	if err := s.Backend().ListChunks(t.Context(), func(h string) error {
		out = append(out, h)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

// distinct is the sorted set of stored chunks the manifests name.
func distinct(ms ...*Manifest) []string {
	var out []string
	for _, m := range ms {
		for _, h := range m.Chunks {
			if h != ZeroChunk {
				out = append(out, h)
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func testCollect(t *testing.T, c collectCase) {
	ctx := t.Context()
	s := c.s
	dir := t.TempDir()

	// Two backups sharing chunks: 8 chunks, a hole at 4; the second
	// changes chunks 2 and 7.
	fill1 := func(i int) byte { return []byte{1, 2, 3, 4, 0, 6, 7, 8}[i] }
	fill2 := func(i int) byte { return []byte{1, 2, 30, 4, 0, 6, 7, 80}[i] }
	img1, img2 := filepath.Join(dir, "d1.raw"), filepath.Join(dir, "d2.raw")
	image(t, img1, 8, fill1)
	image(t, img2, 8, fill2)
	m1, _, err := s.Backup(ctx, openSource(t, img1), c.manifest("b1"), BackupOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	m2, _, err := s.Backup(ctx, openSource(t, img2), c.manifest("b2"), BackupOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	live := distinct(m1, m2)
	if len(live) != 9 { // 7 of b1, 2 new in b2
		t.Fatalf("the backups store %d distinct chunks, want 9", len(live))
	}

	// Nothing to collect yet.
	if st, err := s.Collect(ctx, c.near); err != nil || st != (CollectStats{Manifests: 2, Chunks: 9, KeptChunks: 9}) {
		t.Fatalf("Collect of a store without orphans = %+v, %v", st, err)
	}

	orphans := putOrphans(t, s, 5)
	if got := listChunks(t, s); len(got) != len(live)+len(orphans) {
		t.Fatalf("store lists %d chunks, want %d live + %d orphans", len(got), len(live), len(orphans))
	}
	st, err := s.Collect(ctx, c.near)
	if err != nil {
		t.Fatal(err)
	}
	want := CollectStats{Manifests: 2, Chunks: 14, KeptChunks: 9, RemovedChunks: 5, RemovedBytes: 5 * cs}
	if st != want {
		t.Errorf("Collect = %+v, want %+v", st, want)
	}
	if got := listChunks(t, s); !slices.Equal(got, live) {
		t.Errorf("after Collect the store holds %d chunks %v, want exactly the %d the manifests name", len(got), got, len(live))
	}
	for _, h := range orphans {
		if _, err := s.Backend().StatChunk(ctx, h); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("orphan %s: stat = %v, want not found", h, err)
		}
	}
	for i, b := range []struct {
		name, img string
	}{{"b1", img1}, {"b2", img2}} {
		m, err := s.Manifest(ctx, c.manifest(b.name))
		if err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(dir, fmt.Sprintf("out%d.raw", i))
		if err := restoreFile(t, s, m, out); err != nil {
			t.Fatalf("restore of %s after Collect: %v", b.name, err)
		}
		sameFile(t, b.img, out)
	}

	// An unreadable manifest stops Collect before it removes anything.
	orphans = putOrphans(t, s, 3)
	c.spoil(t, c.manifest("b2"))
	before := listChunks(t, s)
	if st, err := s.Collect(ctx, c.near); !errors.Is(err, errdefs.ErrFailedPrecondition) || st.RemovedChunks != 0 {
		t.Fatalf("Collect next to an unreadable manifest = %+v, %v; want ErrFailedPrecondition and nothing removed", st, err)
	}
	if got := listChunks(t, s); !slices.Equal(got, before) {
		t.Errorf("a refused Collect changed the chunks: %d before, %d after", len(before), len(got))
	}
}

func TestCollectDir(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(filepath.Join(dir, "chunks"))
	if err != nil {
		t.Fatal(err)
	}
	mdir := filepath.Join(dir, "manifests")
	if err := os.Mkdir(mdir, 0o755); err != nil {
		t.Fatal(err)
	}
	// Things in the chunk directory that are not chunks are left alone.
	os.MkdirAll(filepath.Join(s.Dir(), "zz"), 0o755)
	os.WriteFile(filepath.Join(s.Dir(), "zz", strings.Repeat("a", 64)), []byte("x"), 0o644) // wrong directory name
	os.MkdirAll(filepath.Join(s.Dir(), "ab"), 0o755)
	os.WriteFile(filepath.Join(s.Dir(), "ab", ".tmp-0123"), []byte("x"), 0o644)
	os.WriteFile(filepath.Join(s.Dir(), "ab", strings.Repeat("c", 64)), []byte("x"), 0o644) // hash of another directory
	testCollect(t, collectCase{
		s:        s,
		manifest: func(b string) string { return filepath.Join(mdir, b+".json") },
		near:     filepath.Join(mdir, "any"),
		spoil: func(t *testing.T, name string) {
			if err := os.WriteFile(name, []byte("{not json"), 0o644); err != nil {
				t.Fatal(err)
			}
		},
	})
	for _, p := range []string{"zz/" + strings.Repeat("a", 64), "ab/.tmp-0123", "ab/" + strings.Repeat("c", 64)} {
		if _, err := os.Stat(filepath.Join(s.Dir(), p)); err != nil {
			t.Errorf("Collect removed %s, which is not a chunk: %v", p, err)
		}
	}
}

func TestCollectS3(t *testing.T) {
	s, srv := openS3(t)
	// A key under chunks/ that is not a chunk is left alone.
	odd := testPrefix + "/chunks/ab/notes.txt"
	if _, err := srv.Client().PutObject(t.Context(), srv.Bucket, odd, strings.NewReader("hi"), 2, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	testCollect(t, collectCase{
		s:        s,
		manifest: func(b string) string { return "vol1/" + b },
		spoil: func(t *testing.T, name string) {
			key := testPrefix + "/manifests/" + name + ".json"
			if _, err := srv.Client().PutObject(t.Context(), srv.Bucket, key, strings.NewReader("{}"), 2, minio.PutObjectOptions{}); err != nil {
				t.Fatal(err)
			}
		},
	})
	if !slices.Contains(keys(t, srv, testPrefix+"/chunks/"), odd) {
		t.Errorf("Collect removed %s, which is not a chunk", odd)
	}
	if locks := keys(t, srv, testPrefix+"/locks/"); len(locks) != 0 {
		t.Errorf("Collect left lock objects %v", locks)
	}
}

// A backup holding the shared lock keeps Collect waiting: it removes
// nothing until its ctx ends.
func TestCollectWaitsForBackups(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(filepath.Join(dir, "chunks"))
	if err != nil {
		t.Fatal(err)
	}
	mdir := filepath.Join(dir, "manifests")
	os.Mkdir(mdir, 0o755)
	orphans := putOrphans(t, s, 2)
	_, unlock, err := s.lock(t.Context(), LockShared)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if st, err := s.Collect(ctx, filepath.Join(mdir, "x")); !errors.Is(err, context.DeadlineExceeded) || st.RemovedChunks != 0 {
		t.Fatalf("Collect while a backup holds the lock = %+v, %v; want it to wait until its deadline", st, err)
	}
	if n := len(listChunks(t, s)); n != len(orphans) {
		t.Fatalf("the store holds %d chunks, want the %d orphans untouched", n, len(orphans))
	}
	unlock()
	if st, err := s.Collect(t.Context(), filepath.Join(mdir, "x")); err != nil || st.RemovedChunks != 2 {
		t.Fatalf("Collect once the backup is done = %+v, %v; want 2 removed", st, err)
	}
}

// BenchmarkCollectDir: a directory store whose one manifest names 20,000
// chunks, with 0 or 5,000 orphans put back before each Collect (untimed).
// Reports the time per listed chunk and the bytes allocated per Collect.
func BenchmarkCollectDir(b *testing.B) {
	for _, orphans := range []int{0, 5000} {
		b.Run(fmt.Sprintf("orphans=%d", orphans), func(b *testing.B) { benchCollectDir(b, 20000, orphans) })
	}
}

func benchCollectDir(b *testing.B, live, orphans int) {
	dir := b.TempDir()
	s, err := Open(filepath.Join(dir, "chunks"))
	if err != nil {
		b.Fatal(err)
	}
	mdir := filepath.Join(dir, "manifests")
	os.Mkdir(mdir, 0o755)
	ctx := context.Background()
	put := func(prefix string, n int) []string {
		var out []string
		for i := range n {
			sum := sha256.Sum256(fmt.Appendf(nil, "%s-%d", prefix, i))
			h := hex.EncodeToString(sum[:])
			if err := s.b.PutChunk(ctx, h, []byte{1}); err != nil {
				b.Fatal(err)
			}
			out = append(out, h)
		}
		return out
	}
	m := &Manifest{Version: ManifestVersion, Size: int64(live) * cs, ChunkSize: cs, Chunks: put("live", live)}
	if err := WriteManifest(filepath.Join(mdir, "m.json"), m); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		put(fmt.Sprint("orphan", i), orphans)
		b.StartTimer()
		st, err := s.Collect(ctx, filepath.Join(mdir, "m.json"))
		if err != nil || st.RemovedChunks != int64(orphans) || st.KeptChunks != int64(live) {
			b.Fatalf("Collect = %+v, %v", st, err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*(live+orphans)), "ns/chunk")
}

// BenchmarkCollectS3: as BenchmarkCollectDir against versitygw on
// loopback, with 2,000 live chunks and 0 or 500 orphans.
func BenchmarkCollectS3(b *testing.B) {
	for _, orphans := range []int{0, 500} {
		b.Run(fmt.Sprintf("orphans=%d", orphans), func(b *testing.B) {
			const live = 2000
			srv := s3test.Start(b)
			s, err := OpenS3(b.Context(), s3Config(srv))
			if err != nil {
				b.Fatal(err)
			}
			ctx := b.Context()
			put := func(prefix string, n int) []string {
				var out []string
				for i := range n {
					sum := sha256.Sum256(fmt.Appendf(nil, "%s-%d", prefix, i))
					h := hex.EncodeToString(sum[:])
					if err := s.b.PutChunk(ctx, h, []byte{1}); err != nil {
						b.Fatal(err)
					}
					out = append(out, h)
				}
				return out
			}
			m := &Manifest{Version: ManifestVersion, Size: live * cs, ChunkSize: cs, Chunks: put("live", live)}
			raw, err := encodeManifest("m", m)
			if err != nil {
				b.Fatal(err)
			}
			if err := s.b.CreateManifest(ctx, "m", raw); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				b.StopTimer()
				put(fmt.Sprint("orphan", i), orphans)
				b.StartTimer()
				st, err := s.Collect(ctx, "")
				if err != nil || st.RemovedChunks != int64(orphans) || st.KeptChunks != live {
					b.Fatalf("Collect = %+v, %v", st, err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*(live+orphans)), "ns/chunk")
		})
	}
}

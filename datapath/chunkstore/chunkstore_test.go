package chunkstore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
)

const cs = MinChunkSize // small chunks keep the tests fast

// image builds a sparse file of n chunks: chunk i holds data when
// fill(i) != 0 (every byte fill(i)), is a hole when fill(i) == 0, and
// chunks in zeros are written as explicit zero bytes (allocated).
func image(t *testing.T, path string, n int, fill func(i int) byte, zeros ...int) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(n) * cs); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if c := fill(i); c != 0 {
			if _, err := f.WriteAt(bytes.Repeat([]byte{c}, cs), int64(i)*cs); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, i := range zeros {
		if _, err := f.WriteAt(make([]byte, cs), int64(i)*cs); err != nil {
			t.Fatal(err)
		}
	}
}

func openSource(t *testing.T, path string) stream.Source {
	t.Helper()
	src, err := stream.OpenSource(t.Context(), path, stream.SourceOptions{Format: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

// restoreFile restores m into a fresh file through a stream file sink.
func restoreFile(t *testing.T, s *Store, m *Manifest, path string) error {
	t.Helper()
	sink, err := stream.OpenSink(t.Context(), path, m.Size, stream.SinkOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Restore(t.Context(), m, sink, RestoreOptions{}); err != nil {
		sink.Abort()
		return err
	}
	return sink.Commit(t.Context())
}

func sameFile(t *testing.T, a, b string) {
	t.Helper()
	if _, err := exec.LookPath("cmp"); err == nil {
		if out, err := exec.Command("cmp", a, b).CombinedOutput(); err != nil {
			t.Fatalf("cmp %s %s: %v: %s", a, b, err, out)
		}
		return
	}
	x, _ := os.ReadFile(a)
	y, _ := os.ReadFile(b)
	if !bytes.Equal(x, y) {
		t.Fatalf("%s and %s differ", a, b)
	}
}

func countChunks(t *testing.T, dir string) int {
	t.Helper()
	n := 0
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() && isHash(d.Name()) {
			n++
		}
		return nil
	})
	return n
}

func TestBackupIncrementalRestoreDelete(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	s, err := Open(filepath.Join(dir, "chunks"))
	if err != nil {
		t.Fatal(err)
	}
	mdir := filepath.Join(dir, "manifests")
	os.Mkdir(mdir, 0o755)

	// 16 chunks: 0-9 data (all different), 10-12 holes, 13-14 written zeros, 15 data like chunk 0.
	img := filepath.Join(dir, "disk.raw")
	fill := func(i int) byte {
		switch {
		case i < 10:
			return byte(i + 1)
		case i == 15:
			return 1
		}
		return 0
	}
	image(t, img, 16, fill, 13, 14)

	var calls atomic.Int32
	m1, st1, err := s.Backup(ctx, openSource(t, img), filepath.Join(mdir, "b1.json"), BackupOptions{
		ChunkSize: cs, Progress: func(done, total int64) {
			calls.Add(1)
			if total != 16*cs || done > total {
				t.Errorf("progress %d/%d", done, total)
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	want := Stats{Size: 16 * cs, Chunks: 16, ZeroChunks: 5, NewChunks: 10, NewBytes: 10 * cs,
		ReusedChunks: 1, ReusedBytes: cs, ReadBytes: 13 * cs} // holes are not read; written zeros are
	if st1 != want {
		t.Fatalf("first backup: %+v\nwant %+v", st1, want)
	}
	if calls.Load() == 0 {
		t.Error("progress never called")
	}
	if got := countChunks(t, s.Dir()); got != 10 {
		t.Fatalf("store holds %d chunks, want 10 (zero chunks are not stored)", got)
	}
	for i := 10; i < 15; i++ {
		if m1.Chunks[i] != ZeroChunk {
			t.Errorf("chunk %d = %q, want zero", i, m1.Chunks[i])
		}
	}
	// The manifest on disk is the documented JSON.
	raw, _ := os.ReadFile(filepath.Join(mdir, "b1.json"))
	var doc map[string]any
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"version", "size", "chunk_size", "chunks", "created_at"} {
		if _, ok := doc[k]; !ok {
			t.Errorf("manifest lacks %q: %s", k, raw[:min(len(raw), 200)])
		}
	}

	// A small change in chunk 3: the second backup stores exactly one chunk.
	f, _ := os.OpenFile(img, os.O_RDWR, 0)
	f.WriteAt([]byte("changed"), 3*cs+100)
	f.Close()
	m2, st2, err := s.Backup(ctx, openSource(t, img), filepath.Join(mdir, "b2.json"), BackupOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	if st2.NewChunks != 1 || st2.NewBytes != cs || st2.ReusedBytes != 10*cs || st2.ZeroChunks != 5 {
		t.Fatalf("second backup: %+v; want 1 new chunk of %d bytes, %d reused", st2, cs, 10*cs)
	}

	// Restores are byte-equal, holes stay holes.
	out := filepath.Join(dir, "restored.raw")
	if err := restoreFile(t, s, m2, out); err != nil {
		t.Fatal(err)
	}
	sameFile(t, img, out)
	out1 := filepath.Join(dir, "restored1.raw")
	if err := restoreFile(t, s, m1, out1); err != nil {
		t.Fatal(err)
	}
	orig := filepath.Join(dir, "orig.raw")
	image(t, orig, 16, fill, 13, 14)
	sameFile(t, orig, out1)
	if fi, err := os.Stat(out1); err == nil {
		if alloc := fi.Sys().(*syscall.Stat_t).Blocks * 512; alloc > 11*cs+64<<10 {
			t.Errorf("restored file allocates %d bytes, want about %d (zeros stay holes)", alloc, 11*cs)
		}
	}

	// Delete b1: only the old chunk 3 goes, b2 still restores.
	dst, err := s.Delete(ctx, filepath.Join(mdir, "b1.json"))
	if err != nil {
		t.Fatal(err)
	}
	if dst.RemovedChunks != 1 || dst.RemovedBytes != cs || dst.KeptChunks != 9 {
		t.Fatalf("delete b1: %+v", dst)
	}
	if _, err := os.Stat(filepath.Join(mdir, "b1.json")); !os.IsNotExist(err) {
		t.Fatalf("manifest b1 still there: %v", err)
	}
	if err := restoreFile(t, s, m2, filepath.Join(dir, "again.raw")); err != nil {
		t.Fatalf("restore b2 after deleting b1: %v", err)
	}
	// Deleting again is a no-op; deleting b2 empties the store.
	if _, err := s.Delete(ctx, filepath.Join(mdir, "b1.json")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Delete(ctx, filepath.Join(mdir, "b2.json")); err != nil {
		t.Fatal(err)
	}
	if got := countChunks(t, s.Dir()); got != 0 {
		t.Fatalf("store holds %d chunks after deleting every backup", got)
	}
}

func TestBackupFromParentReadsOnlyChangedChunks(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	s, _ := Open(filepath.Join(dir, "chunks"))
	img := filepath.Join(dir, "disk.raw")
	image(t, img, 8, func(i int) byte { return byte(i + 1) })
	parent, _, err := s.Backup(ctx, openSource(t, img), filepath.Join(dir, "p.json"), BackupOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	f, _ := os.OpenFile(img, os.O_RDWR, 0)
	f.WriteAt([]byte("new"), 5*cs)
	f.Close()
	changed := func(off, n int64) bool { return !(off <= 5*cs && 5*cs < off+n) }
	m, st, err := s.Backup(ctx, openSource(t, img), filepath.Join(dir, "c.json"), BackupOptions{Parent: parent, ParentUnchanged: changed})
	if err != nil {
		t.Fatal(err)
	}
	if st.ReadBytes != cs || st.ParentChunks != 7 || st.NewChunks != 1 {
		t.Fatalf("incremental from parent: %+v; want one chunk read and written", st)
	}
	if err := restoreFile(t, s, m, filepath.Join(dir, "r.raw")); err != nil {
		t.Fatal(err)
	}
	sameFile(t, img, filepath.Join(dir, "r.raw"))
	// A different chunk size than the parent's is refused.
	if _, _, err := s.Backup(ctx, openSource(t, img), filepath.Join(dir, "x.json"), BackupOptions{Parent: parent, ChunkSize: 2 * cs}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("chunk size mismatch: %v", err)
	}
	// An existing manifest is not overwritten.
	if _, _, err := s.Backup(ctx, openSource(t, img), filepath.Join(dir, "c.json"), BackupOptions{}); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("backup over an existing manifest: %v", err)
	}
}

func TestRestoreDetectsCorruptAndMissingChunks(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	s, _ := Open(filepath.Join(dir, "chunks"))
	img := filepath.Join(dir, "disk.raw")
	image(t, img, 4, func(i int) byte { return byte(i + 1) })
	m, _, err := s.Backup(ctx, openSource(t, img), filepath.Join(dir, "m.json"), BackupOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	// Flip one byte of chunk 2 (same length).
	p := s.ChunkPath(m.Chunks[2])
	os.Chmod(p, 0o644)
	f, _ := os.OpenFile(p, os.O_RDWR, 0)
	f.WriteAt([]byte{0xff}, 1000)
	f.Close()
	out := filepath.Join(dir, "out.raw")
	err = restoreFile(t, s, m, out)
	if !errors.Is(err, errdefs.ErrDataLoss) || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("restore with a corrupt chunk: %v, want ErrDataLoss", err)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Fatalf("a failed restore left %s", out)
	}
	// A missing chunk is data loss too.
	os.Remove(p)
	if err := restoreFile(t, s, m, out); !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("restore with a missing chunk: %v", err)
	}
	// A later backup heals the store: the chunk is missing, so it is written again.
	_, st, err := s.Backup(ctx, openSource(t, img), filepath.Join(dir, "m2.json"), BackupOptions{ChunkSize: cs})
	if err != nil || st.NewChunks != 1 {
		t.Fatalf("healing backup: %+v %v", st, err)
	}
	if err := restoreFile(t, s, m, out); err != nil {
		t.Fatalf("restore after healing: %v", err)
	}
	sameFile(t, img, out)
}

func TestDeleteRefusesUnknownFiles(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	s, _ := Open(filepath.Join(dir, "chunks"))
	img := filepath.Join(dir, "disk.raw")
	image(t, img, 2, func(i int) byte { return 7 })
	mdir := filepath.Join(dir, "m")
	os.Mkdir(mdir, 0o755)
	if _, _, err := s.Backup(ctx, openSource(t, img), filepath.Join(mdir, "a.json"), BackupOptions{ChunkSize: cs}); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(mdir, "notes.txt"), []byte("hello"), 0o644)
	if _, err := s.Delete(ctx, filepath.Join(mdir, "a.json")); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("delete next to a non-manifest: %v", err)
	}
	if countChunks(t, s.Dir()) != 1 {
		t.Fatal("a refused delete removed chunks")
	}
}

func TestLockHonoursContext(t *testing.T) {
	s, _ := Open(t.TempDir())
	_, unlock, err := s.lock(t.Context(), LockExclusive)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, _, err := s.lock(ctx, LockShared); !errors.Is(err, context.Canceled) {
		t.Fatalf("shared lock while exclusively held, cancelled: %v", err)
	}
}

func TestManifestValidate(t *testing.T) {
	good := Manifest{Version: 1, Size: cs + 1, ChunkSize: cs, Chunks: []string{ZeroChunk, strings.Repeat("a", 64)}}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, m := range map[string]Manifest{
		"version":   {Version: 2, Size: 0, ChunkSize: cs},
		"chunksize": {Version: 1, Size: 0, ChunkSize: 1000},
		"count":     {Version: 1, Size: 2 * cs, ChunkSize: cs, Chunks: []string{ZeroChunk}},
		"hash":      {Version: 1, Size: cs, ChunkSize: cs, Chunks: []string{"ABC"}},
	} {
		if err := m.Validate(); err == nil {
			t.Errorf("%s: invalid manifest accepted", name)
		}
	}
}

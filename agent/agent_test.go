package agent_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stowage/stowage/agent"
	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/datapath/chunkstore"
	"github.com/stowage/stowage/datapath/s3conn"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/s3/s3test"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	"github.com/stowage/stowage/internal/envtest"
)

// rig is an agent serving on loopback, a hostops.Remote talking to it,
// and a store it serves (id "s1" at dir).
type rig struct {
	ep  *hostops.Remote
	url string
	dir string
}

func newRig(t *testing.T, opts ...agent.Option) rig {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		envtest.Skipf(t, "qemu-img is not installed: %v", err)
	}
	x := exports.New()
	base := t.TempDir()
	local := hostfs.New("h1", hostfs.WithExporter(x))
	a, err := agent.New(agent.Config{ControllerURL: "http://127.0.0.1:1", HostID: "h1", StateDir: t.TempDir(), StoreRoots: []string{base}},
		local, slog.New(slog.NewTextHandler(io.Discard, nil)), append(opts, agent.WithExports(x))...)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(srv.Close)
	t.Cleanup(a.Close)
	x.SetBaseURL(srv.URL)
	r := rig{ep: hostops.NewRemote("h1", srv.URL, srv.Client(), hostops.WithPollInterval(20*time.Millisecond)), url: srv.URL, dir: filepath.Join(base, "s1")}
	if _, err := r.ep.PrepareStore(t.Context(), hostops.StoreRoot{ID: "s1", Path: r.dir, Subdirs: []string{"templates", "volumes", "snapshots"}}); err != nil {
		t.Fatal(err)
	}
	return r
}

// ref names key in the rig's store.
func ref(key string) hostops.Ref { return hostops.Ref{Store: "s1", Key: key} }

// source serves one file of random data; every response body is written
// slowly (delay per 256 KiB) and waits for gate when it is set.
type source struct {
	data   []byte
	sha    string
	delay  time.Duration
	probes atomic.Int32 // "Range: bytes=0-0" requests: one per fetch started
	gets   atomic.Int32
	gate   chan struct{}
}

func newSource(t *testing.T, size int, delay time.Duration) (*source, string) {
	s := &source{data: make([]byte, size), delay: delay}
	rand.Read(s.data)
	sum := sha256.Sum256(s.data)
	s.sha = hex.EncodeToString(sum[:])
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return s, srv.URL + "/disk.raw"
}

func (s *source) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Range") == "bytes=0-0" {
		s.probes.Add(1)
	} else {
		s.gets.Add(1)
		if s.gate != nil {
			select {
			case <-s.gate:
			case <-r.Context().Done():
				return
			}
		}
	}
	http.ServeContent(&slowWriter{ResponseWriter: w, delay: s.delay}, r, "disk.raw", time.Unix(1700000000, 0), bytes.NewReader(s.data))
}

type slowWriter struct {
	http.ResponseWriter
	delay time.Duration
}

func (w *slowWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), 256<<10)
		if w.delay > 0 {
			time.Sleep(w.delay * time.Duration(k) / (256 << 10))
		}
		m, err := w.ResponseWriter.Write(p[:k])
		n += m
		if err != nil {
			return n, err
		}
		p = p[k:]
	}
	return n, nil
}

// progressLog records progress calls and fails on concurrent ones.
type progressLog struct {
	mu    sync.Mutex
	calls [][2]int64
	busy  atomic.Bool
}

func (p *progressLog) fn(done, total int64) {
	if !p.busy.CompareAndSwap(false, true) {
		panic("progress called concurrently")
	}
	p.mu.Lock()
	p.calls = append(p.calls, [2]int64{done, total})
	p.mu.Unlock()
	p.busy.Store(false)
}

func (p *progressLog) get() [][2]int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([][2]int64(nil), p.calls...)
}

func TestFetchAndBackupThroughRemoteWithProgress(t *testing.T) {
	r := newRig(t)
	const size = 8 << 20
	src, url := newSource(t, size, 160*time.Millisecond) // about 1.3 s per 2 MiB range, several ranges in parallel
	dest := ref("templates/t.raw")

	var p progressLog
	info, err := r.ep.FetchImage(t.Context(), hostops.FetchRequest{Source: url, Dest: dest, Format: drivers.FormatRaw, Checksum: "sha256:" + src.sha}, p.fn)
	if err != nil {
		t.Fatal(err)
	}
	if info.SHA256 != src.sha || info.VirtualSize != size || info.Format != drivers.FormatRaw || info.Key != dest.Key || info.HasBacking {
		t.Fatalf("fetch: %+v", info)
	}
	calls := p.get()
	if len(calls) < 2 {
		t.Fatalf("progress calls %v: want one while running and the final one", calls)
	}
	running := false // a call polled while the copy ran: the total known, not done
	for _, c := range calls {
		running = running || (c[1] == size && c[0] < size)
	}
	if !running {
		t.Errorf("progress calls %v: none while the copy ran", calls)
	}
	if last := calls[len(calls)-1]; last != [2]int64{size, size} {
		t.Errorf("last progress call %v, want %d of %d", last, size, size)
	}

	// Backup of the fetched image into the store's chunk store, with progress.
	var bp progressLog
	chunks := hostops.ChunkStore{URI: "store://s1/snapshots"}
	b, err := r.ep.BackupImage(t.Context(), hostops.BackupRequest{Source: dest, SourceFormat: drivers.FormatRaw, Chunks: chunks, Manifest: "b1.json"}, bp.fn)
	if err != nil {
		t.Fatal(err)
	}
	if b.Size != size || b.Chunks != 2 || b.NewChunks != 2 || b.NewBytes != size || b.ReadBytes != size || b.Manifest != "b1.json" {
		t.Fatalf("backup: %+v", b)
	}
	if calls := bp.get(); len(calls) == 0 || calls[len(calls)-1] != [2]int64{size, size} {
		t.Fatalf("backup progress calls %v", calls)
	}
	for _, p := range []string{"snapshots/manifests/b1.json", "snapshots/chunks"} {
		if _, err := os.Stat(filepath.Join(r.dir, p)); err != nil {
			t.Fatalf("chunk store layout: %v", err)
		}
	}
	b2, err := r.ep.BackupImage(t.Context(), hostops.BackupRequest{Source: dest, SourceFormat: drivers.FormatRaw, Chunks: chunks, Manifest: "b2.json", ParentManifest: "b1.json"}, nil)
	if err != nil || b2.NewChunks != 0 || b2.ReusedBytes != size {
		t.Fatalf("second backup: %+v %v", b2, err)
	}
	// Restore through the Remote, byte-equal.
	out := ref("volumes/restored.raw")
	if info, err := r.ep.RestoreImage(t.Context(), hostops.RestoreRequest{Chunks: chunks, Manifest: "b2.json", Dest: out}, nil); err != nil || info.Key != out.Key {
		t.Fatal(info, err)
	}
	if got, _ := os.ReadFile(filepath.Join(r.dir, out.Key)); !bytes.Equal(got, src.data) {
		t.Fatal("restored image differs")
	}
	// Deleting a backup keeps the chunks the other one uses.
	if d, err := r.ep.DeleteBackup(t.Context(), hostops.DeleteBackupRequest{Chunks: chunks, Manifest: "b1.json"}); err != nil || d.Manifest != "b1.json" {
		t.Fatalf("delete backup: %+v %v", d, err)
	}
	if _, err := r.ep.RestoreImage(t.Context(), hostops.RestoreRequest{Chunks: chunks, Manifest: "b2.json", Dest: ref("volumes/again.raw")}, nil); err != nil {
		t.Fatal(err)
	}
	// A manifest name is a file name. An S3 chunk store with half a key
	// pair is refused, and the secret never shows in the error. (S3 chunk
	// stores themselves are exercised against a real S3 server in
	// cmd/stowage's S3 end-to-end test.)
	if _, err := r.ep.DeleteBackup(t.Context(), hostops.DeleteBackupRequest{Chunks: chunks, Manifest: "../manifests/b2.json"}); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("manifest with a slash: %v", err)
	}
	s3 := hostops.ChunkStore{URI: "s3://bucket/prefix?endpoint=http://127.0.0.1:1", Secret: map[string]string{"secret_key": "hunter2"}}
	if _, err := r.ep.DeleteBackup(t.Context(), hostops.DeleteBackupRequest{Chunks: s3, Manifest: "b2.json"}); !errors.Is(err, errdefs.ErrInvalid) || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("s3 chunk store: %v", err)
	}

	// Classed errors cross the wire.
	_, err = r.ep.FetchImage(t.Context(), hostops.FetchRequest{Source: url, Dest: ref("templates/bad.raw"), Format: drivers.FormatRaw, Checksum: "md5:" + strings.Repeat("0", 32)}, nil)
	if !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("bad checksum through the Remote: %v", err)
	}
	if _, err := os.Stat(filepath.Join(r.dir, "templates", "bad.raw")); !os.IsNotExist(err) {
		t.Fatal("a failed fetch left its destination")
	}
}

func TestSameTaskIDDoesTheWorkOnce(t *testing.T) {
	r := newRig(t)
	src, url := newSource(t, 1<<20, 0)
	dest := filepath.Join(r.dir, "templates", "t.raw")
	req := hostops.FetchRequest{Source: url, Dest: ref("templates/t.raw"), Format: drivers.FormatRaw}

	first, err := r.ep.FetchImage(drivers.WithTaskID(t.Context(), "job-1.fetch"), req, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The object goes away; the same step re-issued after a controller
	// restart (a new context with the same task id) gets the journalled
	// result and does not download again.
	os.Remove(dest)
	again, err := r.ep.FetchImage(drivers.WithTaskID(t.Context(), "job-1.fetch"), req, nil)
	if err != nil || again != first {
		t.Fatalf("re-issued step: %+v %v, want %+v", again, err, first)
	}
	if src.probes.Load() != 1 {
		t.Fatalf("source opened %d times, want once", src.probes.Load())
	}
	if _, err := os.Stat(dest); !os.IsNotExist(err) {
		t.Fatal("the re-issued step ran again")
	}
	// Another step id, or none, runs.
	if _, err := r.ep.FetchImage(drivers.WithTaskID(t.Context(), "job-2.fetch"), req, nil); err != nil {
		t.Fatal(err)
	}
	if src.probes.Load() != 2 {
		t.Fatalf("a new step id did not run (%d probes)", src.probes.Load())
	}
	os.Remove(dest)
	if _, err := r.ep.FetchImage(t.Context(), req, nil); err != nil {
		t.Fatal(err)
	}
	if src.probes.Load() != 3 {
		t.Fatal("a call without a task id did not run")
	}
	// Two different calls in one step do not share an id.
	ctx := drivers.WithTaskID(t.Context(), "job-3.step")
	if _, err := r.ep.InspectImage(ctx, req.Dest, drivers.FormatRaw); err != nil {
		t.Fatal(err)
	}
	if fi, err := r.ep.StatObject(ctx, req.Dest); err != nil || fi.Key != req.Dest.Key {
		t.Fatalf("second call of one step: %+v %v", fi, err)
	}
}

func TestReissuedTaskWaitsForTheRunningOne(t *testing.T) {
	r := newRig(t)
	src, url := newSource(t, 2<<20, 0)
	src.gate = make(chan struct{})
	req := hostops.FetchRequest{Source: url, Dest: ref("templates/t.raw"), Format: drivers.FormatRaw, Checksum: src.sha}

	// The controller starts the step and dies while the download runs.
	ctx, cancel := context.WithCancel(drivers.WithTaskID(t.Context(), "job-9.fetch"))
	firstErr := make(chan error, 1)
	go func() {
		_, err := r.ep.FetchImage(ctx, req, nil)
		firstErr <- err
	}()
	for src.gets.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-firstErr; !errors.Is(err, context.Canceled) {
		t.Fatalf("first call: %v", err)
	}
	// The restarted controller issues the same step; it waits for the download.
	done := make(chan error, 1)
	var p progressLog
	go func() {
		info, err := r.ep.FetchImage(drivers.WithTaskID(t.Context(), "job-9.fetch"), req, p.fn)
		if err == nil && info.SHA256 != src.sha {
			err = errors.New("wrong checksum " + info.SHA256)
		}
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	close(src.gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if src.probes.Load() != 1 {
		t.Fatalf("the download started %d times, want once", src.probes.Load())
	}
	if calls := p.get(); len(calls) == 0 {
		t.Error("no progress for the waiting call")
	}
}

func TestExportThroughRemote(t *testing.T) {
	r := newRig(t)
	src, url := newSource(t, 1<<20, 0)
	vol := ref("volumes/v.raw")
	if _, err := r.ep.FetchImage(t.Context(), hostops.FetchRequest{Source: url, Dest: vol, Format: drivers.FormatRaw}, nil); err != nil {
		t.Fatal(err)
	}
	uri, err := r.ep.Export(t.Context(), vol, 0)
	if err != nil || !strings.HasPrefix(string(uri), r.url+exports.Prefix) {
		t.Fatalf("export: %q %v", uri, err)
	}
	cp := ref("volumes/copy.raw")
	if _, err := r.ep.CopyImage(t.Context(), hostops.CopyRequest{Source: uri, SourceFormat: drivers.FormatRaw, Dest: cp}, nil); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(r.dir, cp.Key)); !bytes.Equal(got, src.data) {
		t.Fatal("copy from the export differs")
	}
	// A copy from an object of a store the agent serves: store://.
	local := ref("volumes/local.raw")
	if info, err := r.ep.CopyImage(t.Context(), hostops.CopyRequest{Source: vol.URI(), SourceFormat: drivers.FormatRaw, Dest: local}, nil); err != nil || info.Key != local.Key {
		t.Fatalf("copy from store://: %+v %v", info, err)
	}
	if got, _ := os.ReadFile(filepath.Join(r.dir, local.Key)); !bytes.Equal(got, src.data) {
		t.Fatal("copy from store:// differs")
	}
	if err := r.ep.Unexport(t.Context(), uri); err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(string(uri))
	if err != nil || resp.StatusCode != http.StatusNotFound {
		t.Fatalf("after unexport: %v %v", resp, err)
	}
	resp.Body.Close()
}

// CollectChunks through the Remote removes exactly the chunks no manifest
// names (a backup killed before its manifest leaves them), keeps both
// backups restorable, is journalled like every step, and refuses (classed
// across the wire) next to a manifest it cannot read.
func TestCollectChunksThroughRemote(t *testing.T) {
	r := newRig(t)
	ctx := t.Context()
	const mib = 1 << 20
	img := make([]byte, 3*mib)
	rand.Read(img)
	img2 := bytes.Clone(img)
	rand.Read(img2[2*mib:]) // the last chunk differs
	for name, data := range map[string][]byte{"t1.raw": img, "t2.raw": img2} {
		if err := os.WriteFile(filepath.Join(r.dir, "templates", name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	chunks := hostops.ChunkStore{URI: "store://s1/snapshots"}
	for _, b := range []struct{ src, manifest string }{{"t1.raw", "b1.json"}, {"t2.raw", "b2.json"}} {
		if _, err := r.ep.BackupImage(ctx, hostops.BackupRequest{Source: ref("templates/" + b.src), SourceFormat: drivers.FormatRaw,
			Chunks: chunks, Manifest: b.manifest, ChunkSize: mib}, nil); err != nil {
			t.Fatal(err)
		}
	}
	store, err := chunkstore.Open(filepath.Join(r.dir, "snapshots", "chunks"))
	if err != nil {
		t.Fatal(err)
	}
	putOrphans := func(n int) {
		for range n {
			data := make([]byte, mib)
			rand.Read(data)
			sum := sha256.Sum256(data)
			if err := store.Backend().PutChunk(ctx, hex.EncodeToString(sum[:]), data); err != nil {
				t.Fatal(err)
			}
		}
	}
	putOrphans(3)

	ci, err := r.ep.CollectChunks(drivers.WithTaskID(ctx, "gc-1.collect"), hostops.CollectChunksRequest{Chunks: chunks})
	if want := (hostops.CollectInfo{Manifests: 2, Chunks: 7, KeptChunks: 4, RemovedChunks: 3, RemovedBytes: 3 * mib}); err != nil || ci != want {
		t.Fatalf("CollectChunks = %+v, %v; want %+v", ci, err, want)
	}
	// The same step re-issued (after a controller restart: a new context
	// with the same task id) gets the journalled result, not a second run.
	putOrphans(1)
	if again, err := r.ep.CollectChunks(drivers.WithTaskID(ctx, "gc-1.collect"), hostops.CollectChunksRequest{Chunks: chunks}); err != nil || again != ci {
		t.Fatalf("re-issued CollectChunks = %+v, %v; want the journalled %+v", again, err, ci)
	}
	for i, b := range []struct {
		manifest string
		data     []byte
	}{{"b1.json", img}, {"b2.json", img2}} {
		out := ref("volumes/r" + string(rune('0'+i)) + ".raw")
		if _, err := r.ep.RestoreImage(ctx, hostops.RestoreRequest{Chunks: chunks, Manifest: b.manifest, Dest: out, Format: drivers.FormatRaw}, nil); err != nil {
			t.Fatalf("restore of %s after CollectChunks: %v", b.manifest, err)
		}
		if got, _ := os.ReadFile(filepath.Join(r.dir, out.Key)); !bytes.Equal(got, b.data) {
			t.Fatalf("%s restored after CollectChunks differs", b.manifest)
		}
	}

	// A manifest that cannot be read: refused, classed, nothing removed.
	if err := os.WriteFile(filepath.Join(r.dir, "snapshots", "manifests", "b2.json"), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := r.ep.CollectChunks(ctx, hostops.CollectChunksRequest{Chunks: chunks}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("CollectChunks next to a bad manifest: %v, want failed precondition", err)
	}
	n := 0
	if err := store.Backend().ListChunks(ctx, func(string) error { n++; return nil }); err != nil || n != 5 {
		t.Fatalf("after a refused collect the store holds %d chunks (%v), want 5 (4 live, 1 orphan)", n, err)
	}
	// A chunk store outside the stores the agent serves is refused.
	if _, err := r.ep.CollectChunks(ctx, hostops.CollectChunksRequest{Chunks: hostops.ChunkStore{URI: "store://s9/snapshots"}}); err == nil {
		t.Fatal("CollectChunks of a store the agent does not serve succeeded")
	}
}

// CollectChunks of an s3:// chunk store through the Remote, against a
// real S3 server (versitygw): the agent opens the store with the task's
// keys and removes exactly the orphans.
func TestCollectChunksOfS3ThroughRemote(t *testing.T) {
	r := newRig(t)
	ctx := t.Context()
	srv := s3test.Start(t)
	cfg := s3conn.Config{Endpoint: srv.Endpoint, Region: srv.Region, Bucket: srv.Bucket, Prefix: "z1/backups",
		AccessKey: srv.AccessKey, SecretKey: srv.SecretKey}
	chunks := hostops.ChunkStore{URI: drivers.URI(cfg.URI()), Secret: cfg.Secret()}
	const mib = 1 << 20
	img := make([]byte, 2*mib)
	rand.Read(img)
	if err := os.WriteFile(filepath.Join(r.dir, "templates", "t.raw"), img, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := r.ep.BackupImage(ctx, hostops.BackupRequest{Source: ref("templates/t.raw"), SourceFormat: drivers.FormatRaw,
		Chunks: chunks, Manifest: "b1", ChunkSize: mib}, nil); err != nil {
		t.Fatal(err)
	}
	store, err := chunkstore.OpenS3(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		data := make([]byte, mib)
		rand.Read(data)
		sum := sha256.Sum256(data)
		if err := store.Backend().PutChunk(ctx, hex.EncodeToString(sum[:]), data); err != nil {
			t.Fatal(err)
		}
	}
	ci, err := r.ep.CollectChunks(ctx, hostops.CollectChunksRequest{Chunks: chunks})
	if want := (hostops.CollectInfo{Manifests: 1, Chunks: 4, KeptChunks: 2, RemovedChunks: 2, RemovedBytes: 2 * mib}); err != nil || ci != want {
		t.Fatalf("CollectChunks of an s3 chunk store = %+v, %v; want %+v", ci, err, want)
	}
	if _, err := r.ep.RestoreImage(ctx, hostops.RestoreRequest{Chunks: chunks, Manifest: "b1", Dest: ref("volumes/r.raw"), Format: drivers.FormatRaw}, nil); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(r.dir, "volumes", "r.raw")); !bytes.Equal(got, img) {
		t.Fatal("restored after CollectChunks differs")
	}
}

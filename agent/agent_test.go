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
	"github.com/stowage/stowage/agent/proxy"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// rig is an agent serving on loopback and a proxy Endpoint talking to it.
type rig struct {
	ep  *proxy.Endpoint
	url string
}

func newRig(t *testing.T, opts ...agent.Option) rig {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skipf("qemu-img is not installed: %v", err)
	}
	x := exports.New()
	local := hostfs.New("h1", hostfs.WithExporter(x))
	a, err := agent.New(agent.Config{ControllerURL: "http://127.0.0.1:1", HostID: "h1", StateDir: t.TempDir()},
		local, slog.New(slog.NewTextHandler(io.Discard, nil)), append(opts, agent.WithExports(x))...)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(srv.Close)
	t.Cleanup(a.Close)
	x.SetBaseURL(srv.URL)
	return rig{ep: proxy.New("h1", srv.URL, srv.Client(), proxy.WithPollInterval(20*time.Millisecond)), url: srv.URL}
}

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

func TestFetchAndBackupThroughProxyWithProgress(t *testing.T) {
	r := newRig(t)
	const size = 8 << 20
	src, url := newSource(t, size, 160*time.Millisecond) // about 1.3 s per 2 MiB range, several ranges in parallel
	dir := t.TempDir()
	dest := filepath.Join(dir, "t.raw")

	var p progressLog
	info, err := r.ep.FetchImage(t.Context(), drivers.FetchRequest{Source: url, Dest: dest, Format: drivers.FormatRaw, Checksum: "sha256:" + src.sha}, p.fn)
	if err != nil {
		t.Fatal(err)
	}
	if info.SHA256 != src.sha || info.VirtualSize != size || info.Format != drivers.FormatRaw || info.Path != dest {
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

	// Backup of the fetched image, with progress.
	var bp progressLog
	chunks := filepath.Join(dir, "chunks")
	os.Mkdir(chunks, 0o755) // outside a store, the agent makes no directories
	b, err := r.ep.BackupImage(t.Context(), drivers.BackupRequest{Source: dest, SourceFormat: drivers.FormatRaw, ChunkDir: chunks, Manifest: filepath.Join(dir, "b1.json")}, bp.fn)
	if err != nil {
		t.Fatal(err)
	}
	if b.Size != size || b.Chunks != 2 || b.NewChunks != 2 || b.NewBytes != size || b.ReadBytes != size {
		t.Fatalf("backup: %+v", b)
	}
	if calls := bp.get(); len(calls) == 0 || calls[len(calls)-1] != [2]int64{size, size} {
		t.Fatalf("backup progress calls %v", calls)
	}
	b2, err := r.ep.BackupImage(t.Context(), drivers.BackupRequest{Source: dest, SourceFormat: drivers.FormatRaw, ChunkDir: chunks, Manifest: filepath.Join(dir, "b2.json")}, nil)
	if err != nil || b2.NewChunks != 0 || b2.ReusedBytes != size {
		t.Fatalf("second backup: %+v %v", b2, err)
	}
	// Restore through the proxy, byte-equal.
	out := filepath.Join(dir, "restored.raw")
	if _, err := r.ep.RestoreImage(t.Context(), drivers.RestoreRequest{Manifest: filepath.Join(dir, "b2.json"), ChunkDir: chunks, Dest: out}, nil); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, src.data) {
		t.Fatal("restored image differs")
	}

	// Classed errors cross the wire.
	_, err = r.ep.FetchImage(t.Context(), drivers.FetchRequest{Source: url, Dest: filepath.Join(dir, "bad.raw"), Format: drivers.FormatRaw, Checksum: "md5:" + strings.Repeat("0", 32)}, nil)
	if !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("bad checksum through the proxy: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "bad.raw")); !os.IsNotExist(err) {
		t.Fatal("a failed fetch left its destination")
	}
}

func TestSameTaskIDDoesTheWorkOnce(t *testing.T) {
	r := newRig(t)
	src, url := newSource(t, 1<<20, 0)
	dir := t.TempDir()
	dest := filepath.Join(dir, "t.raw")
	req := drivers.FetchRequest{Source: url, Dest: dest, Format: drivers.FormatRaw}

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
	if _, err := r.ep.InspectImage(ctx, dest, drivers.FormatRaw); err != nil {
		t.Fatal(err)
	}
	if _, err := r.ep.StatPath(ctx, dest); err != nil {
		t.Fatalf("second call of one step: %v", err)
	}
}

func TestReissuedTaskWaitsForTheRunningOne(t *testing.T) {
	r := newRig(t)
	src, url := newSource(t, 2<<20, 0)
	src.gate = make(chan struct{})
	dest := filepath.Join(t.TempDir(), "t.raw")
	req := drivers.FetchRequest{Source: url, Dest: dest, Format: drivers.FormatRaw, Checksum: src.sha}

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

func TestExportThroughProxy(t *testing.T) {
	r := newRig(t)
	src, url := newSource(t, 1<<20, 0)
	dir := t.TempDir()
	vol := filepath.Join(dir, "v.raw")
	if _, err := r.ep.FetchImage(t.Context(), drivers.FetchRequest{Source: url, Dest: vol, Format: drivers.FormatRaw}, nil); err != nil {
		t.Fatal(err)
	}
	uri, err := r.ep.Export(t.Context(), vol)
	if err != nil || !strings.HasPrefix(string(uri), r.url+exports.Prefix) {
		t.Fatalf("export: %q %v", uri, err)
	}
	copyPath := filepath.Join(dir, "copy.raw")
	if _, err := r.ep.CopyImage(t.Context(), drivers.CopyRequest{Source: string(uri), SourceFormat: drivers.FormatRaw, Dest: copyPath}, nil); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(copyPath); !bytes.Equal(got, src.data) {
		t.Fatal("copy from the export differs")
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

package main

// A template server that vanishes in the middle of a download: back within
// the retry window, the download resumes by Range and the bytes are whole;
// gone for good, the job fails as unavailable and leaves no file.

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// vanishingServer serves one file slowly on a fixed loopback address and
// can be stopped (listener and every connection closed) and started again
// on the same address. It logs every request it answers.
type vanishingServer struct {
	t     *testing.T
	addr  string
	path  string
	sent  atomic.Int64 // body bytes written
	mu    sync.Mutex
	srv   *http.Server
	log   []string
	epoch int // how many times the server was started
}

func newVanishingServer(t *testing.T, path string) *vanishingServer {
	v := &vanishingServer{t: t, path: path}
	v.start("127.0.0.1:0")
	t.Cleanup(v.stop)
	return v
}

func (v *vanishingServer) url() string { return "http://" + v.addr + "/" + filepath.Base(v.path) }

// slowWriter paces a response: ~4 MiB/s per connection.
type slowWriter struct {
	http.ResponseWriter
	v *vanishingServer
}

func (w slowWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.v.sent.Add(int64(n))
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
	time.Sleep(time.Duration(len(p)) * time.Second / (4 << 20))
	return n, err
}

func (v *vanishingServer) start(addr string) {
	v.t.Helper()
	var ln net.Listener
	var err error
	for i := 0; i < 50; i++ { // the old sockets may linger a moment
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		v.t.Fatalf("listen %s: %v", addr, err)
	}
	v.mu.Lock()
	v.addr = ln.Addr().String()
	v.epoch++
	epoch := v.epoch
	v.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		v.mu.Lock()
		v.log = append(v.log, fmt.Sprintf("epoch=%d %s %s range=%q", epoch, r.Method, r.URL.Path, r.Header.Get("Range")))
		v.mu.Unlock()
		f, err := os.Open(v.path)
		if err != nil {
			http.NotFound(w, r)
			return
		}
		defer f.Close()
		st, _ := f.Stat()
		http.ServeContent(slowWriter{w, v}, r, "", st.ModTime(), f)
	})}
	srv := v.srv
	v.mu.Unlock()
	go srv.Serve(ln)
}

// stop closes the listener and every open connection.
func (v *vanishingServer) stop() {
	v.mu.Lock()
	srv := v.srv
	v.srv = nil
	v.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// requests returns the log lines of epoch.
func (v *vanishingServer) requests(epoch int) []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	var out []string
	for _, l := range v.log {
		if strings.HasPrefix(l, fmt.Sprintf("epoch=%d ", epoch)) {
			out = append(out, l)
		}
	}
	return out
}

// vanishSetup starts a controller and one agent with an image store, and a
// vanishing server for a 24 MiB random raw template.
func vanishSetup(t *testing.T, agentArgs ...string) (a *clientAPI, v *vanishingServer, raw, imgDir string) {
	root := t.TempDir()
	web := filepath.Join(root, "web")
	if err := os.MkdirAll(web, 0o755); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 24<<20)
	rand.Read(buf)
	raw = filepath.Join(web, "t.raw")
	if err := os.WriteFile(raw, buf, 0o644); err != nil {
		t.Fatal(err)
	}
	v = newVanishingServer(t, raw)
	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "controller"))
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), agentArgs...)
	waitFor(t, "h1 Up", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	a = newAPI(server)
	imgDir = filepath.Join(root, "img")
	addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, imgDir, &stowagev1.Scope{Zone: "z1"})
	return a, v, raw, imgDir
}

// register starts a registration of the vanishing server's file.
func registerFrom(t *testing.T, a *clientAPI, name string, v *vanishingServer, raw string) (*stowagev1.Template, *stowagev1.Job) {
	t.Helper()
	resp, err := a.images.RegisterTemplate(context.Background(), connect.NewRequest(&stowagev1.RegisterTemplateRequest{
		Name: name, Url: v.url(), Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW, Checksum: "sha256:" + sha256File(t, raw)}))
	if err != nil {
		t.Fatalf("register %s: %v", name, err)
	}
	return resp.Msg.GetTemplate(), resp.Msg.GetJob()
}

// waitSent waits until the server has sent n body bytes.
func (v *vanishingServer) waitSent(t *testing.T, n int64) {
	waitFor(t, fmt.Sprintf("%d bytes served", n), 30*time.Second, func() bool { return v.sent.Load() >= n })
}

func TestVanishingSourceComesBack(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	a, v, raw, imgDir := vanishSetup(t)
	tmpl, job := registerFrom(t, a, "comes-back", v, raw)
	v.waitSent(t, 6<<20)
	v.stop()
	down := time.Now()
	sentAtStop := v.sent.Load()
	time.Sleep(time.Second)
	v.start(v.addr)
	t.Logf("server stopped after %d bytes, restarted on %s after %v", sentAtStop, v.addr, time.Since(down).Round(time.Millisecond))
	j := mustSucceed(t, a, job)
	t.Logf("job %s succeeded %v after the restart", j.GetId(), time.Since(down).Round(time.Millisecond))

	g, err := a.images.GetTemplate(context.Background(), connect.NewRequest(&stowagev1.GetTemplateRequest{Id: tmpl.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	got := filepath.Join(imgDir, g.Msg.GetStores()[0].GetInstallPath())
	if sha256File(t, got) != sha256File(t, raw) {
		t.Fatal("the downloaded template differs from the server's file")
	}
	after := v.requests(2)
	ranged := 0
	for _, l := range after {
		if !strings.Contains(l, `range=""`) && !strings.Contains(l, `range="bytes=0-0"`) {
			ranged++
		}
	}
	t.Logf("requests after the restart: %d (%d Range reads), e.g. %v; bytes served in all %d (file %d)", len(after), ranged, after[:min(3, len(after))], v.sent.Load(), 24<<20)
	if ranged == 0 {
		t.Fatalf("no Range request after the restart: %v", after)
	}
	if v.sent.Load() > 2*(24<<20) {
		t.Fatalf("served %d bytes for a %d-byte file: the download started over instead of resuming", v.sent.Load(), 24<<20)
	}
}

func TestVanishingSourceGone(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	a, v, raw, imgDir := vanishSetup(t, "--fetch-retry-window", "5s")
	_, job := registerFrom(t, a, "gone", v, raw)
	v.waitSent(t, 6<<20)
	v.stop()
	down := time.Now()
	j := waitJob(t, a, job)
	took := time.Since(down)
	t.Logf("job %s ended %s %v after the server went away: %s", j.GetId(), j.GetState(), took.Round(time.Millisecond), j.GetError())
	if j.GetState() != stowagev1.JobState_JOB_STATE_FAILED {
		t.Fatalf("job ended %s, want FAILED", j.GetState())
	}
	msg := strings.ToLower(j.GetError())
	if !strings.Contains(msg, "unavailable") || !strings.Contains(msg, "connection refused") {
		t.Errorf("job error %q does not say the source is unavailable (connection refused)", j.GetError())
	}
	if took < 5*time.Second || took > 30*time.Second {
		t.Errorf("the job failed %v after the server went away; the agent's retry window is 5s", took)
	}
	left := treeOf(t, imgDir)
	for _, p := range left {
		if strings.HasPrefix(p, "templates/") || strings.HasPrefix(p, "tmp/") {
			t.Errorf("left on the image store: %s (all: %v)", p, left)
		}
	}
}

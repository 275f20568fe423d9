package main

// `stowage job cancel` reaches the host (issue 14): a volume create whose
// template copy streams slowly is cancelled through the API while the
// agent copies; the agent's copy stops, its staging file goes, nothing is
// published, the volume is Failed and the template's copy on the primary
// store is released (the template can be deleted).

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/drivers/s3/s3test"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// throttle is a reverse proxy that, once slow is set, serves the bodies of
// GETs of templates at rate bytes per second in all (a shared budget, so
// parallel ranged reads do not add up), and reports when the last of
// those bytes went out and how many such bodies are open.
type throttle struct {
	slow   atomic.Bool
	rate   int64
	open   atomic.Int32
	bytes  atomic.Int64
	lastAt atomic.Int64 // unix nanoseconds of the last byte served slowly

	mu   sync.Mutex
	next time.Time // when the shared budget allows the next chunk
}

func (th *throttle) proxy(t *testing.T, target string) *httptest.Server {
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u) // keeps the Host header: S3 signatures name the proxy
	rp.FlushInterval = -1
	rp.ModifyResponse = func(resp *http.Response) error {
		r := resp.Request
		if th.slow.Load() && r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/templates/") {
			th.open.Add(1)
			resp.Body = &slowBody{th: th, rc: resp.Body}
		}
		return nil
	}
	srv := httptest.NewServer(rp)
	t.Cleanup(srv.Close)
	return srv
}

// wait takes n bytes from the shared budget, sleeping until they are due.
func (th *throttle) wait(n int) {
	th.mu.Lock()
	now := time.Now()
	if th.next.Before(now) {
		th.next = now
	}
	at := th.next
	th.next = th.next.Add(time.Duration(int64(n) * int64(time.Second) / th.rate))
	th.mu.Unlock()
	time.Sleep(time.Until(at))
}

type slowBody struct {
	th     *throttle
	rc     io.ReadCloser
	closed atomic.Bool
}

func (b *slowBody) Read(p []byte) (int, error) {
	if len(p) > 64<<10 {
		p = p[:64<<10]
	}
	b.th.wait(len(p))
	n, err := b.rc.Read(p)
	if n > 0 {
		b.th.bytes.Add(int64(n))
		b.th.lastAt.Store(time.Now().UnixNano())
	}
	return n, err
}

func (b *slowBody) Close() error {
	if b.closed.CompareAndSwap(false, true) {
		b.th.open.Add(-1)
	}
	return b.rc.Close()
}

// storeFiles lists the regular files under a store directory, its marker
// aside (relative paths).
func storeFiles(t *testing.T, dir string) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if strings.HasPrefix(rel, ".stowage-store") {
			return nil
		}
		if !d.IsDir() {
			files = append(files, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

func TestCancelReachesTheHost(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	root := t.TempDir()
	ctx := context.Background()
	r := startSlowCopy(t, root, func(addr, dir string) { controllerProc(t, addr, dir) })
	a, th, pz, pzDir, tmpl, vol, job, seen, data := r.a, r.th, r.pz, r.pzDir, r.tmpl, r.vol, r.job, r.seen, r.data
	if files := storeFiles(t, pzDir); len(files) == 0 {
		t.Fatalf("no staging file on pz while the agent copies (job %v)", seen)
	} else {
		t.Logf("on pz while copying: %q", files)
	}

	cancelAt := time.Now()
	if _, err := a.jobs.CancelJob(ctx, connect.NewRequest(&stowagev1.CancelJobRequest{Id: job.GetId()})); err != nil {
		t.Fatalf("cancel: %v", err)
	}
	end := waitJob(t, a, job)
	jobEnded := time.Since(cancelAt)
	if end.GetState() != stowagev1.JobState_JOB_STATE_CANCELLED {
		t.Fatalf("job after cancel: %s %q", end.GetState(), end.GetError())
	}
	if jobEnded > 5*time.Second {
		t.Errorf("the job took %s to end after the cancel", jobEnded)
	}
	// The agent's copy stopped: no template body open at the proxy, no
	// byte served since shortly after the cancel.
	waitFor(t, "the agent's download to close", 3*time.Second, func() bool { return th.open.Load() == 0 })
	stopped := time.Unix(0, th.lastAt.Load()).Sub(cancelAt)
	if stopped > time.Second {
		t.Errorf("bytes kept flowing %s after the cancel", stopped)
	}
	copied := th.bytes.Load()
	t.Logf("cancel: job Cancelled after %s; last byte of the copy %s after the cancel; %d of %d MiB copied", jobEnded.Round(time.Millisecond), stopped.Round(time.Millisecond), copied>>20, len(data)>>20)

	// Nothing published, nothing staged, for 5 s after the cancel.
	for time.Since(cancelAt) < 5*time.Second {
		if files := storeFiles(t, pzDir); len(files) != 0 {
			t.Fatalf("%s after the cancel pz holds %q, want nothing", time.Since(cancelAt).Round(time.Millisecond), files)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n := th.bytes.Load(); n != copied {
		t.Errorf("%d more bytes were read after the job ended", n-copied)
	}

	// The volume is Failed with the reason; the template's copy on pz is
	// no longer being made and no one holds it.
	gv, err := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: vol.GetId()}))
	if err != nil || gv.Msg.GetVolume().GetState() != stowagev1.VolumeState_VOLUME_STATE_FAILED || gv.Msg.GetVolume().GetError() == "" {
		t.Fatalf("volume after cancel: %v %v", gv, err)
	}
	gt, err := a.images.GetTemplate(ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: tmpl.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range gt.Msg.GetStores() {
		if r.GetStoreId() != pz.GetId() {
			continue
		}
		if r.GetState() != stowagev1.ObjectState_OBJECT_STATE_FAILED || r.GetRefCount() != 0 || r.GetOwnerJobId() != "" {
			t.Fatalf("the template's copy on pz after cancel: %v", r)
		}
	}
	// So the template can go: its copies, then its record.
	th.slow.Store(false)
	dt, err := a.images.DeleteTemplate(ctx, connect.NewRequest(&stowagev1.DeleteTemplateRequest{Id: tmpl.GetId()}))
	if err != nil {
		t.Fatalf("delete the template: %v", err)
	}
	mustSucceed(t, a, dt.Msg.GetJob())
	if _, err := a.images.GetTemplate(ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: tmpl.GetId()})); code(err) != connect.CodeNotFound {
		t.Fatalf("template after delete: %v", err)
	}
	if files := storeFiles(t, pzDir); len(files) != 0 {
		t.Fatalf("pz after the template's delete holds %q", files)
	}
}

// slowCopy is a volume create caught copying: a controller (started by
// the caller's function) and agent h1; a 64 MiB raw template of data (no
// holes to skip), registered into an S3 image store behind a throttling
// proxy; a primary store pz; and a full volume create from the template
// whose copy now crawls at 4 MiB/s (16 s), with 4 MiB through and the
// agent's download open.
type slowCopy struct {
	a      *clientAPI
	server string
	th     *throttle
	data   []byte
	pz     *stowagev1.DataStore
	pzDir  string
	tmpl   *stowagev1.Template
	vol    *stowagev1.Volume
	job    *stowagev1.Job
	seen   *stowagev1.Job // the job as last seen while waiting for the copy
}

func startSlowCopy(t *testing.T, root string, controller func(addr, dataDir string)) slowCopy {
	t.Helper()
	ctx := context.Background()
	web := filepath.Join(root, "web")
	if err := os.MkdirAll(web, 0o755); err != nil {
		t.Fatal(err)
	}
	r := slowCopy{data: bytes.Repeat([]byte("stowage!"), 8<<20), th: &throttle{rate: 4 << 20}}
	if err := os.WriteFile(filepath.Join(web, "big.raw"), r.data, 0o644); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(r.data)
	web0 := httptest.NewServer(http.FileServer(http.Dir(web)))
	t.Cleanup(web0.Close)

	// The copy to the primary store streams from S3 (a presigned URL,
	// read with ranges) through the proxy.
	s3 := s3test.Start(t)
	s3p := r.th.proxy(t, s3.Endpoint)
	cred := filepath.Join(root, "s3.cred")
	if err := os.WriteFile(cred, fmt.Appendf(nil, "access_key=%s\nsecret_key=%s\n", s3.AccessKey, s3.SecretKey), 0o600); err != nil {
		t.Fatal(err)
	}

	addr := freePort(t)
	r.server = "https://" + addr
	controller(addr, filepath.Join(root, "controller"))
	agentProc(t, r.server, "h1", "z1", "c1", filepath.Join(root, "a1"))
	waitFor(t, "h1 Up", 20*time.Second, func() bool { return hostState(t, r.server, "h1") == "HOST_STATE_UP" })
	r.a = newAPI(r.server)
	if _, err := r.a.stores.AddStore(ctx, connect.NewRequest(&stowagev1.AddStoreRequest{
		Name: "img", Role: stowagev1.StoreRole_STORE_ROLE_IMAGE, Provider: "s3", Url: "s3://" + s3.Bucket + "/img",
		Scope:   &stowagev1.Scope{Zone: "z1"},
		Details: map[string]string{"endpoint": s3p.URL, "region": s3.Region, "credentials_file": cred}})); err != nil {
		t.Fatalf("add the s3 image store: %v", err)
	}
	r.pz = addStore(t, r.a, "pz", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "pz"), &stowagev1.Scope{Zone: "z1"})
	r.pzDir = r.pz.GetDetails()["path"]
	reg, err := r.a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{
		Name: "big", Url: web0.URL + "/big.raw", Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW, Checksum: "sha256:" + hex.EncodeToString(sum[:])}))
	if err != nil {
		t.Fatalf("register: %v", err)
	}
	mustSucceed(t, r.a, reg.Msg.GetJob())
	r.tmpl = reg.Msg.GetTemplate()

	// From here the template's bytes come at 4 MiB/s: the copy would take 16 s.
	r.th.slow.Store(true)
	cv, err := r.a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{
		Name: "doomed", TemplateId: r.tmpl.GetId(), StoreId: r.pz.GetId(), Strategy: "full"}))
	if err != nil {
		t.Fatalf("create volume: %v", err)
	}
	r.vol, r.job = cv.Msg.GetVolume(), cv.Msg.GetJob()
	waitFor(t, "the agent copying the template (4 MiB through the proxy)", 30*time.Second, func() bool {
		g, err := r.a.jobs.GetJob(ctx, connect.NewRequest(&stowagev1.GetJobRequest{Id: r.job.GetId()}))
		if err == nil {
			r.seen = g.Msg.GetJob()
		}
		return r.th.bytes.Load() >= 4<<20 && r.th.open.Load() > 0
	})
	return r
}

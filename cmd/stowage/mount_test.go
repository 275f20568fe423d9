package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/agent/cachemount"
	"github.com/stowage/stowage/internal/envtest"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// needFUSE skips a test that mounts unless it runs as root with /dev/fuse.
func needFUSE(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts processes")
	}
	if os.Geteuid() != 0 {
		envtest.Skip(t, "FUSE mounts need root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		envtest.Skip(t, "no /dev/fuse")
	}
}

// cacheProc is a `stowage cache serve` process of a test.
type cacheProc struct {
	*proc
	mount, socket string
	args          []string
}

// startCache runs `stowage cache serve` and waits until its socket answers.
// Cleanup stops it with SIGTERM (it unmounts) and detaches a mount a kill
// left behind.
func startCache(t *testing.T, name, dir string, extra ...string) *cacheProc {
	t.Helper()
	c := &cacheProc{mount: filepath.Join(dir, "mnt"), socket: filepath.Join(dir, "cache.sock")}
	c.args = append([]string{"cache", "serve", "--mount", c.mount, "--cache-dir", filepath.Join(dir, "cache"),
		"--socket", c.socket, "--log-level", "info"}, extra...)
	c.start(t, name)
	return c
}

func (c *cacheProc) start(t *testing.T, name string) {
	t.Helper()
	c.proc = startProc(t, name, c.args...)
	p := c.proc
	t.Cleanup(func() {
		p.kill(syscall.SIGTERM)
		_ = unix.Unmount(c.mount, unix.MNT_DETACH)
	})
	cl := cachemount.NewClient(c.socket)
	waitFor(t, name+" socket", 20*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := cl.GetCache(ctx)
		return err == nil
	})
}

func hostCaps(t *testing.T, server, id string) *stowagev1.HostCapabilities {
	t.Helper()
	c := stowagev1connect.NewHostServiceClient(testClient(t, server), server)
	resp, err := c.GetHost(context.Background(), connect.NewRequest(&stowagev1.GetHostRequest{Id: id}))
	if err != nil {
		t.Fatalf("get host %s: %v", id, err)
	}
	return resp.Msg.GetHost().GetCapabilities()
}

func cachedTemplate(caps *stowagev1.HostCapabilities, id string) *stowagev1.CachedTemplate {
	for _, ct := range caps.GetTemplateCache().GetTemplates() {
		if ct.GetId() == id {
			return ct
		}
	}
	return nil
}

func mustEqualFiles(t *testing.T, a, b string) {
	t.Helper()
	if out, err := exec.Command("cmp", a, b).CombinedOutput(); err != nil {
		t.Fatalf("cmp %s %s: %v: %s", a, b, err, out)
	}
}

func listMount(dir string) []string {
	ents, _ := os.ReadDir(dir)
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// TestTemplateMountEndToEnd runs a controller, two agents and each host's
// template mount (`stowage cache serve`) as processes. Host h1 holds the
// image store; h2 reads templates through h1's exports: HTTP (the whole
// story) and NBD (the mount's contents).
func TestTemplateMountEndToEnd(t *testing.T) {
	needFUSE(t)
	t.Run("http", func(t *testing.T) { testTemplateMount(t, "http", true) })
	t.Run("nbd", func(t *testing.T) { testTemplateMount(t, "nbd", false) })
}

func testTemplateMount(t *testing.T, transport string, full bool) {
	needTools(t, "qemu-img", "qemu-io", "cmp")
	root := t.TempDir()
	ctx := context.Background()
	web, qcow := patternedQcow2(t, root, "write -P 0x33 10M 3M")
	rawT := filepath.Join(web, "base.raw")
	buf := make([]byte, 12<<20+4096) // not a multiple of the chunk size
	rand.Read(buf)
	if err := os.WriteFile(rawT, buf, 0o644); err != nil {
		t.Fatal(err)
	}
	origin := httptest.NewServer(http.StripPrefix("/t/", http.FileServer(http.Dir(web))))
	defer origin.Close()

	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "controller"), "--template-mount-transport", transport)
	c1 := startCache(t, "cache h1", filepath.Join(root, "c1"), "--pki-dir", filepath.Join(root, "a1", "pki"))
	c2 := startCache(t, "cache h2", filepath.Join(root, "c2"), "--pki-dir", filepath.Join(root, "a2", "pki"))
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), "--image-cache-socket", c1.socket)
	agentProc(t, server, "h2", "z1", "c1", filepath.Join(root, "a2"), "--image-cache-socket", c2.socket)
	waitFor(t, "both hosts Up", 20*time.Second, func() bool {
		return hostState(t, server, "h1") == "HOST_STATE_UP" && hostState(t, server, "h2") == "HOST_STATE_UP"
	})
	a := newAPI(server)
	img := addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h1"})
	p2 := addStore(t, a, "p2", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p2"), &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h2"})
	path := func(st *stowagev1.DataStore, rel string) string { return filepath.Join(st.GetDetails()["path"], rel) }

	register := func(name, file string, f stowagev1.ImageFormat) (*stowagev1.Template, string) {
		t.Helper()
		resp, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{
			Name: name, Url: origin.URL + "/t/" + filepath.Base(file), Format: f, Checksum: "sha256:" + sha256File(t, file)}))
		if err != nil {
			t.Fatalf("register %s: %v", name, err)
		}
		mustSucceed(t, a, resp.Msg.GetJob())
		g, err := a.images.GetTemplate(ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: resp.Msg.GetTemplate().GetId()}))
		if err != nil {
			t.Fatal(err)
		}
		return resp.Msg.GetTemplate(), path(img, g.Msg.GetStores()[0].GetInstallPath())
	}
	tq, tqFile := register("base-qcow2", qcow, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)

	t.Logf("step 1")
	// 1. Both mounts show the Ready template, named by id, at the size of
	// its file; h2 reads it from h1's export, h1 from its own image store.
	m1q, m2q := filepath.Join(c1.mount, tq.GetId()), filepath.Join(c2.mount, tq.GetId())
	st, _ := os.Stat(tqFile)
	waitFor(t, "template in both mounts", 20*time.Second, func() bool {
		a, err1 := os.Stat(m1q)
		b, err2 := os.Stat(m2q)
		return err1 == nil && err2 == nil && a.Size() == st.Size() && b.Size() == st.Size()
	})
	if fi, _ := os.Stat(m2q); fi.Mode().Perm() != 0o440 || time.Since(fi.ModTime()) > time.Hour {
		t.Fatalf("mounted template: mode %v, mtime %v (want 0440: read-only, never world-readable; the time it was added)", fi.Mode(), fi.ModTime())
	}
	if err := os.WriteFile(m2q, []byte("x"), 0o644); err == nil {
		t.Fatal("writing into the template mount succeeded")
	}
	mustEqualFiles(t, m2q, tqFile)
	mustEqualFiles(t, m1q, tqFile)
	info := run(t, "qemu-img", "info", "-f", "qcow2", "--output", "json", m2q)
	if !strings.Contains(info, `"virtual-size": 67108864`) {
		t.Fatalf("qemu-img info of the mounted template: %s", info)
	}
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", m2q, qcow)
	waitFor(t, "h2 reports the template", 10*time.Second, func() bool {
		ct := cachedTemplate(hostCaps(t, server, "h2"), tq.GetId())
		return ct != nil && ct.GetFormat() == stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2 && ct.GetSize() == st.Size()
	})

	// h2 reads through h1's export, h1 from its own image store.
	scheme := map[string]string{"http": "https", "nbd": "nbd"}[transport]
	if !strings.Contains(c2.log.String(), "source="+scheme+"://") || !strings.Contains(c1.log.String(), "source="+filepath.Join(root, "img")) {
		t.Fatalf("template sources: h2 should read over %s, h1 the local file; logs:\n%s\n%s", transport, c2.log.String(), c1.log.String())
	}
	if !full {
		return
	}

	t.Logf("step 2")
	// 2. A lazy volume on h2's store: a qcow2 overlay on the mounted file,
	// nothing copied to the primary store; it reads the template's bytes
	// and takes writes.
	resp, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{
		Name: "lazy1", TemplateId: tq.GetId(), StoreId: p2.GetId(), Strategy: "lazy"}))
	if err != nil {
		t.Fatalf("create lazy volume: %v", err)
	}
	j := mustSucceed(t, a, resp.Msg.GetJob())
	if j.GetPlan().GetStrategy() != "lazy" || slices.ContainsFunc(j.GetPlan().GetSteps(), func(s *stowagev1.PlanStep) bool { return s.GetName() == "cache-template" }) {
		t.Fatalf("lazy plan: %v", j.GetPlan())
	}
	vr, _ := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: resp.Msg.GetVolume().GetId()}))
	lazy := vr.Msg.GetVolume()
	volFile := path(p2, lazy.GetInstallPath())
	vinfo := run(t, "qemu-img", "info", "-U", "-f", "qcow2", "--output", "json", volFile)
	if !strings.Contains(vinfo, `"backing-filename": "`+m2q+`"`) || !strings.Contains(vinfo, `"backing-filename-format": "qcow2"`) {
		t.Fatalf("lazy volume's backing file: %s", vinfo)
	}
	if ents, _ := os.ReadDir(path(p2, "templates")); len(ents) != 0 {
		t.Fatalf("a lazy volume copied the template to the primary store: %v", ents)
	}
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", volFile, qcow)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xc3 10M 64k", volFile)
	if out := run(t, "qemu-io", "-f", "qcow2", "-c", "read -P 0xc3 10M 64k", "-c", "read -P 0x33 11M 1M", "-c", "read -P 0x77 63M 1M", volFile); strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("lazy volume reads: %s", out)
	}
	// Its template is pinned on h2, and cannot be deleted while it is used.
	waitFor(t, "template pinned on h2", 10*time.Second, func() bool {
		ct := cachedTemplate(hostCaps(t, server, "h2"), tq.GetId())
		return ct != nil && ct.GetPinned()
	})
	if out, _, rc := cli(t, server, "host", "get", "h2"); rc != 0 || !strings.Contains(out, "Template mount") || !strings.Contains(out, c2.mount) || !strings.Contains(out, tq.GetId()) ||
		!regexp.MustCompile(`Template reads:\s+\S+ \S+ hit, \S+ \S+ miss \(`).MatchString(out) {
		t.Fatalf("stowage host get h2 does not show the mount, its reads and its template (exit %d):\n%s", rc, out)
	}
	if _, err := a.images.DeleteTemplate(ctx, connect.NewRequest(&stowagev1.DeleteTemplateRequest{Id: tq.GetId(), Force: true})); code(err) != connect.CodeFailedPrecondition || !strings.Contains(err.Error(), "lazy1") {
		t.Fatalf("delete of a template backing a lazy volume: %v", err)
	}
	// A snapshot of the lazy volume keeps the chain ending in the mount.
	sresp, err := a.snapshots.TakeSnapshot(ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: lazy.GetId(), Name: "s1"}))
	if err != nil {
		t.Fatalf("snapshot of a lazy volume: %v", err)
	}
	mustSucceed(t, a, sresp.Msg.GetJob())
	run(t, "qemu-io", "-f", "qcow2", "-c", "read -P 0xc3 10M 64k", volFile)

	// Migrating a lazy volume flattens it: a standalone volume with the
	// template's bytes, no longer reading the mount.
	pz := addStore(t, a, "pz", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "pz"), &stowagev1.Scope{Zone: "z1"})
	cr, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{
		Name: "lazy3", TemplateId: tq.GetId(), StoreId: p2.GetId(), Strategy: "lazy"}))
	if err != nil {
		t.Fatalf("create lazy3: %v", err)
	}
	mustSucceed(t, a, cr.Msg.GetJob())
	mr, err := a.volumes.MigrateVolume(ctx, connect.NewRequest(&stowagev1.MigrateVolumeRequest{Id: cr.Msg.GetVolume().GetId(), StoreId: pz.GetId()}))
	if err != nil {
		t.Fatalf("migrate lazy3: %v", err)
	}
	mustSucceed(t, a, mr.Msg.GetJob())
	gv, _ := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: cr.Msg.GetVolume().GetId()}))
	moved := gv.Msg.GetVolume()
	movedFile := path(pz, moved.GetInstallPath())
	if moved.GetInstallMethod() != "full" || moved.GetStoreId() != pz.GetId() || strings.Contains(run(t, "qemu-img", "info", "-U", "-f", "qcow2", "--output", "json", movedFile), "backing-filename") {
		t.Fatalf("migrated lazy volume: %v", moved)
	}
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", movedFile, qcow)

	t.Logf("step 3")
	// 3. The mount belongs to the cache process: killing the agent changes
	// nothing for readers; the restarted agent finds the same mount.
	killAgent(t, "h2")
	mustEqualFiles(t, m2q, tqFile)
	readsBack := func() {
		t.Helper()
		out := run(t, "qemu-io", "-f", "qcow2", "-c", "read -P 0xc3 10M 64k", "-c", "read -P 0x33 11M 2M", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x77 63M 1M", volFile)
		if strings.Contains(out, "Pattern verification failed") {
			t.Fatalf("lazy volume reads: %s", out)
		}
	}
	readsBack()
	agentProc(t, server, "h2", "z1", "c1", filepath.Join(root, "a2"), "--image-cache-socket", c2.socket)
	waitFor(t, "h2 Up again", 20*time.Second, func() bool { return hostState(t, server, "h2") == "HOST_STATE_UP" })
	select {
	case <-c2.done:
		t.Fatal("the cache process ended with the agent")
	default:
	}
	mustEqualFiles(t, m2q, tqFile)

	t.Logf("step 4")
	// 4. The listing follows the controller's templates without a remount:
	// a new template appears, a deleted one disappears.
	tr, trFile := register("base-raw", rawT, stowagev1.ImageFormat_IMAGE_FORMAT_RAW)
	m2r := filepath.Join(c2.mount, tr.GetId())
	waitFor(t, "new template in h2's mount", 20*time.Second, func() bool { return slices.Contains(listMount(c2.mount), tr.GetId()) })
	mustEqualFiles(t, m2r, trFile)
	dresp, err := a.images.DeleteTemplate(ctx, connect.NewRequest(&stowagev1.DeleteTemplateRequest{Id: tr.GetId()}))
	if err != nil {
		t.Fatalf("delete template: %v", err)
	}
	mustSucceed(t, a, dresp.Msg.GetJob())
	waitFor(t, "deleted template gone from both mounts", 20*time.Second, func() bool {
		return !slices.Contains(listMount(c2.mount), tr.GetId()) && !slices.Contains(listMount(c1.mount), tr.GetId())
	})
	if got := listMount(c2.mount); !slices.Equal(got, []string{tq.GetId()}) {
		t.Fatalf("h2's mount lists %v, want just %s", got, tq.GetId())
	}

	t.Logf("step 5")
	// 5. kill -9 of the cache process: the mount is stale until it starts
	// again; then the same template, with its cached chunks, is back and
	// the lazy volume reads as before. While h2 has no mount, a lazy
	// volume there is refused with the reason.
	c2.kill(syscall.SIGKILL)
	waitFor(t, "h2 reports no mount", 10*time.Second, func() bool { return hostCaps(t, server, "h2").GetTemplateCache() == nil })
	_, err = a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{
		Name: "lazy2", TemplateId: tq.GetId(), StoreId: p2.GetId(), Strategy: "lazy"}))
	if code(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "template mount") {
		t.Fatalf("lazy volume on a host without a mount: %v", err)
	}
	c2.start(t, "cache h2 again")
	mustEqualFiles(t, m2q, tqFile)
	readsBack()
	waitFor(t, "h2 reports its mount again", 10*time.Second, func() bool {
		ct := cachedTemplate(hostCaps(t, server, "h2"), tq.GetId())
		return ct != nil && ct.GetPinned() && ct.GetComplete()
	})
	resp2, err := httpGet(t, server, server+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp2.Body.Close()
	var mb bytes.Buffer
	mb.ReadFrom(resp2.Body)
	if !strings.Contains(mb.String(), `stowage_template_mount_templates{host="h2",state="pinned"} 1`) {
		t.Fatalf("metrics lack h2's pinned template:\n%s", mb.String())
	}
	// The mount's counters reach the controller's metrics (their values
	// are tested in datapath/imagecache and controller/hosts).
	for _, series := range []string{`stowage_template_cache_read_bytes_total{host="h2",result="hit"} `, `stowage_template_cache_read_bytes_total{host="h2",result="miss"} `,
		`stowage_template_cache_fetched_bytes_total{host="h2"} `, `stowage_template_cache_corrupt_chunks_total{host="h2"} 0`, `stowage_template_cache_passthrough_opens_total{host="h2"} `} {
		if !strings.Contains(mb.String(), series) {
			t.Errorf("metrics lack %s", series)
		}
	}
	// The agents' copy engine counters too: the copies above were counted
	// on the hosts that ran them.
	if !regexp.MustCompile(`(?m)^stowage_stream_copies_total\{host="h[12]",method="[^"]+",result="ok"\} [1-9]`).MatchString(mb.String()) ||
		!regexp.MustCompile(`(?m)^stowage_stream_bytes_total\{host="h[12]",kind="written"\} [1-9]`).MatchString(mb.String()) {
		t.Errorf("metrics lack the hosts' copies:\n%s", grepLines(mb.String(), "stowage_stream_"))
	}
	t.Logf("done")
}

// slowReader serves its bytes slowly while slow is set.
type slowReader struct {
	*bytes.Reader
	slow *atomic.Bool
}

func (r slowReader) Read(p []byte) (int, error) {
	if r.slow.Load() {
		time.Sleep(50 * time.Millisecond)
		p = p[:min(len(p), 64<<10)]
	}
	return r.Reader.Read(p)
}

// rangeStart returns the first byte of a "bytes=a-b" Range header, and
// how many bytes it asks for (-1: to the end).
func rangeStart(h string) (start, n int64, ok bool) {
	spec, found := strings.CutPrefix(h, "bytes=")
	if !found {
		return 0, 0, false
	}
	a, b, _ := strings.Cut(spec, "-")
	start, err := strconv.ParseInt(a, 10, 64)
	if err != nil {
		return 0, 0, false
	}
	if end, err := strconv.ParseInt(b, 10, 64); err == nil {
		return start, end - start + 1, true
	}
	return start, -1, true
}

// TestCacheServeKillMidFetch kills `stowage cache serve` with SIGKILL while
// a read waits on the source, then starts it again: the stale mount is
// detached, the template is back from the state file without any agent,
// the chunks cached before the kill are not fetched again, and the file
// reads byte-equal.
func TestCacheServeKillMidFetch(t *testing.T) {
	needFUSE(t)
	root := t.TempDir()
	data := make([]byte, 96<<20)
	rand.Read(data)
	// early is what the test reads before the kill; late is where the read
	// the kill interrupts starts, beyond any sequential read-ahead (32 MiB).
	const early, late = 8 << 20, 72 << 20
	var slow atomic.Bool
	var earlyFetches atomic.Int64
	lateStarted := make(chan struct{}, 1)
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if start, n, ok := rangeStart(r.Header.Get("Range")); ok && r.Method == http.MethodGet {
			if start < early && (n < 0 || n > 4096) { // not a probe of the first bytes
				earlyFetches.Add(1)
			}
			if start >= late && slow.Load() {
				select {
				case lateStarted <- struct{}{}:
				default:
				}
			}
		}
		http.ServeContent(w, r, "t1", time.Time{}, slowReader{bytes.NewReader(data), &slow})
	}))
	defer origin.Close()

	c := startCache(t, "cache", root, "--prefetch-rate", "off", "--pki-dir", "")
	cl := cachemount.NewClient(c.socket)
	ctx := context.Background()
	spec := &stowagev1.CacheSpec{Id: "t1", Url: origin.URL + "/t1", Size: int64(len(data)), Identity: "sha256:test", Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW}
	if _, err := cl.SyncCache(ctx, []*stowagev1.CacheSpec{spec}); err != nil {
		t.Fatalf("sync: %v", err)
	}
	// Bad input changes nothing.
	if _, err := cl.SyncCache(ctx, []*stowagev1.CacheSpec{spec, {Id: "../x", Url: "http://127.0.0.1/x", Size: 1}}); err == nil {
		t.Fatal("a template id with a slash was accepted")
	}
	file := filepath.Join(c.mount, "t1")
	f, err := os.Open(file)
	if err != nil {
		t.Fatalf("open the mounted template: %v", err)
	}
	got := make([]byte, early)
	if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, data[:early]) {
		t.Fatalf("first 8 MiB through the mount: %v, equal %v", err, bytes.Equal(got, data[:early]))
	}
	f.Close()
	// Wait until the index on disk names those chunks (committed).
	waitFor(t, "first chunks committed to the index", 10*time.Second, func() bool {
		b, err := os.ReadFile(filepath.Join(root, "cache", "t1", "index"))
		var ix struct{ Chunks []string }
		if err != nil || json.Unmarshal(b, &ix) != nil || len(ix.Chunks) < 8 {
			return false
		}
		return !slices.Contains(ix.Chunks[:8], "")
	})
	before := earlyFetches.Load()

	// A read of a later range waits on the slow source; kill -9 meanwhile.
	slow.Store(true)
	readErr := make(chan error, 1)
	go func() {
		f, err := os.Open(file)
		if err != nil {
			readErr <- err
			return
		}
		defer f.Close()
		_, err = f.ReadAt(make([]byte, 4<<20), late)
		readErr <- err
	}()
	select {
	case <-lateStarted:
	case <-time.After(20 * time.Second):
		t.Fatal("the late read never reached the source")
	}
	c.kill(syscall.SIGKILL)
	select {
	case err := <-readErr:
		if err == nil {
			t.Fatal("the read in flight when the cache process died succeeded")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the read in flight did not end when the cache process died")
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(c.mount, &sfs); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("after kill -9, statfs of the mount: %v (want ENOTCONN: a stale mount)", err)
	}

	// Start again: no sync from anyone; the state file brings t1 back.
	slow.Store(false)
	c.start(t, "cache again")
	all, err := os.ReadFile(file)
	if err != nil || !bytes.Equal(all, data) {
		t.Fatalf("whole template after restart: %v, equal %v", err, bytes.Equal(all, data))
	}
	if n := earlyFetches.Load() - before; n != 0 {
		t.Fatalf("%d ranged fetches below 8 MiB after the restart; the chunks cached before the kill must be kept", n)
	}
	st, err := cl.GetCache(ctx)
	if err != nil || len(st.GetTemplates()) != 1 || st.GetTemplates()[0].GetCachedBytes() != int64(len(data)) {
		t.Fatalf("status after restart: %v %v", st, err)
	}
	t.Logf("ranged fetches below 8 MiB: %d before the kill, 0 after", before)
	// The operator's local view, without a controller.
	out, errOut, rc := cli(t, "http://127.0.0.1:1", "cache", "status", "--socket", c.socket)
	if rc != 0 || !strings.Contains(out, c.mount) || !strings.Contains(out, "t1") || !strings.Contains(out, "complete") {
		t.Fatalf("stowage cache status (exit %d): %s %s", rc, out, errOut)
	}
}

package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/controller/meta"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// orphanMetric reads stowage_orphans_removed_total{kind} from /metrics.
func orphanMetric(t *testing.T, server, kind string) int {
	t.Helper()
	m := regexp.MustCompile(`stowage_orphans_removed_total\{kind="` + kind + `"\} (\d+)`).FindStringSubmatch(scrapeMetrics(t, server))
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(string(m[1]))
	return n
}

// TestOrphanReconciler: files of a store's layout that no record points to
// are removed by the controller's reconciler once they have been orphaned
// for the grace period, and nothing else is: not a volume's file, not a
// dot file, not a file outside the layout, not an orphan younger than the
// grace period.
func TestOrphanReconciler(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "qemu-img", "qemu-io")
	root := t.TempDir()
	web, qcow := patternedQcow2(t, root, "write -P 0x5a 1M 1M")
	origin := httptest.NewServer(http.StripPrefix("/t/", http.FileServer(http.Dir(web))))
	defer origin.Close()
	addr := freePort(t)
	server := "https://" + addr
	const grace = 3 * time.Second
	ctl := controllerProc(t, addr, filepath.Join(root, "ctl"), "--orphan-grace", grace.String(), "--orphan-interval", "300ms")
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"))
	waitFor(t, "h1 Up", 30*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	a := newAPI(server)
	img := addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), &stowagev1.Scope{Zone: "z1"})
	p1 := addStore(t, a, "p1", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p1"), &stowagev1.Scope{Zone: "z1"})
	ctx := context.Background()
	r, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "t", Url: origin.URL + "/t/base.qcow2",
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Checksum: "sha256:" + sha256File(t, qcow)}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, r.Msg.GetJob())
	cv, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "v", TemplateId: r.Msg.GetTemplate().GetId(), StoreId: p1.GetId(), Strategy: "linked"}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, cv.Msg.GetJob())
	gv, err := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: cv.Msg.GetVolume().GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	pdir, idir := p1.GetDetails()["path"], img.GetDetails()["path"]
	volFile := filepath.Join(pdir, gv.Msg.GetVolume().GetInstallPath())

	// A backup on the image store: its chunks are live.
	ts, err := a.snapshots.TakeSnapshot(ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: gv.Msg.GetVolume().GetId(), Name: "s"}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, ts.Msg.GetJob())
	bs, err := a.snapshots.BackupSnapshot(ctx, connect.NewRequest(&stowagev1.BackupSnapshotRequest{Id: ts.Msg.GetSnapshot().GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, bs.Msg.GetJob())
	chunkDir := filepath.Join(idir, "snapshots", "chunks")
	chunks := func() map[string]bool {
		got := map[string]bool{}
		_ = filepath.WalkDir(chunkDir, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				got[d.Name()] = true
			}
			return nil
		})
		return got
	}
	live := chunks()
	if len(live) == 0 {
		t.Fatal("the backup stored no chunk")
	}
	// A chunk a backup killed before its manifest leaves: named by its
	// content, used by no manifest.
	stray := []byte("a chunk no manifest uses")
	sum := sha256.Sum256(stray)
	strayHash := hex.EncodeToString(sum[:])
	// Every count is read before its orphans are made: a sweep runs every
	// 300 ms and may remove and count one at once.
	chunksBefore := orphanMetric(t, server, "chunk")
	before := orphanMetric(t, server, "object")
	grantsBefore := orphanMetric(t, server, "grant")
	if err := os.MkdirAll(filepath.Join(chunkDir, strayHash[:2]), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(chunkDir, strayHash[:2], strayHash), stray, 0o600); err != nil {
		t.Fatal(err)
	}

	// Orphans as a crash leaves them (objects of the layout, named as
	// Stowage names them, with no record), made to look older than the
	// grace period; then things that must stay.
	old := time.Now().Add(-time.Hour)
	var orphans []string
	for _, f := range []string{
		filepath.Join(pdir, "volumes", meta.NewID()+".qcow2"),
		filepath.Join(pdir, "templates", meta.NewID()+".qcow2"),
		filepath.Join(idir, "templates", meta.NewID()+".qcow2"),
	} {
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", f, "1M").CombinedOutput(); err != nil {
			t.Fatalf("qemu-img create: %v: %s", err, out)
		}
		if err := os.Chtimes(f, old, old); err != nil {
			t.Fatal(err)
		}
		orphans = append(orphans, f)
	}
	young := filepath.Join(pdir, "volumes", meta.NewID()+".raw")
	keep := []string{filepath.Join(pdir, "volumes", ".operator-note"), filepath.Join(pdir, "notes.txt")}
	for _, f := range append([]string{young}, keep...) {
		if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	made := time.Now()

	// An export as a controller that died mid-copy leaves it: made on the
	// agent for a job step, and the job is no more.
	hc, err := clientFor(server)
	if err != nil {
		t.Fatal(err)
	}
	hosts := stowagev1connect.NewHostServiceClient(hc, server)
	hl, err := hosts.ListHosts(ctx, connect.NewRequest(&stowagev1.ListHostsRequest{}))
	if err != nil || len(hl.Msg.GetHosts()) != 1 {
		t.Fatalf("hosts: %v %v", hl, err)
	}
	agent := stowagev1connect.NewAgentServiceClient(asController(t, server), hl.Msg.GetHosts()[0].GetAgentUrl())
	deadJob := meta.NewID()
	ex, err := agent.RunTask(ctx, connect.NewRequest(&stowagev1.RunTaskRequest{Task: &stowagev1.Task{
		Id: deadJob + ".copy.export-1", ParentId: deadJob + ".copy",
		Step: &stowagev1.Task_Export{Export: &stowagev1.ExportStep{Ref: &stowagev1.ObjectRef{StoreId: p1.GetId(), Key: gv.Msg.GetVolume().GetInstallPath()}, TtlSeconds: 3600}},
	}}))
	if err != nil || ex.Msg.GetResult().GetUri() == "" {
		t.Fatalf("export: %v %v", ex, err)
	}
	exportURL := ex.Msg.GetResult().GetUri()
	status := func() int {
		resp, err := asController(t, server).Get(exportURL)
		if err != nil {
			t.Fatalf("GET the export: %v", err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := status(); code != http.StatusOK {
		t.Fatalf("the export answers %d before the sweep", code)
	}

	gone := func(f string) bool { _, err := os.Stat(f); return os.IsNotExist(err) }
	waitFor(t, "the old orphans removed", 20*time.Second, func() bool {
		for _, f := range orphans {
			if !gone(f) {
				return false
			}
		}
		return true
	})
	// The young one is kept for the grace period from when it was made,
	// then removed.
	if gone(young) && time.Since(made) < grace {
		t.Fatalf("an orphan %s old was removed; the grace period is %s", time.Since(made), grace)
	}
	waitFor(t, "the young orphan removed after the grace period", 20*time.Second, func() bool { return gone(young) })
	if took := time.Since(made); took < grace {
		t.Errorf("the young orphan went after %s, before the %s grace period", took, grace)
	}
	for _, f := range append(keep, volFile) {
		if gone(f) {
			t.Errorf("%s was removed: it is not an orphan", f)
		}
	}
	if out, err := exec.Command("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", volFile, qcow).CombinedOutput(); err != nil {
		t.Errorf("the volume does not read as its template after the sweeps: %s", out)
	}
	waitFor(t, "the orphan objects counted", 10*time.Second, func() bool { return orphanMetric(t, server, "object")-before >= len(orphans)+1 })
	if n := orphanMetric(t, server, "object") - before; n != len(orphans)+1 {
		t.Errorf("stowage_orphans_removed_total{kind=\"object\"} went up by %d, want %d", n, len(orphans)+1)
	}
	waitFor(t, "the orphan chunk collected", 20*time.Second, func() bool { return !chunks()[strayHash] })
	if got := chunks(); len(got) != len(live) {
		t.Errorf("chunks after the collection: %d, want the backup's %d", len(got), len(live))
	} else {
		for h := range live {
			if !got[h] {
				t.Errorf("the backup's chunk %s was collected", h)
			}
		}
	}
	// The agent removes the chunk before the controller, on its reply,
	// counts it: the count may lag the file by a moment.
	waitFor(t, "the orphan chunk counted", 10*time.Second, func() bool { return orphanMetric(t, server, "chunk")-chunksBefore >= 1 })
	if n := orphanMetric(t, server, "chunk") - chunksBefore; n != 1 {
		t.Errorf("stowage_orphans_removed_total{kind=\"chunk\"} went up by %d, want 1", n)
	}
	waitFor(t, "the orphan export revoked", 20*time.Second, func() bool { return status() == http.StatusNotFound })
	waitFor(t, "the orphan export counted", 10*time.Second, func() bool { return orphanMetric(t, server, "grant")-grantsBefore >= 1 })
	if n := orphanMetric(t, server, "grant") - grantsBefore; n != 1 {
		t.Errorf("stowage_orphans_removed_total{kind=\"grant\"} went up by %d, want 1", n)
	}
	if !regexp.MustCompile(`revoked an orphan export.*task=` + deadJob).MatchString(ctl.log.String()) {
		t.Errorf("the controller's log does not name the export it revoked")
	}
	if !regexp.MustCompile(`removed an orphan object.*key=volumes/`).MatchString(ctl.log.String()) {
		t.Errorf("the controller's log does not name the orphans it removed")
	}
}

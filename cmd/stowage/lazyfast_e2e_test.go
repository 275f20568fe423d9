package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// TestLazyVolumeRightAfterRegistration runs a controller, an agent and its
// template mount (`stowage cache serve`) as processes, with heartbeats (and
// so the mount planner's passes) only every 5 s. A lazy volume created
// within a second of its template's registration succeeds: the create
// pushes the template to the host's mount itself (show_template) instead
// of waiting for a heartbeat to carry it. The volume reads as the template
// through the mount. Then 20 lazy creates are timed from the API call to
// the job's success (logged, never asserted: a measurement, not a timed
// test).
func TestLazyVolumeRightAfterRegistration(t *testing.T) {
	needFUSE(t)
	needTools(t, "qemu-img", "qemu-io")
	root := t.TempDir()
	ctx := context.Background()
	web, qcow := patternedQcow2(t, root, "write -P 0x33 10M 3M")
	origin := httptest.NewServer(http.StripPrefix("/t/", http.FileServer(http.Dir(web))))
	defer origin.Close()

	addr := freePort(t)
	server := "https://" + addr
	// Slow heartbeats: a create that waited for one would fail (the host
	// does not report the template) or take seconds.
	controllerProc(t, addr, filepath.Join(root, "controller"), "--heartbeat-interval", "5s", "--host-timeout", "30s")
	c1 := startCache(t, "cache h1", filepath.Join(root, "c1"), "--pki-dir", filepath.Join(root, "a1", "pki"))
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), "--image-cache-socket", c1.socket)
	waitFor(t, "h1 Up", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	waitFor(t, "h1 reports its template mount", 20*time.Second, func() bool {
		return hostCaps(t, server, "h1").GetTemplateCache().GetMount() != ""
	})
	a := newAPI(server)
	scope := &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h1"}
	addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), scope)
	p1 := addStore(t, a, "p1", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p1"), scope)

	resp, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{
		Name: "base", Url: origin.URL + "/t/" + filepath.Base(qcow), Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Checksum: "sha256:" + sha256File(t, qcow)}))
	if err != nil {
		t.Fatalf("register: %v", err)
	}
	tmpl := resp.Msg.GetTemplate()
	mustSucceed(t, a, resp.Msg.GetJob())
	registered := time.Now()
	shownBefore := cachedTemplate(hostCaps(t, server, "h1"), tmpl.GetId()) != nil

	create := func(name string) (*stowagev1.Volume, *stowagev1.Job, time.Duration, time.Duration) {
		t.Helper()
		start := time.Now()
		cr, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{
			Name: name, TemplateId: tmpl.GetId(), StoreId: p1.GetId(), Strategy: "lazy"}))
		if err != nil {
			t.Fatalf("create lazy volume %s %v after the registration: %v", name, time.Since(registered), err)
		}
		accepted := time.Since(start)
		j := mustSucceed(t, a, cr.Msg.GetJob())
		return cr.Msg.GetVolume(), j, accepted, time.Since(start)
	}
	v, j, _, ready := create("lazy0")
	after := time.Since(registered)
	t.Logf("first lazy create: started %v after the registration job's success (host reported the template then: %v), Ready in %v", after-ready, shownBefore, ready)
	if j.GetPlan().GetStrategy() != "lazy" {
		t.Fatalf("plan: %v", j.GetPlan())
	}
	vr, err := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: v.GetId()}))
	if err != nil || vr.Msg.GetVolume().GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
		t.Fatalf("lazy volume: %v %v", vr.Msg.GetVolume(), err)
	}
	volFile := filepath.Join(p1.GetDetails()["path"], vr.Msg.GetVolume().GetInstallPath())
	mounted := filepath.Join(c1.mount, tmpl.GetId())
	vinfo := run(t, "qemu-img", "info", "-U", "-f", "qcow2", "--output", "json", volFile)
	if !strings.Contains(vinfo, `"backing-filename": "`+mounted+`"`) {
		t.Fatalf("lazy volume's backing file: %s", vinfo)
	}
	// The volume reads as the template, through the mount path.
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", volFile, qcow)
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", mounted, qcow)

	// 20 lazy creates, timed from the API call to the job's success.
	const n = 20
	var total, accept, server_ []time.Duration
	for i := range n {
		_, j, acc, d := create("lazy" + string(rune('a'+i)))
		total, accept = append(total, d), append(accept, acc)
		server_ = append(server_, j.GetUpdatedAt().AsTime().Sub(j.GetCreatedAt().AsTime()))
	}
	pct := func(ds []time.Duration, p float64) time.Duration {
		s := slices.Clone(ds)
		slices.Sort(s)
		return s[min(len(s)-1, int(p*float64(len(s))))]
	}
	t.Logf("lazy create, API call to job Succeeded (%d creates): p50 %v p99 %v", n, pct(total, 0.5), pct(total, 0.99))
	t.Logf("  of which CreateVolume call (plan + record): p50 %v p99 %v", pct(accept, 0.5), pct(accept, 0.99))
	t.Logf("  of which job created_at to updated_at (controller side): p50 %v p99 %v", pct(server_, 0.5), pct(server_, 0.99))
}

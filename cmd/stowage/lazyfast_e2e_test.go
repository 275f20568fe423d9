package main

import (
	"context"
	"fmt"
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
// through the mount. A linked clone made from the template's copy on the
// primary store reads as the template too. Then 100 lazy and 100 linked
// creates are timed from the API call to the job's success (p50 and p99
// logged, never asserted: a measurement, not a timed test).
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

	create := func(name, strategy string) (*stowagev1.Volume, *stowagev1.Job, time.Duration, time.Duration) {
		t.Helper()
		start := time.Now()
		cr, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{
			Name: name, TemplateId: tmpl.GetId(), StoreId: p1.GetId(), Strategy: strategy}))
		if err != nil {
			t.Fatalf("create %s volume %s %v after the registration: %v", strategy, name, time.Since(registered), err)
		}
		accepted := time.Since(start)
		j := mustSucceed(t, a, cr.Msg.GetJob())
		return cr.Msg.GetVolume(), j, accepted, time.Since(start)
	}
	v, j, _, ready := create("lazy0", "lazy")
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

	// The first linked clone copies the template to p1 once.
	lv, lj, _, lready := create("linked0", "linked")
	if lj.GetPlan().GetStrategy() != "linked" {
		t.Fatalf("plan: %v", lj.GetPlan())
	}
	t.Logf("first linked create (copies the template to the store): Ready in %v", lready)
	lr, err := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: lv.GetId()}))
	if err != nil || lr.Msg.GetVolume().GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
		t.Fatalf("linked volume: %v %v", lr.Msg.GetVolume(), err)
	}
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", filepath.Join(p1.GetDetails()["path"], lr.Msg.GetVolume().GetInstallPath()), qcow)

	// 100 lazy and 100 linked creates, alternating, each timed from the
	// API call to the job's success (the watch's last message), in the
	// steady state: once h1's heartbeat reports the template in its mount
	// (until then a lazy create pushes it, show_template, ~2 ms), and after
	// one create of each kind on bases over a second old: the agent caches
	// a base's qemu-img info only then (agent/hostfs/baseinfo.go), and the
	// first create of a base after that runs it once.
	waitFor(t, "h1's heartbeat reports the template in its mount", 20*time.Second, func() bool {
		return cachedTemplate(hostCaps(t, server, "h1"), tmpl.GetId()) != nil
	})
	time.Sleep(time.Second)
	_, _, _, lazyWarm := create("lazy-warm", "lazy")
	_, _, _, linkedWarm := create("linked-warm", "linked")
	t.Logf("first creates on bases over a second old (the base's qemu-img info runs once): lazy %v, linked %v", lazyWarm, linkedWarm)
	const n = 100
	type series struct{ total, accept, server []time.Duration }
	runs := map[string]*series{"lazy": {}, "linked": {}}
	for i := range n {
		for _, strategy := range []string{"lazy", "linked"} {
			_, j, acc, d := create(fmt.Sprintf("%s-%03d", strategy, i), strategy)
			if j.GetPlan().GetStrategy() != strategy {
				t.Fatalf("a %s create ran plan %v", strategy, j.GetPlan())
			}
			s := runs[strategy]
			s.total, s.accept = append(s.total, d), append(s.accept, acc)
			s.server = append(s.server, j.GetUpdatedAt().AsTime().Sub(j.GetCreatedAt().AsTime()))
		}
	}
	pct := func(ds []time.Duration, p float64) time.Duration {
		s := slices.Clone(ds)
		slices.Sort(s)
		return s[min(len(s)-1, int(p*float64(len(s))))]
	}
	for _, strategy := range []string{"lazy", "linked"} {
		s := runs[strategy]
		t.Logf("%s create, API call to job Succeeded (%d creates): p50 %v p99 %v", strategy, n, pct(s.total, 0.5), pct(s.total, 0.99))
		t.Logf("  of which CreateVolume call (plan + record): p50 %v p99 %v", pct(s.accept, 0.5), pct(s.accept, 0.99))
		t.Logf("  of which job created_at to updated_at (controller side): p50 %v p99 %v", pct(s.server, 0.5), pct(s.server, 0.99))
	}
}

package main

import (
	"context"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// TestPlacementEndToEnd steers placement as an operator would, with a real
// controller, two real agents and the CLI: storage tags (a tagged volume
// lands only on a store carrying the tag; the plan says why the others
// were skipped), a store's own capacity disable threshold (skipped with
// its fill in the reason until it is raised; the threshold is exported for
// the alert), store disable/enable, and host maintenance (a task running
// on the host finishes, the host drains to Maintenance, gets no new task,
// and comes back Up when maintenance is cancelled).
func TestPlacementEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	ctx := context.Background()
	root := t.TempDir()
	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "controller"))
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"))
	agentProc(t, server, "h2", "z1", "c2", filepath.Join(root, "a2"))
	waitFor(t, "both hosts Up", 20*time.Second, func() bool {
		return hostState(t, server, "h1") == "HOST_STATE_UP" && hostState(t, server, "h2") == "HOST_STATE_UP"
	})
	a := newAPI(server)

	addPrimary := func(name string, extra ...string) {
		t.Helper()
		_, errOut, code := cli(t, server, append([]string{"store", "add", "--name", name, "--role", "primary", "--url", "file://" + filepath.Join(root, "stores", name), "--scope", "z1"}, extra...)...)
		if code != 0 {
			t.Fatalf("store add %s: exit %d: %s", name, code, errOut)
		}
	}
	addPrimary("bulk")
	addPrimary("fast", "--tag", "ssd")
	// /tmp is more than 1% used on any machine this runs on: a disable
	// threshold of 1% keeps "near" full by its own measure.
	addPrimary("near", "--tag", "near", "--disable-threshold", "0.01")

	plan := func(tags ...string) (*stowagev1.CreateVolumeResponse, error) {
		resp, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{
			Name: "dry", Size: 16 << 20, Tags: tags, DryRun: true}))
		if err != nil {
			return nil, err
		}
		return resp.Msg, nil
	}
	create := func(name string, tags ...string) *stowagev1.Volume {
		t.Helper()
		resp, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: name, Size: 16 << 20, Tags: tags}))
		if err != nil {
			t.Fatalf("create %s %v: %v", name, tags, err)
		}
		j := mustSucceed(t, a, resp.Msg.GetJob())
		v, err := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: resp.Msg.GetVolume().GetId()}))
		if err != nil {
			t.Fatal(err)
		}
		if v.Msg.GetVolume().GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
			t.Fatalf("volume %s: %s", name, v.Msg.GetVolume().GetState())
		}
		_ = j
		return v.Msg.GetVolume()
	}
	storeID := func(name string) string {
		for _, s := range listStores(t, server) {
			if s.Name == name {
				return s.ID
			}
		}
		t.Fatalf("no store %s", name)
		return ""
	}

	// Tags.
	p, err := plan("ssd")
	if err != nil {
		t.Fatalf("plan ssd: %v", err)
	}
	reasons := strings.Join(p.GetPlan().GetReasons(), "\n")
	if p.GetVolume().GetStoreId() != storeID("fast") ||
		!strings.Contains(reasons, "store bulk skipped: lacks storage tag ssd (has none)") ||
		!strings.Contains(reasons, "store near skipped: lacks storage tag ssd (has near)") {
		t.Fatalf("plan for ssd: store %s, reasons:\n%s", p.GetVolume().GetStoreId(), reasons)
	}
	for i, name := range []string{"t1", "t2", "t3"} {
		if v := create(name, "ssd"); v.GetStoreId() != storeID("fast") || strings.Join(v.GetTags(), ",") != "ssd" {
			t.Fatalf("tagged volume %d on %s with tags %v, want on fast", i, v.GetStoreId(), v.GetTags())
		}
	}
	if _, err := plan("nvme"); connect.CodeOf(err) != connect.CodeFailedPrecondition || !strings.Contains(err.Error(), "lacks storage tag nvme") {
		t.Fatalf("plan nvme: %v, want failed_precondition naming the tag", err)
	}
	if out, errOut, code := cli(t, server, "volume", "create", "--name", "x", "--size", "1M", "--tag", "bad tag"); code != 2 || !strings.Contains(errOut, "tags[0]: does not match regex pattern") {
		t.Errorf("volume create --tag 'bad tag': exit %d, %s%s", code, out, errOut)
	}

	// The disable threshold: "near" is skipped with its fill, and is
	// refused by name; the threshold is exported for the alert.
	_, err = plan("near")
	// A blank volume is sparse: it asks for no bytes up front.
	fill := regexp.MustCompile(`store near skipped: [0-9.]+% full, at or above its disable threshold 1%`)
	if connect.CodeOf(err) != connect.CodeFailedPrecondition || !fill.MatchString(err.Error()) {
		t.Fatalf("plan near at 1%%: %v", err)
	}
	if _, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "x", Size: 1 << 20, StoreId: "near"})); connect.CodeOf(err) != connect.CodeFailedPrecondition || !strings.Contains(err.Error(), "disable threshold 1%") {
		t.Fatalf("create on near by name: %v", err)
	}
	if m := scrapeMetrics(t, server); !strings.Contains(m, `stowage_store_capacity_threshold_ratio{role="Primary",store="near",threshold="disable"} 0.01`) ||
		!strings.Contains(m, `stowage_store_capacity_threshold_ratio{role="Primary",store="bulk",threshold="disable"} 0.85`) {
		t.Errorf("threshold metrics missing:\n%s", grepLines(m, "threshold_ratio"))
	}
	if _, errOut, code := cli(t, server, "store", "update", "near", "--disable-threshold", "1.5"); code != 2 || !strings.Contains(errOut, "(0, 1]") {
		t.Errorf("update --disable-threshold 1.5: exit %d %s", code, errOut)
	}
	out, errOut, code := cli(t, server, "store", "update", "near", "--disable-threshold", "1")
	if code != 0 || !strings.Contains(out, "disable at 100%, notify above 75% (default)") {
		t.Fatalf("update near: exit %d %s%s", code, out, errOut)
	}
	if v := create("n1", "near"); v.GetStoreId() != storeID("near") {
		t.Fatalf("after raising the threshold: on %s, want near", v.GetStoreId())
	}

	// Disable / enable.
	if _, errOut, code := cli(t, server, "store", "enable", "bulk"); code != 5 || !strings.Contains(errOut, "only a Disabled store") {
		t.Errorf("enable an Up store: exit %d %s", code, errOut)
	}
	if out, errOut, code := cli(t, server, "store", "disable", "bulk"); code != 0 || !strings.Contains(out, "Disabled") {
		t.Fatalf("disable bulk: exit %d %s%s", code, out, errOut)
	}
	p, err = plan()
	if err != nil {
		t.Fatal(err)
	}
	if reasons := strings.Join(p.GetPlan().GetReasons(), "\n"); p.GetVolume().GetStoreId() == storeID("bulk") || !strings.Contains(reasons, "store bulk skipped: Disabled") {
		t.Fatalf("plan with bulk Disabled: store %s, reasons:\n%s", p.GetVolume().GetStoreId(), reasons)
	}
	if out, errOut, code := cli(t, server, "store", "enable", "bulk"); code != 0 || !strings.Contains(out, "Up") {
		t.Fatalf("enable bulk: exit %d %s%s", code, out, errOut)
	}

	// Host maintenance. A template is downloaded slowly onto an image
	// store only h1 reaches (cluster c1): the download is h1's task.
	raw := filepath.Join(root, "web", "t.raw")
	if err := os.MkdirAll(filepath.Dir(raw), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(raw, []byte(strings.Repeat("stowage!", 4<<20)), 0o644); err != nil { // 32 MiB at ~12 MiB/s
		t.Fatal(err)
	}
	web := httptest.NewServer(slowHandler(raw))
	defer web.Close()
	if _, errOut, code := cli(t, server, "store", "add", "--name", "img", "--role", "image", "--url", "file://"+filepath.Join(root, "stores", "img"), "--scope", "z1/c1"); code != 0 {
		t.Fatalf("add image store: %s", errOut)
	}
	reg, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "slow", Url: web.URL + "/t.raw",
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW, Checksum: "sha256:" + sha256File(t, raw)}))
	if err != nil {
		t.Fatal(err)
	}
	regJob := reg.Msg.GetJob()
	waitFor(t, "the download to move", 20*time.Second, func() bool {
		j, err := a.jobs.GetJob(ctx, connect.NewRequest(&stowagev1.GetJobRequest{Id: regJob.GetId()}))
		return err == nil && j.Msg.GetJob().GetProgress().GetBytesDone() > 0
	})
	if _, errOut, code := cli(t, server, "host", "cancel-maintain", "h1"); code != 5 || !strings.Contains(errOut, "not in maintenance") {
		t.Errorf("cancel-maintain an Up host: exit %d %s", code, errOut)
	}
	out, errOut, code = cli(t, server, "host", "maintain", "h1")
	if code != 0 || !strings.Contains(out, "PrepareForMaintenance") || !strings.Contains(out, "draining") {
		t.Fatalf("host maintain h1: exit %d %s%s", code, out, errOut)
	}
	// Draining while its task runs.
	j, err := a.jobs.GetJob(ctx, connect.NewRequest(&stowagev1.GetJobRequest{Id: regJob.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	if j.Msg.GetJob().GetState() != stowagev1.JobState_JOB_STATE_RUNNING {
		t.Fatalf("the download was not running when h1 was asked to drain (%s): make it slower", j.Msg.GetJob().GetState())
	}
	if st := hostState(t, server, "h1"); st != "HOST_STATE_PREPARE_FOR_MAINTENANCE" {
		t.Errorf("h1 while its task runs: %s, want PrepareForMaintenance", st)
	}
	mustSucceed(t, a, regJob) // the running task finished
	waitFor(t, "h1 in Maintenance", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_MAINTENANCE" })

	// No new task goes to h1: every step of these creates ran on h2.
	for _, name := range []string{"m1", "m2", "m3", "m4"} {
		resp, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: name, Size: 16 << 20}))
		if err != nil {
			t.Fatalf("create %s with h1 in maintenance: %v", name, err)
		}
		done := mustSucceed(t, a, resp.Msg.GetJob())
		ran := 0
		for _, s := range done.GetPlan().GetSteps() {
			for _, h := range append([]string{s.GetHostId()}, s.GetTaskHosts()...) {
				if h == "h1" {
					t.Errorf("volume %s: step %s sent to h1 in maintenance", name, s.GetName())
				}
				if h == "h2" {
					ran++
				}
			}
		}
		if ran == 0 {
			t.Errorf("volume %s: no step names h2: %v", name, done.GetPlan().GetSteps())
		}
	}
	// A copy from the image store only h1 reaches has no Up host: refused,
	// with h1's state in the reason, rather than sent to h1.
	_, err = a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "from-slow", TemplateId: "slow", Strategy: "full", DryRun: true}))
	if err == nil || !strings.Contains(err.Error(), "MAINTENANCE") {
		t.Errorf("a copy only h1 could do, h1 in maintenance: %v", err)
	}

	out, errOut, code = cli(t, server, "host", "cancel-maintain", "h1")
	if code != 0 || !strings.Contains(out, "Connecting") {
		t.Fatalf("cancel-maintain h1: exit %d %s%s", code, out, errOut)
	}
	waitFor(t, "h1 Up again", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	if _, errOut, code := cli(t, server, "host", "maintain", "no-such-host"); code != 3 {
		t.Errorf("maintain an unknown host: exit %d %s", code, errOut)
	}
}

// scrapeMetrics returns the controller's /metrics text.
func scrapeMetrics(t *testing.T, server string) string {
	t.Helper()
	resp, err := httpGet(t, server, server+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// grepLines returns the lines of s containing sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

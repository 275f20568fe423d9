package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/failover"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// etcdMember is one etcd process of a test cluster.
type etcdMember struct {
	name, client, peer, dir string
	p                       *proc
}

// startEtcdCluster starts n etcd members (Debian's etcd-server) on
// loopback ports below the ephemeral range, so a member restarts on its
// own ports.
func startEtcdCluster(t *testing.T, root string, n int) []*etcdMember {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		t.Fatal("etcd is required (scripts/test.sh installs etcd-server)")
	}
	var ms []*etcdMember
	var initial []string
	for i := range n {
		m := &etcdMember{name: fmt.Sprintf("e%d", i+1), client: freeAddr(t), peer: freeAddr(t), dir: filepath.Join(root, fmt.Sprintf("etcd%d", i+1))}
		ms = append(ms, m)
		initial = append(initial, m.name+"=http://"+m.peer)
	}
	for _, m := range ms {
		m.p = startBin(t, "etcd "+m.name, bin, nil, "--name", m.name, "--data-dir", m.dir,
			"--listen-client-urls", "http://"+m.client, "--advertise-client-urls", "http://"+m.client,
			"--listen-peer-urls", "http://"+m.peer, "--initial-advertise-peer-urls", "http://"+m.peer,
			"--initial-cluster", strings.Join(initial, ","), "--initial-cluster-state", "new",
			"--initial-cluster-token", "stowage-ha-test", "--log-level", "warn",
			"--heartbeat-interval", "100", "--election-timeout", "1000")
	}
	for _, m := range ms {
		waitEtcdHealthy(t, m)
	}
	return ms
}

// waitEtcdHealthy waits until member m answers /health with true.
func waitEtcdHealthy(t *testing.T, m *etcdMember) {
	t.Helper()
	waitFor(t, "etcd "+m.name+" healthy", 30*time.Second, func() bool {
		resp, err := http.Get("http://" + m.client + "/health")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode == 200 && strings.Contains(string(b), `"true"`)
	})
}

// role is what a controller's /healthz says it is: "leader", "follower",
// or "" when it does not answer.
func role(t *testing.T, server string) string {
	resp, err := httpGet(t, server, server+"/healthz")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return strings.TrimPrefix(strings.TrimSpace(string(b)), "ok ")
}

// reportf prints a figure a test measured where CI shows it: appended to
// $STOWAGE_TEST_REPORT when set (scripts/test.sh prints it), and logged.
func reportf(t *testing.T, format string, args ...any) {
	t.Helper()
	line := fmt.Sprintf("%s: ", t.Name()) + fmt.Sprintf(format, args...)
	t.Log(line)
	if p := os.Getenv("STOWAGE_TEST_REPORT"); p != "" {
		if f, err := os.OpenFile(p, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600); err == nil {
			fmt.Fprintln(f, line)
			f.Close()
		}
	}
}

// TestHAFailover: three etcd members, two controllers sharing them, two
// agents that know both controllers. The leader is killed (-9) while a
// template download and then volume copies run, and one etcd member is
// killed. Every job ends Succeeded, or Failed with a reason; no object is
// left in a transitional state; every store holds exactly the files the
// records account for (no copy made twice); the interrupted download ran
// once (the new leader resumed the job with the same task id, and the
// agent answered from its journal).
func TestHAFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test starts processes")
	}
	needTools(t, "qemu-img", "qemu-io")
	root := t.TempDir()
	members := startEtcdCluster(t, root, 3)
	var eps []string
	for _, m := range members {
		eps = append(eps, m.client)
	}
	spec := "etcd://" + strings.Join(eps, ",") + "/stowage-ha"
	addrA, addrB := freeAddr(t), freeAddr(t)
	srvA, srvB := "https://"+addrA, "https://"+addrB
	dirA, dirB := filepath.Join(root, "ctlA"), filepath.Join(root, "ctlB")
	ctlArgs := func(addr string) []string {
		return []string{"--metadata", spec, "--leader-lease", "3s", "--orphan-interval", "0", "--advertise-url", "https://" + addr}
	}
	ctlA := controllerProc(t, addrA, dirA, ctlArgs(addrA)...)
	waitFor(t, "A leads", 20*time.Second, func() bool { return role(t, srvA) == "leader" })
	// Controllers of one cloud share the CA and the CHAP key (docs/operations.md).
	if err := os.MkdirAll(dirB, 0o700); err != nil {
		t.Fatal(err)
	}
	run(t, "cp", "-a", filepath.Join(dirA, "pki"), filepath.Join(dirB, "pki"))
	ctlB := controllerProc(t, addrB, dirB, ctlArgs(addrB)...)
	if r := role(t, srvB); r != "follower" {
		t.Fatalf("B is %q, want follower", r)
	}
	both := srvA + "," + srvB
	controllers.Store(both, dirA) // the CLI and API clients use A's admin token

	// A follower serves reads and refuses writes, naming the leader; A's
	// token works on B (tokens live in etcd).
	hcA := testClient(t, srvA)
	onB := stowagev1connect.NewStoreServiceClient(hcA, srvB)
	if _, err := onB.ListStores(context.Background(), connect.NewRequest(&stowagev1.ListStoresRequest{})); err != nil {
		t.Fatalf("read on the follower: %v", err)
	}
	_, err := onB.AddStore(context.Background(), connect.NewRequest(&stowagev1.AddStoreRequest{Name: "x", Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY, Provider: "filesystem", Url: "file://" + filepath.Join(root, "x")}))
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeUnavailable || ce.Meta().Get(failover.LeaderHeader) != srvA {
		t.Fatalf("write on the follower: %v (leader header %q)", err, ce.Meta().Get(failover.LeaderHeader))
	}

	// A follower also serves the metadata backup (one consistent read).
	if _, errOut, code := runStowage(t, clientEnv(both), "metadata", "backup", filepath.Join(root, "meta.backup"), "--server", srvB); code != 0 {
		t.Fatalf("metadata backup from the follower: exit %d: %s", code, errOut)
	}

	// The API client of the test, like the CLI, knows both controllers.
	tr, err := failover.New(hcA.Transport, []string{srvA, srvB})
	if err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Transport: tr, Timeout: time.Minute}
	a := &clientAPI{
		stores:    stowagev1connect.NewStoreServiceClient(hc, tr.BaseURL()),
		images:    stowagev1connect.NewImageServiceClient(hc, tr.BaseURL()),
		volumes:   stowagev1connect.NewVolumeServiceClient(hc, tr.BaseURL()),
		snapshots: stowagev1connect.NewSnapshotServiceClient(hc, tr.BaseURL()),
		jobs:      stowagev1connect.NewJobServiceClient(hc, tr.BaseURL()),
	}
	agentProc(t, both, "h1", "z1", "c1", filepath.Join(root, "a1"))
	agentProc(t, both, "h2", "z1", "c1", filepath.Join(root, "a2"))
	waitFor(t, "both hosts Up", 30*time.Second, func() bool {
		return hostState(t, both, "h1") == "HOST_STATE_UP" && hostState(t, both, "h2") == "HOST_STATE_UP"
	})
	zone := &stowagev1.Scope{Zone: "z1"}
	img := addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "stores", "img"), zone)
	p1 := addStore(t, a, "p1", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "stores", "p1"), zone)

	// A template served slowly (58 MiB of data: ~5 s), its downloads counted.
	web, qcow := patternedQcow2(t, root, "write -P 0x33 2M 56M")
	_ = web
	var downloads atomic.Int32
	slow := slowHandler(qcow)
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && r.Header.Get("Range") == "" { // not the probe of its size
			downloads.Add(1)
			t.Logf("template GET at %s from %s (range %q)", time.Now().Format("15:04:05.000"), r.RemoteAddr, r.Header.Get("Range"))
		}
		slow.ServeHTTP(w, r)
	}))
	defer ts.Close()
	ctx := context.Background()
	reg, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "base", Url: ts.URL + "/base.qcow2",
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Checksum: "sha256:" + sha256File(t, qcow)}))
	if err != nil {
		t.Fatalf("register: %v", err)
	}
	regJob := reg.Msg.GetJob()
	waitFor(t, "the download under way", 30*time.Second, func() bool { return downloads.Load() > 0 })
	time.Sleep(500 * time.Millisecond)

	// Kill the leader mid-download; B takes over within the lease.
	killed := time.Now()
	t.Logf("killing A at %s", killed.Format("15:04:05.000"))
	ctlA.kill(syscall.SIGKILL)
	waitFor(t, "B leads", 30*time.Second, func() bool { return role(t, srvB) == "leader" })
	takeover := time.Since(killed)
	reportf(t, "takeover after kill -9 of the leader: %s (lease 3s)", takeover.Round(10*time.Millisecond))
	if takeover > 3*time.Second+5*time.Second {
		t.Errorf("takeover took %s with a 3s lease", takeover)
	}
	// A comes back (as systemd restarts it) as a follower.
	ctlA = controllerProc(t, addrA, dirA, ctlArgs(addrA)...)
	if r := role(t, srvA); r != "follower" {
		t.Fatalf("restarted A is %q, want follower", r)
	}
	j := settle(t, a, regJob.GetId())
	if j.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("template job after the takeover: %s %s", j.GetState(), j.GetError())
	}
	t.Logf("template job: %v", j)
	if n := downloads.Load(); n != 1 {
		t.Errorf("the template was downloaded %d times; the resumed job should have used the agent's journalled task", n)
	}
	tmplID := reg.Msg.GetTemplate().GetId()

	// Volumes copied while the leader (B) is killed, then while an etcd
	// member is down.
	var jobIDs []string
	create := func(name string) {
		resp, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: name, TemplateId: tmplID, StoreId: p1.GetId(), Strategy: "full"}))
		if err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		jobIDs = append(jobIDs, resp.Msg.GetJob().GetId())
	}
	for i := range 6 {
		create(fmt.Sprintf("v%d", i))
	}
	running := 0
	for _, id := range jobIDs {
		if g, err := a.jobs.GetJob(ctx, connect.NewRequest(&stowagev1.GetJobRequest{Id: id})); err == nil && !terminalJob(g.Msg.GetJob().GetState()) {
			running++
		}
	}
	// And one through the CLI, which knows both controllers and waits for
	// the job across the takeover.
	cliCmd := exec.Command(stowageBin, "volume", "create", "--name", "cli1", "--template", tmplID, "--store", "p1", "--strategy", "full",
		"--wait", "-o", "json", "--server", both)
	cliCmd.Env = clientEnv(both)
	var cliOut, cliErr strings.Builder
	cliCmd.Stdout, cliCmd.Stderr = &cliOut, &cliErr
	if err := cliCmd.Start(); err != nil {
		t.Fatal(err)
	}
	cliDone := make(chan error, 1)
	go func() { cliDone <- cliCmd.Wait() }()
	waitFor(t, "the CLI's volume recorded", 30*time.Second, func() bool {
		vs, err := a.volumes.ListVolumes(ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{}))
		return err == nil && slices.ContainsFunc(vs.Msg.GetVolumes(), func(v *stowagev1.Volume) bool { return v.GetName() == "cli1" })
	})
	// The record is committed before the reply is sent: give the reply
	// time to reach the CLI (a create whose reply is lost with its
	// controller fails in the CLI; that is not what this step tests).
	time.Sleep(300 * time.Millisecond)
	reportf(t, "jobs unfinished when the leader was killed: %d of %d", running, len(jobIDs))
	killed = time.Now()
	ctlB.kill(syscall.SIGKILL)
	waitFor(t, "A leads again", 30*time.Second, func() bool { return role(t, srvA) == "leader" })
	reportf(t, "second takeover: %s", time.Since(killed).Round(10*time.Millisecond))
	ctlB = controllerProc(t, addrB, dirB, ctlArgs(addrB)...)
	_ = ctlB

	select {
	case err := <-cliDone:
		if err != nil || !strings.Contains(cliOut.String(), "VOLUME_STATE_READY") {
			t.Errorf("stowage volume create --wait across the takeover: %v\n%s\n%s", err, cliOut.String(), cliErr.String())
		}
	case <-time.After(2 * time.Minute):
		_ = cliCmd.Process.Kill()
		t.Fatalf("stowage volume create --wait did not end:\n%s", cliErr.String())
	}
	checkRaces(t, "stowage volume create", cliErr.String())

	members[0].p.kill(syscall.SIGKILL)
	for i := 6; i < 9; i++ {
		create(fmt.Sprintf("v%d", i))
	}
	for _, id := range jobIDs {
		j := settle(t, a, id)
		switch j.GetState() {
		case stowagev1.JobState_JOB_STATE_SUCCEEDED:
		case stowagev1.JobState_JOB_STATE_FAILED:
			if j.GetError() == "" {
				t.Errorf("job %s failed without a reason", id)
			}
			t.Logf("job %s failed: %s", id, j.GetError())
		default:
			t.Errorf("job %s ended %s", id, j.GetState())
		}
	}

	// Nothing stuck, nothing twice: the store holds exactly one file per
	// volume that has one, and the image store one template copy.
	vs, err := a.volumes.ListVolumes(ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{}
	ready := 0
	for _, v := range vs.Msg.GetVolumes() {
		switch v.GetState() {
		case stowagev1.VolumeState_VOLUME_STATE_READY:
			ready++
			want[filepath.Join(p1.GetDetails()["path"], v.GetInstallPath())] = true
		case stowagev1.VolumeState_VOLUME_STATE_FAILED, stowagev1.VolumeState_VOLUME_STATE_EXPUNGED:
		default:
			t.Errorf("volume %s left %s", v.GetName(), v.GetState())
		}
	}
	var have []string
	for _, dir := range []string{filepath.Join(p1.GetDetails()["path"], "volumes"), filepath.Join(img.GetDetails()["path"], "templates")} {
		_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				have = append(have, p)
			}
			return nil
		})
	}
	vols := 0
	for _, p := range have {
		if strings.HasPrefix(p, filepath.Join(p1.GetDetails()["path"], "volumes")) {
			vols++
			if !want[p] {
				t.Errorf("%s: no Ready volume accounts for it (a copy made twice, or left over)", p)
			}
		}
	}
	if vols != len(want) {
		t.Errorf("%d volume files for %d Ready volumes: %v", vols, len(want), have)
	}
	if tmpl := len(have) - vols; tmpl != 1 {
		t.Errorf("%d template files on the image store, want 1: %v", tmpl, have)
	}
	reportf(t, "%d volumes Ready of %d created (one by the CLI); %d files on p1", ready, len(jobIDs)+1, vols)
	if ready == 0 {
		t.Error("no volume was created")
	}

	// A clean stop of the leader hands over at once, without waiting for
	// the lease.
	stopped := time.Now()
	ctlA.kill(syscall.SIGTERM)
	waitFor(t, "B leads after A stopped", 30*time.Second, func() bool { return role(t, srvB) == "leader" })
	reportf(t, "takeover after a clean stop of the leader: %s", time.Since(stopped).Round(10*time.Millisecond))
	if d := time.Since(stopped); d > 2*time.Second {
		t.Errorf("a clean stop took %s to hand over (the lease is 3s)", d)
	}
}

// settle polls a job until it ends (a watch would break at every
// takeover).
func settle(t *testing.T, a *clientAPI, id string) *stowagev1.Job {
	t.Helper()
	var last *stowagev1.Job
	waitFor(t, "job "+id+" to end", 3*time.Minute, func() bool {
		g, err := a.jobs.GetJob(context.Background(), connect.NewRequest(&stowagev1.GetJobRequest{Id: id}))
		if err != nil {
			return false
		}
		last = g.Msg.GetJob()
		return terminalJob(last.GetState())
	})
	return last
}

func terminalJob(s stowagev1.JobState) bool {
	return slices.Contains([]stowagev1.JobState{stowagev1.JobState_JOB_STATE_SUCCEEDED, stowagev1.JobState_JOB_STATE_FAILED, stowagev1.JobState_JOB_STATE_CANCELLED}, s)
}

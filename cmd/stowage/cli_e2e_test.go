package main

// Every CLI command as a real process against a real controller (issue 14,
// "tests that cannot lie"): one controller and one agent; the test runs
// each leaf command of the cobra tree at least once through the stowage
// binary, decodes its -o json output into the API's types and asserts
// real fields, and for each command group checks one bad input's exit code
// and error text. A command added to the tree without a run here (or an
// exemption naming where it is covered) fails the test.

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// cliExempt lists the commands (and whole subtrees) TestEveryCLICommand
// does not run, each with where it is covered instead.
var cliExempt = map[string]string{
	"stowage agent":      "a server: every end-to-end test starts agents (agentProc)",
	"stowage controller": "a server: every end-to-end test starts one (controllerProc)",
	"stowage dev":        "a server (controller and agent in one process): dev_test.go",
	"stowage completion": "cobra's generated shell completion scripts",
	"stowage help":       "cobra's generated help",
	"stowage metadata":   "backup, verify and restore across a controller restart: metadata_e2e_test.go",
	// Placement, with two agents and a slow task to drain: placement_e2e_test.go.
	"stowage store disable":        "TestPlacementEndToEnd",
	"stowage store enable":         "TestPlacementEndToEnd",
	"stowage store update":         "TestPlacementEndToEnd",
	"stowage host maintain":        "TestPlacementEndToEnd",
	"stowage host cancel-maintain": "TestPlacementEndToEnd",
}

// cliSession runs CLI commands against one controller and records which
// commands of the tree ran.
type cliSession struct {
	t      *testing.T
	server string
	root   *cobra.Command
	ran    map[string]bool
}

func newCLISession(t *testing.T, server string) *cliSession {
	return &cliSession{t: t, server: server, root: newRootCmd(), ran: map[string]bool{}}
}

// note records the command args name.
func (s *cliSession) note(args []string) {
	if c, _, err := s.root.Find(args); err == nil {
		s.ran[c.CommandPath()] = true
	}
}

// run runs the stowage binary with args; it returns stdout, stderr and the exit code.
func (s *cliSession) run(args ...string) (string, string, int) {
	s.t.Helper()
	s.note(args)
	start := time.Now()
	defer func() {
		if d := time.Since(start); d > 500*time.Millisecond {
			s.t.Logf("stowage %s took %s", strings.Join(args, " "), d.Round(time.Millisecond))
		}
	}()
	return cli(s.t, s.server, args...)
}

// json runs args with -o json, wants exit 0 and decodes stdout into m.
func (s *cliSession) json(m proto.Message, args ...string) {
	s.t.Helper()
	out, errOut, code := s.run(append(args, "-o", "json")...)
	if code != 0 {
		s.t.Fatalf("stowage %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	if err := protojson.Unmarshal([]byte(out), m); err != nil {
		s.t.Fatalf("stowage %s: %v in %s", strings.Join(args, " "), err, out)
	}
}

// wait runs a job-starting command with --wait -o json, wants its job to
// succeed, decodes the object printed with it into obj (nil: none) and
// returns the job.
func (s *cliSession) wait(obj proto.Message, args ...string) *stowagev1.Job {
	s.t.Helper()
	out, errOut, code := s.run(append(args, "--wait", "-o", "json")...)
	if code != 0 {
		s.t.Fatalf("stowage %s --wait: exit %d: %s%s", strings.Join(args, " "), code, errOut, out)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal([]byte(out), &fields); err != nil {
		s.t.Fatalf("stowage %s --wait: %v in %s", strings.Join(args, " "), err, out)
	}
	job := &stowagev1.Job{}
	if err := protojson.Unmarshal(fields["job"], job); err != nil || job.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED || job.GetId() == "" {
		s.t.Fatalf("stowage %s --wait: job %v (%v) in %s", strings.Join(args, " "), job, err, out)
	}
	delete(fields, "job")
	if obj != nil {
		b, _ := json.Marshal(fields)
		if err := protojson.Unmarshal(b, obj); err != nil {
			s.t.Fatalf("stowage %s --wait: %v in %s", strings.Join(args, " "), err, out)
		}
	}
	return job
}

// fails runs args and wants exit code exit with want in stderr.
func (s *cliSession) fails(exit int, want string, args ...string) {
	s.t.Helper()
	_, errOut, code := s.run(args...)
	if code != exit || !strings.Contains(errOut, want) {
		s.t.Errorf("stowage %s: exit %d (want %d), stderr %q (want %q)", strings.Join(args, " "), code, exit, errOut, want)
	}
}

// start starts a long-running command (a server) of the tree as a process.
func (s *cliSession) start(name string, args ...string) *proc {
	s.t.Helper()
	s.note(args)
	return startProc(s.t, name, args...)
}

// cliLeaves lists the command paths of the runnable leaves of c's tree, with
// cobra's generated help and completion commands as the binary has them.
func cliLeaves(c *cobra.Command) []string {
	var out []string
	var walk func(*cobra.Command)
	walk = func(c *cobra.Command) {
		if !c.HasSubCommands() {
			out = append(out, c.CommandPath())
			return
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(c)
	return out
}

// checkCoverage fails the test for a leaf command that neither ran nor is
// exempt, and for an exemption that names no command.
func (s *cliSession) checkCoverage() {
	s.t.Helper()
	root := newRootCmd()
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
	leaves := cliLeaves(root)
	exempt := func(path string) bool {
		for e := range cliExempt {
			if path == e || strings.HasPrefix(path, e+" ") {
				return true
			}
		}
		return false
	}
	var missing []string
	for _, l := range leaves {
		if !s.ran[l] && !exempt(l) {
			missing = append(missing, l)
		}
	}
	if len(missing) > 0 {
		s.t.Errorf("CLI commands not run by this test (run them here, or list them in cliExempt with where they are covered):\n  %s", strings.Join(missing, "\n  "))
	}
	for e := range cliExempt {
		if !slices.ContainsFunc(leaves, func(l string) bool { return l == e || strings.HasPrefix(l, e+" ") }) {
			s.t.Errorf("cliExempt names %q, which is not a command", e)
		}
	}
	s.t.Logf("%d leaf commands: %d run, %d exempt", len(leaves), len(s.ran), len(leaves)-len(missing)-len(s.ran))
}

func TestEveryCLICommand(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "qemu-img", "qemu-io", "nbdinfo")
	root := t.TempDir()

	// The template (64 MiB qcow2 with known data) and a slow one to cancel.
	web, qcow := patternedQcow2(t, root, "write -P 0x33 10M 2M")
	slowFile := filepath.Join(web, "slow.raw")
	if err := os.WriteFile(slowFile, bytes.Repeat([]byte{0x11}, 64<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/t/", http.StripPrefix("/t/", http.FileServer(http.Dir(web))))
	mux.Handle("/slow/slow.raw", slowHandler(slowFile))
	web0 := httptest.NewServer(mux)
	defer web0.Close()

	addr := freePort(t)
	server := "https://" + addr
	ctlDir := filepath.Join(root, "controller")
	ctl := controllerProc(t, addr, ctlDir)
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"))
	waitFor(t, "h1 Up", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	s := newCLISession(t, server)

	// host
	var hosts stowagev1.ListHostsResponse
	s.json(&hosts, "host", "list")
	if len(hosts.GetHosts()) != 1 || hosts.GetHosts()[0].GetId() != "h1" || hosts.GetHosts()[0].GetState() != stowagev1.HostState_HOST_STATE_UP {
		t.Fatalf("host list: %v", &hosts)
	}
	var host stowagev1.Host
	s.json(&host, "host", "get", "h1")
	if host.GetZone() != "z1" || host.GetCluster() != "c1" || host.GetAgentUrl() == "" {
		t.Errorf("host get h1: %v", &host)
	}
	var jt stowagev1.CreateJoinTokenResponse
	s.json(&jt, "host", "token", "create", "--ttl", "5m", "--host", "h9")
	if !strings.HasPrefix(jt.GetToken(), "stj_") || !strings.HasPrefix(jt.GetCaPin(), "sha256:") {
		t.Errorf("host token create: %v", &jt)
	}
	s.fails(3, "no host", "host", "get", "no-such-host")

	// store
	var img, p1, p2, tmp stowagev1.DataStore
	addStoreCLI := func(st *stowagev1.DataStore, name, role string) {
		t.Helper()
		s.json(st, "store", "add", "--name", name, "--role", role, "--provider", "filesystem", "--url", "file://"+filepath.Join(root, name), "--scope", "z1")
		if st.GetName() != name || st.GetId() == "" || st.GetState() != stowagev1.StoreState_STORE_STATE_UP || !slices.Equal(st.GetHostIds(), []string{"h1"}) {
			t.Fatalf("store add %s: %v", name, st)
		}
	}
	addStoreCLI(&img, "img", "image")
	addStoreCLI(&p1, "p1", "primary")
	addStoreCLI(&p2, "p2", "primary")
	addStoreCLI(&tmp, "tmp", "primary")
	var stores stowagev1.ListStoresResponse
	s.json(&stores, "store", "list")
	if len(stores.GetStores()) != 4 {
		t.Errorf("store list: %d stores, want 4", len(stores.GetStores()))
	}
	var st stowagev1.DataStore
	s.json(&st, "store", "get", "p1")
	if st.GetId() != p1.GetId() || st.GetRole() != stowagev1.StoreRole_STORE_ROLE_PRIMARY {
		t.Errorf("store get p1: %v", &st)
	}
	s.json(&st, "store", "maintain", "tmp")
	if st.GetState() != stowagev1.StoreState_STORE_STATE_MAINTENANCE {
		t.Errorf("store maintain: %v", &st)
	}
	s.json(&st, "store", "cancel-maintain", "tmp")
	if st.GetState() != stowagev1.StoreState_STORE_STATE_UP {
		t.Errorf("store cancel-maintain: %v", &st)
	}
	if _, errOut, code := s.run("store", "delete", "tmp"); code != 0 {
		t.Fatalf("store delete tmp: exit %d %s", code, errOut)
	}
	s.fails(3, "no store has that id or name", "store", "get", "tmp")

	// template
	var reg stowagev1.GetTemplateResponse
	regJob := s.wait(&reg, "template", "register", "--name", "t1", "--url", web0.URL+"/t/base.qcow2", "--format", "qcow2",
		"--checksum", "sha256:"+sha256File(t, qcow))
	tmpl := reg.GetTemplate()
	if tmpl.GetName() != "t1" || tmpl.GetVirtualSize() != 64<<20 || tmpl.GetFormat() != stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2 ||
		len(reg.GetStores()) != 1 || reg.GetStores()[0].GetState() != stowagev1.ObjectState_OBJECT_STATE_READY || reg.GetStores()[0].GetStoreId() != img.GetId() {
		t.Fatalf("template register: %v", &reg)
	}
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", qcow, filepath.Join(img.GetDetails()["path"], reg.GetStores()[0].GetInstallPath()))
	var tl stowagev1.ListTemplatesResponse
	s.json(&tl, "template", "list")
	if len(tl.GetTemplates()) != 1 || tl.GetTemplates()[0].GetId() != tmpl.GetId() {
		t.Errorf("template list: %v", &tl)
	}
	var tg stowagev1.GetTemplateResponse
	s.json(&tg, "template", "get", "t1")
	if tg.GetTemplate().GetId() != tmpl.GetId() || tg.GetTemplate().GetChecksum() != "sha256:"+sha256File(t, qcow) {
		t.Errorf("template get t1: %v", &tg)
	}
	s.fails(3, "not found", "template", "get", "no-such-template")
	s.fails(2, "--checksum", "template", "register", "--name", "x", "--url", web0.URL+"/t/base.qcow2", "--format", "qcow2", "--checksum", "sha256:12")
	s.fails(2, "checksum", "template", "register", "--name", "x", "--url", web0.URL+"/t/base.qcow2", "--format", "qcow2")

	// volume
	var vr stowagev1.GetVolumeResponse
	s.wait(&vr, "volume", "create", "--name", "v1", "--template", "t1", "--store", "p1")
	vol := vr.GetVolume()
	if vol.GetName() != "v1" || vol.GetState() != stowagev1.VolumeState_VOLUME_STATE_READY || vol.GetSize() != 64<<20 ||
		vol.GetStoreId() != p1.GetId() || vol.GetTemplateId() != tmpl.GetId() {
		t.Fatalf("volume create: %v", vol)
	}
	volPath := func(v *stowagev1.Volume, st *stowagev1.DataStore) string {
		return filepath.Join(st.GetDetails()["path"], v.GetInstallPath())
	}
	run(t, "qemu-img", "compare", "-F", "qcow2", qcow, volPath(vol, &p1))
	var vl stowagev1.ListVolumesResponse
	s.json(&vl, "volume", "list", "--store", p1.GetId())
	if len(vl.GetVolumes()) != 1 || vl.GetVolumes()[0].GetId() != vol.GetId() {
		t.Errorf("volume list: %v", &vl)
	}
	s.json(&vr, "volume", "get", vol.GetId())
	if vr.GetVolume().GetId() != vol.GetId() || vr.GetVolume().GetInstallPath() != vol.GetInstallPath() {
		t.Errorf("volume get: %v", &vr)
	}
	s.wait(&vr, "volume", "resize", vol.GetId(), "--size", "128M")
	if vr.GetVolume().GetSize() != 128<<20 {
		t.Errorf("volume resize: size %d, want 128 MiB", vr.GetVolume().GetSize())
	}
	var acc stowagev1.GrantAccessResponse
	s.json(&acc, "volume", "access", vol.GetId(), "--host", "h1")
	if acc.GetUri() != "file://"+volPath(vol, &p1) {
		t.Errorf("volume access: %q, want file://%s", acc.GetUri(), volPath(vol, &p1))
	}
	var rev stowagev1.RevokeAccessResponse
	s.json(&rev, "volume", "access", vol.GetId(), "--host", "h1", "--revoke")
	s.fails(3, "not found", "volume", "get", "no-such-volume")
	s.fails(2, "--size", "volume", "create", "--name", "x")
	s.fails(2, "--size", "volume", "resize", vol.GetId(), "--size", "-1G")

	// snapshot
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", volPath(vol, &p1))
	var sr stowagev1.GetSnapshotResponse
	s.wait(&sr, "snapshot", "take", vol.GetId(), "--name", "s1")
	snap := sr.GetSnapshot()
	if snap.GetName() != "s1" || snap.GetVolumeId() != vol.GetId() || snap.GetState() != stowagev1.SnapshotState_SNAPSHOT_STATE_CREATED_ON_PRIMARY {
		t.Fatalf("snapshot take: %v", &sr)
	}
	var sl stowagev1.ListSnapshotsResponse
	s.json(&sl, "snapshot", "list", "--volume", vol.GetId())
	if len(sl.GetSnapshots()) != 1 || sl.GetSnapshots()[0].GetId() != snap.GetId() {
		t.Errorf("snapshot list: %v", &sl)
	}
	s.json(&sr, "snapshot", "get", snap.GetId())
	if sr.GetSnapshot().GetId() != snap.GetId() {
		t.Errorf("snapshot get: %v", &sr)
	}
	s.wait(&sr, "snapshot", "backup", snap.GetId(), "--store", "img")
	backedUp := false
	for _, o := range sr.GetStores() {
		backedUp = backedUp || o.GetRole() == stowagev1.StoreRole_STORE_ROLE_IMAGE && o.GetStoreId() == img.GetId() &&
			o.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY && o.GetNewBytes() > 0
	}
	if !backedUp {
		t.Errorf("snapshot backup: no Ready copy with new bytes on the image store: %v", &sr)
	}
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xcd 0 64k", volPath(vol, &p1))
	s.wait(nil, "snapshot", "revert", snap.GetId())
	if out := run(t, "qemu-io", "-f", "qcow2", "-c", "read -P 0xab 0 64k", volPath(vol, &p1)); strings.Contains(out, "Pattern verification failed") {
		t.Errorf("after snapshot revert: %s", out)
	}
	s.fails(3, "not found", "snapshot", "get", "no-such-snapshot")
	s.fails(3, "not found", "snapshot", "take", "no-such-volume")

	// A template from the volume, then the snapshot goes.
	var t2 stowagev1.GetTemplateResponse
	s.wait(&t2, "template", "create", "--name", "t2", "--volume", vol.GetId())
	if t2.GetTemplate().GetName() != "t2" || t2.GetTemplate().GetSourceVolumeId() != vol.GetId() || t2.GetTemplate().GetVirtualSize() != 128<<20 {
		t.Errorf("template create: %v", &t2)
	}
	s.fails(2, "exactly one source", "template", "create", "--name", "t3")
	// Read access to the snapshot: its file for h1, which reaches p1; no
	// snapshot of the volume is deleted while it is held.
	var sacc stowagev1.GrantSnapshotAccessResponse
	s.json(&sacc, "snapshot", "access", snap.GetId(), "--host", "h1")
	if !strings.HasPrefix(sacc.GetUri(), "file://"+p1.GetDetails()["path"]) {
		t.Errorf("snapshot access: %q, want a file of p1", sacc.GetUri())
	}
	s.fails(5, "revoke that first", "snapshot", "delete", snap.GetId())
	var srev stowagev1.RevokeSnapshotAccessResponse
	s.json(&srev, "snapshot", "access", snap.GetId(), "--host", "h1", "--revoke")
	// The volume's overlay reads through the snapshot, which reads through
	// the template's copy on p1 (a linked clone): deleting it merges it
	// out of the chain onto that copy, and its file goes.
	dj := s.wait(nil, "snapshot", "delete", snap.GetId())
	if _, errOut, code := s.run("snapshot", "get", snap.GetId(), "-o", "json"); code != 3 || !strings.Contains(errOut, "not found") {
		t.Errorf("snapshot get after its delete (job result %q): exit %d, %s; want not found (merged)", dj.GetResult(), code, errOut)
	}
	if !strings.Contains(dj.GetResult(), "merged") || !strings.Contains(dj.GetResult(), "copy on the store") {
		t.Errorf("snapshot delete: %q, want it merged onto the template's copy", dj.GetResult())
	}
	if out := run(t, "qemu-io", "-f", "qcow2", "-c", "read -P 0xab 0 64k", volPath(vol, &p1)); strings.Contains(out, "Pattern verification failed") {
		t.Errorf("after the merge: %s", out)
	}

	// A blank volume migrates to another store; both volumes go.
	var br stowagev1.GetVolumeResponse
	s.wait(&br, "volume", "create", "--name", "blank", "--size", "16M", "--store", "p1", "--format", "raw")
	blank := br.GetVolume()
	if blank.GetSize() != 16<<20 || blank.GetFormat() != stowagev1.ImageFormat_IMAGE_FORMAT_RAW || blank.GetStoreId() != p1.GetId() {
		t.Fatalf("blank volume create: %v", blank)
	}
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x42 1M 64k", volPath(blank, &p1))
	s.wait(&br, "volume", "migrate", blank.GetId(), "--store", "p2")
	if br.GetVolume().GetStoreId() != p2.GetId() || br.GetVolume().GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
		t.Fatalf("volume migrate: %v", &br)
	}
	if out := run(t, "qemu-io", "-f", "raw", "-c", "read -P 0x42 1M 64k", volPath(br.GetVolume(), &p2)); strings.Contains(out, "Pattern verification failed") {
		t.Errorf("after migrate: %s", out)
	}
	if _, err := os.Stat(volPath(blank, &p1)); !os.IsNotExist(err) {
		t.Errorf("the migrated volume's source remains: %v", err)
	}
	s.fails(3, "not found", "volume", "migrate", blank.GetId(), "--store", "no-such-store")
	for _, v := range []*stowagev1.Volume{vol, br.GetVolume()} {
		st := &p1
		if v == br.GetVolume() {
			st = &p2
		}
		s.wait(nil, "volume", "delete", v.GetId())
		var g stowagev1.GetVolumeResponse
		s.json(&g, "volume", "get", v.GetId())
		if g.GetVolume().GetState() != stowagev1.VolumeState_VOLUME_STATE_EXPUNGED {
			t.Errorf("volume delete: the volume is %s, want Expunged", g.GetVolume().GetState())
		}
		if _, err := os.Stat(volPath(v, st)); !os.IsNotExist(err) {
			t.Errorf("the deleted volume's file remains: %v", err)
		}
	}
	for _, id := range []string{t2.GetTemplate().GetId(), tmpl.GetId()} {
		s.wait(nil, "template", "delete", id)
		s.fails(3, "not found", "template", "get", id)
	}

	// job: list, get, watch, and cancel a slow download mid-way.
	var jl stowagev1.ListJobsResponse
	s.json(&jl, "job", "list", "--target", tmpl.GetId(), "--state", "succeeded")
	if len(jl.GetJobs()) == 0 || !slices.ContainsFunc(jl.GetJobs(), func(j *stowagev1.Job) bool { return j.GetId() == regJob.GetId() }) {
		t.Errorf("job list --target %s: %v", tmpl.GetId(), &jl)
	}
	var jg stowagev1.GetJobResponse
	s.json(&jg, "job", "get", regJob.GetId())
	if jg.GetJob().GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED || jg.GetJob().GetTargetId() != tmpl.GetId() || len(jg.GetJob().GetPlan().GetSteps()) == 0 {
		t.Errorf("job get: %v", &jg)
	}
	if out, errOut, code := s.run("job", "watch", regJob.GetId()); code != 0 || !strings.Contains(out, "succeeded") {
		t.Errorf("job watch of a finished job: exit %d %s %s", code, out, errOut)
	}
	var slowReg stowagev1.RegisterTemplateResponse
	s.json(&slowReg, "template", "register", "--name", "slow", "--url", web0.URL+"/slow/slow.raw", "--format", "raw",
		"--checksum", "sha256:"+sha256File(t, slowFile))
	slowJob := slowReg.GetJob().GetId()
	waitFor(t, "the slow download to start", 30*time.Second, func() bool {
		var g stowagev1.GetJobResponse
		s.json(&g, "job", "get", slowJob)
		return g.GetJob().GetProgress().GetBytesDone() > 0
	})
	var cj stowagev1.CancelJobResponse
	s.json(&cj, "job", "cancel", slowJob)
	if cj.GetJob().GetId() != slowJob || cj.GetJob().GetState() == stowagev1.JobState_JOB_STATE_SUCCEEDED {
		t.Errorf("job cancel: %v", &cj)
	}
	if _, errOut, code := s.run("job", "watch", slowJob); code != 130 || !strings.Contains(errOut, "cancelled") {
		t.Errorf("job watch of a cancelled job: exit %d (want 130) %s", code, errOut)
	}
	var sg stowagev1.GetTemplateResponse
	s.json(&sg, "template", "get", "slow")
	for _, o := range sg.GetStores() {
		if o.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY {
			t.Errorf("the cancelled download was published on %s: %v", o.GetStoreId(), o)
		}
	}
	s.fails(5, "cannot be cancelled", "job", "cancel", regJob.GetId())
	s.fails(3, "no such job", "job", "get", "no-such-job")
	s.fails(2, "--state", "job", "list", "--state", "sideways")

	// token
	var tokens stowagev1.ListTokensResponse
	s.json(&tokens, "token", "list")
	if !slices.ContainsFunc(tokens.GetTokens(), func(tk *stowagev1.Token) bool { return tk.GetRole() == stowagev1.TokenRole_TOKEN_ROLE_ADMIN }) {
		t.Errorf("token list has no admin token: %v", &tokens)
	}
	var tc stowagev1.CreateTokenResponse
	s.json(&tc, "token", "create", "--name", "ro", "--role", "reader", "--ttl", "1h")
	if tc.GetSecret() == "" || tc.GetToken().GetName() != "ro" || tc.GetToken().GetRole() != stowagev1.TokenRole_TOKEN_ROLE_READER || tc.GetToken().GetExpiresAt() == nil {
		t.Errorf("token create: %v", tc.GetToken())
	}
	if _, errOut, code := cliAs(t, server, tc.GetSecret(), "volume", "list"); code != 0 {
		t.Errorf("the reader token cannot list volumes: exit %d %s", code, errOut)
	}
	var tr stowagev1.RevokeTokenResponse
	s.json(&tr, "token", "revoke", tc.GetToken().GetId())
	if !tr.GetToken().GetRevoked() {
		t.Errorf("token revoke: %v", tr.GetToken())
	}
	if _, errOut, code := cliAs(t, server, tc.GetSecret(), "volume", "list"); code != 8 {
		t.Errorf("a revoked token still works: exit %d (want 8) %s", code, errOut)
	}
	s.fails(3, "not found", "token", "revoke", "no-such-token")
	s.fails(2, "role", "token", "create", "--name", "x", "--role", "emperor")

	// copy and verify, on local files.
	dir := filepath.Join(root, "local")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(dir, "src.raw")
	data := writeImage(t, src, 8<<20)
	dst := filepath.Join(dir, "dst.raw")
	out, errOut, code := s.run("copy", "--sha256", "-o", "json", src, dst)
	var cs struct {
		Source, Destination string
		Size                int64
		SHA256              string
	}
	if err := json.Unmarshal([]byte(out), &cs); code != 0 || err != nil || cs.Size != int64(len(data)) || cs.SHA256 != sum(data) || cs.Destination != dst {
		t.Errorf("copy: exit %d %v %+v %s", code, err, cs, errOut)
	}
	if fileSum(t, dst) != sum(data) {
		t.Errorf("copy: the destination differs from the source")
	}
	out, errOut, code = s.run("verify", "-o", "json", src, dst)
	var vres struct {
		Equal     bool  `json:"equal"`
		FirstDiff int64 `json:"first_difference"`
		SizeA     int64 `json:"size_a"`
	}
	if err := json.Unmarshal([]byte(out), &vres); code != 0 || err != nil || !vres.Equal || vres.FirstDiff != -1 || vres.SizeA != int64(len(data)) {
		t.Errorf("verify equal: exit %d %v %+v %s", code, err, vres, errOut)
	}
	s.fails(3, "no such file", "copy", filepath.Join(dir, "missing.raw"), filepath.Join(dir, "x.raw"))
	if f, err := os.OpenFile(dst, os.O_RDWR, 0); err == nil {
		f.WriteAt([]byte{data[5000] ^ 1}, 5000)
		f.Close()
	}
	s.fails(7, "", "verify", src, dst)

	// nbd serve: export a file on a unix socket, read it with nbdinfo.
	sock := filepath.Join(dir, "nbd.sock")
	nbdSrv := s.start("nbd serve", "nbd", "serve", "--unix", sock, "--name", "e1", "--read-only", src)
	var info struct {
		Exports []struct {
			Name     string `json:"export-name"`
			Size     int64  `json:"export-size"`
			ReadOnly bool   `json:"is_read_only"`
		} `json:"exports"`
	}
	waitFor(t, "nbd serve's socket", 20*time.Second, func() bool {
		b, err := exec.Command("nbdinfo", "--json", "nbd+unix:///e1?socket="+sock).Output()
		return err == nil && json.Unmarshal(b, &info) == nil
	})
	if len(info.Exports) != 1 || info.Exports[0].Size != int64(len(data)) || !info.Exports[0].ReadOnly {
		t.Errorf("nbdinfo of nbd serve: %+v", info)
	}
	if b, err := exec.Command("nbdcopy", "nbd+unix:///e1?socket="+sock, "-").Output(); err != nil || sum(b) != sum(data) {
		t.Errorf("nbdcopy from nbd serve: %v, same bytes %v", err, sum(b) == sum(data))
	}
	nbdSrv.kill(syscall.SIGTERM)
	s.fails(2, "exclusive", "nbd", "serve", "--unix", sock, "--listen", "127.0.0.1:0", src)

	// cache: status without a cache process, then (as root with FUSE)
	// mount, serve and status.
	s.fails(6, "template mount", "cache", "status", "--socket", filepath.Join(dir, "none.sock"))
	s.fails(3, "SRC", "cache", "mount", filepath.Join(dir, "missing"), filepath.Join(dir, "mnt"))
	t.Run("cache", func(t *testing.T) {
		needFUSE(t)
		s := &cliSession{t: t, server: server, root: s.root, ran: s.ran}
		mnt := filepath.Join(dir, "mnt")
		if err := os.Mkdir(mnt, 0o755); err != nil {
			t.Fatal(err)
		}
		m := s.start("cache mount", "cache", "mount", "--cache-dir", filepath.Join(dir, "cm"), src, mnt)
		t.Cleanup(func() { m.kill(syscall.SIGTERM); _ = unix.Unmount(mnt, unix.MNT_DETACH) })
		waitFor(t, "cache mount's MOUNTED line", 20*time.Second, func() bool { return strings.Contains(m.log.String(), "MOUNTED") })
		if fileSum(t, filepath.Join(mnt, "src.raw")) != sum(data) {
			t.Errorf("cache mount: the mounted file differs from the source")
		}
		m.kill(syscall.SIGTERM)
		if !strings.Contains(m.log.String(), "READS=") {
			t.Errorf("cache mount printed no READS= at exit: %s", m.log.String())
		}
		s.note([]string{"cache", "serve"})
		c := startCache(t, "cache serve", filepath.Join(dir, "cs"))
		var cst stowagev1.CacheStatus
		s.json(&cst, "cache", "status", "--socket", c.socket)
		if cst.GetMount() != c.mount || len(cst.GetTemplates()) != 0 {
			t.Errorf("cache status: %v", &cst)
		}
	})

	// token reset-admin, offline: the controller stopped.
	ctl.kill(syscall.SIGTERM)
	recovery := filepath.Join(root, "recovery.token")
	if out, errOut, code := s.run("token", "reset-admin", "--data-dir", ctlDir, "--out", recovery); code != 0 || !strings.Contains(out, recovery) {
		t.Errorf("token reset-admin: exit %d %s %s", code, out, errOut)
	}
	if fi, err := os.Stat(recovery); err != nil || fi.Mode().Perm() != 0o600 || fi.Size() == 0 {
		t.Errorf("the recovery token: %v %v", fi, err)
	}

	s.checkCoverage()
}

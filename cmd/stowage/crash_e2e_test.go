package main

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/datapath/chunkstore"
	"github.com/stowage/stowage/datapath/iscsi/tgttest"
	"github.com/stowage/stowage/failpoint"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// crashCell is one (workflow, failpoint, process) cell of the crash matrix.
// A metadata failpoint fires at every workflow transaction: skip says how
// many pass before the one that kills (the cell's point is shown as
// metaAfterCommit#skip).
type crashCell struct {
	workflow, point, process string
	skip                     int
}

func (c crashCell) pointName() string {
	if c.point == failpoint.MetaBeforeCommit || c.point == failpoint.MetaAfterCommit {
		return fmt.Sprintf("%s#%d", c.point, c.skip)
	}
	return c.point
}

// metaDepth is how many workflow transactions the matrix kills at, per
// workflow and metadata failpoint (cells past a workflow's last
// transaction are skipped when seen).
const metaDepth = 12

// crashWorld is a controller, two agents and three stores whose processes
// the matrix kills and restarts.
type crashWorld struct {
	t                  *testing.T
	root, addr, server string
	ctl, h1, h2        *proc
	ctlHTTP, h1HTTP    string // gofail's HTTP endpoints
	h2HTTP             string
	h1Listen, h2Listen string // the agents' addresses, the same across restarts
	a                  *clientAPI
	img, p1, p2        *stowagev1.DataStore
	san                *stowagev1.DataStore // an iSCSI store: LUNs on tgtd, target host h1
	sanDir, iqn        string
	tgtCtl             int
	tmpl               string
	base               string // the template's bytes (qcow2) every object here must read as
	n                  int
	// checked maps a file found whole to its size and modification time
	// then: unchanged files are not read again at every cell.
	checked map[string]string
}

// startController starts the controller with an orphan reconciler that
// removes what it finds at once (no grace) every second: the matrix also
// proves it never takes what a recovering workflow still needs.
func (w *crashWorld) startController() {
	w.ctl = controllerProcEnv(w.t, []string{"GOFAIL_HTTP=" + w.ctlHTTP}, w.addr, filepath.Join(w.root, "ctl"),
		"--orphan-grace", "0s", "--orphan-interval", "1s")
}

func (w *crashWorld) startAgent() {
	w.h1 = agentProcEnv(w.t, []string{"GOFAIL_HTTP=" + w.h1HTTP}, w.server, "h1", "z1", "c1", filepath.Join(w.root, "a1"), "--listen", w.h1Listen,
		"--iscsi-target", "--tgt-control-port", strconv.Itoa(w.tgtCtl))
	waitFor(w.t, "h1 Up", 30*time.Second, func() bool { return hostState(w.t, w.server, "h1") == "HOST_STATE_UP" })
}

func (w *crashWorld) startAgent2() {
	w.h2 = agentProcEnv(w.t, []string{"GOFAIL_HTTP=" + w.h2HTTP}, w.server, "h2", "z1", "c1", filepath.Join(w.root, "a2"), "--listen", w.h2Listen)
	waitFor(w.t, "h2 Up", 30*time.Second, func() bool { return hostState(w.t, w.server, "h2") == "HOST_STATE_UP" })
}

// arm sets a failpoint of a process to kill it the first time it is hit
// after skip passes.
func arm(t *testing.T, endpoint, point string, skip int) {
	t.Helper()
	terms := `1*return("kill")`
	if skip > 0 {
		terms = fmt.Sprintf("%d*off->%s", skip, terms)
	}
	// A process restarted by the previous cell may not serve its
	// failpoints yet: retry a refused connection for a while.
	var resp *http.Response
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		req, _ := http.NewRequest(http.MethodPut, "http://"+endpoint+"/"+point, strings.NewReader(terms))
		if resp, err = http.DefaultClient.Do(req); err == nil || !errors.Is(err, syscall.ECONNREFUSED) || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatalf("arm %s at %s: %v", point, endpoint, err)
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		t.Fatalf("arm %s at %s: HTTP %d", point, endpoint, resp.StatusCode)
	}
}

func disarm(endpoint, point string) {
	req, _ := http.NewRequest(http.MethodDelete, "http://"+endpoint+"/"+point, nil)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
	}
}

// workflows prepare what each needs and return the function that starts
// its job (the failpoint is armed in between).
func (w *crashWorld) workflows() map[string]func() func() *stowagev1.Job {
	ctx := context.Background()
	a := w.a
	vol := func(name string, f stowagev1.ImageFormat, strategy string, st *stowagev1.DataStore) *stowagev1.Volume {
		cv, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: name, TemplateId: w.tmpl, StoreId: st.GetId(), Format: f, Strategy: strategy}))
		if err != nil {
			w.t.Fatalf("volume %s: %v", name, err)
		}
		mustSucceed(w.t, a, cv.Msg.GetJob())
		return cv.Msg.GetVolume()
	}
	name := func(p string) string { w.n++; return fmt.Sprintf("%s-%d", p, w.n) }
	return map[string]func() func() *stowagev1.Job{
		"volume create (full)": func() func() *stowagev1.Job {
			return func() *stowagev1.Job {
				return begun(a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: name("full"), TemplateId: w.tmpl, StoreId: w.p1.GetId(), Strategy: "full"})))
			}
		},
		"volume create (linked)": func() func() *stowagev1.Job {
			return func() *stowagev1.Job {
				return begun(a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: name("linked"), TemplateId: w.tmpl, StoreId: w.p1.GetId(), Strategy: "linked"})))
			}
		},
		"snapshot take": func() func() *stowagev1.Job {
			v := vol(name("snapv"), stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, "linked", w.p1)
			return func() *stowagev1.Job {
				return begun(a.snapshots.TakeSnapshot(ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: v.GetId(), Name: "s"})))
			}
		},
		"snapshot delete (merge)": func() func() *stowagev1.Job {
			// s1 <- s2 <- volume, on the template's copy: deleting s2
			// rebases the volume onto s1; the matrix's other run of it
			// (s1) rebases s2 onto the template's copy.
			v := vol(name("mergev"), stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, "linked", w.p1)
			var snaps []*stowagev1.Snapshot
			for _, n := range []string{"s1", "s2"} {
				ts, err := a.snapshots.TakeSnapshot(ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: v.GetId(), Name: n}))
				if err != nil {
					w.t.Fatal(err)
				}
				mustSucceed(w.t, a, ts.Msg.GetJob())
				snaps = append(snaps, ts.Msg.GetSnapshot())
			}
			victim := snaps[w.n%2]
			return func() *stowagev1.Job {
				return begun(a.snapshots.DeleteSnapshot(ctx, connect.NewRequest(&stowagev1.DeleteSnapshotRequest{Id: victim.GetId()})))
			}
		},
		"snapshot backup": func() func() *stowagev1.Job {
			v := vol(name("bkv"), stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, "linked", w.p1)
			ts, err := a.snapshots.TakeSnapshot(ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: v.GetId(), Name: "s"}))
			if err != nil {
				w.t.Fatal(err)
			}
			mustSucceed(w.t, a, ts.Msg.GetJob())
			return func() *stowagev1.Job {
				return begun(a.snapshots.BackupSnapshot(ctx, connect.NewRequest(&stowagev1.BackupSnapshotRequest{Id: ts.Msg.GetSnapshot().GetId()})))
			}
		},
		"volume migrate": func() func() *stowagev1.Job {
			v := vol(name("migv"), stowagev1.ImageFormat_IMAGE_FORMAT_RAW, "full", w.p1)
			return func() *stowagev1.Job {
				return begun(a.volumes.MigrateVolume(ctx, connect.NewRequest(&stowagev1.MigrateVolumeRequest{Id: v.GetId(), StoreId: w.p2.GetId()})))
			}
		},
		"linked clone migrate": func() func() *stowagev1.Job {
			// The template cached on p2 too: the clone keeps its chain.
			vol(name("migbase"), stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, "linked", w.p2)
			v := vol(name("miglc"), stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, "linked", w.p1)
			return func() *stowagev1.Job {
				return begun(a.volumes.MigrateVolume(ctx, connect.NewRequest(&stowagev1.MigrateVolumeRequest{Id: v.GetId(), StoreId: w.p2.GetId()})))
			}
		},
		"volume resize": func() func() *stowagev1.Job {
			v := vol(name("rsv"), stowagev1.ImageFormat_IMAGE_FORMAT_RAW, "full", w.p1)
			return func() *stowagev1.Job {
				return begun(a.volumes.ResizeVolume(ctx, connect.NewRequest(&stowagev1.ResizeVolumeRequest{Id: v.GetId(), Size: 96 << 20})))
			}
		},
		"snapshot revert": func() func() *stowagev1.Job {
			v := vol(name("revv"), stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, "linked", w.p1)
			ts, err := a.snapshots.TakeSnapshot(ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: v.GetId(), Name: "s"}))
			if err != nil {
				w.t.Fatal(err)
			}
			mustSucceed(w.t, a, ts.Msg.GetJob())
			return func() *stowagev1.Job {
				return begun(a.snapshots.RevertSnapshot(ctx, connect.NewRequest(&stowagev1.RevertSnapshotRequest{Id: ts.Msg.GetSnapshot().GetId()})))
			}
		},
		"template from volume": func() func() *stowagev1.Job {
			v := vol(name("tplv"), stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, "linked", w.p1)
			return func() *stowagev1.Job {
				return begun(a.images.CreateTemplate(ctx, connect.NewRequest(&stowagev1.CreateTemplateRequest{Name: name("tpl"),
					Source: &stowagev1.CreateTemplateRequest_VolumeId{VolumeId: v.GetId()}})))
			}
		},
		"volume from backup": func() func() *stowagev1.Job {
			v := vol(name("rstv"), stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, "linked", w.p1)
			ts, err := a.snapshots.TakeSnapshot(ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: v.GetId(), Name: "s"}))
			if err != nil {
				w.t.Fatal(err)
			}
			mustSucceed(w.t, a, ts.Msg.GetJob())
			bs, err := a.snapshots.BackupSnapshot(ctx, connect.NewRequest(&stowagev1.BackupSnapshotRequest{Id: ts.Msg.GetSnapshot().GetId()}))
			if err != nil {
				w.t.Fatal(err)
			}
			mustSucceed(w.t, a, bs.Msg.GetJob())
			dv, err := a.volumes.DeleteVolume(ctx, connect.NewRequest(&stowagev1.DeleteVolumeRequest{Id: v.GetId()}))
			if err != nil {
				w.t.Fatal(err)
			}
			mustSucceed(w.t, a, dv.Msg.GetJob())
			return func() *stowagev1.Job {
				return begun(a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: name("restored"), SnapshotId: ts.Msg.GetSnapshot().GetId(), StoreId: w.p1.GetId()})))
			}
		},
		"volume create on a LUN": func() func() *stowagev1.Job {
			return func() *stowagev1.Job {
				return begun(a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: name("lun"), TemplateId: w.tmpl, StoreId: w.san.GetId()})))
			}
		},
		"volume delete on a LUN": func() func() *stowagev1.Job {
			v := vol(name("dellun"), stowagev1.ImageFormat_IMAGE_FORMAT_RAW, "", w.san)
			return func() *stowagev1.Job {
				return begun(a.volumes.DeleteVolume(ctx, connect.NewRequest(&stowagev1.DeleteVolumeRequest{Id: v.GetId()})))
			}
		},
		"volume delete": func() func() *stowagev1.Job {
			v := vol(name("delv"), stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, "linked", w.p1)
			return func() *stowagev1.Job {
				return begun(a.volumes.DeleteVolume(ctx, connect.NewRequest(&stowagev1.DeleteVolumeRequest{Id: v.GetId()})))
			}
		},
	}
}

// begun is the job a workflow's call started, or nil when the process
// died answering it (the job, if recorded, is found afterwards).
func begun[M any, PM interface {
	*M
	GetJob() *stowagev1.Job
}](r *connect.Response[M], err error) *stowagev1.Job {
	if err != nil {
		return nil
	}
	return PM(r.Msg).GetJob()
}

// ended says whether job has ended (as far as a live controller says).
func (w *crashWorld) ended(job *stowagev1.Job) bool {
	g, err := w.a.jobs.GetJob(context.Background(), connect.NewRequest(&stowagev1.GetJobRequest{Id: job.GetId()}))
	if err != nil {
		return false
	}
	switch g.Msg.GetJob().GetState() {
	case stowagev1.JobState_JOB_STATE_SUCCEEDED, stowagev1.JobState_JOB_STATE_FAILED, stowagev1.JobState_JOB_STATE_CANCELLED:
		return true
	}
	return false
}

// latestJob is the newest job (ids are time-ordered), or nil.
func (w *crashWorld) latestJob() *stowagev1.Job {
	js, err := w.a.jobs.ListJobs(context.Background(), connect.NewRequest(&stowagev1.ListJobsRequest{}))
	if err != nil || len(js.Msg.GetJobs()) == 0 {
		return nil
	}
	var newest *stowagev1.Job
	for _, j := range js.Msg.GetJobs() {
		if newest == nil || j.GetId() > newest.GetId() {
			newest = j
		}
	}
	return newest
}

// settle waits for job to end and checks the invariants after a crash:
// the job is not stuck (Succeeded, or Failed with a reason), no volume or
// snapshot is left in a transitional state, no temporary file is left in
// a store, and every Ready volume's image is whole (qemu-img check).
func (w *crashWorld) settle(job *stowagev1.Job) (string, error) {
	ctx := context.Background()
	var last *stowagev1.Job
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		g, err := w.a.jobs.GetJob(ctx, connect.NewRequest(&stowagev1.GetJobRequest{Id: job.GetId()}))
		if err == nil {
			last = g.Msg.GetJob()
			if s := last.GetState(); s == stowagev1.JobState_JOB_STATE_SUCCEEDED || s == stowagev1.JobState_JOB_STATE_FAILED || s == stowagev1.JobState_JOB_STATE_CANCELLED {
				break
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	if last == nil || (last.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED && last.GetState() != stowagev1.JobState_JOB_STATE_FAILED) {
		return "", fmt.Errorf("job %s stuck: %v", job.GetId(), last)
	}
	if last.GetState() == stowagev1.JobState_JOB_STATE_FAILED && last.GetError() == "" {
		return "", fmt.Errorf("job %s failed without a reason", job.GetId())
	}
	outcome := strings.ToLower(strings.TrimPrefix(last.GetState().String(), "JOB_STATE_"))
	if last.GetState() == stowagev1.JobState_JOB_STATE_FAILED {
		outcome += " (" + strings.ReplaceAll(last.GetError(), "|", "/") + ")"
	}
	// Transitional states settle (a failed step's object goes to Error or
	// is removed), give them a moment.
	var bad []string
	for i := 0; i < 50; i++ {
		bad = bad[:0]
		vs, err := w.a.volumes.ListVolumes(ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{}))
		if err != nil {
			return "", err
		}
		for _, v := range vs.Msg.GetVolumes() {
			switch v.GetState() {
			case stowagev1.VolumeState_VOLUME_STATE_READY, stowagev1.VolumeState_VOLUME_STATE_ALLOCATED, stowagev1.VolumeState_VOLUME_STATE_EXPUNGED,
				stowagev1.VolumeState_VOLUME_STATE_DESTROY, stowagev1.VolumeState_VOLUME_STATE_FAILED:
			default:
				bad = append(bad, fmt.Sprintf("volume %s %s", v.GetName(), v.GetState()))
			}
		}
		if len(bad) == 0 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if len(bad) > 0 {
		return outcome, fmt.Errorf("left in a transitional state: %v", bad)
	}
	var temps []string
	for _, st := range []*stowagev1.DataStore{w.img, w.p1, w.p2} {
		_ = filepath.WalkDir(st.GetDetails()["path"], func(p string, d os.DirEntry, err error) error {
			if err == nil && strings.HasPrefix(strings.TrimPrefix(d.Name(), "."), ".stowage-tmp-"[1:]) {
				temps = append(temps, p)
			}
			return nil
		})
	}
	if len(temps) > 0 {
		return outcome, fmt.Errorf("temporary files left: %v", temps)
	}
	// What the stores hold and what the records say agree once the orphan
	// reconciler (every second, no grace here) has had a few passes.
	var problems []string
	for i := 0; i < 40; i++ {
		if problems = w.storeInvariants(); len(problems) == 0 {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if len(problems) > 0 {
		return outcome, fmt.Errorf("stores and records disagree: %s", strings.Join(problems, "; "))
	}
	return outcome, nil
}

// TestCrashMatrix walks workflows × failpoints on their path × {controller,
// agent}: the process is killed with SIGKILL at the failpoint (gofail's
// return("kill")), restarted, and the invariants checked (settle). CI runs
// a sample chosen from the commit (STOWAGE_CRASH_SAMPLE cells, default 6);
// STOWAGE_CRASH_MATRIX=all runs every cell and prints the table.
func TestCrashMatrix(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "qemu-img", "qemu-io", "tgtadm")
	portal, tgtCtl := tgttest.Start(t)
	root := t.TempDir()
	web, qcow := patternedQcow2(t, root, "write -P 0x44 8M 2M")
	origin := httptest.NewServer(http.StripPrefix("/t/", http.FileServer(http.Dir(web))))
	defer origin.Close()
	w := &crashWorld{t: t, root: root, addr: freeAddr(t), ctlHTTP: freeAddr(t), h1HTTP: freeAddr(t), h2HTTP: freeAddr(t), h1Listen: freeAddr(t), h2Listen: freeAddr(t), tgtCtl: tgtCtl, checked: map[string]string{}}
	w.server = "https://" + w.addr
	w.startController()
	w.startAgent()
	w.startAgent2()
	w.a = newAPI(w.server)
	w.img = addStore(t, w.a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h1"})
	w.p1 = addStore(t, w.a, "p1", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p1"), &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h1"})
	w.p2 = addStore(t, w.a, "p2", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p2"), &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h2"})
	w.iqn, w.sanDir = "iqn.2026-12.org.stowage.test:crash", filepath.Join(root, "san")
	w.san = addISCSIStore(t, w.a, "san", portal, w.iqn, "h1", w.sanDir, &stowagev1.Scope{Zone: "z1", Cluster: "c1"})
	r, err := w.a.images.RegisterTemplate(context.Background(), connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "t", Url: origin.URL + "/t/base.qcow2",
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Checksum: "sha256:" + sha256File(t, qcow)}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, w.a, r.Msg.GetJob())
	w.tmpl = r.Msg.GetTemplate().GetId()
	w.base = qcow

	flows := w.workflows()
	var cells []crashCell
	for wf := range flows {
		for _, p := range failpoint.Controller {
			if p == failpoint.MetaBeforeCommit || p == failpoint.MetaAfterCommit {
				for k := 0; k < metaDepth; k++ {
					cells = append(cells, crashCell{wf, p, "controller", k})
				}
				continue
			}
			cells = append(cells, crashCell{workflow: wf, point: p, process: "controller"})
		}
		for _, p := range failpoint.Agent {
			cells = append(cells, crashCell{workflow: wf, point: p, process: "agent h1"}, crashCell{workflow: wf, point: p, process: "agent h2"})
		}
	}
	sort.Slice(cells, func(i, j int) bool {
		a, b := cells[i], cells[j]
		if x, y := a.workflow+a.point+a.process, b.workflow+b.point+b.process; x != y {
			return x < y
		}
		return a.skip < b.skip
	})
	if only := os.Getenv("STOWAGE_CRASH_ONLY"); only != "" {
		cells = slices.DeleteFunc(cells, func(c crashCell) bool { return !strings.Contains(c.workflow+" "+c.pointName()+" "+c.process, only) })
	} else if os.Getenv("STOWAGE_CRASH_MATRIX") != "all" {
		n := 6
		fmt.Sscan(os.Getenv("STOWAGE_CRASH_SAMPLE"), &n)
		head, _ := exec.Command("git", "rev-parse", "HEAD").Output()
		sum := sha256.Sum256(head)
		start := int(binary.BigEndian.Uint32(sum[:4]) % uint32(len(cells)))
		var sample []crashCell
		for i := 0; i < n && i < len(cells); i++ {
			sample = append(sample, cells[(start+i*(len(cells)/n+1))%len(cells)])
		}
		cells = sample
	}
	var table []string
	failed, onPath := 0, 0
	// A metadata failpoint not hit at skip k is not hit at any k' > k.
	pastPath := map[string]bool{}
	for _, c := range cells {
		if c.skip > 0 && pastPath[c.workflow+"\x00"+c.point] {
			continue
		}
		endpoint, p := w.ctlHTTP, &w.ctl
		switch c.process {
		case "agent h1":
			endpoint, p = w.h1HTTP, &w.h1
		case "agent h2":
			endpoint, p = w.h2HTTP, &w.h2
		}
		start := flows[c.workflow]()
		before := w.latestJob()
		arm(t, endpoint, c.point, c.skip)
		job := start()
		// Until the process dies at the failpoint, or the job ends without
		// passing it.
		killed := false
		for deadline := time.Now().Add(60 * time.Second); !killed && time.Now().Before(deadline); {
			select {
			case <-(*p).done:
				killed = true
				continue
			case <-time.After(100 * time.Millisecond):
			}
			if job != nil && w.ended(job) {
				select {
				case <-(*p).done:
					killed = true
				case <-time.After(300 * time.Millisecond):
				}
				break
			}
		}
		if job == nil && !killed {
			t.Fatalf("%v: starting the workflow failed and no process died", c)
		}
		if !killed {
			// Not on this workflow's path (or not reached in time).
			disarm(endpoint, c.point)
			pastPath[c.workflow+"\x00"+c.point] = true
			table = append(table, fmt.Sprintf("| %s | %s | %s | not on the path | - |", c.workflow, c.pointName(), c.process))
			_, _ = w.settle(job)
			continue
		}
		onPath++
		if ws, ok := (*p).cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
			t.Errorf("%v: the process ended but not by SIGKILL: %v", c, (*p).cmd.ProcessState)
		}
		restarted := time.Now()
		switch c.process {
		case "controller":
			w.startController()
		case "agent h1":
			w.startAgent()
		default:
			w.startAgent2()
		}
		if job == nil {
			// Killed while answering the call that started the job: it is
			// the newest job, if the controller recorded it at all.
			if job = w.latestJob(); job == nil || job.GetId() == before.GetId() {
				table = append(table, fmt.Sprintf("| %s | %s | %s | killed before the job was recorded: nothing to recover | %s |", c.workflow, c.pointName(), c.process, time.Since(restarted).Round(100*time.Millisecond)))
				continue
			}
		}
		outcome, err := w.settle(job)
		took := time.Since(restarted).Round(100 * time.Millisecond)
		if err != nil {
			failed++
			t.Errorf("%s × %s × %s: %v", c.workflow, c.pointName(), c.process, err)
			table = append(table, fmt.Sprintf("| %s | %s | %s | **FAILED**: %v | %s |", c.workflow, c.pointName(), c.process, err, took))
			continue
		}
		table = append(table, fmt.Sprintf("| %s | %s | %s | killed; recovered, job %s | %s |", c.workflow, c.pointName(), c.process, outcome, took))
	}
	t.Logf("crash matrix (%d cells run, %d on a workflow's path and killed, %d failed):\n| workflow | failpoint | process killed | outcome | recovery |\n|---|---|---|---|---|\n%s",
		len(table), onPath, failed, strings.Join(table, "\n"))
}

// storeInvariants compares the stores with the records: every object file
// of a store's layout has a record (no orphan), every Ready record's file
// exists and reads as the template (qemu-img check and compare), and every
// template copy's ref count is the number of volumes it backs.
func (w *crashWorld) storeInvariants() []string {
	ctx := context.Background()
	var bad []string
	roots := map[string]string{}
	for _, st := range []*stowagev1.DataStore{w.img, w.p1, w.p2} {
		roots[st.GetId()] = st.GetDetails()["path"]
	}
	roots[w.san.GetId()] = w.sanDir
	type rec struct {
		what, format string
		ready        bool
	}
	want := map[string]rec{} // store root/key → record
	add := func(store, key, what string, f stowagev1.ImageFormat, ready bool) {
		if root, ok := roots[store]; ok && key != "" {
			want[filepath.Join(root, key)] = rec{what, strings.ToLower(strings.TrimPrefix(f.String(), "IMAGE_FORMAT_")), ready}
		}
	}
	vs, err := w.a.volumes.ListVolumes(ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{}))
	if err != nil {
		return []string{err.Error()}
	}
	backs := map[string]int32{} // template copy → volumes it backs
	for _, v := range vs.Msg.GetVolumes() {
		switch v.GetState() {
		case stowagev1.VolumeState_VOLUME_STATE_EXPUNGED:
			continue
		case stowagev1.VolumeState_VOLUME_STATE_ALLOCATED, stowagev1.VolumeState_VOLUME_STATE_CREATING, stowagev1.VolumeState_VOLUME_STATE_FAILED:
		default:
			if v.GetBaseRefId() != "" {
				backs[v.GetBaseRefId()]++
			}
		}
		add(v.GetStoreId(), v.GetInstallPath(), "volume "+v.GetName(), v.GetFormat(), v.GetState() == stowagev1.VolumeState_VOLUME_STATE_READY)
	}
	ts, err := w.a.images.ListTemplates(ctx, connect.NewRequest(&stowagev1.ListTemplatesRequest{}))
	if err != nil {
		return []string{err.Error()}
	}
	for _, t := range ts.Msg.GetTemplates() {
		g, err := w.a.images.GetTemplate(ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: t.GetId()}))
		if err != nil {
			return []string{err.Error()}
		}
		for _, r := range g.Msg.GetStores() {
			if r.GetState() == stowagev1.ObjectState_OBJECT_STATE_DESTROYED {
				continue
			}
			add(r.GetStoreId(), r.GetInstallPath(), "template "+t.GetName()+" on "+r.GetStoreId(), t.GetFormat(), r.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY)
			if n := backs[r.GetId()]; r.GetRefCount() != n {
				bad = append(bad, fmt.Sprintf("template %s on store %s: ref count %d, but %d volumes use it", t.GetName(), r.GetStoreId(), r.GetRefCount(), n))
			}
		}
	}
	ss, err := w.a.snapshots.ListSnapshots(ctx, connect.NewRequest(&stowagev1.ListSnapshotsRequest{}))
	if err != nil {
		return []string{err.Error()}
	}
	for _, sn := range ss.Msg.GetSnapshots() {
		g, err := w.a.snapshots.GetSnapshot(ctx, connect.NewRequest(&stowagev1.GetSnapshotRequest{Id: sn.GetId()}))
		if err != nil {
			return []string{err.Error()}
		}
		for _, r := range g.Msg.GetStores() {
			if r.GetState() == stowagev1.ObjectState_OBJECT_STATE_DESTROYED {
				continue
			}
			// A backup is a manifest, not an image.
			f := stowagev1.ImageFormat_IMAGE_FORMAT_UNSPECIFIED
			if r.GetRole() == stowagev1.StoreRole_STORE_ROLE_PRIMARY {
				f = stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2
			}
			add(r.GetStoreId(), r.GetInstallPath(), "snapshot "+sn.GetName(), f, r.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY && f != stowagev1.ImageFormat_IMAGE_FORMAT_UNSPECIFIED)
		}
	}
	have := map[string]bool{}
	for _, root := range roots {
		for _, dir := range []string{"volumes", "templates", "snapshots", "luns"} {
			_ = filepath.WalkDir(filepath.Join(root, dir), func(p string, d os.DirEntry, err error) error {
				switch {
				case err != nil:
					return nil
				case d.IsDir() && (d.Name() == "chunks" || strings.HasPrefix(d.Name(), ".")):
					return filepath.SkipDir
				case !d.IsDir() && !strings.HasPrefix(d.Name(), "."):
					have[p] = true
				}
				return nil
			})
		}
	}
	for p := range have {
		if _, ok := want[p]; !ok {
			bad = append(bad, "orphan file "+p)
		}
	}
	// No export lives on that no record holds (the crash world makes no
	// attach grant and has no template mount: every export was a copy's).
	var uris []string
	for _, v := range vs.Msg.GetVolumes() {
		uris = append(uris, v.GetNbdExportUri())
	}
	for _, host := range []string{"a1", "a2"} {
		for _, f := range []string{"exports.json", "nbd-exports.json"} {
			b, err := os.ReadFile(filepath.Join(w.root, host, f))
			if err != nil {
				continue // none made yet
			}
			var st struct {
				Exports []struct{ Token, Name, Path string }
			}
			if err := json.Unmarshal(b, &st); err != nil {
				bad = append(bad, fmt.Sprintf("%s/%s: %v", host, f, err))
				continue
			}
			for _, x := range st.Exports {
				id := x.Token + x.Name
				if !slices.ContainsFunc(uris, func(u string) bool { return u != "" && strings.Contains(u, id) }) {
					bad = append(bad, fmt.Sprintf("orphan export on %s of %s", host, x.Path))
				}
			}
		}
	}
	// Every backup chunk on the image store is used by a manifest (the
	// reconciler collects what a backup killed before its manifest left).
	bad = append(bad, w.orphanChunks()...)
	// The target exports exactly the LUNs the records have.
	for n, p := range tgtLUNs(w.t, w.tgtCtl, w.iqn) {
		if _, ok := want[p]; !ok {
			bad = append(bad, fmt.Sprintf("orphan LUN %d (%s) on the target", n, p))
		}
	}
	for p, r := range want {
		if !r.ready {
			continue
		}
		if !have[p] {
			bad = append(bad, fmt.Sprintf("%s is Ready but %s is missing", r.what, p))
			continue
		}
		fi, err := os.Stat(p)
		if err != nil {
			bad = append(bad, err.Error())
			continue
		}
		stamp := fmt.Sprint(fi.Size(), fi.ModTime().UnixNano())
		if w.checked[p] == stamp {
			continue
		}
		if r.format == "qcow2" {
			if out, err := exec.Command("qemu-img", "check", "-U", "-q", p).CombinedOutput(); err != nil {
				bad = append(bad, fmt.Sprintf("%s fails qemu-img check: %s", r.what, out))
				continue
			}
		}
		if r.format == "qcow2" || r.format == "raw" {
			if out, err := exec.Command("qemu-img", "compare", "-U", "-f", r.format, "-F", "qcow2", p, w.base).CombinedOutput(); err != nil {
				bad = append(bad, fmt.Sprintf("%s does not read as the template: %s", r.what, strings.TrimSpace(string(out))))
				continue
			}
		}
		w.checked[p] = stamp
	}
	sort.Strings(bad)
	return bad
}

// orphanChunks lists the chunks of the image store that no manifest uses.
func (w *crashWorld) orphanChunks() []string {
	dir := filepath.Join(w.img.GetDetails()["path"], "snapshots")
	cs, err := chunkstore.Open(filepath.Join(dir, "chunks"))
	if err != nil {
		return []string{err.Error()}
	}
	ctx := context.Background()
	names, err := cs.ListManifests(ctx, filepath.Join(dir, "manifests", "any"))
	if err != nil {
		return []string{err.Error()}
	}
	used := map[string]bool{}
	for _, n := range names {
		m, err := cs.Manifest(ctx, n)
		if err != nil {
			return []string{err.Error()}
		}
		for _, h := range m.Chunks {
			used[h] = true
		}
	}
	var bad []string
	_ = filepath.WalkDir(filepath.Join(dir, "chunks"), func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() && len(d.Name()) == 64 && !used[d.Name()] {
			bad = append(bad, "orphan chunk "+d.Name())
		}
		return nil
	})
	return bad
}

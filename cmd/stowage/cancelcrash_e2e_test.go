package main

// A cancel survives a controller crash (issue 14): the controller is
// killed (SIGKILL, failpoint jobAfterCancelRequested) after `job cancel`
// moved the job to Cancelling and before the cancel reached the agent, so
// the agent's copy runs on. The restarted controller resumes the job in
// Cancelling: it sends CancelTask for the step to the host the step
// recorded, and only then runs the handler's cleanup. The job ends
// Cancelled, the agent's task is journalled as cancelled, its download
// stops, no file appears on the store, and the template's copy is
// released.

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/stowage/stowage/failpoint"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func TestCancelSurvivesControllerCrash(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	root := t.TempDir()
	ctx := context.Background()
	ctlHTTP := freeAddr(t)
	var ctl *proc
	var addr, ctlDir string
	r := startSlowCopy(t, root, func(a, dir string) {
		addr, ctlDir = a, dir
		ctl = controllerProcEnv(t, []string{"GOFAIL_HTTP=" + ctlHTTP}, addr, ctlDir)
	})
	a, th, pz, pzDir, tmpl, vol, job, data, server := r.a, r.th, r.pz, r.pzDir, r.tmpl, r.vol, r.job, r.data, r.server
	agentDir := filepath.Join(root, "a1")
	if files := storeFiles(t, pzDir); len(files) == 0 {
		t.Fatal("no staging file on pz while the agent copies")
	}

	// The cancel kills the controller between Cancelling and the cancel
	// of the job's context: the CancelJob call gets no answer.
	arm(t, ctlHTTP, failpoint.JobAfterCancelRequested, 0)
	cancelAt := time.Now()
	_, cerr := a.jobs.CancelJob(ctx, connect.NewRequest(&stowagev1.CancelJobRequest{Id: job.GetId()}))
	select {
	case <-ctl.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("the controller did not die at %s (CancelJob: %v)", failpoint.JobAfterCancelRequested, cerr)
	}
	killedAfter := time.Since(cancelAt)
	if ws, ok := ctl.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("the controller ended, but not by SIGKILL at the failpoint: %v", ctl.cmd.ProcessState)
	}
	if !strings.Contains(ctl.log.String(), "failpoint "+failpoint.JobAfterCancelRequested) {
		t.Fatalf("the controller died elsewhere than at %s:\n%s", failpoint.JobAfterCancelRequested, ctl.log.String())
	}
	if cerr == nil {
		t.Fatal("CancelJob answered although the controller died before cancelling")
	}
	// With no controller the cancel has not reached the agent: its copy
	// goes on (this is what the restarted controller must stop).
	before := th.bytes.Load()
	time.Sleep(time.Second)
	if flowing := th.bytes.Load() - before; flowing == 0 || th.open.Load() == 0 {
		t.Fatalf("the agent's copy stopped without the controller (%d bytes in 1 s, %d open): nothing left to prove", flowing, th.open.Load())
	}
	t.Logf("controller killed at %s %s after the cancel; the agent's copy still runs (%d MiB so far)",
		failpoint.JobAfterCancelRequested, killedAfter.Round(time.Millisecond), th.bytes.Load()>>20)

	restartAt := time.Now()
	controllerProc(t, addr, ctlDir)
	a = newAPI(server)
	var end *stowagev1.Job
	waitFor(t, "the job to end after the restart", 60*time.Second, func() bool {
		g, err := a.jobs.GetJob(ctx, connect.NewRequest(&stowagev1.GetJobRequest{Id: job.GetId()}))
		if err != nil {
			return false
		}
		end = g.Msg.GetJob()
		s := end.GetState()
		return s == stowagev1.JobState_JOB_STATE_SUCCEEDED || s == stowagev1.JobState_JOB_STATE_FAILED || s == stowagev1.JobState_JOB_STATE_CANCELLED
	})
	jobEnded := time.Since(restartAt)
	if end.GetState() != stowagev1.JobState_JOB_STATE_CANCELLED {
		t.Fatalf("job after the restart: %s %q", end.GetState(), end.GetError())
	}
	var hosts []string
	for _, s := range end.GetPlan().GetSteps() {
		if s.GetName() == "cache-template" {
			hosts = s.GetTaskHosts()
		}
	}
	if len(hosts) != 1 || hosts[0] != "h1" {
		t.Fatalf("the copy step recorded task hosts %q, want [h1] (plan %v)", hosts, end.GetPlan())
	}

	// The agent's download closed soon after the job ended, and no byte
	// went out after that.
	waitFor(t, "the agent's download to close", 3*time.Second, func() bool { return th.open.Load() == 0 })
	lastByte := time.Unix(0, th.lastAt.Load())
	if after := lastByte.Sub(restartAt.Add(jobEnded)); after > time.Second {
		t.Errorf("bytes kept flowing %s after the job ended", after)
	}
	copied := th.bytes.Load()
	t.Logf("restart → job Cancelled in %s; last byte of the copy %s after the restart; %d of %d MiB copied",
		jobEnded.Round(time.Millisecond), lastByte.Sub(restartAt).Round(time.Millisecond), copied>>20, len(data)>>20)

	// The agent journalled the step's copy task as cancelled on request,
	// and the step itself (later calls of it must not start).
	step := job.GetId() + ".cache-template"
	tasks, err := filepath.Glob(filepath.Join(agentDir, "tasks", step+"*.pb"))
	if err != nil {
		t.Fatal(err)
	}
	var copyTasks int
	for _, p := range tasks {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		res := &stowagev1.TaskResult{}
		if err := proto.Unmarshal(b, res); err != nil {
			t.Fatalf("journal %s: %v", p, err)
		}
		name := strings.TrimSuffix(filepath.Base(p), ".pb")
		if strings.Contains(name, ".copy_image-") {
			copyTasks++
			if res.GetErrorClass() != "context canceled" || !strings.Contains(res.GetError(), "cancelled on request") {
				t.Errorf("the agent journalled copy task %s as %q %q, want cancelled on request", name, res.GetErrorClass(), res.GetError())
			}
		}
		if name == step && res.GetErrorClass() != "context canceled" {
			t.Errorf("the step's own entry: %v", res)
		}
	}
	if copyTasks != 1 {
		t.Fatalf("%d journalled copy tasks of step %s, want 1 (journal: %q)", copyTasks, step, tasks)
	}

	// No file on pz, staged or published, for a watch window of 8 s
	// after the restart (the copy needed 16 s in all).
	for time.Since(restartAt) < 8*time.Second {
		if files := storeFiles(t, pzDir); len(files) != 0 {
			t.Fatalf("%s after the restart pz holds %q, want nothing", time.Since(restartAt).Round(time.Millisecond), files)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n := th.bytes.Load(); n != copied {
		t.Errorf("%d more bytes were read after the job ended", n-copied)
	}

	// The volume is Failed, the template's copy on pz released.
	gv, err := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: vol.GetId()}))
	if err != nil || gv.Msg.GetVolume().GetState() != stowagev1.VolumeState_VOLUME_STATE_FAILED || gv.Msg.GetVolume().GetError() == "" {
		t.Fatalf("volume after the cancel: %v %v", gv, err)
	}
	gt, err := a.images.GetTemplate(ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: tmpl.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, r := range gt.Msg.GetStores() {
		if r.GetStoreId() != pz.GetId() {
			continue
		}
		found = true
		if r.GetState() != stowagev1.ObjectState_OBJECT_STATE_FAILED || r.GetRefCount() != 0 || r.GetOwnerJobId() != "" {
			t.Fatalf("the template's copy on pz after the cancel: %v", r)
		}
	}
	if !found {
		t.Fatalf("no copy of the template on pz recorded: %v", gt.Msg.GetStores())
	}
	th.slow.Store(false)
	dt, err := a.images.DeleteTemplate(ctx, connect.NewRequest(&stowagev1.DeleteTemplateRequest{Id: tmpl.GetId()}))
	if err != nil {
		t.Fatalf("delete the template: %v", err)
	}
	mustSucceed(t, a, dt.Msg.GetJob())
	if files := storeFiles(t, pzDir); len(files) != 0 {
		t.Fatalf("pz after the template's delete holds %q", files)
	}
}

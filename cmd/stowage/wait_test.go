package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// fakeController answers CreateVolume, GetVolume and WatchJob; the job ends
// in end.
type fakeController struct {
	stowagev1connect.UnimplementedVolumeServiceHandler
	stowagev1connect.UnimplementedJobServiceHandler
	end     stowagev1.JobState
	lastReq *stowagev1.CreateVolumeRequest
}

func (f *fakeController) CreateVolume(_ context.Context, r *connect.Request[stowagev1.CreateVolumeRequest]) (*connect.Response[stowagev1.CreateVolumeResponse], error) {
	f.lastReq = r.Msg
	plan := &stowagev1.Plan{Strategy: "blank", Priority: "default", Steps: []*stowagev1.PlanStep{{Name: "create", HostId: "h1", Reason: "owns primary1"}}}
	if r.Msg.DryRun {
		return connect.NewResponse(&stowagev1.CreateVolumeResponse{Plan: plan}), nil
	}
	return connect.NewResponse(&stowagev1.CreateVolumeResponse{
		Volume: &stowagev1.Volume{Id: "v1", Name: r.Msg.Name, State: stowagev1.VolumeState_VOLUME_STATE_ALLOCATED},
		Job:    &stowagev1.Job{Id: "j1", Kind: "create-volume", TargetId: "v1", State: stowagev1.JobState_JOB_STATE_PENDING, Plan: plan},
		Plan:   plan,
	}), nil
}

func (f *fakeController) GetVolume(_ context.Context, r *connect.Request[stowagev1.GetVolumeRequest]) (*connect.Response[stowagev1.GetVolumeResponse], error) {
	return connect.NewResponse(&stowagev1.GetVolumeResponse{Volume: &stowagev1.Volume{
		Id: r.Msg.Id, Name: "data1", Size: 1 << 30, State: stowagev1.VolumeState_VOLUME_STATE_READY, InstallMethod: "blank",
	}}), nil
}

func (f *fakeController) WatchJob(_ context.Context, r *connect.Request[stowagev1.WatchJobRequest], s *connect.ServerStream[stowagev1.WatchJobResponse]) error {
	for _, j := range []*stowagev1.Job{
		{Id: r.Msg.Id, State: stowagev1.JobState_JOB_STATE_RUNNING, Progress: &stowagev1.JobProgress{Phase: "allocate", BytesDone: 1 << 29, BytesTotal: 1 << 30}},
		{Id: r.Msg.Id, State: f.end, Result: "allocated 1.0 GiB", Error: map[bool]string{true: "boom"}[f.end != stowagev1.JobState_JOB_STATE_SUCCEEDED]},
	} {
		if err := s.Send(&stowagev1.WatchJobResponse{Job: j}); err != nil {
			return err
		}
	}
	return nil
}

func runCLI(t *testing.T, f *fakeController, args ...string) (string, error) {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle(stowagev1connect.NewVolumeServiceHandler(f))
	mux.Handle(stowagev1connect.NewJobServiceHandler(f))
	srv := httptest.NewServer(mux)
	defer srv.Close()
	root := newRootCmd()
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(append([]string{"--server", srv.URL}, args...))
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func TestRunJobFlow(t *testing.T) {
	f := &fakeController{end: stowagev1.JobState_JOB_STATE_SUCCEEDED}

	out, err := runCLI(t, f, "volume", "create", "--name", "data1", "--size", "1G", "--idempotency-key", "k1")
	if err != nil || !strings.Contains(out, "volume v1: job j1 Pending") || !strings.Contains(out, "stowage job watch j1") {
		t.Fatalf("create: %v\n%s", err, out)
	}
	if f.lastReq.Size != 1<<30 || f.lastReq.IdempotencyKey != "k1" || f.lastReq.Strategy != "auto" {
		t.Errorf("create sent %v", f.lastReq)
	}

	out, err = runCLI(t, f, "volume", "create", "--name", "data1", "--size", "1G", "--dry-run")
	if err != nil || !f.lastReq.DryRun || !strings.Contains(out, "Strategy:  blank") || !strings.Contains(out, "owns primary1") {
		t.Fatalf("dry run: %v\n%s", err, out)
	}

	out, err = runCLI(t, f, "volume", "create", "--name", "data1", "--size", "1G", "--wait")
	if err != nil || !strings.Contains(out, "job j1 succeeded: allocated 1.0 GiB") || !strings.Contains(out, "State:") || !strings.Contains(out, "Ready") {
		t.Fatalf("--wait: %v\n%s", err, out)
	}

	out, err = runCLI(t, f, "-o", "json", "volume", "create", "--name", "data1", "--size", "1G", "--wait")
	var got struct {
		Job    struct{ State string }
		Volume struct{ State string }
	}
	if err != nil || json.Unmarshal([]byte(out), &got) != nil || got.Job.State != "JOB_STATE_SUCCEEDED" || got.Volume.State != "VOLUME_STATE_READY" {
		t.Fatalf("--wait -o json: %v %+v\n%s", err, got, out)
	}

	out, err = runCLI(t, f, "job", "watch", "j1")
	if err != nil || !strings.Contains(out, "Running  allocate  512.0 MiB / 1.0 GiB (50%)") || !strings.Contains(out, "job j1 succeeded") {
		t.Fatalf("job watch: %v\n%s", err, out)
	}

	for end, code := range map[stowagev1.JobState]int{stowagev1.JobState_JOB_STATE_FAILED: 1, stowagev1.JobState_JOB_STATE_CANCELLED: 130} {
		f.end = end
		if _, err := runCLI(t, f, "job", "watch", "j1"); exitCode(err) != code {
			t.Errorf("job watch ending %v: %v (exit %d), want exit %d", end, err, exitCode(err), code)
		}
		if _, err := runCLI(t, f, "volume", "create", "--name", "data1", "--size", "1G", "--wait"); exitCode(err) != code {
			t.Errorf("--wait ending %v: %v (exit %d), want exit %d", end, err, exitCode(err), code)
		}
	}

	if _, err := runCLI(t, f, "volume", "create", "--name", "x"); exitCode(err) != 2 {
		t.Errorf("blank volume without --size: %v", err)
	}
	if _, err := runCLI(t, f, "volume", "create", "--name", "x", "--size", "1G", "--strategy", "fast"); exitCode(err) != 2 {
		t.Errorf("--strategy fast: %v", err)
	}
}

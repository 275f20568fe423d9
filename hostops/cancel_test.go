package hostops

import (
	"context"
	"errors"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/drivers"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// blockingAgent runs every task until its call ends and records the
// CancelTask calls it gets.
type blockingAgent struct {
	stowagev1connect.UnimplementedAgentServiceHandler
	started   chan string
	mu        sync.Mutex
	cancelled []string
}

func (a *blockingAgent) RunTask(ctx context.Context, req *connect.Request[stowagev1.RunTaskRequest]) (*connect.Response[stowagev1.RunTaskResponse], error) {
	a.started <- req.Msg.GetTask().GetId()
	<-ctx.Done()
	return nil, ctx.Err()
}

func (a *blockingAgent) CancelTask(_ context.Context, req *connect.Request[stowagev1.CancelTaskRequest]) (*connect.Response[stowagev1.CancelTaskResponse], error) {
	a.mu.Lock()
	a.cancelled = append(a.cancelled, req.Msg.GetTaskId())
	a.mu.Unlock()
	return connect.NewResponse(&stowagev1.CancelTaskResponse{Result: &stowagev1.TaskResult{TaskId: req.Msg.GetTaskId(), Done: true, ErrorClass: "context canceled"}}), nil
}

func (a *blockingAgent) cancels() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.cancelled...)
}

// TestRemoteCancelReachesTheAgent: a call whose context is cancelled on
// request (`stowage job cancel`) sends CancelTask for its task, with or
// without progress polling; one cancelled otherwise (the controller
// stopping) leaves the task to run on.
func TestRemoteCancelReachesTheAgent(t *testing.T) {
	agent := &blockingAgent{started: make(chan string, 1)}
	_, h := stowagev1connect.NewAgentServiceHandler(agent)
	srv := httptest.NewServer(h)
	defer srv.Close()
	r := NewRemote("h1", srv.URL, srv.Client(), WithPollInterval(10*time.Millisecond))
	req := FetchRequest{Source: "http://x/t.raw", Dest: Ref{Store: "s", Key: "t.raw"}, Format: drivers.FormatRaw}
	for _, tc := range []struct {
		name     string
		cause    error
		progress drivers.Progress
		want     bool
	}{
		{"on request", drivers.ErrCancelledOnRequest, nil, true},
		{"on request, polling progress", drivers.ErrCancelledOnRequest, func(int64, int64) {}, true},
		{"shutdown", nil, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(agent.cancels())
			ctx, cancel := context.WithCancelCause(drivers.WithTaskID(t.Context(), "job-1.install"))
			errc := make(chan error, 1)
			go func() {
				_, err := r.FetchImage(ctx, req, tc.progress)
				errc <- err
			}()
			id := <-agent.started
			cancel(tc.cause)
			err := <-errc
			if !errors.Is(err, context.Canceled) || errors.Is(err, drivers.ErrCancelledOnRequest) != tc.want {
				t.Fatalf("cancelled call: %v", err)
			}
			got := agent.cancels()[before:]
			if tc.want && (len(got) != 1 || got[0] != id) {
				t.Fatalf("CancelTask calls %q, want one for %s", got, id)
			}
			if !tc.want && len(got) != 0 {
				t.Fatalf("CancelTask sent on shutdown: %q", got)
			}
		})
	}
}

package agent

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"go.opentelemetry.io/otel/attribute"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/oteltrace"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/redact"
)

// service is the agent's AgentService: it admits the controller's tasks
// (LocalHost.admit: nothing outside the stores the agent serves) and runs
// them on the local host through the journal.
type service struct {
	host    *LocalHost
	journal *journal
	log     *slog.Logger
	// ready is closed once the agent has registered and serves the stores
	// the controller assigned it; gated says tasks wait for it (set by
	// Agent.Run: a handler used without the registration loop does not
	// wait). A restarted agent's listener is up before its registration,
	// and a task the controller resumes must not be refused for a store
	// the agent has not been told of yet.
	ready <-chan struct{}
	gated atomic.Bool
	// showTemplate applies a show_template step to the host's template
	// mount (Agent.showTemplate; nil without a mount).
	showTemplate func(ctx context.Context, spec *stowagev1.CacheSpec) error
}

// startWait bounds how long a task waits for the agent's registration
// before it is refused as unavailable (the controller retries it).
const startWait = 10 * time.Second

// started waits for the agent's registration (see ready).
func (s *service) started(ctx context.Context) error {
	if !s.gated.Load() {
		return nil
	}
	select {
	case <-s.ready:
		return nil
	default:
	}
	t := time.NewTimer(startWait)
	defer t.Stop()
	select {
	case <-s.ready:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("agent: waiting for its registration: %w", ctx.Err())
	case <-t.C:
		return fmt.Errorf("agent is starting and has not registered with the controller yet: %w", errdefs.ErrUnavailable)
	}
}

var _ stowagev1connect.AgentServiceHandler = (*service)(nil)

// RunTask runs a task (or waits for the running task of the same id) and
// returns its result. A task naming anything outside the stores the agent
// serves is refused with permission_denied before it is journalled.
func (s *service) RunTask(ctx context.Context, req *connect.Request[stowagev1.RunTaskRequest]) (*connect.Response[stowagev1.RunTaskResponse], error) {
	task := req.Msg.GetTask()
	if err := s.started(ctx); err != nil {
		return nil, err
	}
	if err := s.host.admit(task); err != nil {
		return nil, err
	}
	if task.GetListExports() != nil {
		// A read that must be current and whose answer is capabilities
		// (export URIs): run directly, never journalled.
		res, err := Execute(ctx, s.host, task, nil)
		if err != nil {
			if ctx.Err() != nil {
				return nil, err
			}
			res = &stowagev1.TaskResult{TaskId: task.GetId(), ErrorClass: errdefs.ClassName(err), Error: redact.Text(err.Error())}
			if res.ErrorClass == "" {
				res.ErrorClass = errdefs.ErrInternal.Error()
			}
		}
		res.Done = true
		return connect.NewResponse(&stowagev1.RunTaskResponse{Result: res}), nil
	}
	caller := ctx // the task runs detached from the call, in its trace
	res, err := s.journal.run(ctx, task.GetId(), func(ctx context.Context, progress drivers.Progress) (_ *stowagev1.TaskResult, err error) {
		kind, start := taskKind(task), time.Now()
		ctx, span := oteltrace.Start(oteltrace.Detach(ctx, caller), "agent task "+kind, attribute.String("stowage.task.id", task.GetId()))
		defer func() {
			oteltrace.End(span, err)
			// With the trace id: the line joins the controller's span.
			s.log.InfoContext(ctx, "task ended", "task", task.GetId(), "kind", kind, "took", time.Since(start).Round(time.Millisecond), "err", err)
		}()
		if st := task.GetShowTemplate(); st != nil {
			// The mount belongs to the agent (its cache process), not to
			// the LocalHost the other steps run on.
			if s.showTemplate == nil {
				return nil, fmt.Errorf("this host has no template mount: %w", errdefs.ErrUnavailable)
			}
			if err := s.showTemplate(ctx, st.GetTemplate()); err != nil {
				return nil, err
			}
			return &stowagev1.TaskResult{TaskId: task.GetId()}, nil
		}
		return Execute(ctx, s.host, task, progress)
	})
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&stowagev1.RunTaskResponse{Result: res}), nil
}

// taskKind names the step a task carries ("copy", "create_volume").
func taskKind(t *stowagev1.Task) string {
	m := t.ProtoReflect()
	if f := m.WhichOneof(m.Descriptor().Oneofs().ByName("step")); f != nil {
		return string(f.Name())
	}
	return "unknown"
}

// GetTask returns a finished task's result or a running task's progress.
func (s *service) GetTask(ctx context.Context, req *connect.Request[stowagev1.GetTaskRequest]) (*connect.Response[stowagev1.GetTaskResponse], error) {
	res, err := s.journal.status(req.Msg.GetTaskId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&stowagev1.GetTaskResponse{Result: res}), nil
}

// CancelTask stops a running task on request (`stowage job cancel`) and
// returns its journalled result once it has ended: cancelled, or the
// result of a task that finished first. An unknown id is journalled as
// cancelled and is not an error.
func (s *service) CancelTask(ctx context.Context, req *connect.Request[stowagev1.CancelTaskRequest]) (*connect.Response[stowagev1.CancelTaskResponse], error) {
	res, err := s.journal.cancel(ctx, req.Msg.GetTaskId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&stowagev1.CancelTaskResponse{Result: res}), nil
}

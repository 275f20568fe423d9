package agent

import (
	"context"
	"sync/atomic"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/agent/proxy"
	"github.com/stowage/stowage/drivers"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// service is the agent's AgentService: it runs the controller's tasks on the
// local endpoint through the journal.
type service struct {
	local    drivers.Endpoint
	journal  *journal
	inFlight atomic.Int32
}

var _ stowagev1connect.AgentServiceHandler = (*service)(nil)

func (s *service) RunTask(ctx context.Context, req *connect.Request[stowagev1.RunTaskRequest]) (*connect.Response[stowagev1.RunTaskResponse], error) {
	task := req.Msg.GetTask()
	s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	res, err := s.journal.run(ctx, task.GetId(), func(ctx context.Context) (*stowagev1.TaskResult, error) {
		return proxy.Execute(ctx, s.local, task)
	})
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&stowagev1.RunTaskResponse{Result: res}), nil
}

func (s *service) GetTask(ctx context.Context, req *connect.Request[stowagev1.GetTaskRequest]) (*connect.Response[stowagev1.GetTaskResponse], error) {
	res, err := s.journal.get(req.Msg.GetTaskId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&stowagev1.GetTaskResponse{Result: res}), nil
}

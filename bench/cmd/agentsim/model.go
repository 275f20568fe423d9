package main

import (
	"context"
	"sync"
	"sync/atomic"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// model is a simulated host's AgentService: it keeps the objects created
// on it (store id, key -> size) and the results of the tasks it ran, and
// answers every step at once without touching a disk. Steps it does not
// model succeed with an empty result.
type model struct {
	stowagev1connect.UnimplementedAgentServiceHandler

	running atomic.Int32
	mu      sync.Mutex
	objects map[[2]string]int64
	results map[string]*stowagev1.TaskResult
}

var _ stowagev1connect.AgentServiceHandler = (*model)(nil)

func newModel() *model {
	return &model{objects: map[[2]string]int64{}, results: map[string]*stowagev1.TaskResult{}}
}

func (m *model) inFlight() int32 { return m.running.Load() }

func (m *model) RunTask(_ context.Context, req *connect.Request[stowagev1.RunTaskRequest]) (*connect.Response[stowagev1.RunTaskResponse], error) {
	m.running.Add(1)
	defer m.running.Add(-1)
	t := req.Msg.GetTask()
	m.mu.Lock()
	defer m.mu.Unlock()
	if r, ok := m.results[t.GetId()]; ok { // a task id runs once
		return connect.NewResponse(&stowagev1.RunTaskResponse{Result: r}), nil
	}
	r := &stowagev1.TaskResult{TaskId: t.GetId(), Done: true}
	switch s := t.GetStep().(type) {
	case *stowagev1.Task_ProbeStore:
		r.Result = &stowagev1.TaskResult_Probe{Probe: &stowagev1.StoreProbe{CapacityBytes: storeCapacity, AvailableBytes: storeCapacity / 2, FsType: "simfs"}}
	case *stowagev1.Task_CreateImage:
		m.objects[[2]string{s.CreateImage.GetRef().GetStoreId(), s.CreateImage.GetRef().GetKey()}] = s.CreateImage.GetSizeBytes()
	case *stowagev1.Task_DeleteObject:
		delete(m.objects, [2]string{s.DeleteObject.GetRef().GetStoreId(), s.DeleteObject.GetRef().GetKey()})
	case *stowagev1.Task_ListObjects:
		r.Result = &stowagev1.TaskResult_Files{Files: &stowagev1.FileList{}}
	}
	m.results[t.GetId()] = r
	return connect.NewResponse(&stowagev1.RunTaskResponse{Result: r}), nil
}

func (m *model) GetTask(_ context.Context, req *connect.Request[stowagev1.GetTaskRequest]) (*connect.Response[stowagev1.GetTaskResponse], error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r, ok := m.results[req.Msg.GetTaskId()]
	if !ok {
		return nil, connect.NewError(connect.CodeNotFound, nil)
	}
	return connect.NewResponse(&stowagev1.GetTaskResponse{Result: r}), nil
}

func (m *model) CancelTask(_ context.Context, req *connect.Request[stowagev1.CancelTaskRequest]) (*connect.Response[stowagev1.CancelTaskResponse], error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r, ok := m.results[req.Msg.GetTaskId()]
	if !ok {
		r = &stowagev1.TaskResult{TaskId: req.Msg.GetTaskId(), Done: true, ErrorClass: "context canceled", Error: "cancelled"}
		m.results[req.Msg.GetTaskId()] = r
	}
	return connect.NewResponse(&stowagev1.CancelTaskResponse{Result: r}), nil
}

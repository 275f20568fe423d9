// Package proxy is the remote side of drivers.Endpoint: the controller calls
// an agent's AgentService through it, and the agent turns RPC tasks back into
// calls on its local endpoint with the conversions in convert.go.
//
// Every call gets a fresh task id; a call that fails because the agent could
// not be reached is retried with the same id, so the agent (which journals
// results by task id) does the work at most once.
package proxy

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"github.com/google/uuid"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/errdefs/errconnect"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// Endpoint runs host steps on one agent over Connect.
type Endpoint struct {
	hostID   string
	client   stowagev1connect.AgentServiceClient
	attempts int
	backoff  time.Duration
}

var _ drivers.Endpoint = (*Endpoint)(nil)

// Option configures an Endpoint.
type Option func(*Endpoint)

// WithRetry sets how many times a call is attempted while the agent is
// unreachable, and the first pause between attempts (doubled each time).
func WithRetry(attempts int, backoff time.Duration) Option {
	return func(e *Endpoint) { e.attempts, e.backoff = attempts, backoff }
}

// New returns an Endpoint for the agent of hostID serving at baseURL.
func New(hostID, baseURL string, hc connect.HTTPClient, opts ...Option) *Endpoint {
	if hc == nil {
		hc = http.DefaultClient
	}
	e := &Endpoint{
		hostID:   hostID,
		client:   stowagev1connect.NewAgentServiceClient(hc, baseURL),
		attempts: 3,
		backoff:  200 * time.Millisecond,
	}
	for _, o := range opts {
		o(e)
	}
	return e
}

// HostID implements drivers.Endpoint.
func (e *Endpoint) HostID() string { return e.hostID }

// run sends task and returns its result, retrying unreachable agents with
// the same task id; a task's own failure comes back as a classed error.
func (e *Endpoint) run(ctx context.Context, task *stowagev1.Task) (*stowagev1.TaskResult, error) {
	task.Id = uuid.NewString()
	wait := e.backoff
	var lastErr error
	for attempt := 0; attempt < e.attempts; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("host %s: %w", e.hostID, ctx.Err())
			case <-time.After(wait):
			}
			wait *= 2
		}
		resp, err := e.client.RunTask(ctx, connect.NewRequest(&stowagev1.RunTaskRequest{Task: task}))
		if err != nil {
			lastErr = errconnect.FromConnect(err)
			if errdefs.IsUnavailable(lastErr) && ctx.Err() == nil {
				continue
			}
			return nil, fmt.Errorf("host %s: %w", e.hostID, lastErr)
		}
		res := resp.Msg.GetResult()
		if res.GetErrorClass() != "" || res.GetError() != "" {
			return nil, fmt.Errorf("host %s: %w", e.hostID, errdefs.New(errdefs.FromClassName(res.GetErrorClass()), res.GetError()))
		}
		return res, nil
	}
	return nil, fmt.Errorf("host %s unreachable after %d attempts: %w", e.hostID, e.attempts, lastErr)
}

// PrepareStore implements drivers.Endpoint.
func (e *Endpoint) PrepareStore(ctx context.Context, path, storeID string, subdirs []string) (drivers.StoreProbe, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_PrepareStore{PrepareStore: &stowagev1.PrepareStoreStep{
		Path: path, StoreId: storeID, Subdirs: subdirs, Claim: true,
	}}})
	if err != nil {
		return drivers.StoreProbe{}, err
	}
	return ProbeFromProto(res.GetProbe()), nil
}

// ProbeStore implements drivers.Endpoint.
func (e *Endpoint) ProbeStore(ctx context.Context, path, storeID string) (drivers.StoreProbe, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_ProbeStore{ProbeStore: &stowagev1.ProbeStoreStep{
		Path: path, StoreId: storeID,
	}}})
	if err != nil {
		return drivers.StoreProbe{}, err
	}
	return ProbeFromProto(res.GetProbe()), nil
}

// ReleaseStore implements drivers.Endpoint.
func (e *Endpoint) ReleaseStore(ctx context.Context, path, storeID string, subdirs []string) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_ReleaseStore{ReleaseStore: &stowagev1.ReleaseStoreStep{
		Path: path, StoreId: storeID, Subdirs: subdirs,
	}}})
	return err
}

// CreateImage implements drivers.Endpoint.
func (e *Endpoint) CreateImage(ctx context.Context, path string, format drivers.Format, size int64) (drivers.FileInfo, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_CreateImage{CreateImage: &stowagev1.CreateImageStep{
		Path: path, Format: FormatToProto(format), SizeBytes: size,
	}}})
	if err != nil {
		return drivers.FileInfo{}, err
	}
	return FileFromProto(res.GetFile()), nil
}

// DeletePath implements drivers.Endpoint.
func (e *Endpoint) DeletePath(ctx context.Context, path string) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_DeletePath{DeletePath: &stowagev1.DeletePathStep{Path: path}}})
	return err
}

// ListDir implements drivers.Endpoint.
func (e *Endpoint) ListDir(ctx context.Context, path string) ([]drivers.FileInfo, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_ListDir{ListDir: &stowagev1.ListDirStep{Path: path}}})
	if err != nil {
		return nil, err
	}
	out := make([]drivers.FileInfo, 0, len(res.GetFiles().GetFiles()))
	for _, f := range res.GetFiles().GetFiles() {
		out = append(out, FileFromProto(f))
	}
	return out, nil
}

// StatPath implements drivers.Endpoint.
func (e *Endpoint) StatPath(ctx context.Context, path string) (drivers.FileInfo, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_StatPath{StatPath: &stowagev1.StatPathStep{Path: path}}})
	if err != nil {
		return drivers.FileInfo{}, err
	}
	return FileFromProto(res.GetFile()), nil
}

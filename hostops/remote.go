// Task ids. When the context carries a task id (drivers.WithTaskID, set by
// the controller's job runner per plan step), each call's id is derived from
// it with drivers.StepTaskID, keyed by the step kind and a digest of the
// step's arguments: "<step id>.<kind>-<digest>" (".<n>" for the n-th
// identical call). A step re-run after a controller restart thus sends the
// same ids and gets the agent's journalled results, or waits for a task
// still running, instead of doing the work twice; a call the first run did
// not make gets a fresh id, never another call's result. Without a task id
// every call gets a random one. A call that fails because the agent could
// not be reached is retried with the same id, so the agent does the work at
// most once.
//
// Progress. RunTask blocks until the task is done; a method that takes a
// drivers.Progress polls GetTask meanwhile (every 500 ms, WithPollInterval)
// and reports the bytes done, then once more with the final count. The
// callback is never called concurrently nor after the method returned.
//
// Cancel. A call whose context ends with drivers.ErrCancelledOnRequest
// (`stowage job cancel`: the job runner cancels the job's context so) sends
// CancelTask for its task before it returns, on a context of its own
// (cancelTimeout), so the agent stops the task and removes what it staged
// instead of finishing it after the job said Cancelled. A context that ends
// otherwise (the controller stopping, a caller's deadline) leaves the task
// running: a re-run with the same id waits for it or gets its result.
package hostops

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"github.com/google/uuid"
	"google.golang.org/protobuf/proto"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/errdefs/errconnect"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// Remote is a Host whose steps run on one agent over Connect: each call is
// one AgentService.RunTask task (the agent turns it back into a call on its
// local implementation, agent/dispatch.go).
//
// Task ids. When the context carries a task id (drivers.WithTaskID, set by
// the controller's job runner per plan step), each call's id is derived from
// it with drivers.StepTaskID, keyed by the step kind and a digest of the
// step's arguments: "<step id>.<kind>-<digest>" (".<n>" for the n-th
// identical call). A step re-run after a controller restart thus sends the
// same ids and gets the agent's journalled results, or waits for a task
// still running, instead of doing the work twice; a call the first run did
// not make gets a fresh id, never another call's result. Without a task id
// every call gets a random one. A call that fails because the agent could
// not be reached is retried with the same id, so the agent does the work at
// most once.
//
// Progress. RunTask blocks until the task is done; a method that takes a
// drivers.Progress polls GetTask meanwhile (every 500 ms, WithPollInterval)
// and reports the bytes done, then once more with the final count. The
// callback is never called concurrently nor after the method returned.
//
// Cancel. A call whose context ends with drivers.ErrCancelledOnRequest
// (`stowage job cancel`: the job runner cancels the job's context so) sends
// CancelTask for its task before it returns, on a context of its own
// (cancelTimeout), so the agent stops the task and removes what it staged
// instead of finishing it after the job said Cancelled. A context that ends
// otherwise (the controller stopping, a caller's deadline) leaves the task
// running: a re-run with the same id waits for it or gets its result.
type Remote struct {
	hostID   string
	client   stowagev1connect.AgentServiceClient
	attempts int
	backoff  time.Duration
	poll     time.Duration
	// clientOpts are the options of the Connect client (NewRemote).
	clientOpts []connect.ClientOption
}

var _ Host = (*Remote)(nil)

// Option configures a Remote.
type Option func(*Remote)

// WithRetry sets how many times a call is attempted while the agent is
// unreachable, and the first pause between attempts (doubled each time).
func WithRetry(attempts int, backoff time.Duration) Option {
	return func(e *Remote) { e.attempts, e.backoff = attempts, backoff }
}

// WithPollInterval sets how often a call with a progress callback asks the
// agent how far its task has come (default 500 ms).
func WithPollInterval(d time.Duration) Option {
	return func(e *Remote) {
		if d > 0 {
			e.poll = d
		}
	}
}

// WithClientOptions adds options to the Connect client that calls the
// agent (e.g. the tracing interceptor).
func WithClientOptions(opts ...connect.ClientOption) Option {
	return func(e *Remote) { e.clientOpts = append(e.clientOpts, opts...) }
}

// maxBackoff caps the wait between attempts to reach an agent.
const maxBackoff = 5 * time.Second

// NewRemote returns a Remote for the agent of hostID serving at baseURL.
func NewRemote(hostID, baseURL string, hc connect.HTTPClient, opts ...Option) *Remote {
	if hc == nil {
		hc = http.DefaultClient
	}
	e := &Remote{
		hostID: hostID,
		// An agent restarting (its host rebooting, a crash, an upgrade) is
		// waited for about 13 s: 0.25+0.5+1+2+4+5 s between attempts.
		attempts: 7,
		backoff:  250 * time.Millisecond,
		poll:     500 * time.Millisecond,
	}
	for _, o := range opts {
		o(e)
	}
	e.client = stowagev1connect.NewAgentServiceClient(hc, baseURL, e.clientOpts...)
	return e
}

// cancelTimeout bounds the CancelTask a cancelled call sends: long enough
// for the agent to stop the task and remove its stage, short enough that a
// lost agent does not hold up the job's end.
const cancelTimeout = 10 * time.Second

// cancelTask passes a cancel on request on to the agent running task id.
// It is best effort: an agent that cannot be reached cancels the task
// itself once nobody waits for it (its grace period).
func (e *Remote) cancelTask(ctx context.Context, id string) {
	if !drivers.CancelledOnRequest(ctx) {
		return
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cancelTimeout)
	defer cancel()
	if _, err := e.client.CancelTask(cctx, connect.NewRequest(&stowagev1.CancelTaskRequest{TaskId: id})); err != nil {
		slog.Default().Warn("task not cancelled on its host; it stops when its grace period ends",
			"host", e.hostID, "task", id, "err", errconnect.FromConnect(err))
	}
}

// CancelTask cancels task id on the agent and waits until it has ended
// there (its stage removed): id may be a plan step's task id
// (jobs.StepTaskID), which cancels every task derived from it and keeps
// later ones from starting. An agent that cannot be reached is tried
// again with the Remote's retry settings while ctx lasts.
func (e *Remote) CancelTask(ctx context.Context, id string) (*stowagev1.TaskResult, error) {
	wait := e.backoff
	var lastErr error
	for attempt := 0; attempt < e.attempts; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("host %s: cancel task %s: %w (last: %v)", e.hostID, id, ctx.Err(), lastErr)
			case <-time.After(wait):
			}
			wait = min(wait*2, maxBackoff)
		}
		resp, err := e.client.CancelTask(ctx, connect.NewRequest(&stowagev1.CancelTaskRequest{TaskId: id}))
		if err == nil {
			return resp.Msg.GetResult(), nil
		}
		lastErr = errconnect.FromConnect(err)
		if !errdefs.IsUnavailable(lastErr) || ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("host %s: cancel task %s: %w", e.hostID, id, lastErr)
}

// HostID implements Host.
func (e *Remote) HostID() string { return e.hostID }

// taskID is the id of task: derived from the context's task id, else random.
func taskID(ctx context.Context, task *stowagev1.Task) string {
	if _, ok := drivers.TaskIDFrom(ctx); !ok || task.GetListExports() != nil {
		return uuid.NewString()
	}
	kind := "step"
	m := task.ProtoReflect()
	if fd := m.WhichOneof(m.Descriptor().Oneofs().ByName("step")); fd != nil {
		kind = string(fd.Name())
	}
	step := proto.Clone(task).(*stowagev1.Task)
	step.Id, step.ParentId = "", "" // the id names the step, not who runs it
	if c := step.GetCopyImage(); c != nil {
		// A presigned or export URL changes its query (signature, expiry)
		// each time it is granted; the object it names does not. A step
		// re-run after a restart must get the same id, and the agent's
		// journalled result, not a second copy.
		if i := strings.IndexByte(c.Source, '?'); i >= 0 && strings.HasPrefix(c.Source, "http") {
			c.Source = c.Source[:i]
		}
	}
	b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(step)
	sum := sha256.Sum256(b)
	id, _ := drivers.StepTaskID(ctx, kind+"-"+hex.EncodeToString(sum[:6]))
	return id
}

// derivedID matches the ids taskID derives: "<step id>.<kind>-<digest>"
// and ".<n>" for the n-th identical call.
var derivedID = regexp.MustCompile(`^(.+)\.[a-z_]+-[0-9a-f]{12}(\.[0-9]+)?$`)

// StepOf returns the step task id (drivers.TaskIDFrom of the caller) a
// task id Remote derived comes from; false for a random id or one hashed
// because it was too long (see drivers.StepTaskID). Owner.ParentID says it
// for every task since tasks carry it; this reads older ones.
func StepOf(taskID string) (string, bool) {
	m := derivedID.FindStringSubmatch(taskID)
	if m == nil {
		return "", false
	}
	return m[1], true
}

// run sends task and returns its result, retrying unreachable agents with
// the same task id; a task's own failure comes back as a classed error.
// With progress, GetTask is polled while the task runs.
func (e *Remote) run(ctx context.Context, task *stowagev1.Task, progress drivers.Progress) (*stowagev1.TaskResult, error) {
	task.Id = taskID(ctx, task)
	task.ParentId, _ = drivers.TaskIDFrom(ctx)
	// Recorded before the task leaves: a cancel that outlives this
	// controller must know which agents ran the step's tasks.
	if err := drivers.NoteTaskHost(ctx, e.hostID); err != nil {
		return nil, fmt.Errorf("host %s: task %s: record the step's host: %w", e.hostID, task.Id, err)
	}
	wait := e.backoff
	var lastErr error
	for attempt := 0; attempt < e.attempts; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				// The last attempt may have reached the agent.
				e.cancelTask(ctx, task.Id)
				return nil, fmt.Errorf("host %s: task %s: %w", e.hostID, task.Id, context.Cause(ctx))
			case <-time.After(wait):
			}
			wait = min(wait*2, maxBackoff)
		}
		res, err := e.runOnce(ctx, task, progress)
		if err != nil {
			lastErr = errconnect.FromConnect(err)
			if dropped(err) && ctx.Err() == nil {
				// The agent went away mid-call (a restart): the task id
				// makes the next attempt join or return the same task.
				lastErr = fmt.Errorf("%w: %w", errdefs.ErrUnavailable, lastErr)
			}
			if errdefs.IsUnavailable(lastErr) && ctx.Err() == nil {
				continue
			}
			if ctx.Err() != nil {
				e.cancelTask(ctx, task.Id)
				return nil, fmt.Errorf("host %s: task %s: %w", e.hostID, task.Id, context.Cause(ctx))
			}
			return nil, fmt.Errorf("host %s: %w", e.hostID, lastErr)
		}
		if res.GetErrorClass() != "" || res.GetError() != "" {
			return nil, fmt.Errorf("host %s: %w", e.hostID, errdefs.New(errdefs.FromClassName(res.GetErrorClass()), res.GetError()))
		}
		return res, nil
	}
	return nil, fmt.Errorf("host %s unreachable after %d attempts: %w", e.hostID, e.attempts, lastErr)
}

// runOnce makes one RunTask call, polling GetTask for progress meanwhile.
func (e *Remote) runOnce(ctx context.Context, task *stowagev1.Task, progress drivers.Progress) (*stowagev1.TaskResult, error) {
	if progress == nil {
		resp, err := e.client.RunTask(ctx, connect.NewRequest(&stowagev1.RunTaskRequest{Task: task}))
		if err != nil {
			return nil, err
		}
		return resp.Msg.GetResult(), nil
	}
	pctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var last [2]int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		last = e.pollProgress(pctx, task.GetId(), progress)
	}()
	resp, err := e.client.RunTask(ctx, connect.NewRequest(&stowagev1.RunTaskRequest{Task: task}))
	stop()
	wg.Wait()
	if err != nil {
		return nil, err
	}
	res := resp.Msg.GetResult()
	if res.GetErrorClass() == "" && res.GetBytesTotal() > 0 && [2]int64{res.GetBytesDone(), res.GetBytesTotal()} != last {
		progress(res.GetBytesDone(), res.GetBytesTotal())
	}
	return res, nil
}

// pollProgress asks for the progress of task id until ctx ends and reports
// changes; it returns the last values reported.
func (e *Remote) pollProgress(ctx context.Context, id string, progress drivers.Progress) [2]int64 {
	last := [2]int64{-1, -1}
	t := time.NewTicker(e.poll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return last
		case <-t.C:
		}
		resp, err := e.client.GetTask(ctx, connect.NewRequest(&stowagev1.GetTaskRequest{TaskId: id}))
		if err != nil {
			continue // not started yet, or a transient failure: RunTask decides
		}
		r := resp.Msg.GetResult()
		if r.GetDone() {
			return last
		}
		if cur := [2]int64{r.GetBytesDone(), r.GetBytesTotal()}; cur != last && ctx.Err() == nil {
			progress(cur[0], cur[1])
			last = cur
		}
	}
}

// dropped says whether err is the connection to the agent failing (reset,
// refused, cut short) rather than an answer from it.
func dropped(err error) bool {
	var ce *connect.Error
	if errors.As(err, &ce) {
		switch ce.Code() {
		case connect.CodeUnknown, connect.CodeUnavailable, connect.CodeInternal,
			connect.CodeCanceled: // connect's code for a reset connection
		default:
			return false // the agent answered with a code
		}
	}
	var op *net.OpError
	return errors.As(err, &op) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF)
}

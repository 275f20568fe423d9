package drivers

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"sync"
)

// taskIDKey is the context key of a task id.
type taskIDKey struct{}

// taskID is the value stored under taskIDKey: the caller's id and, for
// StepTaskID, how often each step key was seen under it.
type taskID struct {
	id   string
	mu   sync.Mutex
	seen map[string]int
}

// WithTaskID returns a context carrying the deterministic task id of one
// plan step. The controller's job runner sets it so that, after a
// controller restart, re-running the step sends the same ids to the agents,
// which return the journalled results (or wait for the running task)
// instead of doing the work twice. Without it an Endpoint makes up a fresh
// id per call.
//
// One step may make several Endpoint calls with the same context; the
// remote Endpoint derives one id per call with StepTaskID.
func WithTaskID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, taskIDKey{}, &taskID{id: id, seen: map[string]int{}})
}

// TaskIDFrom returns the task id WithTaskID put in ctx.
func TaskIDFrom(ctx context.Context) (string, bool) {
	v, ok := ctx.Value(taskIDKey{}).(*taskID)
	if !ok || v.id == "" {
		return "", false
	}
	return v.id, true
}

// taskIDChars is what an agent accepts in a task id.
var taskIDChars = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)

// StepTaskID derives the id of one Endpoint call from the task id in ctx
// and key, which names the call (its kind and a digest of its arguments):
// "<id>.<key>" for the first call with that key, "<id>.<key>.<n>" for the
// n-th. Re-running a step that makes the same calls in the same order per
// key gives the same ids; a call the first run did not make gets a new id
// rather than another call's result. Ids longer than 128 characters or
// with characters an agent refuses are replaced by "t-" and a hex SHA-256
// of the derived id. It reports false when ctx carries no task id.
func StepTaskID(ctx context.Context, key string) (string, bool) {
	v, ok := ctx.Value(taskIDKey{}).(*taskID)
	if !ok || v.id == "" {
		return "", false
	}
	v.mu.Lock()
	v.seen[key]++
	n := v.seen[key]
	v.mu.Unlock()
	id := v.id + "." + key
	if n > 1 {
		id += "." + strconv.Itoa(n)
	}
	if !taskIDChars.MatchString(id) {
		sum := sha256.Sum256([]byte(id))
		id = "t-" + hex.EncodeToString(sum[:])
	}
	return id, true
}

// hostKey is the context key of a step's host.
type hostKey struct{}

// WithHost returns a context naming the host the plan chose for a step.
// An Endpoints implementation (the controller's EndPointSelector) returns
// that host from ForScope while it is Up and in scope, so that a driver's
// host work runs where the plan (and its dry run) said, and a step re-run
// after a restart reaches the agent that journalled it.
func WithHost(ctx context.Context, hostID string) context.Context {
	if hostID == "" {
		return ctx
	}
	return context.WithValue(ctx, hostKey{}, hostID)
}

// HostFrom returns the host WithHost put in ctx.
func HostFrom(ctx context.Context) (string, bool) {
	h, ok := ctx.Value(hostKey{}).(string)
	return h, ok && h != ""
}

// ErrCancelledOnRequest is the cause (context.Cause) given to the context of
// work someone cancelled on purpose: `stowage job cancel` (the controller's
// job runner) or the AgentService's CancelTask (the agent's journal). It
// tells a cancel that must reach the host, and whose partial output must
// go, from a process stopping, whose work resumes at the next start and
// whose staged bytes are kept for that. It wraps context.Canceled.
var ErrCancelledOnRequest = fmt.Errorf("cancelled on request: %w", context.Canceled)

// CancelledOnRequest reports whether ctx ended with ErrCancelledOnRequest.
func CancelledOnRequest(ctx context.Context) bool {
	return ctx.Err() != nil && errors.Is(context.Cause(ctx), ErrCancelledOnRequest)
}

// taskHostKey is the context key of a step's task-host recorder.
type taskHostKey struct{}

// WithTaskHostRecorder returns a context whose host calls report, through
// NoteTaskHost, each host they are about to send a task to. The job runner
// sets it per plan step and records the host durably before the task
// leaves, so that a controller restarted while the job is cancelled knows
// which agents to send CancelTask to.
func WithTaskHostRecorder(ctx context.Context, record func(ctx context.Context, hostID string) error) context.Context {
	return context.WithValue(ctx, taskHostKey{}, record)
}

// NoteTaskHost tells the recorder in ctx (WithTaskHostRecorder), if any,
// that a task of the step is about to be sent to hostID. An error means
// the host could not be recorded and the task must not be sent.
func NoteTaskHost(ctx context.Context, hostID string) error {
	record, ok := ctx.Value(taskHostKey{}).(func(context.Context, string) error)
	if !ok || record == nil || hostID == "" {
		return nil
	}
	return record(ctx, hostID)
}

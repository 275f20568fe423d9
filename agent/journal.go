package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stowage/stowage/failpoint"

	"google.golang.org/protobuf/proto"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/redact"
)

// journal keeps the result of every finished task under dir/<task-id>.pb so
// that a task retried by the controller (after a lost reply or a controller
// restart) returns its first result instead of running twice. Entries are
// written temp+fsync+rename and expire after retain: at open, and then
// every sweepEvery while the agent runs (sweep), so the directory holds
// at most retain's worth of results however long the agent lives.
//
// A task runs under the journal's base context, not its caller's: when the
// caller goes away (a controller restart drops the RunTask call) the task
// goes on, and the same id sent again waits for it. A task nobody waits for
// or asks about (GetTask) for grace is cancelled, so an abandoned job does
// not run forever; cancelled and unavailable outcomes are not journalled,
// so the next attempt runs the task again (and a download resumes). A
// source that stayed away for the copy engine's retry window
// (stream.ErrRetriesExhausted) is answered as the task's failure, so the
// controller does not retry it as if the agent were unreachable; it is not
// journalled either.
//
// A task cancelled on request (cancel: the controller's CancelTask, from
// `stowage job cancel`) is different: its context ends with
// drivers.ErrCancelledOnRequest, so its step removes what it staged
// instead of keeping it to resume, and its result is journalled as
// cancelled (error class "context canceled"): the job that sent it has
// ended, and the same id sent again must not do the work.
type journal struct {
	dir    string
	retain time.Duration
	grace  time.Duration
	base   context.Context

	mu      sync.Mutex
	running map[string]*task
}

// task is a running task.
type task struct {
	done   chan struct{} // closed when res and err are set
	res    *stowagev1.TaskResult
	err    error
	cancel context.CancelCauseFunc

	bytesDone, bytesTotal atomic.Int64

	waiters int         // RunTask calls waiting (under journal.mu)
	orphan  *time.Timer // cancels the task when nobody waits (under journal.mu)
}

// defaultGrace is how long a task with no caller keeps running.
const defaultGrace = 2 * time.Minute

var taskIDPattern = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)

func openJournal(dir string, retain time.Duration) (*journal, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("task journal %s: %w", dir, err)
	}
	j := &journal{dir: dir, retain: retain, grace: defaultGrace, base: context.Background(), running: map[string]*task{}}
	j.expire(true)
	return j, nil
}

// sweepEvery is how often a running agent expires journal entries.
const sweepEvery = time.Minute

// sweep expires entries every interval until ctx ends.
func (j *journal) sweep(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			j.expire(false)
		}
	}
}

func (j *journal) path(id string) string { return filepath.Join(j.dir, id+".pb") }

// get returns the journalled result of id, or ErrNotFound.
func (j *journal) get(id string) (*stowagev1.TaskResult, error) {
	if !taskIDPattern.MatchString(id) {
		return nil, fmt.Errorf("task id %q: %w", id, errdefs.ErrInvalid)
	}
	b, err := os.ReadFile(j.path(id))
	if os.IsNotExist(err) {
		return nil, fmt.Errorf("task %s: no journalled result: %w", id, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("task %s: read journal: %w", id, err)
	}
	res := &stowagev1.TaskResult{}
	if err := proto.Unmarshal(b, res); err != nil {
		return nil, fmt.Errorf("task %s: corrupt journal entry: %w", id, errdefs.ErrDataLoss)
	}
	return res, nil
}

// status returns the journalled result of id, or the progress of the
// running task (Done false), or ErrNotFound. Asking keeps a task whose
// caller went away alive for another grace period.
func (j *journal) status(id string) (*stowagev1.TaskResult, error) {
	if res, err := j.get(id); err == nil || !errdefs.IsNotFound(err) {
		return res, err
	}
	j.mu.Lock()
	t := j.running[id]
	if t != nil && t.orphan != nil {
		t.orphan.Reset(j.grace)
	}
	j.mu.Unlock()
	if t != nil {
		return &stowagev1.TaskResult{TaskId: id, BytesDone: t.bytesDone.Load(), BytesTotal: t.bytesTotal.Load()}, nil
	}
	return j.get(id) // it may have finished in between
}

// inFlight is the number of running tasks.
func (j *journal) inFlight() int32 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return int32(len(j.running))
}

// run executes fn once per task id: a duplicate of a running task waits for
// it, a later duplicate gets the journalled result. Definite failures are
// journalled with their class; transient ones (unavailable, cancelled) are
// returned and not journalled, so a retry runs again. fn gets the task's
// context and a progress callback whose latest values status reports.
func (j *journal) run(ctx context.Context, id string, fn func(context.Context, drivers.Progress) (*stowagev1.TaskResult, error)) (*stowagev1.TaskResult, error) {
	if !taskIDPattern.MatchString(id) {
		return nil, fmt.Errorf("task id %q: must be 1-128 of [A-Za-z0-9._-]: %w", id, errdefs.ErrInvalid)
	}
	if res, err := j.get(id); err == nil {
		return res, nil
	}
	j.mu.Lock()
	t := j.running[id]
	if t == nil {
		// Checked again under the lock: a task finishing meanwhile is
		// journalled before it leaves running.
		if res, err := j.get(id); err == nil {
			j.mu.Unlock()
			return res, nil
		}
		if j.cancelledAncestor(id) {
			// Its step was cancelled (a call that crossed the cancel).
			res := cancelledResult(id)
			err := j.put(res)
			j.mu.Unlock()
			return res, err
		}
		tctx, cancel := context.WithCancelCause(j.base) // the agent stops: the task is cancelled
		t = &task{done: make(chan struct{}), cancel: cancel}
		j.running[id] = t
		go j.execute(tctx, id, t, fn)
	}
	t.waiters++
	if t.orphan != nil {
		t.orphan.Stop()
		t.orphan = nil
	}
	j.mu.Unlock()

	select {
	case <-t.done:
		j.leave(t)
		return t.res, t.err
	case <-ctx.Done():
		j.leave(t)
		return nil, fmt.Errorf("task %s: %w", id, ctx.Err())
	}
}

// leave ends one wait on t; the last waiter of a running task arms its
// orphan timer.
func (j *journal) leave(t *task) {
	j.mu.Lock()
	defer j.mu.Unlock()
	t.waiters--
	select {
	case <-t.done:
		return
	default:
	}
	if t.waiters == 0 && t.orphan == nil {
		t.orphan = time.AfterFunc(j.grace, func() {
			j.mu.Lock()
			abandoned := t.waiters == 0
			j.mu.Unlock()
			if abandoned {
				t.cancel(nil)
			}
		})
	}
}

// execute runs fn for t and journals its outcome.
func (j *journal) execute(ctx context.Context, id string, t *task, fn func(context.Context, drivers.Progress) (*stowagev1.TaskResult, error)) {
	var res *stowagev1.TaskResult
	err := failpoint.Hit(failpoint.AgentTaskStart)
	if err == nil {
		res, err = fn(ctx, func(done, total int64) {
			t.bytesDone.Store(done)
			t.bytesTotal.Store(total)
		})
	}
	if err == nil {
		err = failpoint.Hit(failpoint.AgentTaskFinish)
	}
	journal := true
	if err != nil && ctx.Err() == nil && errors.Is(err, stream.ErrRetriesExhausted) {
		// The source stayed away for the copy engine's whole retry window:
		// a final answer for this call (the controller must not run the
		// window again and call the host unreachable), but not journalled,
		// so a later attempt at the step tries the source afresh.
		res = &stowagev1.TaskResult{ErrorClass: errdefs.ClassName(err), Error: redact.Text(err.Error())}
		err, journal = nil, false
	}
	if err != nil {
		switch {
		case drivers.CancelledOnRequest(ctx):
			// Journalled: a cancelled task's job has ended, and the same
			// id sent again gets this result rather than a new run.
			res = cancelledResult(id)
			err = nil
		case errdefs.IsUnavailable(err) || ctx.Err() != nil:
			res = nil
		default:
			// The message is journalled and read by the controller: a URL
			// in it (the task's source) loses its secrets.
			res = &stowagev1.TaskResult{ErrorClass: errdefs.ClassName(err), Error: redact.Text(err.Error())}
			if res.ErrorClass == "" {
				res.ErrorClass = errdefs.ErrInternal.Error()
			}
			err = nil
		}
	}
	if res != nil {
		res.TaskId, res.Done = id, true
		res.BytesDone, res.BytesTotal = t.bytesDone.Load(), t.bytesTotal.Load()
		if journal {
			if perr := j.put(res); perr != nil {
				res, err = nil, perr
			}
		}
	}
	t.res, t.err = res, err
	j.mu.Lock()
	delete(j.running, id)
	if t.orphan != nil {
		t.orphan.Stop()
		t.orphan = nil
	}
	j.mu.Unlock()
	t.cancel(nil)
	close(t.done)
}

// cancelledResult is the journalled result of a task cancelled on request.
func cancelledResult(id string) *stowagev1.TaskResult {
	return &stowagev1.TaskResult{
		TaskId: id, Done: true,
		ErrorClass: errdefs.ClassName(context.Canceled),
		Error:      fmt.Sprintf("task %s: %v", id, drivers.ErrCancelledOnRequest),
	}
}

// cancel stops task id on request and returns its journalled result once
// it has ended (or ctx's error when ctx ends first). A running task's
// context is cancelled with drivers.ErrCancelledOnRequest; an id that is
// not running and has no result is journalled as cancelled, so a RunTask
// for it arriving late (a call that crossed the cancel) does not start;
// a finished task keeps its result.
//
// Ids are hierarchical: a plan step's id (jobs.StepTaskID) is the prefix
// of the ids of every task the step sends ("<step id>.<call>",
// drivers.StepTaskID). Cancelling id also cancels, and waits for, every
// running task whose id starts with id + ".", and its cancelled journal
// entry keeps such tasks arriving later from starting (run). That is how
// a controller that knows only the job and the step (one resumed after a
// crash, jobs.Runner) cancels the step's calls.
func (j *journal) cancel(ctx context.Context, id string) (*stowagev1.TaskResult, error) {
	if !taskIDPattern.MatchString(id) {
		return nil, fmt.Errorf("task id %q: must be 1-128 of [A-Za-z0-9._-]: %w", id, errdefs.ErrInvalid)
	}
	j.mu.Lock()
	var derived []*task
	for rid, rt := range j.running {
		if strings.HasPrefix(rid, id+".") {
			rt.cancel(drivers.ErrCancelledOnRequest)
			derived = append(derived, rt)
		}
	}
	t := j.running[id]
	if t == nil {
		// Under the lock, like run: a task is journalled before it leaves
		// running, and run checks the journal before it starts one.
		res, err := j.get(id)
		if errdefs.IsNotFound(err) {
			res = cancelledResult(id)
			err = j.put(res)
		}
		j.mu.Unlock()
		if werr := waitTasks(ctx, id, derived); werr != nil {
			return nil, werr
		}
		return res, err
	}
	t.cancel(drivers.ErrCancelledOnRequest)
	j.mu.Unlock()
	if err := waitTasks(ctx, id, append(derived, t)); err != nil {
		return nil, err
	}
	if t.err != nil {
		return nil, t.err
	}
	return t.res, nil
}

// waitTasks waits until every task of ts (cancelled with id) has ended.
func waitTasks(ctx context.Context, id string, ts []*task) error {
	for _, t := range ts {
		select {
		case <-t.done:
		case <-ctx.Done():
			return fmt.Errorf("task %s: cancelled, not ended yet: %w", id, ctx.Err())
		}
	}
	return nil
}

// cancelledAncestor reports whether a prefix of id ending before one of
// its dots (the step it derives from) was cancelled (cancel).
func (j *journal) cancelledAncestor(id string) bool {
	for i := 0; i < len(id); i++ {
		if id[i] != '.' {
			continue
		}
		res, err := j.get(id[:i])
		if err == nil && res.GetErrorClass() == errdefs.ClassName(context.Canceled) {
			return true
		}
	}
	return false
}

func (j *journal) put(res *stowagev1.TaskResult) error {
	b, err := proto.Marshal(res)
	if err != nil {
		return fmt.Errorf("task %s: encode result: %w", res.TaskId, err)
	}
	tmp, err := os.CreateTemp(j.dir, ".wip-*")
	if err != nil {
		return fmt.Errorf("task %s: journal: %w", res.TaskId, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), j.path(res.TaskId))
	}
	if err != nil {
		return fmt.Errorf("task %s: journal: %w", res.TaskId, err)
	}
	return nil
}

// staleTemp is the age past which a temporary file is a leftover of a
// put that will never finish (a put takes one write and an fsync).
const staleTemp = 10 * time.Minute

// expire removes entries older than retain and leftover temporary files:
// all of them at open (allTemps; no put runs yet), only stale ones later,
// when a put may be writing one.
func (j *journal) expire(allTemps bool) {
	entries, err := os.ReadDir(j.dir)
	if err != nil {
		return
	}
	now := time.Now()
	for _, e := range entries {
		info, err := e.Info()
		if err != nil {
			continue
		}
		age := now.Sub(info.ModTime())
		if strings.HasPrefix(e.Name(), ".wip-") {
			if allTemps || age > staleTemp {
				os.Remove(filepath.Join(j.dir, e.Name()))
			}
			continue
		}
		if age > j.retain {
			os.Remove(filepath.Join(j.dir, e.Name()))
		}
	}
}

// Package jobs runs the controller's asynchronous jobs (CloudStack's
// async_job). Every long operation is a persisted Job with a Plan; a Handler
// per job kind does the work by dispatching plan steps to agents. The runner
// moves the job through its state machine (Pending, Running, Cancelling,
// Succeeded, Failed, Cancelled), streams progress to watchers, and, after a
// controller restart, runs every unfinished job again: steps carry
// deterministic task ids (StepTaskID), so an agent returns the journalled
// result of a step it already ran instead of running it twice. A job that
// cannot finish fails cleanly: its handler's Fail puts every object it
// touched into a stable state, so nothing stays Creating or Copying forever.
package jobs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/attribute"
	"google.golang.org/protobuf/proto"

	"github.com/stowage/stowage/controller/apiauth"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/failpoint"
	"github.com/stowage/stowage/oteltrace"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/redact"
)

// Handler runs one kind of job.
type Handler interface {
	// Run does the job's work. It may be called again for a job a previous
	// controller left unfinished, so it must pick up where that one stopped:
	// steps are idempotent and use StepContext for their task ids.
	Run(ctx context.Context, job *stowagev1.Job, r *Reporter) error
	// Fail puts the objects of a job that failed or was cancelled into a
	// stable state (Failed, Ready again, or removed). It runs with a fresh
	// context and must be idempotent too.
	Fail(ctx context.Context, job *stowagev1.Job, cause error) error
}

// Starter is an optional role of a Handler: Start writes, in the
// transaction that moves a job from Pending to Running, what starting the
// job means for its objects (a volume Allocated -> Creating), one fsync'd
// write instead of two. An error from Start is not the job's: the job
// starts without it, and Run finds its objects as they were.
type Starter interface {
	Start(tx *meta.Tx, job *stowagev1.Job) error
}

// Runner runs jobs.
type Runner struct {
	db       *meta.DB
	log      *slog.Logger
	handlers map[string]Handler

	mu      sync.Mutex
	base    context.Context
	running map[string]context.CancelCauseFunc
	latest  map[string]*stowagev1.Job // in-memory view with fresh progress
	subs    map[string]map[chan *stowagev1.Job]struct{}
	wg      sync.WaitGroup

	// maxPerCaller caps the unfinished jobs of one API caller; 0: no cap.
	maxPerCaller int
	// callerLocks serialise the count-and-insert of one caller's submits
	// (a buffered channel of one per caller, so acquiring honours ctx).
	callerLocks map[string]chan struct{}

	// canceller reaches the agents of a job resumed in Cancelling.
	canceller TaskCanceller
	// onEnd is told each job this runner stops running (SetOnEnd).
	onEnd func(jobID string)

	finished *prometheus.CounterVec
}

// SetOnEnd sets what is told the id of each job this runner stops running,
// whatever the reason: it ended, could not start, or the runner is shutting
// down (a job resumed later runs again). The controller releases the
// job's capacity reservations with it. Call it before Start.
func (r *Runner) SetOnEnd(f func(jobID string)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.onEnd = f
}

// TaskCanceller passes a cancel on to one host: the controller's endpoint
// selector sends AgentService.CancelTask to the host's agent.
type TaskCanceller interface {
	// CancelTask cancels taskID (a plan step's StepTaskID: every task the
	// step sent derives from it) on hostID and returns once the agent has
	// stopped them and removed what they staged.
	CancelTask(ctx context.Context, hostID, taskID string) error
}

// SetTaskCanceller sets how a job resumed in Cancelling reaches the hosts
// of its unfinished steps. Without one such a job is finished without
// telling them (their agents cancel the tasks after their grace period).
// Call it before Resume.
func (r *Runner) SetTaskCanceller(c TaskCanceller) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.canceller = c
}

// DefaultMaxJobsPerCaller is the default of SetMaxJobsPerCaller.
const DefaultMaxJobsPerCaller = 64

// New returns a runner over db. Register handlers, then Start it.
func New(db *meta.DB, log *slog.Logger) *Runner {
	return &Runner{
		db: db, log: log, handlers: map[string]Handler{},
		running: map[string]context.CancelCauseFunc{},
		latest:  map[string]*stowagev1.Job{},
		subs:    map[string]map[chan *stowagev1.Job]struct{}{},

		maxPerCaller: DefaultMaxJobsPerCaller,
		callerLocks:  map[string]chan struct{}{},
		finished: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "stowage_jobs_finished_total",
			Help: "Jobs this controller finished, by kind and result: succeeded, failed, cancelled, or data_loss (failed on a checksum mismatch or other lost or corrupt data).",
		}, []string{"kind", "result"}),
	}
}

// Collectors are the runner's metrics, for the controller's registry.
func (r *Runner) Collectors() []prometheus.Collector { return []prometheus.Collector{r.finished} }

// SetMaxJobsPerCaller caps the jobs one API caller (the token that asked,
// apiauth.CallerFrom) may have unfinished at once: Submit refuses one more
// with errdefs.ErrResourceExhausted. n <= 0 removes the cap. Jobs submitted
// without a caller (the controller's own, or with authentication off) are
// never capped. Call it before Start.
func (r *Runner) SetMaxJobsPerCaller(n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.maxPerCaller = max(n, 0)
}

// Register adds the handler of job kind; registering a kind twice panics.
func (r *Runner) Register(kind string, h Handler) {
	if _, dup := r.handlers[kind]; dup {
		panic("jobs: kind " + kind + " registered twice")
	}
	r.handlers[kind] = h
}

// Start sets the context jobs run under; when it ends, running jobs stop
// where they are (they are not failed) and resume at the next start.
func (r *Runner) Start(ctx context.Context) {
	r.mu.Lock()
	r.base = ctx
	r.mu.Unlock()
}

// Resume runs again the jobs a previous controller left unfinished.
func (r *Runner) Resume(ctx context.Context) error {
	unfinished, err := r.db.Jobs().List(ctx, meta.Filter[*stowagev1.Job]{Where: func(j *stowagev1.Job) bool {
		return !terminal(j.GetState())
	}})
	if err != nil {
		return fmt.Errorf("resume jobs: %w", err)
	}
	for _, j := range unfinished {
		r.mu.Lock()
		_, mine := r.running[j.GetId()]
		r.mu.Unlock()
		if mine {
			continue // submitted to this controller since it started
		}
		r.log.Info("resuming job left by a previous controller", "job", j.GetId(), "kind", j.GetKind(), "state", meta.JobStateName(j.GetState()))
		r.launch(j)
	}
	return nil
}

// Wait blocks until every running job goroutine has returned (after the
// Start context ends).
func (r *Runner) Wait() { r.wg.Wait() }

func terminal(s stowagev1.JobState) bool {
	return s == stowagev1.JobState_JOB_STATE_SUCCEEDED || s == stowagev1.JobState_JOB_STATE_FAILED || s == stowagev1.JobState_JOB_STATE_CANCELLED
}

// NewJob returns a Pending job record for kind on target with plan and params.
// The plan's reasons are redacted (RedactPlan): a job record never keeps a
// URL's secrets.
func NewJob(kind, target, idempotencyKey string, plan *stowagev1.Plan, params *stowagev1.JobParams) *stowagev1.Job {
	RedactPlan(plan)
	return &stowagev1.Job{
		Id: meta.NewID(), Kind: kind, TargetId: target, State: stowagev1.JobState_JOB_STATE_PENDING,
		Plan: plan, JobParams: params, IdempotencyKey: idempotencyKey, Progress: &stowagev1.JobProgress{Phase: "queued"},
	}
}

// RedactPlan redacts, in place, the URLs quoted in plan's reasons and its
// steps' reasons and errors (redact.Text).
func RedactPlan(plan *stowagev1.Plan) {
	if plan == nil {
		return
	}
	for i, r := range plan.Reasons {
		plan.Reasons[i] = redact.Text(r)
	}
	for _, s := range plan.GetSteps() {
		s.Reason, s.Error = redact.Text(s.GetReason()), redact.Text(s.GetError())
	}
}

// ByIdempotencyKey returns the job created earlier with key, or ErrNotFound.
func (r *Runner) ByIdempotencyKey(ctx context.Context, key string) (*stowagev1.Job, error) {
	if key == "" {
		return nil, fmt.Errorf("empty idempotency key: %w", errdefs.ErrNotFound)
	}
	return r.db.Jobs().GetBy(ctx, meta.IndexIdempotencyKey, key)
}

// Launch starts a job whose record the caller has created (state Pending).
func (r *Runner) Launch(job *stowagev1.Job) { r.launch(job) }

func (r *Runner) launch(job *stowagev1.Job) {
	h, ok := r.handlers[job.GetKind()]
	r.mu.Lock()
	if _, running := r.running[job.GetId()]; running {
		r.mu.Unlock()
		return
	}
	base := r.base
	if base == nil {
		base = context.Background()
	}
	ctx, cancel := context.WithCancelCause(base)
	r.running[job.GetId()] = cancel
	r.latest[job.GetId()] = proto.Clone(job).(*stowagev1.Job)
	onEnd := r.onEnd
	r.mu.Unlock()
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		defer func() {
			cancel(nil)
			r.mu.Lock()
			delete(r.running, job.GetId())
			delete(r.latest, job.GetId())
			r.mu.Unlock()
			if onEnd != nil {
				onEnd(job.GetId())
			}
		}()
		ctx, span := oteltrace.Start(oteltrace.WithParent(ctx, job.GetTraceParent()), "job "+job.GetKind(),
			attribute.String("stowage.job.id", job.GetId()), attribute.String("stowage.job.state", meta.JobStateName(job.GetState())))
		if !ok {
			err := fmt.Errorf("no handler for job kind %q: %w", job.GetKind(), errdefs.ErrNotImplemented)
			r.finish(ctx, job, nil, err, nil)
			oteltrace.End(span, err)
			return
		}
		oteltrace.End(span, r.run(ctx, h, job))
	}()
}

// run runs job with h to its end and returns the job's error (for its
// span), nil when it succeeded or was left to resume.
func (r *Runner) run(ctx context.Context, h Handler, job *stowagev1.Job) error {
	var err error
	switch job.GetState() {
	case stowagev1.JobState_JOB_STATE_PENDING:
		job, err = r.start(ctx, h, job)
		if err != nil {
			r.log.WarnContext(ctx, "job could not start", "job", job.GetId(), "err", err)
			return err
		}
	case stowagev1.JobState_JOB_STATE_CANCELLING:
		// Cancelled while a previous controller ran it, which may have
		// died before the cancel reached the agents: their tasks would run
		// on and could publish after the job says Cancelled. They are
		// cancelled first, then the handler's Fail cleans up as for a
		// live cancel.
		r.cancelSteps(ctx, job)
		if ctx.Err() != nil {
			r.log.InfoContext(ctx, "job cancel interrupted by shutdown; it resumes at the next start", "job", job.GetId())
			return nil
		}
		err := fmt.Errorf("job %s was cancelled: %w", job.GetId(), drivers.ErrCancelledOnRequest)
		r.finish(ctx, job, h, err, nil)
		return err
	}
	r.publish(job)
	rep := &Reporter{runner: r, job: proto.Clone(job).(*stowagev1.Job)}
	runErr := h.Run(ctx, job, rep)
	if runErr != nil {
		// A job that succeeded saves its progress and plan with its
		// final state (finish); one interrupted by a shutdown returns
		// before finish and keeps them for its resumption.
		rep.flush(context.WithoutCancel(ctx))
	}
	r.mu.Lock()
	base := r.base
	r.mu.Unlock()
	if runErr != nil && base != nil && base.Err() != nil {
		r.log.InfoContext(ctx, "job interrupted by shutdown; it resumes at the next start", "job", job.GetId())
		return nil
	}
	r.finish(ctx, rep.snapshot(), h, runErr, rep.onSuccess())
	return runErr
}

// start moves job from Pending to Running, with what h's Start writes
// when h is a Starter.
func (r *Runner) start(ctx context.Context, h Handler, job *stowagev1.Job) (*stowagev1.Job, error) {
	running := func(j *stowagev1.Job) error {
		j.Progress = &stowagev1.JobProgress{Phase: "running"}
		return nil
	}
	if st, ok := h.(Starter); ok {
		var started *stowagev1.Job
		var startErr error
		err := r.db.Txn(ctx, func(tx *meta.Tx) error {
			if startErr = st.Start(tx, job); startErr != nil {
				return startErr
			}
			var err error
			started, err = meta.Jobs.TransitionTx(tx, job.GetId(), 0, meta.JobStart, running)
			return err
		})
		if startErr == nil {
			return started, err
		}
		r.log.Debug("job starts without its handler's start", "job", job.GetId(), "err", startErr)
	}
	return r.db.Jobs().Transition(ctx, job.GetId(), meta.JobStart, running)
}

// stepCancelTimeout bounds how long a resumed cancel waits for one host's
// agent: its retries cover an agent restarting (about 13 s).
const stepCancelTimeout = 30 * time.Second

// cancelSteps sends CancelTask for every step of job that did not
// succeed, to each host the step sent tasks to (PlanStep.task_hosts, recorded
// before each task left; the planned host for a running step of a job
// recorded before that field), and waits for the agents to stop them. An
// agent that cannot be reached is logged and left to its grace period.
func (r *Runner) cancelSteps(ctx context.Context, job *stowagev1.Job) {
	r.mu.Lock()
	c := r.canceller
	r.mu.Unlock()
	var wg sync.WaitGroup
	for _, s := range job.GetPlan().GetSteps() {
		// A step that failed may have failed only because its controller
		// stopped (RunStep records the interruption), while its tasks ran
		// on: only a step that succeeded has nothing left on its hosts.
		if s.GetState() == stowagev1.JobState_JOB_STATE_SUCCEEDED {
			continue
		}
		hosts := slices.Clone(s.GetTaskHosts())
		if len(hosts) == 0 && s.GetState() == stowagev1.JobState_JOB_STATE_RUNNING && s.GetHostId() != "" {
			hosts = append(hosts, s.GetHostId())
		}
		id := StepTaskID(job, s.GetName())
		for _, host := range hosts {
			if c == nil {
				r.log.Warn("no task canceller: the step's tasks stop when their agent's grace period ends", "job", job.GetId(), "host", host, "task", id)
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				cctx, cancel := context.WithTimeout(ctx, stepCancelTimeout)
				defer cancel()
				start := time.Now()
				if err := c.CancelTask(cctx, host, id); err != nil {
					r.log.Warn("step of a cancelled job not cancelled on its host; its tasks stop when their grace period ends",
						"job", job.GetId(), "step", s.GetName(), "host", host, "err", err)
					return
				}
				r.log.Info("step of a job resumed in Cancelling cancelled on its host", "job", job.GetId(), "step", s.GetName(), "host", host,
					"took", time.Since(start).Round(time.Millisecond))
			}()
		}
	}
	wg.Wait()
}

// finish records the end of a job: Succeeded, or (after the handler's Fail)
// Failed or Cancelled. The error is redacted (redact.Error) before anything
// sees it: the handler's Fail (which records it on objects), the job record
// and the log. commit (Reporter.OnSuccess), when not nil, writes in the
// transaction that records the success; its error fails the job instead.
func (r *Runner) finish(ctx context.Context, job *stowagev1.Job, h Handler, runErr error, commit func(*meta.Tx) error) {
	ctx = context.WithoutCancel(ctx)
	var final *stowagev1.Job
	var err error
	if runErr == nil {
		var commitErr error
		err = r.db.Txn(ctx, func(tx *meta.Tx) error {
			if commit != nil {
				if commitErr = commit(tx); commitErr != nil {
					return commitErr
				}
			}
			var err error
			final, err = meta.Jobs.TransitionTx(tx, job.GetId(), 0, meta.JobSucceed, func(j *stowagev1.Job) error {
				j.Progress = proto.Clone(job.GetProgress()).(*stowagev1.JobProgress)
				if j.Progress == nil {
					j.Progress = &stowagev1.JobProgress{}
				}
				j.Progress.Phase = "done"
				j.Plan = job.GetPlan()
				j.Result = job.GetResult()
				return nil
			})
			return err
		})
		if commitErr != nil {
			// What the handler left to write with the success could not
			// be written: the job failed.
			runErr, err = commitErr, nil
		}
	}
	runErr = redact.Error(runErr)
	if runErr != nil {
		if h != nil {
			fctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			if ferr := h.Fail(fctx, job, runErr); ferr != nil {
				r.log.Error("job cleanup failed; objects may need the next recovery", "job", job.GetId(), "err", ferr)
			}
			cancel()
		}
		event := meta.JobFail
		cur, gerr := r.db.Jobs().Get(ctx, job.GetId())
		if gerr == nil && cur.GetState() == stowagev1.JobState_JOB_STATE_CANCELLING {
			event = meta.JobCancelled
		}
		final, err = r.db.Jobs().Transition(ctx, job.GetId(), event, func(j *stowagev1.Job) error {
			j.Error = runErr.Error()
			if j.Progress == nil {
				j.Progress = &stowagev1.JobProgress{}
			}
			j.Progress.Phase = "failed"
			if event == meta.JobCancelled {
				j.Progress.Phase = "cancelled"
			}
			j.Plan = job.GetPlan()
			return nil
		})
		r.log.Warn("job failed", "job", job.GetId(), "kind", job.GetKind(), "err", runErr)
	}
	if err != nil {
		r.log.Error("job end could not be recorded", "job", job.GetId(), "err", err)
		return
	}
	r.finished.WithLabelValues(job.GetKind(), finishResult(final, runErr)).Inc()
	r.publish(final)
}

// finishResult is the result label of stowage_jobs_finished_total.
func finishResult(final *stowagev1.Job, runErr error) string {
	switch {
	case final.GetState() == stowagev1.JobState_JOB_STATE_SUCCEEDED:
		return "succeeded"
	case final.GetState() == stowagev1.JobState_JOB_STATE_CANCELLED:
		return "cancelled"
	case errors.Is(runErr, errdefs.ErrDataLoss):
		return "data_loss"
	}
	return "failed"
}

// Get returns a job, with live progress while it runs.
func (r *Runner) Get(ctx context.Context, id string) (*stowagev1.Job, error) {
	r.mu.Lock()
	live, ok := r.latest[id]
	if ok {
		live = proto.Clone(live).(*stowagev1.Job)
	}
	r.mu.Unlock()
	if ok {
		return live, nil
	}
	j, err := r.db.Jobs().Get(ctx, id)
	if errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("job %q: no such job; see `stowage job list`: %w", id, errdefs.ErrNotFound)
	}
	return j, err
}

// ListFilter selects jobs for List and Page: every field set must match.
type ListFilter struct {
	State  stowagev1.JobState
	Target string
}

// filter is f as a metadata scan over the narrowest index f names.
func (f ListFilter) filter(after string, limit int) meta.Filter[*stowagev1.Job] {
	mf := meta.Filter[*stowagev1.Job]{After: after, Limit: limit}
	switch {
	case f.Target != "":
		mf.Index, mf.Value = meta.IndexTargetID, f.Target
	case f.State != stowagev1.JobState_JOB_STATE_UNSPECIFIED:
		mf.Index, mf.Value = meta.IndexState, meta.JobStateName(f.State)
	}
	mf.Where = func(j *stowagev1.Job) bool {
		return (f.State == stowagev1.JobState_JOB_STATE_UNSPECIFIED || j.GetState() == f.State) && (f.Target == "" || j.GetTargetId() == f.Target)
	}
	return mf
}

// List returns the newest limit jobs (all when limit is 0), newest first,
// that f selects. It reads every job f selects (the store scans in id
// order only); Page reads one page.
func (r *Runner) List(ctx context.Context, f ListFilter, limit int) ([]*stowagev1.Job, error) {
	js, err := r.db.Jobs().List(ctx, f.filter("", 0))
	if err != nil {
		return nil, fmt.Errorf("list jobs: %w", err)
	}
	// Ids are time-ordered: newest first is the reverse.
	for i, k := 0, len(js)-1; i < k; i, k = i+1, k-1 {
		js[i], js[k] = js[k], js[i]
	}
	if limit > 0 && len(js) > limit {
		js = js[:limit]
	}
	return r.live(js), nil
}

// Page returns up to limit jobs (0: no limit) that f selects with ids
// after after, oldest first.
func (r *Runner) Page(ctx context.Context, f ListFilter, after string, limit int) ([]*stowagev1.Job, error) {
	js, err := r.db.Jobs().List(ctx, f.filter(after, limit))
	if err != nil {
		return nil, fmt.Errorf("list jobs: %w", err)
	}
	return r.live(js), nil
}

// live replaces the jobs running in this process by their latest progress.
func (r *Runner) live(js []*stowagev1.Job) []*stowagev1.Job {
	r.mu.Lock()
	for i, j := range js {
		if live, ok := r.latest[j.GetId()]; ok {
			js[i] = proto.Clone(live).(*stowagev1.Job)
		}
	}
	r.mu.Unlock()
	return js
}

// Cancel asks a job to stop. A job that already ended is returned as is
// with ErrFailedPrecondition. A job running in this process has its
// context cancelled with drivers.ErrCancelledOnRequest: its step's host
// calls pass the cancel on to the agents running them (hostops.Remote
// sends CancelTask), which stop and discard what they staged. A runner
// stopping (the Start context ending) cancels with a plain
// context.Canceled instead, and the agents' tasks go on for the next start.
func (r *Runner) Cancel(ctx context.Context, id string) (*stowagev1.Job, error) {
	j, err := r.db.Jobs().Transition(ctx, id, meta.JobCancelRequested, nil)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return nil, fmt.Errorf("job %q: no such job: %w", id, errdefs.ErrNotFound)
		}
		return nil, fmt.Errorf("job %s cannot be cancelled: %w", id, err)
	}
	// A controller that dies here leaves the job Cancelling with its
	// tasks running: the next start's Resume cancels them (cancelSteps).
	if err := failpoint.Hit(failpoint.JobAfterCancelRequested); err != nil {
		return nil, fmt.Errorf("job %s: %w", id, err)
	}
	r.mu.Lock()
	cancel, running := r.running[id]
	r.mu.Unlock()
	if running {
		cancel(drivers.ErrCancelledOnRequest)
	}
	r.publish(j)
	return j, nil
}

// Watch calls send with the job now and after every change until it ends
// or ctx does. Changes come from this process's runner (progress, which is
// saved only now and then) and from the metadata store's watch of the job
// record (every committed change, whichever controller made it: a follower
// serves Watch too).
func (r *Runner) Watch(ctx context.Context, id string, send func(*stowagev1.Job) error) error {
	ch := make(chan *stowagev1.Job, 16)
	r.mu.Lock()
	if r.subs[id] == nil {
		r.subs[id] = map[chan *stowagev1.Job]struct{}{}
	}
	r.subs[id][ch] = struct{}{}
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.subs[id], ch)
		if len(r.subs[id]) == 0 {
			delete(r.subs, id)
		}
		r.mu.Unlock()
	}()
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	stored := r.db.Jobs().Watch(wctx, id)
	j, err := r.Get(ctx, id)
	if err != nil {
		return err
	}
	if err := send(j); err != nil || terminal(j.GetState()) {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case j = <-ch:
		case <-stored:
			// The record changed. While the job still runs here, its live
			// copy has fresher progress; but the record of a job that has
			// ended is the truth, even before the runner lets go of the
			// live copy (which would say Running).
			if j, err = r.db.Jobs().Get(ctx, id); err != nil {
				return err
			}
			if !terminal(j.GetState()) {
				if j, err = r.Get(ctx, id); err != nil {
					return err
				}
			}
		}
		if err := send(j); err != nil {
			return err
		}
		if terminal(j.GetState()) {
			return nil
		}
	}
}

func (r *Runner) publish(j *stowagev1.Job) {
	r.mu.Lock()
	defer r.mu.Unlock()
	// The live copy follows to the end: a watcher that arrives after the
	// end was published, while the runner still holds the job, reads the
	// end from it (it used to read the last Running copy and wait for an
	// update that would never come).
	if _, ok := r.latest[j.GetId()]; ok {
		r.latest[j.GetId()] = proto.Clone(j).(*stowagev1.Job)
	}
	for ch := range r.subs[j.GetId()] {
		select {
		case ch <- proto.Clone(j).(*stowagev1.Job):
		default:
			// A slow watcher misses a progress update, never the end: the
			// oldest queued update makes room for it (only publish sends,
			// under r.mu, so the room stays).
			if terminal(j.GetState()) {
				select {
				case <-ch:
				default:
				}
				ch <- proto.Clone(j).(*stowagev1.Job)
			}
		}
	}
}

// StepTaskID is the deterministic task id of step of job.
func StepTaskID(job *stowagev1.Job, step string) string {
	return job.GetId() + "." + step
}

// StepContext returns ctx carrying the task id of step of job.
func StepContext(ctx context.Context, job *stowagev1.Job, step string) context.Context {
	return drivers.WithTaskID(ctx, StepTaskID(job, step))
}

// Reporter is how a handler reports progress and step outcomes.
type Reporter struct {
	runner  *Runner
	mu      sync.Mutex
	job     *stowagev1.Job
	commits []func(*meta.Tx) error // OnSuccess
	saved   time.Time
	start   time.Time
	doneAt  int64
}

func (rep *Reporter) snapshot() *stowagev1.Job {
	rep.mu.Lock()
	defer rep.mu.Unlock()
	return proto.Clone(rep.job).(*stowagev1.Job)
}

// Phase names what the job is doing now and resets the byte counters.
func (rep *Reporter) Phase(name string) {
	rep.mu.Lock()
	rep.job.Progress = &stowagev1.JobProgress{Phase: name}
	rep.start, rep.doneAt = time.Now(), 0
	j := proto.Clone(rep.job).(*stowagev1.Job)
	rep.mu.Unlock()
	rep.runner.publish(j)
}

// Bytes is a drivers.Progress: bytes done of total in the current phase.
func (rep *Reporter) Bytes(done, total int64) {
	rep.mu.Lock()
	p := rep.job.GetProgress()
	if p == nil {
		p = &stowagev1.JobProgress{}
		rep.job.Progress = p
	}
	if rep.start.IsZero() {
		rep.start = time.Now()
	}
	p.BytesDone, p.BytesTotal = done, total
	if el := time.Since(rep.start).Seconds(); el > 0 {
		p.BytesPerSecond = float64(done) / el
	}
	save := time.Since(rep.saved) > time.Second
	j := proto.Clone(rep.job).(*stowagev1.Job)
	rep.mu.Unlock()
	rep.runner.publish(j)
	if save {
		rep.flush(context.Background())
	}
}

// Step records the state of a plan step (by name) and its error, if any,
// and saves it.
func (rep *Reporter) Step(name string, state stowagev1.JobState, err error) {
	rep.mark(name, state, err)
	rep.flush(context.Background())
}

// mark is Step without the save: watchers see the new state at once, the
// record gets it with the job's next save.
func (rep *Reporter) mark(name string, state stowagev1.JobState, err error) {
	rep.mu.Lock()
	for _, s := range rep.job.GetPlan().GetSteps() {
		if s.GetName() == name {
			s.State = state
			s.TaskId = StepTaskID(rep.job, name)
			if err != nil {
				s.Error = redact.Text(err.Error())
			}
		}
	}
	j := proto.Clone(rep.job).(*stowagev1.Job)
	rep.mu.Unlock()
	rep.runner.publish(j)
}

// OnSuccess has fn write, when the handler's Run returns nil, in the
// transaction that records the job's success: the objects a job makes
// Ready and the job's Succeeded state commit together (one fsync'd write
// instead of two, and no window where one is recorded without the other).
// An error from fn fails the job with it (the handler's Fail runs, as for
// an error from Run). fn may run more than once (a transaction retried
// after a conflict) and must read what it changes inside tx.
func (rep *Reporter) OnSuccess(fn func(tx *meta.Tx) error) {
	rep.mu.Lock()
	rep.commits = append(rep.commits, fn)
	rep.mu.Unlock()
}

// onSuccess is the OnSuccess functions as one, nil if none.
func (rep *Reporter) onSuccess() func(*meta.Tx) error {
	rep.mu.Lock()
	fns := slices.Clone(rep.commits)
	rep.mu.Unlock()
	if len(fns) == 0 {
		return nil
	}
	return func(tx *meta.Tx) error {
		for _, fn := range fns {
			if err := fn(tx); err != nil {
				return err
			}
		}
		return nil
	}
}

// Result sets the job's one-line result summary.
func (rep *Reporter) Result(format string, args ...any) {
	rep.mu.Lock()
	rep.job.Result = redact.Text(fmt.Sprintf(format, args...))
	rep.mu.Unlock()
}

// flush persists progress and steps (not the state: that is the runner's).
func (rep *Reporter) flush(ctx context.Context) {
	if err := rep.save(ctx); err != nil && !errors.Is(err, context.Canceled) {
		rep.runner.log.Debug("job progress not saved", "err", err)
	}
}

// save is flush that returns the error.
func (rep *Reporter) save(ctx context.Context) error {
	rep.mu.Lock()
	prog := proto.Clone(rep.job.GetProgress()).(*stowagev1.JobProgress)
	plan := proto.Clone(rep.job.GetPlan()).(*stowagev1.Plan)
	rep.saved = time.Now()
	id := rep.job.GetId()
	rep.mu.Unlock()
	_, err := rep.runner.db.Jobs().Update(ctx, id, 0, func(j *stowagev1.Job) error {
		j.Progress, j.Plan = prog, plan
		return nil
	})
	if err != nil {
		return fmt.Errorf("job %s: save progress: %w", id, err)
	}
	return nil
}

// taskHost records durably that step name sends tasks to host (the
// step's task_hosts), before the first one leaves: a cancel resumed by
// another controller reaches it. A host already recorded costs nothing.
func (rep *Reporter) taskHost(ctx context.Context, name, host string) error {
	rep.mu.Lock()
	added := false
	for _, s := range rep.job.GetPlan().GetSteps() {
		if s.GetName() == name && !slices.Contains(s.GetTaskHosts(), host) {
			s.TaskHosts = append(s.TaskHosts, host)
			added = true
		}
	}
	rep.mu.Unlock()
	if !added {
		return nil
	}
	return rep.save(ctx)
}

// RunStep runs fn as the plan step name: it marks the step Running, then
// Succeeded or Failed with the error, and gives fn a context carrying the
// step's task id.
//
// Only a failure is saved at once. Running is saved with the step's host
// before its first task leaves (taskHost), which is all a cancel resumed
// by another controller needs: a step that sent nothing has nothing to
// cancel. Succeeded is saved with the job's next save (the next step's
// host, progress, or the job's final state, in one write with it): a
// controller that stops before then runs the step again when it resumes
// the job, and its tasks, sent with the same ids, return their journalled
// results on the agents. Each save is an fsync'd metadata commit (0.3-0.7
// ms on the test machine, where a whole linked clone takes ~8 ms).
func RunStep(ctx context.Context, job *stowagev1.Job, rep *Reporter, name string, fn func(ctx context.Context) error) (err error) {
	ctx, span := oteltrace.Start(ctx, "step "+name, attribute.String("stowage.job.id", job.GetId()))
	defer func() { oteltrace.End(span, err) }()
	rep.mark(name, stowagev1.JobState_JOB_STATE_RUNNING, nil)
	rep.Phase(name)
	err = failpoint.Hit(failpoint.JobBeforeStep)
	if err == nil {
		sctx := drivers.WithTaskHostRecorder(StepContext(ctx, job, name), func(ctx context.Context, host string) error {
			return rep.taskHost(ctx, name, host)
		})
		err = fn(sctx)
	}
	if err == nil {
		err = failpoint.Hit(failpoint.JobAfterStep)
	}
	if err != nil {
		rep.Step(name, stowagev1.JobState_JOB_STATE_FAILED, err)
		return fmt.Errorf("%s: %w", name, err)
	}
	rep.mark(name, stowagev1.JobState_JOB_STATE_SUCCEEDED, nil)
	return nil
}

// Submit creates job and, in the same transaction, whatever create writes
// (the objects the job will work on), then launches it. With an idempotency
// key already used, nothing is written and the earlier job is returned with
// existing set.
//
// A job submitted for an API caller (apiauth.CallerFrom(ctx)) records it in
// created_by; when that caller already has the maximum of unfinished jobs
// (SetMaxJobsPerCaller), Submit writes nothing and fails with
// errdefs.ErrResourceExhausted. The count is read in the transaction that
// inserts the job, and one caller's submits take turns on a per-caller
// lock, so concurrent submits cannot overshoot the cap.
func (r *Runner) Submit(ctx context.Context, job *stowagev1.Job, create func(tx *meta.Tx) error) (_ *stowagev1.Job, existing bool, err error) {
	if key := job.GetIdempotencyKey(); key != "" {
		if prev, err := r.ByIdempotencyKey(ctx, key); err == nil {
			return prev, true, nil
		}
	}
	if c, ok := apiauth.CallerFrom(ctx); ok && job.GetCreatedBy() == "" {
		job = proto.Clone(job).(*stowagev1.Job)
		job.CreatedBy = c.String()
	}
	if id := oteltrace.TraceID(ctx); id != "" && job.GetTraceId() == "" {
		// The job's span continues the request's trace, now and after a
		// restart.
		job = proto.Clone(job).(*stowagev1.Job)
		job.TraceId, job.TraceParent = id, oteltrace.Parent(ctx)
	}
	r.mu.Lock()
	limit := r.maxPerCaller
	r.mu.Unlock()
	by := job.GetCreatedBy()
	if by != "" && limit > 0 {
		unlock, err := r.lockCaller(ctx, by)
		if err != nil {
			return nil, false, err
		}
		defer unlock()
	}
	var created *stowagev1.Job
	err = r.db.Txn(ctx, func(tx *meta.Tx) error {
		if by != "" && limit > 0 {
			if err := checkInFlight(tx, by, limit); err != nil {
				return err
			}
		}
		if create != nil {
			if err := create(tx); err != nil {
				return err
			}
		}
		var err error
		created, err = meta.Jobs.CreateTx(tx, job)
		return err
	})
	if err != nil {
		if key := job.GetIdempotencyKey(); key != "" && errdefs.IsAlreadyExists(err) {
			if prev, perr := r.ByIdempotencyKey(ctx, key); perr == nil {
				return prev, true, nil
			}
		}
		return nil, false, err
	}
	r.launch(created)
	return created, false, nil
}

// checkInFlight fails with ErrResourceExhausted when caller by has limit
// unfinished jobs.
func checkInFlight(tx *meta.Tx, by string, limit int) error {
	open, err := meta.Jobs.ListTx(tx, meta.Filter[*stowagev1.Job]{
		Index: meta.IndexCreatedBy, Value: by,
		Where: func(j *stowagev1.Job) bool { return !terminal(j.GetState()) },
		Limit: limit,
	})
	if err != nil {
		return fmt.Errorf("count the jobs of %s: %w", by, err)
	}
	if len(open) >= limit {
		return fmt.Errorf("caller %s already has %d unfinished jobs, the limit of jobs in flight per caller: "+
			"wait for some to end (`stowage job list`) or cancel them: %w", by, limit, errdefs.ErrResourceExhausted)
	}
	return nil
}

// lockCaller takes the submit lock of caller by, or fails when ctx ends.
func (r *Runner) lockCaller(ctx context.Context, by string) (unlock func(), err error) {
	r.mu.Lock()
	ch, ok := r.callerLocks[by]
	if !ok {
		// One entry per caller that ever submitted: bounded by the tokens.
		ch = make(chan struct{}, 1)
		r.callerLocks[by] = ch
	}
	r.mu.Unlock()
	select {
	case ch <- struct{}{}:
		return func() { <-ch }, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("submit a job for %s: %w", by, ctx.Err())
	}
}

// PlanHost returns the host the plan chose for step, "" if none.
func PlanHost(job *stowagev1.Job, step string) string {
	for _, s := range job.GetPlan().GetSteps() {
		if s.GetName() == step {
			return s.GetHostId()
		}
	}
	return ""
}

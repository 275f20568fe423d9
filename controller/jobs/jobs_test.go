package jobs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// scripted is a test handler whose Run does what the test says.
type scripted struct {
	run   func(ctx context.Context, job *stowagev1.Job, r *Reporter) error
	fails atomic.Int32
}

func (h *scripted) Run(ctx context.Context, job *stowagev1.Job, r *Reporter) error {
	return h.run(ctx, job, r)
}
func (h *scripted) Fail(context.Context, *stowagev1.Job, error) error {
	h.fails.Add(1)
	return nil
}

func newRunner(t *testing.T, db *meta.DB) *Runner {
	r := New(db, slog.New(slog.DiscardHandler))
	return r
}

func openDB(t *testing.T, dir string) *meta.DB {
	db, err := meta.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	return db
}

func wait(t *testing.T, r *Runner, id string) *stowagev1.Job {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var last *stowagev1.Job
	if err := r.Watch(ctx, id, func(j *stowagev1.Job) error { last = j; return nil }); err != nil {
		t.Fatalf("watch %s: %v", id, err)
	}
	return last
}

func TestSucceedFailIdempotency(t *testing.T) {
	db := openDB(t, t.TempDir())
	defer db.Close()
	r := newRunner(t, db)
	r.Start(context.Background())
	ok := &scripted{run: func(ctx context.Context, job *stowagev1.Job, rep *Reporter) error {
		return RunStep(ctx, job, rep, "copy", func(ctx context.Context) error {
			if id, _ := drivers.TaskIDFrom(ctx); id != job.GetId()+".copy" {
				return fmt.Errorf("task id %q", id)
			}
			rep.Bytes(50, 100)
			rep.Bytes(100, 100)
			rep.Result("copied 100 bytes")
			return nil
		})
	}}
	bad := &scripted{run: func(context.Context, *stowagev1.Job, *Reporter) error {
		return fmt.Errorf("agent h1: %w", errdefs.ErrDataLoss)
	}}
	r.Register("ok", ok)
	r.Register("bad", bad)
	plan := &stowagev1.Plan{Steps: []*stowagev1.PlanStep{{Name: "copy"}}}
	j, existing, err := r.Submit(context.Background(), NewJob("ok", "t1", "key-1", plan, nil), nil)
	if err != nil || existing {
		t.Fatal(err, existing)
	}
	again, existing, err := r.Submit(context.Background(), NewJob("ok", "t1", "key-1", plan, nil), nil)
	if err != nil || !existing || again.GetId() != j.GetId() {
		t.Fatalf("same idempotency key: %v %v %v", again.GetId(), existing, err)
	}
	end := wait(t, r, j.GetId())
	if end.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED || end.GetResult() != "copied 100 bytes" ||
		end.GetPlan().GetSteps()[0].GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED || end.GetProgress().GetBytesDone() != 100 {
		t.Fatalf("ok job: %v", end)
	}
	jb, _, _ := r.Submit(context.Background(), NewJob("bad", "t2", "", nil, nil), nil)
	end = wait(t, r, jb.GetId())
	if end.GetState() != stowagev1.JobState_JOB_STATE_FAILED || end.GetError() == "" || bad.fails.Load() != 1 {
		t.Fatalf("bad job: %v (fail calls %d)", end, bad.fails.Load())
	}
	// A checksum mismatch (ErrDataLoss) counts as data_loss, a success as succeeded.
	for _, c := range []struct{ kind, result string }{{"ok", "succeeded"}, {"bad", "data_loss"}, {"bad", "failed"}} {
		want := 1.0
		if c.result == "failed" {
			want = 0
		}
		// A watcher may see the end recorded a moment before the runner
		// counts it.
		got := testutil.ToFloat64(r.finished.WithLabelValues(c.kind, c.result))
		for deadline := time.Now().Add(5 * time.Second); got != want && time.Now().Before(deadline); {
			time.Sleep(5 * time.Millisecond)
			got = testutil.ToFloat64(r.finished.WithLabelValues(c.kind, c.result))
		}
		if got != want {
			t.Errorf("stowage_jobs_finished_total{kind=%q,result=%q} = %v, want %v", c.kind, c.result, got, want)
		}
	}
	// A create func that fails writes neither its objects nor the job.
	_, _, err = r.Submit(context.Background(), NewJob("ok", "t3", "key-3", nil, nil), func(tx *meta.Tx) error {
		return fmt.Errorf("volume busy: %w", errdefs.ErrAborted)
	})
	if !errors.Is(err, errdefs.ErrAborted) {
		t.Fatal(err)
	}
	if _, err := r.ByIdempotencyKey(context.Background(), "key-3"); !errdefs.IsNotFound(err) {
		t.Fatalf("a refused submit left its job: %v", err)
	}
}

func TestCancel(t *testing.T) {
	db := openDB(t, t.TempDir())
	defer db.Close()
	r := newRunner(t, db)
	r.Start(context.Background())
	started := make(chan struct{})
	h := &scripted{run: func(ctx context.Context, _ *stowagev1.Job, _ *Reporter) error {
		close(started)
		<-ctx.Done()
		return ctx.Err()
	}}
	r.Register("slow", h)
	j, _, _ := r.Submit(context.Background(), NewJob("slow", "t", "", nil, nil), nil)
	<-started
	if _, err := r.Cancel(context.Background(), j.GetId()); err != nil {
		t.Fatal(err)
	}
	end := wait(t, r, j.GetId())
	if end.GetState() != stowagev1.JobState_JOB_STATE_CANCELLED || h.fails.Load() != 1 {
		t.Fatalf("cancelled job: %v", end)
	}
	if _, err := r.Cancel(context.Background(), j.GetId()); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("cancel an ended job: %v", err)
	}
}

// TestResumeAfterRestart: a controller that stops mid-job leaves it
// Running; the next one runs it again with the same step task ids.
func TestResumeAfterRestart(t *testing.T) {
	dir := t.TempDir()
	db := openDB(t, dir)
	r := newRunner(t, db)
	base, stop := context.WithCancel(context.Background())
	r.Start(base)
	var mu sync.Mutex
	var taskIDs []string
	started := make(chan struct{}, 2)
	run := func(ctx context.Context, job *stowagev1.Job, rep *Reporter) error {
		return RunStep(ctx, job, rep, "copy", func(ctx context.Context) error {
			id, _ := drivers.TaskIDFrom(ctx)
			mu.Lock()
			taskIDs = append(taskIDs, id)
			first := len(taskIDs) == 1
			mu.Unlock()
			started <- struct{}{}
			if first {
				<-ctx.Done() // the controller goes away mid-step
				return ctx.Err()
			}
			return nil
		})
	}
	h := &scripted{run: run}
	r.Register("copy", h)
	j, _, _ := r.Submit(context.Background(), NewJob("copy", "t", "", &stowagev1.Plan{Steps: []*stowagev1.PlanStep{{Name: "copy"}}}, nil), nil)
	<-started
	stop()
	r.Wait()
	db.Close()
	if h.fails.Load() != 0 {
		t.Fatal("a job interrupted by shutdown must not be failed")
	}

	db = openDB(t, dir)
	defer db.Close()
	r2 := newRunner(t, db)
	r2.Start(context.Background())
	h2 := &scripted{run: run}
	r2.Register("copy", h2)
	if err := r2.Resume(context.Background()); err != nil {
		t.Fatal(err)
	}
	end := wait(t, r2, j.GetId())
	if end.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("resumed job: %v", end)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(taskIDs) != 2 || taskIDs[0] != taskIDs[1] {
		t.Fatalf("step task ids across the restart: %v (want the same id twice)", taskIDs)
	}
}

// TestSecretsRedacted: a URL's secrets in a step error, the job error, a
// plan reason or the result reach neither the record nor the handler's
// Fail, while the error class still does.
func TestSecretsRedacted(t *testing.T) {
	db := openDB(t, t.TempDir())
	defer db.Close()
	r := newRunner(t, db)
	r.Start(context.Background())
	const src = "http://user:S3cr3tPw@127.0.0.1:1/t.qcow2?X-Amz-Signature=SECRETSIG"
	var failCause error
	h := &failWith{cause: &failCause, run: func(ctx context.Context, job *stowagev1.Job, rep *Reporter) error {
		rep.Result("from %s", src)
		return RunStep(ctx, job, rep, "download", func(context.Context) error {
			return fmt.Errorf("fetch %s: %w", src, errdefs.ErrDataLoss)
		})
	}}
	r.Register("leaky", h)
	plan := &stowagev1.Plan{Reasons: []string{"from " + src}, Steps: []*stowagev1.PlanStep{{Name: "download", Reason: "stream " + src}}}
	j, _, err := r.Submit(context.Background(), NewJob("leaky", "t1", "", plan, nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	j = wait(t, r, j.GetId())
	stored, err := db.Jobs().Get(context.Background(), j.GetId())
	if err != nil {
		t.Fatal(err)
	}
	for _, got := range []*stowagev1.Job{j, stored} {
		text := fmt.Sprint(got.GetError(), got.GetResult(), got.GetPlan().GetReasons(), got.GetPlan().GetSteps()[0].GetReason(), got.GetPlan().GetSteps()[0].GetError())
		if strings.Contains(text, "S3cr3tPw") || strings.Contains(text, "SECRETSIG") {
			t.Errorf("job keeps a secret: %s", text)
		}
		if !strings.Contains(got.GetError(), "http://user:REDACTED@127.0.0.1:1/t.qcow2") {
			t.Errorf("job error lost the redacted URL: %s", got.GetError())
		}
	}
	if failCause == nil || strings.Contains(failCause.Error(), "S3cr3tPw") || !errors.Is(failCause, errdefs.ErrDataLoss) {
		t.Errorf("Fail got %v", failCause)
	}
}

// failWith is a handler that records the cause its Fail gets.
type failWith struct {
	run   func(ctx context.Context, job *stowagev1.Job, r *Reporter) error
	cause *error
}

func (h *failWith) Run(ctx context.Context, job *stowagev1.Job, r *Reporter) error {
	return h.run(ctx, job, r)
}
func (h *failWith) Fail(_ context.Context, _ *stowagev1.Job, cause error) error {
	*h.cause = cause
	return nil
}

func TestExpireFinishedJobs(t *testing.T) {
	db := openDB(t, t.TempDir())
	defer db.Close()
	r := newRunner(t, db)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r.Start(ctx)
	release := make(chan struct{})
	r.Register("quick", &scripted{run: func(context.Context, *stowagev1.Job, *Reporter) error { return nil }})
	r.Register("slow", &scripted{run: func(ctx context.Context, _ *stowagev1.Job, _ *Reporter) error {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	}})
	done, _, err := r.Submit(ctx, NewJob("quick", "t1", "key-q", nil, nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	wait(t, r, done.GetId())
	running, _, err := r.Submit(ctx, NewJob("slow", "t2", "", nil, nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := r.Expire(ctx, time.Hour); err != nil || n != 0 {
		t.Fatalf("expire with an hour's retention: %d %v, want nothing expired", n, err)
	}
	time.Sleep(20 * time.Millisecond)
	if n, err := r.Expire(ctx, 10*time.Millisecond); err != nil || n != 1 {
		t.Fatalf("expire: %d %v, want the finished job only", n, err)
	}
	if _, err := r.Get(ctx, done.GetId()); !errdefs.IsNotFound(err) {
		t.Fatalf("the expired job is still there: %v", err)
	}
	if _, err := r.ByIdempotencyKey(ctx, "key-q"); !errdefs.IsNotFound(err) {
		t.Fatalf("the expired job's idempotency key is still held: %v", err)
	}
	if j, err := r.Get(ctx, running.GetId()); err != nil || terminal(j.GetState()) {
		t.Fatalf("the running job: %v %v", j, err)
	}
	close(release)
	wait(t, r, running.GetId())
}

// cancelLog records the cancels a resumed job sends, and when its
// handler's Fail ran relative to them.
type cancelLog struct {
	mu    sync.Mutex
	calls []string
}

func (c *cancelLog) CancelTask(_ context.Context, host, task string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls = append(c.calls, host+" "+task)
	return nil
}

// TestResumeCancellingCancelsSteps: a controller that dies after the job
// went Cancelling but before its cancel reached the hosts leaves the job
// Cancelling; the next one sends the unfinished step's task id to every
// host the step recorded (NoteTaskHost, before its tasks left), and only
// then runs the handler's Fail and records Cancelled.
func TestResumeCancellingCancelsSteps(t *testing.T) {
	dir := t.TempDir()
	db := openDB(t, dir)
	r := newRunner(t, db)
	base, stop := context.WithCancel(context.Background())
	r.Start(base)
	started := make(chan struct{})
	run := func(ctx context.Context, job *stowagev1.Job, rep *Reporter) error {
		if err := RunStep(ctx, job, rep, "prepare", func(ctx context.Context) error {
			return drivers.NoteTaskHost(ctx, "h0")
		}); err != nil {
			return err
		}
		return RunStep(ctx, job, rep, "copy", func(ctx context.Context) error {
			for _, h := range []string{"h1", "h2", "h1"} {
				if err := drivers.NoteTaskHost(ctx, h); err != nil {
					return err
				}
			}
			close(started)
			<-ctx.Done()
			return ctx.Err()
		})
	}
	r.Register("copy", &scripted{run: run})
	plan := &stowagev1.Plan{Steps: []*stowagev1.PlanStep{{Name: "prepare"}, {Name: "copy", HostId: "h9"}}}
	j, _, err := r.Submit(context.Background(), NewJob("copy", "t", "", plan, nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	<-started
	// The cancel is recorded, and the controller goes away before it
	// cancels the job's context (failpoint jobAfterCancelRequested).
	if _, err := db.Jobs().Transition(context.Background(), j.GetId(), meta.JobCancelRequested, nil); err != nil {
		t.Fatal(err)
	}
	stop()
	r.Wait()
	db.Close()

	db = openDB(t, dir)
	defer db.Close()
	if got, err := db.Jobs().Get(context.Background(), j.GetId()); err != nil || got.GetState() != stowagev1.JobState_JOB_STATE_CANCELLING {
		t.Fatalf("job after the first controller: %v %v", got, err)
	}
	r2 := newRunner(t, db)
	r2.Start(context.Background())
	log := &cancelLog{}
	r2.SetTaskCanceller(log)
	var atFail []string
	r2.Register("copy", failHook{t: t, fn: func() {
		log.mu.Lock()
		atFail = append([]string(nil), log.calls...)
		log.mu.Unlock()
	}})
	if err := r2.Resume(context.Background()); err != nil {
		t.Fatal(err)
	}
	end := wait(t, r2, j.GetId())
	if end.GetState() != stowagev1.JobState_JOB_STATE_CANCELLED || !strings.Contains(end.GetError(), "cancelled on request") {
		t.Fatalf("resumed cancelled job: %v", end)
	}
	want := []string{"h1 " + StepTaskID(j, "copy"), "h2 " + StepTaskID(j, "copy")}
	log.mu.Lock()
	calls := append([]string(nil), log.calls...)
	log.mu.Unlock()
	slices.Sort(calls)
	if !slices.Equal(calls, want) {
		t.Fatalf("cancels sent: %q, want %q (the unfinished step's hosts, once each)", calls, want)
	}
	slices.Sort(atFail)
	if !slices.Equal(atFail, want) {
		t.Fatalf("the handler's Fail ran after only %q of the cancels", atFail)
	}
}

// failHook is a handler whose Fail calls fn; it must not run.
type failHook struct {
	t  *testing.T
	fn func()
}

func (h failHook) Run(context.Context, *stowagev1.Job, *Reporter) error {
	h.t.Error("a job resumed in Cancelling must not run")
	return nil
}
func (h failHook) Fail(context.Context, *stowagev1.Job, error) error {
	h.fn()
	return nil
}

// starting is a scripted handler that is a Starter: Start creates a
// template record named by the job's target in the start transaction.
type starting struct {
	scripted
	startErr error
}

func (h *starting) Start(tx *meta.Tx, job *stowagev1.Job) error {
	if h.startErr != nil {
		return h.startErr
	}
	_, err := meta.Templates.CreateTx(tx, &stowagev1.Template{Id: job.GetTargetId(), Name: job.GetTargetId()})
	return err
}

// TestStarterAndOnSuccess: a Starter's write commits with the job's start
// (a failing Start does not keep the job from starting); OnSuccess writes
// commit with the job's success, and an error from one fails the job
// (its handler's Fail runs) with nothing of it written.
func TestStarterAndOnSuccess(t *testing.T) {
	ctx := context.Background()
	db := openDB(t, t.TempDir())
	defer db.Close()
	r := newRunner(t, db)
	r.Start(ctx)
	var sawStarted atomic.Bool
	onSuccess := func(fail bool) func(context.Context, *stowagev1.Job, *Reporter) error {
		return func(ctx context.Context, job *stowagev1.Job, rep *Reporter) error {
			if _, err := db.Templates().Get(ctx, job.GetTargetId()); err == nil {
				sawStarted.Store(true)
			}
			rep.OnSuccess(func(tx *meta.Tx) error {
				_, err := meta.Templates.UpdateTx(tx, job.GetTargetId(), 0, func(t *stowagev1.Template) error {
					t.Name = "done"
					return nil
				})
				if err == nil && fail {
					err = fmt.Errorf("no room: %w", errdefs.ErrResourceExhausted)
				}
				return err
			})
			return nil
		}
	}
	good := &starting{scripted: scripted{run: onSuccess(false)}}
	bad := &starting{scripted: scripted{run: onSuccess(true)}}
	broken := &starting{scripted: scripted{run: func(context.Context, *stowagev1.Job, *Reporter) error { return nil }}, startErr: errors.New("start broke")}
	r.Register("good", good)
	r.Register("bad", bad)
	r.Register("broken", broken)
	submit := func(kind, target string) *stowagev1.Job {
		j, _, err := r.Submit(ctx, NewJob(kind, target, "", &stowagev1.Plan{}, nil), nil)
		if err != nil {
			t.Fatal(err)
		}
		return wait(t, r, j.GetId())
	}
	if j := submit("good", "t1"); j.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED || !sawStarted.Load() {
		t.Fatalf("good job: %v (Run saw Start's record: %v)", j, sawStarted.Load())
	}
	if tp, err := db.Templates().Get(ctx, "t1"); err != nil || tp.GetName() != "done" {
		t.Fatalf("OnSuccess write: %v %v", tp, err)
	}
	j := submit("bad", "t2")
	if j.GetState() != stowagev1.JobState_JOB_STATE_FAILED || !strings.Contains(j.GetError(), "no room") || bad.fails.Load() != 1 {
		t.Fatalf("bad job: %v, Fail ran %d times", j, bad.fails.Load())
	}
	if tp, err := db.Templates().Get(ctx, "t2"); err != nil || tp.GetName() != "t2" {
		t.Fatalf("a failed OnSuccess wrote: %v %v", tp, err)
	}
	if j := submit("broken", "t3"); j.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("a job whose Start failed: %v", j)
	}
}

// heldRunning writes a Running job as a record only (the runner does not
// run it) and gives r its live copy, as the runner holds one while a job
// runs.
func heldRunning(t *testing.T, db *meta.DB, r *Runner, target string) *stowagev1.Job {
	t.Helper()
	ctx := context.Background()
	j, err := db.Jobs().Create(ctx, NewJob("k", target, "", nil, nil))
	if err != nil {
		t.Fatal(err)
	}
	running, err := db.Jobs().Transition(ctx, j.GetId(), meta.JobStart, nil)
	if err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	r.latest[j.GetId()] = running
	r.mu.Unlock()
	return running
}

// TestWatchSeesTheEnd: a watcher always gets a job's end. The end reaches
// a watcher whose queue is full of progress updates (the oldest is
// dropped for it), and a record that has ended wins over the runner's
// live copy, which still says Running until the runner lets go of it.
func TestWatchSeesTheEnd(t *testing.T) {
	db := openDB(t, t.TempDir())
	defer db.Close()
	r := newRunner(t, db)
	ctx := context.Background()

	// A full queue: the end displaces the oldest update.
	ch := make(chan *stowagev1.Job, 16)
	r.mu.Lock()
	r.subs["j1"] = map[chan *stowagev1.Job]struct{}{ch: {}}
	r.mu.Unlock()
	for i := range 20 {
		r.publish(&stowagev1.Job{Id: "j1", State: stowagev1.JobState_JOB_STATE_RUNNING, Progress: &stowagev1.JobProgress{BytesDone: int64(i)}})
	}
	r.publish(&stowagev1.Job{Id: "j1", State: stowagev1.JobState_JOB_STATE_SUCCEEDED})
	var last *stowagev1.Job
	for len(ch) > 0 {
		last = <-ch
	}
	if last.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("last update queued for a slow watcher: %v, want the end", last)
	}

	// The record ends while the live copy still says Running.
	j := heldRunning(t, db, r, "t1")
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	seen := make(chan *stowagev1.Job, 8)
	done := make(chan error, 1)
	go func() {
		done <- r.Watch(wctx, j.GetId(), func(j *stowagev1.Job) error { seen <- j; return nil })
	}()
	if first := <-seen; first.GetState() != stowagev1.JobState_JOB_STATE_RUNNING {
		t.Fatalf("first update %v, want the live Running copy", first)
	}
	if _, err := db.Jobs().Transition(ctx, j.GetId(), meta.JobSucceed, nil); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("watch did not end with the job: %v", err)
	}
	for len(seen) > 0 {
		last = <-seen
	}
	if last.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("last update %v, want Succeeded", last)
	}

	// A watcher that arrives after the end was published, while the
	// runner still holds the job: the live copy says how it ended.
	j2 := heldRunning(t, db, r, "t2")
	ended, err := db.Jobs().Transition(ctx, j2.GetId(), meta.JobSucceed, nil)
	if err != nil {
		t.Fatal(err)
	}
	r.publish(ended)
	last = nil
	if err := r.Watch(wctx, j2.GetId(), func(j *stowagev1.Job) error { last = j; return nil }); err != nil {
		t.Fatalf("watch after the end: %v", err)
	}
	if last.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("watch after the end: %v, want Succeeded", last)
	}
}

// TestOnEnd: the end-of-job hook hears of every job the runner stops
// running, once, whether it succeeded or failed, and only after its
// Run returned (what it releases was held by that Run).
func TestOnEnd(t *testing.T) {
	db := openDB(t, t.TempDir())
	defer db.Close()
	r := newRunner(t, db)
	var mu sync.Mutex
	ended := map[string]int{}
	running := map[string]bool{}
	r.SetOnEnd(func(id string) {
		mu.Lock()
		defer mu.Unlock()
		if running[id] {
			t.Errorf("job %s: end hook called while its Run runs", id)
		}
		ended[id]++
	})
	r.Start(context.Background())
	h := func(err error) *scripted {
		return &scripted{run: func(_ context.Context, job *stowagev1.Job, _ *Reporter) error {
			mu.Lock()
			running[job.GetId()] = true
			mu.Unlock()
			time.Sleep(20 * time.Millisecond)
			mu.Lock()
			running[job.GetId()] = false
			mu.Unlock()
			return err
		}}
	}
	r.Register("ok", h(nil))
	r.Register("bad", h(fmt.Errorf("no: %w", errdefs.ErrDataLoss)))
	var ids []string
	for _, kind := range []string{"ok", "bad", "ok"} {
		j, _, err := r.Submit(context.Background(), NewJob(kind, "t-"+kind, "", nil, nil), nil)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, j.GetId())
	}
	for _, id := range ids {
		wait(t, r, id)
	}
	r.Wait()
	mu.Lock()
	defer mu.Unlock()
	for _, id := range ids {
		if ended[id] != 1 {
			t.Errorf("job %s: end hook called %d times, want 1", id, ended[id])
		}
	}
}

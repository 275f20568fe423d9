package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func TestJournalRunsEachTaskOnce(t *testing.T) {
	j, err := openJournal(t.TempDir(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var runs atomic.Int32
	release := make(chan struct{})
	fn := func(ctx context.Context, _ drivers.Progress) (*stowagev1.TaskResult, error) {
		runs.Add(1)
		<-release
		return &stowagev1.TaskResult{Result: &stowagev1.TaskResult_File{File: &stowagev1.FileInfo{Key: "x", Size: 42}}}, nil
	}
	// Concurrent duplicates wait for the first run.
	var wg sync.WaitGroup
	results := make([]*stowagev1.TaskResult, 8)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := j.run(context.Background(), "task-1", fn)
			if err != nil {
				t.Error(err)
			}
			results[i] = res
		}()
	}
	time.Sleep(50 * time.Millisecond)
	close(release)
	wg.Wait()
	if runs.Load() != 1 {
		t.Fatalf("task ran %d times, want 1", runs.Load())
	}
	for _, r := range results {
		if r.GetFile().GetSize() != 42 || !r.GetDone() || r.GetTaskId() != "task-1" {
			t.Fatalf("duplicate got %v", r)
		}
	}
	// A later retry, even from a new journal over the same directory (agent
	// restart), gets the journalled result without running.
	j2, err := openJournal(j.dir, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	res, err := j2.run(context.Background(), "task-1", fn)
	if err != nil || res.GetFile().GetSize() != 42 || runs.Load() != 1 {
		t.Fatalf("retry after restart: %v %v runs=%d", res, err, runs.Load())
	}
}

func TestJournalErrors(t *testing.T) {
	j, err := openJournal(t.TempDir(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	// A definite failure is journalled with its class.
	var runs int
	failing := func(context.Context, drivers.Progress) (*stowagev1.TaskResult, error) {
		runs++
		return nil, fmt.Errorf("directory /x: %w", errdefs.ErrFailedPrecondition)
	}
	for range 2 {
		res, err := j.run(ctx, "t-fail", failing)
		if err != nil || res.GetErrorClass() != errdefs.ErrFailedPrecondition.Error() || res.GetError() != "directory /x: failed precondition" {
			t.Fatalf("failed task: %v %v", res, err)
		}
	}
	if runs != 1 {
		t.Fatalf("failed task ran %d times", runs)
	}
	// A transient failure is not journalled: the retry runs again.
	runs = 0
	flaky := func(context.Context, drivers.Progress) (*stowagev1.TaskResult, error) {
		runs++
		if runs == 1 {
			return nil, fmt.Errorf("nfs server: %w", errdefs.ErrUnavailable)
		}
		return &stowagev1.TaskResult{}, nil
	}
	if _, err := j.run(ctx, "t-flaky", flaky); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("first flaky run: %v", err)
	}
	if res, err := j.run(ctx, "t-flaky", flaky); err != nil || !res.GetDone() || runs != 2 {
		t.Fatalf("second flaky run: %v %v runs=%d", res, err, runs)
	}
	// A source gone for its whole retry window is the task's answer (so the
	// controller does not retry it as an unreachable agent), unavailable,
	// and not journalled: the step run again tries the source afresh.
	runs = 0
	gone := func(context.Context, drivers.Progress) (*stowagev1.TaskResult, error) {
		runs++
		if runs == 1 {
			return nil, fmt.Errorf("read http://t/x at 0: %w", errors.Join(stream.ErrRetriesExhausted, errdefs.ErrUnavailable))
		}
		return &stowagev1.TaskResult{}, nil
	}
	if res, err := j.run(ctx, "t-gone", gone); err != nil || res.GetErrorClass() != errdefs.ErrUnavailable.Error() || !res.GetDone() {
		t.Fatalf("source gone: %v %v", res, err)
	}
	if _, err := j.get("t-gone"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("a source-gone result was journalled: %v", err)
	}
	if res, err := j.run(ctx, "t-gone", gone); err != nil || res.GetErrorClass() != "" || runs != 2 {
		t.Fatalf("second run of a source-gone task: %v %v runs=%d", res, err, runs)
	}
	// Bad ids are refused before anything runs.
	for _, id := range []string{"", "../x", "a/b", string(make([]byte, 200))} {
		if _, err := j.run(ctx, id, flaky); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("id %q: %v", id, err)
		}
	}
	if _, err := j.get("never-ran"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("get unknown: %v", err)
	}
}

func TestJournalProgressAndDetachedTasks(t *testing.T) {
	j, err := openJournal(t.TempDir(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var runs atomic.Int32
	step := make(chan struct{})
	release := make(chan struct{})
	fn := func(ctx context.Context, progress drivers.Progress) (*stowagev1.TaskResult, error) {
		runs.Add(1)
		progress(10, 100)
		close(step)
		select {
		case <-release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		progress(100, 100)
		return &stowagev1.TaskResult{Result: &stowagev1.TaskResult_Uri{Uri: "done"}}, nil
	}
	// The first caller goes away while the task runs (a controller restart).
	ctx, cancel := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() {
		_, err := j.run(ctx, "t1", fn)
		first <- err
	}()
	<-step
	res, err := j.status("t1")
	if err != nil || res.GetDone() || res.GetBytesDone() != 10 || res.GetBytesTotal() != 100 {
		t.Fatalf("status of a running task: %v %v", res, err)
	}
	cancel()
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Fatalf("first caller: %v", err)
	}
	// The task goes on; the same id sent again waits for it.
	second := make(chan *stowagev1.TaskResult, 1)
	go func() {
		res, err := j.run(context.Background(), "t1", fn)
		if err != nil {
			t.Error(err)
		}
		second <- res
	}()
	time.Sleep(20 * time.Millisecond)
	close(release)
	res = <-second
	if res.GetUri() != "done" || !res.GetDone() || res.GetBytesDone() != 100 || runs.Load() != 1 {
		t.Fatalf("second caller: %v, runs %d", res, runs.Load())
	}
	if res, err := j.status("t1"); err != nil || !res.GetDone() || res.GetUri() != "done" {
		t.Fatalf("status of a finished task: %v %v", res, err)
	}
	if _, err := j.status("t-unknown"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("status of an unknown task: %v", err)
	}
}

func TestJournalCancelsAbandonedTasks(t *testing.T) {
	j, err := openJournal(t.TempDir(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	j.grace = 50 * time.Millisecond
	var runs atomic.Int32
	cancelled := make(chan struct{})
	fn := func(ctx context.Context, _ drivers.Progress) (*stowagev1.TaskResult, error) {
		if runs.Add(1) > 1 {
			return &stowagev1.TaskResult{}, nil
		}
		<-ctx.Done()
		close(cancelled)
		return nil, ctx.Err()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if _, err := j.run(ctx, "t2", fn); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("caller: %v", err)
	}
	select {
	case <-cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("an abandoned task was not cancelled")
	}
	// Cancelled is not journalled: the next attempt runs it again.
	for j.inFlight() > 0 {
		time.Sleep(time.Millisecond)
	}
	if res, err := j.run(context.Background(), "t2", fn); err != nil || !res.GetDone() || runs.Load() != 2 {
		t.Fatalf("retry after cancel: %v %v runs=%d", res, err, runs.Load())
	}
}

func TestKernelAtLeast(t *testing.T) {
	for _, tc := range []struct {
		rel  string
		want bool
	}{{"6.18.44-fc-v669", true}, {"6.9.0", true}, {"6.8.12", false}, {"5.15.0-91-generic", false}, {"7.0", true}, {"bogus", false}} {
		if got := kernelAtLeast(tc.rel, 6, 9); got != tc.want {
			t.Errorf("kernelAtLeast(%q) = %v", tc.rel, got)
		}
	}
}

// TestJournalExpiresWhileRunning: finished results expire while the agent
// runs (not only when it starts); a fresh one and a temporary file a put
// may still be writing stay.
func TestJournalExpiresWhileRunning(t *testing.T) {
	dir := t.TempDir()
	j, err := openJournal(dir, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ok := func(context.Context, drivers.Progress) (*stowagev1.TaskResult, error) {
		return &stowagev1.TaskResult{}, nil
	}
	for _, id := range []string{"old", "fresh"} {
		if _, err := j.run(context.Background(), id, ok); err != nil {
			t.Fatal(err)
		}
	}
	past := time.Now().Add(-2 * time.Hour)
	if err := os.Chtimes(j.path("old"), past, past); err != nil {
		t.Fatal(err)
	}
	wip := filepath.Join(dir, ".wip-123")
	if err := os.WriteFile(wip, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go j.sweep(ctx, 10*time.Millisecond)
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := j.get("old"); errors.Is(err, errdefs.ErrNotFound) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("an expired result is still journalled")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := j.get("fresh"); err != nil {
		t.Fatalf("a fresh result expired: %v", err)
	}
	if _, err := os.Stat(wip); err != nil {
		t.Fatalf("a temporary file in use was swept: %v", err)
	}
	// A stale temporary file goes too.
	stale := time.Now().Add(-staleTemp - time.Minute)
	if err := os.Chtimes(wip, stale, stale); err != nil {
		t.Fatal(err)
	}
	waitGone := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(wip); os.IsNotExist(err) {
			break
		}
		if time.Now().After(waitGone) {
			t.Fatal("a stale temporary file was not swept")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestJournalCancel: cancel stops a running task with
// drivers.ErrCancelledOnRequest, waits for it and journals it as
// cancelled, so the same id sent again does not run; an unknown id is
// journalled as cancelled (a RunTask crossing the cancel never starts); a
// finished task keeps its result; none of them is an error.
func TestJournalCancel(t *testing.T) {
	j, err := openJournal(t.TempDir(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	var runs atomic.Int32
	started := make(chan struct{})
	var cause error
	blocking := func(ctx context.Context, _ drivers.Progress) (*stowagev1.TaskResult, error) {
		runs.Add(1)
		close(started)
		<-ctx.Done()
		cause = context.Cause(ctx)
		return nil, fmt.Errorf("copy: %w", ctx.Err())
	}
	// The caller waiting in run gets the cancelled result.
	done := make(chan error, 1)
	var waited *stowagev1.TaskResult
	go func() {
		res, err := j.run(ctx, "t-run", blocking)
		waited = res
		done <- err
	}()
	<-started
	res, err := j.cancel(ctx, "t-run")
	if err != nil || !res.GetDone() || !errors.Is(errdefs.FromClassName(res.GetErrorClass()), context.Canceled) {
		t.Fatalf("cancel of a running task: %v %v", res, err)
	}
	if !errors.Is(cause, drivers.ErrCancelledOnRequest) {
		t.Fatalf("the task's context ended with %v, want ErrCancelledOnRequest", cause)
	}
	if err := <-done; err != nil || waited.GetErrorClass() != res.GetErrorClass() {
		t.Fatalf("the waiting caller got %v %v", waited, err)
	}
	if n := j.inFlight(); n != 0 {
		t.Fatalf("%d tasks still running after the cancel", n)
	}
	// The same id again: the journalled cancel, no second run.
	if res, err := j.run(ctx, "t-run", blocking); err != nil || res.GetErrorClass() != "context canceled" || runs.Load() != 1 {
		t.Fatalf("run after cancel: %v %v runs=%d", res, err, runs.Load())
	}
	if res, err := j.status("t-run"); err != nil || !res.GetDone() || res.GetErrorClass() != "context canceled" {
		t.Fatalf("status after cancel: %v %v", res, err)
	}

	// An unknown id: not an error, and a RunTask arriving later never runs.
	if res, err := j.cancel(ctx, "t-unknown"); err != nil || res.GetErrorClass() != "context canceled" {
		t.Fatalf("cancel of an unknown task: %v %v", res, err)
	}
	ran := false
	if res, err := j.run(ctx, "t-unknown", func(context.Context, drivers.Progress) (*stowagev1.TaskResult, error) {
		ran = true
		return &stowagev1.TaskResult{}, nil
	}); err != nil || ran || res.GetErrorClass() != "context canceled" {
		t.Fatalf("run after an early cancel: %v %v ran=%v", res, err, ran)
	}

	// A finished task keeps its result.
	ok := func(context.Context, drivers.Progress) (*stowagev1.TaskResult, error) {
		return &stowagev1.TaskResult{Result: &stowagev1.TaskResult_File{File: &stowagev1.FileInfo{Key: "k", Size: 7}}}, nil
	}
	if _, err := j.run(ctx, "t-done", ok); err != nil {
		t.Fatal(err)
	}
	if res, err := j.cancel(ctx, "t-done"); err != nil || res.GetErrorClass() != "" || res.GetFile().GetSize() != 7 {
		t.Fatalf("cancel of a finished task: %v %v", res, err)
	}

	// A bad id is refused; a cancel whose call ends before the task does
	// says so.
	if _, err := j.cancel(ctx, "../x"); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("cancel of a bad id: %v", err)
	}
	release := make(chan struct{})
	stubborn := make(chan struct{})
	go func() {
		_, _ = j.run(context.Background(), "t-slow", func(context.Context, drivers.Progress) (*stowagev1.TaskResult, error) {
			close(stubborn)
			<-release // ignores its context for a while
			return nil, context.Canceled
		})
	}()
	<-stubborn
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := j.cancel(short, "t-slow"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("cancel that times out: %v", err)
	}
	close(release)
	if res, err := j.cancel(ctx, "t-slow"); err != nil || res.GetErrorClass() != "context canceled" {
		t.Fatalf("cancel once the task ended: %v %v", res, err)
	}
}

// TestJournalCancelStep: cancelling a plan step's id (what a controller
// resumed in Cancelling knows) cancels every running task derived from
// it ("<step>.<call>"), waits for them, leaves other tasks alone, and a
// task of the step arriving later does not start.
func TestJournalCancelStep(t *testing.T) {
	j, err := openJournal(t.TempDir(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	type ended struct {
		id    string
		cause error
	}
	endedCh := make(chan ended, 3)
	start := func(id string) {
		started := make(chan struct{})
		go func() {
			_, _ = j.run(context.Background(), id, func(ctx context.Context, _ drivers.Progress) (*stowagev1.TaskResult, error) {
				close(started)
				<-ctx.Done()
				time.Sleep(20 * time.Millisecond) // removing a stage takes a while
				endedCh <- ended{id, context.Cause(ctx)}
				return nil, ctx.Err()
			})
		}()
		<-started
	}
	start("job1.copy.copy_image-aa")
	start("job1.copy.copy_image-aa.2")
	start("job1.copyx.copy_image-bb") // another step, same prefix without the dot
	res, err := j.cancel(ctx, "job1.copy")
	if err != nil || res.GetErrorClass() != "context canceled" {
		t.Fatalf("cancel of a step: %v %v", res, err)
	}
	// Both of the step's tasks ended before cancel returned.
	got := map[string]error{}
	for range 2 {
		select {
		case e := <-endedCh:
			got[e.id] = e.cause
		default:
			t.Fatalf("cancel returned before the step's tasks ended (ended: %v)", got)
		}
	}
	for _, id := range []string{"job1.copy.copy_image-aa", "job1.copy.copy_image-aa.2"} {
		if !errors.Is(got[id], drivers.ErrCancelledOnRequest) {
			t.Fatalf("task %s ended with %v, want ErrCancelledOnRequest (ended: %v)", id, got[id], got)
		}
		if r, err := j.status(id); err != nil || !r.GetDone() || r.GetErrorClass() != "context canceled" {
			t.Fatalf("status of %s: %v %v", id, r, err)
		}
	}
	if n := j.inFlight(); n != 1 {
		t.Fatalf("%d tasks running after the step's cancel, want 1 (the other step's)", n)
	}
	// A call of the step that crossed the cancel does not start.
	ran := false
	if r, err := j.run(ctx, "job1.copy.grant-cc", func(context.Context, drivers.Progress) (*stowagev1.TaskResult, error) {
		ran = true
		return &stowagev1.TaskResult{}, nil
	}); err != nil || ran || r.GetErrorClass() != "context canceled" {
		t.Fatalf("run of a cancelled step's task: %v %v ran=%v", r, err, ran)
	}
	if _, err := j.cancel(ctx, "job1.copyx"); err != nil {
		t.Fatal(err)
	}
	if e := <-endedCh; e.id != "job1.copyx.copy_image-bb" {
		t.Fatalf("ended %v", e)
	}
}

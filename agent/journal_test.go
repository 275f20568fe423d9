package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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
	fn := func(ctx context.Context) (*stowagev1.TaskResult, error) {
		runs.Add(1)
		<-release
		return &stowagev1.TaskResult{Result: &stowagev1.TaskResult_File{File: &stowagev1.FileInfo{Path: "/x", Size: 42}}}, nil
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
	failing := func(context.Context) (*stowagev1.TaskResult, error) {
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
	flaky := func(context.Context) (*stowagev1.TaskResult, error) {
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

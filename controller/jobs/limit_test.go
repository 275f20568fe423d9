package jobs

import (
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/stowage/stowage/controller/apiauth"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// A caller with the maximum of unfinished jobs is refused one more
// (resource exhausted, naming the caller and the limit), even when its
// submits race; another caller and the controller's own jobs are not; a
// finished job frees a slot. created_by records the caller.
func TestJobsInFlightPerCaller(t *testing.T) {
	db := openDB(t, t.TempDir())
	defer db.Close()
	r := newRunner(t, db)
	r.SetMaxJobsPerCaller(3)
	base, stop := context.WithCancel(context.Background())
	defer func() { stop(); r.Wait() }()
	r.Start(base)
	release := make(chan struct{})
	r.Register("block", &scripted{run: func(ctx context.Context, _ *stowagev1.Job, _ *Reporter) error {
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}})
	ci := apiauth.WithCaller(context.Background(), apiauth.Caller{TokenID: "0123456789ab", Name: "ci", Role: apiauth.RoleOperator})
	other := apiauth.WithCaller(context.Background(), apiauth.Caller{TokenID: "ba9876543210", Name: "ops", Role: apiauth.RoleOperator})

	var wg sync.WaitGroup
	var mu sync.Mutex
	var ok, refused int
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			j, _, err := r.Submit(ci, NewJob("block", "t", "", nil, nil), nil)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
				if j.GetCreatedBy() != "ci (0123456789ab)" {
					t.Errorf("created_by %q", j.GetCreatedBy())
				}
			case errdefs.Class(err) == errdefs.ErrResourceExhausted:
				refused++
				if !strings.Contains(err.Error(), "ci (0123456789ab)") || !strings.Contains(err.Error(), "3 unfinished") {
					t.Errorf("refusal does not name caller and limit: %v", err)
				}
			default:
				t.Errorf("submit: %v", err)
			}
		}()
	}
	wg.Wait()
	if ok != 3 || refused != 5 {
		t.Fatalf("%d submitted, %d refused; want 3 and 5", ok, refused)
	}
	if _, _, err := r.Submit(other, NewJob("block", "t", "", nil, nil), nil); err != nil {
		t.Fatalf("another caller: %v", err)
	}
	internal, _, err := r.Submit(context.Background(), NewJob("block", "t", "", nil, nil), nil)
	if err != nil || internal.GetCreatedBy() != "" {
		t.Fatalf("internal job: %v, created_by %q", err, internal.GetCreatedBy())
	}
	close(release)
	js, err := r.List(context.Background(), ListFilter{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, j := range js {
		wait(t, r, j.GetId())
	}
	if _, _, err := r.Submit(ci, NewJob("block", "t", "", nil, nil), nil); err != nil {
		t.Fatalf("after the jobs ended: %v", err)
	}
}

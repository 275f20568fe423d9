package jobs

import (
	"context"
	"fmt"
	"time"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Expire deletes the jobs that ended (Succeeded, Failed, Cancelled) more
// than retention ago, so the job list does not grow without bound; an
// idempotency key of an expired job may be used again. Unfinished jobs are
// never touched. It returns how many it deleted.
func (r *Runner) Expire(ctx context.Context, retention time.Duration) (int, error) {
	cutoff := time.Now().Add(-retention)
	old, err := r.db.Jobs().List(ctx, meta.Filter[*stowagev1.Job]{Where: func(j *stowagev1.Job) bool {
		return terminal(j.GetState()) && j.GetUpdatedAt() != nil && j.GetUpdatedAt().AsTime().Before(cutoff)
	}})
	if err != nil {
		return 0, fmt.Errorf("expire jobs: %w", err)
	}
	n := 0
	for _, j := range old {
		// The revision check keeps a job that changed meanwhile.
		switch err := r.db.Jobs().Delete(ctx, j.GetId(), j.GetRevision()); {
		case err == nil:
			n++
		case errdefs.IsNotFound(err), errdefs.IsConflict(err):
		default:
			return n, fmt.Errorf("expire job %s: %w", j.GetId(), err)
		}
	}
	return n, nil
}

// ExpireEvery runs Expire every interval until ctx ends (retention 0:
// never).
func (r *Runner) ExpireEvery(ctx context.Context, retention, interval time.Duration) {
	if retention <= 0 {
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if n, err := r.Expire(ctx, retention); err != nil && ctx.Err() == nil {
			r.log.Warn("expiring finished jobs failed", "err", err)
		} else if n > 0 {
			r.log.Info("expired finished jobs", "jobs", n, "retention", retention)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

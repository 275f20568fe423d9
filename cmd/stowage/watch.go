package main

// Following a job to its end with WatchJob.

import (
	"context"
	"fmt"
	"time"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func jobEnded(j *stowagev1.Job) bool {
	switch j.GetState() {
	case stowagev1.JobState_JOB_STATE_SUCCEEDED, stowagev1.JobState_JOB_STATE_FAILED, stowagev1.JobState_JOB_STATE_CANCELLED:
		return true
	}
	return false
}

// rewatchFor is how long watchJob keeps following a job whose stream broke
// (a controller that died; with several, the next one serves the watch once
// it answers: a takeover takes up to the leader lease).
const rewatchFor = 30 * time.Second

// watchJob follows job id with WatchJob until it ends, reporting each update
// to prog, and returns the job as it ended. A stream that breaks is opened
// again (through the failover transport: any controller serves it) for up
// to rewatchFor.
func watchJob(ctx context.Context, c *clients, id string, prog *jobProgress) (*stowagev1.Job, error) {
	defer prog.close()
	var last *stowagev1.Job
	var broke time.Time
	for {
		st, err := c.watch.WatchJob(ctx, connect.NewRequest(&stowagev1.WatchJobRequest{Id: id}))
		if err == nil {
			for st.Receive() {
				last = st.Msg().GetJob()
				prog.update(last)
				broke = time.Time{}
			}
			err = st.Err()
			st.Close()
		}
		if err == nil && jobEnded(last) {
			return last, nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("stopped watching; job %s goes on (stowage job watch %s, stowage job cancel %s): %w", id, id, id, ctx.Err())
		}
		if err != nil && last == nil && definite(err) {
			return nil, c.rpcErr(err)
		}
		// The stream broke or ended early: is the job over?
		j, gerr := msgOf(c.jobs.GetJob(ctx, connect.NewRequest(&stowagev1.GetJobRequest{Id: id})))
		if gerr == nil && jobEnded(j.GetJob()) {
			prog.update(j.GetJob())
			return j.GetJob(), nil
		}
		if broke.IsZero() {
			broke = time.Now()
		}
		if time.Since(broke) > rewatchFor {
			return nil, fmt.Errorf("lost the watch of job %s before it ended (stowage job watch %s follows it again): %w", id, id, errdefs.ErrUnavailable)
		}
		t := time.NewTimer(500 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
	}
}

// definite reports an answer a controller gave about the job (it is not
// there, or the caller may not see it), as opposed to a stream that broke:
// a controller killed mid-message leaves "incomplete envelope" errors of
// other codes.
func definite(err error) bool {
	switch connect.CodeOf(err) {
	case connect.CodeNotFound, connect.CodePermissionDenied, connect.CodeUnauthenticated:
		return true
	}
	return false
}

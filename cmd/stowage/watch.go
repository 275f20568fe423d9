package main

// Following a job to its end with WatchJob.

import (
	"context"
	"fmt"

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

// watchJob follows job id with WatchJob until it ends, reporting each update
// to prog, and returns the job as it ended.
func watchJob(ctx context.Context, c *clients, id string, prog *jobProgress) (*stowagev1.Job, error) {
	defer prog.close()
	var last *stowagev1.Job
	st, err := c.watch.WatchJob(ctx, connect.NewRequest(&stowagev1.WatchJobRequest{Id: id}))
	if err == nil {
		for st.Receive() {
			last = st.Msg().GetJob()
			prog.update(last)
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
	if err != nil && last == nil {
		return nil, c.rpcErr(err)
	}
	// The stream broke or ended early: ask once more.
	j, gerr := msgOf(c.jobs.GetJob(ctx, connect.NewRequest(&stowagev1.GetJobRequest{Id: id})))
	if gerr == nil && jobEnded(j.GetJob()) {
		prog.update(j.GetJob())
		return j.GetJob(), nil
	}
	return nil, fmt.Errorf("lost the watch of job %s before it ended (stowage job watch %s follows it again): %w", id, id, errdefs.ErrUnavailable)
}

package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func newJobCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "job", Short: "Follow and cancel the asynchronous jobs long operations return"}
	cmd.AddCommand(newJobListCmd(), getCmd("get ID", "Show a job with its progress and plan", jobView), newJobWatchCmd(), newJobCancelCmd())
	return cmd
}

var jobView = newView("job", func(ctx context.Context, c *clients, id string) (*stowagev1.GetJobResponse, error) {
	return msgOf(c.jobs.GetJob(ctx, connect.NewRequest(&stowagev1.GetJobRequest{Id: id})))
}, func(w io.Writer, r *stowagev1.GetJobResponse) { printJob(w, r.GetJob()) })

func newJobListCmd() *cobra.Command {
	var state, target string
	var limit int32
	var st stowagev1.JobState
	cmd := listCmd("list [--state running] [--target ID] [--limit N]", "List jobs",
		[]string{"ID", "KIND", "STATE", "PHASE", "PROGRESS", "TARGET", "AGE"},
		func(ctx context.Context, c *clients) (*stowagev1.ListJobsResponse, error) {
			if limit > 0 { // the newest limit jobs, newest first
				return msgOf(c.jobs.ListJobs(ctx, connect.NewRequest(&stowagev1.ListJobsRequest{State: st, TargetId: target, Limit: limit})))
			}
			all, err := allPages(ctx, func(ctx context.Context, token string) (*stowagev1.ListJobsResponse, error) {
				return msgOf(c.jobs.ListJobs(ctx, connect.NewRequest(&stowagev1.ListJobsRequest{State: st, TargetId: target, PageToken: token})))
			})
			if err != nil {
				return nil, err
			}
			slices.Reverse(all.Jobs) // pages come oldest first; list newest first, as before paging
			return all, nil
		}, (*stowagev1.ListJobsResponse).GetJobs,
		func(j *stowagev1.Job) []string {
			return []string{j.GetId(), j.GetKind(), enumName(j.GetState()), orDash(j.GetProgress().GetPhase()),
				progressString(j.GetProgress(), false), orDash(j.GetTargetId()), strings.TrimSuffix(tsAgo(j.GetCreatedAt()), " ago")}
		})
	cmd.PreRunE = func(*cobra.Command, []string) (err error) {
		if limit < 0 {
			return usageError{fmt.Errorf("--limit %d: want 0 (the controller's default) or more", limit)}
		}
		st, err = enumFlag[stowagev1.JobState]("--state", state, stowagev1.JobState_value, "JOB_STATE_",
			"pending", "running", "cancelling", "succeeded", "failed", "cancelled")
		return err
	}
	cmd.Flags().StringVar(&state, "state", "", "only jobs in this state: pending, running, cancelling, succeeded, failed or cancelled")
	cmd.Flags().StringVar(&target, "target", "", "only jobs on this object id")
	cmd.Flags().Int32Var(&limit, "limit", 0, "at most this many jobs (0: the controller's default)")
	return cmd
}

func newJobWatchCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "watch ID",
		Short: "Follow a job to its end; the exit code is 0 if it succeeded, 1 if it failed, 130 if it was cancelled",
		Long: `Follow a job to its end: a progress bar on a terminal, one line per update
otherwise (one protojson Job per line with -o json). The exit code is 0 if the
job succeeded, 1 if it failed and 130 if it was cancelled.`,
		Args: exactArgs(1, "a job id"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withClients(cmd, func(c *clients, asJSON bool) error {
				out := cmd.OutOrStdout()
				prog := &jobProgress{w: out, asJSON: asJSON, tty: !asJSON && isTerminal(out), lines: true}
				j, err := watchJob(cmd.Context(), c, args[0], prog)
				if err != nil {
					return err
				}
				if err := jobError(j); err != nil {
					return err
				}
				if !asJSON {
					fmt.Fprintf(out, "job %s succeeded%s\n", j.GetId(), prefixed(": ", j.GetResult()))
				}
				return nil
			})
		},
	}
}

func newJobCancelCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "cancel ID",
		Short: "Ask a running job to stop (it ends Cancelled, or Succeeded if it was past the point of no return)",
		Args:  exactArgs(1, "a job id"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withClients(cmd, func(c *clients, asJSON bool) error {
				resp, err := c.jobs.CancelJob(cmd.Context(), connect.NewRequest(&stowagev1.CancelJobRequest{Id: args[0]}))
				if err != nil {
					return c.rpcErr(err)
				}
				return emit(cmd, asJSON, resp.Msg, func(w io.Writer) {
					fmt.Fprintf(w, "job %s %s\n", resp.Msg.GetJob().GetId(), enumName(resp.Msg.GetJob().GetState()))
				})
			})
		},
	}
}

func printJob(w io.Writer, j *stowagev1.Job) {
	kv := [][2]string{
		{"ID", j.GetId()},
		{"Kind", j.GetKind()},
		{"State", enumName(j.GetState())},
		{"Target", orDash(j.GetTargetId())},
		{"Phase", orDash(j.GetProgress().GetPhase())},
		{"Progress", progressString(j.GetProgress(), true)},
	}
	for _, p := range [][2]string{{"Error", j.GetError()}, {"Result", j.GetResult()}, {"Idempotency key", j.GetIdempotencyKey()}, {"Created by", j.GetCreatedBy()}, {"Trace", j.GetTraceId()}} {
		if p[1] != "" {
			kv = append(kv, p)
		}
	}
	kv = append(kv, [2]string{"Created", tsAgo(j.GetCreatedAt())}, [2]string{"Updated", tsAgo(j.GetUpdatedAt())})
	keyValues(w, kv)
	if j.GetPlan() != nil {
		fmt.Fprintln(w, "\nPlan:")
		printPlan(w, j.GetPlan())
	}
}

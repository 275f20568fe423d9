package main

// The shared flow of every command that starts a job: call the controller,
// print the plan of a dry run, or wait for the job and print what it made,
// or say how to follow it. The watcher is in watch.go, its display in
// progress.go, the plan printer in output.go.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/google/uuid"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// jobFlags are the flags of every command that starts a job.
type jobFlags struct {
	dryRun bool
	wait   bool
	key    string
	// idempotent: the request takes an idempotency key (--idempotency-key).
	idempotent bool
}

// register adds --dry-run and --wait, and --idempotency-key when the request
// has one.
func (f *jobFlags) register(cmd *cobra.Command, idempotent bool) {
	fl := cmd.Flags()
	fl.BoolVar(&f.dryRun, "dry-run", false, "print what the controller would do (the plan) and change nothing")
	fl.BoolVar(&f.wait, "wait", false, "follow the job to its end, then print the result")
	if idempotent {
		f.idempotent = true
		fl.StringVar(&f.key, "idempotency-key", "", "a key that makes a retried request return the first one's job (default: one of this run's own)")
	}
}

// retryWindow is how long a job-starting call whose outcome is unknown
// (its controller went away before replying: a leader killed mid-request)
// is sent again, with the same idempotency key, to whichever controller
// answers: the first one's job comes back if it was recorded.
const retryWindow = 30 * time.Second

// startJob calls call; when the request takes an idempotency key, it gets
// one of this run's own (unless given or a dry run), and a call whose
// outcome is unknown is sent again with it until retryWindow passes.
func startJob(ctx context.Context, c *clients, f *jobFlags, call func(context.Context, *clients) (jobResponse, error)) (jobResponse, error) {
	if f.idempotent && f.key == "" && !f.dryRun {
		f.key = "cli-" + uuid.NewString()
	}
	deadline := time.Now().Add(retryWindow)
	for pause := 250 * time.Millisecond; ; pause = min(2*pause, 2*time.Second) {
		resp, err := call(ctx, c)
		code := connect.CodeOf(err)
		if err == nil || f.key == "" || (code != connect.CodeUnavailable && code != connect.CodeUnknown) || time.Now().After(deadline) {
			return resp, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(pause):
		}
	}
}

// jobResponse is what every job-starting RPC returns.
type jobResponse interface {
	proto.Message
	GetJob() *stowagev1.Job
	GetPlan() *stowagev1.Plan
}

// started unwraps the response of a job-starting RPC.
func started[T any, P interface {
	*T
	jobResponse
}](r *connect.Response[T], err error) (jobResponse, error) {
	if err != nil {
		return nil, err
	}
	return P(r.Msg), nil
}

// jobCmd is a command that names one object and starts a job on it; v prints
// the object after --wait (a view without get: the job removes the object).
// call may return a usageError for a flag it checks.
func jobCmd(use, short string, v view, idempotent bool, call func(ctx context.Context, c *clients, id string, f *jobFlags) (jobResponse, error)) *cobra.Command {
	var f jobFlags
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  exactArgs(1, "a "+v.kind+" id"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runJob(cmd, &f, v, args[0], func(ctx context.Context, c *clients) (jobResponse, error) {
				return call(ctx, c, args[0], &f)
			})
		},
	}
	f.register(cmd, idempotent)
	return cmd
}

// runJob is the flow of a job-starting command. call sends the request
// (with f's dry run and idempotency key); id is the object the command names,
// "" when it creates one. Afterwards v fetches and prints the object; a view
// without get means the job removes it.
func runJob(cmd *cobra.Command, f *jobFlags, v view, id string, call func(context.Context, *clients) (jobResponse, error)) error {
	return withClients(cmd, func(c *clients, asJSON bool) error {
		ctx, out := cmd.Context(), cmd.OutOrStdout()
		resp, err := startJob(ctx, c, f, call)
		if u := (usageError{}); errors.As(err, &u) {
			return err
		}
		if err != nil {
			return c.rpcErr(err)
		}
		if created := objectID(resp); created != "" {
			id = created
		}
		job := resp.GetJob()
		if id == "" {
			id = job.GetTargetId()
		}
		switch {
		case f.dryRun:
			return emit(cmd, asJSON, resp, func(w io.Writer) {
				fmt.Fprintln(w, "Dry run: nothing was changed. The plan:")
				printPlan(w, resp.GetPlan())
			})
		case job == nil:
			// Done at once, nothing to follow.
			if asJSON || v.get == nil || id == "" {
				return emit(cmd, asJSON, resp, func(w io.Writer) { fmt.Fprintf(w, "%s %s: done\n", v.kind, id) })
			}
			return showObject(ctx, c, out, v, id)
		case !f.wait:
			return emit(cmd, asJSON, resp, func(w io.Writer) {
				fmt.Fprintf(w, "%s %s: job %s %s", v.kind, orDash(id), job.GetId(), enumName(job.GetState()))
				if s := job.GetPlan().GetStrategy(); s != "" {
					fmt.Fprintf(w, ", strategy %s", s)
				}
				fmt.Fprintf(w, "\nfollow it: stowage job watch %s\n", job.GetId())
			})
		}
		final, err := watchJob(ctx, c, job.GetId(), &jobProgress{w: cmd.ErrOrStderr(), tty: isTerminal(cmd.ErrOrStderr())})
		if err != nil {
			return err
		}
		jobErr := jobError(final)
		var obj proto.Message
		if jobErr == nil && v.get != nil && id != "" {
			if obj, err = v.get(ctx, c, id); err != nil {
				return c.rpcErr(err)
			}
		}
		if asJSON {
			if err := printJobAnd(out, final, obj); err != nil {
				return err
			}
			return jobErr
		}
		if jobErr != nil {
			return jobErr
		}
		fmt.Fprintf(out, "job %s succeeded%s\n", final.GetId(), prefixed(": ", final.GetResult()))
		if obj == nil {
			if v.get == nil && final.GetResult() == "" {
				fmt.Fprintf(out, "%s %s deleted\n", v.kind, id)
			}
			return nil
		}
		fmt.Fprintln(out)
		v.human(out, obj)
		return nil
	})
}

// showObject fetches the object and prints it for a human.
func showObject(ctx context.Context, c *clients, w io.Writer, v view, id string) error {
	m, err := v.get(ctx, c, id)
	if err != nil {
		return c.rpcErr(err)
	}
	v.human(w, m)
	return nil
}

// objectID is the id of the volume, template or snapshot a response carries.
func objectID(m proto.Message) string {
	switch r := m.(type) {
	case interface{ GetVolume() *stowagev1.Volume }:
		return r.GetVolume().GetId()
	case interface{ GetTemplate() *stowagev1.Template }:
		return r.GetTemplate().GetId()
	case interface{ GetSnapshot() *stowagev1.Snapshot }:
		return r.GetSnapshot().GetId()
	}
	return ""
}

// printJobAnd prints {"job": job, ...the fields of obj} as one JSON object,
// e.g. {"job": ..., "volume": ...} after `volume create --wait`.
func printJobAnd(w io.Writer, job *stowagev1.Job, obj proto.Message) error {
	fields := map[string]json.RawMessage{}
	mo := protojson.MarshalOptions{EmitUnpopulated: true}
	if obj != nil {
		b, err := mo.Marshal(obj)
		if err != nil {
			return err
		}
		if err := json.Unmarshal(b, &fields); err != nil {
			return err
		}
	}
	b, err := mo.Marshal(job)
	if err != nil {
		return err
	}
	fields["job"] = b
	out, err := json.MarshalIndent(fields, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(out))
	return err
}

// jobError is nil for a job that succeeded, an error that exits 130 for one
// that was cancelled, and a plain error (exit 1) for one that failed.
func jobError(j *stowagev1.Job) error {
	switch j.GetState() {
	case stowagev1.JobState_JOB_STATE_SUCCEEDED:
		return nil
	case stowagev1.JobState_JOB_STATE_CANCELLED:
		return fmt.Errorf("job %s was cancelled%s: %w", j.GetId(), prefixed(" (", j.GetError(), ")"), context.Canceled)
	}
	return fmt.Errorf("job %s %s: %s", j.GetId(), strings.ToLower(enumName(j.GetState())), orDash(j.GetError()))
}

package main

// The shared flow of every command that starts a job: call the controller,
// print the plan of a dry run, or wait for the job and print what it made,
// or say how to follow it. Also the job watcher and the plan printer.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"golang.org/x/term"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// jobFlags are the flags of every command that starts a job.
type jobFlags struct {
	dryRun bool
	wait   bool
	key    string
}

// register adds --dry-run and --wait, and --idempotency-key when the request
// has one.
func (f *jobFlags) register(cmd *cobra.Command, idempotent bool) {
	fl := cmd.Flags()
	fl.BoolVar(&f.dryRun, "dry-run", false, "print what the controller would do (the plan) and change nothing")
	fl.BoolVar(&f.wait, "wait", false, "follow the job to its end, then print the result")
	if idempotent {
		fl.StringVar(&f.key, "idempotency-key", "", "a key that makes a retried request return the first one's job")
	}
}

// jobResponse is what every job-starting RPC returns.
type jobResponse interface {
	proto.Message
	GetJob() *stowagev1.Job
	GetPlan() *stowagev1.Plan
}

// msgOf unwraps a unary response.
func msgOf[T any](r *connect.Response[T], err error) (*T, error) {
	if err != nil {
		return nil, err
	}
	return r.Msg, nil
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

// view is how to fetch and print one kind of object: a volume, template,
// snapshot or job.
type view struct {
	kind  string
	get   func(ctx context.Context, c *clients, id string) (proto.Message, error)
	human func(w io.Writer, m proto.Message)
}

// newView builds a view from a typed Get call and its printer.
func newView[R proto.Message](kind string, get func(context.Context, *clients, string) (R, error), human func(io.Writer, R)) view {
	return view{
		kind: kind,
		get: func(ctx context.Context, c *clients, id string) (proto.Message, error) {
			r, err := get(ctx, c, id)
			if err != nil {
				return nil, err
			}
			return r, nil
		},
		human: func(w io.Writer, m proto.Message) { human(w, m.(R)) },
	}
}

// emit prints msg as protojson, or calls human.
func emit(cmd *cobra.Command, asJSON bool, msg proto.Message, human func(w io.Writer)) error {
	if asJSON {
		return printProto(cmd.OutOrStdout(), msg)
	}
	human(cmd.OutOrStdout())
	return nil
}

// getCmd is "<kind> get ID": fetch one object and print it.
func getCmd(use, short string, v view) *cobra.Command {
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  exactArgs(1, "a "+v.kind+" id"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withClients(cmd, func(c *clients, asJSON bool) error {
				m, err := v.get(cmd.Context(), c, args[0])
				if err != nil {
					return c.rpcErr(err)
				}
				return emit(cmd, asJSON, m, func(w io.Writer) { v.human(w, m) })
			})
		},
	}
}

// listCmd is "<kind> list": call lists, then print protojson or a table of
// one row per item.
func listCmd[R proto.Message, T any](use, short string, header []string,
	list func(context.Context, *clients) (R, error), items func(R) []T, row func(T) []string) *cobra.Command {
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withClients(cmd, func(c *clients, asJSON bool) error {
				resp, err := list(cmd.Context(), c)
				if err != nil {
					return c.rpcErr(err)
				}
				return emit(cmd, asJSON, resp, func(w io.Writer) {
					rows := [][]string{}
					for _, it := range items(resp) {
						rows = append(rows, row(it))
					}
					table(w, header, rows)
				})
			})
		},
	}
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
		resp, err := call(ctx, c)
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

func jobEnded(j *stowagev1.Job) bool {
	switch j.GetState() {
	case stowagev1.JobState_JOB_STATE_SUCCEEDED, stowagev1.JobState_JOB_STATE_FAILED, stowagev1.JobState_JOB_STATE_CANCELLED:
		return true
	}
	return false
}

// watchHTTPClient has no overall timeout: a watch lasts as long as its job.
var watchHTTPClient = &http.Client{}

// watchJob follows job id with WatchJob until it ends, reporting each update
// to prog, and returns the job as it ended.
func watchJob(ctx context.Context, c *clients, id string, prog *jobProgress) (*stowagev1.Job, error) {
	defer prog.close()
	var last *stowagev1.Job
	st, err := stowagev1connect.NewJobServiceClient(watchHTTPClient, c.url).WatchJob(ctx, connect.NewRequest(&stowagev1.WatchJobRequest{Id: id}))
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

// jobProgress shows a job's updates: one protojson line per update with
// asJSON, else a bar when tty, else one line per update when lines, else
// nothing (--wait on a pipe).
type jobProgress struct {
	w      io.Writer
	tty    bool
	lines  bool
	asJSON bool
	bar    *progressReporter
	what   string
	total  int64
}

func (p *jobProgress) update(j *stowagev1.Job) {
	pr := j.GetProgress()
	switch {
	case p.asJSON:
		b, err := protojson.Marshal(j)
		if err == nil {
			fmt.Fprintln(p.w, string(b))
		}
	case p.tty && jobEnded(j):
		p.close()
	case p.tty:
		what := strings.TrimSpace(j.GetKind() + " " + pr.GetPhase())
		total := pr.GetBytesTotal()
		if total <= 0 {
			total = -1
		}
		if p.bar == nil || what != p.what || total != p.total {
			p.close()
			p.bar, p.what, p.total = newProgressReporter(p.w, what, total, false), what, total
		}
		if p.bar != nil {
			p.bar.update(stream.Progress{Done: pr.GetBytesDone(), Total: pr.GetBytesTotal(), BytesPerS: pr.GetBytesPerSecond()})
		}
	case p.lines:
		fmt.Fprintln(p.w, jobLine(j))
	}
}

func (p *jobProgress) close() {
	if p.bar != nil {
		p.bar.close()
		p.bar = nil
	}
}

// jobLine is one line of `job watch` on a pipe.
func jobLine(j *stowagev1.Job) string {
	parts := []string{enumName(j.GetState()), orDash(j.GetProgress().GetPhase()), progressString(j.GetProgress(), true)}
	if j.GetError() != "" {
		parts = append(parts, "error: "+j.GetError())
	}
	return strings.Join(parts, "  ")
}

// progressString is "1.0 GiB / 4.0 GiB (25%)", with ", 100.0 MiB/s" when
// rate is set; "-" before anything moved.
func progressString(p *stowagev1.JobProgress, rate bool) string {
	done, total := p.GetBytesDone(), p.GetBytesTotal()
	var s string
	switch {
	case total > 0:
		s = fmt.Sprintf("%s / %s (%.0f%%)", humanBytes(done), humanBytes(total), float64(done)*100/float64(total))
	case done > 0:
		s = humanBytes(done)
	default:
		return "-"
	}
	if rate && p.GetBytesPerSecond() > 0 {
		s += fmt.Sprintf(", %s/s", humanBytes(int64(p.GetBytesPerSecond())))
	}
	return s
}

// printPlan prints what the controller decided: strategy and priority, the
// steps with host, state and reason, then why.
func printPlan(w io.Writer, p *stowagev1.Plan) {
	if p == nil {
		fmt.Fprintln(w, "(the controller returned no plan)")
		return
	}
	keyValues(w, [][2]string{{"Strategy", orDash(p.GetStrategy())}, {"Priority", orDash(p.GetPriority())}})
	if len(p.GetSteps()) > 0 {
		fmt.Fprintln(w)
		withErr := false
		for _, s := range p.GetSteps() {
			withErr = withErr || s.GetError() != ""
		}
		header := []string{"#", "STEP", "HOST", "STATE", "REASON"}
		if withErr {
			header = append(header, "ERROR")
		}
		rows := [][]string{}
		for i, s := range p.GetSteps() {
			r := []string{fmt.Sprint(i + 1), s.GetName(), orDash(s.GetHostId()), enumName(s.GetState()), orDash(s.GetReason())}
			if withErr {
				r = append(r, orDash(s.GetError()))
			}
			rows = append(rows, r)
		}
		table(w, header, rows)
	}
	if len(p.GetReasons()) > 0 {
		fmt.Fprintln(w, "\nReasons:")
		for _, r := range p.GetReasons() {
			fmt.Fprintf(w, "  - %s\n", r)
		}
	}
}

// enumName is stateName, or "-" for the unspecified zero value.
func enumName(e protoreflect.Enum) string {
	if e.Number() == 0 {
		return "-"
	}
	return stateName(e)
}

// tsAgo is ago for a timestamp that may be unset.
func tsAgo(ts *timestamppb.Timestamp) string {
	if ts == nil {
		return "-"
	}
	return ago(ts.AsTime())
}

// prefixed is pre+s+post, or "" when s is empty.
func prefixed(pre, s string, post ...string) string {
	if s == "" {
		return ""
	}
	return pre + s + strings.Join(post, "")
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// oneOf checks a flag's value against the valid ones, case-insensitively, and
// returns it lower-cased; "" passes as "".
func oneOf(flag, s string, valid ...string) (string, error) {
	v := strings.ToLower(strings.TrimSpace(s))
	if v == "" {
		return "", nil
	}
	for _, ok := range valid {
		if v == ok {
			return v, nil
		}
	}
	want := strings.Join(valid, ", ")
	if n := len(valid); n > 1 {
		want = strings.Join(valid[:n-1], ", ") + " or " + valid[n-1]
	}
	return "", usageError{fmt.Errorf("%s %q: want %s", flag, s, want)}
}

// enumFlag reads a flag value such as "qcow2" as the enum value named
// prefix+"QCOW2"; "" is the zero value.
func enumFlag[E ~int32](flag, s string, values map[string]int32, prefix string, valid ...string) (E, error) {
	v, err := oneOf(flag, s, valid...)
	if err != nil || v == "" {
		return 0, err
	}
	return E(values[prefix+strings.ToUpper(v)]), nil
}

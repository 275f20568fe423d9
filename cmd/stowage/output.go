package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/oteltrace"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/redact"
)

// outputJSON reports whether --output json was asked for, and validates the flag.
func outputJSON(cmd *cobra.Command) (bool, error) {
	o, _ := cmd.Flags().GetString("output")
	switch o {
	case "json":
		return true, nil
	case "table", "":
		return false, nil
	}
	return false, usageError{fmt.Errorf("--output %q: want table or json", o)}
}

// printProto writes msg as indented protojson (enum names, all fields).
func printProto(w io.Writer, msg proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, Indent: "  ", EmitUnpopulated: true}.Marshal(msg)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(b))
	return err
}

// table prints rows under a header, aligned.
func table(w io.Writer, header []string, rows [][]string) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	tw.Flush()
}

// keyValues prints "key: value" lines, aligned.
func keyValues(w io.Writer, kv [][2]string) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, p := range kv {
		fmt.Fprintf(tw, "%s:\t%s\n", p[0], p[1])
	}
	tw.Flush()
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := time.Since(t).Round(time.Second)
	if d < 0 {
		d = 0
	}
	return d.String() + " ago"
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// newLogger builds the process logger from --log-level and --log-format;
// it redacts URL secrets (package redact) and becomes slog's default.
func newLogger(cmd *cobra.Command) (*slog.Logger, error) {
	lvl, _ := cmd.Flags().GetString("log-level")
	format, _ := cmd.Flags().GetString("log-format")
	var level slog.Level
	if err := level.UnmarshalText([]byte(lvl)); err != nil {
		return nil, usageError{fmt.Errorf("--log-level %q: want debug, info, warn or error", lvl)}
	}
	opts := &slog.HandlerOptions{Level: level}
	// Every process logs through redact.Handler: a URL in a message or an
	// attribute (a template's source, an error) loses its secrets. The
	// logger also becomes slog's default, so a component built without a
	// logger (falling back to slog.Default) is redacted too.
	var h slog.Handler
	switch format {
	case "text":
		h = slog.NewTextHandler(os.Stderr, opts)
	case "json":
		h = slog.NewJSONHandler(os.Stderr, opts)
	}
	if h != nil {
		log := slog.New(oteltrace.LogHandler(redact.Handler(h)))
		slog.SetDefault(log)
		return log, nil
	}
	return nil, usageError{fmt.Errorf("--log-format %q: want text or json", format)}
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

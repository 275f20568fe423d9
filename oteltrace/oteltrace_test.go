package oteltrace

import (
	"context"
	"log/slog"
	"strings"
	"testing"

	"connectrpc.com/connect"
)

// Heartbeats and task polls get no span; other calls do.
func TestTracedCalls(t *testing.T) {
	for proc, want := range map[string]bool{
		"/stowage.v1.AgentControlService/Heartbeat": false,
		"/stowage.v1.AgentService/GetTask":          false,
		"/stowage.v1.AgentService/RunTask":          true,
		"/stowage.v1.VolumeService/CreateVolume":    true,
	} {
		if got := traced(context.Background(), connect.Spec{Procedure: proc}); got != want {
			t.Errorf("traced(%s) = %v, want %v", proc, got, want)
		}
	}
}

// A span's trace continues from a recorded traceparent, and log lines in
// it carry its ids; lines outside any span carry none.
func TestParentAndLogLines(t *testing.T) {
	tr, err := Setup(context.Background(), Config{Service: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Shutdown(context.Background())
	ctx, span := Start(context.Background(), "request")
	parent := Parent(ctx)
	id := TraceID(ctx)
	span.End()
	if len(id) != 32 || !strings.Contains(parent, id) {
		t.Fatalf("trace id %q, traceparent %q", id, parent)
	}
	later, span2 := Start(WithParent(context.Background(), parent), "job")
	defer span2.End()
	if TraceID(later) != id {
		t.Errorf("the job's span is in trace %s, want the request's %s", TraceID(later), id)
	}
	var b strings.Builder
	log := slog.New(LogHandler(slog.NewTextHandler(&b, nil)))
	log.InfoContext(later, "in the trace")
	log.Info("outside")
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "trace_id="+id) || !strings.Contains(lines[0], "span_id=") || strings.Contains(lines[1], "trace_id") {
		t.Errorf("log lines:\n%s", b.String())
	}
	if WithParent(context.Background(), "garbage") == nil || TraceID(WithParent(context.Background(), "garbage")) != "" {
		t.Error("a malformed traceparent gave a trace")
	}
}

package main

import (
	"context"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/protobuf/proto"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// otlpReceiver is an OTLP/HTTP trace receiver on loopback: what an
// OpenTelemetry collector's otlphttp receiver accepts (POST /v1/traces,
// an ExportTraceServiceRequest in protobuf), keeping every span.
type otlpReceiver struct {
	mu    sync.Mutex
	spans []recvSpan
	posts int
}

// recvSpan is one span as received: its trace, the service that sent it.
type recvSpan struct {
	trace, id, parent, name, service string
	kind                             string
}

func (r *otlpReceiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodPost || req.URL.Path != "/v1/traces" || req.Header.Get("Content-Type") != "application/x-protobuf" {
		http.Error(w, "want POST /v1/traces with application/x-protobuf", http.StatusBadRequest)
		return
	}
	body, err := io.ReadAll(req.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var msg collectortrace.ExportTraceServiceRequest
	if err := proto.Unmarshal(body, &msg); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.mu.Lock()
	r.posts++
	for _, rs := range msg.GetResourceSpans() {
		service := ""
		for _, a := range rs.GetResource().GetAttributes() {
			if a.GetKey() == "service.name" {
				service = a.GetValue().GetStringValue()
			}
		}
		for _, ss := range rs.GetScopeSpans() {
			for _, s := range ss.GetSpans() {
				r.spans = append(r.spans, recvSpan{trace: hex.EncodeToString(s.GetTraceId()), id: hex.EncodeToString(s.GetSpanId()),
					parent: hex.EncodeToString(s.GetParentSpanId()), name: s.GetName(), service: service, kind: s.GetKind().String()})
			}
		}
	}
	r.mu.Unlock()
	out, _ := proto.Marshal(&collectortrace.ExportTraceServiceResponse{})
	w.Header().Set("Content-Type", "application/x-protobuf")
	_, _ = w.Write(out)
}

// inTrace returns the spans received for trace id.
func (r *otlpReceiver) inTrace(id string) []recvSpan {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []recvSpan
	for _, s := range r.spans {
		if s.trace == id {
			out = append(out, s)
		}
	}
	return out
}

// TestTraceEndToEnd: with --otlp-endpoint, one volume create (a full copy
// from a template) is one trace spanning the controller and the agent:
// the API call, the job and its steps, the controller's calls to the
// agent, the agent's handling of them and its tasks (the copy among
// them), exported by OTLP/HTTP to a receiver on loopback. The job record
// carries the trace id, and so does the agent's log line for each task.
func TestTraceEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	recv := &otlpReceiver{}
	collector := httptest.NewServer(recv)
	defer collector.Close()
	ctx := context.Background()
	otlp := []string{"--otlp-endpoint", collector.URL}
	root, server, ag := oneHost(t, otlp, otlp)
	a := newAPI(server)
	p1 := addStore(t, a, "p1", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p1"), &stowagev1.Scope{Zone: "z1"})
	addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), &stowagev1.Scope{Zone: "z1"})

	raw := filepath.Join(root, "web", "t.raw")
	if err := os.MkdirAll(filepath.Dir(raw), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(raw, []byte(strings.Repeat("traced!!", 256<<10)), 0o644); err != nil { // 2 MiB
		t.Fatal(err)
	}
	web := httptest.NewServer(http.FileServer(http.Dir(filepath.Dir(raw))))
	defer web.Close()
	reg, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "t", Url: web.URL + "/t.raw",
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW, Checksum: "sha256:" + sha256File(t, raw)}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, reg.Msg.GetJob())

	cv, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "v1", TemplateId: "t", StoreId: p1.GetId(), Strategy: "full"}))
	if err != nil {
		t.Fatal(err)
	}
	job := mustSucceed(t, a, cv.Msg.GetJob())
	tid := job.GetTraceId()
	if len(tid) != 32 || strings.Trim(tid, "0") == "" || !strings.Contains(job.GetTraceParent(), tid) {
		t.Fatalf("job record: trace id %q, parent %q", tid, job.GetTraceParent())
	}
	if reg.Msg.GetJob().GetTraceId() == tid {
		t.Errorf("the template registration and the volume create share trace %s: want one trace per request", tid)
	}

	// The spans arrive in batches (one a second).
	want := []struct{ service, name, kind string }{
		{"stowage-controller", "stowage.v1.VolumeService/CreateVolume", "SPAN_KIND_SERVER"},
		{"stowage-controller", "job volume.create", ""},
		{"stowage-controller", "stowage.v1.AgentService/RunTask", "SPAN_KIND_CLIENT"},
		{"stowage-agent", "stowage.v1.AgentService/RunTask", "SPAN_KIND_SERVER"},
		{"stowage-agent", "agent task copy_image", ""}, // the data-path copy
	}
	var spans []recvSpan
	has := func(service, name, kind string) bool {
		for _, s := range spans {
			if s.service == service && s.name == name && (kind == "" || s.kind == kind) {
				return true
			}
		}
		return false
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		spans = recv.inTrace(tid)
		missing := 0
		for _, w := range want {
			if !has(w.service, w.name, w.kind) {
				missing++
			}
		}
		if missing == 0 {
			break
		}
		if time.Now().After(deadline) {
			var got []string
			for _, s := range spans {
				got = append(got, s.service+" "+s.kind+" "+s.name)
			}
			sort.Strings(got)
			t.Fatalf("trace %s after 15 s: %d spans, %d of the wanted missing; got:\n  %s", tid, len(spans), missing, strings.Join(got, "\n  "))
		}
		time.Sleep(200 * time.Millisecond)
	}
	steps := 0
	ids := map[string]bool{}
	for _, s := range spans {
		ids[s.id] = true
		if strings.HasPrefix(s.name, "step ") && s.service == "stowage-controller" {
			steps++
		}
	}
	if steps < len(job.GetPlan().GetSteps()) {
		t.Errorf("%d step spans for the job's %d steps", steps, len(job.GetPlan().GetSteps()))
	}
	// One tree: every span but the API call's has its parent in the trace.
	roots := 0
	for _, s := range spans {
		if !ids[s.parent] {
			roots++
			if s.name != "stowage.v1.VolumeService/CreateVolume" {
				t.Errorf("span %q (%s) has its parent %q outside the trace's spans", s.name, s.service, s.parent)
			}
		}
	}
	if roots != 1 {
		t.Errorf("trace %s has %d roots, want the CreateVolume call only", tid, roots)
	}
	t.Logf("trace %s: %d spans (%d steps) from %d exports", tid, len(spans), steps, recv.posts)

	// The agent's log lines for the trace's tasks carry its id.
	lines := 0
	for _, l := range strings.Split(ag.log.String(), "\n") {
		if strings.Contains(l, `msg="task ended"`) && strings.Contains(l, "trace_id="+tid) {
			lines++
		}
	}
	if lines == 0 {
		t.Errorf("no agent log line \"task ended\" with trace_id=%s:\n%s", tid, grepLines(ag.log.String(), "task ended"))
	}
}

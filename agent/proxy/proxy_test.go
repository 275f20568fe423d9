package proxy

import (
	"context"
	"net/http"
	"net/http/httptest"
	"reflect"
	"regexp"
	"testing"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/drivers"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

func fetchTask(src string) *stowagev1.Task {
	return &stowagev1.Task{Step: &stowagev1.Task_FetchImage{FetchImage: &stowagev1.FetchImageStep{Source: src, Dest: "/s/t.raw"}}}
}

func TestTaskIDs(t *testing.T) {
	// Without a task id in the context: random, never repeated.
	if a, b := taskID(context.Background(), fetchTask("x")), taskID(context.Background(), fetchTask("x")); a == b {
		t.Fatalf("random ids repeat: %q", a)
	}
	// With one: deterministic per step kind, arguments and occurrence.
	ids := func() []string {
		ctx := drivers.WithTaskID(context.Background(), "job-1.copy")
		return []string{taskID(ctx, fetchTask("a")), taskID(ctx, fetchTask("b")), taskID(ctx, fetchTask("a")),
			taskID(ctx, &stowagev1.Task{Step: &stowagev1.Task_StatPath{StatPath: &stowagev1.StatPathStep{Path: "/s/t.raw"}}})}
	}
	first, again := ids(), ids()
	for i := range first {
		if first[i] != again[i] {
			t.Fatalf("call %d: %q then %q after a restart", i, first[i], again[i])
		}
	}
	if !regexp.MustCompile(`^job-1\.copy\.fetch_image-[0-9a-f]{12}$`).MatchString(first[0]) {
		t.Errorf("id %q", first[0])
	}
	if first[0] == first[1] || first[2] != first[0]+".2" || first[3] == first[0] {
		t.Errorf("ids %q", first)
	}
	// The task's own id does not change its digest.
	ctx := drivers.WithTaskID(context.Background(), "j")
	withID := fetchTask("a")
	withID.Id = "something"
	if a, b := taskID(ctx, withID), taskID(drivers.WithTaskID(context.Background(), "j"), fetchTask("a")); a != b {
		t.Errorf("%q != %q", a, b)
	}
	// Ids an agent would refuse are hashed.
	long := drivers.WithTaskID(context.Background(), string(make([]byte, 120))+"x")
	if id := taskID(long, fetchTask("a")); !regexp.MustCompile(`^t-[0-9a-f]{64}$`).MatchString(id) {
		t.Errorf("long id %q", id)
	}
}

func TestImageInfoRoundTrip(t *testing.T) {
	for _, in := range []drivers.ImageInfo{
		{Path: "/a", Format: drivers.FormatQCOW2, VirtualSize: 1, PhysicalSize: 2, BackingFile: "/b", SHA256: "ff", BytesWritten: 3, BytesSkipped: 4, Method: "linked"},
		{Path: "/c", Format: "vmdk"},
		{Path: "/d", Format: drivers.FormatISO},
	} {
		if out := ImageInfoFromProto(ImageInfoToProto(in)); out != in {
			t.Errorf("%+v came back as %+v", in, out)
		}
	}
	b := drivers.BackupInfo{Manifest: "/m", Size: 1, Chunks: 2, ZeroChunks: 3, NewChunks: 4, NewBytes: 5, ReusedBytes: 6, ReadBytes: 7}
	if out := BackupInfoFromProto(BackupInfoToProto(b)); out != b {
		t.Errorf("backup info came back as %+v", out)
	}
	for _, m := range []drivers.CloneMode{drivers.CloneReflink, drivers.CloneLinked, drivers.CloneFull} {
		if CloneModeFromProto(CloneModeToProto(m)) != m {
			t.Errorf("clone mode %s", m)
		}
	}
}

// recorder is an endpoint that records the image requests it gets.
type recorder struct {
	drivers.Endpoint // nil: only the methods below are called
	got              []any
}

func (r *recorder) CopyImage(_ context.Context, req drivers.CopyRequest, _ drivers.Progress) (drivers.ImageInfo, error) {
	r.got = append(r.got, req)
	return drivers.ImageInfo{}, nil
}

func (r *recorder) CloneImage(_ context.Context, req drivers.CloneRequest, _ drivers.Progress) (drivers.ImageInfo, error) {
	r.got = append(r.got, req)
	return drivers.ImageInfo{}, nil
}

func (r *recorder) InspectImage(_ context.Context, path string, format drivers.Format) (drivers.ImageInfo, error) {
	r.got = append(r.got, []any{"inspect", path, format})
	return drivers.ImageInfo{}, nil
}

func (r *recorder) ResizeImage(_ context.Context, path string, format drivers.Format, size int64) (drivers.ImageInfo, error) {
	r.got = append(r.got, []any{"resize", path, format, size})
	return drivers.ImageInfo{}, nil
}

func (r *recorder) SnapshotImage(_ context.Context, req drivers.SnapshotRequest) (drivers.SnapshotInfo, error) {
	r.got = append(r.got, []any{"snapshot", req})
	return drivers.SnapshotInfo{}, nil
}

func (r *recorder) RevertImage(_ context.Context, req drivers.SnapshotRequest) (drivers.ImageInfo, error) {
	r.got = append(r.got, []any{"revert", req})
	return drivers.ImageInfo{}, nil
}

func (r *recorder) RebaseImage(_ context.Context, path, newBacking string, format drivers.Format) (drivers.ImageInfo, error) {
	r.got = append(r.got, []any{"rebase", path, newBacking, format})
	return drivers.ImageInfo{}, nil
}

func (r *recorder) BackupImage(_ context.Context, req drivers.BackupRequest, _ drivers.Progress) (drivers.BackupInfo, error) {
	r.got = append(r.got, req)
	return drivers.BackupInfo{}, nil
}

// agentService runs tasks on an endpoint through Execute, as the agent does.
type agentService struct {
	stowagev1connect.UnimplementedAgentServiceHandler
	ep drivers.Endpoint
}

func (s agentService) RunTask(ctx context.Context, req *connect.Request[stowagev1.RunTaskRequest]) (*connect.Response[stowagev1.RunTaskResponse], error) {
	res, err := Execute(ctx, s.ep, req.Msg.GetTask(), nil)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&stowagev1.RunTaskResponse{Result: res}), nil
}

// The declared formats of existing images cross the wire both ways: the
// agent must never be left to probe because a field was dropped.
func TestDeclaredFormatsRoundTrip(t *testing.T) {
	rec := &recorder{}
	mux := http.NewServeMux()
	mux.Handle(stowagev1connect.NewAgentServiceHandler(agentService{ep: rec}))
	srv := httptest.NewServer(mux)
	defer srv.Close()
	ep := New("h1", srv.URL, srv.Client())
	ctx := t.Context()
	raw, q, iso := drivers.FormatRaw, drivers.FormatQCOW2, drivers.FormatISO
	want := []any{
		drivers.CopyRequest{Source: "/s/a", SourceFormat: iso, Dest: "/s/b", Format: q, Flatten: true},
		drivers.CloneRequest{Base: "/s/t", BaseFormat: raw, Dest: "/s/v", Mode: drivers.CloneLinked, Format: q, Size: 4096},
		[]any{"inspect", "/s/v", q},
		[]any{"resize", "/s/v", raw, int64(8192)},
		[]any{"snapshot", drivers.SnapshotRequest{Volume: "/s/v", Snapshot: "/s/s", Format: q}},
		[]any{"revert", drivers.SnapshotRequest{Volume: "/s/v", Snapshot: "/s/s", Format: raw}},
		[]any{"rebase", "/s/v", "/s/s", q},
		drivers.BackupRequest{Source: "/s/s", SourceFormat: q, ChunkDir: "/i/c", Manifest: "/i/m", ParentManifest: "/i/p", ChunkSize: 1 << 20},
	}
	calls := []error{
		func() error { _, err := ep.CopyImage(ctx, want[0].(drivers.CopyRequest), nil); return err }(),
		func() error { _, err := ep.CloneImage(ctx, want[1].(drivers.CloneRequest), nil); return err }(),
		func() error { _, err := ep.InspectImage(ctx, "/s/v", q); return err }(),
		func() error { _, err := ep.ResizeImage(ctx, "/s/v", raw, 8192); return err }(),
		func() error {
			_, err := ep.SnapshotImage(ctx, drivers.SnapshotRequest{Volume: "/s/v", Snapshot: "/s/s", Format: q})
			return err
		}(),
		func() error {
			_, err := ep.RevertImage(ctx, drivers.SnapshotRequest{Volume: "/s/v", Snapshot: "/s/s", Format: raw})
			return err
		}(),
		func() error { _, err := ep.RebaseImage(ctx, "/s/v", "/s/s", q); return err }(),
		func() error { _, err := ep.BackupImage(ctx, want[7].(drivers.BackupRequest), nil); return err }(),
	}
	for i, err := range calls {
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	if !reflect.DeepEqual(rec.got, want) {
		t.Fatalf("the agent got\n%#v\nwant\n%#v", rec.got, want)
	}
}

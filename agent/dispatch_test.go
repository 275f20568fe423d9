package agent_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"reflect"
	"testing"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/agent"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// recorder is a host that records the requests it gets.
type recorder struct {
	hostops.Host // nil: only the methods below are called
	got          []any
}

func (r *recorder) CopyImage(_ context.Context, req hostops.CopyRequest, _ drivers.Progress) (hostops.ImageInfo, error) {
	r.got = append(r.got, req)
	return hostops.ImageInfo{Key: req.Dest.Key, HasBacking: true}, nil
}

func (r *recorder) CloneImage(_ context.Context, req hostops.CloneRequest, _ drivers.Progress) (hostops.ImageInfo, error) {
	r.got = append(r.got, req)
	return hostops.ImageInfo{}, nil
}

func (r *recorder) InspectImage(_ context.Context, ref hostops.Ref, format drivers.Format) (hostops.ImageInfo, error) {
	r.got = append(r.got, []any{"inspect", ref, format})
	return hostops.ImageInfo{}, nil
}

func (r *recorder) ResizeImage(_ context.Context, ref hostops.Ref, format drivers.Format, size int64) (hostops.ImageInfo, error) {
	r.got = append(r.got, []any{"resize", ref, format, size})
	return hostops.ImageInfo{}, nil
}

func (r *recorder) SnapshotImage(_ context.Context, req hostops.SnapshotRequest) (hostops.SnapshotInfo, error) {
	r.got = append(r.got, []any{"snapshot", req})
	return hostops.SnapshotInfo{}, nil
}

func (r *recorder) RevertImage(_ context.Context, req hostops.SnapshotRequest) (hostops.ImageInfo, error) {
	r.got = append(r.got, []any{"revert", req})
	return hostops.ImageInfo{}, nil
}

func (r *recorder) RebaseImage(_ context.Context, ref, newBacking hostops.Ref, format drivers.Format) (hostops.ImageInfo, error) {
	r.got = append(r.got, []any{"rebase", ref, newBacking, format})
	return hostops.ImageInfo{}, nil
}

func (r *recorder) BackupImage(_ context.Context, req hostops.BackupRequest, _ drivers.Progress) (hostops.BackupInfo, error) {
	r.got = append(r.got, req)
	return hostops.BackupInfo{}, nil
}

func (r *recorder) RestoreImage(_ context.Context, req hostops.RestoreRequest, _ drivers.Progress) (hostops.ImageInfo, error) {
	r.got = append(r.got, req)
	return hostops.ImageInfo{}, nil
}

// executing runs tasks on a host through agent.Execute, as the agent does.
type executing struct {
	stowagev1connect.UnimplementedAgentServiceHandler
	host hostops.Host
}

func (s executing) RunTask(ctx context.Context, req *connect.Request[stowagev1.RunTaskRequest]) (*connect.Response[stowagev1.RunTaskResponse], error) {
	res, err := agent.Execute(ctx, s.host, req.Msg.GetTask(), nil)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&stowagev1.RunTaskResponse{Result: res}), nil
}

// Every field of the requests crosses the wire, hostops.Remote to
// agent.Execute: the declared formats of existing images above all (the
// agent must never be left to probe because a field was dropped), the
// refs, and the chunk store with its secret.
func TestRequestsRoundTrip(t *testing.T) {
	rec := &recorder{}
	mux := http.NewServeMux()
	mux.Handle(stowagev1connect.NewAgentServiceHandler(executing{host: rec}))
	srv := httptest.NewServer(mux)
	defer srv.Close()
	h := hostops.NewRemote("h1", srv.URL, srv.Client())
	ctx := t.Context()
	raw, q, iso := drivers.FormatRaw, drivers.FormatQCOW2, drivers.FormatISO
	s := func(key string) hostops.Ref { return hostops.Ref{Store: "s1", Key: key} }
	chunks := hostops.ChunkStore{URI: "s3://b/p?endpoint=http://x", Secret: map[string]string{"access_key": "a", "secret_key": "k"}}
	want := []any{
		hostops.CopyRequest{Source: "store://s2/a", SourceFormat: iso, Dest: s("b"), Format: q, Flatten: true},
		hostops.CloneRequest{Base: hostops.Ref{Store: hostops.TemplateMount, Key: "t1"}, BaseFormat: raw, Dest: s("v"), Mode: drivers.CloneLinked, Format: q, Size: 4096},
		[]any{"inspect", s("v"), q},
		[]any{"resize", s("v"), raw, int64(8192)},
		[]any{"snapshot", hostops.SnapshotRequest{Volume: s("v"), Snapshot: s("s"), Format: q}},
		[]any{"revert", hostops.SnapshotRequest{Volume: s("v"), Snapshot: s("s"), Format: raw}},
		[]any{"rebase", s("v"), s("s"), q},
		[]any{"rebase", s("v"), hostops.Ref{}, drivers.Format("")},
		hostops.BackupRequest{Source: s("s"), SourceFormat: q, Chunks: chunks, Manifest: "m", ParentManifest: "p", ChunkSize: 1 << 20,
			ChangedKnown: true, Changed: []drivers.Extent{{Offset: 4096, Length: 8192}, {Offset: 1 << 30, Length: 512}}},
		hostops.RestoreRequest{Chunks: chunks, Manifest: "m", Dest: s("r"), Format: q},
	}
	info, err := h.CopyImage(ctx, want[0].(hostops.CopyRequest), nil)
	if err != nil || info != (hostops.ImageInfo{Key: "b", HasBacking: true}) {
		t.Fatalf("copy: %+v %v", info, err)
	}
	calls := []error{
		func() error { _, err := h.CloneImage(ctx, want[1].(hostops.CloneRequest), nil); return err }(),
		func() error { _, err := h.InspectImage(ctx, s("v"), q); return err }(),
		func() error { _, err := h.ResizeImage(ctx, s("v"), raw, 8192); return err }(),
		func() error {
			_, err := h.SnapshotImage(ctx, hostops.SnapshotRequest{Volume: s("v"), Snapshot: s("s"), Format: q})
			return err
		}(),
		func() error {
			_, err := h.RevertImage(ctx, hostops.SnapshotRequest{Volume: s("v"), Snapshot: s("s"), Format: raw})
			return err
		}(),
		func() error { _, err := h.RebaseImage(ctx, s("v"), s("s"), q); return err }(),
		func() error { _, err := h.RebaseImage(ctx, s("v"), hostops.Ref{}, ""); return err }(),
		func() error { _, err := h.BackupImage(ctx, want[8].(hostops.BackupRequest), nil); return err }(),
		func() error { _, err := h.RestoreImage(ctx, want[9].(hostops.RestoreRequest), nil); return err }(),
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

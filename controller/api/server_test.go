package api

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/stowage/stowage/controller/apiauth"
	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/endpoint"
	"github.com/stowage/stowage/controller/enrol"
	"github.com/stowage/stowage/controller/hosts"
	"github.com/stowage/stowage/controller/image"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/controller/snapshot"
	"github.com/stowage/stowage/controller/volume"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/filesystem"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/errdefs/errconnect"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/rpclimit"
	"github.com/stowage/stowage/trust"
)

// edge is the controller's API as cmd/stowage assembles it (the real
// domain services over metadata on Badger in a temporary directory, the
// filesystem provider, the job runner) served by api.NewHandler on an
// in-process HTTP server, with Connect clients. The runner's base context
// is cancelled: a submitted job is recorded and never starts. Agent h1 is
// Up in zone z1; store p1 (primary) and img (image) are Up there.
type edge struct {
	t       *testing.T
	ctx     context.Context
	db      *meta.DB
	srv     *httptest.Server
	healthy error
	tokens  *apiauth.Tokens

	volumes   stowagev1connect.VolumeServiceClient
	images    stowagev1connect.ImageServiceClient
	snapshots stowagev1connect.SnapshotServiceClient
	jobs      stowagev1connect.JobServiceClient
	stores    stowagev1connect.StoreServiceClient
	hosts     stowagev1connect.HostServiceClient
	agents    stowagev1connect.AgentControlServiceClient
	primary   *stowagev1.DataStore
}

func newEdge(t *testing.T, auth bool, lim rpclimit.Limits) *edge {
	return newEdgeWith(t, auth, lim, false)
}

// newEdgeWith is newEdge, with the controller enrolling agents (a CA in a
// temporary directory) when enrolling is set.
func newEdgeWith(t *testing.T, auth bool, lim rpclimit.Limits, enrolling bool) *edge {
	t.Helper()
	log := slog.New(slog.DiscardHandler)
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	hs := hosts.New(db, nil, hosts.Config{UpHostsMaxAge: -1 /* tests move hosts behind the Service */}, log)
	sel := endpoint.New(hs, nil)
	reg := drivers.NewRegistry()
	reg.Register(filesystem.New(sel))
	stores := datastore.New(db, reg, log)
	hs.SetStoreWatcher(stores)
	runner := jobs.New(db, log)
	held, cancel := context.WithCancel(context.Background())
	cancel()
	runner.Start(held)
	mover := motion.NewMover(reg, sel)
	images := image.New(db, stores, sel, mover, runner, log)
	vols := volume.New(db, stores, images, sel, mover, runner, reg, log)
	e := &edge{t: t, ctx: context.Background(), db: db, tokens: apiauth.NewTokens(db)}
	svc := Services{Stores: stores, Hosts: hs, Images: images, Volumes: vols, Snapshots: snapshot.New(db, stores, vols, sel, runner, log),
		Jobs: runner, Tokens: e.tokens, Health: func(context.Context) error { return e.healthy }}
	if auth {
		svc.Auth = apiauth.NewGuard(e.tokens, log)
	}
	if enrolling {
		ca, err := trust.LoadOrCreateCA(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		svc.Enrol = enrol.New(db, ca, time.Hour, log)
	}
	e.srv = httptest.NewServer(NewHandler(svc, prometheus.NewRegistry(), lim))
	t.Cleanup(func() { e.srv.Close(); runner.Wait(); db.Close() })
	c, u := e.srv.Client(), e.srv.URL
	e.volumes = stowagev1connect.NewVolumeServiceClient(c, u)
	e.images = stowagev1connect.NewImageServiceClient(c, u)
	e.snapshots = stowagev1connect.NewSnapshotServiceClient(c, u)
	e.jobs = stowagev1connect.NewJobServiceClient(c, u)
	e.stores = stowagev1connect.NewStoreServiceClient(c, u)
	e.hosts = stowagev1connect.NewHostServiceClient(c, u)
	e.agents = stowagev1connect.NewAgentControlServiceClient(c, u)

	if _, err := hs.Register(e.ctx, &stowagev1.RegisterRequest{HostId: "h1", AgentUrl: "https://127.0.0.1:1", SessionId: "s1", Zone: "z1", Cluster: "c1"}); err != nil {
		t.Fatal(err)
	}
	e.primary = e.store("p1", stowagev1.StoreRole_STORE_ROLE_PRIMARY)
	e.store("img", stowagev1.StoreRole_STORE_ROLE_IMAGE)
	return e
}

func (e *edge) store(name string, role stowagev1.StoreRole) *stowagev1.DataStore {
	e.t.Helper()
	st, err := e.db.Stores().Create(e.ctx, &stowagev1.DataStore{Id: meta.NewID(), Name: name, Role: role, Provider: "filesystem",
		Url: "file:///srv/stowage/" + name, Scope: &stowagev1.Scope{Zone: "z1"}, State: stowagev1.StoreState_STORE_STATE_INITIALIZED,
		Details: map[string]string{"path": "/srv/stowage/" + name}, HostIds: []string{"h1"}, CapacityBytes: 10 << 30, AvailableBytes: 5 << 30})
	if err != nil {
		e.t.Fatal(err)
	}
	if st, err = e.db.Stores().Transition(e.ctx, st.GetId(), meta.StoreAttachSucceeded, nil); err != nil {
		e.t.Fatal(err)
	}
	return st
}

// volume records a Ready qcow2 volume on p1.
func (e *edge) volume(name string) *stowagev1.Volume {
	e.t.Helper()
	v, err := e.db.Volumes().Create(e.ctx, &stowagev1.Volume{Id: meta.NewID(), Name: name, Size: 1 << 30, StoreId: e.primary.GetId(),
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, InstallPath: "volumes/" + name})
	if err != nil {
		e.t.Fatal(err)
	}
	for _, ev := range []meta.VolumeEvent{meta.VolumeCreateRequested, meta.VolumeOperationSucceeded} {
		if v, err = e.db.Volumes().Transition(e.ctx, v.GetId(), ev, nil); err != nil {
			e.t.Fatal(err)
		}
	}
	return v
}

// Each domain error class reaches the client as its Connect code, with
// the domain's message, and comes back to the class through
// errconnect.FromConnect (what the CLI does).
func TestErrorClassesBecomeCodes(t *testing.T) {
	e := newEdge(t, false, rpclimit.Limits{})
	busy := e.volume("busy")
	if _, err := e.snapshots.TakeSnapshot(e.ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: busy.GetId()})); err != nil {
		t.Fatal(err)
	}
	snaps, err := e.snapshots.ListSnapshots(e.ctx, connect.NewRequest(&stowagev1.ListSnapshotsRequest{VolumeId: "busy"}))
	if err != nil || len(snaps.Msg.GetSnapshots()) != 1 {
		t.Fatalf("list snapshots: %v %v", snaps, err)
	}
	taking := snaps.Msg.GetSnapshots()[0].GetId()
	if _, err := e.images.RegisterTemplate(e.ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "taken", Url: "https://example.com/t.qcow2",
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Zone: "z1"})); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		name  string
		call  func() error
		code  connect.Code
		class error
		says  string
	}{
		{"get an unknown volume", func() error {
			_, err := e.volumes.GetVolume(e.ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: "nope"}))
			return err
		}, connect.CodeNotFound, errdefs.ErrNotFound, `"nope"`},
		{"get a volume without an id", func() error {
			_, err := e.volumes.GetVolume(e.ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{}))
			return err
		}, connect.CodeInvalidArgument, errdefs.ErrInvalid, "invalid GetVolumeRequest: id: value is required"},
		{"register with a bad name", func() error {
			_, err := e.images.RegisterTemplate(e.ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "a b", Url: "https://example.com/x", Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW}))
			return err
		}, connect.CodeInvalidArgument, errdefs.ErrInvalid, `template name "a b"`},
		{"register a taken name", func() error {
			_, err := e.images.RegisterTemplate(e.ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "taken", Url: "https://example.com/x", Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW}))
			return err
		}, connect.CodeAlreadyExists, errdefs.ErrAlreadyExists, "already taken"},
		{"register from a file without an import dir", func() error {
			_, err := e.images.RegisterTemplate(e.ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "f", Url: "file:///etc/shadow", Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW}))
			return err
		}, connect.CodePermissionDenied, errdefs.ErrPermissionDenied, "file://"},
		{"snapshot a busy volume", func() error {
			_, err := e.snapshots.TakeSnapshot(e.ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: "busy"}))
			return err
		}, connect.CodeAborted, errdefs.ErrAborted, "is busy (Snapshotting"},
		{"revert to a snapshot being taken", func() error {
			_, err := e.snapshots.RevertSnapshot(e.ctx, connect.NewRequest(&stowagev1.RevertSnapshotRequest{Id: taking}))
			return err
		}, connect.CodeFailedPrecondition, errdefs.ErrFailedPrecondition, "no copy on primary"},
		{"delete a snapshot being taken", func() error {
			_, err := e.snapshots.DeleteSnapshot(e.ctx, connect.NewRequest(&stowagev1.DeleteSnapshotRequest{Id: taking}))
			return err
		}, connect.CodeAborted, errdefs.ErrAborted, "wait for its job"},
		{"a join token from a controller that enrols no agents", func() error {
			_, err := e.hosts.CreateJoinToken(e.ctx, connect.NewRequest(&stowagev1.CreateJoinTokenRequest{HostId: "h2"}))
			return err
		}, connect.CodeUnimplemented, errdefs.ErrNotImplemented, "enrols no agents"},
		{"register an agent with a bad url", func() error {
			_, err := e.agents.Register(e.ctx, connect.NewRequest(&stowagev1.RegisterRequest{HostId: "h2", AgentUrl: "ftp://x", SessionId: "s"}))
			return err
		}, connect.CodeInvalidArgument, errdefs.ErrInvalid, "must be http(s)://host:port"},
		{"cancel an unknown job", func() error {
			_, err := e.jobs.CancelJob(e.ctx, connect.NewRequest(&stowagev1.CancelJobRequest{Id: "01NOPE"}))
			return err
		}, connect.CodeNotFound, errdefs.ErrNotFound, ""},
		{"delete an unknown store", func() error {
			_, err := e.stores.DeleteStore(e.ctx, connect.NewRequest(&stowagev1.DeleteStoreRequest{Id: "nope"}))
			return err
		}, connect.CodeNotFound, errdefs.ErrNotFound, "nope"},
		{"register in a zone without an image store", func() error {
			_, err := e.images.RegisterTemplate(e.ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "far", Url: "https://example.com/x",
				Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW, Zone: "z9"}))
			return err
		}, connect.CodeFailedPrecondition, errdefs.ErrFailedPrecondition, "no image store is added in zone z9"},
	} {
		err := c.call()
		var ce *connect.Error
		if !errors.As(err, &ce) || ce.Code() != c.code || !strings.Contains(ce.Message(), c.says) {
			t.Errorf("%s: %v; want %s saying %q", c.name, err, c.code, c.says)
			continue
		}
		if back := errconnect.FromConnect(err); !errors.Is(back, c.class) {
			t.Errorf("%s: FromConnect gives %v, want class %v", c.name, back, c.class)
		}
	}
	// No Up agent reaches the store: unavailable, which a client retries.
	idle := e.volume("idle")
	if _, err := e.db.Hosts().Transition(e.ctx, "h1", meta.HostHeartbeatMissed, nil); err != nil {
		t.Fatal(err)
	}
	_, err = e.snapshots.TakeSnapshot(e.ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: idle.GetId()}))
	if connect.CodeOf(err) != connect.CodeUnavailable || !strings.Contains(err.Error(), "h1 is DISCONNECTED") || !errdefs.IsUnavailable(errconnect.FromConnect(err)) {
		t.Errorf("snapshot with the only agent Disconnected: %v, want unavailable naming h1", err)
	}
	// The refusals wrote nothing: the busy volume's one snapshot and job.
	js, err := e.jobs.ListJobs(e.ctx, connect.NewRequest(&stowagev1.ListJobsRequest{}))
	if err != nil || len(js.Msg.GetJobs()) != 2 {
		t.Errorf("jobs after the refusals: %v %v, want the snapshot's and the template's", js, err)
	}
}

// What the API answers carries no secret of a template URL, in replies
// (the template's url, plans, job errors) and in error messages; the
// records keep the URL for the download.
func TestRepliesAreRedactedOnTheWire(t *testing.T) {
	e := newEdge(t, false, rpclimit.Limits{})
	const url = "https://ops:Hunter2pw@example.com/t.qcow2?X-Amz-Signature=SIGSECRET&X-Amz-Credential=AKIA"
	reg, err := e.images.RegisterTemplate(e.ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "t1", Url: url,
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Zone: "z1"}))
	if err != nil {
		t.Fatal(err)
	}
	tmplID := reg.Msg.GetTemplate().GetId()
	// A job that failed quoting the URL (as a download error would).
	failed, err := e.db.Jobs().Create(e.ctx, &stowagev1.Job{Id: meta.NewID(), Kind: image.KindRegister, TargetId: tmplID})
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range []meta.JobEvent{meta.JobStart, meta.JobFail} {
		if failed, err = e.db.Jobs().Transition(e.ctx, failed.GetId(), ev, func(j *stowagev1.Job) error {
			j.Error = "download " + url + ": connection reset"
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	got, err := e.images.GetTemplate(e.ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: "t1"}))
	if err != nil {
		t.Fatal(err)
	}
	list, err := e.images.ListTemplates(e.ctx, connect.NewRequest(&stowagev1.ListTemplatesRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	job, err := e.jobs.GetJob(e.ctx, connect.NewRequest(&stowagev1.GetJobRequest{Id: failed.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	jobs, err := e.jobs.ListJobs(e.ctx, connect.NewRequest(&stowagev1.ListJobsRequest{TargetId: tmplID}))
	if err != nil {
		t.Fatal(err)
	}
	for name, m := range map[string]interface{ String() string }{
		"RegisterTemplate": reg.Msg, "GetTemplate": got.Msg, "ListTemplates": list.Msg, "GetJob": job.Msg, "ListJobs": jobs.Msg,
	} {
		s := m.String()
		for _, secret := range []string{"Hunter2pw", "SIGSECRET", "AKIA"} {
			if strings.Contains(s, secret) {
				t.Errorf("%s reply leaks %s: %s", name, secret, s)
			}
		}
		if !strings.Contains(s, "example.com/t.qcow2") {
			t.Errorf("%s reply lost the URL: %s", name, s)
		}
	}
	if len(jobs.Msg.GetJobs()) != 2 || job.Msg.GetJob().GetError() == "" {
		t.Errorf("ListJobs for the template: %d jobs, GetJob error %q", len(jobs.Msg.GetJobs()), job.Msg.GetJob().GetError())
	}
	// WatchJob streams the same redacted record, and ends on a finished job.
	stream, err := e.jobs.WatchJob(e.ctx, connect.NewRequest(&stowagev1.WatchJobRequest{Id: failed.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	var seen int
	for stream.Receive() {
		seen++
		if s := stream.Msg().String(); strings.Contains(s, "Hunter2pw") || strings.Contains(s, "SIGSECRET") || !strings.Contains(s, "connection reset") {
			t.Errorf("WatchJob sends %s", s)
		}
	}
	if err := stream.Err(); err != nil || seen != 1 {
		t.Errorf("WatchJob of a failed job: %d messages, %v; want one, then the end", seen, err)
	}
	stream.Close()
	// A watch of an unknown job is not_found, through the streaming path.
	stream, err = e.jobs.WatchJob(e.ctx, connect.NewRequest(&stowagev1.WatchJobRequest{Id: "01NOPE"}))
	if err == nil {
		for stream.Receive() {
			t.Error("WatchJob of an unknown job sent a message")
		}
		err = stream.Err()
		stream.Close()
	}
	if connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("WatchJob of an unknown job: %v, want not_found", err)
	}

	rec, err := e.db.Templates().Get(e.ctx, tmplID)
	if err != nil || rec.GetUrl() != url {
		t.Errorf("the record's URL: %q %v, want it whole", rec.GetUrl(), err)
	}

	// An error quoting the URL: the http URL without a checksum.
	_, err = e.images.RegisterTemplate(e.ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "t2",
		Url: "http://ops:Hunter2pw@example.com/t.qcow2", Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2}))
	if connect.CodeOf(err) != connect.CodeInvalidArgument || strings.Contains(err.Error(), "Hunter2pw") || !strings.Contains(err.Error(), "example.com/t.qcow2") {
		t.Errorf("plain http refusal: %v", err)
	}
}

// Jobs list newest first and the limit keeps the newest; a target filters.
func TestListJobsLimit(t *testing.T) {
	e := newEdge(t, false, rpclimit.Limits{})
	var ids []string
	for _, name := range []string{"a", "b", "c"} {
		v := e.volume(name)
		r, err := e.snapshots.TakeSnapshot(e.ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: v.GetId()}))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.Msg.GetJob().GetId())
	}
	page, err := e.jobs.ListJobs(e.ctx, connect.NewRequest(&stowagev1.ListJobsRequest{Limit: 2}))
	if err != nil {
		t.Fatal(err)
	}
	if js := page.Msg.GetJobs(); len(js) != 2 || js[0].GetId() != ids[2] || js[1].GetId() != ids[1] {
		t.Errorf("limit 2: %v, want %s then %s", js, ids[2], ids[1])
	}
	all, err := e.jobs.ListJobs(e.ctx, connect.NewRequest(&stowagev1.ListJobsRequest{State: stowagev1.JobState_JOB_STATE_PENDING}))
	if err != nil || len(all.Msg.GetJobs()) != 3 {
		t.Errorf("pending jobs: %v %v, want 3", all, err)
	}
	none, err := e.jobs.ListJobs(e.ctx, connect.NewRequest(&stowagev1.ListJobsRequest{State: stowagev1.JobState_JOB_STATE_SUCCEEDED}))
	if err != nil || len(none.Msg.GetJobs()) != 0 {
		t.Errorf("succeeded jobs: %v %v, want none", none, err)
	}
}

// A request bigger than the limit is refused as resource_exhausted before
// any handler; /healthz says whether metadata is readable; /metrics
// counts calls by code.
func TestLimitsHealthAndMetrics(t *testing.T) {
	e := newEdge(t, false, rpclimit.Limits{MaxRequestBytes: 4 << 10})
	_, err := e.images.RegisterTemplate(e.ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: strings.Repeat("x", 8<<10),
		Url: "https://example.com/x", Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW}))
	if connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Errorf("an 8 KiB request with a 4 KiB limit: %v, want resource_exhausted", err)
	}
	if ts, _ := e.db.Templates().List(e.ctx, meta.Filter[*stowagev1.Template]{}); len(ts) != 0 {
		t.Errorf("an oversize request recorded %d templates", len(ts))
	}

	get := func(path string) (int, string) {
		t.Helper()
		resp, err := e.srv.Client().Get(e.srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/healthz"); code != http.StatusOK || strings.TrimSpace(body) != "ok" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	e.healthy = errors.New("badger: closed")
	if code, body := get("/healthz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "badger: closed") {
		t.Errorf("/healthz unhealthy: %d %q", code, body)
	}

	_, _ = e.volumes.GetVolume(e.ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: "nope"}))
	_, _ = e.volumes.GetVolume(e.ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: "nope"}))
	if _, err := e.volumes.ListVolumes(e.ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{})); err != nil {
		t.Fatal(err)
	}
	_, metrics := get("/metrics")
	for _, want := range []string{
		`stowage_rpc_requests_total{code="not_found",procedure="/stowage.v1.VolumeService/GetVolume"} 2`,
		`stowage_rpc_requests_total{code="ok",procedure="/stowage.v1.VolumeService/ListVolumes"} 1`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// With a guard, a call needs a token whose role allows the procedure;
// refusals are unauthenticated or permission_denied, and a token's
// secret is shown only when it is made.
func TestAuthAtTheEdge(t *testing.T) {
	e := newEdge(t, true, rpclimit.Limits{})
	mk := func(name string, role stowagev1.TokenRole) string {
		t.Helper()
		r, err := e.tokens.Create(e.ctx, &stowagev1.CreateTokenRequest{Name: name, Role: role})
		if err != nil {
			t.Fatal(err)
		}
		return r.GetSecret()
	}
	admin, reader := mk("admin", stowagev1.TokenRole_TOKEN_ROLE_ADMIN), mk("reader", stowagev1.TokenRole_TOKEN_ROLE_READER)
	with := func(tok string, m any) {
		if tok == "" {
			return
		}
		m.(interface{ Header() http.Header }).Header().Set("Authorization", "Bearer "+tok)
	}
	list := func(tok string) error {
		req := connect.NewRequest(&stowagev1.ListVolumesRequest{})
		with(tok, req)
		_, err := e.volumes.ListVolumes(e.ctx, req)
		return err
	}
	take := func(tok string) error {
		req := connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: "v", DryRun: true})
		with(tok, req)
		_, err := e.snapshots.TakeSnapshot(e.ctx, req)
		return err
	}
	e.volume("v")
	for _, c := range []struct {
		name string
		err  error
		code connect.Code
	}{
		{"list without a token", list(""), connect.CodeUnauthenticated},
		{"list with a made-up token", list("stw_nope.nope"), connect.CodeUnauthenticated},
		{"take as a reader", take(reader), connect.CodePermissionDenied},
	} {
		if connect.CodeOf(c.err) != c.code {
			t.Errorf("%s: %v, want %s", c.name, c.err, c.code)
		}
	}
	if err := list(reader); err != nil {
		t.Errorf("list as a reader: %v", err)
	}
	if err := take(admin); err != nil {
		t.Errorf("take (dry run) as an admin: %v", err)
	}
	toks := stowagev1connect.NewTokenServiceClient(e.srv.Client(), e.srv.URL)
	req := connect.NewRequest(&stowagev1.ListTokensRequest{})
	with(admin, req)
	resp, err := toks.ListTokens(e.ctx, req)
	if err != nil || len(resp.Msg.GetTokens()) != 2 {
		t.Fatalf("list tokens: %v %v", resp, err)
	}
	for _, secret := range []string{admin, reader} {
		_, s, _ := strings.Cut(secret, ".")
		if s == "" || strings.Contains(resp.Msg.String(), s) {
			t.Errorf("ListTokens shows a secret (or the secret has no id.secret form: %q)", secret)
		}
	}
}

// A controller that enrols agents takes Register, Heartbeat and Renew only
// from the host's own certificate: over a connection without one they are
// unauthenticated, whatever host id the message names; join tokens can
// then be made.
func TestAgentCallsNeedTheirCertificate(t *testing.T) {
	e := newEdgeWith(t, false, rpclimit.Limits{}, true)
	_, err := e.agents.Register(e.ctx, connect.NewRequest(&stowagev1.RegisterRequest{HostId: "h1", AgentUrl: "https://127.0.0.1:2", SessionId: "evil"}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.Contains(err.Error(), "agents must call with the certificate") {
		t.Errorf("Register without a certificate: %v, want unauthenticated", err)
	}
	_, err = e.agents.Heartbeat(e.ctx, connect.NewRequest(&stowagev1.HeartbeatRequest{HostId: "h1", SessionId: "s1"}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Errorf("Heartbeat without a certificate: %v, want unauthenticated", err)
	}
	_, err = e.agents.Renew(e.ctx, connect.NewRequest(&stowagev1.RenewRequest{}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Errorf("Renew without a certificate: %v, want unauthenticated", err)
	}
	h, err := e.db.Hosts().Get(e.ctx, "h1")
	if err != nil || h.GetAgentUrl() != "https://127.0.0.1:1" || h.GetSessionId() != "s1" {
		t.Errorf("a refused Register changed the host: %v %v", h, err)
	}
	tok, err := e.hosts.CreateJoinToken(e.ctx, connect.NewRequest(&stowagev1.CreateJoinTokenRequest{HostId: "h2", TtlSeconds: 60}))
	if err != nil || !strings.HasPrefix(tok.Msg.GetToken(), "stj_") || tok.Msg.GetCaPin() == "" {
		t.Errorf("CreateJoinToken with enrolment on: %v %v", tok, err)
	}
}

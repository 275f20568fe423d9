package image

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/endpoint"
	"github.com/stowage/stowage/controller/hosts"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/filesystem"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// world is the image service as cmd/stowage assembles it (real metadata on
// Badger in a temporary directory, the host registry, the endpoint
// selector, the filesystem provider, the job runner), with agent h1 Up in
// zone z1. The runner's base context is cancelled, so a submitted job is
// recorded but never starts: a test sees exactly what the call wrote.
type world struct {
	t      *testing.T
	ctx    context.Context
	db     *meta.DB
	s      *Service
	stores *datastore.Service
	hosts  *hosts.Service
	runner *jobs.Runner
	reg    *drivers.Registry
}

func newWorld(t *testing.T, opts ...Option) *world { return newWorldWith(t, false, opts...) }

// newLiveWorld is newWorld whose jobs run, until the test ends.
func newLiveWorld(t *testing.T, opts ...Option) *world { return newWorldWith(t, true, opts...) }

func newWorldWith(t *testing.T, live bool, opts ...Option) *world {
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
	runner := jobs.New(db, log)
	base, cancel := context.WithCancel(context.Background())
	if !live {
		cancel()
	}
	runner.Start(base)
	t.Cleanup(func() { cancel(); runner.Wait(); db.Close() })
	w := &world{t: t, ctx: context.Background(), db: db, stores: stores, hosts: hs, runner: runner, reg: reg,
		s: New(db, stores, sel, motion.NewMover(reg, sel), runner, log, opts...)}
	w.host("h1", "z1", nil)
	return w
}

func (w *world) host(id, zone string, caps *stowagev1.HostCapabilities) {
	w.t.Helper()
	if _, err := w.hosts.Register(w.ctx, &stowagev1.RegisterRequest{HostId: id, AgentUrl: "https://127.0.0.1:1", SessionId: "s-" + id,
		Zone: zone, Cluster: "c1", Capabilities: caps}); err != nil {
		w.t.Fatal(err)
	}
}

// store records an Up store of role in zone, reached by h1.
func (w *world) store(name, provider string, role stowagev1.StoreRole, zone string, details map[string]string) *stowagev1.DataStore {
	w.t.Helper()
	if details == nil {
		details = map[string]string{"path": "/srv/stowage/" + name}
	}
	st, err := w.db.Stores().Create(w.ctx, &stowagev1.DataStore{Id: meta.NewID(), Name: name, Role: role, Provider: provider,
		Url: "file:///srv/stowage/" + name, Scope: &stowagev1.Scope{Zone: zone}, State: stowagev1.StoreState_STORE_STATE_INITIALIZED,
		Details: details, HostIds: []string{"h1"}, CapacityBytes: 100 << 30, AvailableBytes: 50 << 30})
	if err != nil {
		w.t.Fatal(err)
	}
	if st, err = w.db.Stores().Transition(w.ctx, st.GetId(), meta.StoreAttachSucceeded, nil); err != nil {
		w.t.Fatal(err)
	}
	return st
}

// template records a template with one copy per store, each moved through
// evs.
func (w *world) template(name string, evs []meta.ObjectEvent, stores ...*stowagev1.DataStore) (*stowagev1.Template, []*stowagev1.TemplateOnStore) {
	w.t.Helper()
	t, err := w.db.Templates().Create(w.ctx, &stowagev1.Template{Id: meta.NewID(), Name: name, Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2,
		Url: "https://example.com/" + name + ".qcow2", VirtualSize: 1 << 30})
	if err != nil {
		w.t.Fatal(err)
	}
	var refs []*stowagev1.TemplateOnStore
	for _, st := range stores {
		key, err := w.s.Locate(st, t)
		if err != nil {
			w.t.Fatal(err)
		}
		r, err := w.db.TemplatesOnStore().Create(w.ctx, &stowagev1.TemplateOnStore{Id: meta.NewID(), TemplateId: t.GetId(), StoreId: st.GetId(), InstallPath: key})
		if err != nil {
			w.t.Fatal(err)
		}
		for _, ev := range evs {
			if r, err = w.db.TemplatesOnStore().Transition(w.ctx, r.GetId(), ev, nil); err != nil {
				w.t.Fatal(err)
			}
		}
		refs = append(refs, r)
	}
	return t, refs
}

// volume records a Ready volume of template t on store st.
func (w *world) volume(name string, st *stowagev1.DataStore, t *stowagev1.Template, mutate func(*stowagev1.Volume)) *stowagev1.Volume {
	w.t.Helper()
	v := &stowagev1.Volume{Id: meta.NewID(), Name: name, Size: 1 << 30, StoreId: st.GetId(), TemplateId: t.GetId(), Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2}
	if mutate != nil {
		mutate(v)
	}
	v, err := w.db.Volumes().Create(w.ctx, v)
	if err != nil {
		w.t.Fatal(err)
	}
	for _, ev := range []meta.VolumeEvent{meta.VolumeCreateRequested, meta.VolumeOperationSucceeded} {
		if v, err = w.db.Volumes().Transition(w.ctx, v.GetId(), ev, nil); err != nil {
			w.t.Fatal(err)
		}
	}
	return v
}

var (
	readyCopy = []meta.ObjectEvent{meta.ObjectCreateRequested, meta.ObjectOperationSucceeded}
	copying   = []meta.ObjectEvent{meta.ObjectCreateRequested}
	imageRole = stowagev1.StoreRole_STORE_ROLE_IMAGE
	primary   = stowagev1.StoreRole_STORE_ROLE_PRIMARY
)

const sum = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

func wantClass(t *testing.T, what string, err, class error, says string) {
	t.Helper()
	if !errors.Is(err, class) || !strings.Contains(err.Error(), says) {
		t.Errorf("%s: %v; want %v saying %q", what, err, class, says)
	}
}

// Register refuses a bad request before it records anything, each with
// its class and a message that says what to do.
func TestRegisterValidation(t *testing.T) {
	w := newWorld(t)
	img := w.store("img", "filesystem", imageRole, "z1", nil)
	p := w.store("p1", "filesystem", primary, "z1", nil)
	w.template("taken", readyCopy, img)
	maint := w.store("img-maint", "filesystem", imageRole, "z1", nil)
	if _, err := w.db.Stores().Transition(w.ctx, maint.GetId(), meta.StoreMaintenanceRequested, nil); err != nil {
		t.Fatal(err)
	}
	w.store("img-far", "filesystem", imageRole, "z9", nil)

	good := func(mut func(r *stowagev1.RegisterTemplateRequest)) *stowagev1.RegisterTemplateRequest {
		r := &stowagev1.RegisterTemplateRequest{Name: "debian-12", Url: "https://example.com/debian.qcow2", Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Zone: "z1"}
		mut(r)
		return r
	}
	for _, c := range []struct {
		name  string
		req   *stowagev1.RegisterTemplateRequest
		class error
		says  string
	}{
		{"no name", good(func(r *stowagev1.RegisterTemplateRequest) { r.Name = "" }), errdefs.ErrInvalid, `template name ""`},
		{"name with a slash", good(func(r *stowagev1.RegisterTemplateRequest) { r.Name = "../etc" }), errdefs.ErrInvalid, "use 1-128 letters"},
		{"no format", good(func(r *stowagev1.RegisterTemplateRequest) { r.Format = stowagev1.ImageFormat_IMAGE_FORMAT_UNSPECIFIED }), errdefs.ErrInvalid, "format is required"},
		{"ftp", good(func(r *stowagev1.RegisterTemplateRequest) { r.Url = "ftp://example.com/x" }), errdefs.ErrInvalid, `scheme "ftp"`},
		{"file without an import dir", good(func(r *stowagev1.RegisterTemplateRequest) { r.Url = "file:///srv/import/x.qcow2" }), errdefs.ErrPermissionDenied, "none is configured"},
		{"bad checksum", good(func(r *stowagev1.RegisterTemplateRequest) { r.Checksum = "sha256:xyz" }), errdefs.ErrInvalid, "hex digits"},
		{"plain http, no checksum", good(func(r *stowagev1.RegisterTemplateRequest) { r.Url = "http://u:pw@example.com/x.qcow2" }), errdefs.ErrInvalid, "plain http"},
		{"name taken", good(func(r *stowagev1.RegisterTemplateRequest) { r.Name = "taken" }), errdefs.ErrAlreadyExists, `template name "taken" is already taken`},
		{"a primary store", good(func(r *stowagev1.RegisterTemplateRequest) { r.StoreIds = []string{p.GetId()} }), errdefs.ErrInvalid, "a Image store is needed"},
		{"a store in maintenance", good(func(r *stowagev1.RegisterTemplateRequest) { r.StoreIds = []string{"img-maint"} }), errdefs.ErrFailedPrecondition, "only an Up store takes new objects"},
		{"an unknown store", good(func(r *stowagev1.RegisterTemplateRequest) { r.StoreIds = []string{"nope"} }), errdefs.ErrNotFound, "nope"},
		{"no image store in the zone", good(func(r *stowagev1.RegisterTemplateRequest) { r.Zone = "z2" }), errdefs.ErrFailedPrecondition, "no image store is added in zone z2"},
		{"no agent reaches the store", good(func(r *stowagev1.RegisterTemplateRequest) { r.Zone = "z9" }), errdefs.ErrUnavailable, "no agent is registered in scope z9"},
	} {
		_, err := w.s.Register(w.ctx, c.req)
		wantClass(t, c.name, err, c.class, c.says)
		if err != nil && strings.Contains(err.Error(), "pw@") {
			t.Errorf("%s: the error quotes the URL's password: %v", c.name, err)
		}
	}
	if ts, _ := w.s.List(w.ctx, "", "", 0); len(ts) != 1 {
		t.Errorf("%d templates after the refusals, want the one taken", len(ts))
	}
	if js, _ := w.runner.List(w.ctx, jobs.ListFilter{}, 0); len(js) != 0 {
		t.Errorf("refusals made %d jobs", len(js))
	}
	// The same http URL with a checksum is accepted.
	if _, err := w.s.Register(w.ctx, good(func(r *stowagev1.RegisterTemplateRequest) {
		r.Url, r.Checksum, r.DryRun = "http://example.com/x.qcow2", sum, true
	})); err != nil {
		t.Errorf("plain http with a checksum: %v", err)
	}
}

// Register records the template and one Allocated copy per store, located
// by the store's driver, with the job; the plan quotes the URL without its
// secrets while the record keeps it for the download. A retry with the
// same idempotency key returns the first job.
func TestRegisterRecords(t *testing.T) {
	w := newWorld(t)
	a := w.store("img-a", "filesystem", imageRole, "z1", nil)
	b := w.store("img-b", "filesystem", imageRole, "z1", nil)
	const url = "https://user:S3cr3t@example.com/debian.qcow2?X-Amz-Signature=SIG"
	req := &stowagev1.RegisterTemplateRequest{Name: "debian-12", Url: url, Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2,
		StoreIds: []string{"img-a", b.GetId()}, Checksum: strings.ToUpper(strings.TrimPrefix(sum, "sha256:")), IdempotencyKey: "reg-1"}

	dry := &stowagev1.RegisterTemplateRequest{Name: req.Name, Url: url, Format: req.Format, StoreIds: req.StoreIds, DryRun: true}
	resp, err := w.s.Register(w.ctx, dry)
	if err != nil || resp.GetJob() != nil || len(resp.GetPlan().GetSteps()) != 2 {
		t.Fatalf("dry run: %v %v", resp, err)
	}
	if ts, _ := w.s.List(w.ctx, "", "", 0); len(ts) != 0 {
		t.Fatal("a dry run recorded a template")
	}

	resp, err = w.s.Register(w.ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	tm, refs, err := w.s.Get(w.ctx, "debian-12")
	if err != nil {
		t.Fatal(err)
	}
	if tm.GetUrl() != url || tm.GetChecksum() != sum || tm.GetIsIso() || tm.GetId() != resp.GetJob().GetTargetId() {
		t.Errorf("template %v: want the whole URL kept and the checksum normalised to %s", tm, sum)
	}
	if len(refs) != 2 {
		t.Fatalf("%d copies, want 2", len(refs))
	}
	for _, r := range refs {
		want, _ := w.s.Locate(a, tm)
		if r.GetStoreId() == b.GetId() {
			want, _ = w.s.Locate(b, tm)
		}
		if r.GetState() != stowagev1.ObjectState_OBJECT_STATE_ALLOCATED || r.GetInstallPath() != want || want == "" {
			t.Errorf("copy %v: want Allocated at %q", r, want)
		}
	}
	job := resp.GetJob()
	for _, st := range job.GetPlan().GetSteps() {
		if strings.Contains(st.GetReason(), "S3cr3t") || strings.Contains(st.GetReason(), "SIG") || !strings.Contains(st.GetReason(), "example.com/debian.qcow2") {
			t.Errorf("plan step quotes the URL's secrets or lost it: %q", st.GetReason())
		}
		if st.GetHostId() != "h1" {
			t.Errorf("plan step on %q, want h1", st.GetHostId())
		}
	}
	stored, err := w.runner.Get(w.ctx, job.GetId())
	if err != nil || strings.Contains(stored.GetPlan().String(), "S3cr3t") {
		t.Errorf("the job record keeps the URL's password: %v %v", stored.GetPlan(), err)
	}

	// The reply to the first request was lost: the retry returns its job.
	again, err := w.s.Register(w.ctx, req)
	if err != nil || again.GetJob().GetId() != job.GetId() || again.GetTemplate().GetId() != tm.GetId() {
		t.Fatalf("retry with the idempotency key: %v %v, want job %s", again, err, job.GetId())
	}
	// Without the key the name is taken.
	req.IdempotencyKey = ""
	_, err = w.s.Register(w.ctx, req)
	wantClass(t, "register again without the key", err, errdefs.ErrAlreadyExists, "already taken")
}

// A failed download marks every copy that did not finish Failed with the
// cause and leaves the Ready ones; only a Ready copy on an Up store of the
// role asked for serves.
func TestCopyStatesAndReadyOn(t *testing.T) {
	w := newWorld(t)
	a := w.store("img-a", "filesystem", imageRole, "z1", nil)
	b := w.store("img-b", "filesystem", imageRole, "z1", nil)
	p := w.store("p1", "filesystem", primary, "z1", nil)
	tm, refs := w.template("t1", nil, a, b, p) // all Allocated
	if _, err := w.db.TemplatesOnStore().Transition(w.ctx, refs[1].GetId(), meta.ObjectCreateRequested, nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.s.ReadyOn(w.ctx, tm.GetId(), imageRole); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("ReadyOn with no Ready copy: %v", err)
	}
	for _, ev := range readyCopy {
		if _, err := w.db.TemplatesOnStore().Transition(w.ctx, refs[2].GetId(), ev, nil); err != nil {
			t.Fatal(err)
		}
	}
	// The primary copy is Ready: it serves a primary, not an image, role.
	if r, _, err := w.s.ReadyOn(w.ctx, tm.GetId(), primary); err != nil || r.GetId() != refs[2].GetId() {
		t.Errorf("ReadyOn(primary): %v %v", r, err)
	}
	_, _, err := w.s.ReadyOn(w.ctx, tm.GetId(), imageRole)
	wantClass(t, "ReadyOn(image) with only the primary copy Ready", err, errdefs.ErrFailedPrecondition, "no Ready copy on an Up (or Disabled) Image store")

	cause := errors.New("checksum mismatch: want sha256:e3b0, got sha256:dead")
	if err := (registerHandler{w.s}).Fail(w.ctx, &stowagev1.Job{TargetId: tm.GetId()}, cause); err != nil {
		t.Fatal(err)
	}
	_, got, err := w.s.Get(w.ctx, tm.GetId())
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range got {
		want, msg := stowagev1.ObjectState_OBJECT_STATE_FAILED, "checksum mismatch"
		if r.GetId() == refs[2].GetId() {
			want, msg = stowagev1.ObjectState_OBJECT_STATE_READY, ""
		}
		if r.GetState() != want || (msg != "" && !strings.Contains(r.GetError(), msg)) || (msg == "" && r.GetError() != "") {
			t.Errorf("copy on %s after the failure: %s %q, want %s", r.GetStoreId(), meta.ObjectStateName(r.GetState()), r.GetError(), meta.ObjectStateName(want))
		}
	}

	// A Ready image copy on a store in maintenance does not serve.
	_, okRefs := w.template("t2", readyCopy, b)
	if _, err := w.db.Stores().Transition(w.ctx, b.GetId(), meta.StoreMaintenanceRequested, nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.s.ReadyOn(w.ctx, okRefs[0].GetTemplateId(), imageRole); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("ReadyOn with the store in maintenance: %v", err)
	}
}

// Delete refuses while volumes need the template: always for lazy volumes
// (the image store copy is their only backing), without --force for
// linked clones; copies volumes depend on are kept; a copy being made
// makes it wait.
func TestDeleteRefusals(t *testing.T) {
	w := newWorld(t)
	img := w.store("img", "filesystem", imageRole, "z1", nil)
	p := w.store("p1", "filesystem", primary, "z1", nil)
	tm, refs := w.template("t1", readyCopy, img, p)
	spool, err := w.db.TemplatesOnStore().Update(w.ctx, refs[1].GetId(), 0, func(r *stowagev1.TemplateOnStore) error { r.RefCount = 2; return nil })
	if err != nil {
		t.Fatal(err)
	}
	// A full copy does not depend on its template; an expunged clone no more.
	w.volume("full", p, tm, nil)
	gone := w.volume("gone", p, tm, func(v *stowagev1.Volume) { v.BaseRefId = spool.GetId() })
	for _, ev := range []meta.VolumeEvent{meta.VolumeDestroyRequested, meta.VolumeExpungeRequested, meta.VolumeOperationSucceeded} {
		if _, err := w.db.Volumes().Transition(w.ctx, gone.GetId(), ev, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := w.s.Delete(w.ctx, "t1", false, true); err != nil {
		t.Fatalf("delete with only a full copy and an expunged clone: %v", err)
	}

	w.volume("clone-b", p, tm, func(v *stowagev1.Volume) { v.BaseRefId = spool.GetId() })
	w.volume("clone-a", p, tm, func(v *stowagev1.Volume) { v.BaseRefId = spool.GetId() })
	_, err = w.s.Delete(w.ctx, "t1", false, false)
	wantClass(t, "delete with linked clones", err, errdefs.ErrFailedPrecondition, "backs volumes clone-b, clone-a (linked clones)")

	resp, err := w.s.Delete(w.ctx, tm.GetId(), true, true)
	if err != nil {
		t.Fatalf("forced dry run: %v", err)
	}
	pl := resp.GetPlan()
	if len(pl.GetSteps()) != 1 || pl.GetSteps()[0].GetName() != "delete-"+refs[0].GetId() || len(pl.GetReasons()) != 1 ||
		!strings.Contains(pl.GetReasons()[0], "copy on store "+p.GetId()+" kept: 2 volumes depend on it") {
		t.Errorf("forced plan: %v; want the image copy deleted and the cached one kept", pl)
	}

	lazy := w.volume("lazy-1", p, tm, func(v *stowagev1.Volume) { v.InstallMethod = LazyMethod })
	for _, force := range []bool{false, true} {
		_, err = w.s.Delete(w.ctx, tm.GetId(), force, false)
		wantClass(t, "delete with a lazy volume", err, errdefs.ErrFailedPrecondition, "backs lazy volumes lazy-1")
	}
	if _, err := w.db.Volumes().Transition(w.ctx, lazy.GetId(), meta.VolumeDestroyRequested, nil); err != nil {
		t.Fatal(err)
	}
	// Destroyed but not expunged: its file still reads the template.
	_, err = w.s.Delete(w.ctx, tm.GetId(), true, false)
	wantClass(t, "delete with a destroyed, not expunged, lazy volume", err, errdefs.ErrFailedPrecondition, "lazy-1")

	t2, r2 := w.template("t2", copying, img)
	_, err = w.s.Delete(w.ctx, t2.GetName(), false, false)
	wantClass(t, "delete while a copy is made", err, errdefs.ErrAborted, "is being copied to store "+r2[0].GetStoreId())

	_, err = w.s.Delete(w.ctx, "nope", false, false)
	wantClass(t, "delete an unknown template", err, errdefs.ErrNotFound, "see `stowage template list`")
	_, err = w.s.Delete(w.ctx, "", false, false)
	wantClass(t, "delete without a name", err, errdefs.ErrInvalid, "is required")

	// Nothing needs t3: the delete is recorded as a job with its plan.
	t3, r3 := w.template("t3", readyCopy, img)
	real, err := w.s.Delete(w.ctx, "t3", false, false)
	if err != nil || real.GetJob().GetKind() != KindDelete || real.GetJob().GetTargetId() != t3.GetId() || len(real.GetPlan().GetSteps()) != 1 ||
		real.GetPlan().GetSteps()[0].GetName() != "delete-"+r3[0].GetId() {
		t.Fatalf("delete t3: %v %v", real, err)
	}
}

// A template is made from a Ready volume or a snapshot's Ready primary
// copy, as raw or qcow2; a retry with the idempotency key returns the
// first job although the name is taken by then.
func TestCreateFromVolume(t *testing.T) {
	w := newWorld(t)
	img := w.store("img", "filesystem", imageRole, "z1", nil)
	p := w.store("p1", "filesystem", primary, "z1", nil)
	base, _ := w.template("base", readyCopy, img)
	v := w.volume("web", p, base, func(v *stowagev1.Volume) { v.InstallPath = "volumes/web.qcow2" })
	busy := w.volume("busy", p, base, nil)
	if _, err := w.db.Volumes().Transition(w.ctx, busy.GetId(), meta.VolumeResizeRequested, nil); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name  string
		req   *stowagev1.CreateTemplateRequest
		class error
		says  string
	}{
		{"no source", &stowagev1.CreateTemplateRequest{Name: "n1"}, errdefs.ErrInvalid, "from a volume or a snapshot"},
		{"an ISO", &stowagev1.CreateTemplateRequest{Name: "n1", Source: &stowagev1.CreateTemplateRequest_VolumeId{VolumeId: "web"}, Format: stowagev1.ImageFormat_IMAGE_FORMAT_ISO}, errdefs.ErrInvalid, "raw or qcow2"},
		{"a busy volume", &stowagev1.CreateTemplateRequest{Name: "n1", Source: &stowagev1.CreateTemplateRequest_VolumeId{VolumeId: "busy"}}, errdefs.ErrFailedPrecondition, "volume busy is Resizing"},
		{"an unknown volume", &stowagev1.CreateTemplateRequest{Name: "n1", Source: &stowagev1.CreateTemplateRequest_VolumeId{VolumeId: "nope"}}, errdefs.ErrNotFound, `volume "nope"`},
		{"a snapshot without a primary copy", &stowagev1.CreateTemplateRequest{Name: "n1", Source: &stowagev1.CreateTemplateRequest_SnapshotId{SnapshotId: "s-nope"}}, errdefs.ErrFailedPrecondition, "no Ready copy on primary"},
		{"a taken name", &stowagev1.CreateTemplateRequest{Name: "base", Source: &stowagev1.CreateTemplateRequest_VolumeId{VolumeId: "web"}}, errdefs.ErrAlreadyExists, "already taken"},
		{"a primary store as target", &stowagev1.CreateTemplateRequest{Name: "n1", Source: &stowagev1.CreateTemplateRequest_VolumeId{VolumeId: "web"}, StoreId: "p1"}, errdefs.ErrInvalid, "a Image store is needed"},
	} {
		_, err := w.s.Create(w.ctx, c.req)
		wantClass(t, c.name, err, c.class, c.says)
	}

	req := &stowagev1.CreateTemplateRequest{Name: "golden", Source: &stowagev1.CreateTemplateRequest_VolumeId{VolumeId: "web"}, IdempotencyKey: "golden-1"}
	resp, err := w.s.Create(w.ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	p2 := resp.GetJob().GetJobParams().GetTemplateCreate()
	if resp.GetTemplate().GetFormat() != stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2 || resp.GetTemplate().GetSourceVolumeId() != v.GetId() ||
		p2.GetSourceKey() != "volumes/web.qcow2" || p2.GetSourceStoreId() != p.GetId() || resp.GetPlan().GetSteps()[0].GetHostId() != "h1" {
		t.Errorf("create: template %v, params %v", resp.GetTemplate(), p2)
	}
	// The copy's bytes are reserved on the image store until the job
	// ends (datastore's ledger), once: a retry does not reserve again.
	size := resp.GetTemplate().GetVirtualSize()
	if got := w.stores.Reserved(img.GetId()); size <= 0 || got != size {
		t.Errorf("reserved on img after the create: %d, want the template's virtual size %d", got, size)
	}
	again, err := w.s.Create(w.ctx, req)
	if err != nil || again.GetJob().GetId() != resp.GetJob().GetId() || again.GetTemplate().GetId() != resp.GetTemplate().GetId() {
		t.Errorf("retry with the idempotency key: %v %v, want job %s", again, err, resp.GetJob().GetId())
	}
	if got := w.stores.Reserved(img.GetId()); got != size {
		t.Errorf("reserved on img after the retry: %d, want %d (once)", got, size)
	}
}

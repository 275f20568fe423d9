package image

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/datapath/netguard"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/s3"
	"github.com/stowage/stowage/drivers/s3/s3test"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// s3Image adds an s3 image store in zone z1 on a real S3 server
// (versitygw, drivers/s3/s3test) through the store service, and imports
// raw into it as template t's copy through the s3 driver; it returns the
// store and the copy's record, Ready. The s3 driver runs in the
// controller: it reads the bucket and presigns GET URLs itself, so the
// mount planner does all its work in-process.
func (w *world) s3Image(srv *s3test.Server, t *stowagev1.Template, raw []byte) (*stowagev1.DataStore, *stowagev1.TemplateOnStore) {
	w.t.Helper()
	st := w.addS3(srv)
	web := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) { rw.Write(raw) }))
	defer web.Close()
	key, err := w.s.Locate(st, t)
	if err != nil {
		w.t.Fatal(err)
	}
	d, err := w.stores.Driver(st)
	if err != nil {
		w.t.Fatal(err)
	}
	obj := drivers.DataObject{ID: t.GetId(), Type: drivers.ObjectTemplate, Store: storeInfo(st), Format: drivers.FormatRaw, Key: key}
	if _, err := d.(drivers.Importer).Import(w.ctx, obj, drivers.ImportSource{URL: web.URL, Internal: true}, nil); err != nil {
		w.t.Fatal(err)
	}
	r, err := w.db.TemplatesOnStore().Create(w.ctx, &stowagev1.TemplateOnStore{Id: meta.NewID(), TemplateId: t.GetId(), StoreId: st.GetId(), InstallPath: key})
	if err != nil {
		w.t.Fatal(err)
	}
	for _, ev := range readyCopy {
		if r, err = w.db.TemplatesOnStore().Transition(w.ctx, r.GetId(), ev, nil); err != nil {
			w.t.Fatal(err)
		}
	}
	return st, r
}

// addS3 registers the s3 provider (its imports may fetch from loopback,
// where the tests' web servers are) and adds store s3img in zone z1 on srv
// through the store service.
func (w *world) addS3(srv *s3test.Server) *stowagev1.DataStore {
	w.t.Helper()
	guard, err := netguard.Parse("127.0.0.0/8")
	if err != nil {
		w.t.Fatal(err)
	}
	w.reg.Register(s3.New(w.s.sel, s3.WithFetchClient(guard.Client(nil))))
	cred := filepath.Join(w.t.TempDir(), "s3.cred")
	if err := os.WriteFile(cred, fmt.Appendf(nil, "access_key=%s\nsecret_key=%s\n", srv.AccessKey, srv.SecretKey), 0o600); err != nil {
		w.t.Fatal(err)
	}
	st, err := w.stores.Add(w.ctx, &stowagev1.AddStoreRequest{Name: "s3img", Role: imageRole, Provider: s3.Name, Url: "s3://" + srv.Bucket + "/stowage",
		Scope:   &stowagev1.Scope{Zone: "z1"},
		Details: map[string]string{s3.DetailEndpoint: srv.Endpoint, s3.DetailRegion: srv.Region, s3.DetailCredentialsFile: cred}})
	if err != nil {
		w.t.Fatal(err)
	}
	return st
}

func storeInfo(st *stowagev1.DataStore) drivers.StoreInfo {
	return drivers.StoreInfo{ID: st.GetId(), Name: st.GetName(), Provider: st.GetProvider(), URL: st.GetUrl(), Details: st.GetDetails(),
		Scope: drivers.Scope{Zone: st.GetScope().GetZone()}, Role: drivers.RoleImage}
}

// The mount planner shows each mounting host of a zone every Ready
// template of an Up image store of that zone, at the URL its store's
// driver grants and the length as stored, pinned while a lazy volume of
// the zone reads it; hosts without a mount get nothing, and a store that
// goes into maintenance takes its templates out of every mount.
func TestMountsReconcile(t *testing.T) {
	srv := s3test.Start(t)
	w := newWorld(t)
	mount := &stowagev1.HostCapabilities{TemplateCache: &stowagev1.CacheStatus{Mount: "/run/stowage/templates"}}
	w.host("m1", "z1", mount)
	w.host("m2", "z2", mount)

	if _, err := NewMounts(w.db, w.stores, w.hosts, "ftp", time.Hour, slog.New(slog.DiscardHandler)); err == nil {
		t.Fatal("NewMounts accepted transport ftp")
	}
	m, err := NewMounts(w.db, w.stores, w.hosts, MountTransportHTTP, time.Hour, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Reconcile(w.ctx); err != nil {
		t.Fatal(err)
	}
	if got := m.Spec("m1"); got == nil || len(got.GetTemplates()) != 0 {
		t.Fatalf("m1 with no template: %v, want an empty set", got)
	}

	raw := bytes.Repeat([]byte("stowage!"), 3<<10)
	tm, err := w.db.Templates().Create(w.ctx, &stowagev1.Template{Id: meta.NewID(), Name: "alpine", Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW, VirtualSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	st, _ := w.s3Image(srv, tm, raw)
	// A template whose copy is still being made is not shown.
	pending, err := w.db.Templates().Create(w.ctx, &stowagev1.Template{Id: meta.NewID(), Name: "pending", Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.db.TemplatesOnStore().Create(w.ctx, &stowagev1.TemplateOnStore{Id: meta.NewID(), TemplateId: pending.GetId(), StoreId: st.GetId(), InstallPath: "x"}); err != nil {
		t.Fatal(err)
	}

	if err := m.Reconcile(w.ctx); err != nil {
		t.Fatal(err)
	}
	if got := m.Spec("h1"); got != nil {
		t.Errorf("h1 reports no mount, got a set: %v", got)
	}
	if got := m.Spec("m2"); got == nil || len(got.GetTemplates()) != 0 {
		t.Errorf("m2 is in another zone: %v, want an empty set", got)
	}
	spec := m.Spec("m1").GetTemplates()
	if len(spec) != 1 {
		t.Fatalf("m1 shows %d templates, want alpine only: %v", len(spec), spec)
	}
	c := spec[0]
	if c.GetId() != tm.GetId() || c.GetSize() != int64(len(raw)) || c.GetFormat() != stowagev1.ImageFormat_IMAGE_FORMAT_RAW || c.GetPinned() ||
		c.GetIdentity() != fmt.Sprintf("template:%s/%d", tm.GetId(), len(raw)) {
		t.Errorf("m1's entry: %v; want alpine, %d bytes as stored, not pinned", c, len(raw))
	}
	// The URL is the driver's presigned GET: it reads the bytes, without keys.
	resp, err := http.Get(c.GetUrl())
	if err != nil {
		t.Fatal(err)
	}
	var body bytes.Buffer
	_, _ = body.ReadFrom(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body.Bytes(), raw) || strings.Contains(c.GetUrl(), srv.SecretKey) {
		t.Errorf("GET %s: %d, %d bytes", c.GetUrl(), resp.StatusCode, body.Len())
	}

	// A grant is reused while fresh: the next pass hands out the same URL.
	time.Sleep(1100 * time.Millisecond) // a new presign would carry a new X-Amz-Date
	sum := sha256.Sum256(raw)
	if _, err := w.db.Templates().Update(w.ctx, tm.GetId(), 0, func(t *stowagev1.Template) error { t.Sha256 = hex.EncodeToString(sum[:]); return nil }); err != nil {
		t.Fatal(err)
	}
	// A lazy volume of the zone pins the template in the zone's mounts.
	p := w.store("p1", "filesystem", primary, "z1", nil)
	w.volume("lazy", p, tm, func(v *stowagev1.Volume) { v.InstallMethod = LazyMethod })
	if err := m.Reconcile(w.ctx); err != nil {
		t.Fatal(err)
	}
	c2 := m.Spec("m1").GetTemplates()[0]
	if c2.GetUrl() != c.GetUrl() {
		t.Errorf("the grant was not reused: %s then %s", c.GetUrl(), c2.GetUrl())
	}
	if !c2.GetPinned() || c2.GetIdentity() != "sha256:"+hex.EncodeToString(sum[:]) {
		t.Errorf("with a lazy volume and a known sha256: %v, want pinned with the content identity", c2)
	}

	// A Disabled image store still serves what it holds: shown as before.
	if _, err := w.stores.Disable(w.ctx, st.GetId()); err != nil {
		t.Fatal(err)
	}
	if err := m.Reconcile(w.ctx); err != nil {
		t.Fatal(err)
	}
	if got := m.Spec("m1").GetTemplates(); len(got) != 1 || !got[0].GetPinned() {
		t.Errorf("m1 with the image store Disabled: %v, want alpine pinned", got)
	}
	if _, err := w.stores.Enable(w.ctx, st.GetId()); err != nil {
		t.Fatal(err)
	}
	// A host in maintenance keeps its set: the template its lazy volume
	// reads stays pinned there.
	if _, err := w.hosts.EnableMaintenance(w.ctx, "m1"); err != nil { // PrepareForMaintenance
		t.Fatal(err)
	}
	for _, drained := range []bool{false, true} {
		if drained {
			if _, err := w.db.Hosts().Transition(w.ctx, "m1", meta.HostMaintenanceSucceeded, nil); err != nil {
				t.Fatal(err)
			}
		}
		if err := m.Reconcile(w.ctx); err != nil {
			t.Fatal(err)
		}
		if got := m.Spec("m1").GetTemplates(); len(got) != 1 || !got[0].GetPinned() {
			t.Errorf("m1 in maintenance (drained %v): %v, want alpine pinned", drained, got)
		}
	}
	if _, err := w.hosts.CancelMaintenance(w.ctx, "m1"); err != nil {
		t.Fatal(err)
	}
	w.host("m1", "z1", mount) // back Up

	// The store in maintenance: its templates leave every mount.
	if _, err := w.db.Stores().Transition(w.ctx, st.GetId(), meta.StoreMaintenanceRequested, nil); err != nil {
		t.Fatal(err)
	}
	if err := m.Reconcile(w.ctx); err != nil {
		t.Fatal(err)
	}
	if got := m.Spec("m1"); got == nil || len(got.GetTemplates()) != 0 {
		t.Errorf("m1 with the store in maintenance: %v, want an empty set", got)
	}
	// No mounting host Up: no sets at all.
	for _, id := range []string{"m1", "m2"} {
		if _, err := w.db.Hosts().Transition(w.ctx, id, meta.HostHeartbeatMissed, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Reconcile(w.ctx); err != nil {
		t.Fatal(err)
	}
	if got := m.Spec("m1"); got != nil {
		t.Errorf("m1 Disconnected: %v, want no set", got)
	}
}

// waitJob polls job id until it ends (20 s at most).
func (w *world) waitJob(id string) *stowagev1.Job {
	w.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		j, err := w.runner.Get(w.ctx, id)
		if err != nil {
			w.t.Fatal(err)
		}
		switch j.GetState() {
		case stowagev1.JobState_JOB_STATE_SUCCEEDED, stowagev1.JobState_JOB_STATE_FAILED, stowagev1.JobState_JOB_STATE_CANCELLED:
			return j
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("job %s still %s", id, meta.JobStateName(j.GetState()))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A register job runs end to end on an s3 image store (its import runs in
// the controller): the copy goes Allocated -> Creating -> Ready with its
// sizes, the template learns its size and sha256. A download whose bytes
// do not match the checksum fails the job, marks the copy Failed with the
// reason, and leaves no object in the bucket.
func TestRegisterJobOnS3(t *testing.T) {
	srv := s3test.Start(t)
	w := newLiveWorld(t)
	st := w.addS3(srv)
	raw := bytes.Repeat([]byte{0xab, 0, 0, 0x17}, 64<<10)
	web := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) { rw.Write(raw) }))
	defer web.Close()
	sum := sha256.Sum256(raw)
	good := hex.EncodeToString(sum[:])

	resp, err := w.s.Register(w.ctx, &stowagev1.RegisterTemplateRequest{Name: "blob", Url: web.URL + "/blob.raw", Checksum: "sha256:" + good,
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW, StoreIds: []string{"s3img"}})
	if err != nil {
		t.Fatal(err)
	}
	if j := w.waitJob(resp.GetJob().GetId()); j.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED || !strings.Contains(j.GetResult(), "template blob on store s3img") {
		t.Fatalf("register job: %s %q %q", meta.JobStateName(j.GetState()), j.GetError(), j.GetResult())
	}
	tm, refs, err := w.s.Get(w.ctx, "blob")
	if err != nil {
		t.Fatal(err)
	}
	if len(refs) != 1 || refs[0].GetState() != stowagev1.ObjectState_OBJECT_STATE_READY || refs[0].GetSize() != int64(len(raw)) ||
		refs[0].GetBytesDone() != int64(len(raw)) || refs[0].GetLastUsed() == nil {
		t.Errorf("copy after the download: %v", refs)
	}
	if tm.GetVirtualSize() != int64(len(raw)) || tm.GetSha256() != good {
		t.Errorf("template after the download: size %d sha256 %q; want %d %s", tm.GetVirtualSize(), tm.GetSha256(), len(raw), good)
	}
	if r, _, err := w.s.ReadyOn(w.ctx, tm.GetId(), imageRole); err != nil || r.GetId() != refs[0].GetId() {
		t.Errorf("ReadyOn after the download: %v %v", r, err)
	}

	bad := strings.Repeat("0", 64)
	resp, err = w.s.Register(w.ctx, &stowagev1.RegisterTemplateRequest{Name: "corrupt", Url: web.URL + "/corrupt.raw", Checksum: "sha256:" + bad,
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW, StoreIds: []string{st.GetId()}})
	if err != nil {
		t.Fatal(err)
	}
	j := w.waitJob(resp.GetJob().GetId())
	if j.GetState() != stowagev1.JobState_JOB_STATE_FAILED || !strings.Contains(j.GetError(), "checksum") {
		t.Errorf("register with a wrong checksum: %s %q", meta.JobStateName(j.GetState()), j.GetError())
	}
	ctm, crefs, err := w.s.Get(w.ctx, "corrupt")
	if err != nil {
		t.Fatal(err)
	}
	if len(crefs) != 1 || crefs[0].GetState() != stowagev1.ObjectState_OBJECT_STATE_FAILED || !strings.Contains(crefs[0].GetError(), "checksum") {
		t.Fatalf("copy after a bad download: %v", crefs)
	}
	d, err := w.stores.Driver(st)
	if err != nil {
		t.Fatal(err)
	}
	obj := drivers.DataObject{ID: ctm.GetId(), Type: drivers.ObjectTemplate, Store: storeInfo(st), Format: drivers.FormatRaw, Key: crefs[0].GetInstallPath()}
	if _, err := d.Stat(w.ctx, obj); !errdefs.IsNotFound(err) {
		t.Errorf("the bad download left an object (or Stat failed otherwise): %v", err)
	}
	if _, _, err := w.s.ReadyOn(w.ctx, ctm.GetId(), imageRole); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("ReadyOn of the failed template: %v", err)
	}
}

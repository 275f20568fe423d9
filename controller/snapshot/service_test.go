package snapshot

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/endpoint"
	"github.com/stowage/stowage/controller/hosts"
	"github.com/stowage/stowage/controller/image"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/controller/volume"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/filesystem"
	"github.com/stowage/stowage/drivers/s3"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// world is the controller's snapshot service as cmd/stowage assembles it
// (real metadata on Badger in a temporary directory, the host registry,
// the endpoint selector, the filesystem provider, the volume and image
// services, the job runner) with one agent registered in zone z1. Its
// runner's base context is cancelled, so a submitted job is recorded but
// never starts: a test sees exactly what the API call wrote.
type world struct {
	t      *testing.T
	ctx    context.Context
	db     *meta.DB
	s      *Service
	runner *jobs.Runner
	hosts  *hosts.Service
	stores *datastore.Service
}

func newWorld(t *testing.T) *world { return newWorldWith(t, false) }

func newWorldWith(t *testing.T, live bool) *world {
	t.Helper()
	log := slog.New(slog.DiscardHandler)
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	hs := hosts.New(db, nil, hosts.Config{}, log)
	sel := endpoint.New(hs, nil)
	reg := drivers.NewRegistry()
	reg.Register(filesystem.New(sel))
	reg.Register(s3.New(sel))
	stores := datastore.New(db, reg, log)
	runner := jobs.New(db, log)
	base, cancel := context.WithCancel(context.Background())
	if !live {
		cancel()
	}
	runner.Start(base)
	t.Cleanup(func() { cancel(); runner.Wait(); db.Close() })
	mover := motion.NewMover(reg, sel)
	images := image.New(db, stores, sel, mover, runner, log)
	vols := volume.New(db, stores, images, sel, mover, runner, reg, log)
	w := &world{t: t, ctx: context.Background(), db: db, runner: runner, hosts: hs, stores: stores,
		s: New(db, stores, vols, sel, runner, log)}
	w.host("h1", "z1")
	return w
}

// host registers an Up agent.
func (w *world) host(id, zone string) {
	w.t.Helper()
	if _, err := w.hosts.Register(w.ctx, &stowagev1.RegisterRequest{HostId: id, AgentUrl: "https://127.0.0.1:1", SessionId: "s-" + id, Zone: zone, Cluster: "c1"}); err != nil {
		w.t.Fatal(err)
	}
}

// store records an Up filesystem store of role in zone, reached by h1.
func (w *world) store(name string, role stowagev1.StoreRole, zone string, details map[string]string) *stowagev1.DataStore {
	w.t.Helper()
	if details == nil {
		details = map[string]string{}
	}
	details["path"] = "/srv/stowage/" + name
	st, err := w.db.Stores().Create(w.ctx, &stowagev1.DataStore{Id: meta.NewID(), Name: name, Role: role, Provider: "filesystem",
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

// volume records a Ready volume on store st.
func (w *world) volume(name string, st *stowagev1.DataStore, format stowagev1.ImageFormat) *stowagev1.Volume {
	w.t.Helper()
	v, err := w.db.Volumes().Create(w.ctx, &stowagev1.Volume{Id: meta.NewID(), Name: name, Size: 1 << 30, StoreId: st.GetId(), Format: format,
		InstallPath: "volumes/" + name})
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

// snap records a snapshot of v through events (its state machine's path),
// with a copy on store st in copyState and parent ref parentRef.
func (w *world) snap(v *stowagev1.Volume, st *stowagev1.DataStore, role stowagev1.StoreRole, parentRef string, evs []meta.SnapshotEvent, copyEvs []meta.ObjectEvent) (*stowagev1.Snapshot, *stowagev1.SnapshotOnStore) {
	w.t.Helper()
	sn, err := w.db.Snapshots().Create(w.ctx, &stowagev1.Snapshot{Id: meta.NewID(), VolumeId: v.GetId(), Name: v.GetName() + "-snap", Method: "qcow2-external", Size: v.GetSize()})
	if err != nil {
		w.t.Fatal(err)
	}
	for _, ev := range evs {
		if sn, err = w.db.Snapshots().Transition(w.ctx, sn.GetId(), ev, nil); err != nil {
			w.t.Fatal(err)
		}
	}
	return sn, w.copyOf(sn, st, role, parentRef, copyEvs)
}

func (w *world) copyOf(sn *stowagev1.Snapshot, st *stowagev1.DataStore, role stowagev1.StoreRole, parentRef string, evs []meta.ObjectEvent) *stowagev1.SnapshotOnStore {
	w.t.Helper()
	r, err := w.db.SnapshotsOnStore().Create(w.ctx, &stowagev1.SnapshotOnStore{Id: meta.NewID(), SnapshotId: sn.GetId(), StoreId: st.GetId(),
		Role: role, ParentRefId: parentRef, InstallPath: "snapshots/" + sn.GetId()})
	if err != nil {
		w.t.Fatal(err)
	}
	for _, ev := range evs {
		if r, err = w.db.SnapshotsOnStore().Transition(w.ctx, r.GetId(), ev, nil); err != nil {
			w.t.Fatal(err)
		}
	}
	return r
}

func (w *world) snapState(id string) stowagev1.SnapshotState {
	w.t.Helper()
	sn, err := w.db.Snapshots().Get(w.ctx, id)
	if err != nil {
		w.t.Fatal(err)
	}
	return sn.GetState()
}

func (w *world) vol(id string) *stowagev1.Volume {
	w.t.Helper()
	v, err := w.db.Volumes().Get(w.ctx, id)
	if err != nil {
		w.t.Fatal(err)
	}
	return v
}

var (
	onPrimary = []meta.SnapshotEvent{meta.SnapshotCreateRequested, meta.SnapshotOperationSucceeded}
	backedUp  = []meta.SnapshotEvent{meta.SnapshotCreateRequested, meta.SnapshotOperationSucceeded, meta.SnapshotBackupRequested, meta.SnapshotOperationSucceeded}
	creating  = []meta.SnapshotEvent{meta.SnapshotCreateRequested}
	ready     = []meta.ObjectEvent{meta.ObjectCreateRequested, meta.ObjectOperationSucceeded}
	copying   = []meta.ObjectEvent{meta.ObjectCreateRequested}
	primary   = stowagev1.StoreRole_STORE_ROLE_PRIMARY
	imageRole = stowagev1.StoreRole_STORE_ROLE_IMAGE
)

func wantClass(t *testing.T, what string, err, class error, says string) {
	t.Helper()
	if !errors.Is(err, class) || !strings.Contains(err.Error(), says) {
		t.Errorf("%s: %v; want %v saying %q", what, err, class, says)
	}
}

// Take picks the method from the volume's format and the store, chains the
// new snapshot on the newest live one, and records volume, snapshot and
// copy with the job in one transaction.
func TestTakePlansMethodAndChain(t *testing.T) {
	w := newWorld(t)
	p := w.store("p1", primary, "z1", nil)
	rl := w.store("p2", primary, "z1", map[string]string{"reflink": "true"})
	qv := w.volume("q", p, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)

	for _, c := range []struct {
		v                *stowagev1.Volume
		method, priority string
	}{
		{qv, "qcow2-external", motion.Highest.String()},
		{w.volume("raw-reflink", rl, stowagev1.ImageFormat_IMAGE_FORMAT_RAW), "reflink", motion.Highest.String()},
		{w.volume("raw", p, stowagev1.ImageFormat_IMAGE_FORMAT_RAW), "copy", motion.Default.String()},
	} {
		resp, err := w.s.Take(w.ctx, &stowagev1.TakeSnapshotRequest{VolumeId: c.v.GetName(), DryRun: true})
		if err != nil {
			t.Fatalf("dry run of %s: %v", c.v.GetName(), err)
		}
		pl := resp.GetPlan()
		if pl.GetStrategy() != c.method || resp.GetSnapshot().GetMethod() != c.method || pl.GetPriority() != c.priority ||
			len(pl.GetSteps()) != 1 || pl.GetSteps()[0].GetHostId() != "h1" || resp.GetJob() != nil {
			t.Errorf("dry run of %s: %v, want %s at %s on h1 and no job", c.v.GetName(), pl, c.method, c.priority)
		}
		if resp.GetSnapshot().GetName() != c.v.GetName()+"-snap" {
			t.Errorf("default name: %q", resp.GetSnapshot().GetName())
		}
	}
	if ss, _ := w.db.Snapshots().List(w.ctx, meta.Filter[*stowagev1.Snapshot]{}); len(ss) != 0 {
		t.Fatalf("dry runs recorded %d snapshots", len(ss))
	}

	// The real one: the newest live sibling is the parent; a destroyed one is not.
	s1, r1 := w.snap(qv, p, primary, "", onPrimary, ready)
	dead, _ := w.snap(qv, p, primary, r1.GetId(), onPrimary, ready)
	if _, err := w.db.Snapshots().Transition(w.ctx, dead.GetId(), meta.SnapshotDestroyRequested, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := w.db.Snapshots().Transition(w.ctx, dead.GetId(), meta.SnapshotOperationSucceeded, nil); err != nil {
		t.Fatal(err)
	}
	qv, err := w.db.Volumes().Update(w.ctx, qv.GetId(), 0, func(v *stowagev1.Volume) error { v.HeadSnapshotRefId = r1.GetId(); return nil })
	if err != nil {
		t.Fatal(err)
	}
	resp, err := w.s.Take(w.ctx, &stowagev1.TakeSnapshotRequest{VolumeId: qv.GetId(), Name: "second", IdempotencyKey: "k1"})
	if err != nil {
		t.Fatal(err)
	}
	sn, refs, err := w.s.Get(w.ctx, resp.GetSnapshot().GetId())
	if err != nil {
		t.Fatal(err)
	}
	if sn.GetParentId() != s1.GetId() || sn.GetState() != stowagev1.SnapshotState_SNAPSHOT_STATE_ALLOCATED || sn.GetName() != "second" {
		t.Errorf("snapshot: %v, want Allocated with parent %s (not the destroyed %s)", sn, s1.GetId(), dead.GetId())
	}
	if len(refs) != 1 || refs[0].GetParentRefId() != r1.GetId() || refs[0].GetStoreId() != p.GetId() || refs[0].GetRole() != primary ||
		!strings.Contains(refs[0].GetInstallPath(), sn.GetId()) {
		t.Errorf("copies: %v, want one on %s reading through %s, located by the driver", refs, p.GetId(), r1.GetId())
	}
	v := w.vol(qv.GetId())
	if v.GetState() != stowagev1.VolumeState_VOLUME_STATE_SNAPSHOTTING || v.GetBusyJobId() != resp.GetJob().GetId() || resp.GetJob().GetTargetId() != sn.GetId() {
		t.Errorf("volume %s busy with %q, job %v", meta.VolumeStateName(v.GetState()), v.GetBusyJobId(), resp.GetJob())
	}

	// The same idempotency key returns the same snapshot and job, writing nothing.
	again, err := w.s.Take(w.ctx, &stowagev1.TakeSnapshotRequest{VolumeId: qv.GetId(), Name: "second", IdempotencyKey: "k1"})
	if err != nil || again.GetJob().GetId() != resp.GetJob().GetId() || again.GetSnapshot().GetId() != sn.GetId() {
		t.Errorf("retry with the key: %v %v", again, err)
	}
	// Without it, the busy volume refuses: Aborted, retryable.
	_, err = w.s.Take(w.ctx, &stowagev1.TakeSnapshotRequest{VolumeId: qv.GetId()})
	wantClass(t, "take while Snapshotting", err, errdefs.ErrAborted, "is busy (Snapshotting, job "+resp.GetJob().GetId())
	if ss, _ := w.db.Snapshots().ListBy(w.ctx, meta.IndexVolumeID, qv.GetId()); len(ss) != 3 {
		t.Errorf("%d snapshots of the volume after the refusals, want 3", len(ss))
	}

	_, err = w.s.Take(w.ctx, &stowagev1.TakeSnapshotRequest{VolumeId: "raw", Name: "bad/name"})
	wantClass(t, "bad name", err, errdefs.ErrInvalid, `snapshot name "bad/name"`)
	_, err = w.s.Take(w.ctx, &stowagev1.TakeSnapshotRequest{VolumeId: "nope"})
	wantClass(t, "unknown volume", err, errdefs.ErrNotFound, "nope")
}

// Take needs an Up agent that reaches the volume's store.
func TestTakeNeedsAHostInScope(t *testing.T) {
	w := newWorld(t)
	far := w.store("far", primary, "z9", nil)
	v := w.volume("v", far, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)
	_, err := w.s.Take(w.ctx, &stowagev1.TakeSnapshotRequest{VolumeId: v.GetId()})
	wantClass(t, "take with no agent in the zone", err, errdefs.ErrUnavailable, "no agent is registered in scope z9")
	if got := w.vol(v.GetId()); got.GetState() != stowagev1.VolumeState_VOLUME_STATE_READY || got.GetBusyJobId() != "" {
		t.Errorf("a refused take changed the volume: %v", got)
	}
}

// Revert needs a Ready copy on primary on the volume's store and a Ready
// volume.
func TestRevertRefusals(t *testing.T) {
	w := newWorld(t)
	p := w.store("p1", primary, "z1", nil)
	p2 := w.store("p2", primary, "z1", nil)
	v := w.volume("v", p, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)

	unfinished, _ := w.snap(v, p, primary, "", creating, copying)
	_, err := w.s.Revert(w.ctx, unfinished.GetId(), false)
	wantClass(t, "revert to a snapshot being taken", err, errdefs.ErrFailedPrecondition, "has no copy on primary to revert to")

	onlyBackup, _ := w.snap(v, w.store("img", imageRole, "z1", nil), imageRole, "", backedUp, ready)
	_, err = w.s.Revert(w.ctx, onlyBackup.GetId(), false)
	wantClass(t, "revert to a snapshot with only a backup", err, errdefs.ErrFailedPrecondition, "create a volume from its backup instead")

	moved, _ := w.snap(v, p2, primary, "", onPrimary, ready)
	_, err = w.s.Revert(w.ctx, moved.GetId(), false)
	wantClass(t, "revert after the volume moved", err, errdefs.ErrFailedPrecondition, "moved to another store")

	// A snapshot whose delete job runs: its primary copy is still Ready
	// until the job reaches it, but the volume must not start reading it.
	dying, _ := w.snap(v, p, primary, "", []meta.SnapshotEvent{meta.SnapshotCreateRequested, meta.SnapshotOperationSucceeded, meta.SnapshotDestroyRequested}, ready)
	_, err = w.s.Revert(w.ctx, dying.GetId(), false)
	wantClass(t, "revert to a snapshot being deleted", err, errdefs.ErrFailedPrecondition, "is Destroying: it is being deleted")
	if got := w.vol(v.GetId()); got.GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
		t.Errorf("a refused revert changed the volume: %s", meta.VolumeStateName(got.GetState()))
	}

	good, gr := w.snap(v, p, primary, "", onPrimary, ready)
	if _, err := w.db.Volumes().Transition(w.ctx, v.GetId(), meta.VolumeResizeRequested, func(v *stowagev1.Volume) error { v.BusyJobId = "resize-1"; return nil }); err != nil {
		t.Fatal(err)
	}
	_, err = w.s.Revert(w.ctx, good.GetId(), false)
	wantClass(t, "revert while Resizing", err, errdefs.ErrAborted, "is busy (Resizing, job resize-1)")
	if _, err := w.db.Volumes().Transition(w.ctx, v.GetId(), meta.VolumeOperationSucceeded, func(v *stowagev1.Volume) error { v.BusyJobId = ""; return nil }); err != nil {
		t.Fatal(err)
	}
	_, err = w.s.Revert(w.ctx, "", false)
	wantClass(t, "revert without an id", err, errdefs.ErrInvalid, "a snapshot id is required")
	_, err = w.s.Revert(w.ctx, "01NOPE", false)
	wantClass(t, "revert to an unknown snapshot", err, errdefs.ErrNotFound, "see `stowage snapshot list`")

	dry, err := w.s.Revert(w.ctx, good.GetId(), true)
	if err != nil || dry.GetJob() != nil || dry.GetPlan().GetStrategy() != "revert-qcow2-external" || w.vol(v.GetId()).GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
		t.Fatalf("dry run: %v %v", dry, err)
	}
	resp, err := w.s.Revert(w.ctx, good.GetId(), false)
	if err != nil {
		t.Fatal(err)
	}
	got := w.vol(v.GetId())
	if got.GetState() != stowagev1.VolumeState_VOLUME_STATE_REVERT_SNAPSHOTTING || got.GetBusyJobId() != resp.GetJob().GetId() ||
		resp.GetJob().GetJobParams().GetSnapshotRevert().GetRefId() != gr.GetId() {
		t.Errorf("after revert: volume %v, job %v; want RevertSnapshotting, busy with the job, which names copy %s", got, resp.GetJob(), gr.GetId())
	}
}

// Delete refuses a snapshot a job is working on (a running backup, a take)
// and plans chain-aware: a leaf is removed, a middle snapshot with one
// child merged, one that two files read through hidden.
func TestDeleteRefusalsAndPlans(t *testing.T) {
	w := newWorld(t)
	p := w.store("p1", primary, "z1", nil)
	v := w.volume("v", p, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)

	s1, r1 := w.snap(v, p, primary, "", onPrimary, ready)
	s2, r2 := w.snap(v, p, primary, r1.GetId(), onPrimary, ready)
	if _, err := w.db.Volumes().Update(w.ctx, v.GetId(), 0, func(v *stowagev1.Volume) error { v.HeadSnapshotRefId = r2.GetId(); return nil }); err != nil {
		t.Fatal(err)
	}

	// s1 is read through by s2 only: merged.
	pl, err := w.s.Delete(w.ctx, s1.GetId(), true)
	if err != nil || pl.GetPlan().GetStrategy() != "chain-merge-delete" || len(pl.GetPlan().GetSteps()) != 2 ||
		pl.GetPlan().GetSteps()[0].GetName() != "merge-"+r1.GetId() || !strings.Contains(pl.GetPlan().GetSteps()[0].GetReason(), "rebase snapshot "+s2.GetId()+" onto standalone") {
		t.Errorf("delete s1: %v %v, want a merge of s2 onto no backing, then the delete", pl.GetPlan(), err)
	}
	// s2 is read through by the volume only: the volume is rebased onto s1.
	pl, err = w.s.Delete(w.ctx, s2.GetId(), true)
	if err != nil || pl.GetPlan().GetStrategy() != "chain-merge-delete" || !strings.Contains(pl.GetPlan().GetSteps()[0].GetReason(), "rebase the volume onto snapshot "+s1.GetId()) {
		t.Errorf("delete s2: %v %v, want the volume rebased onto s1", pl.GetPlan(), err)
	}
	// A second child of s1 (after a revert): s1 is hidden, not merged.
	s3, _ := w.snap(v, p, primary, r1.GetId(), onPrimary, ready)
	pl, err = w.s.Delete(w.ctx, s1.GetId(), true)
	if err != nil || pl.GetPlan().GetStrategy() != "chain-aware-delete" || len(pl.GetPlan().GetReasons()) != 1 ||
		!strings.Contains(pl.GetPlan().GetReasons()[0], "cannot be merged (2 files read through it") {
		t.Errorf("delete s1 with two children: %v %v, want it hidden", pl.GetPlan(), err)
	}
	// s3 is a leaf: just removed.
	pl, err = w.s.Delete(w.ctx, s3.GetId(), true)
	if err != nil || pl.GetPlan().GetStrategy() != "chain-aware-delete" || len(pl.GetPlan().GetSteps()) != 1 || len(pl.GetPlan().GetReasons()) != 0 {
		t.Errorf("delete the leaf s3: %v %v", pl.GetPlan(), err)
	}

	// A snapshot whose backup is running, or that is being taken: Aborted.
	img := w.store("img", imageRole, "z1", nil)
	backing, _ := w.snap(v, p, primary, "", onPrimary, ready)
	if _, err := w.s.Backup(w.ctx, &stowagev1.BackupSnapshotRequest{Id: backing.GetId(), StoreId: img.GetId()}); err != nil {
		t.Fatal(err)
	}
	if st := w.snapState(backing.GetId()); st != stowagev1.SnapshotState_SNAPSHOT_STATE_BACKING_UP {
		t.Fatalf("after Backup: %s", meta.SnapshotStateName(st))
	}
	_, err = w.s.Delete(w.ctx, backing.GetId(), false)
	wantClass(t, "delete during a backup", err, errdefs.ErrAborted, "is BackingUp; wait for its job")
	taking, _ := w.snap(v, p, primary, "", creating, copying)
	_, err = w.s.Delete(w.ctx, taking.GetId(), false)
	wantClass(t, "delete while being taken", err, errdefs.ErrAborted, "is Creating; wait for its job")
	if w.snapState(backing.GetId()) != stowagev1.SnapshotState_SNAPSHOT_STATE_BACKING_UP || w.snapState(taking.GetId()) != stowagev1.SnapshotState_SNAPSHOT_STATE_CREATING {
		t.Error("a refused delete changed a snapshot")
	}
	if js, _ := w.runner.List(w.ctx, jobs.ListFilter{Target: backing.GetId()}, 0); len(js) != 1 {
		t.Errorf("%d jobs on the snapshot being backed up, want only the backup's", len(js))
	}

	// A real delete of the leaf records its job and leaves the records to it.
	resp, err := w.s.Delete(w.ctx, s3.GetId(), false)
	if err != nil || resp.GetJob().GetKind() != KindDelete || resp.GetJob().GetTargetId() != s3.GetId() {
		t.Fatalf("delete s3: %v %v", resp, err)
	}
}

// A backup is incremental on the newest earlier backup of the same volume,
// on the store that holds it; an explicit other store, or a parent whose
// store is not Up, makes it full. Snapshots not on primary, or busy, are
// refused.
func TestBackupParentChoice(t *testing.T) {
	w := newWorld(t)
	p := w.store("p1", primary, "z1", nil)
	img1 := w.store("img1", imageRole, "z1", nil)
	img2 := w.store("img2", imageRole, "z1", nil)
	v := w.volume("v", p, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)
	other := w.volume("other", p, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)

	// Another volume's backup is never a parent.
	os1, _ := w.snap(other, p, primary, "", backedUp, ready)
	w.copyOf(os1, img2, imageRole, "", ready)

	s1, _ := w.snap(v, p, primary, "", onPrimary, ready)
	full, err := w.s.Backup(w.ctx, &stowagev1.BackupSnapshotRequest{Id: s1.GetId(), DryRun: true})
	if err != nil || full.GetJob() != nil || !hasReason(full.GetPlan(), "full: no earlier backup") {
		t.Fatalf("first backup: %v %v, want full", full.GetPlan(), err)
	}

	// s1 and s2 backed up on img1; s3 is backed up on top of s2's.
	s1, _ = w.snap(v, p, primary, "", backedUp, ready)
	b1 := w.copyOf(s1, img1, imageRole, "", ready)
	s2, _ := w.snap(v, p, primary, "", backedUp, ready)
	b2 := w.copyOf(s2, img1, imageRole, b1.GetId(), ready)
	s3, _ := w.snap(v, p, primary, "", onPrimary, ready)
	// A later snapshot's backup is not an earlier one.
	s4, _ := w.snap(v, p, primary, "", backedUp, ready)
	w.copyOf(s4, img2, imageRole, "", ready)

	inc, err := w.s.Backup(w.ctx, &stowagev1.BackupSnapshotRequest{Id: s3.GetId(), DryRun: true})
	if err != nil || !hasReason(inc.GetPlan(), "incremental against the backup of snapshot "+s2.GetId()) ||
		!hasReason(inc.GetPlan(), "store img1: holds the parent backup") || !strings.Contains(inc.GetPlan().GetSteps()[0].GetReason(), "store img1") {
		t.Fatalf("backup of s3: %v %v, want incremental on s2's backup on img1", inc.GetPlan(), err)
	}
	// Asked for img2: full, its parent is elsewhere.
	other2, err := w.s.Backup(w.ctx, &stowagev1.BackupSnapshotRequest{Id: s3.GetId(), StoreId: "img2", DryRun: true})
	if err != nil || !hasReason(other2.GetPlan(), "the parent backup is on another store") || !hasReason(other2.GetPlan(), "full:") {
		t.Fatalf("backup of s3 to img2: %v %v, want full", other2.GetPlan(), err)
	}

	// The real one records the copy on img1 with s2's backup as parent.
	resp, err := w.s.Backup(w.ctx, &stowagev1.BackupSnapshotRequest{Id: s3.GetId(), IdempotencyKey: "backup-s3"})
	if err != nil {
		t.Fatal(err)
	}
	// A retry with the key (the reply was lost) returns the same job,
	// although the snapshot is BackingUp now.
	if again, err := w.s.Backup(w.ctx, &stowagev1.BackupSnapshotRequest{Id: s3.GetId(), IdempotencyKey: "backup-s3"}); err != nil || again.GetJob().GetId() != resp.GetJob().GetId() {
		t.Errorf("retry with the key: %v %v, want job %s", again, err, resp.GetJob().GetId())
	}
	params := resp.GetJob().GetJobParams().GetSnapshotBackup()
	ref, err := w.db.SnapshotsOnStore().Get(w.ctx, params.GetRefId())
	if err != nil {
		t.Fatal(err)
	}
	if ref.GetParentRefId() != b2.GetId() || ref.GetStoreId() != img1.GetId() || ref.GetRole() != imageRole ||
		params.GetKind() != stowagev1.SnapshotKind_SNAPSHOT_KIND_INCREMENTAL || ref.GetState() != stowagev1.ObjectState_OBJECT_STATE_ALLOCATED {
		t.Errorf("backup copy %v, params %v; want Allocated on img1 on parent %s, incremental", ref, params, b2.GetId())
	}
	if st := w.snapState(s3.GetId()); st != stowagev1.SnapshotState_SNAPSHOT_STATE_BACKING_UP {
		t.Errorf("s3 is %s, want BackingUp", meta.SnapshotStateName(st))
	}
	// A second backup while one runs: refused, nothing recorded.
	_, err = w.s.Backup(w.ctx, &stowagev1.BackupSnapshotRequest{Id: s3.GetId()})
	wantClass(t, "backup while BackingUp", err, errdefs.ErrFailedPrecondition, "it can be backed up when CreatedOnPrimary or BackedUp")

	// img1 in maintenance: its backups are not parents any more.
	if _, err := w.db.Stores().Transition(w.ctx, img1.GetId(), meta.StoreMaintenanceRequested, nil); err != nil {
		t.Fatal(err)
	}
	s5, _ := w.snap(v, p, primary, "", onPrimary, ready)
	full2, err := w.s.Backup(w.ctx, &stowagev1.BackupSnapshotRequest{Id: s5.GetId(), StoreId: "img2", DryRun: true})
	if err != nil || !hasReason(full2.GetPlan(), "incremental against the backup of snapshot "+s4.GetId()) {
		// s4's backup on img2 is earlier than s5 and on an Up store.
		t.Errorf("backup of s5 with img1 down: %v %v, want incremental on s4's backup on img2", full2.GetPlan(), err)
	}

	taking, _ := w.snap(v, p, primary, "", creating, copying)
	_, err = w.s.Backup(w.ctx, &stowagev1.BackupSnapshotRequest{Id: taking.GetId()})
	wantClass(t, "backup of a snapshot being taken", err, errdefs.ErrFailedPrecondition, "has no copy on primary to back up")
	_, err = w.s.Backup(w.ctx, &stowagev1.BackupSnapshotRequest{Id: s5.GetId(), StoreId: "p1"})
	wantClass(t, "backup to a primary store", err, errdefs.ErrInvalid, "is a Primary store, a Image store is needed")
}

func hasReason(p *stowagev1.Plan, s string) bool {
	for _, r := range p.GetReasons() {
		if strings.Contains(r, s) {
			return true
		}
	}
	return false
}

// A failed take leaves no copy record, the snapshot Error with the cause
// and the volume Ready; a failed backup drops its unfinished copy and puts
// the snapshot back where it was (BackedUp when an earlier backup exists).
func TestFailureHandlersRollBack(t *testing.T) {
	w := newWorld(t)
	p := w.store("p1", primary, "z1", nil)
	img := w.store("img", imageRole, "z1", nil)
	v := w.volume("v", p, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)

	resp, err := w.s.Take(w.ctx, &stowagev1.TakeSnapshotRequest{VolumeId: v.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	cause := errors.New("qemu-img: disk on fire")
	if err := (takeHandler{w.s}).Fail(w.ctx, resp.GetJob(), cause); err != nil {
		t.Fatal(err)
	}
	sn, refs, err := w.s.Get(w.ctx, resp.GetSnapshot().GetId())
	if err != nil {
		t.Fatal(err)
	}
	if sn.GetState() != stowagev1.SnapshotState_SNAPSHOT_STATE_ERROR || !strings.Contains(sn.GetError(), "disk on fire") || len(refs) != 0 {
		t.Errorf("after a failed take: %v with %d copies; want Error with the cause and none", sn, len(refs))
	}
	if got := w.vol(v.GetId()); got.GetState() != stowagev1.VolumeState_VOLUME_STATE_READY || got.GetBusyJobId() != "" {
		t.Errorf("volume after a failed take: %v", got)
	}
	// An errored snapshot can be deleted but not backed up or reverted to.
	_, err = w.s.Backup(w.ctx, &stowagev1.BackupSnapshotRequest{Id: sn.GetId()})
	wantClass(t, "backup of an errored snapshot", err, errdefs.ErrFailedPrecondition, "no copy on primary")
	_, err = w.s.Revert(w.ctx, sn.GetId(), false)
	wantClass(t, "revert to an errored snapshot", err, errdefs.ErrFailedPrecondition, "no copy on primary")
	if _, err := w.s.Delete(w.ctx, sn.GetId(), true); err != nil {
		t.Errorf("delete of an errored snapshot: %v", err)
	}

	for _, c := range []struct {
		name    string
		earlier bool
		want    stowagev1.SnapshotState
	}{
		{"first backup", false, stowagev1.SnapshotState_SNAPSHOT_STATE_CREATED_ON_PRIMARY},
		{"second backup", true, stowagev1.SnapshotState_SNAPSHOT_STATE_BACKED_UP},
	} {
		evs := onPrimary
		if c.earlier {
			evs = backedUp
		}
		s, _ := w.snap(v, p, primary, "", evs, ready)
		var kept *stowagev1.SnapshotOnStore
		if c.earlier {
			kept = w.copyOf(s, img, imageRole, "", ready)
		}
		b, err := w.s.Backup(w.ctx, &stowagev1.BackupSnapshotRequest{Id: s.GetId(), StoreId: img.GetId()})
		if err != nil {
			t.Fatal(err)
		}
		if err := (backupHandler{w.s}).Fail(w.ctx, b.GetJob(), cause); err != nil {
			t.Fatal(err)
		}
		got, refs, err := w.s.Get(w.ctx, s.GetId())
		if err != nil {
			t.Fatal(err)
		}
		if got.GetState() != c.want || !strings.Contains(got.GetError(), "backup failed: qemu-img: disk on fire") {
			t.Errorf("%s failed: %s (%q), want %s", c.name, meta.SnapshotStateName(got.GetState()), got.GetError(), meta.SnapshotStateName(c.want))
		}
		var imgCopies []string
		for _, r := range refs {
			if r.GetRole() == imageRole {
				imgCopies = append(imgCopies, r.GetId())
			}
		}
		if want := 0; c.earlier {
			if len(imgCopies) != 1 || imgCopies[0] != kept.GetId() {
				t.Errorf("%s failed: image copies %v, want only the earlier %s", c.name, imgCopies, kept.GetId())
			}
		} else if len(imgCopies) != want {
			t.Errorf("%s failed: image copies %v, want none", c.name, imgCopies)
		}
	}
}

// A failed revert puts the volume back to Ready with the cause; a failed
// delete frees only the volumes it held (for a merge), not another job's.
func TestRevertAndDeleteFailRelease(t *testing.T) {
	w := newWorld(t)
	p := w.store("p1", primary, "z1", nil)
	v := w.volume("v", p, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)
	sn, _ := w.snap(v, p, primary, "", onPrimary, ready)
	resp, err := w.s.Revert(w.ctx, sn.GetId(), false)
	if err != nil {
		t.Fatal(err)
	}
	if err := (revertHandler{w.s}).Fail(w.ctx, resp.GetJob(), errors.New("agent gone")); err != nil {
		t.Fatal(err)
	}
	if got := w.vol(v.GetId()); got.GetState() != stowagev1.VolumeState_VOLUME_STATE_READY || got.GetBusyJobId() != "" || !strings.Contains(got.GetError(), "agent gone") {
		t.Errorf("volume after a failed revert: %v", got)
	}

	held := w.volume("held", p, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)
	theirs := w.volume("theirs", p, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)
	for id, job := range map[string]string{held.GetId(): "delete-job", theirs.GetId(): "other-job"} {
		if _, err := w.db.Volumes().Transition(w.ctx, id, meta.VolumeSnapshotRequested, func(v *stowagev1.Volume) error { v.BusyJobId = job; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	if err := (deleteHandler{w.s}).Fail(w.ctx, &stowagev1.Job{Id: "delete-job"}, errors.New("rebase refused")); err != nil {
		t.Fatal(err)
	}
	if got := w.vol(held.GetId()); got.GetState() != stowagev1.VolumeState_VOLUME_STATE_READY || got.GetBusyJobId() != "" {
		t.Errorf("the volume the delete job held: %s busy with %q", meta.VolumeStateName(got.GetState()), got.GetBusyJobId())
	}
	if got := w.vol(theirs.GetId()); got.GetState() != stowagev1.VolumeState_VOLUME_STATE_SNAPSHOTTING || got.GetBusyJobId() != "other-job" {
		t.Errorf("another job's volume: %s busy with %q", meta.VolumeStateName(got.GetState()), got.GetBusyJobId())
	}
}

// A take or revert job whose work committed, then cancelled before its end
// was recorded (a restarted controller resumes a Cancelling job by failing
// it), leaves the finished snapshot, its copy and the volume's head alone,
// and does not release a volume another job holds by then.
func TestFailAfterTheWorkCommitted(t *testing.T) {
	w := newWorld(t)
	p := w.store("p1", primary, "z1", nil)
	v := w.volume("v", p, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)
	resp, err := w.s.Take(w.ctx, &stowagev1.TakeSnapshotRequest{VolumeId: v.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	sn, refs, err := w.s.Get(w.ctx, resp.GetSnapshot().GetId())
	if err != nil || len(refs) != 1 {
		t.Fatalf("%v %v", refs, err)
	}
	ref := refs[0]
	// What takeHandler.Run's last transaction writes.
	if _, err := w.db.Snapshots().Transition(w.ctx, sn.GetId(), meta.SnapshotCreateRequested, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := w.db.Snapshots().Transition(w.ctx, sn.GetId(), meta.SnapshotOperationSucceeded, nil); err != nil {
		t.Fatal(err)
	}
	for _, ev := range ready {
		if _, err := w.db.SnapshotsOnStore().Transition(w.ctx, ref.GetId(), ev, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := w.db.Volumes().Transition(w.ctx, v.GetId(), meta.VolumeOperationSucceeded, func(v *stowagev1.Volume) error {
		v.BusyJobId, v.HeadSnapshotRefId = "", ref.GetId()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// Another job takes the volume.
	if _, err := w.db.Volumes().Transition(w.ctx, v.GetId(), meta.VolumeResizeRequested, func(v *stowagev1.Volume) error { v.BusyJobId = "resize-1"; return nil }); err != nil {
		t.Fatal(err)
	}

	cancelled := fmt.Errorf("job %s was cancelled: %w", resp.GetJob().GetId(), context.Canceled)
	if err := (takeHandler{w.s}).Fail(w.ctx, resp.GetJob(), cancelled); err != nil {
		t.Fatal(err)
	}
	got, gotRefs, err := w.s.Get(w.ctx, sn.GetId())
	if err != nil {
		t.Fatal(err)
	}
	if got.GetState() != stowagev1.SnapshotState_SNAPSHOT_STATE_CREATED_ON_PRIMARY || len(gotRefs) != 1 || gotRefs[0].GetState() != stowagev1.ObjectState_OBJECT_STATE_READY {
		t.Errorf("the finished snapshot after a late failure: %s with copies %v", meta.SnapshotStateName(got.GetState()), gotRefs)
	}
	gv := w.vol(v.GetId())
	if gv.GetHeadSnapshotRefId() != ref.GetId() || gv.GetState() != stowagev1.VolumeState_VOLUME_STATE_RESIZING || gv.GetBusyJobId() != "resize-1" {
		t.Errorf("volume after a late take failure: %s busy %q head %q; want Resizing for resize-1 on head %s",
			meta.VolumeStateName(gv.GetState()), gv.GetBusyJobId(), gv.GetHeadSnapshotRefId(), ref.GetId())
	}

	// The same for a revert whose work committed.
	rv := &stowagev1.Job{Id: "revert-1", Kind: KindRevert, TargetId: sn.GetId()}
	if err := (revertHandler{w.s}).Fail(w.ctx, rv, cancelled); err != nil {
		t.Fatal(err)
	}
	if gv := w.vol(v.GetId()); gv.GetState() != stowagev1.VolumeState_VOLUME_STATE_RESIZING || gv.GetBusyJobId() != "resize-1" {
		t.Errorf("volume after a late revert failure: %s busy %q", meta.VolumeStateName(gv.GetState()), gv.GetBusyJobId())
	}
}

package snapshot

import (
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/stowage/stowage/controller/meta"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

type chainFixture struct {
	t   *testing.T
	ctx context.Context
	db  *meta.DB
	s   *Service
	vol *stowagev1.Volume
}

func newChain(t *testing.T) *chainFixture {
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	f := &chainFixture{t: t, ctx: context.Background(), db: db, s: &Service{db: db, log: slog.New(slog.DiscardHandler)}}
	v, err := db.Volumes().Create(f.ctx, &stowagev1.Volume{Id: meta.NewID(), Name: "v", Size: 1 << 20, StoreId: "st"})
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range []meta.VolumeEvent{meta.VolumeCreateRequested, meta.VolumeOperationSucceeded} {
		if v, err = db.Volumes().Transition(f.ctx, v.GetId(), ev, nil); err != nil {
			t.Fatal(err)
		}
	}
	f.vol = v
	return f
}

// snap adds a Ready snapshot with its primary copy on parent (a ref id).
func (f *chainFixture) snap(parent string) (*stowagev1.Snapshot, *stowagev1.SnapshotOnStore) {
	f.t.Helper()
	sn, err := f.db.Snapshots().Create(f.ctx, &stowagev1.Snapshot{Id: meta.NewID(), VolumeId: f.vol.GetId(), Name: "s", Method: "qcow2-external"})
	if err != nil {
		f.t.Fatal(err)
	}
	for _, ev := range []meta.SnapshotEvent{meta.SnapshotCreateRequested, meta.SnapshotOperationSucceeded} {
		if sn, err = f.db.Snapshots().Transition(f.ctx, sn.GetId(), ev, nil); err != nil {
			f.t.Fatal(err)
		}
	}
	r, err := f.db.SnapshotsOnStore().Create(f.ctx, &stowagev1.SnapshotOnStore{Id: meta.NewID(), SnapshotId: sn.GetId(), StoreId: "st",
		Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY, ParentRefId: parent})
	if err != nil {
		f.t.Fatal(err)
	}
	for _, ev := range []meta.ObjectEvent{meta.ObjectCreateRequested, meta.ObjectOperationSucceeded} {
		if r, err = f.db.SnapshotsOnStore().Transition(f.ctx, r.GetId(), ev, nil); err != nil {
			f.t.Fatal(err)
		}
	}
	return sn, r
}

func (f *chainFixture) volume(mutate func(v *stowagev1.Volume) error) {
	f.t.Helper()
	v, err := f.db.Volumes().Update(f.ctx, f.vol.GetId(), 0, mutate)
	if err != nil {
		f.t.Fatal(err)
	}
	f.vol = v
}

// refused checks that copy r of sn is not merged, for a reason that says why.
func (f *chainFixture) refused(sn *stowagev1.Snapshot, r *stowagev1.SnapshotOnStore, why string) {
	f.t.Helper()
	tg, got, err := f.s.mergeTargetOf(f.ctx, nil, sn, r)
	if err != nil || tg != nil || !strings.Contains(got, why) {
		f.t.Errorf("merge target of %s: %v, %q, %v; want refused for %q", sn.GetId(), tg, got, err, why)
	}
}

// A snapshot is merged only when exactly one file reads through it and
// nothing holds its chain: the refusals, each with its reason (the merges
// themselves run in cmd/stowage's TestSnapMergeEndToEnd).
func TestMergeRefusals(t *testing.T) {
	f := newChain(t)
	s1, r1 := f.snap("")
	s2, r2 := f.snap(r1.GetId())
	_, r3 := f.snap(r2.GetId())
	f.volume(func(v *stowagev1.Volume) error { v.HeadSnapshotRefId = r3.GetId(); return nil })

	// Two children (after a revert to s1 and a new snapshot): not merged.
	_, r4 := f.snap(r1.GetId())
	f.refused(s1, r1, "2 files read through it")

	// The bottom of a linked clone's chain merges onto the template's copy
	// on the store, once that copy is Ready there.
	if err := f.db.SnapshotsOnStore().Delete(f.ctx, r4.GetId(), 0); err != nil {
		t.Fatal(err)
	}
	spool, err := f.db.TemplatesOnStore().Create(f.ctx, &stowagev1.TemplateOnStore{Id: "spool", TemplateId: "t", StoreId: "st"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.db.TemplatesOnStore().Transition(f.ctx, spool.GetId(), meta.ObjectCreateRequested, nil); err != nil {
		t.Fatal(err)
	}
	f.volume(func(v *stowagev1.Volume) error { v.BaseRefId = "spool"; return nil })
	f.refused(s1, r1, "template copy is not Ready")
	// The bottom of a lazy volume's chain reads through the host's template
	// mount, which no driver rebases onto.
	f.volume(func(v *stowagev1.Volume) error { v.BaseRefId, v.InstallMethod = "", "lazy"; return nil })
	f.refused(s1, r1, "lazy volume")
	f.volume(func(v *stowagev1.Volume) error { v.BaseRefId, v.InstallMethod = "spool", "linked"; return nil })

	// A volume busy with another job holds its chain.
	if _, err := f.db.Volumes().Transition(f.ctx, f.vol.GetId(), meta.VolumeResizeRequested, func(v *stowagev1.Volume) error { v.BusyJobId = "other"; return nil }); err != nil {
		t.Fatal(err)
	}
	f.refused(s2, r2, "is Resizing")
	if _, err := f.db.Volumes().Transition(f.ctx, f.vol.GetId(), meta.VolumeOperationSucceeded, func(v *stowagev1.Volume) error { v.BusyJobId = ""; return nil }); err != nil {
		t.Fatal(err)
	}

	// The volume's own file is not rewritten while a host has it.
	s3, err := f.db.Snapshots().Get(f.ctx, r3.GetSnapshotId())
	if err != nil {
		t.Fatal(err)
	}
	f.volume(func(v *stowagev1.Volume) error { v.AttachedHostId = "h1"; return nil })
	f.refused(s3, r3, "attached to host h1")

	// A child being backed up is not rewritten under the backup.
	if _, err := f.db.Snapshots().Transition(f.ctx, s3.GetId(), meta.SnapshotBackupRequested, nil); err != nil {
		t.Fatal(err)
	}
	f.refused(s2, r2, "is BackingUp")

	// A reflink or copy snapshot has no chain.
	s2.Method = "reflink"
	f.refused(s2, r2, "not a qcow2 external snapshot")
}

package volume

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// A second mutating call on a busy volume is Aborted, before any planning;
// on a volume in a final state it is a failed precondition.
func TestBusyVolumeRefusesMutations(t *testing.T) {
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	s := &Service{db: db, log: slog.New(slog.DiscardHandler)}
	v, err := db.Volumes().Create(ctx, &stowagev1.Volume{Id: meta.NewID(), Name: "v1", Size: 1 << 20, StoreId: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range []meta.VolumeEvent{meta.VolumeCreateRequested, meta.VolumeOperationSucceeded, meta.VolumeSnapshotRequested} {
		if v, err = db.Volumes().Transition(ctx, v.GetId(), ev, func(v *stowagev1.Volume) error { v.BusyJobId = "job-1"; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Resize(ctx, "v1", 2<<20, false); !errors.Is(err, errdefs.ErrAborted) {
		t.Fatalf("resize while Snapshotting: %v, want aborted", err)
	}
	if _, err := s.Migrate(ctx, "v1", "s2", false); !errors.Is(err, errdefs.ErrAborted) {
		t.Fatalf("migrate while Snapshotting: %v, want aborted", err)
	}
	if _, err := s.Delete(ctx, "v1", false); !errors.Is(err, errdefs.ErrAborted) {
		t.Fatalf("delete while Snapshotting: %v, want aborted", err)
	}
	if got, _ := db.Volumes().Get(ctx, v.GetId()); got.GetRevision() != v.GetRevision() {
		t.Fatal("a refused call wrote the volume")
	}
	// A Failed volume: resizing is simply not possible.
	if _, err = db.Volumes().Transition(ctx, v.GetId(), meta.VolumeOperationFailed, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Volumes().Transition(ctx, v.GetId(), meta.VolumeDestroyRequested, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Resize(ctx, "v1", 2<<20, false); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("resize a destroyed volume: %v", err)
	}
}

// A negative grant TTL is refused before anything is looked up.
func TestGrantAccessNegativeTTL(t *testing.T) {
	s := &Service{log: slog.New(slog.DiscardHandler)}
	if _, _, err := s.GrantAccess(context.Background(), "v1", "h1", -time.Second); !errdefs.IsInvalid(err) {
		t.Fatalf("negative TTL: %v, want invalid", err)
	}
}

// A lazy create's host: one whose mount shows the template, or does not
// list it yet and is of the template's zone; never one without a mount or
// whose mount lists the template with an error. Without a mount planner
// the create waits for the heartbeats to show it (MountShows).
func TestLazyHostNeed(t *testing.T) {
	host := func(zone string, templates ...*stowagev1.CachedTemplate) *stowagev1.Host {
		return &stowagev1.Host{Zone: zone, Capabilities: &stowagev1.HostCapabilities{
			TemplateCache: &stowagev1.CacheStatus{Mount: "/run/stowage/templates", Templates: templates}}}
	}
	shown := &stowagev1.CachedTemplate{Id: "t1"}
	broken := &stowagev1.CachedTemplate{Id: "t1", Error: "source unreachable"}
	cases := []struct {
		name      string
		h         *stowagev1.Host
		can, show bool
	}{
		{"no mount", &stowagev1.Host{Zone: "z1"}, false, false},
		{"shown", host("z1", shown), true, true},
		{"shown, other zone", host("z2", shown), true, true},
		{"not listed yet", host("z1"), true, false},
		{"not listed, other zone", host("z2"), false, false},
		{"listed with an error", host("z1", broken), false, false},
	}
	for _, c := range cases {
		if got := MountCanShow("t1", "z1").OK(c.h); got != c.can {
			t.Errorf("%s: MountCanShow = %v, want %v", c.name, got, c.can)
		}
		if got := MountShows("t1").OK(c.h); got != c.show {
			t.Errorf("%s: MountShows = %v, want %v", c.name, got, c.show)
		}
	}
	s := &Service{}
	if got := s.mountNeed("t1", "z1").OK(host("z1")); got {
		t.Error("without a mount planner, a host that does not show the template was accepted")
	}
}

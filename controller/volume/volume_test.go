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

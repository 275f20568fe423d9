package datastore

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// upStore records an Up primary store reached by h1 with used of 100
// bytes in use and tags.
func upStore(t *testing.T, s *Service, name string, used int64, tags ...string) *stowagev1.DataStore {
	t.Helper()
	ctx := context.Background()
	rec, err := s.db.Stores().Create(ctx, &stowagev1.DataStore{Id: meta.NewID(), Name: name, Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY,
		Provider: "filesystem", Scope: &stowagev1.Scope{Zone: "z1"}, Tags: tags,
		CapacityBytes: 100, UsedBytes: used, AvailableBytes: 100 - used})
	if err != nil {
		t.Fatal(err)
	}
	rec, err = s.db.Stores().Transition(ctx, rec.GetId(), meta.StoreAttachSucceeded, func(r *stowagev1.DataStore) error {
		r.HostIds = []string{"h1"}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

func pick(t *testing.T, s *Service, need int64, tags ...string) (string, string, error) {
	t.Helper()
	st, reasons, err := s.PickStore(context.Background(), stowagev1.StoreRole_STORE_ROLE_PRIMARY, "z1", need, tags...)
	return st.GetName(), strings.Join(reasons, "; "), err
}

// Tags: only stores carrying every tag asked for qualify, and the plan
// says which tag the others lack. Thresholds: a store at or above its
// disable threshold (or that would be with need more bytes) is skipped
// with its fill in the reason; its own threshold overrides the default.
func TestPickStoreTagsAndThresholds(t *testing.T) {
	ctx := context.Background()
	s, _ := newService(t)
	upStore(t, s, "plain", 10)
	upStore(t, s, "ssd1", 50, "ssd")
	upStore(t, s, "ssd2", 20, "rack1", "ssd")

	name, why, err := pick(t, s, 0)
	if err != nil || name != "plain" {
		t.Fatalf("untagged: %s, %v; want plain (most free)", name, err)
	}
	name, why, err = pick(t, s, 0, "ssd")
	if err != nil || name != "ssd2" || !strings.Contains(why, "store plain skipped: lacks storage tag ssd (has none)") {
		t.Fatalf("ssd: %s (%s), %v; want ssd2 and plain skipped for its tag", name, why, err)
	}
	name, why, err = pick(t, s, 0, "rack1", "ssd")
	if err != nil || name != "ssd2" || !strings.Contains(why, "store ssd1 skipped: lacks storage tag rack1 (has ssd)") {
		t.Fatalf("ssd+rack1: %s (%s), %v", name, why, err)
	}
	if _, why, err = pick(t, s, 0, "nvme"); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "lacks storage tag nvme") {
		t.Fatalf("nvme: %v (%s); want failed precondition naming the tag", err, why)
	}

	// ssd2 is 20% used: 70 more bytes put it at 90%, above 85%.
	name, why, err = pick(t, s, 70, "ssd")
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "store ssd2 skipped: would be 90.0% full with 70 more bytes, at or above its disable threshold 85%") {
		t.Fatalf("70 bytes on ssd: %s, %v; want ssd2 skipped for its threshold", name, err)
	}
	// Its own threshold of 0.95 lets it take them.
	if _, err := s.Update(ctx, &stowagev1.UpdateStoreRequest{Id: "ssd2", CapacityDisableThreshold: proto.Float64(0.95)}); err != nil {
		t.Fatal(err)
	}
	if name, why, err = pick(t, s, 70, "ssd"); err != nil || name != "ssd2" {
		t.Fatalf("70 bytes with ssd2 at 95%%: %s (%s), %v", name, why, err)
	}
	// A default of 0.09 stops plain (10% used) even with nothing more.
	if err := s.SetDefaults(Thresholds{Disable: 0.09, Notify: 0.05}); err != nil {
		t.Fatal(err)
	}
	_, why, _ = pick(t, s, 0)
	if !strings.Contains(why, "store plain skipped: 10.0% full, at or above its disable threshold 9%") {
		t.Fatalf("default 9%%: %s", why)
	}
	if err := s.SetDefaults(Thresholds{Disable: 1.5, Notify: 0.5}); !errdefs.IsInvalid(err) {
		t.Errorf("default 1.5: %v, want invalid", err)
	}

	// A store asked for by name is refused the same way.
	plain, err := s.UpStore(ctx, "plain", stowagev1.StoreRole_STORE_ROLE_PRIMARY)
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "disable threshold 9%") {
		t.Errorf("UpStore(plain) above the threshold: %v, %v", plain, err)
	}
	ssd2, err := s.Get(ctx, "ssd2")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Admit(ssd2, 0, []string{"nvme"}); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "lacks storage tag nvme (has rack1, ssd)") {
		t.Errorf("Admit(ssd2, nvme): %v", err)
	}
	if ssd2.GetEffectiveDisableThreshold() != 0.95 || ssd2.GetEffectiveNotifyThreshold() != 0.05 {
		t.Errorf("ssd2 effective thresholds %g/%g, want its own 0.95 and the default 0.05", ssd2.GetEffectiveDisableThreshold(), ssd2.GetEffectiveNotifyThreshold())
	}
}

// Disable and Enable move a store Up <-> Disabled and refuse other states;
// a Disabled store takes nothing new but still serves what it holds.
func TestDisableEnableAndUpdate(t *testing.T) {
	ctx := context.Background()
	s, _ := newService(t)
	upStore(t, s, "p1", 10)
	if _, err := s.Enable(ctx, "p1"); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Enable of an Up store: %v, want failed precondition", err)
	}
	st, err := s.Disable(ctx, "p1")
	if err != nil || st.GetState() != stowagev1.StoreState_STORE_STATE_DISABLED {
		t.Fatalf("Disable: %v, %v", st.GetState(), err)
	}
	if !Serves(st) {
		t.Error("a Disabled store no longer serves what it holds")
	}
	if _, err := s.Disable(ctx, "p1"); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("second Disable: %v, want failed precondition", err)
	}
	if _, why, err := pick(t, s, 0); !errdefs.IsFailedPrecondition(err) || !strings.Contains(why, "store p1 skipped: Disabled") {
		t.Errorf("pick with p1 Disabled: %v (%s)", err, why)
	}
	if _, err := s.UpStore(ctx, "p1", stowagev1.StoreRole_STORE_ROLE_PRIMARY); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("UpStore of a Disabled store: %v", err)
	}
	if st, err = s.Enable(ctx, "p1"); err != nil || st.GetState() != stowagev1.StoreState_STORE_STATE_UP {
		t.Fatalf("Enable: %v, %v", st.GetState(), err)
	}

	// Update: tags sorted and deduplicated, bad ones refused with nothing
	// written, thresholds set and cleared.
	if _, err := s.Update(ctx, &stowagev1.UpdateStoreRequest{Id: "p1", Tags: &stowagev1.StoreTags{Values: []string{"ssd", "bad tag"}}}); !errdefs.IsInvalid(err) {
		t.Errorf("bad tag: %v, want invalid", err)
	}
	if _, err := s.Update(ctx, &stowagev1.UpdateStoreRequest{Id: "p1", CapacityNotifyThreshold: proto.Float64(0)}); !errdefs.IsInvalid(err) {
		t.Errorf("threshold 0: %v, want invalid", err)
	}
	st, err = s.Update(ctx, &stowagev1.UpdateStoreRequest{Id: "p1", Tags: &stowagev1.StoreTags{Values: []string{"ssd", "rack1", "ssd"}},
		CapacityDisableThreshold: proto.Float64(0.9)})
	if err != nil || strings.Join(st.GetTags(), ",") != "rack1,ssd" || st.GetCapacityDisableThreshold() != 0.9 {
		t.Fatalf("update: %v tags %v disable %v", err, st.GetTags(), st.CapacityDisableThreshold)
	}
	st, err = s.Update(ctx, &stowagev1.UpdateStoreRequest{Id: "p1", CapacityDisableThreshold: proto.Float64(-1)})
	if err != nil || st.CapacityDisableThreshold != nil || st.GetEffectiveDisableThreshold() != DefaultThresholds.Disable || len(st.GetTags()) != 2 {
		t.Fatalf("clear threshold: %v own %v effective %g tags %v", err, st.CapacityDisableThreshold, st.GetEffectiveDisableThreshold(), st.GetTags())
	}
	st, err = s.Update(ctx, &stowagev1.UpdateStoreRequest{Id: "p1", Tags: &stowagev1.StoreTags{}})
	if err != nil || len(st.GetTags()) != 0 {
		t.Fatalf("clear tags: %v %v", err, st.GetTags())
	}
}

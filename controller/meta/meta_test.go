package meta

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

var ctx = context.Background()

func primary(id, name string) *stowagev1.DataStore {
	return &stowagev1.DataStore{Id: id, Name: name, Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY, Url: "file:///srv/" + name}
}

func TestCreateGet(t *testing.T) {
	clock := &fixedClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	db := openTest(t, WithClock(clock.now))
	in := primary("s1", "p1")
	got, err := db.Stores().Create(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	if in.Revision != 0 || in.State != 0 || in.CreatedAt != nil {
		t.Fatal("Create modified its argument")
	}
	if got.Revision != 1 || got.State != stowagev1.StoreState_STORE_STATE_INITIALIZED {
		t.Fatalf("created revision %d state %s, want 1 Initialized", got.Revision, got.State)
	}
	if !got.CreatedAt.AsTime().Equal(clock.t) || !got.UpdatedAt.AsTime().Equal(clock.t) {
		t.Fatalf("timestamps %v %v, want %v", got.CreatedAt.AsTime(), got.UpdatedAt.AsTime(), clock.t)
	}
	read, err := db.Stores().Get(ctx, "s1")
	if err != nil || !proto.Equal(read, got) {
		t.Fatalf("Get = %v, %v; want %v", read, err, got)
	}
	byName, err := db.Stores().GetBy(ctx, IndexName, "p1")
	if err != nil || byName.Id != "s1" {
		t.Fatalf("GetBy(name, p1) = %v, %v", byName, err)
	}

	// Updates move updated_at, never created_at.
	clock.t = clock.t.Add(time.Hour)
	up, err := db.Stores().Update(ctx, "s1", 1, func(s *stowagev1.DataStore) error { s.UsedBytes = 7; return nil })
	if err != nil {
		t.Fatal(err)
	}
	if !up.CreatedAt.AsTime().Equal(clock.t.Add(-time.Hour)) || !up.UpdatedAt.AsTime().Equal(clock.t) {
		t.Fatalf("after update: created %v updated %v", up.CreatedAt.AsTime(), up.UpdatedAt.AsTime())
	}

	// Hosts get registered_at, jobs created_at and updated_at.
	h, err := db.Hosts().Create(ctx, &stowagev1.Host{Id: "h1", Hostname: "kvm1"})
	if err != nil || h.RegisteredAt == nil || h.State != stowagev1.HostState_HOST_STATE_CONNECTING {
		t.Fatalf("host %v, %v", h, err)
	}
	tpl, err := db.Templates().Create(ctx, &stowagev1.Template{Id: "t1", Name: "debian"})
	if err != nil || tpl.Revision != 1 || tpl.CreatedAt == nil {
		t.Fatalf("template %v, %v", tpl, err)
	}
}

func TestGetNotFound(t *testing.T) {
	db := openTest(t)
	_, err := db.Stores().Get(ctx, "7f3")
	if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "store 7f3") {
		t.Fatalf("got %v, want not found naming store 7f3", err)
	}
	_, err = db.TemplatesOnStore().Get(ctx, "x")
	if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "template on store x") {
		t.Fatalf("got %v", err)
	}
	if _, err := db.Jobs().GetBy(ctx, IndexIdempotencyKey, "nope"); !errdefs.IsNotFound(err) {
		t.Fatalf("GetBy missing: %v", err)
	}
	if _, err := db.Jobs().GetBy(ctx, IndexState, "Pending"); !errdefs.IsInvalid(err) {
		t.Fatalf("GetBy on a non-unique index: %v", err)
	}
	if _, err := db.Jobs().ListBy(ctx, "colour", "red"); !errdefs.IsInvalid(err) {
		t.Fatalf("ListBy on an unknown index: %v", err)
	}
}

func TestCreateRejectsBadInput(t *testing.T) {
	db := openTest(t)
	for _, id := range []string{"", "a/b", "a b", "é", strings.Repeat("x", 129)} {
		if _, err := db.Volumes().Create(ctx, &stowagev1.Volume{Id: id}); !errdefs.IsInvalid(err) {
			t.Errorf("id %q: got %v, want ErrInvalid", id, err)
		}
	}
	if _, err := db.Volumes().Create(ctx, nil); !errdefs.IsInvalid(err) {
		t.Errorf("nil record: got %v", err)
	}
	// New records start in the initial state; anything else must transition.
	_, err := db.Volumes().Create(ctx, &stowagev1.Volume{Id: "v1", State: stowagev1.VolumeState_VOLUME_STATE_READY})
	if !errdefs.IsInvalid(err) || !strings.Contains(err.Error(), "start in Allocated, not Ready") {
		t.Fatalf("create in Ready: %v", err)
	}
	if _, err := db.Volumes().Create(ctx, &stowagev1.Volume{Id: "v1", State: stowagev1.VolumeState_VOLUME_STATE_ALLOCATED}); err != nil {
		t.Fatalf("create in Allocated: %v", err)
	}
	if got := keysMentioning(t, db, "v1"); len(got) != 2 { // record + state index
		t.Fatalf("keys of v1: %v", got)
	}
}

func TestCreateDuplicateWritesNothing(t *testing.T) {
	db := openTest(t)
	if _, err := db.Stores().Create(ctx, primary("7f3", "p1")); err != nil {
		t.Fatal(err)
	}
	before := rawGet(t, db, recordKey("store", "7f3"))

	// Same id, other name: refused, and the other name stays free.
	_, err := db.Stores().Create(ctx, primary("7f3", "p2"))
	if !errdefs.IsAlreadyExists(err) || !strings.Contains(err.Error(), "store 7f3") {
		t.Fatalf("duplicate id: %v", err)
	}
	sameBytes(t, "duplicate id", before, rawGet(t, db, recordKey("store", "7f3")))
	if _, err := db.Stores().GetBy(ctx, IndexName, "p2"); !errdefs.IsNotFound(err) {
		t.Fatalf("name p2 was claimed by a refused create: %v", err)
	}

	// Other id, same name: refused with a message naming field, value and owner,
	// and none of the second record's keys exist.
	_, err = db.Stores().Create(ctx, &stowagev1.DataStore{Id: "9a1", Name: "p1", Role: stowagev1.StoreRole_STORE_ROLE_IMAGE})
	if !errdefs.IsAlreadyExists(err) || !strings.Contains(err.Error(), `store name "p1" is already taken by store 7f3`) {
		t.Fatalf("duplicate name: %v", err)
	}
	if keys := keysMentioning(t, db, "9a1"); len(keys) != 0 {
		t.Fatalf("refused create left keys %v", keys)
	}
	if images, _ := db.Stores().ListBy(ctx, IndexRole, "Image"); len(images) != 0 {
		t.Fatalf("refused create is listed by role: %v", images)
	}

	// Jobs: a set idempotency key is unique, empty keys are not indexed.
	if _, err := db.Jobs().Create(ctx, &stowagev1.Job{Id: "j1", IdempotencyKey: "req-1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Jobs().Create(ctx, &stowagev1.Job{Id: "j2", IdempotencyKey: "req-1"}); !errdefs.IsAlreadyExists(err) ||
		!strings.Contains(err.Error(), `job idempotency_key "req-1" is already taken by job j1`) {
		t.Fatalf("duplicate idempotency key: %v", err)
	}
	for _, id := range []string{"j3", "j4"} {
		if _, err := db.Jobs().Create(ctx, &stowagev1.Job{Id: id}); err != nil {
			t.Fatalf("job without key: %v", err)
		}
	}

	// TemplatesOnStore: one per (template, store).
	if _, err := db.TemplatesOnStore().Create(ctx, &stowagev1.TemplateOnStore{Id: "r1", TemplateId: "t1", StoreId: "s1"}); err != nil {
		t.Fatal(err)
	}
	_, err = db.TemplatesOnStore().Create(ctx, &stowagev1.TemplateOnStore{Id: "r2", TemplateId: "t1", StoreId: "s1"})
	if !errdefs.IsAlreadyExists(err) || !strings.Contains(err.Error(), "already taken by template on store r1") {
		t.Fatalf("duplicate template/store: %v", err)
	}
	if keys := keysMentioning(t, db, "r2"); len(keys) != 0 {
		t.Fatalf("refused create left keys %v", keys)
	}
	if _, err := db.TemplatesOnStore().Create(ctx, &stowagev1.TemplateOnStore{Id: "r3", TemplateId: "t1", StoreId: "s2"}); err != nil {
		t.Fatalf("same template on another store: %v", err)
	}
	got, err := db.TemplatesOnStore().GetBy(ctx, IndexTemplateStore, TemplateStoreKey("t1", "s2"))
	if err != nil || got.Id != "r3" {
		t.Fatalf("GetBy(template_store) = %v, %v", got, err)
	}
}

func TestUpdate(t *testing.T) {
	db := openTest(t)
	repo := db.Stores()
	if _, err := repo.Create(ctx, primary("s1", "p1")); err != nil {
		t.Fatal(err)
	}
	if _, err := repo.Create(ctx, primary("s2", "p2")); err != nil {
		t.Fatal(err)
	}
	key := recordKey("store", "s1")
	before := rawGet(t, db, key)

	refused := []struct {
		name   string
		rev    uint64
		mutate func(*stowagev1.DataStore) error
		class  error
	}{
		{"stale revision", 7, func(s *stowagev1.DataStore) error { s.UsedBytes = 1; return nil }, errdefs.ErrConflict},
		{"state change", 1, func(s *stowagev1.DataStore) error { s.State = stowagev1.StoreState_STORE_STATE_UP; return nil }, errdefs.ErrInvalid},
		{"id change", 1, func(s *stowagev1.DataStore) error { s.Id = "s9"; return nil }, errdefs.ErrInvalid},
		{"revision change", 1, func(s *stowagev1.DataStore) error { s.Revision = 9; return nil }, errdefs.ErrInvalid},
		{"taken name", 1, func(s *stowagev1.DataStore) error { s.Name = "p2"; return nil }, errdefs.ErrAlreadyExists},
		{"mutate error", 1, func(*stowagev1.DataStore) error { return fmt.Errorf("no: %w", errdefs.ErrUnavailable) }, errdefs.ErrUnavailable},
	}
	for _, c := range refused {
		_, err := repo.Update(ctx, "s1", c.rev, c.mutate)
		if !errors.Is(err, c.class) {
			t.Errorf("%s: got %v, want %v", c.name, err, c.class)
		}
		sameBytes(t, c.name, before, rawGet(t, db, key))
	}
	if _, err := repo.Update(ctx, "nope", 1, nil); !errdefs.IsNotFound(err) {
		t.Fatalf("update missing: %v", err)
	}
	_, err := repo.Update(ctx, "s1", 3, nil)
	if !strings.Contains(fmt.Sprint(err), "store s1: revision is 1, expected 3") {
		t.Fatalf("conflict message: %v", err)
	}

	// A rename moves the unique entry: the old name is free again.
	up, err := repo.Update(ctx, "s1", 1, func(s *stowagev1.DataStore) error { s.Name = "p1-renamed"; return nil })
	if err != nil || up.Revision != 2 || up.Name != "p1-renamed" {
		t.Fatalf("rename: %v, %v", up, err)
	}
	if _, err := repo.GetBy(ctx, IndexName, "p1"); !errdefs.IsNotFound(err) {
		t.Fatalf("old name still indexed: %v", err)
	}
	if _, err := repo.Create(ctx, primary("s3", "p1")); err != nil {
		t.Fatalf("reuse of the old name: %v", err)
	}
	// Revision 0 skips the check.
	if up, err = repo.Update(ctx, "s1", 0, nil); err != nil || up.Revision != 3 {
		t.Fatalf("update with revision 0: %v, %v", up, err)
	}
}

func TestTransitionMutateAndCAS(t *testing.T) {
	db := openTest(t)
	repo := db.Stores()
	if _, err := repo.Create(ctx, primary("7f3", "p1")); err != nil {
		t.Fatal(err)
	}
	st, err := repo.Transition(ctx, "7f3", StoreAttachSucceeded, func(s *stowagev1.DataStore) error {
		s.CapacityBytes = 100
		return nil
	})
	if err != nil || st.State != stowagev1.StoreState_STORE_STATE_UP || st.CapacityBytes != 100 || st.Revision != 2 {
		t.Fatalf("attach: %v, %v", st, err)
	}
	before := rawGet(t, db, recordKey("store", "7f3"))
	if _, err := repo.TransitionIf(ctx, "7f3", 1, StoreMaintenanceRequested, nil); !errdefs.IsConflict(err) {
		t.Fatalf("stale TransitionIf: %v", err)
	}
	if _, err := repo.Transition(ctx, "7f3", StoreMaintenanceRequested, func(s *stowagev1.DataStore) error {
		s.State = stowagev1.StoreState_STORE_STATE_MAINTENANCE
		return nil
	}); !errdefs.IsInvalid(err) {
		t.Fatalf("mutate changing the state: %v", err)
	}
	if _, err := repo.Transition(ctx, "7f3", StoreMaintenanceRequested, func(*stowagev1.DataStore) error {
		return errdefs.ErrUnavailable
	}); !errdefs.IsUnavailable(err) {
		t.Fatalf("mutate error: %v", err)
	}
	sameBytes(t, "refused transitions", before, rawGet(t, db, recordKey("store", "7f3")))

	for _, e := range []StoreEvent{StoreMaintenanceRequested, StoreMaintenanceSucceeded} {
		if _, err := repo.TransitionIf(ctx, "7f3", 0, e, nil); err != nil {
			t.Fatal(err)
		}
	}
	_, err = repo.Transition(ctx, "7f3", StoreMaintenanceRequested, nil)
	want := "store 7f3: event MaintenanceRequested is not allowed in state Maintenance"
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), want) {
		t.Fatalf("got %v, want %q", err, want)
	}
	if _, err := repo.Transition(ctx, "nope", StoreEnable, nil); !errdefs.IsNotFound(err) {
		t.Fatalf("transition of a missing record: %v", err)
	}
}

func TestDelete(t *testing.T) {
	db := openTest(t)
	if _, err := db.Jobs().Create(ctx, &stowagev1.Job{Id: "j1", TargetId: "v1", IdempotencyKey: "k"}); err != nil {
		t.Fatal(err)
	}
	if err := db.Jobs().Delete(ctx, "j1", 5); !errdefs.IsConflict(err) {
		t.Fatalf("stale delete: %v", err)
	}
	if len(keysMentioning(t, db, "j1")) != 4 { // record, state, target_id, idempotency_key
		t.Fatalf("keys before delete: %v", keysMentioning(t, db, "j1"))
	}
	if err := db.Jobs().Delete(ctx, "j1", 1); err != nil {
		t.Fatal(err)
	}
	if keys := keysMentioning(t, db, "j1"); len(keys) != 0 {
		t.Fatalf("delete left %v", keys)
	}
	if err := db.Jobs().Delete(ctx, "j1", 0); !errdefs.IsNotFound(err) {
		t.Fatalf("delete missing: %v", err)
	}
	// The key is free for a new job.
	if _, err := db.Jobs().Create(ctx, &stowagev1.Job{Id: "j2", IdempotencyKey: "k"}); err != nil {
		t.Fatal(err)
	}
	if err := db.Jobs().Delete(ctx, "j2", 0); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentTransitionOneWins(t *testing.T) {
	db := openTest(t)
	repo := db.TemplatesOnStore()
	if _, err := repo.Create(ctx, &stowagev1.TemplateOnStore{Id: "r1", TemplateId: "t1", StoreId: "s1"}); err != nil {
		t.Fatal(err)
	}
	for _, e := range []ObjectEvent{ObjectCreateRequested, ObjectOperationSucceeded} {
		if _, err := repo.Transition(ctx, "r1", e, nil); err != nil {
			t.Fatal(err)
		}
	}
	const n = 32
	errs := race(n, func(i int) error {
		_, err := repo.Transition(ctx, "r1", ObjectCopyRequested, func(r *stowagev1.TemplateOnStore) error {
			r.Error = fmt.Sprintf("winner %d", i)
			return nil
		})
		return err
	})
	if won := countWins(t, errs, errdefs.ErrFailedPrecondition); won != 1 {
		t.Fatalf("%d transitions won, want exactly 1", won)
	}
	got, err := repo.Get(ctx, "r1")
	if err != nil || got.State != stowagev1.ObjectState_OBJECT_STATE_COPYING || got.Revision != 4 {
		t.Fatalf("after the race: %v, %v", got, err)
	}
}

func TestConcurrentUpdateOneWins(t *testing.T) {
	db := openTest(t)
	repo := db.Volumes()
	if _, err := repo.Create(ctx, &stowagev1.Volume{Id: "v1", StoreId: "s0"}); err != nil {
		t.Fatal(err)
	}
	const n = 32
	errs := race(n, func(i int) error {
		_, err := repo.Update(ctx, "v1", 1, func(v *stowagev1.Volume) error {
			v.StoreId = fmt.Sprintf("s%d", i+1) // moves the store_id index too
			return nil
		})
		return err
	})
	if won := countWins(t, errs, errdefs.ErrConflict); won != 1 {
		t.Fatalf("%d updates won, want exactly 1", won)
	}
	got, err := repo.Get(ctx, "v1")
	if err != nil || got.Revision != 2 {
		t.Fatalf("after the race: %v, %v", got, err)
	}
	for i := 0; i <= n; i++ {
		vols, err := repo.ListBy(ctx, IndexStoreID, fmt.Sprintf("s%d", i))
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("s%d", i) == got.StoreId; containsID(vols, "v1") != want {
			t.Fatalf("store_id index of s%d lists v1: %v, want %v", i, !want, want)
		}
	}
}

func TestConcurrentCreateUniqueOneWins(t *testing.T) {
	db := openTest(t)
	errs := race(32, func(i int) error {
		_, err := db.Stores().Create(ctx, primary(fmt.Sprintf("s%d", i), "same"))
		return err
	})
	if won := countWins(t, errs, errdefs.ErrAlreadyExists); won != 1 {
		t.Fatalf("%d creates won, want exactly 1", won)
	}
	all, err := db.Stores().List(ctx, Filter[*stowagev1.DataStore]{})
	if err != nil || len(all) != 1 {
		t.Fatalf("stores: %v, %v", all, err)
	}
}

// race runs fn n times at once and returns the errors.
func race(n int, fn func(i int) error) []error {
	errs := make([]error, n)
	var start, done sync.WaitGroup
	start.Add(1)
	for i := range n {
		done.Go(func() {
			start.Wait()
			errs[i] = fn(i)
		})
	}
	start.Done()
	done.Wait()
	return errs
}

// countWins counts nil errors; every other error must wrap loser.
func countWins(t *testing.T, errs []error, loser error) int {
	t.Helper()
	won := 0
	for _, err := range errs {
		switch {
		case err == nil:
			won++
		case !errors.Is(err, loser):
			t.Errorf("loser got %v, want %v", err, loser)
		}
	}
	return won
}

func TestIndexesFollowChanges(t *testing.T) {
	db := openTest(t)
	vols := db.Volumes()
	for _, v := range []*stowagev1.Volume{
		{Id: "v1", Name: "a/b", StoreId: "s1", TemplateId: "t1"},
		{Id: "v2", Name: "a", StoreId: "s1"},
		{Id: "v3", Name: "a%2Fb", StoreId: "s2", TemplateId: "t1"},
	} {
		if _, err := vols.Create(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	ids := func(recs []*stowagev1.Volume, err error) []string {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, r := range recs {
			out = append(out, r.Id)
		}
		return out
	}
	for _, c := range []struct {
		index, value string
		want         []string
	}{
		{IndexName, "a", []string{"v2"}}, // not v1: "/" in a value cannot leak into the prefix
		{IndexName, "a/b", []string{"v1"}},
		{IndexName, "a%2Fb", []string{"v3"}},
		{IndexStoreID, "s1", []string{"v1", "v2"}},
		{IndexTemplateID, "t1", []string{"v1", "v3"}},
		{IndexTemplateID, "", nil},
		{IndexState, "Allocated", []string{"v1", "v2", "v3"}},
	} {
		if got := ids(vols.ListBy(ctx, c.index, c.value)); !slices.Equal(got, c.want) {
			t.Errorf("ListBy(%s, %q) = %v, want %v", c.index, c.value, got, c.want)
		}
	}

	// An update of indexed fields and a transition move the entries.
	if _, err := vols.Update(ctx, "v1", 1, func(v *stowagev1.Volume) error {
		v.StoreId, v.TemplateId = "s2", ""
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := vols.Transition(ctx, "v2", VolumeCreateRequested, nil); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		index, value string
		want         []string
	}{
		{IndexStoreID, "s1", []string{"v2"}},
		{IndexStoreID, "s2", []string{"v1", "v3"}},
		{IndexTemplateID, "t1", []string{"v3"}},
		{IndexState, "Allocated", []string{"v1", "v3"}},
		{IndexState, "Creating", []string{"v2"}},
	} {
		if got := ids(vols.ListBy(ctx, c.index, c.value)); !slices.Equal(got, c.want) {
			t.Errorf("after changes: ListBy(%s, %q) = %v, want %v", c.index, c.value, got, c.want)
		}
	}
	if got := ids(vols.ListInState(ctx, stowagev1.VolumeState_VOLUME_STATE_CREATING)); !slices.Equal(got, []string{"v2"}) {
		t.Errorf("ListInState(Creating) = %v", got)
	}

	// Filters: Where, After and Limit page through in id order.
	type F = Filter[*stowagev1.Volume]
	if got := ids(vols.List(ctx, F{})); !slices.Equal(got, []string{"v1", "v2", "v3"}) {
		t.Errorf("List all = %v", got)
	}
	if got := ids(vols.List(ctx, F{After: "v1", Limit: 1})); !slices.Equal(got, []string{"v2"}) {
		t.Errorf("List page = %v", got)
	}
	if got := ids(vols.List(ctx, F{Index: IndexStoreID, Value: "s2", After: "v1"})); !slices.Equal(got, []string{"v3"}) {
		t.Errorf("List by index after = %v", got)
	}
	if got := ids(vols.List(ctx, F{Where: func(v *stowagev1.Volume) bool { return v.Name == "a" }})); !slices.Equal(got, []string{"v2"}) {
		t.Errorf("List where = %v", got)
	}
	if _, err := vols.List(ctx, F{Limit: -1}); !errdefs.IsInvalid(err) {
		t.Errorf("negative limit: %v", err)
	}
	if err := db.Check(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestTxnAtomic(t *testing.T) {
	db := openTest(t)
	vol := &stowagev1.Volume{Id: "v1", StoreId: "s1"}
	job := &stowagev1.Job{Id: "j1", TargetId: "v1", IdempotencyKey: "create-v1"}

	// A failing step rolls the whole transaction back.
	boom := errors.New("boom")
	err := db.Txn(ctx, func(tx *Tx) error {
		if _, err := Volumes.CreateTx(tx, vol); err != nil {
			return err
		}
		if _, err := Jobs.CreateTx(tx, job); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("Txn: %v", err)
	}
	if k := append(keysMentioning(t, db, "v1"), keysMentioning(t, db, "j1")...); len(k) != 0 {
		t.Fatalf("rolled back transaction left %v", k)
	}

	// Both records land together; a refused step handled inside fn writes
	// nothing of its own and does not spoil the rest.
	if _, err := db.Jobs().Create(ctx, &stowagev1.Job{Id: "j0", IdempotencyKey: "taken"}); err != nil {
		t.Fatal(err)
	}
	err = db.Txn(ctx, func(tx *Tx) error {
		if _, err := Volumes.CreateTx(tx, vol); err != nil {
			return err
		}
		if _, err := Jobs.CreateTx(tx, &stowagev1.Job{Id: "jx", TargetId: "v1", IdempotencyKey: "taken"}); !errdefs.IsAlreadyExists(err) {
			return fmt.Errorf("want AlreadyExists, got %v", err)
		}
		if _, err := Jobs.CreateTx(tx, job); err != nil {
			return err
		}
		v, err := Volumes.GetTx(tx, "v1") // reads its own writes
		if err != nil || v.Revision != 1 {
			return fmt.Errorf("GetTx in txn: %v, %v", v, err)
		}
		_, err = Volumes.TransitionTx(tx, "v1", 1, VolumeCreateRequested, nil)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if v, err := db.Volumes().Get(ctx, "v1"); err != nil || v.State != stowagev1.VolumeState_VOLUME_STATE_CREATING {
		t.Fatalf("volume: %v, %v", v, err)
	}
	if j, err := db.Jobs().GetBy(ctx, IndexIdempotencyKey, "create-v1"); err != nil || j.Id != "j1" {
		t.Fatalf("job: %v, %v", j, err)
	}
	if k := keysMentioning(t, db, "jx"); len(k) != 0 {
		t.Fatalf("refused create inside a txn left %v", k)
	}

	// A Tx is read-only in View and dead after its function returns.
	var kept *Tx
	err = db.View(ctx, func(tx *Tx) error {
		kept = tx
		_, err := Volumes.CreateTx(tx, &stowagev1.Volume{Id: "v9"})
		return err
	})
	if !errdefs.IsInvalid(err) {
		t.Fatalf("write in View: %v", err)
	}
	if _, err := Volumes.GetTx(kept, "v1"); !errdefs.IsInvalid(err) {
		t.Fatalf("Tx used after its end: %v", err)
	}
}

func TestContextAndClose(t *testing.T) {
	db, err := Open(testSpec(t))
	if err != nil {
		t.Fatal(err)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := db.Stores().Create(cancelled, primary("s1", "p1")); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled create: %v", err)
	}
	if _, err := db.Stores().Get(cancelled, "s1"); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled get: %v", err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := db.Stores().Get(ctx, "s1"); !errdefs.IsUnavailable(err) {
		t.Fatalf("Get after Close: %v", err)
	}
	if _, err := Open(""); !errdefs.IsInvalid(err) {
		t.Fatalf("Open(\"\"): %v", err)
	}
}

func TestPersistence(t *testing.T) {
	dir := testSpec(t)
	db, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Stores().Create(ctx, primary("s1", "p1")); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Stores().Transition(ctx, "s1", StoreAttachSucceeded, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Snapshots().Create(ctx, &stowagev1.Snapshot{Id: "sn1", VolumeId: "v1"}); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	db = openTestDir(t, dir)
	st, err := db.Stores().GetBy(ctx, IndexName, "p1")
	if err != nil || st.State != stowagev1.StoreState_STORE_STATE_UP || st.Revision != 2 {
		t.Fatalf("store after reopen: %v, %v", st, err)
	}
	if ups, err := db.Stores().ListInState(ctx, stowagev1.StoreState_STORE_STATE_UP); err != nil || len(ups) != 1 {
		t.Fatalf("Up stores after reopen: %v, %v", ups, err)
	}
	if snaps, err := db.Snapshots().ListBy(ctx, IndexVolumeID, "v1"); err != nil || len(snaps) != 1 {
		t.Fatalf("snapshots of v1 after reopen: %v, %v", snaps, err)
	}
	if v, err := db.SchemaVersion(ctx); err != nil || v != latestSchemaVersion() {
		t.Fatalf("schema version %d, %v", v, err)
	}
}

func TestOpenRefusesNewerSchema(t *testing.T) {
	dir := testSpec(t)
	db, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.kv.update(context.Background(), func(kt kvTxn) error {
		return kt.set([]byte(schemaVersionKey), []byte("99"))
	}); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = Open(dir)
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), fmt.Sprintf("schema version 99 is newer than %d", latestSchemaVersion())) {
		t.Fatalf("Open of a newer schema: %v", err)
	}
	// The refused Open released the directory: trying again gives the same
	// answer, not a lock error.
	if _, err := Open(dir); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("second Open: %v", err)
	}
}

// openTestDir reopens dir for the rest of the test.
func openTestDir(t *testing.T, dir string) *DB {
	t.Helper()
	db, err := Open(dir)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	t.Cleanup(func() {
		if err := db.Check(ctx); err != nil {
			t.Errorf("Check: %v", err)
		}
		db.Close()
	})
	return db
}

func TestCheckFindsCorruption(t *testing.T) {
	db := openTest(t)
	if _, err := db.Volumes().Create(ctx, &stowagev1.Volume{Id: "v1", StoreId: "s1"}); err != nil {
		t.Fatal(err)
	}
	dangling := indexKey("volume", IndexStoreID, "s9", "v2")
	if err := db.kv.update(context.Background(), func(kt kvTxn) error { return kt.set(dangling, []byte{}) }); err != nil {
		t.Fatal(err)
	}
	if err := db.Check(ctx); !errors.Is(err, errdefs.ErrDataLoss) || !strings.Contains(err.Error(), "dangling") {
		t.Fatalf("Check: %v", err)
	}
	if _, err := db.Volumes().ListBy(ctx, IndexStoreID, "s9"); !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("listing through a dangling entry: %v", err)
	}
	if err := db.kv.update(context.Background(), func(kt kvTxn) error { return kt.delete(dangling) }); err != nil {
		t.Fatal(err)
	}
}

// A transaction that loses the race is re-run on fresh data: a Transition
// whose event the winner's state no longer allows then fails cleanly.
func TestTxnRetriesLostRace(t *testing.T) {
	db := openTest(t)
	repo := db.TemplatesOnStore()
	if _, err := repo.Create(ctx, &stowagev1.TemplateOnStore{Id: "r1", TemplateId: "t1", StoreId: "s1"}); err != nil {
		t.Fatal(err)
	}
	for _, e := range []ObjectEvent{ObjectCreateRequested, ObjectOperationSucceeded} {
		if _, err := repo.Transition(ctx, "r1", e, nil); err != nil {
			t.Fatal(err)
		}
	}
	attempts := 0
	err := db.Txn(ctx, func(tx *Tx) error {
		attempts++
		_, err := TemplatesOnStore.TransitionTx(tx, "r1", 0, ObjectCopyRequested, nil)
		if attempts == 1 {
			// A rival commits the same transition before this one does.
			if _, rerr := repo.Transition(ctx, "r1", ObjectCopyRequested, nil); rerr != nil {
				return rerr
			}
		}
		return err
	})
	if attempts != 2 || !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("after %d attempts: %v; want 2 attempts and ErrFailedPrecondition", attempts, err)
	}

	// A transaction that loses every time gives up with ErrAborted.
	attempts = 0
	err = db.Txn(ctx, func(tx *Tx) error {
		attempts++
		if _, err := TemplatesOnStore.UpdateTx(tx, "r1", 0, nil); err != nil {
			return err
		}
		_, err := repo.Update(ctx, "r1", 0, nil)
		return err
	})
	if attempts != maxAttempts || !errors.Is(err, errdefs.ErrAborted) {
		t.Fatalf("after %d attempts: %v; want %d and ErrAborted", attempts, err, maxAttempts)
	}
}

func TestLoggerAdapter(t *testing.T) {
	onlyBadger(t)
	var buf strings.Builder
	var mu sync.Mutex
	log := slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return buf.Write(p)
	}), &slog.HandlerOptions{Level: slog.LevelDebug}))
	db := openTest(t, WithLogger(log))
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if !strings.Contains(buf.String(), "component=badger") {
		t.Fatalf("no badger lines in the log: %q", buf.String())
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// A zero-length memtable file (a process killed while Badger created it)
// does not keep the database from opening again.
func TestOpenAfterKillDuringMemtableCreation(t *testing.T) {
	onlyBadger(t)
	dir := t.TempDir()
	db, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Templates().Create(context.Background(), &stowagev1.Template{Id: "t1", Name: "kept"}); err != nil {
		t.Fatal(err)
	}
	db.Close()
	if err := os.WriteFile(filepath.Join(dir, "00042.mem"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	db, err = Open(dir)
	if err != nil {
		t.Fatalf("open with an empty memtable file: %v", err)
	}
	defer db.Close()
	if _, err := db.Templates().Get(context.Background(), "t1"); err != nil {
		t.Fatalf("data after reopening: %v", err)
	}
}

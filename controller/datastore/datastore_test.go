package datastore

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stowage/stowage/agent"
	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/driverstest"
	"github.com/stowage/stowage/drivers/filesystem"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// localHost is the agent's real host implementation on this machine
// (optionally seeing its own tree under root, as a separate host would),
// allowed to serve stores anywhere under the test's temporary directories.
func localHost(t *testing.T, id string, opts ...hostfs.Option) hostops.Host {
	t.Helper()
	policy, err := agent.NewRootPolicy([]string{os.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	return agent.NewLocalHost(hostfs.New(id, opts...), policy)
}

// newService wires the store service to the real filesystem provider over
// one local host (host work runs on this machine through the agent's own
// host implementation).
func newService(t *testing.T) (*Service, *driverstest.Hosts) {
	t.Helper()
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	hosts := driverstest.NewHosts(localHost(t, "h1"))
	reg := drivers.NewRegistry()
	reg.Register(filesystem.New(hosts))
	return New(db, reg, slog.New(slog.DiscardHandler)), hosts
}

func addReq(name, dir string) *stowagev1.AddStoreRequest {
	return &stowagev1.AddStoreRequest{Name: name, Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY, Provider: "filesystem", Url: "file://" + dir}
}

func TestAddWithNoUpHostWritesNothing(t *testing.T) {
	ctx := context.Background()
	s, hosts := newService(t)
	dir := filepath.Join(t.TempDir(), "p1")
	hosts.SetUp("h1", false)
	if _, err := s.Add(ctx, addReq("p1", dir)); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("Add with no Up host: %v, want unavailable", err)
	}
	if stores, _ := s.List(ctx, 0, "", "", 0); len(stores) != 0 {
		t.Fatalf("a failed add left %d records", len(stores))
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("a failed add left the directory: %v", err)
	}
	hosts.SetUp("h1", true)
	st, err := s.Add(ctx, addReq("p1", dir))
	if err != nil || st.GetState() != stowagev1.StoreState_STORE_STATE_UP {
		t.Fatalf("Add: %v %v", st, err)
	}
}

// blindAttach is a fault-injecting seam: Initialize runs on the real local
// host, but Attach only sees a host whose root is elsewhere, so it cannot
// reach the store (as when an NFS export is not mounted on the cluster's hosts).
type blindAttach struct {
	*driverstest.Hosts
	blind hostops.Host
}

func (b blindAttach) AllInScope(context.Context, drivers.Scope) ([]hostops.Host, error) {
	return []hostops.Host{b.blind}, nil
}

func TestAddRollsBackWhenAttachFails(t *testing.T) {
	ctx := context.Background()
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	eps := blindAttach{Hosts: driverstest.NewHosts(localHost(t, "h1")), blind: localHost(t, "h2", hostfs.WithRoot(t.TempDir()))}
	reg := drivers.NewRegistry()
	reg.Register(filesystem.New(eps))
	s := New(db, reg, slog.New(slog.DiscardHandler))
	dir := filepath.Join(t.TempDir(), "p1")
	if _, err := s.Add(ctx, addReq("p1", dir)); err == nil || !strings.Contains(err.Error(), "attach") {
		t.Fatalf("Add whose attach fails: %v", err)
	}
	if stores, _ := s.List(ctx, 0, "", "", 0); len(stores) != 0 {
		t.Fatalf("a failed attach left %d records", len(stores))
	}
	if _, err := os.Stat(filepath.Join(dir, ".stowage-store")); !os.IsNotExist(err) {
		t.Fatalf("a failed attach left the marker: %v", err)
	}
}

func TestRecoverAfterCrash(t *testing.T) {
	ctx := context.Background()
	s, hosts := newService(t)
	up, err := s.Add(ctx, addReq("p1", filepath.Join(t.TempDir(), "p1")))
	if err != nil {
		t.Fatal(err)
	}
	// A controller died between PrepareForMaintenance and Maintenance.
	if _, err := s.db.Stores().Transition(ctx, up.GetId(), meta.StoreMaintenanceRequested, nil); err != nil {
		t.Fatal(err)
	}
	// And another died between recording a store and attaching it: the
	// layout exists (Initialize ran) but the store is Initialized.
	dir2 := filepath.Join(t.TempDir(), "p2")
	ep, _ := hosts.ForHost(ctx, "h1")
	id2 := meta.NewID()
	if _, err := ep.PrepareStore(ctx, hostops.StoreRoot{ID: id2, Path: dir2, Subdirs: []string{"volumes", "snapshots", "templates", "tmp"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.db.Stores().Create(ctx, &stowagev1.DataStore{Id: id2, Name: "p2", Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY,
		Provider: "filesystem", Url: "file://" + dir2, Scope: &stowagev1.Scope{Zone: "default"}, Details: map[string]string{"path": dir2}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	got, _ := s.Get(ctx, "p1")
	if got.GetState() != stowagev1.StoreState_STORE_STATE_ERROR_IN_MAINTENANCE || got.GetStateReason() == "" {
		t.Errorf("p1 after recovery: %v %q", got.GetState(), got.GetStateReason())
	}
	got, _ = s.Get(ctx, "p2")
	if got.GetState() != stowagev1.StoreState_STORE_STATE_UP || len(got.GetHostIds()) != 1 {
		t.Errorf("p2 after recovery: %v %v", got.GetState(), got.GetHostIds())
	}
	// ErrorInMaintenance can be cancelled back to Up.
	if st, err := s.CancelMaintenance(ctx, "p1"); err != nil || st.GetState() != stowagev1.StoreState_STORE_STATE_UP {
		t.Fatalf("cancel after recovery: %v %v", st, err)
	}
}

func TestDeleteRefusedWhileRecordsPlaceObjects(t *testing.T) {
	ctx := context.Background()
	s, _ := newService(t)
	st, err := s.Add(ctx, addReq("p1", filepath.Join(t.TempDir(), "p1")))
	if err != nil {
		t.Fatal(err)
	}
	vol, err := s.db.Volumes().Create(ctx, &stowagev1.Volume{Id: meta.NewID(), Name: "v1", StoreId: st.GetId(), Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "p1"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("delete with a volume record: %v", err)
	}
	if got, _ := s.Get(ctx, "p1"); got.GetState() != stowagev1.StoreState_STORE_STATE_UP {
		t.Fatalf("refused delete changed the store: %v", got.GetState())
	}
	if err := s.db.Volumes().Delete(ctx, vol.GetId(), 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "p1"); err != nil {
		t.Fatalf("delete empty: %v", err)
	}
	if _, err := s.Get(ctx, "p1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("deleted store: %v", err)
	}
}

package endpoint

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/stowage/stowage/controller/hosts"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// fleet is the real host registry (controller/hosts on Badger in a
// temporary directory) with agents registered and heartbeating through its
// own API, and a selector over it.
type fleet struct {
	t   *testing.T
	ctx context.Context
	db  *meta.DB
	hs  *hosts.Service
	sel *Selector
}

func newFleet(t *testing.T) *fleet {
	t.Helper()
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	hs := hosts.New(db, nil, hosts.Config{UpHostsMaxAge: -1} /* move() changes records behind the Service */, slog.New(slog.DiscardHandler))
	return &fleet{t: t, ctx: context.Background(), db: db, hs: hs, sel: New(hs, nil)}
}

// add registers agent id in zone/cluster with caps, then heartbeats with
// inFlight tasks (what "least busy" is measured by).
func (f *fleet) add(id, zone, cluster string, inFlight int32, caps *stowagev1.HostCapabilities) {
	f.t.Helper()
	if _, err := f.hs.Register(f.ctx, &stowagev1.RegisterRequest{HostId: id, Hostname: id, AgentUrl: "https://127.0.0.1:1",
		SessionId: "s-" + id, Zone: zone, Cluster: cluster, Capabilities: caps}); err != nil {
		f.t.Fatal(err)
	}
	if _, err := f.hs.Heartbeat(f.ctx, &stowagev1.HeartbeatRequest{HostId: id, SessionId: "s-" + id, Capabilities: caps, InFlightTasks: inFlight}); err != nil {
		f.t.Fatal(err)
	}
}

// move fires a host state machine event on the record (what the liveness
// monitor and the maintenance commands do).
func (f *fleet) move(id string, ev meta.HostEvent) {
	f.t.Helper()
	if _, err := f.db.Hosts().Transition(f.ctx, id, ev, nil); err != nil {
		f.t.Fatal(err)
	}
}

// pick is Select that must succeed.
func (f *fleet) pick(ctx context.Context, prefer string, scopes ...drivers.Scope) Choice {
	f.t.Helper()
	c, err := f.sel.Select(ctx, prefer, scopes...)
	if err != nil {
		f.t.Fatalf("Select(prefer %q, %v): %v", prefer, scopes, err)
	}
	if c.HostID != c.Host.GetId() || c.Endpoint.HostID() != c.HostID {
		f.t.Fatalf("Select: choice names %q, record %q, endpoint %q", c.HostID, c.Host.GetId(), c.Endpoint.HostID())
	}
	return c
}

func z(zone string) drivers.Scope { return drivers.Scope{Zone: zone} }

func zc(zone, cluster string) drivers.Scope { return drivers.Scope{Zone: zone, Cluster: cluster} }

// The least busy Up host in scope is picked, the preferred one when it
// qualifies; zone, cluster and host scopes narrow the candidates.
func TestSelectLeastBusyInScope(t *testing.T) {
	f := newFleet(t)
	f.add("busy", "z1", "c1", 5, nil)
	f.add("idle", "z1", "c1", 1, nil)
	f.add("other-cluster", "z1", "c2", 0, nil)
	f.add("other-zone", "z2", "c1", 0, nil)

	if c := f.pick(f.ctx, "", z("z1")); c.HostID != "other-cluster" || !strings.Contains(c.Reason, "least busy of 3 Up hosts") || !strings.Contains(c.Reason, "(0 tasks in flight)") {
		t.Errorf("zone z1: %s (%s), want other-cluster, the least busy of 3", c.HostID, c.Reason)
	}
	if c := f.pick(f.ctx, "", zc("z1", "c1")); c.HostID != "idle" {
		t.Errorf("cluster z1/c1: %s (%s), want idle", c.HostID, c.Reason)
	}
	if c := f.pick(f.ctx, "busy", zc("z1", "c1")); c.HostID != "busy" || !strings.Contains(c.Reason, "already holds the data") {
		t.Errorf("prefer busy: %s (%s), want busy: it holds the data", c.HostID, c.Reason)
	}
	// A preferred host outside the scope is not picked.
	if c := f.pick(f.ctx, "other-zone", zc("z1", "c1")); c.HostID != "idle" {
		t.Errorf("prefer a host outside the scope: %s (%s), want idle", c.HostID, c.Reason)
	}
	// A host scope (a local store) admits only that host, however busy.
	if c := f.pick(f.ctx, "", drivers.Scope{Zone: "z1", Cluster: "c1", HostID: "busy"}); c.HostID != "busy" {
		t.Errorf("host scope: %s, want busy", c.HostID)
	}
	// Two scopes (a copy between stores): a host in both.
	if c := f.pick(f.ctx, "", z("z1"), zc("z1", "c1")); c.HostID != "idle" {
		t.Errorf("z1 and z1/c1: %s, want idle", c.HostID)
	}
	// The zone is required to match even when the cluster name does.
	if c := f.pick(f.ctx, "", zc("z2", "c1")); c.HostID != "other-zone" {
		t.Errorf("z2/c1: %s, want other-zone", c.HostID)
	}

	all, err := f.sel.AllInScope(f.ctx, z("z1"))
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, h := range all {
		ids = append(ids, h.HostID())
	}
	if got := strings.Join(ids, ","); got != "other-cluster,idle,busy" {
		t.Errorf("AllInScope(z1) = %s, want least busy first: other-cluster,idle,busy", got)
	}
}

// Equally busy hosts are ordered by id, whatever the order they registered
// in, so the same state always gives the same choice.
func TestSelectTieBreakIsByID(t *testing.T) {
	f := newFleet(t)
	for _, id := range []string{"h-c", "h-a", "h-b"} {
		f.add(id, "z1", "c1", 2, nil)
	}
	for range 5 {
		if c := f.pick(f.ctx, "", z("z1")); c.HostID != "h-a" {
			t.Fatalf("tie: %s, want h-a (lowest id)", c.HostID)
		}
		h, err := f.sel.ForScope(f.ctx, z("z1"))
		if err != nil || h.HostID() != "h-a" {
			t.Fatalf("ForScope tie: %v %v, want h-a", h, err)
		}
	}
	// One task less wins over the id order.
	f.add("h-c", "z1", "c1", 1, nil)
	if c := f.pick(f.ctx, "", z("z1")); c.HostID != "h-c" {
		t.Fatalf("after h-c got less busy: %s, want h-c", c.HostID)
	}
}

// Disconnected hosts and hosts in maintenance are never picked, even when
// preferred or named by the step; the error says which hosts are there and
// in what state.
func TestSelectSkipsHostsNotUp(t *testing.T) {
	f := newFleet(t)
	f.add("gone", "z1", "c1", 0, nil)
	f.add("maint", "z1", "c1", 0, nil)
	f.add("up", "z1", "c1", 9, nil)
	f.move("gone", meta.HostHeartbeatMissed)
	f.move("maint", meta.HostMaintenanceRequested)

	if c := f.pick(f.ctx, "gone", z("z1")); c.HostID != "up" {
		t.Errorf("prefer a Disconnected host: %s, want up", c.HostID)
	}
	if c := f.pick(f.ctx, "maint", z("z1")); c.HostID != "up" {
		t.Errorf("prefer a host in maintenance: %s, want up", c.HostID)
	}
	if h, err := f.sel.ForScope(drivers.WithHost(f.ctx, "gone"), z("z1")); err != nil || h.HostID() != "up" {
		t.Errorf("ForScope with the step's host Disconnected: %v %v, want up", h, err)
	}
	for _, id := range []string{"gone", "maint"} {
		if _, err := f.sel.ForHost(f.ctx, id); !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "is not Up") {
			t.Errorf("ForHost(%s): %v, want unavailable", id, err)
		}
	}
	if h, err := f.sel.ForHost(f.ctx, "up"); err != nil || h.HostID() != "up" {
		t.Errorf("ForHost(up): %v %v", h, err)
	}

	// With the only Up host gone too, the error names each host's state.
	f.move("up", meta.HostHeartbeatMissed)
	for name, err := range map[string]error{
		"Select":     func() error { _, err := f.sel.Select(f.ctx, "", z("z1")); return err }(),
		"ForScope":   func() error { _, err := f.sel.ForScope(f.ctx, z("z1")); return err }(),
		"AllInScope": func() error { _, err := f.sel.AllInScope(f.ctx, z("z1")); return err }(),
	} {
		if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "no Up agent in scope z1 (gone is DISCONNECTED, maint is PREPARE_FOR_MAINTENANCE, up is DISCONNECTED)") {
			t.Errorf("%s with no Up host: %v", name, err)
		}
	}
	// A heartbeat brings a Disconnected host back into selection.
	f.add("gone", "z1", "c1", 0, nil)
	if c := f.pick(f.ctx, "", z("z1")); c.HostID != "gone" {
		t.Errorf("after gone came back: %s", c.HostID)
	}
}

// The errors when no host qualifies say what is missing.
func TestSelectErrors(t *testing.T) {
	f := newFleet(t)
	f.add("a", "z1", "c1", 0, nil)
	f.add("b", "z2", "c1", 0, nil)

	_, err := f.sel.Select(f.ctx, "", z("z3"))
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "no agent is registered in scope z3; start `stowage agent --zone z3`") {
		t.Errorf("empty zone: %v", err)
	}
	_, err = f.sel.Select(f.ctx, "", z("z1"), z("z2"))
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "no Up agent reaches all of z1 and z2") {
		t.Errorf("disjoint scopes: %v", err)
	}
	_, err = f.sel.Select(f.ctx, "", drivers.Scope{Zone: "z1", Cluster: "c1", HostID: "b"})
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "scope z1/c1/b") {
		t.Errorf("host scope naming a host of another zone: %v", err)
	}
	if ok, err := f.sel.InScope(f.ctx, "nope", z("z1")); !errors.Is(err, errdefs.ErrNotFound) || ok {
		t.Errorf("InScope of an unknown host: %v %v", ok, err)
	}
	// InScope is about placement, not liveness: a Disconnected host is in
	// the scope it was placed in.
	f.move("a", meta.HostHeartbeatMissed)
	if ok, err := f.sel.InScope(f.ctx, "a", zc("z1", "c1")); err != nil || !ok {
		t.Errorf("InScope(a, z1/c1): %v %v, want true", ok, err)
	}
	if ok, err := f.sel.InScope(f.ctx, "a", zc("z1", "c2")); err != nil || ok {
		t.Errorf("InScope(a, z1/c2): %v %v, want false", ok, err)
	}
}

// SelectWhere picks among the hosts that meet the step's condition, ahead
// of the preferred one, and names the condition in the reason or the error.
func TestSelectWhere(t *testing.T) {
	f := newFleet(t)
	mount := &stowagev1.HostCapabilities{TemplateCache: &stowagev1.CacheStatus{Mount: "/run/stowage/templates"}}
	f.add("plain", "z1", "c1", 0, nil)
	f.add("mounting", "z1", "c1", 4, mount)
	f.add("mounting-iscsi", "z1", "c1", 7, &stowagev1.HostCapabilities{IscsiUserspace: true,
		TemplateCache: &stowagev1.CacheStatus{Mount: "/run/stowage/templates"}})
	need := Need{What: "has a template mount", OK: func(h *stowagev1.Host) bool { return h.GetCapabilities().GetTemplateCache().GetMount() != "" }}

	c, err := f.sel.SelectWhere(f.ctx, "plain", need, z("z1"))
	if err != nil || c.HostID != "mounting" || !strings.HasSuffix(c.Reason, "; has a template mount") {
		t.Errorf("SelectWhere: %+v %v, want mounting with the need in the reason", c, err)
	}
	if c.Host.GetCapabilities().GetTemplateCache().GetMount() == "" {
		t.Errorf("the choice's record lacks the capabilities the need looked at: %v", c.Host)
	}
	c, err = f.sel.SelectWhere(drivers.WithNeeds(f.ctx, drivers.CapISCSIUserspace), "", need, z("z1"))
	if err != nil || c.HostID != "mounting-iscsi" {
		t.Errorf("SelectWhere with needs: %+v %v, want mounting-iscsi", c, err)
	}

	never := Need{What: "shows template t1 in its template mount", OK: func(*stowagev1.Host) bool { return false }}
	_, err = f.sel.SelectWhere(f.ctx, "", never, z("z1"))
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "none of the 3 Up agents in scope z1 shows template t1") {
		t.Errorf("no host meets the need: %v", err)
	}
	_, err = f.sel.SelectWhere(drivers.WithNeeds(f.ctx, drivers.CapISCSIKernel), "", never, z("z1"))
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "shows template t1 in its template mount and has iscsi_initiator") {
		t.Errorf("neither the need nor the capability: %v", err)
	}
}

// The kernel initiator is its own capability: a host with only the
// userspace one does not serve a step that logs in with the kernel's.
func TestKernelInitiatorNeed(t *testing.T) {
	f := newFleet(t)
	f.add("userspace", "z1", "c1", 0, &stowagev1.HostCapabilities{IscsiUserspace: true})
	f.add("kernel", "z1", "c1", 3, &stowagev1.HostCapabilities{IscsiInitiator: true})
	kernel := drivers.WithNeeds(f.ctx, drivers.CapISCSIKernel)
	if c := f.pick(kernel, "userspace", z("z1")); c.HostID != "kernel" {
		t.Errorf("kernel need: %s, want kernel", c.HostID)
	}
	both := drivers.WithNeeds(kernel, drivers.CapISCSIUserspace)
	_, err := f.sel.Select(both, "", z("z1"))
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "none of the 2 Up agents in scope z1 has iscsi_initiator and iscsi_userspace") {
		t.Errorf("both needs, no host has both: %v", err)
	}
	if _, err := f.sel.AllInScope(both, z("z1")); !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "none of the 2 Up agents") {
		t.Errorf("AllInScope, no host has both: %v", err)
	}
}

// The endpoint of a picked host carries the client made for that host (the
// one whose TLS check names it), never another host's.
func TestEndpointUsesThePickedHostsClient(t *testing.T) {
	f := newFleet(t)
	f.add("a", "z1", "c1", 0, nil)
	f.add("b", "z1", "c1", 3, nil)
	var asked []string
	f.sel = New(f.hs, func(id string) *http.Client { asked = append(asked, id); return &http.Client{} })
	if c := f.pick(f.ctx, "b", z("z1")); c.HostID != "b" {
		t.Fatalf("picked %s", c.HostID)
	}
	if h, err := f.sel.ForHost(f.ctx, "a"); err != nil || h.HostID() != "a" {
		t.Fatalf("ForHost(a): %v %v", h, err)
	}
	if got := strings.Join(asked, ","); got != "b,a" {
		t.Errorf("clients made for %s, want b then a", got)
	}
}

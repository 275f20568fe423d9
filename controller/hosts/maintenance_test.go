package hosts

import (
	"context"
	"testing"
	"time"

	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func beat(t *testing.T, s *Service, inFlight int32) *stowagev1.HeartbeatResponse {
	t.Helper()
	resp, err := s.Heartbeat(context.Background(), &stowagev1.HeartbeatRequest{HostId: "h1", SessionId: "s1", InFlightTasks: inFlight,
		Capabilities: &stowagev1.HostCapabilities{QemuImgVersion: "7.2.22"}})
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func upIDs(t *testing.T, s *Service) []string {
	t.Helper()
	hs, err := s.UpHosts(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, h := range hs {
		ids = append(ids, h.GetId())
	}
	return ids
}

// A draining host leaves the Up hosts at once, stays PrepareForMaintenance
// while its heartbeats report running tasks (and within the grace after
// the request), reaches Maintenance on the first idle beat after that,
// stays there across a restart of its agent, and comes back Up through
// Connecting when maintenance is cancelled.
func TestHostMaintenanceDrain(t *testing.T) {
	ctx := context.Background()
	s, c := newTestService(t)
	register(t, s, "s1")
	if ids := upIDs(t, s); len(ids) != 1 {
		t.Fatalf("Up hosts %v, want h1", ids)
	}
	if _, err := s.CancelMaintenance(ctx, "h1"); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("cancel on an Up host: err %v, want failed precondition", err)
	}
	h, err := s.EnableMaintenance(ctx, "node1") // by hostname
	if err != nil {
		t.Fatal(err)
	}
	if h.GetState() != stowagev1.HostState_HOST_STATE_PREPARE_FOR_MAINTENANCE || h.GetMaintenanceRequestedAt() == nil {
		t.Fatalf("after the request: %s, asked at %v", h.GetState(), h.GetMaintenanceRequestedAt())
	}
	if ids := upIDs(t, s); len(ids) != 0 {
		t.Errorf("a draining host is still offered for new tasks: %v", ids)
	}
	if _, err := s.EnableMaintenance(ctx, "h1"); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("second request: err %v, want failed precondition", err)
	}
	c.advance(time.Second)
	if r := beat(t, s, 0); r.GetState() != stowagev1.HostState_HOST_STATE_PREPARE_FOR_MAINTENANCE {
		t.Errorf("idle beat within the grace: %s, want PrepareForMaintenance", r.GetState())
	}
	c.advance(2 * time.Second)
	if r := beat(t, s, 2); r.GetState() != stowagev1.HostState_HOST_STATE_PREPARE_FOR_MAINTENANCE {
		t.Errorf("beat with 2 running tasks: %s, want PrepareForMaintenance", r.GetState())
	}
	if h, _ := s.Get(ctx, "h1"); h.GetStateReason() != "draining for maintenance: 2 task(s) running" {
		t.Errorf("reason %q", h.GetStateReason())
	}
	c.advance(time.Second)
	if r := beat(t, s, 0); r.GetState() != stowagev1.HostState_HOST_STATE_MAINTENANCE {
		t.Errorf("idle beat after the grace: %s, want Maintenance", r.GetState())
	}
	// Heartbeats keep coming; an agent restart does not bring it back.
	c.advance(time.Second)
	beat(t, s, 0)
	register(t, s, "s1")
	if st := state(t, s); st != stowagev1.HostState_HOST_STATE_MAINTENANCE {
		t.Errorf("after re-registration: %s, want Maintenance", st)
	}
	// The monitor does not mark it Disconnected either.
	c.advance(time.Minute)
	s.checkLiveness(ctx)
	if st := state(t, s); st != stowagev1.HostState_HOST_STATE_MAINTENANCE {
		t.Errorf("after a minute of silence: %s, want Maintenance", st)
	}
	h, err = s.CancelMaintenance(ctx, "h1")
	if err != nil || h.GetState() != stowagev1.HostState_HOST_STATE_CONNECTING {
		t.Fatalf("cancel: %v, %s", err, h.GetState())
	}
	if r := beat(t, s, 0); r.GetState() != stowagev1.HostState_HOST_STATE_UP {
		t.Errorf("beat after cancel: %s, want Up", r.GetState())
	}
	if ids := upIDs(t, s); len(ids) != 1 {
		t.Errorf("Up hosts after cancel: %v", ids)
	}
}

// A Disconnected host goes to Maintenance at once: nothing can drain.
func TestHostMaintenanceDisconnected(t *testing.T) {
	ctx := context.Background()
	s, c := newTestService(t)
	register(t, s, "s1")
	c.advance(10 * time.Second)
	s.checkLiveness(ctx)
	if st := state(t, s); st != stowagev1.HostState_HOST_STATE_DISCONNECTED {
		t.Fatalf("state %s, want Disconnected", st)
	}
	h, err := s.EnableMaintenance(ctx, "h1")
	if err != nil || h.GetState() != stowagev1.HostState_HOST_STATE_MAINTENANCE {
		t.Fatalf("maintenance of a disconnected host: %v, %s", err, h.GetState())
	}
}

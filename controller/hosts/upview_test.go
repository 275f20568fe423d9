package hosts

import (
	"context"
	"fmt"
	"testing"
	"time"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// UpHosts serves a view of the Up hosts that the Service's own writes
// (registration, new capabilities, a host found disconnected) replace at
// once, ordered by the in-flight counts of the latest heartbeats.
func TestUpHostsView(t *testing.T) {
	s, c := newTestService(t)
	s.cfg.UpHostsMaxAge = time.Hour // only the Service's writes renew it here
	ctx := context.Background()
	ids := func() string {
		t.Helper()
		hs, err := s.UpHosts(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, h := range hs {
			out = append(out, h.GetId())
		}
		return fmt.Sprint(out)
	}
	join := func(id string) {
		t.Helper()
		if _, err := s.Register(ctx, &stowagev1.RegisterRequest{HostId: id, AgentUrl: "http://127.0.0.1:1", SessionId: "s-" + id, Zone: "z1"}); err != nil {
			t.Fatal(err)
		}
	}
	beat := func(id string, inFlight int32, caps *stowagev1.HostCapabilities) {
		t.Helper()
		if _, err := s.Heartbeat(ctx, &stowagev1.HeartbeatRequest{HostId: id, SessionId: "s-" + id, InFlightTasks: inFlight, Capabilities: caps}); err != nil {
			t.Fatal(err)
		}
	}
	join("a")
	if got := ids(); got != "[a]" {
		t.Fatalf("after a joined: %s", got)
	}
	join("b")
	if got := ids(); got != "[a b]" {
		t.Fatalf("after b joined: %s", got)
	}
	beat("a", 3, nil)
	beat("b", 0, nil)
	if got := ids(); got != "[b a]" {
		t.Errorf("a has 3 tasks in flight, b none: %s, want b first", got)
	}
	caps := &stowagev1.HostCapabilities{Fuse: true}
	beat("b", 0, caps)
	if hs, _ := s.UpHosts(ctx); !hs[0].GetCapabilities().GetFuse() {
		t.Errorf("b's new capabilities are not in the view: %v", hs[0].GetCapabilities())
	}
	// a goes silent; the monitor marks it Disconnected.
	c.advance(3 * time.Second)
	beat("b", 0, caps)
	c.advance(2 * time.Second)
	s.checkLiveness(ctx)
	if got := ids(); got != "[b]" {
		t.Errorf("after a timed out: %s, want [b]", got)
	}
}

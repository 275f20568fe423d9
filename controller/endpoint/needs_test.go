package endpoint

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// registry is a host registry of fixed hosts (all Up), least busy first.
type registry []*stowagev1.Host

func (r registry) UpHosts(context.Context) ([]*stowagev1.Host, error) { return r, nil }
func (r registry) List(context.Context, string, stowagev1.HostState, string, int) ([]*stowagev1.Host, error) {
	return r, nil
}
func (r registry) Get(_ context.Context, id string) (*stowagev1.Host, error) {
	for _, h := range r {
		if h.GetId() == id {
			return h, nil
		}
	}
	return nil, fmt.Errorf("host %s: %w", id, errdefs.ErrNotFound)
}

func host(id string, userspace bool) *stowagev1.Host {
	return &stowagev1.Host{Id: id, Zone: "z1", Cluster: "c1", State: stowagev1.HostState_HOST_STATE_UP, AgentUrl: "https://127.0.0.1:1",
		Capabilities: &stowagev1.HostCapabilities{IscsiUserspace: userspace}}
}

func TestSelectionHonoursNeeds(t *testing.T) {
	sel := New(registry{host("plain", false), host("iscsi", true)}, nil)
	sc := drivers.Scope{Zone: "z1"}
	ctx := context.Background()
	need := drivers.WithNeeds(ctx, drivers.CapISCSIUserspace)

	if h, err := sel.ForScope(ctx, sc); err != nil || h.HostID() != "plain" {
		t.Fatalf("without needs: %v %v, want the least busy", h, err)
	}
	if h, err := sel.ForScope(need, sc); err != nil || h.HostID() != "iscsi" {
		t.Fatalf("with needs: %v %v, want the host with the initiator", h, err)
	}
	all, err := sel.AllInScope(need, sc)
	if err != nil || len(all) != 1 || all[0].HostID() != "iscsi" {
		t.Fatalf("AllInScope with needs: %v %v", all, err)
	}
	if c, err := sel.Select(need, "plain", sc); err != nil || c.HostID != "iscsi" {
		t.Fatalf("Select prefers a host lacking a need: %v %v", c, err)
	}

	none := New(registry{host("plain", false)}, nil)
	_, err = none.ForScope(need, sc)
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "iscsi_userspace") {
		t.Fatalf("no host with the need: %v", err)
	}
	if _, err := none.Select(need, "", sc); err == nil || !strings.Contains(err.Error(), "iscsi_userspace") {
		t.Fatalf("Select with no host with the need: %v", err)
	}
}

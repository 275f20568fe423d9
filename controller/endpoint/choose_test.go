package endpoint

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// hostsIn is a host registry of fixed records in any state: UpHosts keeps
// the Up ones in the order given (least busy first), as the real registry
// (controller/hosts) answers.
type hostsIn []*stowagev1.Host

func (r hostsIn) UpHosts(context.Context) ([]*stowagev1.Host, error) {
	var up []*stowagev1.Host
	for _, h := range r {
		if h.GetState() == stowagev1.HostState_HOST_STATE_UP {
			up = append(up, h)
		}
	}
	return up, nil
}

func (r hostsIn) List(context.Context, string, stowagev1.HostState) ([]*stowagev1.Host, error) {
	return r, nil
}

func at(id, zone, cluster string, state stowagev1.HostState, busy int32) *stowagev1.Host {
	return &stowagev1.Host{Id: id, Zone: zone, Cluster: cluster, State: state, InFlightTasks: busy, AgentUrl: "https://127.0.0.1:1"}
}

const (
	up   = stowagev1.HostState_HOST_STATE_UP
	down = stowagev1.HostState_HOST_STATE_DISCONNECTED
)

// Select keeps to the hosts in every scope, prefers the host that holds
// the data, else the least busy, and says why.
func TestSelectScopesAndPreference(t *testing.T) {
	ctx := context.Background()
	sel := New(hostsIn{
		at("a", "z1", "c1", up, 0), at("b", "z1", "c2", up, 3), at("c", "z2", "c9", up, 0), at("d", "z1", "c1", down, 0),
	}, nil)
	for _, tc := range []struct {
		name    string
		prefer  string
		scopes  []drivers.Scope
		want    string
		because string
	}{
		{"zone: least busy", "", []drivers.Scope{{Zone: "z1"}}, "a", "least busy of 2 Up hosts"},
		{"zone: the holder", "b", []drivers.Scope{{Zone: "z1"}}, "b", "already holds the data"},
		{"a holder out of scope is not taken", "c", []drivers.Scope{{Zone: "z1"}}, "a", "least busy"},
		{"cluster", "", []drivers.Scope{{Zone: "z1", Cluster: "c2"}}, "b", "least busy of 1"},
		{"host", "", []drivers.Scope{{Zone: "z2", HostID: "c"}}, "c", "least busy of 1"},
		{"two stores: the hosts reaching both", "", []drivers.Scope{{Zone: "z1"}, {Zone: "z1", Cluster: "c2"}}, "b", "least busy of 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := sel.Select(ctx, tc.prefer, tc.scopes...)
			if err != nil {
				t.Fatal(err)
			}
			if c.HostID != tc.want || c.Endpoint.HostID() != tc.want || c.Host.GetId() != tc.want {
				t.Errorf("picked %s (endpoint %s), want %s", c.HostID, c.Endpoint.HostID(), tc.want)
			}
			if !strings.Contains(c.Reason, tc.because) || !strings.HasPrefix(c.Reason, "host "+tc.want+": ") {
				t.Errorf("reason %q, want it to name %s and say %q", c.Reason, tc.want, tc.because)
			}
		})
	}
}

// When no host qualifies, the error is unavailable and says what an
// operator would look at: nobody registered, who is there and in what
// state, the scopes no host spans, the condition no host meets.
func TestSelectExplainsNone(t *testing.T) {
	ctx := context.Background()
	sel := New(hostsIn{at("a", "z1", "c1", up, 0), at("d", "z1", "c2", down, 0), at("e", "z1", "c2", stowagev1.HostState_HOST_STATE_MAINTENANCE, 0)}, nil)
	for _, tc := range []struct {
		name string
		run  func() error
		want []string
	}{
		{"nobody registered", func() error { _, err := sel.Select(ctx, "", drivers.Scope{Zone: "z9"}); return err },
			[]string{"no agent is registered in scope z9", "stowage agent --zone z9"}},
		{"nobody Up", func() error { _, err := sel.Select(ctx, "", drivers.Scope{Zone: "z1", Cluster: "c2"}); return err },
			[]string{"no Up agent in scope z1/c2", "d is DISCONNECTED", "e is MAINTENANCE"}},
		{"no host spans both", func() error {
			_, err := sel.Select(ctx, "", drivers.Scope{Zone: "z1", Cluster: "c1"}, drivers.Scope{Zone: "z1", Cluster: "c2"})
			return err
		}, []string{"no Up agent reaches all of z1/c1 and z1/c2"}},
		{"a condition no host meets", func() error {
			_, err := sel.SelectWhere(ctx, "", Need{What: "shows template t1 in its template mount", OK: func(*stowagev1.Host) bool { return false }}, drivers.Scope{Zone: "z1"})
			return err
		}, []string{"none of the 1 Up agents in scope z1 shows template t1"}},
		{"ForScope", func() error { _, err := sel.ForScope(ctx, drivers.Scope{Zone: "z1", Cluster: "c2"}); return err },
			[]string{"no Up agent in scope z1/c2"}},
		{"ForHost of a host not Up", func() error { _, err := sel.ForHost(ctx, "d"); return err },
			[]string{"host d is not Up", "stowage host get d"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run()
			if !errors.Is(err, errdefs.ErrUnavailable) {
				t.Fatalf("%v, want unavailable", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("%q does not say %q", err, w)
				}
			}
		})
	}
}

// ForScope takes the step's planned host (drivers.WithHost) when it is Up
// and in scope, else the least busy; InScope answers for any state and
// knows no unknown host.
func TestForScopeAndInScope(t *testing.T) {
	ctx := context.Background()
	sel := New(hostsIn{at("a", "z1", "c1", up, 0), at("b", "z1", "c1", up, 5), at("d", "z1", "c1", down, 0)}, nil)
	sc := drivers.Scope{Zone: "z1"}
	for planned, want := range map[string]string{"b": "b", "d": "a", "": "a", "zz": "a"} {
		h, err := sel.ForScope(drivers.WithHost(ctx, planned), sc)
		if err != nil || h.HostID() != want {
			t.Errorf("planned %q: %v %v, want %s", planned, h, err, want)
		}
	}
	if all, err := sel.AllInScope(ctx, sc); err != nil || len(all) != 2 || all[0].HostID() != "a" || all[1].HostID() != "b" {
		t.Errorf("AllInScope: %v %v, want a then b", all, err)
	}
	if in, err := sel.InScope(ctx, "d", sc); err != nil || !in {
		t.Errorf("InScope(d): %v %v, want true (its state does not matter)", in, err)
	}
	if in, err := sel.InScope(ctx, "a", drivers.Scope{Zone: "z2"}); err != nil || in {
		t.Errorf("InScope(a, z2): %v %v, want false", in, err)
	}
	if _, err := sel.InScope(ctx, "zz", sc); !errdefs.IsNotFound(err) {
		t.Errorf("InScope of an unknown host: %v, want not found", err)
	}
}

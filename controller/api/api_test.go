package api

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/hosts"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/rpclimit"
)

// edge is the API served over HTTP in front of the real store and host
// services on a real metadata store (Badger in a temporary directory).
type edge struct {
	srv    *httptest.Server
	stores stowagev1connect.StoreServiceClient
	hosts  stowagev1connect.HostServiceClient
	agents stowagev1connect.AgentControlServiceClient
	health error
}

func newEdge(t *testing.T, lim rpclimit.Limits) *edge {
	t.Helper()
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	log := slog.New(slog.DiscardHandler)
	e := &edge{}
	h := NewHandler(Services{
		Stores: datastore.New(db, drivers.NewRegistry(), log),
		Hosts:  hosts.New(db, nil, hosts.Config{}, log),
		Health: func(context.Context) error { return e.health },
	}, prometheus.NewRegistry(), lim)
	e.srv = httptest.NewServer(h)
	t.Cleanup(e.srv.Close)
	e.stores = stowagev1connect.NewStoreServiceClient(e.srv.Client(), e.srv.URL)
	e.hosts = stowagev1connect.NewHostServiceClient(e.srv.Client(), e.srv.URL)
	e.agents = stowagev1connect.NewAgentControlServiceClient(e.srv.Client(), e.srv.URL)
	return e
}

// The domain's typed errors reach callers as Connect codes, mapped once at
// the edge, with the domain's message.
func TestErrorsBecomeCodes(t *testing.T) {
	e := newEdge(t, rpclimit.Default())
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		call func() error
		code connect.Code
		says string
	}{
		{"a store that is not there", func() error {
			_, err := e.stores.GetStore(ctx, connect.NewRequest(&stowagev1.GetStoreRequest{Id: "nope"}))
			return err
		}, connect.CodeNotFound, "nope"},
		{"a host that is not there", func() error {
			_, err := e.hosts.GetHost(ctx, connect.NewRequest(&stowagev1.GetHostRequest{Id: "h9"}))
			return err
		}, connect.CodeNotFound, "h9"},
		{"a store name that cannot be one", func() error {
			_, err := e.stores.AddStore(ctx, connect.NewRequest(&stowagev1.AddStoreRequest{Name: "no spaces allowed", Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY, Provider: "filesystem", Url: "file:///srv/p1"}))
			return err
		}, connect.CodeInvalidArgument, "no spaces allowed"},
		{"a provider nobody registered", func() error {
			_, err := e.stores.AddStore(ctx, connect.NewRequest(&stowagev1.AddStoreRequest{Name: "p1", Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY, Provider: "tape", Url: "tape://x"}))
			return err
		}, connect.CodeInvalidArgument, "tape"},
		{"deleting a store that is not there", func() error {
			_, err := e.stores.DeleteStore(ctx, connect.NewRequest(&stowagev1.DeleteStoreRequest{Id: "nope"}))
			return err
		}, connect.CodeNotFound, "nope"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if got := connect.CodeOf(err); got != tc.code {
				t.Fatalf("%v: code %v, want %v", err, got, tc.code)
			}
			if !strings.Contains(err.Error(), tc.says) {
				t.Errorf("%q does not name %q", err, tc.says)
			}
		})
	}
}

// What the edge answers itself: lists, an agent's registration reaching the
// host list, /healthz following the metadata's health, and a request over
// the size bound refused before any handler.
func TestEdgeServes(t *testing.T) {
	e := newEdge(t, rpclimit.Limits{MaxRequestBytes: 4 << 10})
	ctx := context.Background()
	ls, err := e.stores.ListStores(ctx, connect.NewRequest(&stowagev1.ListStoresRequest{}))
	if err != nil || len(ls.Msg.GetStores()) != 0 {
		t.Fatalf("list stores of an empty cloud: %v %v", ls, err)
	}
	if _, err := e.agents.Register(ctx, connect.NewRequest(&stowagev1.RegisterRequest{HostId: "h1", Zone: "z1", AgentUrl: "https://127.0.0.1:1", SessionId: "s1"})); err != nil {
		t.Fatalf("register: %v", err)
	}
	hl, err := e.hosts.ListHosts(ctx, connect.NewRequest(&stowagev1.ListHostsRequest{}))
	if err != nil || len(hl.Msg.GetHosts()) != 1 || hl.Msg.GetHosts()[0].GetId() != "h1" || hl.Msg.GetHosts()[0].GetZone() != "z1" {
		t.Fatalf("hosts after a registration: %v %v", hl, err)
	}

	get := func(path string) (int, string) {
		resp, err := e.srv.Client().Get(e.srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := get("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: %d", code)
	}
	e.health = errors.Join(errors.New("metadata unreadable"), errdefs.ErrUnavailable)
	if code, body := get("/healthz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "metadata unreadable") {
		t.Errorf("/healthz with the metadata unreadable: %d %q", code, body)
	}
	if code, body := get("/metrics"); code != http.StatusOK || !strings.Contains(body, `stowage_rpc_requests_total{code="ok",procedure="/stowage.v1.AgentControlService/Register"} 1`) {
		t.Errorf("/metrics: %d, without the registration counted:\n%.2000s", code, body)
	}

	_, err = e.stores.AddStore(ctx, connect.NewRequest(&stowagev1.AddStoreRequest{Name: "p1", Details: map[string]string{"pad": strings.Repeat("x", 8<<10)}}))
	if connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Errorf("a request over the bound: %v, want resource_exhausted", err)
	}
}

// Package api is the controller's Connect edge: thin handlers that turn
// protobuf requests into calls on the domain services and back. Errors are
// mapped from their errdefs class to a Connect code in exactly one place, the
// errconnect interceptor installed on every handler. The same port serves
// Connect (curl with JSON works), gRPC and gRPC-Web, plus /metrics and /healthz,
// gRPC server reflection and the gRPC health protocol (grpcstd.go).
package api

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/stowage/stowage/controller/enrol"
	"github.com/stowage/stowage/controller/paging"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/errdefs/errconnect"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/rpclimit"
	"github.com/stowage/stowage/trust"
)

// StoreService is what the store handlers need from the domain.
type StoreService interface {
	Add(ctx context.Context, req *stowagev1.AddStoreRequest) (*stowagev1.DataStore, error)
	Get(ctx context.Context, idOrName string) (*stowagev1.DataStore, error)
	// List returns up to limit stores after the id after (paging).
	List(ctx context.Context, role stowagev1.StoreRole, zone, after string, limit int) ([]*stowagev1.DataStore, error)
	EnableMaintenance(ctx context.Context, idOrName string) (*stowagev1.DataStore, error)
	CancelMaintenance(ctx context.Context, idOrName string) (*stowagev1.DataStore, error)
	Delete(ctx context.Context, idOrName string) error
	Disable(ctx context.Context, idOrName string) (*stowagev1.DataStore, error)
	Enable(ctx context.Context, idOrName string) (*stowagev1.DataStore, error)
	Update(ctx context.Context, req *stowagev1.UpdateStoreRequest) (*stowagev1.DataStore, error)
}

// HostService is what the host and agent-control handlers need.
type HostService interface {
	// List returns up to limit hosts after the id after (paging).
	List(ctx context.Context, zone string, state stowagev1.HostState, after string, limit int) ([]*stowagev1.Host, error)
	Get(ctx context.Context, idOrName string) (*stowagev1.Host, error)
	Register(ctx context.Context, req *stowagev1.RegisterRequest) (*stowagev1.RegisterResponse, error)
	Heartbeat(ctx context.Context, req *stowagev1.HeartbeatRequest) (*stowagev1.HeartbeatResponse, error)
	EnableMaintenance(ctx context.Context, idOrName string) (*stowagev1.Host, error)
	CancelMaintenance(ctx context.Context, idOrName string) (*stowagev1.Host, error)
}

// EnrolService admits agents (join tokens, certificates).
type EnrolService interface {
	CreateToken(ctx context.Context, ttl time.Duration, hostID string) (*stowagev1.CreateJoinTokenResponse, error)
	Join(ctx context.Context, req *stowagev1.JoinRequest, peer string) (*stowagev1.JoinResponse, error)
	Renew(ctx context.Context, req *stowagev1.RenewRequest, peer trust.Identity) (*stowagev1.RenewResponse, error)
}

// Services are the domain services the API exposes.
type Services struct {
	Stores StoreService
	Hosts  HostService
	// Enrol admits agents; with it, Register, Heartbeat and Renew are
	// accepted only from the host the caller's certificate names (the
	// handler must then be served behind trust.WithPeer on a TLS
	// listener). Without it (tests of the API alone) agents are not
	// authenticated and joins are refused.
	Enrol     EnrolService
	Images    ImageService
	Volumes   VolumeService
	Snapshots SnapshotService
	Jobs      JobService
	// Tokens, when set, serves TokenService (API tokens; admin only by
	// apiauth's role table).
	Tokens TokenService
	// Metadata, when set, serves MetadataService (backups of the
	// metadata; admin only by apiauth's role table).
	Metadata MetadataService
	// Auth, when set, authenticates and authorizes every Connect call
	// (apiauth.Guard). It runs inside the metrics and error-mapping
	// interceptors, so refusals are counted and its errdefs classes become
	// Connect codes there, and before every handler.
	Auth connect.Interceptor
	// MetricsAuth, when set, wraps /metrics (e.g. an apiauth.Guard's
	// RequireRole). /healthz stays open.
	MetricsAuth func(http.Handler) http.Handler
	// Leader, when set, refuses writes while this controller does not lead
	// (several controllers on one etcd store). It runs after Auth, so
	// only authenticated callers learn who leads.
	Leader *LeaderGate
	// Health returns nil when the controller can serve (metadata readable).
	Health func(ctx context.Context) error
	// UI, when set, is the web dashboard, served under /ui/ (its files are
	// public; the data it shows comes through the API with the user's
	// token).
	UI http.Handler
	// Tracing, when set, runs first on every call (a span per RPC,
	// oteltrace.Interceptor), so refusals are traced too.
	Tracing connect.Interceptor
}

// TokenService is what the token handlers need (apiauth.Tokens).
type TokenService interface {
	Create(ctx context.Context, req *stowagev1.CreateTokenRequest) (*stowagev1.CreateTokenResponse, error)
	List(ctx context.Context) ([]*stowagev1.Token, error)
	Revoke(ctx context.Context, id string) (*stowagev1.Token, error)
}

// NewHandler returns the controller's HTTP handler: every Connect service,
// gRPC reflection and health over them, /metrics from reg and /healthz. Every request is bounded by lim (its
// message size, decompressed, and the time and size of its body).
func NewHandler(s Services, reg *prometheus.Registry, lim rpclimit.Limits) http.Handler {
	metrics := newRPCMetrics(reg)
	var interceptors []connect.Interceptor
	if s.Tracing != nil {
		interceptors = append(interceptors, s.Tracing)
	}
	interceptors = append(interceptors, metrics, errconnect.Interceptor())
	if s.Auth != nil {
		interceptors = append(interceptors, s.Auth)
	}
	if s.Leader != nil {
		interceptors = append(interceptors, s.Leader)
	}
	// Last: only authenticated callers learn what a request lacks.
	validator, err := newRequestValidator()
	if err != nil {
		panic(err) // no rule set to compile yet: a build-time fault, caught by every test
	}
	interceptors = append(interceptors, validator)
	opts := connect.WithHandlerOptions(lim.HandlerOptions(), connect.WithInterceptors(interceptors...))
	mux := http.NewServeMux()
	var services []string // for reflection and health
	served := map[string]http.Handler{}
	handle := func(path string, h http.Handler) {
		mux.Handle(path, h)
		services = append(services, strings.Trim(path, "/"))
		served[path] = h
	}
	handle(stowagev1connect.NewStoreServiceHandler(&storeHandler{s.Stores}, opts))
	handle(stowagev1connect.NewHostServiceHandler(&hostHandler{s.Hosts, s.Enrol}, opts))
	handle(stowagev1connect.NewAgentControlServiceHandler(&agentControlHandler{s.Hosts, s.Enrol}, opts))
	if s.Images != nil {
		handle(stowagev1connect.NewImageServiceHandler(&imageHandler{s.Images}, opts))
		handle(stowagev1connect.NewVolumeServiceHandler(&volumeHandler{s.Volumes}, opts))
		handle(stowagev1connect.NewSnapshotServiceHandler(&snapshotHandler{s.Snapshots}, opts))
		handle(stowagev1connect.NewJobServiceHandler(&jobHandler{s.Jobs}, opts))
	}
	if s.Tokens != nil {
		handle(stowagev1connect.NewTokenServiceHandler(&tokenHandler{s.Tokens}, opts))
	}
	if s.Metadata != nil {
		handle(stowagev1connect.NewMetadataServiceHandler(&metadataHandler{s.Metadata}, opts))
	}
	grpcStandard(mux, services, s.Health, opts)
	rest, err := restHandler(served)
	if err != nil {
		panic(err) // the rules are fixed at build time; TestREST* catch a bad one
	}
	mux.Handle(RESTPrefix, rest)
	var metricsHandler http.Handler = promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg})
	if s.MetricsAuth != nil {
		metricsHandler = s.MetricsAuth(metricsHandler)
	}
	mux.Handle("/metrics", metricsHandler)
	if s.UI != nil {
		mux.Handle("/ui/", s.UI)
		mux.Handle("/ui", s.UI)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if s.Health != nil {
			if err := s.Health(ctx); err != nil {
				http.Error(w, "unhealthy: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		switch {
		case s.Leader == nil:
			fmt.Fprintln(w, "ok")
		case s.Leader.Leading():
			fmt.Fprintln(w, "ok leader")
		default:
			// A follower serves reads: healthy, and says so for probes that
			// route writes.
			fmt.Fprintln(w, "ok follower")
		}
	})
	return lim.Wrap(trust.WithPeer(mux))
}

// Protocols is what the controller's http.Server speaks: HTTP/1.1 for
// Connect and gRPC-Web, HTTP/2 for gRPC (over TLS).
func Protocols() *http.Protocols {
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetHTTP2(true)
	return &p
}

type storeHandler struct{ svc StoreService }

var _ stowagev1connect.StoreServiceHandler = (*storeHandler)(nil)

func (h *storeHandler) AddStore(ctx context.Context, req *connect.Request[stowagev1.AddStoreRequest]) (*connect.Response[stowagev1.AddStoreResponse], error) {
	s, err := h.svc.Add(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(redactReply(&stowagev1.AddStoreResponse{Store: s})), nil
}

func (h *storeHandler) GetStore(ctx context.Context, req *connect.Request[stowagev1.GetStoreRequest]) (*connect.Response[stowagev1.GetStoreResponse], error) {
	s, err := h.svc.Get(ctx, req.Msg.GetId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(redactReply(&stowagev1.GetStoreResponse{Store: s})), nil
}

func (h *storeHandler) ListStores(ctx context.Context, req *connect.Request[stowagev1.ListStoresRequest]) (*connect.Response[stowagev1.ListStoresResponse], error) {
	p, err := paging.Parse(req.Msg)
	if err != nil {
		return nil, err
	}
	ss, err := h.svc.List(ctx, req.Msg.GetRole(), req.Msg.GetZone(), p.After, p.Limit())
	if err != nil {
		return nil, err
	}
	ss, next := paging.Cut(p, ss, (*stowagev1.DataStore).GetId)
	return connect.NewResponse(redactReply(&stowagev1.ListStoresResponse{Stores: ss, NextPageToken: next})), nil
}

func (h *storeHandler) EnableMaintenance(ctx context.Context, req *connect.Request[stowagev1.EnableMaintenanceRequest]) (*connect.Response[stowagev1.EnableMaintenanceResponse], error) {
	s, err := h.svc.EnableMaintenance(ctx, req.Msg.GetId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(redactReply(&stowagev1.EnableMaintenanceResponse{Store: s})), nil
}

func (h *storeHandler) CancelMaintenance(ctx context.Context, req *connect.Request[stowagev1.CancelMaintenanceRequest]) (*connect.Response[stowagev1.CancelMaintenanceResponse], error) {
	s, err := h.svc.CancelMaintenance(ctx, req.Msg.GetId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(redactReply(&stowagev1.CancelMaintenanceResponse{Store: s})), nil
}

func (h *storeHandler) DeleteStore(ctx context.Context, req *connect.Request[stowagev1.DeleteStoreRequest]) (*connect.Response[stowagev1.DeleteStoreResponse], error) {
	if err := h.svc.Delete(ctx, req.Msg.GetId()); err != nil {
		return nil, err
	}
	return connect.NewResponse(&stowagev1.DeleteStoreResponse{}), nil
}

func (h *storeHandler) DisableStore(ctx context.Context, req *connect.Request[stowagev1.DisableStoreRequest]) (*connect.Response[stowagev1.DisableStoreResponse], error) {
	s, err := h.svc.Disable(ctx, req.Msg.GetId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(redactReply(&stowagev1.DisableStoreResponse{Store: s})), nil
}

func (h *storeHandler) EnableStore(ctx context.Context, req *connect.Request[stowagev1.EnableStoreRequest]) (*connect.Response[stowagev1.EnableStoreResponse], error) {
	s, err := h.svc.Enable(ctx, req.Msg.GetId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(redactReply(&stowagev1.EnableStoreResponse{Store: s})), nil
}

func (h *storeHandler) UpdateStore(ctx context.Context, req *connect.Request[stowagev1.UpdateStoreRequest]) (*connect.Response[stowagev1.UpdateStoreResponse], error) {
	s, err := h.svc.Update(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(redactReply(&stowagev1.UpdateStoreResponse{Store: s})), nil
}

type hostHandler struct {
	svc   HostService
	enrol EnrolService
}

var _ stowagev1connect.HostServiceHandler = (*hostHandler)(nil)

func (h *hostHandler) ListHosts(ctx context.Context, req *connect.Request[stowagev1.ListHostsRequest]) (*connect.Response[stowagev1.ListHostsResponse], error) {
	p, err := paging.Parse(req.Msg)
	if err != nil {
		return nil, err
	}
	hs, err := h.svc.List(ctx, req.Msg.GetZone(), req.Msg.GetState(), p.After, p.Limit())
	if err != nil {
		return nil, err
	}
	hs, next := paging.Cut(p, hs, (*stowagev1.Host).GetId)
	return connect.NewResponse(redactReply(&stowagev1.ListHostsResponse{Hosts: hs, NextPageToken: next})), nil
}

func (h *hostHandler) GetHost(ctx context.Context, req *connect.Request[stowagev1.GetHostRequest]) (*connect.Response[stowagev1.GetHostResponse], error) {
	host, err := h.svc.Get(ctx, req.Msg.GetId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(redactReply(&stowagev1.GetHostResponse{Host: host})), nil
}

func (h *hostHandler) EnableHostMaintenance(ctx context.Context, req *connect.Request[stowagev1.EnableHostMaintenanceRequest]) (*connect.Response[stowagev1.EnableHostMaintenanceResponse], error) {
	host, err := h.svc.EnableMaintenance(ctx, req.Msg.GetId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(redactReply(&stowagev1.EnableHostMaintenanceResponse{Host: host})), nil
}

func (h *hostHandler) CancelHostMaintenance(ctx context.Context, req *connect.Request[stowagev1.CancelHostMaintenanceRequest]) (*connect.Response[stowagev1.CancelHostMaintenanceResponse], error) {
	host, err := h.svc.CancelMaintenance(ctx, req.Msg.GetId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(redactReply(&stowagev1.CancelHostMaintenanceResponse{Host: host})), nil
}

func (h *hostHandler) CreateJoinToken(ctx context.Context, req *connect.Request[stowagev1.CreateJoinTokenRequest]) (*connect.Response[stowagev1.CreateJoinTokenResponse], error) {
	if h.enrol == nil {
		return nil, fmt.Errorf("this controller enrols no agents: %w", errdefs.ErrNotImplemented)
	}
	resp, err := h.enrol.CreateToken(ctx, time.Duration(req.Msg.GetTtlSeconds())*time.Second, req.Msg.GetHostId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(resp), nil
}

type agentControlHandler struct {
	svc   HostService
	enrol EnrolService
}

var _ stowagev1connect.AgentControlServiceHandler = (*agentControlHandler)(nil)

// authorize checks that a call about host comes from its certificate.
func (h *agentControlHandler) authorize(ctx context.Context, host string) error {
	if h.enrol == nil {
		return nil
	}
	peer, ok := trust.PeerFrom(ctx)
	return enrol.Authorize(host, peer, ok)
}

func (h *agentControlHandler) Join(ctx context.Context, req *connect.Request[stowagev1.JoinRequest]) (*connect.Response[stowagev1.JoinResponse], error) {
	if h.enrol == nil {
		return nil, fmt.Errorf("this controller enrols no agents: %w", errdefs.ErrNotImplemented)
	}
	resp, err := h.enrol.Join(ctx, req.Msg, req.Peer().Addr)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(resp), nil
}

func (h *agentControlHandler) Renew(ctx context.Context, req *connect.Request[stowagev1.RenewRequest]) (*connect.Response[stowagev1.RenewResponse], error) {
	if h.enrol == nil {
		return nil, fmt.Errorf("this controller enrols no agents: %w", errdefs.ErrNotImplemented)
	}
	peer, ok := trust.PeerFrom(ctx)
	if !ok {
		return nil, fmt.Errorf("renew: call with the certificate to renew: %w", errdefs.ErrUnauthenticated)
	}
	resp, err := h.enrol.Renew(ctx, req.Msg, peer)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(resp), nil
}

func (h *agentControlHandler) Register(ctx context.Context, req *connect.Request[stowagev1.RegisterRequest]) (*connect.Response[stowagev1.RegisterResponse], error) {
	if err := h.authorize(ctx, req.Msg.GetHostId()); err != nil {
		return nil, err
	}
	resp, err := h.svc.Register(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(resp), nil
}

func (h *agentControlHandler) Heartbeat(ctx context.Context, req *connect.Request[stowagev1.HeartbeatRequest]) (*connect.Response[stowagev1.HeartbeatResponse], error) {
	if err := h.authorize(ctx, req.Msg.GetHostId()); err != nil {
		return nil, err
	}
	resp, err := h.svc.Heartbeat(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(resp), nil
}

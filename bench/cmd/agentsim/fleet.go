package main

import (
	"context"
	crand "crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sync/errgroup"

	"github.com/stowage/stowage/agent"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/rpclimit"
	"github.com/stowage/stowage/trust"
)

// storeCapacity is what every simulated host reports for every store;
// scaleseed records the same, so steady heartbeats change no store.
const storeCapacity = 100 << 40

// fleet is the simulated hosts.
type fleet struct {
	cfg      config
	log      *slog.Logger
	hosts    []*simHost
	interval time.Duration
	lat      latencies
}

// simHost is one simulated agent.
type simHost struct {
	id, zone, session string
	control           stowagev1connect.AgentControlServiceClient
	srv               *http.Server
	model             *model

	mu     sync.Mutex
	stores []*stowagev1.StoreOnHost
}

func hostID(i int) string { return fmt.Sprintf("sim-%04d", i) }

// start enrols, serves and registers every host, joinWorkers at a time.
func (f *fleet) start(ctx context.Context, api *apiClient) error {
	f.hosts = make([]*simHost, f.cfg.hosts)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(f.cfg.joinWorkers)
	var intervalMs atomic.Int64
	for i := range f.hosts {
		g.Go(func() error {
			h, ms, err := f.startHost(gctx, api, i)
			if err != nil {
				return fmt.Errorf("host %s: %w", hostID(i), err)
			}
			f.hosts[i] = h
			intervalMs.Store(ms)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		f.close()
		return err
	}
	f.interval = time.Duration(intervalMs.Load()) * time.Millisecond
	if f.interval <= 0 {
		f.interval = 10 * time.Second
	}
	return nil
}

func (f *fleet) startHost(ctx context.Context, api *apiClient, i int) (*simHost, int64, error) {
	id := hostID(i)
	tok, err := api.hosts.CreateJoinToken(ctx, connect.NewRequest(&stowagev1.CreateJoinTokenRequest{HostId: id, TtlSeconds: 3600}))
	if err != nil {
		return nil, 0, fmt.Errorf("join token: %w", err)
	}
	// The real agent's enrolment: CA checked, key pair kept under the state dir.
	creds, err := agent.Enrol(ctx, agent.EnrolConfig{ControllerURL: f.cfg.controller, HostID: id, StateDir: filepath.Join(f.cfg.stateDir, id),
		JoinToken: tok.Msg.GetToken(), CAFile: api.caFile, Addresses: []string{"127.0.0.1"}}, f.log)
	if err != nil {
		return nil, 0, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, 0, err
	}
	h := &simHost{id: id, zone: fmt.Sprintf("z%d", i%f.cfg.zones), session: newSession(), model: newModel()}
	mux := http.NewServeMux()
	mux.Handle(stowagev1connect.NewAgentServiceHandler(h.model))
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetHTTP2(true)
	h.srv = rpclimit.NewServer(mux, &protocols)
	tln := tls.NewListener(ln, trust.ServerConfig(creds.KeyPair, creds.Roots(), tls.RequireAnyClientCert, nil))
	go func() { _ = h.srv.Serve(tln) }()
	h.control = stowagev1connect.NewAgentControlServiceClient(creds.HTTPClient(), f.cfg.controller)
	resp, err := h.control.Register(ctx, connect.NewRequest(&stowagev1.RegisterRequest{
		HostId: id, Hostname: id + ".sim", AgentUrl: "https://" + ln.Addr().String(), Zone: h.zone, Cluster: "c1",
		SessionId: h.session, Capabilities: h.caps(),
	}))
	if err != nil {
		_ = h.srv.Close()
		return nil, 0, fmt.Errorf("register: %w", err)
	}
	h.assign(resp.Msg.GetStores())
	return h, int64(resp.Msg.GetHeartbeatIntervalMs()), nil
}

func newSession() string {
	b := make([]byte, 8)
	_, _ = crand.Read(b)
	return fmt.Sprintf("%x", b)
}

// assign remembers the stores the controller assigned: the host reports
// reaching each, with the capacity scaleseed recorded.
func (h *simHost) assign(as []*stowagev1.StoreAssignment) {
	out := make([]*stowagev1.StoreOnHost, 0, len(as))
	for _, a := range as {
		out = append(out, &stowagev1.StoreOnHost{StoreId: a.GetStoreId(), Path: a.GetPath(), FsType: "simfs",
			CapacityBytes: storeCapacity, AvailableBytes: storeCapacity / 2})
	}
	h.mu.Lock()
	h.stores = out
	h.mu.Unlock()
}

func (h *simHost) caps() *stowagev1.HostCapabilities {
	h.mu.Lock()
	defer h.mu.Unlock()
	return &stowagev1.HostCapabilities{QemuImgVersion: "9.2.0 (simulated)", AgentVersion: "agentsim", Kernel: "sim", Stores: h.stores}
}

// beat sends one heartbeat and reports its latency.
func (h *simHost) beat(ctx context.Context) (time.Duration, error) {
	t0 := time.Now()
	resp, err := h.control.Heartbeat(ctx, connect.NewRequest(&stowagev1.HeartbeatRequest{HostId: h.id, SessionId: h.session,
		Capabilities: h.caps(), InFlightTasks: h.model.inFlight()}))
	d := time.Since(t0)
	if err != nil {
		return d, err
	}
	if resp.Msg.GetReregister() {
		return d, errors.New("controller asked for a new registration")
	}
	h.assign(resp.Msg.GetStores())
	return d, nil
}

// heartbeat runs every host's heartbeat loop at the controller's interval
// (first beats spread over one interval) until ctx ends.
func (f *fleet) heartbeat(ctx context.Context) {
	var wg sync.WaitGroup
	for _, h := range f.hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			wait := time.Duration(rand.Int64N(int64(f.interval)))
			for sleep(ctx, wait) {
				d, err := h.beat(ctx)
				if err != nil {
					if ctx.Err() == nil {
						f.log.Warn("heartbeat failed", "host", h.id, "err", err)
						f.lat.fail()
					}
				} else {
					f.lat.add(d)
				}
				wait = f.interval
			}
		}()
	}
	wg.Wait()
}

// saturate sends heartbeats of the hosts back to back from workers
// goroutines for d, and returns how many succeeded, their latencies and
// the seconds it took.
func (f *fleet) saturate(ctx context.Context, workers int, d time.Duration) (int, []time.Duration, float64) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var sat latencies
	var next atomic.Int64
	var wg sync.WaitGroup
	t0 := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				h := f.hosts[int(next.Add(1))%len(f.hosts)]
				lat, err := h.beat(ctx)
				if err == nil {
					sat.add(lat)
				} else if ctx.Err() == nil {
					sat.fail()
				}
			}
		}()
	}
	wg.Wait()
	all := sat.take()
	return len(all), all, time.Since(t0).Seconds()
}

func (f *fleet) close() {
	for _, h := range f.hosts {
		if h != nil {
			_ = h.srv.Close()
		}
	}
}

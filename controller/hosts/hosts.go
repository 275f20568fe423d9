// Package hosts keeps the controller's view of the hypervisor hosts: agents
// register and heartbeat here, and a monitor marks a host Disconnected when
// its heartbeats stop and Up again when they resume (CloudStack's host
// Status). Liveness is tracked in memory and persisted only when something
// changes (state, capabilities, or at most every PersistEvery), so a large
// fleet does not turn heartbeats into a stream of synchronous disk writes.
// After a controller restart every host gets one full timeout to heartbeat
// before it is marked Disconnected.
package hosts

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// StoreWatcher is what the host service needs from the store service: which
// stores a host should reach, and what the host saw of them.
type StoreWatcher interface {
	Assignments(ctx context.Context, host *stowagev1.Host) ([]*stowagev1.StoreAssignment, error)
	ObserveHost(ctx context.Context, host *stowagev1.Host, reports []*stowagev1.StoreOnHost) error
	// HostsChanged says a host joined or moved to another zone or
	// cluster: the stores' host sets are re-applied (without blocking).
	HostsChanged()
}

// MountSpecs is what the host service needs from the template mount
// planner (controller/image.Mounts): the desired content of a host's mount.
type MountSpecs interface {
	Spec(hostID string) *stowagev1.TemplateCacheSpec
}

// Config tunes liveness.
type Config struct {
	// HeartbeatInterval is what agents are told to use.
	HeartbeatInterval time.Duration
	// Timeout is how long without a heartbeat before a host is Disconnected.
	Timeout time.Duration
	// PersistEvery bounds how often an unchanged heartbeat is written.
	PersistEvery time.Duration
	// DefaultZone and DefaultCluster are used when an agent names none.
	DefaultZone, DefaultCluster string
	// UpHostsMaxAge bounds how old the Up hosts UpHosts returns may be
	// when they changed other than through this Service (upview.go); 0
	// means HeartbeatInterval (the liveness monitor renews them twice an
	// interval), negative reads them on every call.
	UpHostsMaxAge time.Duration
}

// Service is the host registry.
type Service struct {
	db     *meta.DB
	log    *slog.Logger
	cfg    Config
	stores StoreWatcher
	mounts MountSpecs
	now    func() time.Time
	start  time.Time

	mu   sync.Mutex
	seen map[string]liveness
	// up is what UpHosts reads instead of the host records (upview.go).
	up upCache
}

type liveness struct {
	at        time.Time
	session   string
	persisted time.Time
	inFlight  int32
	// copies is the agent's copy engine counters, as its last heartbeat
	// to this controller carried them (kept in memory only).
	copies *stowagev1.CopyEngineCounters
}

// CopyEngine returns each host's copy engine counters, as its last
// heartbeat to this controller carried them: a follower, which gets no
// heartbeats, knows none; the counters restart from 0 with the agent.
func (s *Service) CopyEngine() map[string]*stowagev1.CopyEngineCounters {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]*stowagev1.CopyEngineCounters, len(s.seen))
	for id, l := range s.seen {
		if l.copies != nil {
			out[id] = l.copies // never modified: each heartbeat brings a new one
		}
	}
	return out
}

// New returns a host registry over db.
func New(db *meta.DB, stores StoreWatcher, cfg Config, log *slog.Logger) *Service {
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = 3 * time.Second
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 4 * cfg.HeartbeatInterval
	}
	if cfg.PersistEvery <= 0 {
		cfg.PersistEvery = 30 * time.Second
	}
	if cfg.DefaultZone == "" {
		cfg.DefaultZone = "default"
	}
	if cfg.UpHostsMaxAge == 0 {
		cfg.UpHostsMaxAge = cfg.HeartbeatInterval
	}
	if cfg.DefaultCluster == "" {
		cfg.DefaultCluster = "default"
	}
	return &Service{db: db, log: log, cfg: cfg, stores: stores, now: time.Now, start: time.Now(), seen: map[string]liveness{}}
}

// SetStoreWatcher wires the store service after construction (the two
// services refer to each other).
func (s *Service) SetStoreWatcher(w StoreWatcher) { s.stores = w }

// SetMountSpecs wires the template mount planner: each heartbeat response
// then carries the desired content of the host's template mount.
func (s *Service) SetMountSpecs(m MountSpecs) { s.mounts = m }

// Get returns a host by id, or by hostname when no id matches.
func (s *Service) Get(ctx context.Context, idOrName string) (*stowagev1.Host, error) {
	if idOrName == "" {
		return nil, fmt.Errorf("host id is required: %w", errdefs.ErrInvalid)
	}
	h, err := s.db.Hosts().Get(ctx, idOrName)
	if errdefs.IsNotFound(err) || errdefs.IsInvalid(err) {
		hs, lerr := s.db.Hosts().ListBy(ctx, meta.IndexHostname, idOrName)
		if lerr == nil && len(hs) == 1 {
			return s.decorate(hs[0]), nil
		}
		return nil, fmt.Errorf("host %q: no host has that id or hostname; see `stowage host list`: %w", idOrName, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	return s.decorate(h), nil
}

// List returns up to limit hosts (0: no limit) with ids after after, by
// id, optionally only one zone's or one state's.
func (s *Service) List(ctx context.Context, zone string, state stowagev1.HostState, after string, limit int) ([]*stowagev1.Host, error) {
	f := meta.Filter[*stowagev1.Host]{After: after, Limit: limit}
	switch {
	case zone != "":
		f.Index, f.Value = meta.IndexZone, zone
	case state != stowagev1.HostState_HOST_STATE_UNSPECIFIED:
		f.Index, f.Value = meta.IndexState, meta.HostStateName(state)
	}
	f.Where = func(h *stowagev1.Host) bool {
		return (zone == "" || h.GetZone() == zone) && (state == stowagev1.HostState_HOST_STATE_UNSPECIFIED || h.GetState() == state)
	}
	hs, err := s.db.Hosts().List(ctx, f)
	if err != nil {
		return nil, err
	}
	for i, h := range hs {
		hs[i] = s.decorate(h)
	}
	return hs, nil
}

// decorate fills in the live heartbeat facts the record may lag behind on.
func (s *Service) decorate(h *stowagev1.Host) *stowagev1.Host {
	s.mu.Lock()
	l, ok := s.seen[h.GetId()]
	s.mu.Unlock()
	if ok && l.session == h.GetSessionId() {
		h.LastHeartbeat = timestamppb.New(l.at)
		h.InFlightTasks = l.inFlight
	}
	return h
}

// Register records an agent that starts (or restarts) and brings its host Up.
func (s *Service) Register(ctx context.Context, req *stowagev1.RegisterRequest) (*stowagev1.RegisterResponse, error) {
	if err := validateRegister(req); err != nil {
		return nil, err
	}
	defer s.dropUp()
	zone, cluster := req.GetZone(), req.GetCluster()
	if zone == "" {
		zone = s.cfg.DefaultZone
	}
	if cluster == "" {
		cluster = s.cfg.DefaultCluster
	}
	now := s.now()
	fill := func(h *stowagev1.Host) error {
		h.Hostname = req.GetHostname()
		h.AgentUrl = req.GetAgentUrl()
		h.NbdAddress = req.GetNbdAddress()
		h.Iqn = req.GetIqn()
		h.Zone, h.Cluster = zone, cluster
		h.Capabilities = req.GetCapabilities()
		h.SessionId = req.GetSessionId()
		h.LastHeartbeat = timestamppb.New(now)
		h.StateReason = ""
		return nil
	}
	host, err := s.db.Hosts().Get(ctx, req.GetHostId())
	// A new host, or one in another zone or cluster, changes which stores
	// have it in scope.
	moved := errdefs.IsNotFound(err) || (err == nil && (host.GetZone() != zone || host.GetCluster() != cluster))
	if moved && err == nil {
		s.log.Info("host moved", "host", host.GetId(), "zone", host.GetZone()+" -> "+zone, "cluster", host.GetCluster()+" -> "+cluster)
	}
	switch {
	case errdefs.IsNotFound(err):
		rec := &stowagev1.Host{Id: req.GetHostId(), State: stowagev1.HostState_HOST_STATE_CONNECTING, RegisteredAt: timestamppb.New(now)}
		_ = fill(rec)
		if host, err = s.db.Hosts().Create(ctx, rec); err != nil {
			return nil, fmt.Errorf("register host %s: %w", req.GetHostId(), err)
		}
		s.log.Info("new host registered", "host", host.GetId(), "agent", host.GetAgentUrl(), "zone", zone, "cluster", cluster)
	case err != nil:
		return nil, fmt.Errorf("register host %s: %w", req.GetHostId(), err)
	case host.GetState() == stowagev1.HostState_HOST_STATE_MAINTENANCE || host.GetState() == stowagev1.HostState_HOST_STATE_PREPARE_FOR_MAINTENANCE:
		// A host in (or going into) maintenance stays there; it only
		// refreshes its facts.
		if host, err = s.db.Hosts().Update(ctx, host.GetId(), host.GetRevision(), fill); err != nil {
			return nil, fmt.Errorf("register host %s: %w", req.GetHostId(), err)
		}
	default:
		if host, err = s.db.Hosts().Transition(ctx, host.GetId(), meta.HostReconnect, fill); err != nil {
			return nil, fmt.Errorf("register host %s: %w", req.GetHostId(), err)
		}
		s.log.Info("host re-registered", "host", host.GetId(), "agent", host.GetAgentUrl())
	}
	if host.GetState() == stowagev1.HostState_HOST_STATE_CONNECTING {
		if host, err = s.db.Hosts().Transition(ctx, host.GetId(), meta.HostConnected, nil); err != nil {
			return nil, fmt.Errorf("register host %s: %w", req.GetHostId(), err)
		}
	}
	s.mu.Lock()
	s.seen[host.GetId()] = liveness{at: now, session: req.GetSessionId(), persisted: now}
	s.mu.Unlock()

	resp := &stowagev1.RegisterResponse{Host: host, HeartbeatIntervalMs: int32(s.cfg.HeartbeatInterval / time.Millisecond)}
	if s.stores != nil && moved {
		s.stores.HostsChanged()
	}
	if s.stores != nil {
		if resp.Stores, err = s.stores.Assignments(ctx, host); err != nil {
			return nil, err
		}
		if err := s.stores.ObserveHost(ctx, host, req.GetCapabilities().GetStores()); err != nil {
			s.log.Warn("recording store reports failed", "host", host.GetId(), "err", err)
		}
	}
	return resp, nil
}

var hostIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ValidateID checks a host id: 1-128 letters, digits, '.', '_' or '-',
// starting with a letter or digit.
func ValidateID(id string) error {
	if !hostIDPattern.MatchString(id) {
		return fmt.Errorf("host id %q: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit: %w", id, errdefs.ErrInvalid)
	}
	return nil
}

func validateRegister(req *stowagev1.RegisterRequest) error {
	if err := ValidateID(req.GetHostId()); err != nil {
		return err
	}
	u, err := url.Parse(req.GetAgentUrl())
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("host %s: agent url %q must be http(s)://host:port: %w", req.GetHostId(), req.GetAgentUrl(), errdefs.ErrInvalid)
	}
	if req.GetSessionId() == "" {
		return fmt.Errorf("host %s: session id is required: %w", req.GetHostId(), errdefs.ErrInvalid)
	}
	return nil
}

// Heartbeat records that an agent is alive. A heartbeat from a session the
// controller does not know asks the agent to register again.
func (s *Service) Heartbeat(ctx context.Context, req *stowagev1.HeartbeatRequest) (*stowagev1.HeartbeatResponse, error) {
	host, err := s.db.Hosts().Get(ctx, req.GetHostId())
	if errdefs.IsNotFound(err) || (err == nil && host.GetSessionId() != req.GetSessionId()) {
		return &stowagev1.HeartbeatResponse{Reregister: true}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("heartbeat from host %s: %w", req.GetHostId(), err)
	}
	now := s.now()
	s.mu.Lock()
	l := s.seen[host.GetId()]
	l.at, l.session, l.inFlight = now, req.GetSessionId(), req.GetInFlightTasks()
	if c := req.GetCopyEngine(); c != nil {
		l.copies = c
	}
	newCaps := !sameCaps(host.GetCapabilities(), req.GetCapabilities())
	persist := now.Sub(l.persisted) >= s.cfg.PersistEvery || newCaps
	s.seen[host.GetId()] = l
	s.mu.Unlock()
	if newCaps || host.GetState() != stowagev1.HostState_HOST_STATE_UP {
		defer s.dropUp() // what endpoint selection reads changes
	}

	update := func(h *stowagev1.Host) error {
		h.LastHeartbeat = timestamppb.New(now)
		h.Capabilities = req.GetCapabilities()
		h.InFlightTasks = req.GetInFlightTasks()
		if h.GetState() != stowagev1.HostState_HOST_STATE_MAINTENANCE {
			h.StateReason = "" // a host in maintenance keeps why
		}
		return nil
	}
	switch host.GetState() {
	case stowagev1.HostState_HOST_STATE_DISCONNECTED:
		host, err = s.db.Hosts().Transition(ctx, host.GetId(), meta.HostHeartbeatResumed, update)
		if err == nil {
			s.log.Info("host is back", "host", host.GetId())
		}
	case stowagev1.HostState_HOST_STATE_CONNECTING:
		host, err = s.db.Hosts().Transition(ctx, host.GetId(), meta.HostConnected, update)
	case stowagev1.HostState_HOST_STATE_PREPARE_FOR_MAINTENANCE:
		host, err = s.drainBeat(ctx, host, req.GetInFlightTasks(), now, update)
	default:
		if persist {
			host, err = s.db.Hosts().Update(ctx, host.GetId(), host.GetRevision(), update)
		}
	}
	if errdefs.IsConflict(err) {
		// Another writer (the monitor) moved the record; the next beat retries.
		err = nil
		host, _ = s.db.Hosts().Get(ctx, req.GetHostId())
	}
	if err != nil {
		return nil, fmt.Errorf("heartbeat from host %s: %w", req.GetHostId(), err)
	}
	s.mu.Lock()
	if l, ok := s.seen[host.GetId()]; ok && persist {
		l.persisted = now
		s.seen[host.GetId()] = l
	}
	s.mu.Unlock()
	resp := &stowagev1.HeartbeatResponse{State: host.GetState()}
	if s.stores != nil {
		if err := s.stores.ObserveHost(ctx, host, req.GetCapabilities().GetStores()); err != nil {
			s.log.Warn("recording store reports failed", "host", host.GetId(), "err", err)
		}
		if resp.Stores, err = s.stores.Assignments(ctx, host); err != nil {
			return nil, err
		}
	}
	if s.mounts != nil && req.GetCapabilities().GetTemplateCache().GetMount() != "" {
		resp.TemplateCache = s.mounts.Spec(host.GetId())
	}
	return resp, nil
}

// sameCaps compares capabilities ignoring free space and the progress of
// template mounts, which move all the time.
func sameCaps(a, b *stowagev1.HostCapabilities) bool {
	strip := func(c *stowagev1.HostCapabilities) *stowagev1.HostCapabilities {
		c = proto.Clone(c).(*stowagev1.HostCapabilities)
		for _, st := range c.GetStores() {
			st.AvailableBytes = 0
		}
		if tc := c.GetTemplateCache(); tc != nil {
			// Gauges and counters that move with every read: persisted at
			// the PersistEvery cadence, not at each change.
			tc.CachedBytes, tc.ReadHitBytes, tc.ReadMissBytes, tc.PassthroughOpens, tc.FetchedBytes, tc.CorruptChunks = 0, 0, 0, 0, 0, 0
			for _, t := range tc.GetTemplates() {
				t.CachedBytes = 0
			}
		}
		return c
	}
	if a == nil || b == nil {
		return a == b
	}
	return proto.Equal(strip(a), strip(b))
}

// Monitor marks hosts Disconnected when their heartbeats stop, until ctx
// ends. It runs on the leading controller only; every host gets one full
// timeout from the moment it starts (a controller that just took over has
// seen no heartbeat yet).
func (s *Service) Monitor(ctx context.Context) {
	s.mu.Lock()
	s.start = s.now()
	s.mu.Unlock()
	tick := time.NewTicker(max(s.cfg.HeartbeatInterval/2, 100*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			s.checkLiveness(ctx)
		}
	}
}

func (s *Service) checkLiveness(ctx context.Context) {
	gen := s.up.gen.Load()
	hosts, err := s.db.Hosts().List(ctx, meta.Filter[*stowagev1.Host]{Where: func(h *stowagev1.Host) bool {
		return h.GetState() == stowagev1.HostState_HOST_STATE_UP || h.GetState() == stowagev1.HostState_HOST_STATE_CONNECTING
	}})
	if err != nil {
		s.log.Warn("liveness check: list hosts", "err", err)
		return
	}
	now := s.now()
	view := &upView{at: time.Now()}
	for _, h := range hosts {
		if h.GetState() == stowagev1.HostState_HOST_STATE_UP {
			view.hosts = append(view.hosts, h)
		}
		s.mu.Lock()
		l, ok := s.seen[h.GetId()]
		last := s.start // a restarted controller gives every host one timeout
		s.mu.Unlock()
		if ok && l.at.After(last) {
			last = l.at
		}
		if now.Sub(last) <= s.cfg.Timeout {
			continue
		}
		reason := fmt.Sprintf("no heartbeat for %s (timeout %s)", now.Sub(last).Round(time.Second), s.cfg.Timeout)
		_, err := s.db.Hosts().TransitionIf(ctx, h.GetId(), h.GetRevision(), meta.HostHeartbeatMissed, func(h *stowagev1.Host) error {
			h.StateReason = reason
			return nil
		})
		s.dropUp()
		if err != nil {
			if !errdefs.IsConflict(err) {
				s.log.Warn("marking host disconnected failed", "host", h.GetId(), "err", err)
			}
			continue
		}
		s.log.Warn("host disconnected", "host", h.GetId(), "reason", reason)
	}
	// The Up hosts just read are UpHosts' view, unless one changed since.
	s.keepUp(gen, view)
}

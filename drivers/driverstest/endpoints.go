package driverstest

import (
	"context"
	"fmt"
	"sync"

	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// LocalHosts is a drivers.Endpoints whose hosts are hostfs.Local endpoints
// on this machine: every step does real host work (directories, statfs,
// qemu-img). A host is Up and in every scope until SetUp or Place says
// otherwise; give it its own filesystem view with hostfs.WithRoot to act as
// a host that cannot see another's directories.
type LocalHosts struct {
	mu    sync.Mutex
	hosts []*localHost // in the order added; ForScope picks the first match
}

type localHost struct {
	ep            *hostfs.Local
	down          bool
	placed        bool
	zone, cluster string
}

var _ drivers.Endpoints = (*LocalHosts)(nil)

// LocalEndpoints returns hosts hostIDs, each a hostfs.Local seeing this
// machine's whole filesystem, Up and in every scope.
func LocalEndpoints(hostIDs ...string) *LocalHosts {
	h := &LocalHosts{}
	for _, id := range hostIDs {
		h.Add(id)
	}
	return h
}

// Add adds host hostID, Up and in every scope, built with opts, and returns
// its endpoint. Adding an id twice panics.
func (h *LocalHosts) Add(hostID string, opts ...hostfs.Option) *hostfs.Local {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.findLocked(hostID) != nil {
		panic(fmt.Sprintf("driverstest: host %q added twice", hostID))
	}
	ep := hostfs.New(hostID, opts...)
	h.hosts = append(h.hosts, &localHost{ep: ep})
	return ep
}

// Place puts host hostID in zone and cluster; it is then only in the scopes
// that contain it. It panics on an unknown host.
func (h *LocalHosts) Place(hostID, zone, cluster string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	lh := h.mustFindLocked(hostID)
	lh.placed, lh.zone, lh.cluster = true, zone, cluster
}

// SetUp marks host hostID Up or not; a host that is not Up is never
// returned. It panics on an unknown host.
func (h *LocalHosts) SetUp(hostID string, up bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.mustFindLocked(hostID).down = !up
}

// ForScope returns the first Up host in scope.
func (h *LocalHosts) ForScope(ctx context.Context, scope drivers.Scope) (drivers.Endpoint, error) {
	eps, err := h.AllInScope(ctx, scope)
	if err != nil {
		return nil, err
	}
	if len(eps) == 0 {
		return nil, fmt.Errorf("no Up host in scope %q: %w", scope, errdefs.ErrUnavailable)
	}
	return eps[0], nil
}

// AllInScope returns every Up host in scope, possibly none.
func (h *LocalHosts) AllInScope(ctx context.Context, scope drivers.Scope) ([]drivers.Endpoint, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []drivers.Endpoint
	for _, lh := range h.hosts {
		if !lh.down && lh.inScope(scope) {
			out = append(out, lh.ep)
		}
	}
	return out, nil
}

// ForHost returns host hostID: errdefs.ErrNotFound if it is unknown,
// errdefs.ErrUnavailable if it is not Up.
func (h *LocalHosts) ForHost(ctx context.Context, hostID string) (drivers.Endpoint, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	lh := h.findLocked(hostID)
	switch {
	case lh == nil:
		return nil, fmt.Errorf("host %s: %w", hostID, errdefs.ErrNotFound)
	case lh.down:
		return nil, fmt.Errorf("host %s is not Up: %w", hostID, errdefs.ErrUnavailable)
	}
	return lh.ep, nil
}

func (lh *localHost) inScope(s drivers.Scope) bool {
	if !lh.placed {
		return s.HostID == "" || s.HostID == lh.ep.HostID()
	}
	return s.Contains(lh.zone, lh.cluster, lh.ep.HostID())
}

func (h *LocalHosts) findLocked(hostID string) *localHost {
	for _, lh := range h.hosts {
		if lh.ep.HostID() == hostID {
			return lh
		}
	}
	return nil
}

func (h *LocalHosts) mustFindLocked(hostID string) *localHost {
	lh := h.findLocked(hostID)
	if lh == nil {
		panic(fmt.Sprintf("driverstest: unknown host %q", hostID))
	}
	return lh
}

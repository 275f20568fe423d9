package driverstest

import (
	"context"
	"fmt"
	"slices"
	"sync"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// Hosts is a hostops.Selector over hosts a test builds (any hostops.Host:
// an agent's local implementation, a Remote to a running agent). A host is
// Up and in every scope until SetUp or Place says otherwise. ForScope
// honours drivers.WithHost as the controller's selector does, else picks
// the first Up host in scope in the order they were added.
type Hosts struct {
	mu    sync.Mutex
	hosts []*hostEntry
}

type hostEntry struct {
	h             hostops.Host
	down          bool
	placed        bool
	zone, cluster string
}

var _ hostops.Selector = (*Hosts)(nil)

// NewHosts returns a selector over hosts, Up and in every scope.
func NewHosts(hosts ...hostops.Host) *Hosts {
	s := &Hosts{}
	for _, h := range hosts {
		s.Add(h)
	}
	return s
}

// Add adds h, Up and in every scope. Adding an id twice panics.
func (s *Hosts) Add(h hostops.Host) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.findLocked(h.HostID()) != nil {
		panic(fmt.Sprintf("driverstest: host %q added twice", h.HostID()))
	}
	s.hosts = append(s.hosts, &hostEntry{h: h})
}

// Place puts host hostID in zone and cluster; it is then only in the scopes
// that contain it. It panics on an unknown host.
func (s *Hosts) Place(hostID, zone, cluster string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.mustFindLocked(hostID)
	e.placed, e.zone, e.cluster = true, zone, cluster
}

// SetUp marks host hostID Up or not; a host that is not Up is never
// returned. It panics on an unknown host.
func (s *Hosts) SetUp(hostID string, up bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mustFindLocked(hostID).down = !up
}

// Remove forgets host hostID (a host deleted from the cloud).
func (s *Hosts) Remove(hostID string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.hosts = slices.DeleteFunc(s.hosts, func(e *hostEntry) bool { return e.h.HostID() == hostID })
}

// ForScope returns the step's host (drivers.WithHost) when it is Up and in
// scope, else the first Up host in scope (errdefs.ErrUnavailable if none).
func (s *Hosts) ForScope(ctx context.Context, scope drivers.Scope) (hostops.Host, error) {
	hosts, err := s.AllInScope(ctx, scope)
	if err != nil {
		return nil, err
	}
	if len(hosts) == 0 {
		return nil, fmt.Errorf("no Up host in scope %q: %w", scope.String(), errdefs.ErrUnavailable)
	}
	if id, ok := drivers.HostFrom(ctx); ok {
		for _, h := range hosts {
			if h.HostID() == id {
				return h, nil
			}
		}
	}
	return hosts[0], nil
}

// AllInScope returns every Up host in scope, possibly none.
func (s *Hosts) AllInScope(ctx context.Context, scope drivers.Scope) ([]hostops.Host, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []hostops.Host
	for _, e := range s.hosts {
		if !e.down && e.inScope(scope) {
			out = append(out, e.h)
		}
	}
	return out, nil
}

// ForHost returns host hostID: errdefs.ErrNotFound if it is unknown,
// errdefs.ErrUnavailable if it is not Up.
func (s *Hosts) ForHost(ctx context.Context, hostID string) (hostops.Host, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.findLocked(hostID)
	switch {
	case e == nil:
		return nil, fmt.Errorf("host %s: %w", hostID, errdefs.ErrNotFound)
	case e.down:
		return nil, fmt.Errorf("host %s is not Up: %w", hostID, errdefs.ErrUnavailable)
	}
	return e.h, nil
}

// InScope reports whether host hostID is in scope, Up or not
// (errdefs.ErrNotFound for an unknown host).
func (s *Hosts) InScope(ctx context.Context, hostID string, scope drivers.Scope) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.findLocked(hostID)
	if e == nil {
		return false, fmt.Errorf("host %s: %w", hostID, errdefs.ErrNotFound)
	}
	return e.inScope(scope), nil
}

func (e *hostEntry) inScope(s drivers.Scope) bool {
	if !e.placed {
		return s.HostID == "" || s.HostID == e.h.HostID()
	}
	return s.Contains(e.zone, e.cluster, e.h.HostID())
}

func (s *Hosts) findLocked(hostID string) *hostEntry {
	for _, e := range s.hosts {
		if e.h.HostID() == hostID {
			return e
		}
	}
	return nil
}

func (s *Hosts) mustFindLocked(hostID string) *hostEntry {
	e := s.findLocked(hostID)
	if e == nil {
		panic(fmt.Sprintf("driverstest: unknown host %q", hostID))
	}
	return e
}

// Package endpoint is Stowage's EndPointSelector: it picks the agent that
// runs a host-side step. It gives drivers their drivers.Endpoints: an Up host
// in a store's scope, the least busy first, reached through the agent proxy.
package endpoint

import (
	"context"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/stowage/stowage/agent/proxy"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Hosts is what the selector needs from the host registry.
type Hosts interface {
	// UpHosts returns the Up hosts, least busy first.
	UpHosts(ctx context.Context) ([]*stowagev1.Host, error)
	List(ctx context.Context, zone string, state stowagev1.HostState) ([]*stowagev1.Host, error)
}

// Selector implements drivers.Endpoints over the host registry.
type Selector struct {
	hosts Hosts
	hc    *http.Client
}

var _ drivers.Endpoints = (*Selector)(nil)

// New returns a selector; hc carries the calls to agents.
func New(hosts Hosts, hc *http.Client) *Selector {
	if hc == nil {
		hc = &http.Client{Timeout: 10 * time.Minute}
	}
	return &Selector{hosts: hosts, hc: hc}
}

func inScope(h *stowagev1.Host, sc drivers.Scope) bool {
	return sc.Contains(h.GetZone(), h.GetCluster(), h.GetId())
}

func (s *Selector) endpoint(h *stowagev1.Host) drivers.Endpoint {
	return proxy.New(h.GetId(), h.GetAgentUrl(), s.hc)
}

// ForScope implements drivers.Endpoints.
func (s *Selector) ForScope(ctx context.Context, sc drivers.Scope) (drivers.Endpoint, error) {
	all, err := s.AllInScope(ctx, sc)
	if err != nil {
		return nil, err
	}
	return all[0], nil
}

// AllInScope implements drivers.Endpoints; the least busy host comes first.
func (s *Selector) AllInScope(ctx context.Context, sc drivers.Scope) ([]drivers.Endpoint, error) {
	up, err := s.hosts.UpHosts(ctx)
	if err != nil {
		return nil, err
	}
	var out []drivers.Endpoint
	for _, h := range up {
		if inScope(h, sc) {
			out = append(out, s.endpoint(h))
		}
	}
	if len(out) == 0 {
		return nil, s.noneInScope(ctx, sc)
	}
	return out, nil
}

// noneInScope explains why no agent can serve scope sc.
func (s *Selector) noneInScope(ctx context.Context, sc drivers.Scope) error {
	all, err := s.hosts.List(ctx, "", stowagev1.HostState_HOST_STATE_UNSPECIFIED)
	if err != nil {
		return err
	}
	var seen []string
	for _, h := range all {
		if inScope(h, sc) {
			seen = append(seen, fmt.Sprintf("%s is %s", h.GetId(), strings.TrimPrefix(h.GetState().String(), "HOST_STATE_")))
		}
	}
	sort.Strings(seen)
	if len(seen) == 0 {
		return fmt.Errorf("no agent is registered in scope %s; start `stowage agent --zone %s` on a host there: %w", sc, sc.Zone, errdefs.ErrUnavailable)
	}
	return fmt.Errorf("no Up agent in scope %s (%s): %w", sc, strings.Join(seen, ", "), errdefs.ErrUnavailable)
}

// ForHost implements drivers.Endpoints.
func (s *Selector) ForHost(ctx context.Context, hostID string) (drivers.Endpoint, error) {
	up, err := s.hosts.UpHosts(ctx)
	if err != nil {
		return nil, err
	}
	for _, h := range up {
		if h.GetId() == hostID {
			return s.endpoint(h), nil
		}
	}
	return nil, fmt.Errorf("host %s is not Up (see `stowage host get %s`): %w", hostID, hostID, errdefs.ErrUnavailable)
}

// Package endpoint is Stowage's EndPointSelector: it picks the agent that
// runs a host-side step. It gives drivers and the data motion their
// hostops.Selector: an Up host in a store's scope (the step's planned host,
// drivers.WithHost, when it qualifies; else the least busy), reached
// through hostops.Remote.
package endpoint

import (
	"context"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Hosts is what the selector needs from the host registry.
type Hosts interface {
	// UpHosts returns the Up hosts, least busy first.
	UpHosts(ctx context.Context) ([]*stowagev1.Host, error)
	// Get reads one host record (by id).
	Get(ctx context.Context, id string) (*stowagev1.Host, error)
	// List returns up to limit hosts (0: all) after the id after.
	List(ctx context.Context, zone string, state stowagev1.HostState, after string, limit int) ([]*stowagev1.Host, error)
}

// Selector implements hostops.Selector over the host registry.
type Selector struct {
	hosts     Hosts
	clientFor func(hostID string) *http.Client
	remote    []hostops.Option
}

var (
	_ hostops.Selector   = (*Selector)(nil)
	_ jobs.TaskCanceller = (*Selector)(nil)
)

// New returns a selector; clientFor gives the client that carries the
// calls to the agent of a host (one that checks the agent's certificate
// names that host); nil: one plain client for all. opts configure every
// hostops.Remote it hands out.
func New(hosts Hosts, clientFor func(hostID string) *http.Client, opts ...hostops.Option) *Selector {
	if clientFor == nil {
		hc := &http.Client{Timeout: 10 * time.Minute}
		clientFor = func(string) *http.Client { return hc }
	}
	return &Selector{hosts: hosts, clientFor: clientFor, remote: opts}
}

func inScope(h *stowagev1.Host, sc drivers.Scope) bool {
	return sc.Contains(h.GetZone(), h.GetCluster(), h.GetId())
}

func (s *Selector) endpoint(h *stowagev1.Host) hostops.Host {
	return hostops.NewRemote(h.GetId(), h.GetAgentUrl(), s.clientFor(h.GetId()), s.remote...)
}

// ForScope implements hostops.Selector: the step's host (drivers.WithHost)
// when it is Up and in scope, else the least busy Up host in scope.
func (s *Selector) ForScope(ctx context.Context, sc drivers.Scope) (hostops.Host, error) {
	all, err := s.AllInScope(ctx, sc)
	if err != nil {
		return nil, err
	}
	if want, ok := drivers.HostFrom(ctx); ok {
		for _, h := range all {
			if h.HostID() == want {
				return h, nil
			}
		}
	}
	return all[0], nil
}

// InScope implements hostops.Selector.
func (s *Selector) InScope(ctx context.Context, hostID string, sc drivers.Scope) (bool, error) {
	h, err := s.hosts.Get(ctx, hostID)
	if err != nil {
		return false, err
	}
	return inScope(h, sc), nil
}

// AllInScope implements hostops.Selector; the least busy host comes first.
func (s *Selector) AllInScope(ctx context.Context, sc drivers.Scope) ([]hostops.Host, error) {
	up, err := s.hosts.UpHosts(ctx)
	if err != nil {
		return nil, err
	}
	var out []hostops.Host
	lacking := 0
	for _, h := range up {
		if !inScope(h, sc) {
			continue
		}
		if len(missing(ctx, h)) > 0 {
			lacking++
			continue
		}
		out = append(out, s.endpoint(h))
	}
	if len(out) == 0 && lacking > 0 {
		return nil, fmt.Errorf("none of the %d Up agents in scope %s %s: %w", lacking, sc, needsText(ctx), errdefs.ErrUnavailable)
	}
	if len(out) == 0 {
		return nil, s.noneInScope(ctx, sc)
	}
	return out, nil
}

// noneInScope explains why no agent can serve scope sc.
func (s *Selector) noneInScope(ctx context.Context, sc drivers.Scope) error {
	all, err := s.hosts.List(ctx, "", stowagev1.HostState_HOST_STATE_UNSPECIFIED, "", 0)
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

// ForHost implements hostops.Selector.
func (s *Selector) ForHost(ctx context.Context, hostID string) (hostops.Host, error) {
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

// CancelTask implements jobs.TaskCanceller: it sends CancelTask(taskID) to
// the agent of hostID, whatever state the registry has it in (a controller
// that just started may not have heard from it yet), and waits for the
// agent to stop the task. A host the registry does not know is an error.
func (s *Selector) CancelTask(ctx context.Context, hostID, taskID string) error {
	h, err := s.hosts.Get(ctx, hostID)
	if err != nil {
		return fmt.Errorf("cancel task %s on host %s: %w", taskID, hostID, err)
	}
	if h.GetAgentUrl() == "" {
		return fmt.Errorf("cancel task %s: host %s has no agent address yet: %w", taskID, hostID, errdefs.ErrUnavailable)
	}
	_, err = hostops.NewRemote(h.GetId(), h.GetAgentUrl(), s.clientFor(h.GetId()), s.remote...).CancelTask(ctx, taskID)
	return err
}

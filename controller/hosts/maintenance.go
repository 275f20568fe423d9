package hosts

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Host maintenance, as CloudStack's PrepareForMaintenance: an Up host
// stops taking new tasks at once (endpoint selection reads Up hosts only),
// the tasks it runs finish, and the first heartbeat it sends after the
// request that reports no running task puts it in Maintenance. A
// Disconnected host can take no task: it is in Maintenance at once. Its
// template mount keeps its content (the mount planner keeps planning for
// hosts in maintenance), so lazy volumes stay readable.

// EnableMaintenance starts draining host idOrName.
func (s *Service) EnableMaintenance(ctx context.Context, idOrName string) (*stowagev1.Host, error) {
	h, err := s.Get(ctx, idOrName)
	if err != nil {
		return nil, err
	}
	if _, ok := s.db.Hosts().Machine().Next(h.GetState(), meta.HostMaintenanceRequested); !ok {
		return nil, fmt.Errorf("host %s is %s; maintenance is for an Up, Connecting or Disconnected host: %w", h.GetId(), meta.HostStateName(h.GetState()), errdefs.ErrFailedPrecondition)
	}
	defer s.dropUp()
	now := s.now()
	h, err = s.db.Hosts().TransitionIf(ctx, h.GetId(), h.GetRevision(), meta.HostMaintenanceRequested, func(r *stowagev1.Host) error {
		r.MaintenanceRequestedAt = timestamppb.New(now)
		if r.GetState() == stowagev1.HostState_HOST_STATE_DISCONNECTED {
			r.StateReason = "maintenance asked for while disconnected: no task can reach it"
		} else {
			r.StateReason = "maintenance asked for: draining, no new task is sent to it"
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("maintenance of host %s: %w", idOrName, err)
	}
	s.log.Info("host maintenance asked for", "host", h.GetId(), "state", meta.HostStateName(h.GetState()))
	return s.decorate(h), nil
}

// CancelMaintenance brings a host in PrepareForMaintenance or Maintenance
// back: Connecting, then Up at its next heartbeat.
func (s *Service) CancelMaintenance(ctx context.Context, idOrName string) (*stowagev1.Host, error) {
	h, err := s.Get(ctx, idOrName)
	if err != nil {
		return nil, err
	}
	if _, ok := s.db.Hosts().Machine().Next(h.GetState(), meta.HostMaintenanceCancelled); !ok {
		return nil, fmt.Errorf("host %s is %s, not in maintenance: %w", h.GetId(), meta.HostStateName(h.GetState()), errdefs.ErrFailedPrecondition)
	}
	defer s.dropUp()
	h, err = s.db.Hosts().TransitionIf(ctx, h.GetId(), h.GetRevision(), meta.HostMaintenanceCancelled, func(r *stowagev1.Host) error {
		r.MaintenanceRequestedAt = nil
		r.StateReason = "maintenance cancelled: Up at its next heartbeat"
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("cancel maintenance of host %s: %w", idOrName, err)
	}
	s.log.Info("host maintenance cancelled", "host", h.GetId())
	return s.decorate(h), nil
}

// drainGrace is how long after the request a heartbeat must arrive to end
// a drain: a task sent to the host by a plan that chose it just before the
// request has reached the agent (and is counted) by then.
const drainGrace = 2 * time.Second

// drainBeat handles a heartbeat from a draining host, received at now with
// inFlight tasks running: the first one at least drainGrace after the
// request that reports none ends the drain.
func (s *Service) drainBeat(ctx context.Context, h *stowagev1.Host, inFlight int32, now time.Time, update func(*stowagev1.Host) error) (*stowagev1.Host, error) {
	asked := h.GetMaintenanceRequestedAt().AsTime()
	if inFlight > 0 || now.Sub(asked) < drainGrace {
		return s.db.Hosts().Update(ctx, h.GetId(), h.GetRevision(), func(r *stowagev1.Host) error {
			if err := update(r); err != nil {
				return err
			}
			r.StateReason = fmt.Sprintf("draining for maintenance: %d task(s) running", inFlight)
			return nil
		})
	}
	h, err := s.db.Hosts().Transition(ctx, h.GetId(), meta.HostMaintenanceSucceeded, func(r *stowagev1.Host) error {
		if err := update(r); err != nil {
			return err
		}
		r.StateReason = fmt.Sprintf("drained: no running task (maintenance asked for at %s)", asked.UTC().Format(time.RFC3339))
		return nil
	})
	if err == nil {
		s.log.Info("host in maintenance", "host", h.GetId())
	}
	return h, err
}

// InMaintenance returns the hosts in PrepareForMaintenance or Maintenance
// (two reads of the state index: few hosts are ever in maintenance).
func (s *Service) InMaintenance(ctx context.Context) ([]*stowagev1.Host, error) {
	var out []*stowagev1.Host
	for _, st := range []stowagev1.HostState{stowagev1.HostState_HOST_STATE_PREPARE_FOR_MAINTENANCE, stowagev1.HostState_HOST_STATE_MAINTENANCE} {
		hs, err := s.db.Hosts().ListBy(ctx, meta.IndexState, meta.HostStateName(st))
		if err != nil {
			return nil, fmt.Errorf("read hosts in maintenance: %w", err)
		}
		out = append(out, hs...)
	}
	return out, nil
}

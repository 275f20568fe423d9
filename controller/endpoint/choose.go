package endpoint

import (
	"context"
	"fmt"
	"strings"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Choice is the host picked for a step, and why.
type Choice struct {
	Endpoint drivers.Endpoint
	HostID   string
	Reason   string
}

// Select picks an Up host that is in every one of scopes (it can reach every
// store the step touches). It prefers prefer (the host that already holds
// the data, or the one an earlier step used), then the least busy.
func (s *Selector) Select(ctx context.Context, prefer string, scopes ...drivers.Scope) (Choice, error) {
	up, err := s.hosts.UpHosts(ctx) // least busy first
	if err != nil {
		return Choice{}, err
	}
	var fit []*stowagev1.Host
	for _, h := range up {
		ok := true
		for _, sc := range scopes {
			ok = ok && inScope(h, sc)
		}
		if ok {
			fit = append(fit, h)
		}
	}
	if len(fit) == 0 {
		names := make([]string, len(scopes))
		for i, sc := range scopes {
			names[i] = sc.String()
		}
		if len(scopes) == 1 {
			return Choice{}, s.noneInScope(ctx, scopes[0])
		}
		return Choice{}, fmt.Errorf("no Up agent reaches all of %s: %w", strings.Join(names, " and "), errdefs.ErrUnavailable)
	}
	pick, why := fit[0], fmt.Sprintf("least busy of %d Up hosts in scope (%d tasks in flight)", len(fit), fit[0].GetInFlightTasks())
	for _, h := range fit {
		if h.GetId() == prefer {
			pick, why = h, "already holds the data"
			break
		}
	}
	return Choice{Endpoint: s.endpoint(pick), HostID: pick.GetId(), Reason: fmt.Sprintf("host %s: %s", pick.GetId(), why)}, nil
}

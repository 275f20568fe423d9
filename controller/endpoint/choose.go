package endpoint

import (
	"context"
	"fmt"
	"strings"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Choice is the host picked for a step, and why.
type Choice struct {
	Endpoint hostops.Host
	HostID   string
	Reason   string
	// Host is the picked host's record (its capabilities, e.g. its template mount).
	Host *stowagev1.Host
}

// Need is a condition a host must meet beyond scope, named for messages.
type Need struct {
	What string // e.g. "shows template t1 in its template mount"
	OK   func(*stowagev1.Host) bool
}

// SelectWhere is Select among the hosts that also meet need.
func (s *Selector) SelectWhere(ctx context.Context, prefer string, need Need, scopes ...drivers.Scope) (Choice, error) {
	return s.sel(ctx, prefer, &need, scopes)
}

// Select picks an Up host that is in every one of scopes (it can reach every
// store the step touches). It prefers prefer (the host that already holds
// the data, or the one an earlier step used), then the least busy.
func (s *Selector) Select(ctx context.Context, prefer string, scopes ...drivers.Scope) (Choice, error) {
	return s.sel(ctx, prefer, nil, scopes)
}

func (s *Selector) sel(ctx context.Context, prefer string, need *Need, scopes []drivers.Scope) (Choice, error) {
	up, err := s.hosts.UpHosts(ctx) // least busy first
	if err != nil {
		return Choice{}, err
	}
	var fit []*stowagev1.Host
	inAll := 0
	for _, h := range up {
		ok := true
		for _, sc := range scopes {
			ok = ok && inScope(h, sc)
		}
		if ok {
			inAll++
		}
		if ok && (need == nil || need.OK(h)) && len(missing(ctx, h)) == 0 {
			fit = append(fit, h)
		}
	}
	if len(fit) == 0 && inAll > 0 {
		what := needsText(ctx)
		if need != nil {
			what = need.What
			if len(drivers.NeedsFrom(ctx)) > 0 {
				what += " and " + needsText(ctx)
			}
		}
		return Choice{}, fmt.Errorf("none of the %d Up agents in scope %s %s: %w", inAll, scopeNames(scopes), what, errdefs.ErrUnavailable)
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
	if need != nil {
		why += "; " + need.What
	}
	return Choice{Endpoint: s.endpoint(pick), HostID: pick.GetId(), Host: pick, Reason: fmt.Sprintf("host %s: %s", pick.GetId(), why)}, nil
}

func scopeNames(scopes []drivers.Scope) string {
	names := make([]string, len(scopes))
	for i, sc := range scopes {
		names[i] = sc.String()
	}
	return strings.Join(names, " and ")
}

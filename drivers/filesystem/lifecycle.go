package filesystem

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// LifeCycle manages filesystem stores.
type LifeCycle struct {
	eps          drivers.Endpoints
	drv          *Driver
	probeTimeout time.Duration
}

// Initialize validates spec (id, role, URL), has one Up agent in the
// store's scope create the layout and marker (refused if another store owns
// the directory) and returns the store with its capacity. Details["path"]
// is the directory; Details["fs_type"] and Details["reflink"] are what that
// host saw. Initializing the same spec again is harmless. When it fails,
// the agent has removed whatever it created.
func (lc *LifeCycle) Initialize(ctx context.Context, spec drivers.StoreSpec) (drivers.StoreInfo, error) {
	info, err := lc.initialize(ctx, spec)
	if err != nil {
		return drivers.StoreInfo{}, fmt.Errorf("initialize filesystem store %s: %w", spec.ID, err)
	}
	return info, nil
}

func (lc *LifeCycle) initialize(ctx context.Context, spec drivers.StoreSpec) (drivers.StoreInfo, error) {
	if err := ctx.Err(); err != nil {
		return drivers.StoreInfo{}, err
	}
	if spec.ID == "" {
		return drivers.StoreInfo{}, fmt.Errorf("the spec has no store id: %w", errdefs.ErrInvalid)
	}
	subdirs, err := layout(spec.Role)
	if err != nil {
		return drivers.StoreInfo{}, err
	}
	path, err := parseURL(spec.URL)
	if err != nil {
		return drivers.StoreInfo{}, err
	}
	ep, err := lc.eps.ForScope(ctx, spec.Scope)
	if err != nil {
		return drivers.StoreInfo{}, fmt.Errorf("no Up agent in scope %s can initialise the store: %w", scopeName(spec.Scope), err)
	}
	probe, err := ep.PrepareStore(ctx, path, spec.ID, subdirs)
	if err != nil {
		return drivers.StoreInfo{}, err
	}
	details := maps.Clone(spec.Details)
	if details == nil {
		details = map[string]string{}
	}
	details["path"] = path
	details["fs_type"] = probe.FSType
	details["reflink"] = strconv.FormatBool(probe.Reflink)
	return drivers.StoreInfo{
		ID:             spec.ID,
		Name:           spec.Name,
		Role:           spec.Role,
		Provider:       Name,
		URL:            spec.URL,
		Scope:          spec.Scope,
		Details:        details,
		CapacityBytes:  probe.CapacityBytes,
		AvailableBytes: probe.AvailableBytes,
	}, nil
}

// Attach probes the store from every Up host in scope (the store's own
// scope when scope is zero; a narrower scope attaches a subset, e.g. one
// host joining) and returns the hosts that reach it, sorted. Hosts are
// probed in parallel, each for at most the probe timeout. It fails with
// errdefs.ErrUnavailable, giving each host's reason, when none reaches it.
func (lc *LifeCycle) Attach(ctx context.Context, store drivers.StoreInfo, scope drivers.Scope) ([]string, error) {
	hosts, err := lc.attach(ctx, store, scope)
	if err != nil {
		return nil, fmt.Errorf("attach filesystem store %s: %w", store.ID, err)
	}
	return hosts, nil
}

func (lc *LifeCycle) attach(ctx context.Context, store drivers.StoreInfo, scope drivers.Scope) ([]string, error) {
	if scope == (drivers.Scope{}) {
		scope = store.Scope
	}
	if !within(scope, store.Scope) {
		return nil, fmt.Errorf("scope %s is outside the store's scope %s: %w", scopeName(scope), scopeName(store.Scope), errdefs.ErrInvalid)
	}
	path, err := storePath(store)
	if err != nil {
		return nil, err
	}
	eps, err := lc.eps.AllInScope(ctx, scope)
	if err != nil {
		return nil, err
	}
	if len(eps) == 0 {
		return nil, fmt.Errorf("no Up host in scope %s: %w", scopeName(scope), errdefs.ErrUnavailable)
	}
	errs := make([]error, len(eps))
	var wg sync.WaitGroup
	for i, ep := range eps {
		wg.Go(func() {
			pctx, cancel := context.WithTimeout(ctx, lc.probeTimeout)
			defer cancel()
			_, errs[i] = ep.ProbeStore(pctx, path, store.ID)
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var hosts, reasons []string
	for i, ep := range eps {
		if errs[i] == nil {
			hosts = append(hosts, ep.HostID())
		} else {
			reasons = append(reasons, fmt.Sprintf("%s: %v", ep.HostID(), errs[i]))
		}
	}
	if len(hosts) == 0 {
		return nil, fmt.Errorf("no host in scope %s reaches %s (%s): %w", scopeName(scope), path, strings.Join(reasons, "; "), errdefs.ErrUnavailable)
	}
	slices.Sort(hosts)
	return hosts, nil
}

// Maintain always succeeds: putting a store in maintenance is how an
// operator takes a broken or unreachable store out of service, so it must
// not depend on reaching it. The controller stops placing work on it.
func (lc *LifeCycle) Maintain(ctx context.Context, store drivers.StoreInfo) error {
	return ctx.Err()
}

// CancelMaintain returns the store to service only if an Up host in its
// scope reaches it.
func (lc *LifeCycle) CancelMaintain(ctx context.Context, store drivers.StoreInfo) error {
	if err := lc.probe(ctx, store); err != nil {
		return fmt.Errorf("cancel maintenance of filesystem store %s: %w", store.ID, err)
	}
	return nil
}

func (lc *LifeCycle) probe(ctx context.Context, store drivers.StoreInfo) error {
	path, err := storePath(store)
	if err != nil {
		return err
	}
	ep, err := lc.eps.ForScope(ctx, store.Scope)
	if err != nil {
		return err
	}
	_, err = ep.ProbeStore(ctx, path, store.ID)
	return err
}

// Delete releases the store: it refuses (errdefs.ErrFailedPrecondition)
// while the store holds objects, then has an agent remove the layout and
// the marker; data is never removed, nor the store directory itself. When
// no Up host in scope sees the store's marker, the store is taken as already
// released and Delete succeeds (an export mounted on none of them looks the
// same: its layout then stays on the export).
func (lc *LifeCycle) Delete(ctx context.Context, store drivers.StoreInfo) error {
	if err := lc.delete(ctx, store); err != nil {
		return fmt.Errorf("delete filesystem store %s: %w", store.ID, err)
	}
	return nil
}

func (lc *LifeCycle) delete(ctx context.Context, store drivers.StoreInfo) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	subdirs, err := layout(store.Role)
	if err != nil {
		return err
	}
	path, err := storePath(store)
	if err != nil {
		return err
	}
	ep, err := lc.eps.ForScope(ctx, store.Scope)
	if err != nil {
		return err
	}
	if _, err := ep.ProbeStore(ctx, path, store.ID); err != nil {
		if !errdefs.IsNotFound(err) || ctx.Err() != nil {
			return err
		}
		// This host sees no marker. Before calling the store released, ask
		// the other hosts in scope: one without the export mounted must not
		// make Delete forget a store that still exists.
		if ep, err = lc.hostWithMarker(ctx, store, path, ep.HostID()); err != nil || ep == nil {
			return err
		}
	}
	objs, err := lc.drv.listObjects(ctx, ep, store, path)
	if err != nil {
		return err
	}
	if len(objs) > 0 {
		return fmt.Errorf("store %s still holds %d objects (e.g. %s); delete them first: %w",
			store.ID, len(objs), objs[0].Path, errdefs.ErrFailedPrecondition)
	}
	return ep.ReleaseStore(ctx, path, store.ID, subdirs)
}

// hostWithMarker returns an Up host in the store's scope, other than
// skip, that sees the store's marker; nil when every one answers
// errdefs.ErrNotFound. Any other answer is returned as the error.
func (lc *LifeCycle) hostWithMarker(ctx context.Context, store drivers.StoreInfo, path, skip string) (drivers.Endpoint, error) {
	eps, err := lc.eps.AllInScope(ctx, store.Scope)
	if err != nil {
		return nil, err
	}
	for _, ep := range eps {
		if ep.HostID() == skip {
			continue
		}
		_, err := ep.ProbeStore(ctx, path, store.ID)
		if err == nil {
			return ep, nil
		}
		if !errdefs.IsNotFound(err) || ctx.Err() != nil {
			return nil, err
		}
	}
	return nil, nil
}

// within reports whether scope inner lies inside outer.
func within(inner, outer drivers.Scope) bool {
	return inner.Zone == outer.Zone &&
		(outer.Cluster == "" || inner.Cluster == outer.Cluster) &&
		(outer.HostID == "" || inner.HostID == outer.HostID)
}

// scopeName renders a scope for messages, naming the empty one.
func scopeName(s drivers.Scope) string {
	if s == (drivers.Scope{}) {
		return "(any)"
	}
	return fmt.Sprintf("%q", s.String())
}

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
	"github.com/stowage/stowage/hostops"
)

// LifeCycle manages filesystem stores.
type LifeCycle struct {
	hosts        hostops.Selector
	drv          *Driver
	probeTimeout time.Duration
}

var _ drivers.LifeCycle = (*LifeCycle)(nil)

// root is the hostops view of store: its id, directory and layout.
func root(store drivers.StoreInfo) (hostops.StoreRoot, error) {
	if err := checkStore(store); err != nil {
		return hostops.StoreRoot{}, err
	}
	dir, err := storeDir(store)
	if err != nil {
		return hostops.StoreRoot{}, err
	}
	subdirs, _ := layout(store.Role)
	return hostops.StoreRoot{ID: store.ID, Path: dir, Subdirs: subdirs}, nil
}

// Initialize validates spec (id, role, URL), has one Up host in the
// store's scope (Selector.ForScope) create the layout and marker (refused
// with errdefs.ErrFailedPrecondition if another store owns the directory)
// and returns the store with its capacity. Details["path"] is the
// directory; Details["fs_type"] and Details["reflink"] are what that host
// saw. Initializing the same spec again is harmless. When it fails, the
// host has removed whatever it created.
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
	dir, err := parseURL(spec.URL)
	if err != nil {
		return drivers.StoreInfo{}, err
	}
	h, err := lc.hosts.ForScope(ctx, spec.Scope)
	if err != nil {
		return drivers.StoreInfo{}, fmt.Errorf("no Up host in scope %s can initialise the store: %w", scopeName(spec.Scope), err)
	}
	probe, err := h.PrepareStore(ctx, hostops.StoreRoot{ID: spec.ID, Path: dir, Subdirs: subdirs})
	if err != nil {
		return drivers.StoreInfo{}, fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	details := maps.Clone(spec.Details)
	if details == nil {
		details = map[string]string{}
	}
	details["path"] = dir
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
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if scope == (drivers.Scope{}) {
		scope = store.Scope
	}
	if !within(scope, store.Scope) {
		return nil, fmt.Errorf("scope %s is outside the store's scope %s: %w", scopeName(scope), scopeName(store.Scope), errdefs.ErrInvalid)
	}
	r, err := root(store)
	if err != nil {
		return nil, err
	}
	hosts, err := lc.hosts.AllInScope(ctx, scope)
	if err != nil {
		return nil, err
	}
	if len(hosts) == 0 {
		return nil, fmt.Errorf("no Up host in scope %s: %w", scopeName(scope), errdefs.ErrUnavailable)
	}
	errs := make([]error, len(hosts))
	var wg sync.WaitGroup
	for i, h := range hosts {
		wg.Go(func() {
			pctx, cancel := context.WithTimeout(ctx, lc.probeTimeout)
			defer cancel()
			_, errs[i] = h.ProbeStore(pctx, r)
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var ids, reasons []string
	for i, h := range hosts {
		if errs[i] == nil {
			ids = append(ids, h.HostID())
		} else {
			reasons = append(reasons, fmt.Sprintf("%s: %v", h.HostID(), errs[i]))
		}
	}
	if len(ids) == 0 {
		return nil, fmt.Errorf("no host in scope %s reaches %s (%s): %w", scopeName(scope), r.Path, strings.Join(reasons, "; "), errdefs.ErrUnavailable)
	}
	slices.Sort(ids)
	return ids, nil
}

// Maintain always succeeds: putting a store in maintenance is how an
// operator takes a broken or unreachable store out of service, so it must
// not depend on reaching it. The controller stops placing work on it.
func (lc *LifeCycle) Maintain(ctx context.Context, store drivers.StoreInfo) error {
	return ctx.Err()
}

// CancelMaintain returns the store to service only if an Up host in its
// scope reaches it (errdefs.ErrUnavailable with no Up host, the host's
// errdefs.ErrNotFound when the marker is gone).
func (lc *LifeCycle) CancelMaintain(ctx context.Context, store drivers.StoreInfo) error {
	if err := lc.probe(ctx, store); err != nil {
		return fmt.Errorf("cancel maintenance of filesystem store %s: %w", store.ID, err)
	}
	return nil
}

func (lc *LifeCycle) probe(ctx context.Context, store drivers.StoreInfo) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	r, err := root(store)
	if err != nil {
		return err
	}
	h, err := lc.hosts.ForScope(ctx, store.Scope)
	if err != nil {
		return err
	}
	if _, err := h.ProbeStore(ctx, r); err != nil {
		return fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	return nil
}

// Delete releases the store: it refuses (errdefs.ErrFailedPrecondition)
// while ListObjects finds objects on it, then has a host remove the layout
// and the marker (ReleaseStore); data is never removed, nor the store
// directory itself. When no Up host in scope sees the store's marker, the
// store is taken as already released and Delete succeeds (an export
// mounted on none of them looks the same: its layout then stays on it).
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
	r, err := root(store)
	if err != nil {
		return err
	}
	h, err := lc.hosts.ForScope(ctx, store.Scope)
	if err != nil {
		return err
	}
	if _, err := h.ProbeStore(ctx, r); err != nil {
		if !errdefs.IsNotFound(err) || ctx.Err() != nil {
			return fmt.Errorf("host %s: %w", h.HostID(), err)
		}
		// This host sees no marker. Before calling the store released, ask
		// the other hosts in scope: one without the export mounted must not
		// make Delete forget a store that still exists.
		if h, err = lc.hostWithMarker(ctx, store.Scope, r, h.HostID()); err != nil || h == nil {
			return err
		}
	}
	objs, err := lc.drv.listObjects(ctx, h, store)
	if err != nil {
		return err
	}
	if len(objs) > 0 {
		return fmt.Errorf("store %s still holds %d objects (e.g. %s); delete them first: %w",
			store.ID, len(objs), objs[0].Key, errdefs.ErrFailedPrecondition)
	}
	if err := h.ReleaseStore(ctx, r); err != nil {
		return fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	return nil
}

// hostWithMarker returns an Up host in scope, other than skip, that sees
// the store's marker; nil when every one answers errdefs.ErrNotFound. Any
// other answer is returned as the error.
func (lc *LifeCycle) hostWithMarker(ctx context.Context, scope drivers.Scope, r hostops.StoreRoot, skip string) (hostops.Host, error) {
	hosts, err := lc.hosts.AllInScope(ctx, scope)
	if err != nil {
		return nil, err
	}
	for _, h := range hosts {
		if h.HostID() == skip {
			continue
		}
		_, err := h.ProbeStore(ctx, r)
		if err == nil {
			return h, nil
		}
		if !errdefs.IsNotFound(err) || ctx.Err() != nil {
			return nil, fmt.Errorf("host %s: %w", h.HostID(), err)
		}
	}
	return nil, nil
}

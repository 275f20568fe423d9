package iscsi

import (
	"context"
	"fmt"
	"maps"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/hostops"
)

// LifeCycle manages iSCSI stores.
type LifeCycle struct {
	drv *Driver
}

var (
	_ drivers.LifeCycle       = (*LifeCycle)(nil)
	_ drivers.ScopeReconciler = (*LifeCycle)(nil)
)

// ReconcileHosts implements drivers.ScopeReconciler: the target admits the
// initiators and CHAP accounts of hostIDs and no others; a host that left
// the store's scope loses its ACL entry and its account's binding, and its
// sessions are logged out (EnsureTarget with Exact, on the target host).
func (lc *LifeCycle) ReconcileHosts(ctx context.Context, store drivers.StoreInfo, hostIDs []string) error {
	s, err := storeOf(store)
	if err != nil {
		return err
	}
	h, err := lc.drv.targetHost(ctx, s)
	if err != nil {
		return err
	}
	t, err := lc.drv.target(s, hostIDs...)
	if err != nil {
		return err
	}
	t.Exact = true
	if err := h.EnsureTarget(ctx, t); err != nil {
		return fmt.Errorf("iSCSI store %s: admit only %v: %w", s.id, hostIDs, err)
	}
	return nil
}

// Initialize prepares the backing directory on the target host, makes the
// target with the ACL and CHAP accounts of the Up hosts in the store's
// scope, and returns the store with the directory's capacity.
func (lc *LifeCycle) Initialize(ctx context.Context, spec drivers.StoreSpec) (drivers.StoreInfo, error) {
	s, err := parseStore(spec.ID, spec.URL, spec.Details)
	if err != nil {
		return drivers.StoreInfo{}, fmt.Errorf("initialize iSCSI store %s: %w", spec.ID, err)
	}
	d := lc.drv
	h, err := d.hosts.ForHost(ctx, s.targetHost)
	if err != nil {
		return drivers.StoreInfo{}, fmt.Errorf("initialize iSCSI store %s: target host %s: %w", spec.ID, s.targetHost, err)
	}
	probe, err := h.PrepareStore(ctx, s.root())
	if err != nil {
		return drivers.StoreInfo{}, fmt.Errorf("initialize iSCSI store %s on host %s: %w", spec.ID, s.targetHost, err)
	}
	hosts, _ := d.hosts.AllInScope(drivers.WithNeeds(ctx, d.HostNeeds()...), spec.Scope)
	t, err := d.target(s, hostIDs(hosts)...)
	if err != nil {
		return drivers.StoreInfo{}, err
	}
	if err := h.EnsureTarget(ctx, t); err != nil {
		_ = h.ReleaseStore(context.WithoutCancel(ctx), s.root())
		return drivers.StoreInfo{}, fmt.Errorf("initialize iSCSI store %s: target %s on host %s: %w", spec.ID, s.iqn, s.targetHost, err)
	}
	details := maps.Clone(spec.Details)
	if details == nil {
		details = map[string]string{}
	}
	details["portal"], details["target"] = s.portal, s.iqn
	return drivers.StoreInfo{ID: spec.ID, Name: spec.Name, Role: spec.Role, Provider: Name, URL: spec.URL, Scope: spec.Scope,
		Details: details, CapacityBytes: probe.CapacityBytes, AvailableBytes: probe.AvailableBytes}, nil
}

// Attach lets the Up hosts in scope log in (ACL and CHAP) and returns them.
func (lc *LifeCycle) Attach(ctx context.Context, store drivers.StoreInfo, scope drivers.Scope) ([]string, error) {
	s, err := storeOf(store)
	if err != nil {
		return nil, err
	}
	d := lc.drv
	// Only hosts with the userspace initiator reach LUNs.
	hosts, err := d.hosts.AllInScope(drivers.WithNeeds(ctx, d.HostNeeds()...), scope)
	if err != nil {
		return nil, err
	}
	h, err := d.targetHost(ctx, s)
	if err != nil {
		return nil, err
	}
	ids := hostIDs(hosts)
	t, err := d.target(s, ids...)
	if err != nil {
		return nil, err
	}
	if err := h.EnsureTarget(ctx, t); err != nil {
		return nil, fmt.Errorf("attach iSCSI store %s: %w", s.id, err)
	}
	return ids, nil
}

// Maintain has nothing to quiesce: LUNs stay served.
func (lc *LifeCycle) Maintain(ctx context.Context, store drivers.StoreInfo) error { return ctx.Err() }

// CancelMaintain returns the store to service if its target host serves it.
func (lc *LifeCycle) CancelMaintain(ctx context.Context, store drivers.StoreInfo) error {
	s, err := storeOf(store)
	if err != nil {
		return err
	}
	_, err = lc.drv.targetHost(ctx, s)
	return err
}

// Delete removes the target and releases the (empty) backing directory.
func (lc *LifeCycle) Delete(ctx context.Context, store drivers.StoreInfo) error {
	s, err := storeOf(store)
	if err != nil {
		return err
	}
	h, err := lc.drv.targetHost(ctx, s)
	if err != nil {
		return err
	}
	if err := h.DeleteTarget(ctx, hostops.ISCSITarget{Store: s.id, IQN: s.iqn}); err != nil {
		return fmt.Errorf("delete iSCSI store %s: %w", s.id, err)
	}
	return h.ReleaseStore(ctx, s.root())
}

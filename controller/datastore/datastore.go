// Package datastore is the controller's StoreService: it adds primary and
// image stores through their provider's LifeCycle (which does the host work
// on an agent in scope), moves them through CloudStack's store states
// (Initialized, Up, PrepareForMaintenance, Maintenance, ErrorInMaintenance,
// Disabled, Removed) and removes them only when nothing remains on them.
//
// It also keeps storage_pool_host_ref: which Up hosts reach which store, from
// what agents report in their heartbeats; and it tells every store whose
// provider admits hosts one by one (drivers.ScopeReconciler: an iSCSI
// target's ACL) which hosts are in its scope whenever that set may have
// changed, so a host that left the scope can no longer log in.
package datastore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Service implements the StoreService operations.
type Service struct {
	db        *meta.DB
	providers *drivers.Registry
	log       *slog.Logger
	// DefaultZone is the zone of a store added without one.
	DefaultZone string
	// hostsChanged wakes Reconcile to re-apply the stores' host sets.
	hostsChanged chan struct{}
	// views is what the heartbeat path reads instead of the stores (view.go).
	views viewCache
	// defaults are the capacity thresholds of stores without their own
	// (placement.go).
	defaults Thresholds
	// ledger holds what jobs in flight reserved on stores (reserve.go).
	ledger *ledger
}

// New returns the store service.
func New(db *meta.DB, providers *drivers.Registry, log *slog.Logger) *Service {
	return &Service{db: db, providers: providers, log: log, DefaultZone: "default", hostsChanged: make(chan struct{}, 1), defaults: DefaultThresholds, ledger: newLedger()}
}

// HostsChanged says the set of registered hosts, or where one of them is
// (zone, cluster), changed: Reconcile re-applies the host set of every
// store that admits hosts one by one (ReconcileHosts). It does not block;
// changes in a burst are applied together.
func (s *Service) HostsChanged() {
	select {
	case s.hostsChanged <- struct{}{}:
	default: // one is pending already: it will see this change too
	}
}

// reconcileHostsTimeout bounds one store's ReconcileHosts.
const reconcileHostsTimeout = time.Minute

// ReconcileHosts gives every attached store whose LifeCycle is a
// drivers.ScopeReconciler the hosts now registered in its scope (any
// state: a Disconnected host may still run guests there). A store that
// cannot be reached keeps its old set and is tried again at the next
// change or start; the errors are joined.
func (s *Service) ReconcileHosts(ctx context.Context) error {
	hosts, err := s.db.Hosts().List(ctx, meta.Filter[*stowagev1.Host]{})
	if err != nil {
		return fmt.Errorf("reconcile store hosts: %w", err)
	}
	stores, err := s.db.Stores().List(ctx, meta.Filter[*stowagev1.DataStore]{})
	if err != nil {
		return fmt.Errorf("reconcile store hosts: %w", err)
	}
	var errs []error
	for _, rec := range stores {
		switch rec.GetState() {
		case stowagev1.StoreState_STORE_STATE_INITIALIZED, stowagev1.StoreState_STORE_STATE_REMOVED:
			continue // not attached (yet, or any more)
		}
		p, err := s.providers.Get(rec.GetProvider())
		if err != nil {
			continue
		}
		sr, ok := p.LifeCycle().(drivers.ScopeReconciler)
		if !ok {
			continue
		}
		info := InfoFromRecord(rec)
		var in []string
		for _, h := range hosts {
			if info.Scope.Contains(h.GetZone(), h.GetCluster(), h.GetId()) {
				in = append(in, h.GetId())
			}
		}
		sort.Strings(in)
		rctx, cancel := context.WithTimeout(ctx, reconcileHostsTimeout)
		start := time.Now()
		err = sr.ReconcileHosts(rctx, info, in)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("store %s: %w", rec.GetName(), err))
			continue
		}
		s.log.Info("store admits the hosts in its scope", "store", rec.GetName(), "hosts", in, "took", time.Since(start).Round(time.Millisecond))
	}
	return errors.Join(errs...)
}

var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// Add validates req, initialises the store on an agent in scope, records it
// and attaches it to every Up host in scope. On any failure nothing remains:
// no record, no marker in the directory.
func (s *Service) Add(ctx context.Context, req *stowagev1.AddStoreRequest) (*stowagev1.DataStore, error) {
	defer s.dropView()
	p, spec, err := s.validate(ctx, req)
	if err != nil {
		return nil, err
	}
	tags, err := NormalizeTags(req.GetTags())
	if err != nil {
		return nil, fmt.Errorf("store %q: %w", spec.Name, err)
	}
	for _, th := range []struct {
		name string
		v    *float64
	}{{"disable", req.CapacityDisableThreshold}, {"notify", req.CapacityNotifyThreshold}} {
		if th.v != nil {
			if err := checkThreshold(th.name, *th.v); err != nil {
				return nil, fmt.Errorf("store %q: %w", spec.Name, err)
			}
		}
	}
	lc := p.LifeCycle()
	info, err := lc.Initialize(ctx, spec)
	if err != nil {
		return nil, fmt.Errorf("add store %q: %w", spec.Name, err)
	}
	rec := &stowagev1.DataStore{
		Id:             spec.ID,
		Name:           spec.Name,
		Role:           req.GetRole(),
		Provider:       p.Name(),
		Url:            spec.URL,
		Scope:          scopeToProto(spec.Scope),
		State:          stowagev1.StoreState_STORE_STATE_INITIALIZED,
		CapacityBytes:  info.CapacityBytes,
		AvailableBytes: info.AvailableBytes,
		UsedBytes:      info.CapacityBytes - info.AvailableBytes,
		Tags:           tags,
		Details:        info.Details,

		CapacityDisableThreshold: req.CapacityDisableThreshold,
		CapacityNotifyThreshold:  req.CapacityNotifyThreshold,
	}
	if _, err := s.db.Stores().Create(ctx, rec); err != nil {
		s.release(lc, info)
		return nil, fmt.Errorf("add store %q: %w", spec.Name, err)
	}
	return s.attach(ctx, lc, info, rec.GetId(), true)
}

// attach connects an Initialized store to the hosts in its scope and brings
// it Up. When undo is set, a failure removes the record and the marker;
// otherwise (recovery) the store stays Initialized with the reason.
func (s *Service) attach(ctx context.Context, lc drivers.LifeCycle, info drivers.StoreInfo, id string, undo bool) (*stowagev1.DataStore, error) {
	defer s.dropView()
	hostIDs, err := lc.Attach(ctx, info, info.Scope)
	if err != nil {
		if !undo {
			_, _ = s.db.Stores().Update(ctx, id, 0, func(r *stowagev1.DataStore) error {
				r.StateReason = "attach failed: " + err.Error()
				return nil
			})
			return nil, fmt.Errorf("attach store %s: %w", id, err)
		}
		if _, terr := s.db.Stores().Transition(ctx, id, meta.StoreAttachFailed, nil); terr == nil {
			_ = s.db.Stores().Delete(ctx, id, 0)
		}
		s.release(lc, info)
		return nil, fmt.Errorf("add store %q: attach: %w", info.Name, err)
	}
	sort.Strings(hostIDs)
	return s.db.Stores().Transition(ctx, id, meta.StoreAttachSucceeded, func(r *stowagev1.DataStore) error {
		r.HostIds = hostIDs
		r.StateReason = ""
		return nil
	})
}

// release undoes Initialize, best effort, with its own deadline: the
// caller's context may be what failed.
func (s *Service) release(lc drivers.LifeCycle, info drivers.StoreInfo) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := lc.Delete(ctx, info); err != nil {
		s.log.Warn("could not release a store that failed to be added", "store", info.ID, "url", info.URL, "err", err)
	}
}

func (s *Service) validate(ctx context.Context, req *stowagev1.AddStoreRequest) (drivers.Provider, drivers.StoreSpec, error) {
	var spec drivers.StoreSpec
	name := req.GetName()
	if !namePattern.MatchString(name) {
		return nil, spec, fmt.Errorf("store name %q: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit: %w", name, errdefs.ErrInvalid)
	}
	role, err := roleFromProto(req.GetRole())
	if err != nil {
		return nil, spec, err
	}
	if req.GetProvider() == "" {
		return nil, spec, fmt.Errorf("store %q: a provider is required (known: %s): %w", name, strings.Join(s.providers.Names(), ", "), errdefs.ErrInvalid)
	}
	p, err := s.providers.Get(req.GetProvider())
	if err != nil {
		return nil, spec, fmt.Errorf("store %q: %w", name, err)
	}
	if !drivers.HasRole(p, role) {
		return nil, spec, fmt.Errorf("store %q: provider %s cannot hold %s stores (it serves %v): %w", name, p.Name(), role, p.Roles(), errdefs.ErrInvalid)
	}
	if req.GetUrl() == "" {
		return nil, spec, fmt.Errorf("store %q: a url is required, e.g. file:///srv/stowage/%s: %w", name, name, errdefs.ErrInvalid)
	}
	scope := scopeFromProto(req.GetScope())
	if scope.Zone == "" {
		scope.Zone = s.DefaultZone
	}
	if scope.HostID != "" {
		if _, err := s.db.Hosts().Get(ctx, scope.HostID); err != nil {
			return nil, spec, fmt.Errorf("store %q: scope names host %q: %w", name, scope.HostID, errors.Join(errdefs.ErrInvalid, err))
		}
	}
	if other, err := s.db.Stores().GetBy(ctx, meta.IndexName, name); err == nil {
		return nil, spec, fmt.Errorf("store name %q is already taken by store %s: %w", name, other.GetId(), errdefs.ErrAlreadyExists)
	} else if !errdefs.IsNotFound(err) {
		return nil, spec, err
	}
	spec = drivers.StoreSpec{ID: meta.NewID(), Name: name, Role: role, URL: req.GetUrl(), Scope: scope, Details: req.GetDetails()}
	return p, spec, nil
}

// Get returns a store by id or, failing that, by name.
func (s *Service) Get(ctx context.Context, idOrName string) (*stowagev1.DataStore, error) {
	if idOrName == "" {
		return nil, fmt.Errorf("a store id or name is required: %w", errdefs.ErrInvalid)
	}
	rec, err := s.db.Stores().Get(ctx, idOrName)
	if err == nil {
		return s.decorate(rec), nil
	}
	if !errdefs.IsNotFound(err) && !errdefs.IsInvalid(err) {
		return nil, err
	}
	rec, err = s.db.Stores().GetBy(ctx, meta.IndexName, idOrName)
	if errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("store %q: no store has that id or name; see `stowage store list`: %w", idOrName, errdefs.ErrNotFound)
	}
	return s.decorate(rec), err
}

// List returns up to limit stores (0: no limit) with ids after after, in
// id order, optionally of one role and one zone.
func (s *Service) List(ctx context.Context, role stowagev1.StoreRole, zone, after string, limit int) ([]*stowagev1.DataStore, error) {
	// Stores are few (hundreds): one scan of their records, not of the
	// role index, which on etcd costs a read of each record.
	all, err := s.db.Stores().List(ctx, meta.Filter[*stowagev1.DataStore]{After: after, Limit: limit, Where: func(r *stowagev1.DataStore) bool {
		return (role == stowagev1.StoreRole_STORE_ROLE_UNSPECIFIED || r.GetRole() == role) && (zone == "" || r.GetScope().GetZone() == zone)
	}})
	for _, st := range all {
		s.decorate(st)
	}
	return all, err
}

// EnableMaintenance moves an Up store to PrepareForMaintenance, runs the
// provider's Maintain and ends in Maintenance, or ErrorInMaintenance with
// the reason when the provider fails.
func (s *Service) EnableMaintenance(ctx context.Context, idOrName string) (*stowagev1.DataStore, error) {
	defer s.dropView()
	rec, err := s.Get(ctx, idOrName)
	if err != nil {
		return nil, err
	}
	p, err := s.providers.Get(rec.GetProvider())
	if err != nil {
		return nil, err
	}
	rec, err = s.db.Stores().TransitionIf(ctx, rec.GetId(), rec.GetRevision(), meta.StoreMaintenanceRequested, nil)
	if err != nil {
		return nil, fmt.Errorf("maintenance of store %s: only an Up store can enter maintenance: %w", idOrName, err)
	}
	if merr := p.LifeCycle().Maintain(ctx, InfoFromRecord(rec)); merr != nil {
		rec, err = s.db.Stores().Transition(ctx, rec.GetId(), meta.StoreMaintenanceFailed, func(r *stowagev1.DataStore) error {
			r.StateReason = "maintenance failed: " + merr.Error()
			return nil
		})
		if err != nil {
			return nil, err
		}
		return rec, fmt.Errorf("maintenance of store %s failed, store is ErrorInMaintenance: %w", idOrName, merr)
	}
	return s.db.Stores().Transition(ctx, rec.GetId(), meta.StoreMaintenanceSucceeded, func(r *stowagev1.DataStore) error {
		r.StateReason = ""
		return nil
	})
}

// CancelMaintenance brings a store in Maintenance (or ErrorInMaintenance)
// back Up once the provider confirms it is reachable.
func (s *Service) CancelMaintenance(ctx context.Context, idOrName string) (*stowagev1.DataStore, error) {
	defer s.dropView()
	rec, err := s.Get(ctx, idOrName)
	if err != nil {
		return nil, err
	}
	if _, ok := s.db.Stores().Machine().Next(rec.GetState(), meta.StoreCancelMaintenance); !ok {
		return nil, fmt.Errorf("store %s is %s, not in maintenance: %w", idOrName, meta.StoreStateName(rec.GetState()), errdefs.ErrFailedPrecondition)
	}
	p, err := s.providers.Get(rec.GetProvider())
	if err != nil {
		return nil, err
	}
	if err := p.LifeCycle().CancelMaintain(ctx, InfoFromRecord(rec)); err != nil {
		return nil, fmt.Errorf("store %s stays in maintenance: %w", idOrName, err)
	}
	return s.db.Stores().TransitionIf(ctx, rec.GetId(), rec.GetRevision(), meta.StoreCancelMaintenance, func(r *stowagev1.DataStore) error {
		r.StateReason = ""
		return nil
	})
}

// Delete removes a store that holds no objects, in the records or on disk.
// The directory and anything the operator put there stay.
func (s *Service) Delete(ctx context.Context, idOrName string) error {
	defer s.dropView()
	rec, err := s.Get(ctx, idOrName)
	if err != nil {
		return err
	}
	if _, ok := s.db.Stores().Machine().Next(rec.GetState(), meta.StoreRemoveRequested); !ok {
		return fmt.Errorf("store %s is %s; it can be deleted when Up, Disabled or in Maintenance: %w", idOrName, meta.StoreStateName(rec.GetState()), errdefs.ErrFailedPrecondition)
	}
	if err := s.checkEmpty(ctx, rec); err != nil {
		return err
	}
	p, err := s.providers.Get(rec.GetProvider())
	if err != nil {
		return err
	}
	if err := p.LifeCycle().Delete(ctx, InfoFromRecord(rec)); err != nil {
		return fmt.Errorf("delete store %s: %w", idOrName, err)
	}
	// The record's revision guards against an object placed meanwhile; a
	// heartbeat's capacity update also bumps it, so a conflict is looked
	// at again (still empty?) rather than failed.
	for attempt := 0; ; attempt++ {
		_, err := s.db.Stores().TransitionIf(ctx, rec.GetId(), rec.GetRevision(), meta.StoreRemoveRequested, nil)
		if err == nil {
			break
		}
		if !errdefs.IsConflict(err) || attempt == 4 {
			return fmt.Errorf("delete store %s: %w", idOrName, err)
		}
		if rec, err = s.db.Stores().Get(ctx, rec.GetId()); err != nil {
			return fmt.Errorf("delete store %s: %w", idOrName, err)
		}
		if err := s.checkEmpty(ctx, rec); err != nil {
			return err
		}
	}
	if err := s.db.Stores().Delete(ctx, rec.GetId(), 0); err != nil {
		return fmt.Errorf("delete store %s: %w", idOrName, err)
	}
	s.log.Info("store deleted", "store", rec.GetId(), "name", rec.GetName())
	return nil
}

// checkEmpty refuses while records still place objects on the store.
func (s *Service) checkEmpty(ctx context.Context, rec *stowagev1.DataStore) error {
	vols, err := s.db.Volumes().ListBy(ctx, meta.IndexStoreID, rec.GetId())
	if err != nil {
		return err
	}
	vols = slices.DeleteFunc(vols, func(v *stowagev1.Volume) bool { return v.GetState() == stowagev1.VolumeState_VOLUME_STATE_EXPUNGED })
	tmpls, err := s.db.TemplatesOnStore().ListBy(ctx, meta.IndexStoreID, rec.GetId())
	if err != nil {
		return err
	}
	snaps, err := s.db.SnapshotsOnStore().ListBy(ctx, meta.IndexStoreID, rec.GetId())
	if err != nil {
		return err
	}
	live := func(st stowagev1.ObjectState) bool { return st != stowagev1.ObjectState_OBJECT_STATE_DESTROYED }
	nT, nS := 0, 0
	for _, t := range tmpls {
		if live(t.GetState()) {
			nT++
		}
	}
	for _, sn := range snaps {
		if live(sn.GetState()) {
			nS++
		}
	}
	if len(vols)+nT+nS > 0 {
		return fmt.Errorf("store %s still holds %d volumes, %d templates and %d snapshots; delete or migrate them first: %w",
			rec.GetName(), len(vols), nT, nS, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// Recover finishes what a previous controller left half done: a store left
// PrepareForMaintenance becomes ErrorInMaintenance (as in CloudStack), and an
// Initialized store is attached again.
func (s *Service) Recover(ctx context.Context) error {
	defer s.dropView()
	stuck, err := s.db.Stores().ListInState(ctx, stowagev1.StoreState_STORE_STATE_PREPARE_FOR_MAINTENANCE)
	if err != nil {
		return err
	}
	for _, rec := range stuck {
		_, err := s.db.Stores().Transition(ctx, rec.GetId(), meta.StoreControllerRestarted, func(r *stowagev1.DataStore) error {
			r.StateReason = "controller restarted during maintenance; run maintain again or cancel-maintain"
			return nil
		})
		if err != nil {
			return err
		}
		s.log.Warn("store was preparing for maintenance when the controller stopped", "store", rec.GetId())
	}
	return s.RetryAttach(ctx)
}

// RetryAttach tries to bring Initialized stores Up (after a crash between
// recording and attaching a store).
func (s *Service) RetryAttach(ctx context.Context) error {
	defer s.dropView()
	inits, err := s.db.Stores().ListInState(ctx, stowagev1.StoreState_STORE_STATE_INITIALIZED)
	if err != nil {
		return err
	}
	for _, rec := range inits {
		p, err := s.providers.Get(rec.GetProvider())
		if err != nil {
			s.log.Warn("store has an unknown provider", "store", rec.GetId(), "provider", rec.GetProvider())
			continue
		}
		if _, err := s.attach(ctx, p.LifeCycle(), InfoFromRecord(rec), rec.GetId(), false); err != nil {
			s.log.Warn("store still not attached", "store", rec.GetId(), "err", err)
			continue
		}
		s.log.Info("store attached after restart", "store", rec.GetId())
	}
	return nil
}

// Reconcile retries attaching Initialized stores every interval, and
// re-applies the stores' host sets (ReconcileHosts) once at start and
// after every HostsChanged, until ctx ends.
func (s *Service) Reconcile(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	s.HostsChanged() // a change a previous controller did not apply
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := s.RetryAttach(ctx); err != nil && ctx.Err() == nil {
				s.log.Warn("store reconcile", "err", err)
			}
		case <-s.hostsChanged:
			if err := s.ReconcileHosts(ctx); err != nil && ctx.Err() == nil {
				s.log.Warn("store host sets not all applied; retried at the next host change or start", "err", err)
			}
		}
	}
}

// Assignments lists the stores host should reach: every store whose scope
// contains it (in any state but Removed).
func (s *Service) Assignments(ctx context.Context, host *stowagev1.Host) ([]*stowagev1.StoreAssignment, error) {
	v, err := s.view(ctx)
	if err != nil {
		return nil, err
	}
	var out []*stowagev1.StoreAssignment
	for _, r := range v.recs {
		if r.GetState() == stowagev1.StoreState_STORE_STATE_REMOVED ||
			!scopeFromProto(r.GetScope()).Contains(host.GetZone(), host.GetCluster(), host.GetId()) {
			continue
		}
		a := &stowagev1.StoreAssignment{StoreId: r.GetId(), Provider: r.GetProvider(), Url: r.GetUrl()}
		if p, err := s.providers.Get(r.GetProvider()); err == nil {
			if hr, ok := p.(drivers.HostRooted); ok {
				a.Path = hr.HostRoot(InfoFromRecord(r), host.GetId())
			}
		}
		out = append(out, a)
	}
	return out, nil
}

// ObserveHost records what host reported of its stores: whether it reaches
// them (host_ids) and their free space. It writes only on change.
func (s *Service) ObserveHost(ctx context.Context, host *stowagev1.Host, reports []*stowagev1.StoreOnHost) error {
	v, err := s.view(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, rep := range reports {
		rec, ok := v.byID[rep.GetStoreId()]
		if !ok {
			continue
		}
		reach := rep.GetError() == "" && host.GetState() == stowagev1.HostState_HOST_STATE_UP
		has := slices.Contains(rec.GetHostIds(), host.GetId())
		capChanged := reach && (rep.GetCapacityBytes() != rec.GetCapacityBytes() || drift(rep.GetAvailableBytes(), rec.GetAvailableBytes()))
		if reach == has && !capChanged {
			continue
		}
		_, err = s.db.Stores().Update(ctx, rec.GetId(), rec.GetRevision(), func(r *stowagev1.DataStore) error {
			if reach && !has {
				r.HostIds = append(r.HostIds, host.GetId())
				sort.Strings(r.HostIds)
			}
			if !reach && has {
				r.HostIds = slices.DeleteFunc(r.HostIds, func(h string) bool { return h == host.GetId() })
			}
			if capChanged {
				r.CapacityBytes, r.AvailableBytes = rep.GetCapacityBytes(), rep.GetAvailableBytes()
				r.UsedBytes = r.CapacityBytes - r.AvailableBytes
			}
			return nil
		})
		// Written, or the view was behind (a conflict: the next beat
		// decides again on a fresh view).
		s.dropView()
		if err != nil && !errdefs.IsConflict(err) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// drift reports a change of free space worth writing down (1% or 64 MiB).
func drift(a, b int64) bool {
	d := a - b
	if d < 0 {
		d = -d
	}
	return d > 64<<20 || (b > 0 && d*100 > b)
}

// InfoFromRecord converts a store record into what providers see.
func InfoFromRecord(r *stowagev1.DataStore) drivers.StoreInfo {
	role, _ := roleFromProto(r.GetRole())
	return drivers.StoreInfo{
		ID: r.GetId(), Name: r.GetName(), Role: role, Provider: r.GetProvider(), URL: r.GetUrl(),
		Scope: scopeFromProto(r.GetScope()), Details: r.GetDetails(),
		CapacityBytes: r.GetCapacityBytes(), AvailableBytes: r.GetAvailableBytes(),
	}
}

func roleFromProto(r stowagev1.StoreRole) (drivers.Role, error) {
	switch r {
	case stowagev1.StoreRole_STORE_ROLE_PRIMARY:
		return drivers.RolePrimary, nil
	case stowagev1.StoreRole_STORE_ROLE_IMAGE:
		return drivers.RoleImage, nil
	case stowagev1.StoreRole_STORE_ROLE_IMAGE_CACHE:
		return drivers.RoleImageCache, nil
	}
	return "", fmt.Errorf("store role is required: primary, image or image-cache: %w", errdefs.ErrInvalid)
}

func scopeFromProto(s *stowagev1.Scope) drivers.Scope {
	return drivers.Scope{Zone: s.GetZone(), Cluster: s.GetCluster(), HostID: s.GetHostId()}
}

func scopeToProto(s drivers.Scope) *stowagev1.Scope {
	return &stowagev1.Scope{Zone: s.Zone, Cluster: s.Cluster, HostId: s.HostID}
}

// UpStore returns the store idOrName, which must hold role, be Up and be
// below its disable threshold.
func (s *Service) UpStore(ctx context.Context, idOrName string, role stowagev1.StoreRole) (*stowagev1.DataStore, error) {
	st, err := s.Get(ctx, idOrName)
	if err != nil {
		return nil, err
	}
	if st.GetRole() != role {
		return nil, fmt.Errorf("store %s is a %s store, a %s store is needed: %w", st.GetName(), meta.StoreRoleName(st.GetRole()), meta.StoreRoleName(role), errdefs.ErrInvalid)
	}
	if st.GetState() != stowagev1.StoreState_STORE_STATE_UP {
		return nil, fmt.Errorf("store %s is %s; only an Up store takes new objects (reason: %s): %w", st.GetName(), meta.StoreStateName(st.GetState()), orNone(st.GetStateReason()), errdefs.ErrFailedPrecondition)
	}
	if err := s.Admit(st, 0, nil); err != nil {
		return nil, err
	}
	return st, nil
}

func orNone(s string) string {
	if s == "" {
		return "none given"
	}
	return s
}

// Scope returns the scope of store st.
func Scope(st *stowagev1.DataStore) drivers.Scope { return scopeFromProto(st.GetScope()) }

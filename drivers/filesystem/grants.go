package filesystem

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/hostops"
)

var _ drivers.GrantLister = (*Driver)(nil)

// ListGrants lists the exports GrantAccess made of the objects of store
// that are still live, on every Up host in the store's scope (each may
// have served some: GrantAccess exports from whichever host is Up). A host
// that is not Up is not asked: its exports come back with it. When some
// hosts cannot be listed, the grants of those that could are returned with
// an error naming the others.
func (d *Driver) ListGrants(ctx context.Context, store drivers.StoreInfo) ([]drivers.Grant, error) {
	grants, err := d.listGrants(ctx, store)
	if err != nil {
		return grants, fmt.Errorf("list grants of filesystem store %s: %w", store.ID, err)
	}
	return grants, nil
}

// listParallel bounds how many hosts are listed at once.
const listParallel = 8

func (d *Driver) listGrants(ctx context.Context, store drivers.StoreInfo) ([]drivers.Grant, error) {
	if err := checkStore(store); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	hosts, err := d.hosts.AllInScope(ctx, store.Scope)
	if err != nil {
		return nil, fmt.Errorf("hosts in scope %s: %w", scopeName(store.Scope), err)
	}
	var (
		mu     sync.Mutex
		grants = []drivers.Grant{}
		errs   []error
		wg     sync.WaitGroup
		sem    = make(chan struct{}, listParallel)
	)
	for _, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
				defer func() { <-sem }()
			case <-ctx.Done():
				mu.Lock()
				errs = append(errs, fmt.Errorf("host %s: %w", h.HostID(), context.Cause(ctx)))
				mu.Unlock()
				return
			}
			list, err := h.ListExports(ctx, store.ID)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, fmt.Errorf("host %s: %w", h.HostID(), err))
				return
			}
			for _, x := range list {
				grants = append(grants, hostops.GrantOf(h.HostID(), x))
			}
		}()
	}
	wg.Wait()
	sort.Slice(grants, func(i, j int) bool {
		a, b := grants[i].Access, grants[j].Access
		if a.HostID != b.HostID {
			return a.HostID < b.HostID
		}
		return a.URI < b.URI
	})
	return grants, errors.Join(errs...)
}

//go:build ceph

package rbd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/ceph/go-ceph/rados"
	cephrbd "github.com/ceph/go-ceph/rbd"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// Name is the provider's name.
const Name = "rbd"

// markerObject is the RADOS object in a store's pool that names the store
// owning the pool: one pool, one store.
const markerObject = "stowage.store"

// Provider is the Ceph RBD provider.
type Provider struct {
	lc  *LifeCycle
	drv *Driver
}

var _ drivers.Provider = (*Provider)(nil)

// Option configures the provider.
type Option func(*Driver)

// WithFetchClient sets the HTTP client Import reads operators' URLs with
// (one whose dialer refuses addresses a template URL may not reach);
// default http.DefaultClient.
func WithFetchClient(c *http.Client) Option { return func(d *Driver) { d.fetch = c } }

// WithPeerClient sets the HTTP client Import reads URLs Stowage made with
// (an agent's staging export, which answers the controller's certificate);
// default http.DefaultClient.
func WithPeerClient(c *http.Client) Option { return func(d *Driver) { d.peer = c } }

// New returns the provider; hosts are the agents, of which the hosts in a
// store's scope attach it (they open its volumes with qemu's rbd driver).
func New(hosts hostops.Selector, opts ...Option) *Provider {
	d := &Driver{conns: &connections{}, fetch: http.DefaultClient, peer: http.DefaultClient, hosts: hosts}
	for _, o := range opts {
		o(d)
	}
	return &Provider{lc: &LifeCycle{hosts: hosts, drv: d}, drv: d}
}

func (p *Provider) Name() string                 { return Name }
func (p *Provider) Roles() []drivers.Role        { return []drivers.Role{drivers.RolePrimary} }
func (p *Provider) LifeCycle() drivers.LifeCycle { return p.lc }
func (p *Provider) Driver() drivers.Driver       { return p.drv }

// LifeCycle adds, attaches and removes pools as stores.
type LifeCycle struct {
	hosts hostops.Selector
	drv   *Driver
}

var _ drivers.LifeCycle = (*LifeCycle)(nil)

// Initialize checks the URL and key, that the pool exists and no other
// store owns it, claims it (the marker object) and reads its capacity.
func (l *LifeCycle) Initialize(ctx context.Context, spec drivers.StoreSpec) (drivers.StoreInfo, error) {
	if spec.ID == "" {
		return drivers.StoreInfo{}, fmt.Errorf("rbd store %q: no store id: %w", spec.Name, errdefs.ErrInvalid)
	}
	if spec.Role != drivers.RolePrimary {
		return drivers.StoreInfo{}, fmt.Errorf("an rbd store holds volumes (role primary), not %s: %w", spec.Role, errdefs.ErrInvalid)
	}
	loc, err := parseLocation(spec.URL, spec.Details)
	if err != nil {
		return drivers.StoreInfo{}, err
	}
	info := drivers.StoreInfo{ID: spec.ID, Name: spec.Name, Role: spec.Role, Provider: Name, URL: spec.URL, Scope: spec.Scope,
		Details: map[string]string{"pool": loc.pool, "keyring": loc.keyring, "clone": "native"}}
	err = l.drv.withPool(ctx, info, func(cl *cluster, io *rados.IOContext) error {
		owner, err := readMarker(io)
		switch {
		case errdefs.IsNotFound(err):
			if err := io.Create(markerObject, rados.CreateExclusive); err != nil {
				return fmt.Errorf("claim pool %s: %w", loc.pool, classify(err))
			}
			if err := io.WriteFull(markerObject, []byte(spec.ID)); err != nil {
				_ = io.Delete(markerObject)
				return fmt.Errorf("claim pool %s: %w", loc.pool, classify(err))
			}
			return nil
		case err != nil:
			return err
		case owner != spec.ID:
			return fmt.Errorf("pool %s belongs to store %s: %w", loc.pool, owner, errdefs.ErrFailedPrecondition)
		}
		return nil // ours already: Initialize again
	})
	if err != nil {
		return drivers.StoreInfo{}, fmt.Errorf("rbd store %q: %w", spec.Name, err)
	}
	info.CapacityBytes, info.AvailableBytes, err = l.drv.capacity(ctx, info)
	if err != nil {
		_ = l.Delete(context.WithoutCancel(ctx), info)
		return drivers.StoreInfo{}, err
	}
	return info, nil
}

func readMarker(io *rados.IOContext) (string, error) {
	buf := make([]byte, 128)
	n, err := io.Read(markerObject, buf, 0)
	if err != nil {
		return "", fmt.Errorf("read the pool's owner: %w", classify(err))
	}
	return string(buf[:n]), nil
}

// Attach returns the Up hosts in the store's scope: they reach the
// cluster with qemu's rbd driver (the agents report no librbd yet).
func (l *LifeCycle) Attach(ctx context.Context, store drivers.StoreInfo, scope drivers.Scope) ([]string, error) {
	hs, err := l.hosts.AllInScope(ctx, scope)
	if err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(hs))
	for _, h := range hs {
		ids = append(ids, h.HostID())
	}
	return ids, nil
}

// Maintain and CancelMaintain have nothing to do on a pool.
func (l *LifeCycle) Maintain(ctx context.Context, store drivers.StoreInfo) error       { return nil }
func (l *LifeCycle) CancelMaintain(ctx context.Context, store drivers.StoreInfo) error { return nil }

// Delete releases the pool (the marker) once no image of Stowage is left
// in it; the pool itself stays.
func (l *LifeCycle) Delete(ctx context.Context, store drivers.StoreInfo) error {
	return l.drv.withPool(ctx, store, func(cl *cluster, io *rados.IOContext) error {
		names, err := cephrbd.GetImageNames(io)
		if err != nil {
			return fmt.Errorf("list images: %w", classify(err))
		}
		for _, n := range names {
			if ours(n) {
				return fmt.Errorf("pool %s still holds image %s: %w", store.Details["pool"], n, errdefs.ErrFailedPrecondition)
			}
		}
		if owner, err := readMarker(io); err == nil && owner != store.ID {
			return nil // another store's pool: not ours to release
		}
		if err := io.Delete(markerObject); err != nil && errno(err) != 2 {
			return fmt.Errorf("release pool: %w", classify(err))
		}
		return nil
	})
}

// ours reports whether an image name is one Stowage made.
func ours(name string) bool {
	for _, t := range []drivers.ObjectType{drivers.ObjectVolume, drivers.ObjectTemplate} {
		if strings.HasPrefix(name, string(t)+"-") {
			return true
		}
	}
	return false
}

// capacity reads the pool's use and what it can still take (ceph df).
func (d *Driver) capacity(ctx context.Context, store drivers.StoreInfo) (capacity, available int64, err error) {
	loc, err := parseLocation(store.URL, store.Details)
	if err != nil {
		return 0, 0, err
	}
	cl, err := d.conns.open(loc)
	if err != nil {
		return 0, 0, err
	}
	out, _, err := cl.conn.MonCommand([]byte(`{"prefix":"df","format":"json"}`))
	if err != nil {
		return 0, 0, fmt.Errorf("ceph df: %w", classify(err))
	}
	var df struct {
		Stats struct {
			TotalBytes int64 `json:"total_bytes"`
			AvailBytes int64 `json:"total_avail_bytes"`
		} `json:"stats"`
		Pools []struct {
			Name  string `json:"name"`
			Stats struct {
				BytesUsed int64 `json:"bytes_used"`
				MaxAvail  int64 `json:"max_avail"`
			} `json:"stats"`
		} `json:"pools"`
	}
	if err := json.Unmarshal(out, &df); err != nil {
		return 0, 0, fmt.Errorf("ceph df: %w", errors.Join(err, errdefs.ErrInternal))
	}
	for _, p := range df.Pools {
		if p.Name == loc.pool {
			return p.Stats.BytesUsed + p.Stats.MaxAvail, p.Stats.MaxAvail, nil
		}
	}
	// A pool made moments ago is not in the statistics until the manager
	// has seen its placement groups: the cluster's raw figures meanwhile.
	if err := d.withPool(ctx, store, func(*cluster, *rados.IOContext) error { return nil }); err != nil {
		return 0, 0, err
	}
	return df.Stats.TotalBytes, df.Stats.AvailBytes, nil
}

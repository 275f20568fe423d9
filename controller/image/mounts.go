package image

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Template mount transports: how a host's template mount reads a template
// held by an image store it cannot reach itself.
const (
	MountTransportHTTP = "http" // the holding agent's read-only HTTP export, read with Range
	MountTransportNBD  = "nbd"  // the holding agent's read-only NBD export (raw bytes of the file)
)

// LazyMethod is the install method of a volume whose qcow2 backing file is
// its template's file in the host's template mount.
const LazyMethod = "lazy"

// stepTimeout bounds each agent call of a reconcile pass, so that one
// unresponsive agent does not hold up every host's mount.
const stepTimeout = 15 * time.Second

// UpHoster lists the Up hosts, and those in (or going into) maintenance
// (controller/hosts).
type UpHoster interface {
	UpHosts(ctx context.Context) ([]*stowagev1.Host, error)
	InMaintenance(ctx context.Context) ([]*stowagev1.Host, error)
}

// Mounts decides what each host's FUSE template mount shows: every Ready
// template of an Up image store of the host's zone, with where its bytes
// are (what the image store's driver grants the host for reading: store://
// of a store the host's agent serves, which the agent turns into the local
// file for its cache process; a presigned https:// URL; or a read-only
// export on an agent that reaches the store, kept by Mounts), and
// pinned while a lazy volume of the zone uses it. It recomputes the
// desired sets in the background (Run); the host service hands each host
// its set in the heartbeat response (Spec), so a template appears in and
// disappears from every mount within about two heartbeats, without a
// remount.
//
// Exports live in the serving agent's memory: when that agent restarts
// (its session changes) Mounts exports again and the mounts switch to the
// new URL without losing cached chunks (they are keyed by the template's
// content identity, not by URL).
type Mounts struct {
	db        *meta.DB
	stores    *datastore.Service
	hosts     UpHoster
	transport string
	every     time.Duration
	log       *slog.Logger

	reconciling sync.Mutex // one Reconcile at a time (Run, Show)

	mu      sync.Mutex
	desired map[string]*stowagev1.TemplateCacheSpec // by host id
	grants  map[grantKey]grant                      // live read grants
	sizes   map[string]int64                        // stored size, by ref id (immutable)
}

// NewMounts returns the planner; transport is MountTransportHTTP or
// MountTransportNBD; every is how often it recomputes.
func NewMounts(db *meta.DB, stores *datastore.Service, hosts UpHoster, transport string, every time.Duration, log *slog.Logger) (*Mounts, error) {
	switch transport {
	case MountTransportHTTP, MountTransportNBD:
	default:
		return nil, fmt.Errorf("template mount transport %q: want http or nbd", transport)
	}
	if every <= 0 {
		every = 2 * time.Second
	}
	return &Mounts{db: db, stores: stores, hosts: hosts, transport: transport, every: every, log: log,
		desired: map[string]*stowagev1.TemplateCacheSpec{}, grants: map[grantKey]grant{}, sizes: map[string]int64{}}, nil
}

// Spec returns the desired content of host's mount, or nil when the host
// reports no mount or nothing was computed yet.
func (m *Mounts) Spec(hostID string) *stowagev1.TemplateCacheSpec {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.desired[hostID]
}

// Run recomputes the desired sets until ctx ends.
func (m *Mounts) Run(ctx context.Context) {
	t := time.NewTicker(m.every)
	defer t.Stop()
	for {
		if err := m.Reconcile(ctx); err != nil && ctx.Err() == nil {
			m.log.Warn("template mounts: reconcile failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// mountable is a template a mount can show: its Ready image store copy.
type mountable struct {
	t     *stowagev1.Template
	ref   *stowagev1.TemplateOnStore
	store *stowagev1.DataStore
}

// Show returns the entry of template templateID in host hostID's desired
// set, recomputing the sets first when it is not there yet (a template
// registered since the last pass): what a lazy volume's create pushes to
// the host (hostops.TemplateShower) before its clone, instead of waiting
// for the next pass and heartbeat. ErrFailedPrecondition when the host's
// mount cannot show the template (no Ready copy on an Up image store of
// its zone, no source for it, or the host reports no mount).
//
// The entry is returned pinned: the caller is making a lazy volume on it,
// whose record (which the next pass finds) pins it from now on, and a
// heartbeat answer computed before that pass must not remove the file
// from under the new volume (the mount keeps a pinned template one more
// sync).
func (m *Mounts) Show(ctx context.Context, hostID, templateID string) (*stowagev1.CacheSpec, error) {
	sp := m.entry(hostID, templateID)
	if sp == nil {
		if err := m.Reconcile(ctx); err != nil {
			return nil, err
		}
		sp = m.entry(hostID, templateID)
	}
	if sp != nil {
		sp = proto.Clone(sp).(*stowagev1.CacheSpec)
		sp.Pinned = true
		return sp, nil
	}
	return nil, fmt.Errorf("the template mount of host %s cannot show template %s (no Ready copy on an Up image store of its zone, or no source for it): %w", hostID, templateID, errdefs.ErrFailedPrecondition)
}

func (m *Mounts) entry(hostID, templateID string) *stowagev1.CacheSpec {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, t := range m.desired[hostID].GetTemplates() {
		if t.GetId() == templateID {
			return t
		}
	}
	return nil
}

// Reconcile recomputes every host's desired set once.
func (m *Mounts) Reconcile(ctx context.Context) error {
	m.reconciling.Lock()
	defer m.reconciling.Unlock()
	up, err := m.hosts.UpHosts(ctx)
	if err != nil {
		return err
	}
	// A host in maintenance keeps its mount as planned (the templates its
	// lazy volumes read stay pinned), but serves no export to others: the
	// sources are chosen among the Up hosts only.
	resting, err := m.hosts.InMaintenance(ctx)
	if err != nil {
		return err
	}
	var mounting []*stowagev1.Host
	for _, h := range slices.Concat(up, resting) {
		if h.GetCapabilities().GetTemplateCache().GetMount() != "" {
			mounting = append(mounting, h)
		}
	}
	if len(mounting) == 0 {
		m.mu.Lock()
		m.desired = map[string]*stowagev1.TemplateCacheSpec{}
		m.mu.Unlock()
		return nil
	}
	items, err := m.mountables(ctx)
	if err != nil {
		return err
	}
	pinned, err := m.lazyTemplates(ctx)
	if err != nil {
		return err
	}
	used := map[grantKey]bool{}
	desired := map[string]*stowagev1.TemplateCacheSpec{}
	for _, h := range mounting {
		spec := &stowagev1.TemplateCacheSpec{}
		for _, it := range items {
			sc := datastore.Scope(it.store)
			if sc.Zone != h.GetZone() {
				continue
			}
			url, size, err := m.source(ctx, h, it, up, used)
			if err != nil {
				m.log.Warn("template mounts: no source for a template", "template", it.t.GetId(), "host", h.GetId(), "err", err)
				continue
			}
			spec.Templates = append(spec.Templates, &stowagev1.CacheSpec{
				Id: it.t.GetId(), Url: url, Size: size, Format: it.t.GetFormat(),
				Identity: contentIdentity(it.t, size), Pinned: pinned[h.GetZone()+"/"+it.t.GetId()],
			})
		}
		desired[h.GetId()] = spec
	}
	m.mu.Lock()
	m.desired = desired
	var stale []grant
	for k, g := range m.grants {
		if !used[k] {
			stale = append(stale, g)
			delete(m.grants, k)
		}
	}
	m.mu.Unlock()
	for _, g := range stale {
		m.revoke(ctx, g)
	}
	return nil
}

// contentIdentity names a template's bytes: its measured sha256 when known.
func contentIdentity(t *stowagev1.Template, size int64) string {
	if t.GetSha256() != "" {
		return "sha256:" + t.GetSha256()
	}
	return fmt.Sprintf("template:%s/%d", t.GetId(), size)
}

func (m *Mounts) mountables(ctx context.Context) ([]mountable, error) {
	refs, err := m.db.TemplatesOnStore().List(ctx, meta.Filter[*stowagev1.TemplateOnStore]{Where: func(r *stowagev1.TemplateOnStore) bool {
		return r.GetState() == stowagev1.ObjectState_OBJECT_STATE_READY
	}})
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []mountable
	for _, r := range refs {
		if seen[r.GetTemplateId()] {
			continue
		}
		st, err := m.db.Stores().Get(ctx, r.GetStoreId())
		if err != nil || st.GetRole() != stowagev1.StoreRole_STORE_ROLE_IMAGE || !datastore.Serves(st) {
			continue
		}
		t, err := m.db.Templates().Get(ctx, r.GetTemplateId())
		if err != nil {
			continue
		}
		seen[r.GetTemplateId()] = true
		out = append(out, mountable{t: t, ref: r, store: st})
	}
	slices.SortFunc(out, func(a, b mountable) int { return strings.Compare(a.t.GetId(), b.t.GetId()) })
	return out, nil
}

// lazyTemplates returns zone/template of every template a live lazy volume
// of that zone uses as its backing file.
func (m *Mounts) lazyTemplates(ctx context.Context) (map[string]bool, error) {
	vols, err := m.db.Volumes().List(ctx, meta.Filter[*stowagev1.Volume]{Where: func(v *stowagev1.Volume) bool {
		return v.GetInstallMethod() == LazyMethod && v.GetState() != stowagev1.VolumeState_VOLUME_STATE_EXPUNGED
	}})
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, v := range vols {
		st, err := m.db.Stores().Get(ctx, v.GetStoreId())
		if err != nil {
			continue
		}
		out[datastore.Scope(st).Zone+"/"+v.GetTemplateId()] = true
	}
	return out, nil
}

// grantKey names one granted source of a template copy: for the hosts in
// its store's scope, or for the hosts outside it (an export).
type grantKey struct {
	ref       string
	inScope   bool
	transport string
}

// grant is a live Access and the session of the host serving it.
type grant struct {
	obj     drivers.DataObject
	access  drivers.Access
	client  drivers.Client
	session string
	at      time.Time
}

// source returns where host h reads template it from (the access its image
// store's driver grants: store:// for a host that reaches the store, a
// presigned URL, or an export made on an agent that reaches it), and the
// template's length as stored. Grants are shared by the hosts of one kind
// and reused until they expire (half their lifetime) or their serving
// agent restarts.
func (m *Mounts) source(ctx context.Context, h *stowagev1.Host, it mountable, up []*stowagev1.Host, used map[grantKey]bool) (string, int64, error) {
	d, err := m.stores.Driver(it.store)
	if err != nil {
		return "", 0, err
	}
	f, err := FormatFromProto(it.t.GetFormat())
	if err != nil {
		return "", 0, err
	}
	obj := datastore.Object(it.store, drivers.ObjectTemplate, it.t.GetId(), f, it.ref.GetSize(), it.ref.GetInstallPath())
	size, err := m.storedSize(ctx, d, it, obj)
	if err != nil {
		return "", 0, err
	}
	k := grantKey{ref: it.ref.GetId(), inScope: datastore.Scope(it.store).Contains(h.GetZone(), h.GetCluster(), h.GetId()), transport: m.transport}
	used[k] = true
	m.mu.Lock()
	g, ok := m.grants[k]
	m.mu.Unlock()
	if ok && g.fresh(up) {
		return string(g.access.URI), size, nil
	}
	client := drivers.Client{HostID: h.GetId(), Purpose: drivers.PurposeRead}
	if !k.inScope {
		// The transport is how a host reads a template it cannot reach
		// itself (an export's kind); one that reaches it reads it there.
		client.Transport = m.transport
	}
	gctx, cancel := context.WithTimeout(ctx, stepTimeout)
	defer cancel()
	acc, err := d.GrantAccess(gctx, obj, client)
	if errdefs.IsFailedPrecondition(err) && client.Transport != "" {
		// The store hands out no URI of that transport (an object store's
		// presigned URLs): take what it gives.
		client.Transport = ""
		acc, err = d.GrantAccess(gctx, obj, client)
	}
	if err != nil {
		return "", 0, fmt.Errorf("read access to template %s for host %s: %w", it.t.GetId(), h.GetId(), err)
	}
	ng := grant{obj: obj, access: acc, client: client, at: time.Now()}
	for _, o := range up {
		if o.GetId() == acc.HostID {
			ng.session = o.GetSessionId()
		}
	}
	m.mu.Lock()
	m.grants[k] = ng
	m.mu.Unlock()
	if ok {
		m.revoke(ctx, g)
	}
	if acc.Revocable {
		m.log.Info("template mounts: exporting a template", "template", it.t.GetId(), "host", acc.HostID, "transport", m.transport)
	}
	return string(acc.URI), size, nil
}

// fresh reports whether g can still be handed out: not past half its
// lifetime, and its serving agent (if any) has not restarted.
func (g grant) fresh(up []*stowagev1.Host) bool {
	if !g.access.Expires.IsZero() && time.Now().After(g.at.Add(g.access.Expires.Sub(g.at)/2)) {
		return false
	}
	if g.access.HostID == "" {
		return true
	}
	return slices.ContainsFunc(up, func(h *stowagev1.Host) bool {
		return h.GetId() == g.access.HostID && h.GetSessionId() == g.session
	})
}

// storedSize returns the length of the template's copy as stored (not its
// virtual size: the mount shows the object as it is), asked once per
// template copy of a controller's life (copies never change).
func (m *Mounts) storedSize(ctx context.Context, d drivers.Driver, it mountable, obj drivers.DataObject) (int64, error) {
	m.mu.Lock()
	size, ok := m.sizes[it.ref.GetId()]
	m.mu.Unlock()
	if ok {
		return size, nil
	}
	ctx, cancel := context.WithTimeout(ctx, stepTimeout)
	defer cancel()
	oi, err := d.Stat(ctx, obj)
	if err != nil {
		return 0, err
	}
	m.mu.Lock()
	m.sizes[it.ref.GetId()] = oi.StoredSize
	m.mu.Unlock()
	return oi.StoredSize, nil
}

// revoke ends a grant no host's mount uses any more (best effort; an
// export of an agent that restarted is gone already).
func (m *Mounts) revoke(ctx context.Context, g grant) {
	if !g.access.Revocable {
		return
	}
	d, err := m.stores.Driver(&stowagev1.DataStore{Provider: g.obj.Store.Provider, Name: g.obj.Store.Name})
	if err != nil {
		return
	}
	rctx, cancel := context.WithTimeout(ctx, stepTimeout)
	defer cancel()
	if err := d.RevokeAccess(rctx, g.obj, g.client, g.access); err != nil {
		m.log.Warn("template mounts: ending an export failed", "host", g.access.HostID, "err", err)
	}
}

// Holds reports whether uri is an export the template mounts use now (the
// orphan reconciler keeps those).
func (m *Mounts) Holds(uri drivers.URI) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, g := range m.grants {
		if g.access.URI == uri {
			return true
		}
	}
	return false
}

package image

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/endpoint"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers"
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

// UpHoster lists the Up hosts (controller/hosts).
type UpHoster interface {
	UpHosts(ctx context.Context) ([]*stowagev1.Host, error)
}

// Mounts decides what each host's FUSE template mount shows: every Ready
// template of an Up image store of the host's zone, with where its bytes
// are (a local path when the host reaches the image store, otherwise a
// read-only export on an agent that does, made and kept by Mounts), and
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
	sel       *endpoint.Selector
	hosts     UpHoster
	transport string
	every     time.Duration
	log       *slog.Logger

	mu      sync.Mutex
	desired map[string]*stowagev1.TemplateCacheSpec // by host id
	exports map[exportKey]string                    // URL of each live export
	sizes   map[string]int64                        // template file size, by ref id (immutable)
}

type exportKey struct {
	host, session, path, transport string
}

// NewMounts returns the planner; transport is MountTransportHTTP or
// MountTransportNBD; every is how often it recomputes.
func NewMounts(db *meta.DB, sel *endpoint.Selector, hosts UpHoster, transport string, every time.Duration, log *slog.Logger) (*Mounts, error) {
	switch transport {
	case MountTransportHTTP, MountTransportNBD:
	default:
		return nil, fmt.Errorf("template mount transport %q: want http or nbd", transport)
	}
	if every <= 0 {
		every = 2 * time.Second
	}
	return &Mounts{db: db, sel: sel, hosts: hosts, transport: transport, every: every, log: log,
		desired: map[string]*stowagev1.TemplateCacheSpec{}, exports: map[exportKey]string{}, sizes: map[string]int64{}}, nil
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

// Reconcile recomputes every host's desired set once.
func (m *Mounts) Reconcile(ctx context.Context) error {
	up, err := m.hosts.UpHosts(ctx)
	if err != nil {
		return err
	}
	var mounting []*stowagev1.Host
	for _, h := range up {
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
	used := map[exportKey]bool{}
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
	var stale []exportKey
	for k := range m.exports {
		if !used[k] {
			stale = append(stale, k)
		}
	}
	m.mu.Unlock()
	m.unexport(ctx, stale, up)
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
		if err != nil || st.GetRole() != stowagev1.StoreRole_STORE_ROLE_IMAGE || st.GetState() != stowagev1.StoreState_STORE_STATE_UP {
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

// source returns where host h reads template it from, and the template
// file's size.
func (m *Mounts) source(ctx context.Context, h *stowagev1.Host, it mountable, up []*stowagev1.Host, used map[exportKey]bool) (string, int64, error) {
	sc := datastore.Scope(it.store)
	path := datastore.Path(it.store, it.ref.GetInstallPath())
	size, err := m.fileSize(ctx, it, path)
	if err != nil {
		return "", 0, err
	}
	if sc.Contains(h.GetZone(), h.GetCluster(), h.GetId()) {
		return path, size, nil
	}
	// An agent that reaches the image store exports the file; prefer one
	// that already does.
	var holder *stowagev1.Host
	for _, o := range up {
		if !sc.Contains(o.GetZone(), o.GetCluster(), o.GetId()) {
			continue
		}
		k := exportKey{o.GetId(), o.GetSessionId(), path, m.transport}
		m.mu.Lock()
		_, ok := m.exports[k]
		m.mu.Unlock()
		if ok {
			holder = o
			break
		}
		if holder == nil {
			holder = o
		}
	}
	if holder == nil {
		return "", 0, fmt.Errorf("no Up agent reaches image store %s", it.store.GetName())
	}
	k := exportKey{holder.GetId(), holder.GetSessionId(), path, m.transport}
	used[k] = true
	m.mu.Lock()
	url, ok := m.exports[k]
	m.mu.Unlock()
	if ok {
		return url, size, nil
	}
	ep, err := m.sel.ForHost(ctx, holder.GetId())
	if err != nil {
		return "", 0, err
	}
	var uri drivers.URI
	ctx, cancel := context.WithTimeout(ctx, stepTimeout)
	defer cancel()
	if m.transport == MountTransportNBD {
		// The mount reads the template file's bytes as they are (a qcow2
		// template stays qcow2 in the mount): export the file as raw bytes.
		uri, err = ep.ExportNBD(ctx, drivers.NBDExportRequest{Path: path, Format: drivers.FormatRaw, ReadOnly: true})
	} else {
		uri, err = ep.Export(ctx, path)
	}
	if err != nil {
		return "", 0, fmt.Errorf("export template %s on host %s: %w", it.t.GetId(), holder.GetId(), err)
	}
	m.mu.Lock()
	m.exports[k] = string(uri)
	m.mu.Unlock()
	m.log.Info("template mounts: exporting a template", "template", it.t.GetId(), "host", holder.GetId(), "transport", m.transport)
	return string(uri), size, nil
}

// fileSize returns the size of the template's file on its image store
// (not its virtual size: the mount shows the file as it is), asked once
// per template copy of a controller's life (copies never change).
func (m *Mounts) fileSize(ctx context.Context, it mountable, path string) (int64, error) {
	m.mu.Lock()
	size, ok := m.sizes[it.ref.GetId()]
	m.mu.Unlock()
	if ok {
		return size, nil
	}
	ch, err := m.sel.Select(ctx, "", datastore.Scope(it.store))
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, stepTimeout)
	defer cancel()
	fi, err := ch.Endpoint.StatPath(ctx, path)
	if err != nil {
		return 0, err
	}
	m.mu.Lock()
	m.sizes[it.ref.GetId()] = fi.Size
	m.mu.Unlock()
	return fi.Size, nil
}

// unexport ends exports no host's mount uses any more (best effort; an
// export of an agent that restarted is gone already).
func (m *Mounts) unexport(ctx context.Context, keys []exportKey, up []*stowagev1.Host) {
	for _, k := range keys {
		m.mu.Lock()
		url := m.exports[k]
		delete(m.exports, k)
		m.mu.Unlock()
		live := slices.ContainsFunc(up, func(h *stowagev1.Host) bool { return h.GetId() == k.host && h.GetSessionId() == k.session })
		if !live {
			continue
		}
		ep, err := m.sel.ForHost(ctx, k.host)
		if err != nil {
			continue
		}
		uctx, cancel := context.WithTimeout(ctx, stepTimeout)
		if k.transport == MountTransportNBD {
			err = ep.UnexportNBD(uctx, drivers.URI(url))
		} else {
			err = ep.Unexport(uctx, drivers.URI(url))
		}
		cancel()
		if err != nil {
			m.log.Warn("template mounts: unexport failed", "host", k.host, "err", err)
		}
	}
}

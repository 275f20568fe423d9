package agent

import (
	"context"
	"fmt"
	"slices"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// ImageCache is the host's template mount as the agent needs it: a separate
// long-lived process (agent/cachemount, `stowage cache serve`) reached over
// a unix socket, so that the mount outlives agent restarts.
type ImageCache interface {
	SyncCache(ctx context.Context, specs []*stowagev1.CacheSpec) (*stowagev1.CacheStatus, error)
	GetCache(ctx context.Context) (*stowagev1.CacheStatus, error)
}

// WithImageCache makes the agent report the host's template mount in its
// heartbeats and pass the controller's desired templates on to it. Each
// time the agent learns the mount point it tells its LocalHost
// (SetTemplateMount): Ref{Store: hostops.TemplateMount, Key: template id}
// names a file there, and lazy volumes' backing chains may end there.
func WithImageCache(c ImageCache) Option {
	return func(a *Agent) { a.cache = c }
}

// resyncEvery bounds how long an unchanged desired set goes without being
// sent again (a cache process that restarted from an older state file).
const resyncEvery = 30 * time.Second

// cacheStatus asks the cache process for its status (nil when there is no
// cache, or it does not answer: the controller then plans no lazy volume on
// this host and sends it no templates).
func (a *Agent) cacheStatus(ctx context.Context) *stowagev1.CacheStatus {
	if a.cache == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	st, err := a.cache.GetCache(ctx)
	if err != nil {
		a.cacheWarn("template mount does not answer; reporting no mount", err)
		return nil
	}
	a.learnMount(st)
	return st
}

func (a *Agent) learnMount(st *stowagev1.CacheStatus) {
	if st.GetMount() != "" {
		a.host.SetTemplateMount(st.GetMount())
	}
}

// cacheWarn logs a cache problem once per minute at most.
func (a *Agent) cacheWarn(msg string, err error) {
	a.mu.Lock()
	quiet := time.Since(a.cacheWarned) < time.Minute
	if !quiet {
		a.cacheWarned = time.Now()
	}
	a.mu.Unlock()
	if !quiet {
		a.log.Warn(msg, "err", err)
	}
}

// syncCache passes the controller's desired templates on to the cache
// process when they changed, or every resyncEvery.
func (a *Agent) syncCache(ctx context.Context, spec *stowagev1.TemplateCacheSpec) {
	if a.cache == nil || spec == nil {
		return
	}
	a.cacheSync.Lock()
	defer a.cacheSync.Unlock()
	a.mu.Lock()
	same := proto.Equal(spec, a.cacheSpec) && time.Since(a.cacheSynced) < resyncEvery
	a.mu.Unlock()
	if same {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	st, err := a.cache.SyncCache(ctx, a.localSources(spec.GetTemplates()))
	if err != nil {
		a.cacheWarn("template mount sync failed; retrying at the next heartbeat", err)
		return
	}
	a.learnMount(st)
	a.mu.Lock()
	a.cacheSpec, a.cacheSynced = spec, time.Now()
	a.mu.Unlock()
	a.log.Debug("template mount synced", "templates", len(spec.GetTemplates()))
}

// localSources returns specs with every store://<store>/<key> source (a
// template on a store this host serves, as its driver granted it) turned
// into the file on this host, resolved beneath the store's root like any
// other Ref; a template whose source does not resolve is left out (and
// logged), never passed on as a path the cache process would open blindly.
func (a *Agent) localSources(specs []*stowagev1.CacheSpec) []*stowagev1.CacheSpec {
	out := make([]*stowagev1.CacheSpec, 0, len(specs))
	for _, sp := range specs {
		ref, ok, err := hostops.ParseRef(drivers.URI(sp.GetUrl()))
		if !ok {
			out = append(out, sp)
			continue
		}
		var p string
		if err == nil {
			p, err = a.host.LocalPath(ref)
		}
		if err != nil {
			a.cacheWarn("a template's source does not resolve on this host; leaving it out of the mount", err)
			continue
		}
		c := proto.Clone(sp).(*stowagev1.CacheSpec)
		c.Url = p
		out = append(out, c)
	}
	return out
}

// showTemplate makes the mount show sp now (a show_template step): the last
// desired set applied, with sp added or replacing the template of the same
// id, is sent to the cache process synchronously, and the step succeeds
// once the cache's status lists the template without an error. The merged
// set becomes the last applied one, so the next heartbeat's set (which
// has the template once the controller's mount planner does) changes
// nothing the mount shows.
func (a *Agent) showTemplate(ctx context.Context, sp *stowagev1.CacheSpec) error {
	if sp.GetId() == "" {
		return fmt.Errorf("show_template: no template: %w", errdefs.ErrInvalid)
	}
	a.cacheSync.Lock()
	defer a.cacheSync.Unlock()
	a.mu.Lock()
	merged := &stowagev1.TemplateCacheSpec{}
	if a.cacheSpec != nil {
		merged = proto.Clone(a.cacheSpec).(*stowagev1.TemplateCacheSpec)
	}
	a.mu.Unlock()
	replaced := false
	for i, t := range merged.Templates {
		if t.GetId() == sp.GetId() {
			if proto.Equal(t, sp) {
				// Shown already, as wanted: ask the mount whether it is.
				if st, err := a.cache.GetCache(ctx); err == nil && shows(st, sp.GetId()) == nil {
					return nil
				}
			}
			merged.Templates[i], replaced = sp, true
		}
	}
	if !replaced {
		merged.Templates = append(merged.Templates, sp)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	local := a.localSources(merged.GetTemplates())
	if !slices.ContainsFunc(local, func(c *stowagev1.CacheSpec) bool { return c.GetId() == sp.GetId() }) {
		return fmt.Errorf("template %s: its source does not resolve on this host: %w", sp.GetId(), errdefs.ErrFailedPrecondition)
	}
	st, err := a.cache.SyncCache(ctx, local)
	if err != nil {
		return fmt.Errorf("template mount: %w", err)
	}
	a.learnMount(st)
	a.mu.Lock()
	a.cacheSpec, a.cacheSynced = merged, time.Now()
	a.mu.Unlock()
	return shows(st, sp.GetId())
}

// shows reports whether st lists template id without an error.
func shows(st *stowagev1.CacheStatus, id string) error {
	for _, t := range st.GetTemplates() {
		if t.GetId() == id {
			if t.GetError() != "" {
				return fmt.Errorf("template mount cannot show template %s: %s: %w", id, t.GetError(), errdefs.ErrUnavailable)
			}
			return nil
		}
	}
	return fmt.Errorf("template mount does not list template %s after the sync: %w", id, errdefs.ErrUnavailable)
}

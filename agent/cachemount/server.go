// Package cachemount is the long-lived process behind a host's FUSE
// template mount (`stowage cache serve`, its own systemd unit): it owns a
// datapath/imagecache Cache and its read-only mount, and serves
// ImageCacheService on a unix socket to the local agent, which passes on
// the controller's desired set of templates (SyncCache) and reports the
// mount in its heartbeats (GetCache).
//
// The mount belongs to this process, not to the agent, so restarting or
// upgrading the agent leaves every open template (the backing files of
// lazy volumes) untouched. The desired set is kept in a state file
// (temp+fsync+rename), so after a crash of this process the next start
// detaches the stale mount, mounts the same templates again, with the
// chunks cached so far, before any agent calls.
//
// Each template is opened as "stowage-template:<id>" through a resolver:
// its bytes come from whatever URL the last sync named (an HTTP export or
// an NBD export of the agent holding the image store, or a local path),
// and the cache keys its chunks by the template's content identity, so a
// serving agent's restart (a new export URL) costs no refetch.
package cachemount

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/datapath/imagecache"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/redact"
)

// Config sets up a Server.
type Config struct {
	// Mount is the mount point (created if missing).
	Mount string
	// Cache configures the chunk cache; its Dir also holds the state file.
	// Cache.Open is the opener of concrete URLs (default
	// imagecache.OpenStream with default HTTP options).
	Cache imagecache.Options
	// MountOptions configures the FUSE mount.
	MountOptions imagecache.MountOptions
	Logger       *slog.Logger
}

// Server is a running template mount.
type Server struct {
	cfg   Config
	log   *slog.Logger
	res   *resolver
	cache *imagecache.Cache
	mount *imagecache.Mount

	mu    sync.Mutex // serializes syncs
	specs map[string]*stowagev1.CacheSpec
	errs  map[string]string
}

const stateFile = "templates.json"

// Open detaches a stale mount left at cfg.Mount by a crash, opens the
// cache, adds the templates of the state file and mounts.
func Open(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.Mount == "" || cfg.Cache.Dir == "" {
		return nil, fmt.Errorf("template mount: a mount point and a cache directory are required: %w", errdefs.ErrInvalid)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if err := imagecache.CleanStaleMount(cfg.Mount); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.Mount, 0o755); err != nil {
		return nil, fmt.Errorf("template mount %s: %w", cfg.Mount, errors.Join(err, errdefs.ErrUnavailable))
	}
	open := cfg.Cache.Open
	if open == nil {
		open = imagecache.OpenStream(defaultHTTP())
	}
	s := &Server{cfg: cfg, log: cfg.Logger, res: newResolver(open), specs: map[string]*stowagev1.CacheSpec{}, errs: map[string]string{}}
	co := cfg.Cache
	co.Open, co.Logger = s.res.Open, cfg.Logger
	c, err := imagecache.New(co)
	if err != nil {
		return nil, err
	}
	s.cache = c
	specs, err := s.loadState()
	if err != nil {
		c.Close()
		return nil, err
	}
	s.apply(ctx, specs)
	mo := cfg.MountOptions
	if mo.Logger == nil {
		mo.Logger = cfg.Logger
	}
	m, err := imagecache.MountCache(ctx, c, cfg.Mount, mo)
	if err != nil {
		c.Close()
		return nil, err
	}
	s.mount = m
	s.log.Info("template mount ready", "mount", cfg.Mount, "templates", len(s.specs), "passthrough", m.Passthrough(), "cache_dir", cfg.Cache.Dir)
	return s, nil
}

// Mount returns the FUSE mount.
func (s *Server) Mount() *imagecache.Mount { return s.mount }

// Close unmounts (waiting up to timeout for open files to close, then
// detaching) and closes the cache.
func (s *Server) Close(timeout time.Duration) error {
	err := s.mount.Unmount(timeout)
	s.mount.Wait()
	return errors.Join(err, s.cache.Close())
}

// Sync makes the mount show exactly specs; see ImageCacheService.SyncCache.
// A template that cannot be added is reported in its status, not as an
// error of the whole sync; an invalid request changes nothing.
func (s *Server) Sync(ctx context.Context, specs []*stowagev1.CacheSpec) (*stowagev1.CacheStatus, error) {
	seen := map[string]bool{}
	for _, sp := range specs {
		if err := checkSpec(sp); err != nil {
			return nil, err
		}
		if seen[sp.GetId()] {
			return nil, fmt.Errorf("template %s is listed twice: %w", sp.GetId(), errdefs.ErrInvalid)
		}
		seen[sp.GetId()] = true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.applyLocked(ctx, specs)
	if err := s.saveState(); err != nil {
		return nil, err
	}
	return s.statusLocked(), nil
}

func checkSpec(sp *stowagev1.CacheSpec) error {
	switch {
	case sp.GetId() == "" || sp.GetId() == "." || sp.GetId() == ".." || len(sp.GetId()) > 255 || strings.ContainsAny(sp.GetId(), "/\x00"):
		return fmt.Errorf("template id %q: want a file name: %w", sp.GetId(), errdefs.ErrInvalid)
	case sp.GetUrl() == "":
		return fmt.Errorf("template %s: no source URL: %w", sp.GetId(), errdefs.ErrInvalid)
	case sp.GetSize() <= 0:
		return fmt.Errorf("template %s: size %d: %w", sp.GetId(), sp.GetSize(), errdefs.ErrInvalid)
	}
	return nil
}

func (s *Server) apply(ctx context.Context, specs []*stowagev1.CacheSpec) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.applyLocked(ctx, specs)
}

func identity(sp *stowagev1.CacheSpec) string {
	if sp.GetIdentity() != "" {
		return sp.GetIdentity()
	}
	return fmt.Sprintf("%s/%d", sp.GetId(), sp.GetSize())
}

func (s *Server) applyLocked(ctx context.Context, specs []*stowagev1.CacheSpec) {
	want := map[string]*stowagev1.CacheSpec{}
	for _, sp := range specs {
		want[sp.GetId()] = sp
	}
	// Removed templates first, to free space for new ones. A template that
	// was pinned is kept for one more sync, unpinned: the controller never
	// drops a template a lazy volume still uses, but a volume and its
	// template deleted between two syncs must not cost a running VM its
	// backing file on a lost race.
	for id, old := range s.specs {
		if want[id] != nil {
			continue
		}
		if old.GetPinned() {
			s.cache.Unpin(id)
			old.Pinned = false
			s.log.Info("template mount: template no longer wanted; keeping it until the next sync", "template", id)
			continue
		}
		if err := s.cache.Remove(ctx, id); err != nil {
			s.log.Warn("template mount: remove failed", "template", id, "err", err)
		}
		s.res.forget(id)
		delete(s.specs, id)
		delete(s.errs, id)
		s.log.Info("template mount: template removed", "template", id)
	}
	for _, sp := range specs {
		id := sp.GetId()
		old := s.specs[id]
		if old != nil && (old.GetSize() != sp.GetSize() || identity(old) != identity(sp)) {
			// Different content under the same id: drop the cached chunks.
			if old.GetPinned() {
				s.cache.Unpin(id)
			}
			if err := s.cache.Remove(ctx, id); err != nil {
				s.log.Warn("template mount: remove of changed template failed", "template", id, "err", err)
			}
			delete(s.specs, id)
			old = nil
		}
		if old != nil && old.GetUrl() != sp.GetUrl() {
			s.log.Info("template mount: template source moved; cached chunks kept", "template", id, "source", redact.URL(sp.GetUrl()))
		}
		s.res.set(id, location{url: sp.GetUrl(), size: sp.GetSize(), identity: identity(sp)})
		if _, ok := s.cache.Get(id); !ok {
			if _, err := s.cache.Add(ctx, id, scheme+id, sp.GetSize()); err != nil {
				s.errs[id] = err.Error()
				s.log.Warn("template mount: add failed", "template", id, "err", err)
				continue
			}
			s.log.Info("template mount: template added", "template", id, "size", sp.GetSize(), "source", redact.URL(sp.GetUrl()))
		}
		delete(s.errs, id)
		switch {
		case sp.GetPinned() && !old.GetPinned():
			s.cache.Pin(id)
		case !sp.GetPinned() && old.GetPinned():
			s.cache.Unpin(id)
		}
		s.specs[id] = cloneSpec(sp)
	}
}

func cloneSpec(sp *stowagev1.CacheSpec) *stowagev1.CacheSpec {
	return &stowagev1.CacheSpec{Id: sp.GetId(), Url: sp.GetUrl(), Size: sp.GetSize(), Format: sp.GetFormat(), Identity: sp.GetIdentity(), Pinned: sp.GetPinned()}
}

// Status returns the mount and its templates.
func (s *Server) Status() *stowagev1.CacheStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.statusLocked()
}

func (s *Server) statusLocked() *stowagev1.CacheStatus {
	st := &stowagev1.CacheStatus{Mount: s.cfg.Mount, CapacityBytes: s.cfg.Cache.CapacityBytes}
	if s.mount != nil {
		st.Passthrough = s.mount.Passthrough()
		mc := s.mount.Counters()
		st.ReadHitBytes, st.ReadMissBytes, st.PassthroughOpens = mc.HitBytes, mc.MissBytes, mc.PassthroughOpens
	}
	if s.cache != nil {
		cc := s.cache.Counters()
		st.FetchedBytes, st.CorruptChunks = cc.FetchedBytes, cc.CorruptChunks
	}
	ids := make([]string, 0, len(s.specs)+len(s.errs))
	for id := range s.specs {
		ids = append(ids, id)
	}
	for id := range s.errs {
		if s.specs[id] == nil {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	cs := s.cache.ChunkSize()
	for _, id := range ids {
		ct := &stowagev1.CachedTemplate{Id: id, Error: s.errs[id]}
		if sp := s.specs[id]; sp != nil {
			ct.Size, ct.Format, ct.Pinned = sp.GetSize(), sp.GetFormat(), sp.GetPinned()
		}
		if t, ok := s.cache.Get(id); ok {
			stt := t.Stats()
			ct.CachedBytes = min(int64(stt.CachedChunks)*cs, t.Size())
			ct.Complete = t.Complete()
			st.CachedBytes += ct.CachedBytes
		}
		st.Templates = append(st.Templates, ct)
	}
	return st
}

// state is the state file: the last desired set.
type state struct {
	Templates []json.RawMessage `json:"templates"`
}

func (s *Server) loadState() ([]*stowagev1.CacheSpec, error) {
	b, err := os.ReadFile(filepath.Join(s.cfg.Cache.Dir, stateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("template mount state: %w", errors.Join(err, errdefs.ErrUnavailable))
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		// Written by rename only, so never torn; a bad file is not ours to guess at.
		s.log.Warn("template mount: unreadable state file; starting empty until the agent syncs", "err", err)
		return nil, nil
	}
	var out []*stowagev1.CacheSpec
	for _, raw := range st.Templates {
		sp := &stowagev1.CacheSpec{}
		if err := protojson.Unmarshal(raw, sp); err != nil || checkSpec(sp) != nil {
			s.log.Warn("template mount: skipping a bad entry of the state file", "entry", string(raw))
			continue
		}
		out = append(out, sp)
	}
	return out, nil
}

// saveState writes the desired templates to the state file crash-safely
// (durable.WriteFile); a failure is errdefs.ErrUnavailable.
func (s *Server) saveState() error {
	var st state
	ids := make([]string, 0, len(s.specs))
	for id := range s.specs {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		b, err := protojson.Marshal(s.specs[id])
		if err != nil {
			return fmt.Errorf("template mount state: %w", err)
		}
		st.Templates = append(st.Templates, b)
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("template mount state: %w", err)
	}
	path := filepath.Join(s.cfg.Cache.Dir, stateFile)
	if err := durable.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, errors.Join(err, errdefs.ErrUnavailable))
	}
	return nil
}

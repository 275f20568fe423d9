package hosts

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"sync/atomic"
	"time"

	"github.com/stowage/stowage/controller/meta"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// upView is the Up host records as read at one moment. Every volume create
// plan selects among the Up hosts (UpHosts): reading 1,000 host records
// (with their capabilities) from metadata on each plan took ~12 ms. The
// view is read-only (its records are shared). The Service drops it on each
// host write it makes (registration, a state change or new capabilities
// in a heartbeat, a host found disconnected), the liveness monitor renews
// it on each tick from the records it reads anyway, and it is read again
// when older than Config.UpHostsMaxAge (a change by another controller).
// States change in metadata only, by transitions that read the record.
type upView struct {
	at    time.Time
	hosts []*stowagev1.Host
}

type upCache struct {
	cur atomic.Pointer[upView]
	gen atomic.Uint64
}

// UpHosts returns the Up hosts, least busy first (by the in-flight task
// counts of their latest heartbeats), for endpoint selection. The records
// are shared with other callers: read them, do not change them.
func (s *Service) UpHosts(ctx context.Context) ([]*stowagev1.Host, error) {
	v := s.up.cur.Load()
	if v == nil || s.cfg.UpHostsMaxAge < 0 || time.Since(v.at) >= s.cfg.UpHostsMaxAge {
		gen := s.up.gen.Load()
		// A scan of the host records, not of the state index: on etcd an
		// index entry costs a read of its record each, the records come
		// 512 to a range request.
		hs, err := s.db.Hosts().List(ctx, meta.Filter[*stowagev1.Host]{Where: func(h *stowagev1.Host) bool {
			return h.GetState() == stowagev1.HostState_HOST_STATE_UP
		}})
		if err != nil {
			return nil, fmt.Errorf("read Up hosts: %w", err)
		}
		v = &upView{at: time.Now(), hosts: hs}
		s.keepUp(gen, v)
	}
	out := slices.Clone(v.hosts)
	busy := make(map[string]int32, len(out))
	s.mu.Lock()
	for _, h := range out {
		n := h.GetInFlightTasks()
		if l, ok := s.seen[h.GetId()]; ok && l.session == h.GetSessionId() {
			n = l.inFlight
		}
		busy[h.GetId()] = n
	}
	s.mu.Unlock()
	sort.SliceStable(out, func(i, j int) bool {
		if a, b := busy[out[i].GetId()], busy[out[j].GetId()]; a != b {
			return a < b
		}
		return out[i].GetId() < out[j].GetId()
	})
	return out, nil
}

// keepUp stores v unless a host write dropped the view since gen was read.
func (s *Service) keepUp(gen uint64, v *upView) {
	if s.cfg.UpHostsMaxAge >= 0 && s.up.gen.Load() == gen {
		s.up.cur.Store(v)
	}
}

// dropUp forgets the view after a host write of this Service.
func (s *Service) dropUp() {
	s.up.gen.Add(1)
	s.up.cur.Store(nil)
}

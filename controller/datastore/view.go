package datastore

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/stowage/stowage/controller/meta"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// viewTTL bounds how old the store view the heartbeat path reads may be
// when another controller (sharing etcd metadata) changed a store.
const viewTTL = time.Second

// storeView is every store record as read at one moment. Every heartbeat
// of every host reads the stores (Assignments, ObserveHost): with 1,000
// hosts and 200 stores, scanning them on each beat cost most of the
// controller's CPU. The view is read-only (its records are shared); the
// Service drops it on each of its own store writes, and reads it again at
// most viewTTL later otherwise. Decisions that change a store still
// compare-and-set on the revision stored in metadata.
type storeView struct {
	at   time.Time
	recs []*stowagev1.DataStore
	byID map[string]*stowagev1.DataStore
}

// viewCache holds the current view and a generation that each drop bumps,
// so that a view read while a write committed is not kept.
type viewCache struct {
	cur atomic.Pointer[storeView]
	gen atomic.Uint64
}

// view returns the store view, read again when dropped or older than viewTTL.
func (s *Service) view(ctx context.Context) (*storeView, error) {
	if v := s.views.cur.Load(); v != nil && time.Since(v.at) < viewTTL {
		return v, nil
	}
	gen := s.views.gen.Load()
	recs, err := s.db.Stores().List(ctx, meta.Filter[*stowagev1.DataStore]{})
	if err != nil {
		return nil, fmt.Errorf("read stores: %w", err)
	}
	v := &storeView{at: time.Now(), recs: recs, byID: make(map[string]*stowagev1.DataStore, len(recs))}
	for _, r := range recs {
		v.byID[r.GetId()] = r
	}
	if s.views.gen.Load() == gen {
		s.views.cur.Store(v)
	}
	return v, nil
}

// dropView forgets the view after a store write of this Service.
func (s *Service) dropView() {
	s.views.gen.Add(1)
	s.views.cur.Store(nil)
}

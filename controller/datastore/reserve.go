package datastore

import (
	"fmt"
	"sync"
	"time"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"

	"github.com/stowage/stowage/errdefs"
)

// Reservations: the bytes a job admitted to a store will write there, counted
// as used by admission (refusal, PickStore) until the store's own report
// shows them. Without them, two copies admitted one after the other, each
// fitting alone, could together fill a store past its disable threshold:
// the free space a store reports moves only as the copies write and the
// next heartbeat tells.
//
// A reservation is made under the ledger's lock with the admission check
// (Reserve), so two plans cannot both take the last space. It lives while
// its job runs and for a grace after it ends (Release): the copy's bytes
// are on disk by then, but the store's report that counts them comes with
// a later heartbeat. The ledger is in memory, the leading controller's: a
// job resumed after a restart or by a new leader holds its reservation
// again from its record (Hold), without a check (it was admitted already).

// DefaultReservationGrace is how long a released reservation still counts
// unless SetReservationGrace says otherwise.
const DefaultReservationGrace = 6 * time.Second

type reservation struct {
	store string
	bytes int64
	ended time.Time // zero while its job runs
}

type ledger struct {
	mu    sync.Mutex
	by    map[string]*reservation // by key: the job's id
	grace time.Duration
	now   func() time.Time
}

func newLedger() *ledger {
	return &ledger{by: map[string]*reservation{}, grace: DefaultReservationGrace, now: time.Now}
}

// reserved is what store has reserved, dropping reservations past their
// grace. The caller holds mu.
func (l *ledger) reserved(store string) int64 {
	now := l.now()
	var n int64
	for k, r := range l.by {
		if !r.ended.IsZero() && now.Sub(r.ended) >= l.grace {
			delete(l.by, k)
			continue
		}
		if r.store == store {
			n += r.bytes
		}
	}
	return n
}

// SetReservationGrace sets how long a reservation still counts after its
// job ended: long enough for a heartbeat to report the store's free space
// with the job's bytes in it (the controller wires two heartbeat
// intervals: the beat after the job's end may have been measured before
// it).
func (s *Service) SetReservationGrace(d time.Duration) {
	s.ledger.mu.Lock()
	defer s.ledger.mu.Unlock()
	s.ledger.grace = d
}

// Reserved is the bytes jobs have reserved on the store now.
func (s *Service) Reserved(storeID string) int64 {
	s.ledger.mu.Lock()
	defer s.ledger.mu.Unlock()
	return s.ledger.reserved(storeID)
}

// Reserve admits a job (key, its id) to st and reserves bytes there, in
// one step: st must take check more bytes asking for tags (Admit's rule,
// with what other jobs reserved counted as used), then bytes are
// reserved. check is what admission goes by (0 for a store asked for by
// name: refused only at its threshold); bytes what the job may write.
// Reserving a key again replaces its reservation.
func (s *Service) Reserve(st *stowagev1.DataStore, key string, check, bytes int64, tags []string) error {
	if key == "" {
		return fmt.Errorf("reserve on store %s: no key: %w", st.GetName(), errdefs.ErrInvalid)
	}
	s.ledger.mu.Lock()
	defer s.ledger.mu.Unlock()
	delete(s.ledger.by, key)
	if why := s.refusalLocked(st, check, tags); why != "" {
		return fmt.Errorf("store %s cannot take it: %s: %w", st.GetName(), why, errdefs.ErrFailedPrecondition)
	}
	if bytes > 0 {
		s.ledger.by[key] = &reservation{store: st.GetId(), bytes: bytes}
	}
	return nil
}

// Hold reserves bytes on the store for the job key without a check: a job
// admitted before, run again (after a restart, or by a new leader).
func (s *Service) Hold(storeID, key string, bytes int64) {
	if key == "" || bytes <= 0 {
		return
	}
	s.ledger.mu.Lock()
	defer s.ledger.mu.Unlock()
	if r, ok := s.ledger.by[key]; ok && r.ended.IsZero() {
		return
	}
	s.ledger.by[key] = &reservation{store: storeID, bytes: bytes}
}

// Release says the job key ended: its reservation counts for the grace
// more, then goes. A job that never ran (its submission failed) gives its
// reservation up at once with Cancel.
func (s *Service) Release(key string) {
	s.ledger.mu.Lock()
	defer s.ledger.mu.Unlock()
	if r, ok := s.ledger.by[key]; ok && r.ended.IsZero() {
		r.ended = s.ledger.now()
	}
}

// Cancel drops the reservation of key at once: its job was never
// submitted.
func (s *Service) Cancel(key string) {
	s.ledger.mu.Lock()
	defer s.ledger.mu.Unlock()
	delete(s.ledger.by, key)
}

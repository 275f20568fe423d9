package datastore

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stowage/stowage/errdefs"
)

// TestReserveAdmitsAtMostWhatFits: jobs admitted to a store reserve what
// they will write, and admission counts it as used. Sixteen plans racing
// for a store with room for three (50 of 100 used, disable threshold 85%,
// 10 bytes each) get three admissions, the rest a refusal naming the
// reservations; none is lost or counted twice.
func TestReserveAdmitsAtMostWhatFits(t *testing.T) {
	s, _ := newService(t)
	st := upStore(t, s, "p1", 50)
	var admitted, refused atomic.Int32
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := s.Reserve(st, fmt.Sprintf("job%d", i), 10, 10, nil)
			switch {
			case err == nil:
				admitted.Add(1)
			case errdefs.IsFailedPrecondition(err) && strings.Contains(err.Error(), "reserved by jobs in flight"):
				refused.Add(1)
			default:
				t.Errorf("job%d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	// 50 used + r reserved + 10 must stay below 85: r in {0, 10, 20}.
	if admitted.Load() != 3 || refused.Load() != 13 {
		t.Fatalf("admitted %d, refused %d; want 3 and 13", admitted.Load(), refused.Load())
	}
	if got := s.Reserved(st.GetId()); got != 30 {
		t.Fatalf("reserved %d, want 30", got)
	}
	// PickStore sees the reservations too.
	if _, why, err := pick(t, s, 10); !errdefs.IsFailedPrecondition(err) || !strings.Contains(why, "would be 90.0% full with 10 more bytes (30 bytes of it reserved by jobs in flight)") {
		t.Fatalf("pick with 30 reserved: %q, %v", why, err)
	}
}

// TestReservationLifecycle: a released reservation still counts for the
// grace (the store's next report is what shows the bytes), then goes; a
// cancelled one goes at once; Hold takes a reservation back without a
// check (a job resumed by a new leader); reserving a key again replaces
// its reservation. PickStore prefers the store with the most free space
// less reservations.
func TestReservationLifecycle(t *testing.T) {
	s, _ := newService(t)
	now := time.Unix(1_000_000, 0)
	s.ledger.now = func() time.Time { return now }
	s.SetReservationGrace(9 * time.Second)
	a := upStore(t, s, "a", 30) // 70 free
	b := upStore(t, s, "b", 40) // 60 free

	if name, _, err := pick(t, s, 5); err != nil || name != "a" {
		t.Fatalf("no reservations: %s, %v; want a", name, err)
	}
	if err := s.Reserve(a, "j1", 5, 20, nil); err != nil {
		t.Fatal(err)
	}
	name, why, err := pick(t, s, 5)
	if err != nil || name != "b" || !strings.Contains(why, "most free space (60 bytes, less what jobs in flight reserved)") {
		t.Fatalf("a has 20 reserved: %s (%s), %v; want b", name, why, err)
	}
	if err := s.Reserve(a, "j1", 5, 25, nil); err != nil || s.Reserved(a.GetId()) != 25 {
		t.Fatalf("reserve j1 again: %v, reserved %d; want it replaced (25)", err, s.Reserved(a.GetId()))
	}

	s.Release("j1")
	now = now.Add(8 * time.Second)
	if got := s.Reserved(a.GetId()); got != 25 {
		t.Fatalf("8 s after release: %d reserved, want 25 (grace 9 s)", got)
	}
	now = now.Add(2 * time.Second)
	if got := s.Reserved(a.GetId()); got != 0 {
		t.Fatalf("10 s after release: %d reserved, want 0", got)
	}

	if err := s.Reserve(b, "j2", 5, 30, nil); err != nil {
		t.Fatal(err)
	}
	s.Cancel("j2")
	if got := s.Reserved(b.GetId()); got != 0 {
		t.Fatalf("after cancel: %d reserved on b, want 0", got)
	}

	// A resumed job holds again without a check, even past the threshold.
	s.Hold(b.GetId(), "j3", 80)
	if got := s.Reserved(b.GetId()); got != 80 {
		t.Fatalf("held: %d, want 80", got)
	}
	s.Hold(b.GetId(), "j3", 80) // its Run again: no double count
	if got := s.Reserved(b.GetId()); got != 80 {
		t.Fatalf("held twice: %d, want 80", got)
	}
	if err := s.Reserve(b, "j4", 0, 1, nil); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("b with 80 held: %v, want refused even by name (at its threshold)", err)
	}
	if err := s.Reserve(b, "", 0, 1, nil); !errdefs.IsInvalid(err) {
		t.Fatalf("no key: %v, want invalid", err)
	}
}

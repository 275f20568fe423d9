package datastore

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Thresholds are capacity thresholds, fractions of a store's capacity in
// (0, 1]. At Disable allocation on the store stops (CloudStack's
// pool.storage.capacity.disablethreshold); above Notify the
// StoreCapacityNotify alert fires (cluster.storage.capacity.notificationthreshold).
type Thresholds struct {
	Disable float64
	Notify  float64
}

// DefaultThresholds are CloudStack's defaults.
var DefaultThresholds = Thresholds{Disable: 0.85, Notify: 0.75}

// Validate checks both thresholds lie in (0, 1].
func (t Thresholds) Validate() error {
	for _, v := range []struct {
		name string
		v    float64
	}{{"disable", t.Disable}, {"notify", t.Notify}} {
		if err := checkThreshold(v.name, v.v); err != nil {
			return err
		}
	}
	return nil
}

func checkThreshold(name string, v float64) error {
	if !(v > 0 && v <= 1) {
		return fmt.Errorf("capacity %s threshold %g: use a fraction of the capacity in (0, 1], e.g. 0.85: %w", name, v, errdefs.ErrInvalid)
	}
	return nil
}

// SetDefaults sets the thresholds of stores that have none of their own.
func (s *Service) SetDefaults(t Thresholds) error {
	if err := t.Validate(); err != nil {
		return err
	}
	s.defaults = t
	return nil
}

// Effective returns the thresholds in force on st: its own, else the
// defaults.
func (s *Service) Effective(st *stowagev1.DataStore) Thresholds {
	t := s.defaults
	if st.CapacityDisableThreshold != nil {
		t.Disable = st.GetCapacityDisableThreshold()
	}
	if st.CapacityNotifyThreshold != nil {
		t.Notify = st.GetCapacityNotifyThreshold()
	}
	return t
}

// decorate fills in the reply-only fields of a record the caller owns.
func (s *Service) decorate(st *stowagev1.DataStore) *stowagev1.DataStore {
	if st == nil {
		return nil
	}
	t := s.Effective(st)
	st.EffectiveDisableThreshold, st.EffectiveNotifyThreshold = t.Disable, t.Notify
	return st
}

var tagPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:-]{0,62}$`)

// NormalizeTags checks storage tags (1-63 letters, digits, '.', '_', ':'
// or '-') and returns them sorted, without duplicates.
func NormalizeTags(tags []string) ([]string, error) {
	out := make([]string, 0, len(tags))
	for _, t := range tags {
		if !tagPattern.MatchString(t) {
			return nil, fmt.Errorf("storage tag %q: use 1-63 letters, digits, '.', '_', ':' or '-', starting with a letter or digit: %w", t, errdefs.ErrInvalid)
		}
		out = append(out, t)
	}
	sort.Strings(out)
	return slices.Compact(out), nil
}

// lacking returns the tags of want that st does not carry.
func lacking(st *stowagev1.DataStore, want []string) []string {
	var miss []string
	for _, t := range want {
		if !slices.Contains(st.GetTags(), t) {
			miss = append(miss, t)
		}
	}
	return miss
}

// refusal says why st cannot take a new object of need bytes asking for
// tags, or "" when it can. What jobs in flight reserved on st counts as
// used (reserve.go). State is checked by the callers.
func (s *Service) refusal(st *stowagev1.DataStore, need int64, tags []string) string {
	s.ledger.mu.Lock()
	defer s.ledger.mu.Unlock()
	return s.refusalLocked(st, need, tags)
}

// refusalLocked is refusal with the ledger's lock held.
func (s *Service) refusalLocked(st *stowagev1.DataStore, need int64, tags []string) string {
	if miss := lacking(st, tags); len(miss) > 0 {
		return fmt.Sprintf("lacks storage tag %s (has %s)", strings.Join(miss, ", "), tagList(st.GetTags()))
	}
	capacity := st.GetCapacityBytes()
	if capacity <= 0 {
		return "" // a store that reports no capacity cannot be judged
	}
	t := s.Effective(st)
	reserved := s.ledger.reserved(st.GetId())
	held := ""
	if reserved > 0 {
		held = fmt.Sprintf(" (%d bytes of it reserved by jobs in flight)", reserved)
	}
	used := capacity - st.GetAvailableBytes() + reserved
	after := float64(used+max(need, 0)) / float64(capacity)
	if after >= t.Disable {
		if need > 0 {
			return fmt.Sprintf("would be %.1f%% full with %d more bytes%s, at or above its disable threshold %.0f%%", after*100, need, held, t.Disable*100)
		}
		return fmt.Sprintf("%.1f%% full%s, at or above its disable threshold %.0f%%", after*100, held, t.Disable*100)
	}
	if free := st.GetAvailableBytes() - reserved; need > 0 && st.GetAvailableBytes() > 0 && free < need {
		return fmt.Sprintf("%d bytes free%s, %d needed", free, held, need)
	}
	return ""
}

// free is st's free space less what jobs in flight reserved there.
func (s *Service) free(st *stowagev1.DataStore) int64 {
	return st.GetAvailableBytes() - s.Reserved(st.GetId())
}

func tagList(tags []string) string {
	if len(tags) == 0 {
		return "none"
	}
	return strings.Join(tags, ", ")
}

// Admit checks that the Up store st can take a new object of need bytes
// asking for tags: it has every tag and stays below its disable threshold
// with need more bytes. A store asked for by name is checked with need 0:
// refused at its threshold, not for an upper bound of what a copy writes.
func (s *Service) Admit(st *stowagev1.DataStore, need int64, tags []string) error {
	if why := s.refusal(st, need, tags); why != "" {
		return fmt.Errorf("store %s cannot take it: %s: %w", st.GetName(), why, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// PickStore chooses, among the Up stores of role in zone ("" = any) that
// carry every tag in tags and stay below their disable threshold with need
// more bytes, the one with the most free space; the reasons say why it and
// not the others.
func (s *Service) PickStore(ctx context.Context, role stowagev1.StoreRole, zone string, need int64, tags ...string) (*stowagev1.DataStore, []string, error) {
	all, err := s.List(ctx, role, zone, "", 0)
	if err != nil {
		return nil, nil, err
	}
	var best *stowagev1.DataStore
	var reasons []string
	for _, st := range all {
		switch why := s.refusal(st, need, tags); {
		case st.GetState() != stowagev1.StoreState_STORE_STATE_UP:
			reasons = append(reasons, fmt.Sprintf("store %s skipped: %s", st.GetName(), meta.StoreStateName(st.GetState())))
		case len(st.GetHostIds()) == 0:
			reasons = append(reasons, fmt.Sprintf("store %s skipped: no Up host reaches it", st.GetName()))
		case why != "":
			reasons = append(reasons, fmt.Sprintf("store %s skipped: %s", st.GetName(), why))
		case best == nil || s.free(st) > s.free(best):
			best = st
		}
	}
	roleName := strings.ToLower(meta.StoreRoleName(role))
	if best == nil {
		if len(all) == 0 {
			where := ""
			if zone != "" {
				where = " in zone " + zone
			}
			return nil, nil, fmt.Errorf("no %s store is added%s (stowage store add --role %s): %w", roleName, where, roleName, errdefs.ErrFailedPrecondition)
		}
		return nil, reasons, fmt.Errorf("no Up %s store can take it (%s): %w", meta.StoreRoleName(role), strings.Join(reasons, "; "), errdefs.ErrFailedPrecondition)
	}
	with := ""
	if len(tags) > 0 {
		with = ", has tags " + strings.Join(tags, ", ")
	}
	reasons = append([]string{fmt.Sprintf("store %s: Up%s, below its disable threshold, most free space (%d bytes, less what jobs in flight reserved) of %d %s stores", best.GetName(), with, s.free(best), len(all), meta.StoreRoleName(role))}, reasons...)
	return best, reasons, nil
}

// Serves reports whether st serves what it holds: Up, or Disabled (which
// only stops new objects landing on it).
func Serves(st *stowagev1.DataStore) bool {
	return st.GetState() == stowagev1.StoreState_STORE_STATE_UP || st.GetState() == stowagev1.StoreState_STORE_STATE_DISABLED
}

// Disable stops allocation on an Up store (event Disable). What it holds
// stays served: mounts, grants, copies from it and deletes go on.
func (s *Service) Disable(ctx context.Context, idOrName string) (*stowagev1.DataStore, error) {
	return s.toggle(ctx, idOrName, meta.StoreDisable, "only an Up store can be disabled")
}

// Enable brings a Disabled store back Up (event Enable).
func (s *Service) Enable(ctx context.Context, idOrName string) (*stowagev1.DataStore, error) {
	return s.toggle(ctx, idOrName, meta.StoreEnable, "only a Disabled store can be enabled")
}

func (s *Service) toggle(ctx context.Context, idOrName string, ev meta.StoreEvent, only string) (*stowagev1.DataStore, error) {
	defer s.dropView()
	rec, err := s.Get(ctx, idOrName)
	if err != nil {
		return nil, err
	}
	if _, ok := s.db.Stores().Machine().Next(rec.GetState(), ev); !ok {
		return nil, fmt.Errorf("store %s is %s; %s: %w", rec.GetName(), meta.StoreStateName(rec.GetState()), only, errdefs.ErrFailedPrecondition)
	}
	rec, err = s.db.Stores().TransitionIf(ctx, rec.GetId(), rec.GetRevision(), ev, func(r *stowagev1.DataStore) error {
		r.StateReason = ""
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("store %s: %s: %w", idOrName, ev, err)
	}
	s.log.Info("store "+strings.ToLower(string(ev))+"d", "store", rec.GetName(), "state", meta.StoreStateName(rec.GetState()))
	return s.decorate(rec), nil
}

// Update changes what req sets: the store's tags, its own thresholds (a
// negative value clears one).
func (s *Service) Update(ctx context.Context, req *stowagev1.UpdateStoreRequest) (*stowagev1.DataStore, error) {
	defer s.dropView()
	rec, err := s.Get(ctx, req.GetId())
	if err != nil {
		return nil, err
	}
	var tags []string
	if req.GetTags() != nil {
		if tags, err = NormalizeTags(req.GetTags().GetValues()); err != nil {
			return nil, err
		}
	}
	own, err := ownThreshold("disable", req.CapacityDisableThreshold)
	if err != nil {
		return nil, err
	}
	ownNotify, err := ownThreshold("notify", req.CapacityNotifyThreshold)
	if err != nil {
		return nil, err
	}
	rec, err = s.db.Stores().Update(ctx, rec.GetId(), rec.GetRevision(), func(r *stowagev1.DataStore) error {
		if req.GetTags() != nil {
			r.Tags = tags
		}
		if req.CapacityDisableThreshold != nil {
			r.CapacityDisableThreshold = own
		}
		if req.CapacityNotifyThreshold != nil {
			r.CapacityNotifyThreshold = ownNotify
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("update store %s: %w", req.GetId(), err)
	}
	return s.decorate(rec), nil
}

// ownThreshold turns a requested threshold into a store's own: nil when
// not asked, a cleared one (negative) as nil too, else the value checked.
func ownThreshold(name string, v *float64) (*float64, error) {
	if v == nil || *v < 0 {
		return nil, nil
	}
	if err := checkThreshold(name, *v); err != nil {
		return nil, err
	}
	return v, nil
}

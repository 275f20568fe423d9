package meta

import (
	"bytes"
	"errors"
	"fmt"
	"slices"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/errdefs"
)

// Record is what a Kind stores: a generated protobuf message with an id and
// a compare-and-set revision.
type Record interface {
	proto.Message
	GetId() string
	GetRevision() uint64
}

// Kind describes one record kind: its key prefix, its indexes and how to
// reach its bookkeeping fields. The package declares one Kind per record
// (Stores, Hosts, Templates, ...); its ...Tx methods run inside a
// transaction opened with DB.Txn or DB.View.
type Kind[T Record] struct {
	name    string // key prefix, e.g. "store"
	noun    string // in messages, e.g. "store", "template on store"
	newRec  func() T
	setRev  func(T, uint64)
	touch   func(rec T, now *timestamppb.Timestamp, created bool)
	indexes []index[T]
	state   *stateHooks[T] // nil for kinds without a state machine
}

// index is one secondary index of a kind.
type index[T Record] struct {
	field  string // IndexName, IndexState, ...
	label  string // in messages; field when empty
	unique bool
	// value returns the indexed value; "" means the record is not indexed.
	value func(T) string
}

// stateHooks gives the untyped parts of a Kind access to the state field.
type stateHooks[T Record] struct {
	get     func(T) int32
	set     func(T, int32)
	initial int32
	name    func(int32) string
}

// Filter selects records for List. The zero Filter lists every record.
type Filter[T Record] struct {
	// Index and Value restrict the scan to the records whose Index has
	// Value (see the Index... constants; state values are state names such
	// as "Up").
	Index, Value string
	// Where, when set, keeps only the records it returns true for.
	Where func(T) bool
	// After skips ids up to and including After (paging).
	After string
	// Limit caps the result; 0 means no limit.
	Limit int
}

// Name is the kind's key prefix ("store", "template_on_store").
func (k *Kind[T]) Name() string { return k.name }

// IndexInfo describes one secondary index of a kind.
type IndexInfo struct {
	Field  string // the name ListBy and GetBy take (IndexName, IndexState, ...)
	Unique bool   // at most one record per value; GetBy works on it
}

// Indexes lists the kind's secondary indexes.
func (k *Kind[T]) Indexes() []IndexInfo {
	out := make([]IndexInfo, 0, len(k.indexes))
	for _, ix := range k.indexes {
		out = append(out, IndexInfo{Field: ix.field, Unique: ix.unique})
	}
	return out
}

func (k *Kind[T]) findIndex(field string) (index[T], error) {
	for _, ix := range k.indexes {
		if ix.field == field {
			return ix, nil
		}
	}
	var have []string
	for _, ix := range k.indexes {
		have = append(have, ix.field)
	}
	return index[T]{}, fmt.Errorf("%s: no index %q (have %v): %w", k.noun, field, have, errdefs.ErrInvalid)
}

// CreateTx stores a new record. It sets revision 1, created_at (if unset)
// and updated_at, and puts a stateful record in its machine's initial state
// (a record must arrive with the state unset or already initial). It fails
// with errdefs.ErrAlreadyExists when the id exists or a unique index value
// is taken, and then writes nothing. rec itself is not modified; the stored
// copy is returned.
func (k *Kind[T]) CreateTx(tx *Tx, rec T) (T, error) {
	var zero T
	if err := tx.check(true); err != nil {
		return zero, err
	}
	tx.wrote(k.name, true)
	if !rec.ProtoReflect().IsValid() {
		return zero, fmt.Errorf("%s: nil record: %w", k.noun, errdefs.ErrInvalid)
	}
	id := rec.GetId()
	if err := checkID(k.noun, id); err != nil {
		return zero, err
	}
	next := proto.Clone(rec).(T)
	if k.state != nil {
		switch s := k.state.get(next); s {
		case 0:
			k.state.set(next, k.state.initial)
		case k.state.initial:
		default:
			return zero, fmt.Errorf("%s %s: new records start in %s, not %s; change state with Transition: %w",
				k.noun, id, k.state.name(k.state.initial), k.state.name(s), errdefs.ErrInvalid)
		}
	}
	k.setRev(next, 1)
	k.touch(next, timestamppb.New(tx.now), true)
	switch _, err := tx.kv.get(recordKey(k.name, id)); {
	case err == nil:
		return zero, fmt.Errorf("%s %s: %w", k.noun, id, errdefs.ErrAlreadyExists)
	case !errors.Is(err, errKeyNotFound):
		return zero, fmt.Errorf("%s %s: %w", k.noun, id, err)
	}
	if err := k.write(tx.kv, zero, false, next); err != nil {
		return zero, err
	}
	return next, nil
}

// GetTx reads one record; errdefs.ErrNotFound if there is none.
func (k *Kind[T]) GetTx(tx *Tx, id string) (T, error) {
	var zero T
	if err := tx.check(false); err != nil {
		return zero, err
	}
	return k.load(tx.kv, id)
}

// GetByTx reads the record that holds value in the unique index field
// (IndexName of Stores, IndexIdempotencyKey of Jobs, ...); errdefs.ErrNotFound
// if none does.
func (k *Kind[T]) GetByTx(tx *Tx, field, value string) (T, error) {
	var zero T
	if err := tx.check(false); err != nil {
		return zero, err
	}
	ix, err := k.findIndex(field)
	if err != nil {
		return zero, err
	}
	if !ix.unique {
		return zero, fmt.Errorf("%s: index %q is not unique; use List: %w", k.noun, field, errdefs.ErrInvalid)
	}
	id, err := tx.kv.get(uniqueKey(k.name, ix.field, value))
	if errors.Is(err, errKeyNotFound) {
		return zero, fmt.Errorf("%s with %s %q: %w", k.noun, ix.labelOrField(), value, errdefs.ErrNotFound)
	}
	if err != nil {
		return zero, fmt.Errorf("%s with %s %q: %w", k.noun, ix.labelOrField(), value, err)
	}
	rec, err := k.load(tx.kv, string(id))
	if errors.Is(err, errdefs.ErrNotFound) {
		return zero, fmt.Errorf("%s: unique index %s %q points to missing record %s: %w",
			k.noun, ix.field, value, id, errdefs.ErrDataLoss)
	}
	return rec, err
}

// ListTx returns the records f selects, ordered by id.
func (k *Kind[T]) ListTx(tx *Tx, f Filter[T]) ([]T, error) {
	if err := tx.check(false); err != nil {
		return nil, err
	}
	if f.Limit < 0 {
		return nil, fmt.Errorf("%s: negative list limit %d: %w", k.noun, f.Limit, errdefs.ErrInvalid)
	}
	var out []T
	// keep collects rec if it passes Where and reports whether to go on.
	keep := func(rec T) bool {
		if f.Where == nil || f.Where(rec) {
			out = append(out, rec)
		}
		return f.Limit == 0 || len(out) < f.Limit
	}
	if f.Index == "" {
		prefix := recordPrefix(k.name)
		err := tx.kv.scan(prefix, seekAfter(prefix, f.After), false, func(key, val []byte) error {
			if err := tx.ctx.Err(); err != nil {
				return fmt.Errorf("meta: %w", err)
			}
			rec, err := k.decode(string(key[len(prefix):]), val)
			if err != nil {
				return err
			}
			if !keep(rec) {
				return errStopScan
			}
			return nil
		})
		return out, err
	}
	ix, err := k.findIndex(f.Index)
	if err != nil {
		return nil, err
	}
	if f.Value == "" {
		return nil, nil // empty values are never indexed
	}
	if ix.unique {
		id, err := tx.kv.get(uniqueKey(k.name, ix.field, f.Value))
		if errors.Is(err, errKeyNotFound) || (err == nil && string(id) <= f.After) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: list by %s: %w", k.noun, ix.field, err)
		}
		rec, err := k.loadIndexed(tx.kv, ix, f.Value, string(id))
		if err != nil {
			return nil, err
		}
		keep(rec)
		return out, nil
	}
	prefix := indexValuePrefix(k.name, ix.field, f.Value)
	// The records an index names are read in batches: an engine that reads
	// over the network (etcd) fetches a batch in one request.
	var batch []string
	stopped := false
	flush := func() error {
		if p, ok := tx.kv.(prefetcher); ok && len(batch) > 1 {
			keys := make([][]byte, len(batch))
			for i, id := range batch {
				keys[i] = recordKey(k.name, id)
			}
			if err := p.prefetch(keys); err != nil {
				return err
			}
		}
		for _, id := range batch {
			rec, err := k.loadIndexed(tx.kv, ix, f.Value, id)
			if err != nil {
				return err
			}
			if !keep(rec) {
				stopped = true
				break
			}
		}
		batch = batch[:0]
		return nil
	}
	err = tx.kv.scan(prefix, seekAfter(prefix, f.After), true, func(key, _ []byte) error {
		if err := tx.ctx.Err(); err != nil {
			return fmt.Errorf("meta: %w", err)
		}
		batch = append(batch, string(key[len(prefix):]))
		// Without a filter exactly the records still wanted are read.
		want := listBatch
		if f.Limit > 0 && f.Where == nil {
			want = min(want, f.Limit-len(out))
		}
		if len(batch) < want {
			return nil
		}
		if err := flush(); err != nil {
			return err
		}
		if stopped {
			return errStopScan
		}
		return nil
	})
	if err == nil && !stopped && len(batch) > 0 {
		err = flush()
	}
	return out, err
}

// listBatch is how many records an indexed listing reads at once.
const listBatch = 64

// seekAfter is where a scan of prefix starts to skip ids <= after.
func seekAfter(prefix []byte, after string) []byte {
	if after == "" {
		return nil
	}
	return append(append(bytes.Clone(prefix), after...), 0)
}

// UpdateTx is a compare-and-set: it reads the record, fails with
// errdefs.ErrConflict unless its revision is expectRevision (0 skips the
// check), lets mutate change it, bumps the revision, sets updated_at and
// rewrites the indexes. mutate must not change the id, the revision or the
// state (errdefs.ErrInvalid; states change through Transition). An error
// from mutate is returned unchanged. Nothing is written on any error.
func (k *Kind[T]) UpdateTx(tx *Tx, id string, expectRevision uint64, mutate func(T) error) (T, error) {
	var zero T
	if err := tx.check(true); err != nil {
		return zero, err
	}
	tx.wrote(k.name, false)
	old, err := k.load(tx.kv, id)
	if err != nil {
		return zero, err
	}
	if err := k.checkRevision(old, expectRevision); err != nil {
		return zero, err
	}
	next, err := k.mutated(old, mutate, "Update")
	if err != nil {
		return zero, err
	}
	k.setRev(next, old.GetRevision()+1)
	k.touch(next, timestamppb.New(tx.now), false)
	if err := k.write(tx.kv, old, true, next); err != nil {
		return zero, err
	}
	return next, nil
}

// DeleteTx removes the record and its index entries. expectRevision 0
// deletes whatever revision is stored; otherwise a different stored
// revision fails with errdefs.ErrConflict. A missing record is
// errdefs.ErrNotFound.
func (k *Kind[T]) DeleteTx(tx *Tx, id string, expectRevision uint64) error {
	if err := tx.check(true); err != nil {
		return err
	}
	tx.wrote(k.name, true)
	old, err := k.load(tx.kv, id)
	if err != nil {
		return err
	}
	if err := k.checkRevision(old, expectRevision); err != nil {
		return err
	}
	for _, e := range k.entries(old) {
		if err := tx.kv.delete(e.key); err != nil {
			return fmt.Errorf("%s %s: delete index %s: %w", k.noun, id, e.ix.field, err)
		}
	}
	if err := tx.kv.delete(recordKey(k.name, id)); err != nil {
		return fmt.Errorf("%s %s: delete: %w", k.noun, id, err)
	}
	return nil
}

func (k *Kind[T]) checkRevision(rec T, expect uint64) error {
	if expect != 0 && rec.GetRevision() != expect {
		return fmt.Errorf("%s %s: revision is %d, expected %d: %w",
			k.noun, rec.GetId(), rec.GetRevision(), expect, errdefs.ErrConflict)
	}
	return nil
}

// mutated runs mutate on a copy of old and checks that it left the
// bookkeeping fields alone.
func (k *Kind[T]) mutated(old T, mutate func(T) error, op string) (T, error) {
	var zero T
	next := proto.Clone(old).(T)
	if mutate == nil {
		return next, nil
	}
	if err := mutate(next); err != nil {
		return zero, err
	}
	if next.GetId() != old.GetId() {
		return zero, fmt.Errorf("%s %s: %s must not change the id (to %q): %w",
			k.noun, old.GetId(), op, next.GetId(), errdefs.ErrInvalid)
	}
	if next.GetRevision() != old.GetRevision() {
		return zero, fmt.Errorf("%s %s: %s must not change the revision: %w", k.noun, old.GetId(), op, errdefs.ErrInvalid)
	}
	if k.state != nil {
		if from, to := k.state.get(old), k.state.get(next); from != to {
			return zero, fmt.Errorf("%s %s: %s must not change the state (%s to %s); use Transition: %w",
				k.noun, old.GetId(), op, k.state.name(from), k.state.name(to), errdefs.ErrInvalid)
		}
	}
	return next, nil
}

// load reads and decodes one record.
func (k *Kind[T]) load(kt kvTxn, id string) (T, error) {
	var zero T
	if id == "" {
		return zero, fmt.Errorf("%s: empty id: %w", k.noun, errdefs.ErrInvalid)
	}
	val, err := kt.get(recordKey(k.name, id))
	if errors.Is(err, errKeyNotFound) {
		return zero, fmt.Errorf("%s %s: %w", k.noun, id, errdefs.ErrNotFound)
	}
	if err != nil {
		return zero, fmt.Errorf("%s %s: %w", k.noun, id, err)
	}
	return k.decode(id, val)
}

// loadIndexed loads the record an index entry points to; a dangling entry
// is corruption.
func (k *Kind[T]) loadIndexed(kt kvTxn, ix index[T], value, id string) (T, error) {
	rec, err := k.load(kt, id)
	if errors.Is(err, errdefs.ErrNotFound) {
		var zero T
		return zero, fmt.Errorf("%s: index %s %q points to missing record %s: %w",
			k.noun, ix.field, value, id, errdefs.ErrDataLoss)
	}
	return rec, err
}

func (k *Kind[T]) decode(id string, val []byte) (T, error) {
	rec := k.newRec()
	if err := proto.Unmarshal(val, rec); err != nil {
		var zero T
		return zero, fmt.Errorf("%s %s: decode: %w: %w", k.noun, id, errdefs.ErrDataLoss, err)
	}
	return rec, nil
}

// indexEntry is one index key a record owns.
type indexEntry[T Record] struct {
	ix    index[T]
	value string
	key   []byte
}

func (ix index[T]) labelOrField() string {
	if ix.label != "" {
		return ix.label
	}
	return ix.field
}

// entries lists the index keys rec owns.
func (k *Kind[T]) entries(rec T) []indexEntry[T] {
	out := make([]indexEntry[T], 0, len(k.indexes))
	for _, ix := range k.indexes {
		v := ix.value(rec)
		if v == "" {
			continue
		}
		var key []byte
		if ix.unique {
			key = uniqueKey(k.name, ix.field, v)
		} else {
			key = indexKey(k.name, ix.field, v, rec.GetId())
		}
		out = append(out, indexEntry[T]{ix: ix, value: v, key: key})
	}
	return out
}

// write stores next and moves its index entries from old's (when hasOld)
// to next's. It checks everything before it writes anything, so a failed
// write leaves the transaction as it was.
func (k *Kind[T]) write(kt kvTxn, old T, hasOld bool, next T) error {
	id := next.GetId()
	val, err := proto.MarshalOptions{Deterministic: true}.Marshal(next)
	if err != nil {
		return fmt.Errorf("%s %s: encode: %w: %w", k.noun, id, errdefs.ErrInvalid, err)
	}
	var oldEntries []indexEntry[T]
	if hasOld {
		oldEntries = k.entries(old)
	}
	newEntries := k.entries(next)
	has := func(list []indexEntry[T], key []byte) bool {
		return slices.ContainsFunc(list, func(e indexEntry[T]) bool { return bytes.Equal(e.key, key) })
	}
	var add []indexEntry[T]
	for _, e := range newEntries {
		if has(oldEntries, e.key) {
			continue
		}
		if e.ix.unique {
			owner, err := kt.get(e.key)
			switch {
			case err == nil && string(owner) != id:
				return fmt.Errorf("%s %s %q is already taken by %s %s: %w",
					k.noun, e.ix.labelOrField(), e.value, k.noun, owner, errdefs.ErrAlreadyExists)
			case err != nil && !errors.Is(err, errKeyNotFound):
				return fmt.Errorf("%s %s: read index %s: %w", k.noun, id, e.ix.field, err)
			}
		}
		add = append(add, e)
	}
	for _, e := range oldEntries {
		if has(newEntries, e.key) {
			continue
		}
		if err := kt.delete(e.key); err != nil {
			return fmt.Errorf("%s %s: delete index %s: %w", k.noun, id, e.ix.field, err)
		}
	}
	for _, e := range add {
		var v []byte
		if e.ix.unique {
			v = []byte(id)
		} else {
			v = []byte{}
		}
		if err := kt.set(e.key, v); err != nil {
			return fmt.Errorf("%s %s: write index %s: %w", k.noun, id, e.ix.field, err)
		}
	}
	if err := kt.set(recordKey(k.name, id), val); err != nil {
		return fmt.Errorf("%s %s: write: %w", k.noun, id, err)
	}
	return nil
}

// reindex drops every index entry of the kind and rebuilds them from the
// records. Migrations that add or change an index call it.
func (k *Kind[T]) reindex(kt kvTxn) error {
	var stale [][]byte
	for _, p := range []string{indexPrefix + k.name + "/", uniquePrefix + k.name + "/"} {
		if err := kt.scan([]byte(p), nil, true, func(key, _ []byte) error {
			stale = append(stale, bytes.Clone(key))
			return nil
		}); err != nil {
			return fmt.Errorf("%s: reindex: %w", k.noun, err)
		}
	}
	for _, key := range stale {
		if err := kt.delete(key); err != nil {
			return fmt.Errorf("%s: reindex: %w", k.noun, err)
		}
	}
	var recs []T
	prefix := recordPrefix(k.name)
	if err := kt.scan(prefix, nil, false, func(key, val []byte) error {
		rec, err := k.decode(string(key[len(prefix):]), val)
		if err != nil {
			return err
		}
		recs = append(recs, rec)
		return nil
	}); err != nil {
		return fmt.Errorf("%s: reindex: %w", k.noun, err)
	}
	for _, rec := range recs {
		for _, e := range k.entries(rec) {
			v := []byte{}
			if e.ix.unique {
				if owner, err := kt.get(e.key); err == nil && string(owner) != rec.GetId() {
					return fmt.Errorf("%s: reindex: %s %q is held by both %s and %s: %w",
						k.noun, e.ix.field, e.value, owner, rec.GetId(), errdefs.ErrDataLoss)
				}
				v = []byte(rec.GetId())
			}
			if err := kt.set(e.key, v); err != nil {
				return fmt.Errorf("%s: reindex: %w", k.noun, err)
			}
		}
	}
	return nil
}

// rewrite applies fix to every record of the kind and writes back those it
// changed (it reports true), indexes moved along. Migrations use it.
func (k *Kind[T]) rewrite(kt kvTxn, fix func(T) bool) error {
	type pair struct{ old, next T }
	var changed []pair
	prefix := recordPrefix(k.name)
	if err := kt.scan(prefix, nil, false, func(key, val []byte) error {
		old, err := k.decode(string(key[len(prefix):]), val)
		if err != nil {
			return err
		}
		next := proto.Clone(old).(T)
		if fix(next) {
			changed = append(changed, pair{old, next})
		}
		return nil
	}); err != nil {
		return fmt.Errorf("%s: rewrite: %w", k.noun, err)
	}
	for _, c := range changed {
		if err := k.write(kt, c.old, true, c.next); err != nil {
			return err
		}
	}
	return nil
}

// verify checks that the kind's index entries are exactly those its
// records own: no entry missing, none dangling, every unique entry naming
// its owner. Problems are errdefs.ErrDataLoss.
func (k *Kind[T]) verify(kt kvTxn) error {
	want := map[string]string{} // key -> value (owner id for unique entries)
	prefix := recordPrefix(k.name)
	if err := kt.scan(prefix, nil, false, func(key, val []byte) error {
		rec, err := k.decode(string(key[len(prefix):]), val)
		if err != nil {
			return err
		}
		if rec.GetId() != string(key[len(prefix):]) {
			return fmt.Errorf("%s %s: stored under the key of %s: %w", k.noun, rec.GetId(), key, errdefs.ErrDataLoss)
		}
		for _, e := range k.entries(rec) {
			if owner, dup := want[string(e.key)]; dup && e.ix.unique {
				return fmt.Errorf("%s: %s %q is held by both %s and %s: %w",
					k.noun, e.ix.field, e.value, owner, rec.GetId(), errdefs.ErrDataLoss)
			}
			if e.ix.unique {
				want[string(e.key)] = rec.GetId()
			} else {
				want[string(e.key)] = ""
			}
		}
		return nil
	}); err != nil {
		return err
	}
	var problems []string
	for _, p := range []string{indexPrefix + k.name + "/", uniquePrefix + k.name + "/"} {
		if err := kt.scan([]byte(p), nil, false, func(key, val []byte) error {
			w, ok := want[string(key)]
			switch {
			case !ok:
				problems = append(problems, fmt.Sprintf("dangling %s", key))
			case w != string(val):
				problems = append(problems, fmt.Sprintf("%s names %q, want %q", key, val, w))
			}
			delete(want, string(key))
			return nil
		}); err != nil {
			return fmt.Errorf("%s: verify: %w", k.noun, err)
		}
	}
	for key := range want {
		problems = append(problems, fmt.Sprintf("missing %s", key))
	}
	if len(problems) > 0 {
		slices.Sort(problems)
		return fmt.Errorf("%s: %d index problems, first %q: %w", k.noun, len(problems), problems[0], errdefs.ErrDataLoss)
	}
	return nil
}

// StatefulKind is a Kind whose records carry a state that only its Machine
// may change.
type StatefulKind[T Record, S ~int32, E comparable] struct {
	*Kind[T]
	machine  *Machine[S, E]
	getState func(T) S
	setState func(T, S)
}

func newStatefulKind[T Record, S ~int32, E comparable](k *Kind[T], m *Machine[S, E], get func(T) S, set func(T, S)) *StatefulKind[T, S, E] {
	k.state = &stateHooks[T]{
		get:     func(r T) int32 { return int32(get(r)) },
		set:     func(r T, v int32) { set(r, S(v)) },
		initial: int32(m.Initial()),
		name:    func(v int32) string { return m.StateName(S(v)) },
	}
	return &StatefulKind[T, S, E]{Kind: k, machine: m, getState: get, setState: set}
}

// Machine is the kind's state machine.
func (k *StatefulKind[T, S, E]) Machine() *Machine[S, E] { return k.machine }

// TransitionTx applies event to the record: it reads it, fails with
// errdefs.ErrConflict unless its revision is expectRevision (0 skips the
// check), asks the machine for the next state (errdefs.ErrFailedPrecondition
// when the event is not allowed in the current state), lets mutate set
// other fields (reason, sizes, ...; it must not change id, revision or
// state), sets the new state, bumps the revision and rewrites the indexes.
// Nothing is written on any error.
func (k *StatefulKind[T, S, E]) TransitionTx(tx *Tx, id string, expectRevision uint64, event E, mutate func(T) error) (T, error) {
	var zero T
	if err := tx.check(true); err != nil {
		return zero, err
	}
	tx.wrote(k.name, true)
	old, err := k.load(tx.kv, id)
	if err != nil {
		return zero, err
	}
	if err := k.checkRevision(old, expectRevision); err != nil {
		return zero, err
	}
	from := k.getState(old)
	to, ok := k.machine.Next(from, event)
	if !ok {
		return zero, fmt.Errorf("%s %s: event %v is not allowed in state %s: %w",
			k.noun, id, event, k.machine.StateName(from), errdefs.ErrFailedPrecondition)
	}
	next, err := k.mutated(old, mutate, fmt.Sprintf("Transition(%v)", event))
	if err != nil {
		return zero, err
	}
	k.setState(next, to)
	k.setRev(next, old.GetRevision()+1)
	k.touch(next, timestamppb.New(tx.now), false)
	if err := k.write(tx.kv, old, true, next); err != nil {
		return zero, err
	}
	return next, nil
}

// ListInStateTx lists the records in state s, ordered by id.
func (k *StatefulKind[T, S, E]) ListInStateTx(tx *Tx, s S) ([]T, error) {
	return k.ListTx(tx, Filter[T]{Index: IndexState, Value: k.machine.StateName(s)})
}

// noTouch is the touch function of kinds without timestamps.
func noTouch[T Record](T, *timestamppb.Timestamp, bool) {}

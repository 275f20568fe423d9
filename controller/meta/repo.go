package meta

import (
	"context"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Repo is a Kind bound to a DB: each method runs in its own transaction
// (retried when it loses a race, see DB.Txn). Get one from the DB
// (db.Templates()); for work on several records in one transaction use
// DB.Txn with the Kind's ...Tx methods instead.
type Repo[T Record] struct {
	db   *DB
	kind *Kind[T]
}

// Create stores a new record; see Kind.CreateTx.
func (r *Repo[T]) Create(ctx context.Context, rec T) (T, error) {
	var out T
	err := r.db.Txn(ctx, func(tx *Tx) error {
		var err error
		out, err = r.kind.CreateTx(tx, rec)
		return err
	})
	return out, err
}

// Get reads one record; errdefs.ErrNotFound names the kind and the id.
func (r *Repo[T]) Get(ctx context.Context, id string) (T, error) {
	var out T
	err := r.db.view(ctx, func(tx *Tx) error {
		var err error
		out, err = r.kind.GetTx(tx, id)
		return err
	})
	return out, err
}

// GetBy reads the record holding value in a unique index; see Kind.GetByTx.
func (r *Repo[T]) GetBy(ctx context.Context, index, value string) (T, error) {
	var out T
	err := r.db.view(ctx, func(tx *Tx) error {
		var err error
		out, err = r.kind.GetByTx(tx, index, value)
		return err
	})
	return out, err
}

// List returns the records f selects, ordered by id.
func (r *Repo[T]) List(ctx context.Context, f Filter[T]) ([]T, error) {
	var out []T
	err := r.db.view(ctx, func(tx *Tx) error {
		var err error
		out, err = r.kind.ListTx(tx, f)
		return err
	})
	return out, err
}

// ListBy returns the records whose index has value, ordered by id.
func (r *Repo[T]) ListBy(ctx context.Context, index, value string) ([]T, error) {
	return r.List(ctx, Filter[T]{Index: index, Value: value})
}

// Update changes a record under compare-and-set; see Kind.UpdateTx. mutate
// may run more than once (when the transaction is retried), each time on a
// fresh copy of the stored record.
func (r *Repo[T]) Update(ctx context.Context, id string, expectRevision uint64, mutate func(T) error) (T, error) {
	var out T
	err := r.db.Txn(ctx, func(tx *Tx) error {
		var err error
		out, err = r.kind.UpdateTx(tx, id, expectRevision, mutate)
		return err
	})
	return out, err
}

// Delete removes a record and its index entries; see Kind.DeleteTx.
func (r *Repo[T]) Delete(ctx context.Context, id string, expectRevision uint64) error {
	return r.db.Txn(ctx, func(tx *Tx) error {
		return r.kind.DeleteTx(tx, id, expectRevision)
	})
}

// Watch returns a channel that receives after every committed change of
// the record id (coalesced: one value may stand for several changes) until
// ctx ends. Read the record after each receive. It also receives once the
// watch is in place where the store needs time to start it, so a change
// made between the caller's first read and the watch is not missed.
func (r *Repo[T]) Watch(ctx context.Context, id string) <-chan struct{} {
	ch := make(chan struct{}, 1)
	r.db.kv.watch(ctx, recordKey(r.kind.name, id), func() {
		select {
		case ch <- struct{}{}:
		default:
		}
	})
	return ch
}

// StatefulRepo is a Repo whose records move through a state machine.
type StatefulRepo[T Record, S ~int32, E comparable] struct {
	Repo[T]
	skind *StatefulKind[T, S, E]
}

// Transition applies event to the record in one transaction; see
// StatefulKind.TransitionTx. Of concurrent transitions only those the state
// machine still allows after the winner's commit succeed, so racing
// callers that send the same event see exactly one success and
// errdefs.ErrFailedPrecondition for the rest. mutate may be nil and may run
// more than once.
func (r *StatefulRepo[T, S, E]) Transition(ctx context.Context, id string, event E, mutate func(T) error) (T, error) {
	return r.TransitionIf(ctx, id, 0, event, mutate)
}

// TransitionIf is Transition under compare-and-set: it fails with
// errdefs.ErrConflict unless the stored revision is expectRevision.
func (r *StatefulRepo[T, S, E]) TransitionIf(ctx context.Context, id string, expectRevision uint64, event E, mutate func(T) error) (T, error) {
	var out T
	err := r.db.Txn(ctx, func(tx *Tx) error {
		var err error
		out, err = r.skind.TransitionTx(tx, id, expectRevision, event, mutate)
		return err
	})
	return out, err
}

// ListInState lists the records in state s, ordered by id.
func (r *StatefulRepo[T, S, E]) ListInState(ctx context.Context, s S) ([]T, error) {
	var out []T
	err := r.db.view(ctx, func(tx *Tx) error {
		var err error
		out, err = r.skind.ListInStateTx(tx, s)
		return err
	})
	return out, err
}

// Machine is the state machine of the repository's kind.
func (r *StatefulRepo[T, S, E]) Machine() *Machine[S, E] { return r.skind.machine }

// The repositories of the record kinds, as DB hands them out.
type (
	StoreRepo           = StatefulRepo[*stowagev1.DataStore, stowagev1.StoreState, StoreEvent]
	HostRepo            = StatefulRepo[*stowagev1.Host, stowagev1.HostState, HostEvent]
	TemplateRepo        = Repo[*stowagev1.Template]
	TemplateOnStoreRepo = StatefulRepo[*stowagev1.TemplateOnStore, stowagev1.ObjectState, ObjectEvent]
	VolumeRepo          = StatefulRepo[*stowagev1.Volume, stowagev1.VolumeState, VolumeEvent]
	SnapshotRepo        = StatefulRepo[*stowagev1.Snapshot, stowagev1.SnapshotState, SnapshotEvent]
	SnapshotOnStoreRepo = StatefulRepo[*stowagev1.SnapshotOnStore, stowagev1.ObjectState, ObjectEvent]
	JobRepo             = StatefulRepo[*stowagev1.Job, stowagev1.JobState, JobEvent]
	TokenRepo           = Repo[*stowagev1.TokenRecord]
)

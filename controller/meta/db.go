package meta

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/failpoint"
)

// maxAttempts bounds how often Txn re-runs a transaction that lost a race.
const maxAttempts = 16

// DB is the controller's metadata store. It is safe for concurrent use.
// Reach the records through the typed repositories (db.Stores(),
// db.Volumes(), ...) or, for several records in one transaction, through
// Txn and the kinds' ...Tx methods.
type DB struct {
	kv  kvStore
	dir string
	now func() time.Time

	mu     sync.RWMutex // held shared by every transaction, exclusively by Close
	closed bool

	stores           *StoreRepo
	hosts            *HostRepo
	templates        *TemplateRepo
	templatesOnStore *TemplateOnStoreRepo
	volumes          *VolumeRepo
	snapshots        *SnapshotRepo
	snapshotsOnStore *SnapshotOnStoreRepo
	jobs             *JobRepo
	tokens           *TokenRepo
}

// Option configures Open.
type Option func(*options)

type options struct {
	log  *slog.Logger
	now  func() time.Time
	etcd EtcdOptions
}

// WithLogger sends the storage engine's own log lines to log. Without it
// the engine is silent; the repository itself never logs.
func WithLogger(log *slog.Logger) Option { return func(o *options) { o.log = log } }

// WithClock sets the clock used for created_at and updated_at (tests).
func WithClock(now func() time.Time) Option {
	return func(o *options) {
		if now != nil {
			o.now = now
		}
	}
}

// Open opens the metadata store named by spec, creating it if needed, and
// brings its schema up to date by running the pending migrations. It
// refuses a store written by a newer Stowage (a schema version it does not
// know).
//
// spec is a directory, for the embedded Badger store of one controller, or
// etcd://host:port[,host:port...]/prefix for an etcd cluster several
// controllers share (client settings: WithEtcd). Both hold the same keys
// with the same compare-and-set semantics.
func Open(spec string, opts ...Option) (*DB, error) {
	if spec == "" {
		return nil, fmt.Errorf("meta: open: empty directory: %w", errdefs.ErrInvalid)
	}
	o := options{now: time.Now}
	for _, opt := range opts {
		opt(&o)
	}
	ctx := context.Background()
	var kv kvStore
	dir := spec
	if strings.HasPrefix(spec, "etcd:") {
		dir = redactSpec(spec)
		es, err := openEtcd(ctx, spec, o.etcd)
		if err != nil {
			return nil, err
		}
		kv = es
	} else {
		bs, err := openBadger(spec, o.log)
		if err != nil {
			return nil, fmt.Errorf("meta: open %s: %w: %w", spec, errdefs.ErrUnavailable, err)
		}
		kv = bs
	}
	if err := migrate(ctx, kv, migrations); err != nil {
		_ = kv.close()
		return nil, fmt.Errorf("meta: open %s: %w", dir, err)
	}
	db := &DB{kv: kv, dir: dir, now: o.now}
	db.stores = &StoreRepo{Repo: Repo[storeRec]{db: db, kind: Stores.Kind}, skind: Stores}
	db.hosts = &HostRepo{Repo: Repo[hostRec]{db: db, kind: Hosts.Kind}, skind: Hosts}
	db.templates = &TemplateRepo{db: db, kind: Templates}
	db.templatesOnStore = &TemplateOnStoreRepo{Repo: Repo[tosRec]{db: db, kind: TemplatesOnStore.Kind}, skind: TemplatesOnStore}
	db.volumes = &VolumeRepo{Repo: Repo[volumeRec]{db: db, kind: Volumes.Kind}, skind: Volumes}
	db.snapshots = &SnapshotRepo{Repo: Repo[snapshotRec]{db: db, kind: Snapshots.Kind}, skind: Snapshots}
	db.snapshotsOnStore = &SnapshotOnStoreRepo{Repo: Repo[sosRec]{db: db, kind: SnapshotsOnStore.Kind}, skind: SnapshotsOnStore}
	db.jobs = &JobRepo{Repo: Repo[jobRec]{db: db, kind: Jobs.Kind}, skind: Jobs}
	db.tokens = &TokenRepo{db: db, kind: Tokens}
	return db, nil
}

// Close waits for running transactions and closes the store. Later calls
// fail with errdefs.ErrUnavailable; closing twice is not an error.
func (db *DB) Close() error {
	db.mu.Lock()
	defer db.mu.Unlock()
	if db.closed {
		return nil
	}
	db.closed = true
	if err := db.kv.close(); err != nil {
		return fmt.Errorf("meta: close %s: %w", db.dir, err)
	}
	return nil
}

// Location names the store for logs: its directory, or its etcd URL.
func (db *DB) Location() string { return db.dir }

// Stores is the repository of data stores.
func (db *DB) Stores() *StoreRepo { return db.stores }

// Hosts is the repository of hypervisor hosts.
func (db *DB) Hosts() *HostRepo { return db.hosts }

// Templates is the repository of templates and ISOs.
func (db *DB) Templates() *TemplateRepo { return db.templates }

// TemplatesOnStore is the repository of template copies on stores.
func (db *DB) TemplatesOnStore() *TemplateOnStoreRepo { return db.templatesOnStore }

// Volumes is the repository of volumes.
func (db *DB) Volumes() *VolumeRepo { return db.volumes }

// Snapshots is the repository of snapshots.
func (db *DB) Snapshots() *SnapshotRepo { return db.snapshots }

// SnapshotsOnStore is the repository of snapshot copies on stores.
func (db *DB) SnapshotsOnStore() *SnapshotOnStoreRepo { return db.snapshotsOnStore }

// Jobs is the repository of asynchronous jobs.
func (db *DB) Jobs() *JobRepo { return db.jobs }

// Tokens is the repository of API tokens (hashed; see controller/apiauth).
func (db *DB) Tokens() *TokenRepo { return db.tokens }

// SchemaVersion returns the schema version stored in the database.
func (db *DB) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := db.view(ctx, func(tx *Tx) error {
		var err error
		v, err = readSchemaVersion(tx.kv)
		return err
	})
	return v, err
}

// Check verifies, in one snapshot, that every index entry of every kind
// belongs to a stored record and every record has all its entries. It
// returns an error wrapping errdefs.ErrDataLoss naming the first problem.
// It reads the whole database; run it from tests and repair tools, not on
// a hot path.
func (db *DB) Check(ctx context.Context) error {
	return db.view(ctx, func(tx *Tx) error {
		for _, k := range allKinds {
			if err := tx.ctx.Err(); err != nil {
				return fmt.Errorf("meta: %w", err)
			}
			if err := k.verify(tx.kv); err != nil {
				return err
			}
		}
		return nil
	})
}

// Tx is one transaction. Pass it to the kinds' ...Tx methods
// (meta.Volumes.CreateTx(tx, v)). A Tx is only valid inside the function
// given to Txn or View and must not be shared between goroutines.
type Tx struct {
	ctx      context.Context
	kv       kvTxn
	now      time.Time
	writable bool
	done     bool
	// workflow says the transaction changed a workflow's durable state
	// (see wrote): the metadata failpoints fire only for those.
	workflow bool
}

// workflowKinds are the kinds whose records workflows move: a write to one
// is a step of a workflow (hosts' heartbeats, stores' capacity and tokens
// are not).
var workflowKinds = map[string]bool{
	"template": true, "template_on_store": true, "volume": true,
	"snapshot": true, "snapshot_on_store": true, "job": true,
}

// wrote notes a write to a record of kind. A job's plain update (progress,
// its plan's bookkeeping) is not a workflow step of its own: the job
// failpoints cover those.
func (tx *Tx) wrote(kind string, event bool) {
	if workflowKinds[kind] && (event || kind != "job") {
		tx.workflow = true
	}
}

// Context is the context the transaction was started with.
func (tx *Tx) Context() context.Context { return tx.ctx }

// check is called by every operation before it touches the store.
func (tx *Tx) check(write bool) error {
	if tx == nil || tx.kv == nil {
		return fmt.Errorf("meta: nil transaction: %w", errdefs.ErrInvalid)
	}
	if tx.done {
		return fmt.Errorf("meta: transaction used after it ended: %w", errdefs.ErrInvalid)
	}
	if write && !tx.writable {
		return fmt.Errorf("meta: write in a read-only transaction: %w", errdefs.ErrInvalid)
	}
	if err := tx.ctx.Err(); err != nil {
		return fmt.Errorf("meta: %w", err)
	}
	return nil
}

// Txn runs fn in one read-write transaction and commits it if fn returns
// nil; if fn returns an error nothing it did is written and Txn returns that
// error unchanged.
//
// When another transaction committed a write to a record fn read, the
// commit fails and Txn runs fn again on fresh data, up to a bounded number
// of attempts (then errdefs.ErrAborted). fn must therefore have no effects
// outside tx, and must not start another transaction on db (that one
// would commit on its own, and could deadlock against Close). Every ...Tx
// method writes nothing when it fails, so fn may handle an error (say
// ErrAlreadyExists) and still commit the rest.
func (db *DB) Txn(ctx context.Context, fn func(tx *Tx) error) error {
	release, err := db.enter(ctx)
	if err != nil {
		return err
	}
	defer release()
	for attempt := 1; ; attempt++ {
		workflow := false
		err := db.kv.update(ctx, func(kt kvTxn) error {
			tx := &Tx{ctx: ctx, kv: kt, now: db.now(), writable: true}
			defer func() { tx.done = true }()
			if err := fn(tx); err != nil {
				return err
			}
			if workflow = tx.workflow; workflow {
				return failpoint.Hit(failpoint.MetaBeforeCommit)
			}
			return nil
		})
		if err == nil && workflow {
			err = failpoint.Hit(failpoint.MetaAfterCommit)
		}
		if !errors.Is(err, errTxnConflict) {
			return err
		}
		if attempt == maxAttempts {
			return fmt.Errorf("meta: transaction lost the race %d times: %w", attempt, errdefs.ErrAborted)
		}
		// Back off a little, with jitter, so the racers spread out.
		d := time.Duration(rand.Int64N(int64(time.Millisecond) << min(attempt, 6)))
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("meta: %w", ctx.Err())
		case <-t.C:
		}
	}
}

// View runs fn in a read-only snapshot of the store. Writes through its Tx
// fail with errdefs.ErrInvalid.
func (db *DB) View(ctx context.Context, fn func(tx *Tx) error) error {
	return db.view(ctx, fn)
}

func (db *DB) view(ctx context.Context, fn func(tx *Tx) error) error {
	release, err := db.enter(ctx)
	if err != nil {
		return err
	}
	defer release()
	return db.kv.view(ctx, func(kt kvTxn) error {
		tx := &Tx{ctx: ctx, kv: kt, now: db.now()}
		defer func() { tx.done = true }()
		return fn(tx)
	})
}

// enter starts a use of the store: it fails when ctx has ended or the
// store is closed, and otherwise holds Close off until release.
func (db *DB) enter(ctx context.Context) (release func(), err error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("meta: %w", err)
	}
	db.mu.RLock()
	if db.closed {
		db.mu.RUnlock()
		return nil, fmt.Errorf("meta: database is closed: %w", errdefs.ErrUnavailable)
	}
	return db.mu.RUnlock, nil
}

// NewID returns a new record id: a UUIDv7, whose text sorts by creation
// time, so listings ordered by id come out oldest first.
func NewID() string {
	id, err := uuid.NewV7()
	if err != nil {
		return uuid.NewString()
	}
	return id.String()
}

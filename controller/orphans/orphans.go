package orphans

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// DefaultGrace is how long something must have been seen orphaned (and,
// where the driver knows, unmodified) before it is removed.
const DefaultGrace = 15 * time.Minute

// Holder says whether an export is in use by something that keeps no
// record of it (the template mounts: controller/image.Mounts).
type Holder interface {
	Holds(uri drivers.URI) bool
}

// Reconciler sweeps the stores for orphans.
type Reconciler struct {
	db      *meta.DB
	stores  *datastore.Service
	holders []Holder
	log     *slog.Logger
	grace   time.Duration
	now     func() time.Time
	removed *prometheus.CounterVec

	mu   sync.Mutex
	seen map[string]time.Time // what was orphaned at the last sweep, and since when
}

// New returns a reconciler that removes what has been orphaned for grace.
func New(db *meta.DB, stores *datastore.Service, grace time.Duration, log *slog.Logger, holders ...Holder) *Reconciler {
	return &Reconciler{db: db, stores: stores, holders: holders, log: log, grace: grace, now: time.Now, seen: map[string]time.Time{},
		removed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "stowage_orphans_removed_total",
			Help: "Orphans the reconciler removed, by kind (object, chunk, grant).",
		}, []string{"kind"})}
}

// Collectors are the reconciler's metrics, for the controller's registry.
func (r *Reconciler) Collectors() []prometheus.Collector { return []prometheus.Collector{r.removed} }

// Report is what one sweep found and did.
type Report struct {
	Stores        int      // stores swept
	Objects       []string // store/key of the objects removed
	Pending       int      // orphans seen but still within the grace period
	Chunks        int64    // chunks removed
	ChunkBytes    int64    // bytes they held
	Grants        []string // host and object of the exports revoked
	Errors        []error  // per store; a failing store does not stop the sweep
	ObjectsListed int
}

// Run sweeps now (the start of the controller) and then every interval
// until ctx ends.
func (r *Reconciler) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		rep, err := r.Sweep(ctx)
		if err != nil && ctx.Err() == nil {
			r.log.Warn("orphan sweep failed", "err", err)
		}
		if len(rep.Objects)+len(rep.Grants) > 0 || rep.Chunks > 0 || len(rep.Errors) > 0 {
			r.log.Info("orphan sweep", "stores", rep.Stores, "objects_removed", len(rep.Objects), "chunks_removed", rep.Chunks,
				"chunk_bytes_freed", rep.ChunkBytes, "grants_revoked", len(rep.Grants), "pending", rep.Pending, "errors", len(rep.Errors))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Sweep makes one pass over every Up store.
func (r *Reconciler) Sweep(ctx context.Context) (Report, error) {
	var rep Report
	stores, err := r.db.Stores().List(ctx, meta.Filter[*stowagev1.DataStore]{Where: func(s *stowagev1.DataStore) bool {
		return s.GetState() == stowagev1.StoreState_STORE_STATE_UP
	}})
	if err != nil {
		return rep, fmt.Errorf("orphan sweep: list stores: %w", err)
	}
	seen := map[string]time.Time{}
	for _, st := range stores {
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		rep.Stores++
		if err := r.sweepStore(ctx, st, &rep, seen); err != nil {
			rep.Errors = append(rep.Errors, fmt.Errorf("store %s: %w", st.GetName(), err))
			r.log.Warn("orphan sweep of a store failed", "store", st.GetName(), "err", err)
			// Keep what this store had pending: a failed listing is not
			// evidence that its orphans went away.
			r.mu.Lock()
			for k, t := range r.seen {
				if strings.HasPrefix(k, st.GetId()+"\x00") {
					seen[k] = t
				}
			}
			r.mu.Unlock()
		}
	}
	r.mu.Lock()
	r.seen = seen
	r.mu.Unlock()
	return rep, nil
}

// sweepStore removes the orphans of one store: objects, then chunks, then
// grants. seen collects what is orphaned now (with when it was first seen).
func (r *Reconciler) sweepStore(ctx context.Context, st *stowagev1.DataStore, rep *Report, seen map[string]time.Time) error {
	d, err := r.stores.Driver(st)
	if err != nil {
		return err
	}
	info := datastore.InfoFromRecord(st)
	// List first, read the records second (see the package doc).
	objs, err := d.ListObjects(ctx, info)
	if err != nil {
		return err
	}
	rep.ObjectsListed += len(objs)
	var (
		grants []drivers.Grant
		errs   []error
	)
	if gl, ok := d.(drivers.GrantLister); ok {
		// A host that could not be asked is named in the error; what the
		// others answered is still right to act on.
		if grants, err = gl.ListGrants(ctx, info); err != nil {
			errs = append(errs, err)
		}
	}
	live, err := r.accounted(ctx, st.GetId())
	if err != nil {
		return err
	}
	for _, o := range objs {
		if live.keys[o.Key] || live.busy[o.ID] {
			continue
		}
		if !r.due(seen, st.GetId()+"\x00obj\x00"+o.Key, o.ModifiedAt) {
			rep.Pending++
			continue
		}
		if err := r.removeObject(ctx, d, info, o); err != nil {
			errs = append(errs, err)
			continue
		}
		r.removed.WithLabelValues("object").Inc()
		rep.Objects = append(rep.Objects, st.GetName()+"/"+o.Key)
		r.log.Warn("removed an orphan object: no record points to it", "store", st.GetName(), "key", o.Key, "type", o.Type, "bytes", o.PhysicalSize)
	}
	if cc, ok := d.(drivers.ChunkCollector); ok && st.GetRole() == stowagev1.StoreRole_STORE_ROLE_IMAGE && !live.backingUp {
		stats, err := cc.CollectChunks(ctx, info)
		if err != nil {
			errs = append(errs, fmt.Errorf("collect chunks: %w", err))
		} else if stats.Chunks > 0 {
			r.removed.WithLabelValues("chunk").Add(float64(stats.Chunks))
			rep.Chunks += stats.Chunks
			rep.ChunkBytes += stats.FreedBytes
			r.log.Warn("removed orphan backup chunks: no manifest uses them", "store", st.GetName(), "chunks", stats.Chunks, "bytes", stats.FreedBytes)
		}
	}
	for _, g := range grants {
		if r.held(g, live) {
			continue
		}
		if !r.due(seen, st.GetId()+"\x00grant\x00"+string(g.Access.URI), g.Created) {
			rep.Pending++
			continue
		}
		obj := drivers.DataObject{Store: info, Key: g.Key}
		if err := d.RevokeAccess(ctx, obj, drivers.Client{HostID: g.Access.HostID}, g.Access); err != nil {
			errs = append(errs, fmt.Errorf("revoke an orphan export on host %s: %w", g.Access.HostID, err))
			continue
		}
		r.removed.WithLabelValues("grant").Inc()
		rep.Grants = append(rep.Grants, g.Access.HostID+":"+st.GetName()+"/"+g.Key)
		r.log.Warn("revoked an orphan export: no volume, template mount or running job holds it", "store", st.GetName(), "key", g.Key, "host", g.Access.HostID, "task", g.TaskID)
	}
	return errors.Join(errs...)
}

// due records key as orphaned now and says whether it has been for the
// grace period, with its modification time (zero: unknown) as old.
func (r *Reconciler) due(seen map[string]time.Time, key string, modified time.Time) bool {
	now := r.now()
	r.mu.Lock()
	first, ok := r.seen[key]
	r.mu.Unlock()
	if !ok {
		first = now
	}
	seen[key] = first
	if now.Sub(first) < r.grace {
		return false
	}
	return modified.IsZero() || now.Sub(modified) >= r.grace
}

// removeObject deletes an orphan object through its driver: a backup's
// manifest with the chunks only it used.
func (r *Reconciler) removeObject(ctx context.Context, d drivers.Driver, info drivers.StoreInfo, o drivers.ObjectInfo) error {
	obj := drivers.DataObject{ID: o.ID, Type: o.Type, Store: info, Format: o.Format, Size: o.Size, Key: o.Key}
	if ct, ok := d.(drivers.ChunkTarget); ok && o.Type == drivers.ObjectSnapshot && info.Role != drivers.RolePrimary {
		if _, err := ct.DeleteBackup(ctx, obj); err != nil {
			return fmt.Errorf("remove orphan backup %s: %w", o.Key, err)
		}
		return nil
	}
	if err := d.Delete(ctx, obj); err != nil {
		return fmt.Errorf("remove orphan %s %s: %w", o.Type, o.Key, err)
	}
	return nil
}

// held says whether a grant is accounted for: recorded on a volume, used
// by a template mount, or made (or shared) by a job that has not ended.
func (r *Reconciler) held(g drivers.Grant, live accounted) bool {
	if live.uris[string(g.Access.URI)] {
		return true
	}
	for _, h := range r.holders {
		if h.Holds(g.Access.URI) {
			return true
		}
	}
	for _, id := range append([]string{g.TaskID}, g.SharedWith...) {
		// A step's task id is <job id>.<step> (jobs.StepTaskID).
		if job, _, _ := strings.Cut(id, "."); job != "" && live.jobs[job] {
			return true
		}
	}
	return false
}

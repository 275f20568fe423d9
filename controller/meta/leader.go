package meta

import (
	"context"
	"errors"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/stowage/stowage/errdefs"
)

// Term is one period of leadership of this process.
type Term struct {
	done   <-chan struct{}
	resign func(context.Context) error
}

// Done is closed when the leadership is lost (its lease expired or could
// not be kept alive). Writes fail from then on: the process should stop
// its leader work, and is best restarted as a follower.
func (t *Term) Done() <-chan struct{} { return t.done }

// Resign gives the leadership up at once, so a follower takes over without
// waiting for the lease to expire (a clean shutdown).
func (t *Term) Resign(ctx context.Context) error { return t.resign(ctx) }

// Replicated reports whether several controllers may share this store
// (etcd). An embedded store (Badger) has one process: it always leads.
func (db *DB) Replicated() bool {
	_, ok := db.kv.(*etcdStore)
	return ok
}

// Campaign blocks until this process leads, then returns the term. self is
// what Leader returns to the others while it leads: the URL agents and
// clients reach this controller at. ttl is the lease: after a crash, the
// leadership passes on within it.
//
// From then on, every write transaction of db commits only while the
// leadership holds (it is fenced by the election key's revision), so a
// deposed leader that has not noticed yet cannot write over its successor.
func (db *DB) Campaign(ctx context.Context, self string, ttl time.Duration) (*Term, error) {
	es, ok := db.kv.(*etcdStore)
	if !ok {
		// One process owns the embedded store (it holds the directory lock).
		return &Term{done: make(chan struct{}), resign: func(context.Context) error { return nil }}, nil
	}
	secs := int(ttl / time.Second)
	if secs < 1 {
		return nil, fmt.Errorf("meta: leader lease %s: at least 1s: %w", ttl, errdefs.ErrInvalid)
	}
	s, err := concurrency.NewSession(es.cli, concurrency.WithTTL(secs), concurrency.WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("meta: leader lease: %w", etcdErr(err))
	}
	e := concurrency.NewElection(s, es.root+"/leader")
	if err := e.Campaign(ctx, self); err != nil {
		_ = s.Close()
		if errors.Is(err, context.Canceled) {
			return nil, fmt.Errorf("meta: campaign: %w", err)
		}
		return nil, fmt.Errorf("meta: campaign: %w", etcdErr(err))
	}
	es.setFence(e.Key(), e.Rev())
	return &Term{done: s.Done(), resign: func(ctx context.Context) error {
		err := e.Resign(ctx)
		return errors.Join(err, s.Close())
	}}, nil
}

// Leader returns what the leading process passed to Campaign, or "" when
// none leads. On an embedded store it returns "".
func (db *DB) Leader(ctx context.Context) (string, error) {
	es, ok := db.kv.(*etcdStore)
	if !ok {
		return "", nil
	}
	// The leader is the oldest key under the election prefix.
	resp, err := es.cli.Get(ctx, es.root+"/leader/", clientv3.WithFirstCreate()...)
	if err != nil {
		return "", fmt.Errorf("meta: who leads: %w", etcdErr(err))
	}
	if len(resp.Kvs) == 0 {
		return "", nil
	}
	return string(resp.Kvs[0].Value), nil
}

package meta

import (
	"context"
	"errors"
)

// kvStore is the seam between the typed repository and the storage engine.
// Badger implements it in badger.go; an etcd backend would implement it with
// a software transactional memory over etcd's compare-and-swap transactions
// (clientv3/concurrency.STM does exactly this: it records the revision of
// every key it read and commits only if none changed).
//
// Everything the repository needs is here: point reads, writes and deletes,
// and ordered prefix scans, all inside one serializable transaction.
type kvStore interface {
	// update runs fn in a read-write transaction and commits it when fn
	// returns nil. It returns errTxnConflict when another transaction
	// committed a write to a key this one read; the caller may retry.
	update(ctx context.Context, fn func(kvTxn) error) error
	// view runs fn in a read-only snapshot.
	view(ctx context.Context, fn func(kvTxn) error) error
	// watch calls notify after each committed change of key until ctx
	// ends. It does not block: changes committed once it returns are
	// notified, or (where the engine needs time to start watching, or the
	// stream broke) notify is called once the watch is in place, so that
	// the caller reads again. notify must not block.
	watch(ctx context.Context, key []byte, notify func())
	// close releases the store. It is called once.
	close() error
}

// kvTxn is one transaction of a kvStore. It is not safe for concurrent use.
type kvTxn interface {
	// get returns a copy of the value under key, or errKeyNotFound.
	get(key []byte) ([]byte, error)
	// set writes val under key.
	set(key, val []byte) error
	// delete removes key; deleting a missing key is not an error.
	delete(key []byte) error
	// scan calls fn for every key that starts with prefix, in ascending key
	// order, starting at the first key >= seek (seek may be nil). With
	// keysOnly, fn gets a nil val. key and val are only valid during the
	// call. fn returns errStopScan to end the scan early without error.
	scan(prefix, seek []byte, keysOnly bool, fn func(key, val []byte) error) error
}

// prefetcher is implemented by a transaction that can read many keys in
// one request (etcd): after prefetch, get of those keys is served from the
// transaction, with the same guards as if each had been read by get.
type prefetcher interface {
	prefetch(keys [][]byte) error
}

var (
	errKeyNotFound = errors.New("meta: key not found")
	errTxnConflict = errors.New("meta: transaction conflict")
	errStopScan    = errors.New("meta: stop scan")
)

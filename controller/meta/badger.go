package meta

// This is the only file of Stowage that imports Badger. Everything above the
// kvStore seam (kv.go) is engine-neutral.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"

	badger "github.com/dgraph-io/badger/v4"
)

// badgerStore is the embedded kvStore: Badger with synchronous writes, sized
// for metadata (thousands to millions of small records, not bulk data).
type badgerStore struct {
	db *badger.DB

	mu       sync.Mutex
	seq      uint64
	watchers map[string]map[uint64]func() // key -> watch id -> notify
}

var _ kvStore = (*badgerStore)(nil)

// openBadger opens (or creates) the Badger database in dir. log may be nil,
// which silences Badger.
func openBadger(dir string, log *slog.Logger) (*badgerStore, error) {
	opts := badger.DefaultOptions(dir).
		WithSyncWrites(true).           // a committed transition survives a power cut
		WithMemTableSize(16 << 20).     // default 64 MiB, times NumMemtables
		WithNumMemtables(2).            // default 5
		WithValueLogFileSize(64 << 20). // default 1 GiB
		WithBlockCacheSize(16 << 20).   // default 256 MiB
		WithNumCompactors(2).           // the minimum Badger accepts
		WithNumLevelZeroTables(2).      // flush small, compact early
		WithNumLevelZeroTablesStall(8). // stall writers only when far behind
		WithMetricsEnabled(false).      // no process-global expvars
		WithDetectConflicts(true).      // the CAS guarantees rest on this
		WithLogger(nil)
	if log != nil {
		opts = opts.WithLogger(slogAdapter{log: log})
	}
	if err := dropEmptyMemtables(dir); err != nil {
		return nil, err
	}
	db, err := badger.Open(opts)
	if err != nil {
		return nil, err
	}
	return &badgerStore{db: db}, nil
}

// dropEmptyMemtables removes memtable files (*.mem) of zero length: what a
// process killed while Badger was creating one leaves behind. It holds no
// data (a memtable gets its size before its first write), and Badger
// refuses to open with it ("while opening memtables ... Create a new
// file"), so without this a controller killed at that moment would not
// start again without manual repair.
func dropEmptyMemtables(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".mem") || !e.Type().IsRegular() {
			continue
		}
		if fi, err := e.Info(); err == nil && fi.Size() == 0 {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	return nil
}

func (s *badgerStore) update(_ context.Context, fn func(kvTxn) error) error {
	txn := s.db.NewTransaction(true)
	defer txn.Discard()
	bt := &badgerTxn{txn: txn}
	if err := fn(bt); err != nil {
		return err
	}
	if err := txn.Commit(); err != nil {
		if errors.Is(err, badger.ErrConflict) {
			return errTxnConflict
		}
		return fmt.Errorf("meta: commit: %w", err)
	}
	s.notify(bt.wrote)
	return nil
}

func (s *badgerStore) view(_ context.Context, fn func(kvTxn) error) error {
	txn := s.db.NewTransaction(false)
	defer txn.Discard()
	return fn(&badgerTxn{txn: txn})
}

func (s *badgerStore) close() error { return s.db.Close() }

// watch registers notify in process: this process is the store's only
// writer (Badger holds the directory lock), so its commits are all the
// changes there are.
func (s *badgerStore) watch(ctx context.Context, key []byte, notify func()) {
	k := string(key)
	s.mu.Lock()
	s.seq++
	id := s.seq
	if s.watchers == nil {
		s.watchers = map[string]map[uint64]func(){}
	}
	if s.watchers[k] == nil {
		s.watchers[k] = map[uint64]func(){}
	}
	s.watchers[k][id] = notify
	s.mu.Unlock()
	context.AfterFunc(ctx, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		delete(s.watchers[k], id)
		if len(s.watchers[k]) == 0 {
			delete(s.watchers, k)
		}
	})
}

// notify tells the watchers of the keys a transaction wrote.
func (s *badgerStore) notify(keys []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.watchers) == 0 {
		return
	}
	for _, k := range keys {
		for _, fn := range s.watchers[k] {
			fn()
		}
	}
}

// badgerTxn adapts *badger.Txn to kvTxn.
type badgerTxn struct {
	txn   *badger.Txn
	wrote []string // keys set or deleted, for the watchers
}

func (t *badgerTxn) get(key []byte) ([]byte, error) {
	item, err := t.txn.Get(key)
	if errors.Is(err, badger.ErrKeyNotFound) {
		return nil, errKeyNotFound
	}
	if err != nil {
		return nil, err
	}
	return item.ValueCopy(nil)
}

func (t *badgerTxn) set(key, val []byte) error {
	t.wrote = append(t.wrote, string(key))
	return t.txn.Set(key, val)
}

func (t *badgerTxn) delete(key []byte) error {
	t.wrote = append(t.wrote, string(key))
	return t.txn.Delete(key)
}

func (t *badgerTxn) scan(prefix, seek []byte, keysOnly bool, fn func(key, val []byte) error) error {
	o := badger.DefaultIteratorOptions
	o.Prefix = prefix
	o.PrefetchValues = !keysOnly
	if !keysOnly {
		o.PrefetchSize = 64
	}
	it := t.txn.NewIterator(o)
	defer it.Close()
	start := prefix
	if bytes.Compare(seek, prefix) > 0 {
		start = seek
	}
	for it.Seek(start); it.ValidForPrefix(prefix); it.Next() {
		item := it.Item()
		var val []byte
		if !keysOnly {
			v, err := item.ValueCopy(nil)
			if err != nil {
				return err
			}
			val = v
		}
		if err := fn(item.Key(), val); err != nil {
			if errors.Is(err, errStopScan) {
				return nil
			}
			return err
		}
	}
	return nil
}

// slogAdapter sends Badger's log lines to a slog.Logger. Badger's Info lines
// are engine chatter (tables opened, compactions), so they go out at Debug.
type slogAdapter struct {
	log *slog.Logger
}

func (a slogAdapter) logf(level slog.Level, format string, args ...any) {
	if !a.log.Enabled(context.Background(), level) {
		return
	}
	a.log.Log(context.Background(), level, strings.TrimSpace(fmt.Sprintf(format, args...)), "component", "badger")
}

func (a slogAdapter) Errorf(f string, v ...any)   { a.logf(slog.LevelError, f, v...) }
func (a slogAdapter) Warningf(f string, v ...any) { a.logf(slog.LevelWarn, f, v...) }
func (a slogAdapter) Infof(f string, v ...any)    { a.logf(slog.LevelDebug, f, v...) }
func (a slogAdapter) Debugf(f string, v ...any)   { a.logf(slog.LevelDebug, f, v...) }

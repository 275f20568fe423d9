package meta

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// setRaw writes key=val in its own transaction.
func setRaw(t *testing.T, kv kvStore, key, val string) {
	t.Helper()
	if err := kv.update(context.Background(), func(kt kvTxn) error { return kt.set([]byte(key), []byte(val)) }); err != nil {
		t.Fatalf("set %s: %v", key, err)
	}
}

// TestGuardsAgainstConcurrentWriters: a transaction whose reads another
// commit changed before its own commit is refused (and Txn re-runs it),
// on both engines: a point read of a present or absent key, and a key a
// scan returned, changed or deleted.
func TestGuardsAgainstConcurrentWriters(t *testing.T) {
	for _, tc := range []struct {
		name  string
		read  func(kt kvTxn) error
		other func(kt kvTxn) error
	}{
		{"present key changed", func(kt kvTxn) error { _, err := kt.get([]byte("x/a")); return err },
			func(kt kvTxn) error { return kt.set([]byte("x/a"), []byte("2")) }},
		{"present key deleted", func(kt kvTxn) error { _, err := kt.get([]byte("x/a")); return err },
			func(kt kvTxn) error { return kt.delete([]byte("x/a")) }},
		{"absent key created", func(kt kvTxn) error {
			if _, err := kt.get([]byte("x/none")); !errors.Is(err, errKeyNotFound) {
				return fmt.Errorf("get x/none: %v", err)
			}
			return nil
		}, func(kt kvTxn) error { return kt.set([]byte("x/none"), []byte("1")) }},
		{"scanned key changed", func(kt kvTxn) error {
			return kt.scan([]byte("x/"), nil, false, func(k, v []byte) error { return nil })
		}, func(kt kvTxn) error { return kt.set([]byte("x/b"), []byte("2")) }},
		{"scanned key deleted", func(kt kvTxn) error {
			return kt.scan([]byte("x/"), nil, true, func(k, v []byte) error { return nil })
		}, func(kt kvTxn) error { return kt.delete([]byte("x/b")) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := openTest(t)
			setRaw(t, db.kv, "x/a", "1")
			setRaw(t, db.kv, "x/b", "1")
			err := db.kv.update(ctx, func(kt kvTxn) error {
				if err := tc.read(kt); err != nil {
					return err
				}
				if err := db.kv.update(ctx, tc.other); err != nil {
					return fmt.Errorf("the other writer: %w", err)
				}
				return kt.set([]byte("y/out"), []byte("1"))
			})
			if !errors.Is(err, errTxnConflict) {
				t.Fatalf("commit after a concurrent write to what it read: %v, want a conflict", err)
			}
			if got := rawGet(t, db, []byte("y/out")); got != nil {
				t.Fatalf("the refused transaction wrote y/out=%q", got)
			}
		})
	}
}

// TestEtcdScanSeesInserts: on etcd, a record inserted inside a range a
// transaction scanned also fails its commit (Badger tracks only the keys
// it returned).
func TestEtcdScanSeesInserts(t *testing.T) {
	if !onEtcd() {
		t.Skip("etcd only")
	}
	db := openTest(t)
	setRaw(t, db.kv, "x/a", "1")
	err := db.kv.update(ctx, func(kt kvTxn) error {
		if err := kt.scan([]byte("x/"), nil, false, func(k, v []byte) error { return nil }); err != nil {
			return err
		}
		setRaw(t, db.kv, "x/c", "1")
		return kt.set([]byte("y/out"), []byte("1"))
	})
	if !errors.Is(err, errTxnConflict) {
		t.Fatalf("commit after an insert into a scanned range: %v", err)
	}
	// A scan that stopped early guards only what it read.
	err = db.kv.update(ctx, func(kt kvTxn) error {
		if err := kt.scan([]byte("x/"), nil, false, func(k, v []byte) error { return errStopScan }); err != nil {
			return err
		}
		setRaw(t, db.kv, "x/d", "1")
		return kt.set([]byte("y/out"), []byte("1"))
	})
	if err != nil {
		t.Fatalf("commit after an insert past where the scan stopped: %v", err)
	}
}

// TestEtcdScanMergesOwnWrites: a scan inside a transaction sees its own
// pending writes and deletes, in key order, as Badger's does.
func TestScanMergesOwnWrites(t *testing.T) {
	db := openTest(t)
	for _, k := range []string{"x/b", "x/d", "x/f"} {
		setRaw(t, db.kv, k, "old")
	}
	var got []string
	err := db.kv.update(ctx, func(kt kvTxn) error {
		for _, k := range []string{"x/a", "x/d", "x/e"} {
			if err := kt.set([]byte(k), []byte("new")); err != nil {
				return err
			}
		}
		if err := kt.delete([]byte("x/f")); err != nil {
			return err
		}
		return kt.scan([]byte("x/"), []byte("x/b"), false, func(k, v []byte) error {
			got = append(got, string(k)+"="+string(v))
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != "[x/b=old x/d=new x/e=new]" {
		t.Fatalf("scan from x/b saw %v", got)
	}
}

// TestEtcdManyReadsFallBack: a transaction with more reads than etcd's
// --max-txn-ops allows compares is still guarded (by the commit marker),
// and one writing more than it allows is refused, writing nothing.
func TestEtcdManyReadsFallBack(t *testing.T) {
	if !onEtcd() {
		t.Skip("etcd only")
	}
	db := openTest(t, WithEtcd(EtcdOptions{MaxTxnOps: 6}))
	for i := range 10 {
		setRaw(t, db.kv, fmt.Sprintf("x/%02d", i), "1")
	}
	readAll := func(kt kvTxn) error {
		for i := range 10 {
			if _, err := kt.get(fmt.Appendf(nil, "x/%02d", i)); err != nil {
				return err
			}
		}
		return nil
	}
	if err := db.kv.update(ctx, func(kt kvTxn) error {
		if err := readAll(kt); err != nil {
			return err
		}
		return kt.set([]byte("y/out"), []byte("1"))
	}); err != nil {
		t.Fatalf("quiet commit with 10 reads: %v", err)
	}
	err := db.kv.update(ctx, func(kt kvTxn) error {
		if err := readAll(kt); err != nil {
			return err
		}
		setRaw(t, db.kv, "z/unrelated", "1")
		return kt.set([]byte("y/out"), []byte("2"))
	})
	if !errors.Is(err, errTxnConflict) {
		t.Fatalf("coarse guard after another commit: %v", err)
	}
	err = db.kv.update(ctx, func(kt kvTxn) error {
		for i := range 6 {
			if err := kt.set(fmt.Appendf(nil, "w/%d", i), []byte("1")); err != nil {
				return err
			}
		}
		return nil
	})
	if !errors.Is(err, errdefs.ErrResourceExhausted) || rawGet(t, db, []byte("w/0")) != nil {
		t.Fatalf("oversized transaction: %v", err)
	}
}

// TestWatch: a record's watch fires after it changes, on both engines.
func TestWatch(t *testing.T) {
	db := openTest(t)
	if _, err := db.Stores().Create(ctx, primary("s1", "p1")); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := db.Stores().Watch(wctx, "s1")
	// Drain the "watch in place" signal etcd sends, then change the record.
	if onEtcd() {
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			t.Fatal("no signal once the watch was in place")
		}
	}
	if _, err := db.Stores().Transition(ctx, "s1", StoreAttachSucceeded, nil); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal("no signal after the record changed")
	}
	st, err := db.Stores().Get(ctx, "s1")
	if err != nil || st.GetState() != stowagev1.StoreState_STORE_STATE_UP {
		t.Fatalf("after the signal: %v %v", st, err)
	}
}

// TestLeadership: of two controllers on one etcd prefix one leads; the
// other takes over when it resigns, and the deposed one can no longer
// write. On Badger the one process leads at once.
func TestLeadership(t *testing.T) {
	spec := testSpec(t)
	open := func() *DB {
		db, err := Open(spec)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		return db
	}
	a := open()
	termA, err := a.Campaign(ctx, "https://a:8470", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !onEtcd() {
		if a.Replicated() {
			t.Fatal("Badger says it is replicated")
		}
		return
	}
	if who, err := a.Leader(ctx); err != nil || who != "https://a:8470" {
		t.Fatalf("leader %q, %v", who, err)
	}
	b := open()
	got := make(chan *Term, 1)
	go func() {
		term, err := b.Campaign(ctx, "https://b:8470", 2*time.Second)
		if err != nil {
			t.Error(err)
		}
		got <- term
	}()
	select {
	case <-got:
		t.Fatal("b leads while a does")
	case <-time.After(300 * time.Millisecond):
	}
	if _, err := a.Stores().Create(ctx, primary("s1", "p1")); err != nil {
		t.Fatalf("leader's write: %v", err)
	}
	if err := termA.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("b did not take over")
	}
	if who, _ := b.Leader(ctx); who != "https://b:8470" {
		t.Fatalf("leader after takeover %q", who)
	}
	if _, err := a.Stores().Create(ctx, primary("s2", "p2")); !errdefs.IsUnavailable(err) || !errors.Is(err, errNotLeader) {
		t.Fatalf("deposed leader's write: %v", err)
	}
	if _, err := b.Stores().Create(ctx, primary("s2", "p2")); err != nil {
		t.Fatalf("new leader's write: %v", err)
	}
}

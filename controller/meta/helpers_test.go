package meta

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
)

// openTest opens a fresh DB in a temporary directory, closed (and checked
// for index consistency) when the test ends.
func openTest(t *testing.T, opts ...Option) *DB {
	t.Helper()
	db, err := Open(testSpec(t), opts...)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if !db.closed {
			if err := db.Check(context.Background()); err != nil {
				t.Errorf("Check at end of test: %v", err)
			}
		}
		if err := db.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return db
}

// rawGet returns the stored bytes of one key, or nil.
func rawGet(t *testing.T, db *DB, key []byte) []byte {
	t.Helper()
	var out []byte
	err := db.kv.view(context.Background(), func(kt kvTxn) error {
		v, err := kt.get(key)
		if err == errKeyNotFound {
			return nil
		}
		out = v
		return err
	})
	if err != nil {
		t.Fatalf("raw get %s: %v", key, err)
	}
	return out
}

// keysMentioning lists every key of the database whose last segment is id
// (records and secondary index entries) and every unique entry owned by id.
func keysMentioning(t *testing.T, db *DB, id string) []string {
	t.Helper()
	var out []string
	err := db.kv.view(context.Background(), func(kt kvTxn) error {
		return kt.scan(nil, nil, false, func(key, val []byte) error {
			k := string(key)
			if strings.HasSuffix(k, "/"+id) || (strings.HasPrefix(k, uniquePrefix) && string(val) == id) {
				out = append(out, k)
			}
			return nil
		})
	})
	if err != nil {
		t.Fatalf("scan: %v", err)
	}
	return out
}

// forceState puts a record in state s without the machine, keeping its
// revision, so tests can start a transition from any state.
func forceState[T Record, S ~int32, E comparable](t *testing.T, db *DB, k *StatefulKind[T, S, E], id string, s S) {
	t.Helper()
	err := db.Txn(context.Background(), func(tx *Tx) error {
		old, err := k.load(tx.kv, id)
		if err != nil {
			return err
		}
		next := proto.Clone(old).(T)
		k.setState(next, s)
		return k.write(tx.kv, old, true, next)
	})
	if err != nil {
		t.Fatalf("force %s %s to %s: %v", k.noun, id, k.machine.StateName(s), err)
	}
}

// sameBytes fails the test when the stored record changed.
func sameBytes(t *testing.T, what string, before, after []byte) {
	t.Helper()
	if !bytes.Equal(before, after) {
		t.Fatalf("%s: stored bytes changed", what)
	}
}

// fixedClock is a clock tests can move.
type fixedClock struct{ t time.Time }

func (c *fixedClock) now() time.Time { return c.t }

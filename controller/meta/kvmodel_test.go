package meta

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
)

// TestEtcdMatchesBadger runs the same random transactions (sets, deletes,
// gets and scans with seeks, early stops and keys only, over the
// transaction's own pending writes) on Badger and on etcd, and requires
// every answer to be the same.
func TestEtcdMatchesBadger(t *testing.T) {
	if !onEtcd() {
		t.Skip("etcd pass only")
	}
	bdb, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer bdb.Close()
	bs, es := bdb.kv, openTest(t).kv
	keys := []string{"a/1", "a/2", "a/3", "a/30", "b/1", "b/2", "ab/1", "c"}
	prefixes := []string{"a/", "b/", "a", "", "c", "d/"}
	r := rand.New(rand.NewPCG(1, 2))
	for txn := range 300 {
		var ops []func(kvTxn) string
		for range 1 + r.IntN(8) {
			k := keys[r.IntN(len(keys))]
			switch r.IntN(5) {
			case 0, 1:
				v := fmt.Sprintf("v%d", r.IntN(100))
				ops = append(ops, func(kt kvTxn) string { return fmt.Sprint("set ", k, v, kt.set([]byte(k), []byte(v))) })
			case 2:
				ops = append(ops, func(kt kvTxn) string { return fmt.Sprint("del ", k, kt.delete([]byte(k))) })
			case 3:
				ops = append(ops, func(kt kvTxn) string {
					v, err := kt.get([]byte(k))
					return fmt.Sprintf("get %s %q %v", k, v, err)
				})
			default:
				p := prefixes[r.IntN(len(prefixes))]
				var seek []byte
				if r.IntN(2) == 0 {
					seek = []byte(keys[r.IntN(len(keys))])
				}
				stopAfter, keysOnly := r.IntN(4), r.IntN(2) == 0
				ops = append(ops, func(kt kvTxn) string {
					var seen []string
					err := kt.scan([]byte(p), seek, keysOnly, func(k, v []byte) error {
						seen = append(seen, string(k)+"="+string(v))
						if stopAfter > 0 && len(seen) == stopAfter {
							return errStopScan
						}
						return nil
					})
					return fmt.Sprintf("scan %q from %q stop %d keys %v: %v %v", p, seek, stopAfter, keysOnly, seen, err)
				})
			}
		}
		run := func(kv kvStore) string {
			var out []string
			err := kv.update(ctx, func(kt kvTxn) error {
				for _, op := range ops {
					out = append(out, op(kt))
				}
				return nil
			})
			return strings.Join(out, "\n") + fmt.Sprint("\ncommit ", err)
		}
		if b, e := run(bs), run(es); b != e {
			t.Fatalf("transaction %d differs:\nBadger:\n%s\netcd:\n%s", txn, b, e)
		}
	}
}

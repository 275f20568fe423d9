package meta

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// populate writes at least one record of every kind, with index and
// unique entries.
func populate(t *testing.T, db *DB) {
	t.Helper()
	err := db.Txn(ctx, func(tx *Tx) error {
		steps := []func() error{
			func() error {
				_, err := Stores.CreateTx(tx, &stowagev1.DataStore{Id: "s1", Name: "p1", Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY})
				return err
			},
			func() error {
				_, err := Hosts.CreateTx(tx, &stowagev1.Host{Id: "h1", Hostname: "kvm1", Zone: "z1"})
				return err
			},
			func() error {
				_, err := Templates.CreateTx(tx, &stowagev1.Template{Id: "t1", Name: "debian/12"})
				return err
			},
			func() error {
				_, err := TemplatesOnStore.CreateTx(tx, &stowagev1.TemplateOnStore{Id: "r1", TemplateId: "t1", StoreId: "s1"})
				return err
			},
			func() error {
				_, err := Volumes.CreateTx(tx, &stowagev1.Volume{Id: "v1", Name: "root", StoreId: "s1", TemplateId: "t1"})
				return err
			},
			func() error {
				_, err := Snapshots.CreateTx(tx, &stowagev1.Snapshot{Id: "sn1", VolumeId: "v1"})
				return err
			},
			func() error {
				_, err := SnapshotsOnStore.CreateTx(tx, &stowagev1.SnapshotOnStore{Id: "so1", SnapshotId: "sn1", StoreId: "s1"})
				return err
			},
			func() error {
				_, err := Jobs.CreateTx(tx, &stowagev1.Job{Id: "j1", TargetId: "v1", IdempotencyKey: "k1", CreatedBy: "tok1"})
				return err
			},
			func() error {
				_, err := Tokens.CreateTx(tx, &stowagev1.TokenRecord{Id: "tok1", Name: "admin", Role: stowagev1.TokenRole_TOKEN_ROLE_ADMIN, SecretSha256: bytes.Repeat([]byte{7}, 32)})
				return err
			},
			func() error {
				_, err := JoinTokens.CreateTx(tx, &stowagev1.JoinToken{Id: "jt1"})
				return err
			},
		}
		for _, s := range steps {
			if err := s(); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("populate: %v", err)
	}
}

// dump is every key and value of db.
func dump(t *testing.T, db *DB) map[string]string {
	t.Helper()
	out := map[string]string{}
	if err := db.kv.view(ctx, func(kt kvTxn) error {
		return kt.scan(nil, nil, false, func(k, v []byte) error {
			out[string(k)] = string(v)
			return nil
		})
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

func backupOf(t *testing.T, db *DB) ([]byte, BackupInfo) {
	t.Helper()
	var buf bytes.Buffer
	info, err := db.Backup(ctx, &buf)
	if err != nil {
		t.Fatalf("Backup: %v", err)
	}
	if info.Bytes != int64(buf.Len()) {
		t.Fatalf("Backup says %d bytes, wrote %d", info.Bytes, buf.Len())
	}
	return buf.Bytes(), info
}

func TestBackupRestoreRoundTrip(t *testing.T) {
	src := openTest(t)
	populate(t, src)
	want := dump(t, src)
	for _, k := range allKinds {
		name := k.(interface{ Name() string }).Name()
		if _, ok := want[name+"/"+map[string]string{
			"store": "s1", "host": "h1", "template": "t1", "template_on_store": "r1", "volume": "v1",
			"snapshot": "sn1", "snapshot_on_store": "so1", "job": "j1", "token": "tok1", "join_token": "jt1",
		}[name]]; !ok {
			t.Fatalf("populate wrote no record of kind %s", name)
		}
	}
	data, info := backupOf(t, src)
	if info.Records != int64(len(want)) || info.SchemaVersion != latestSchemaVersion() || info.FormatVersion != 1 {
		t.Fatalf("info %+v, want %d records at schema %d", info, len(want), latestSchemaVersion())
	}
	if v, err := VerifyBackup(ctx, bytes.NewReader(data)); err != nil || v.SHA256 != info.SHA256 || v.Records != info.Records {
		t.Fatalf("VerifyBackup: %+v %v", v, err)
	}

	dst := openTest(t)
	got, err := Restore(ctx, dst, bytes.NewReader(data))
	if err != nil {
		t.Fatalf("Restore: %v", err)
	}
	if got.SHA256 != info.SHA256 {
		t.Fatalf("Restore read %x, backup %x", got.SHA256, info.SHA256)
	}
	if err := dst.Check(ctx); err != nil {
		t.Fatal(err)
	}
	after := dump(t, dst)
	if len(after) != len(want) {
		t.Fatalf("restored %d keys, want %d", len(after), len(want))
	}
	for k, v := range want {
		if after[k] != v {
			t.Errorf("key %s: restored %q, want %q", k, after[k], v)
		}
	}
	// The typed repositories read it, and a second backup is byte-equal
	// but for the time it was taken.
	if v, err := dst.Volumes().Get(ctx, "v1"); err != nil || v.GetName() != "root" {
		t.Fatalf("restored volume: %v %v", v, err)
	}
	again, _ := backupOf(t, dst)
	if !bytes.Equal(again[24:len(again)-32], data[24:len(data)-32]) {
		t.Fatal("a backup of the restored store differs from the original")
	}
}

// A restore into a store that holds records is refused and changes nothing.
func TestRestoreRefusesNonEmpty(t *testing.T) {
	src := openTest(t)
	populate(t, src)
	data, _ := backupOf(t, src)
	dst := openTest(t)
	if _, err := dst.Templates().Create(ctx, &stowagev1.Template{Id: "other", Name: "x"}); err != nil {
		t.Fatal(err)
	}
	before := dump(t, dst)
	_, err := Restore(ctx, dst, bytes.NewReader(data))
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "not empty") {
		t.Fatalf("restore into a non-empty store: %v", err)
	}
	if after := dump(t, dst); len(after) != len(before) {
		t.Fatalf("a refused restore wrote: %d keys, had %d", len(after), len(before))
	}
}

// Damaged streams are refused before anything is written.
func TestRestoreRefusesDamage(t *testing.T) {
	src := openTest(t)
	populate(t, src)
	data, _ := backupOf(t, src)
	flip := func(i int) []byte {
		d := bytes.Clone(data)
		d[i] ^= 0x01
		return d
	}
	cases := []struct {
		name  string
		data  []byte
		class error
		want  string
	}{
		{"bit flipped in a value", flip(len(data) / 2), errdefs.ErrDataLoss, ""},
		{"bit flipped in the checksum", flip(len(data) - 1), errdefs.ErrDataLoss, "SHA-256 mismatch"},
		{"cut short", data[:len(data)-40], errdefs.ErrDataLoss, ""},
		{"cut in the header", data[:10], errdefs.ErrDataLoss, "cut short"},
		{"trailing bytes", append(bytes.Clone(data), 0), errdefs.ErrDataLoss, "after the trailer"},
		{"empty", nil, errdefs.ErrDataLoss, "cut short"},
		{"not a backup", []byte("hello, this is not a backup at all"), errdefs.ErrInvalid, "not a Stowage metadata backup"},
		{"unknown format", func() []byte { d := bytes.Clone(data); d[11] = 9; return d }(), errdefs.ErrFailedPrecondition, "format version 9"},
		{"newer schema", func() []byte { d := bytes.Clone(data); d[15] = byte(latestSchemaVersion() + 1); return d }(), errdefs.ErrFailedPrecondition, "newer than"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dst := openTest(t)
			_, err := Restore(ctx, dst, bytes.NewReader(c.data))
			if !errors.Is(err, c.class) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want %v containing %q", err, c.class, c.want)
			}
			if keys := dump(t, dst); len(keys) != 1 {
				t.Fatalf("a refused restore left %d keys: %v", len(keys), keys)
			}
		})
	}
}

// A stream whose checksum is right but whose second read differs (the
// file changed under the restore) is undone: the store is empty again.
func TestRestoreUndoesAFailedWrite(t *testing.T) {
	src := openTest(t)
	populate(t, src)
	data, _ := backupOf(t, src)
	dst := openTest(t)
	r := &changingReader{first: data, second: flipAt(data, len(data)/2)}
	_, err := Restore(ctx, dst, r)
	if !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("restore of a changing file: %v", err)
	}
	keys := dump(t, dst)
	if len(keys) != 1 || keys[schemaVersionKey] == "" {
		t.Fatalf("after the undo: %v, want only the schema version", keys)
	}
	// And it can be restored into after that.
	if _, err := Restore(ctx, dst, bytes.NewReader(data)); err != nil {
		t.Fatalf("restore after an undone one: %v", err)
	}
}

func flipAt(b []byte, i int) []byte {
	d := bytes.Clone(b)
	d[i] ^= 0x80
	return d
}

// changingReader returns first until the first Seek, then second.
type changingReader struct {
	first, second []byte
	r             *bytes.Reader
}

func (c *changingReader) Read(p []byte) (int, error) {
	if c.r == nil {
		c.r = bytes.NewReader(c.first)
	}
	return c.r.Read(p)
}

func (c *changingReader) Seek(off int64, whence int) (int64, error) {
	c.r = bytes.NewReader(c.second)
	return c.r.Seek(off, whence)
}

// A store a restore left half written (a crash: the marker is still there)
// is refused by Open, and by another restore.
func TestOpenRefusesHalfRestored(t *testing.T) {
	dir := testSpec(t)
	db, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.kv.update(ctx, func(kt kvTxn) error {
		if err := kt.set([]byte(restoreMarkerKey), []byte("abc")); err != nil {
			return err
		}
		return kt.set([]byte("volume/v1"), []byte("half"))
	}); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = Open(dir)
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "restore into this store did not finish") {
		t.Fatalf("Open of a half-restored store: %v", err)
	}
}

// A backup of an older schema is migrated by Restore as Open would: here
// a version-3 backup (jobs not indexed by creator) comes back at the
// latest version with the index.
func TestRestoreMigratesOlderSchema(t *testing.T) {
	src := openTest(t)
	populate(t, src)
	want := dump(t, src)
	// Write a version-3 stream of the same store by hand.
	var buf bytes.Buffer
	bw := &backupWriter{w: bufioWriter(&buf), h: newSHA()}
	bw.header(BackupInfo{FormatVersion: 1, SchemaVersion: 3})
	var n int64
	for _, k := range sortedKeys(want) {
		v := want[k]
		if strings.HasPrefix(k, "idx/job/created_by/") {
			continue
		}
		if k == schemaVersionKey {
			v = "3"
		}
		bw.record([]byte(k), []byte(v))
		n++
	}
	bw.trailer(n)
	if bw.err != nil {
		t.Fatal(bw.err)
	}
	dst := openTest(t)
	if _, err := Restore(ctx, dst, bytes.NewReader(buf.Bytes())); err != nil {
		t.Fatalf("Restore of a version-3 backup: %v", err)
	}
	got := dump(t, dst)
	for k, v := range want {
		if got[k] != v {
			t.Errorf("key %s: %q, want %q", k, got[k], v)
		}
	}
	if v, _ := dst.SchemaVersion(ctx); v != latestSchemaVersion() {
		t.Fatalf("schema version %d after restore, want %d", v, latestSchemaVersion())
	}
}

// A backup file is what the CLI writes; a restore from a file on disk
// works the same as from memory (the two reads seek the file).
func TestRestoreFromFile(t *testing.T) {
	src := openTest(t)
	populate(t, src)
	data, _ := backupOf(t, src)
	path := filepath.Join(t.TempDir(), "meta.backup")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dst := openTest(t)
	if _, err := Restore(ctx, dst, f); err != nil {
		t.Fatal(err)
	}
}

func bufioWriter(w io.Writer) *bufio.Writer { return bufio.NewWriter(w) }

func newSHA() hash.Hash { return sha256.New() }

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// A backup is engine-neutral: in the etcd pass, one taken on Badger
// restores into etcd and one taken on etcd into Badger, key for key.
func TestBackupAcrossEngines(t *testing.T) {
	if !onEtcd() {
		t.Skip("needs the etcd pass")
	}
	open := func(spec string) *DB {
		db, err := Open(spec)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		return db
	}
	badgerSrc, etcdDst := open(t.TempDir()), open(testSpec(t))
	populate(t, badgerSrc)
	data, _ := backupOf(t, badgerSrc)
	if _, err := Restore(ctx, etcdDst, bytes.NewReader(data)); err != nil {
		t.Fatalf("Badger -> etcd: %v", err)
	}
	want := dump(t, badgerSrc)
	if got := dump(t, etcdDst); len(got) != len(want) {
		t.Fatalf("etcd holds %d keys, Badger %d", len(got), len(want))
	}
	back, _ := backupOf(t, etcdDst)
	badgerDst := open(t.TempDir())
	if _, err := Restore(ctx, badgerDst, bytes.NewReader(back)); err != nil {
		t.Fatalf("etcd -> Badger: %v", err)
	}
	got := dump(t, badgerDst)
	for k, v := range want {
		if got[k] != v {
			t.Errorf("key %s after Badger -> etcd -> Badger: %q, want %q", k, got[k], v)
		}
	}
}

// BenchmarkBackupRestore backs up and restores a store of 10,000 volumes
// (each with its index entries); b.SetBytes makes it print the stream's
// MB/s.
func BenchmarkBackupRestore(b *testing.B) {
	src, err := Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer src.Close()
	for i := 0; i < 10000; i += 100 {
		err := src.Txn(ctx, func(tx *Tx) error {
			for j := i; j < i+100; j++ {
				v := &stowagev1.Volume{Id: fmt.Sprintf("v%06d", j), Name: fmt.Sprintf("vm-%d-root", j), StoreId: "s1", TemplateId: "t1",
					Size: 20 << 30, InstallPath: fmt.Sprintf("volumes/%06d.qcow2", j)}
				if _, err := Volumes.CreateTx(tx, v); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	var buf bytes.Buffer
	b.ResetTimer()
	for range b.N {
		buf.Reset()
		t0 := time.Now()
		info, err := src.Backup(ctx, &buf)
		if err != nil {
			b.Fatal(err)
		}
		took := time.Since(t0)
		b.SetBytes(info.Bytes)
		dst, err := Open(b.TempDir())
		if err != nil {
			b.Fatal(err)
		}
		t0 = time.Now()
		if _, err := Restore(ctx, dst, bytes.NewReader(buf.Bytes())); err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(info.Records), "keys")
		b.ReportMetric(float64(info.Bytes)/1e6, "stream-MB")
		b.ReportMetric(float64(took.Milliseconds()), "backup-ms")
		b.ReportMetric(float64(time.Since(t0).Milliseconds()), "restore-ms")
		dst.Close()
	}
}

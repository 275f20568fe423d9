package meta

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"testing"

	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func TestMigrationsAreOrdered(t *testing.T) {
	for i, m := range migrations {
		if m.version != i+1 || m.name == "" || m.apply == nil {
			t.Fatalf("migration %d: %+v", i, m)
		}
	}
}

// A new database gets its version key and nothing else (migration 1,
// "initial layout"; migration 2 only reindexes templates).
func TestMigration1InitialLayout(t *testing.T) {
	db := openTest(t)
	var keys []string
	if err := db.kv.view(context.Background(), func(kt kvTxn) error {
		return kt.scan(nil, nil, true, func(key, _ []byte) error {
			keys = append(keys, string(key))
			return nil
		})
	}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(keys, []string{schemaVersionKey}) {
		t.Fatalf("keys of a new database: %v", keys)
	}
	if got := string(rawGet(t, db, []byte(schemaVersionKey))); got != strconv.Itoa(latestSchemaVersion()) {
		t.Fatalf("schema version %q, want %d", got, latestSchemaVersion())
	}
}

// Migration 2 indexes the templates a version-1 database holds by name.
func TestMigration2TemplateNames(t *testing.T) {
	db := openTest(t)
	if _, err := db.Templates().Create(ctx, &stowagev1.Template{Id: "t1", Name: "debian"}); err != nil {
		t.Fatal(err)
	}
	// Make it a version-1 database: no name index entry, version 1.
	if err := db.kv.update(context.Background(), func(kt kvTxn) error {
		if err := kt.delete(indexKey("template", IndexName, "debian", "t1")); err != nil {
			return err
		}
		return kt.set([]byte(schemaVersionKey), []byte("1"))
	}); err != nil {
		t.Fatal(err)
	}
	if got, _ := db.Templates().ListBy(ctx, IndexName, "debian"); len(got) != 0 {
		t.Fatalf("setup: index entry still there")
	}
	if err := migrate(context.Background(), db.kv, migrations); err != nil {
		t.Fatal(err)
	}
	got, err := db.Templates().ListBy(ctx, IndexName, "debian")
	if err != nil || len(got) != 1 || got[0].GetId() != "t1" {
		t.Fatalf("after migration 2: %v %v", got, err)
	}
}

func TestMigration3TypedJobParams(t *testing.T) {
	db := openTest(t)
	old := []*stowagev1.Job{
		{Id: "j1", Kind: "volume.create", Params: map[string]string{"format": "qcow2", "mode": "linked", "image_store": "img"}},
		{Id: "j2", Kind: "volume.migrate", Params: map[string]string{"src": "p1", "dst": "p2", "src_path": "volumes/v.raw"}},
		{Id: "j3", Kind: "snapshot.backup", Params: map[string]string{"ref": "r", "src": "s", "kind": "SNAPSHOT_KIND_INCREMENTAL"}},
		{Id: "j4", Kind: "volume.resize", Params: map[string]string{"size": "2048"}},
	}
	for _, j := range old {
		if _, err := db.Jobs().Create(ctx, j); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.kv.update(context.Background(), func(kt kvTxn) error { return kt.set([]byte(schemaVersionKey), []byte("2")) }); err != nil {
		t.Fatal(err)
	}
	if err := migrate(context.Background(), db.kv, migrations); err != nil {
		t.Fatal(err)
	}
	get := func(id string) *stowagev1.Job {
		j, err := db.Jobs().Get(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if len(j.GetParams()) != 0 {
			t.Errorf("job %s keeps string params %v", id, j.GetParams())
		}
		return j
	}
	if p := get("j1").GetJobParams().GetVolumeCreate(); p.GetFormat() != stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2 || p.GetCloneMode() != "linked" || p.GetImageStoreId() != "img" {
		t.Errorf("volume.create: %v", p)
	}
	if p := get("j2").GetJobParams().GetVolumeMigrate(); p.GetSrcStoreId() != "p1" || p.GetDstStoreId() != "p2" || p.GetSrcKey() != "volumes/v.raw" {
		t.Errorf("volume.migrate: %v", p)
	}
	if p := get("j3").GetJobParams().GetSnapshotBackup(); p.GetRefId() != "r" || p.GetSrcRefId() != "s" || p.GetKind() != stowagev1.SnapshotKind_SNAPSHOT_KIND_INCREMENTAL {
		t.Errorf("snapshot.backup: %v", p)
	}
	if p := get("j4").GetJobParams().GetVolumeResize(); p.GetSizeBytes() != 2048 {
		t.Errorf("volume.resize: %v", p)
	}
}

// The migration machinery: pending steps run once, in order, each with the
// version bump in its transaction; a failing step leaves the old version.
func TestMigratePendingSteps(t *testing.T) {
	db := openTest(t)
	if _, err := db.Volumes().Create(ctx, &stowagev1.Volume{Id: "v1", StoreId: "s1"}); err != nil {
		t.Fatal(err)
	}
	// Simulate a layout from before an index existed: drop the entry.
	lost := indexKey("volume", IndexStoreID, "s1", "v1")
	if err := db.kv.update(context.Background(), func(kt kvTxn) error { return kt.delete(lost) }); err != nil {
		t.Fatal(err)
	}
	if err := db.Check(ctx); !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("Check before the migration: %v", err)
	}

	runs := 0
	n := latestSchemaVersion()
	steps := append(slices.Clone(migrations),
		migration{version: n + 1, name: "index volumes by store", apply: func(kt kvTxn) error {
			runs++
			return reindexKinds(kt, allKinds...)
		}},
		migration{version: n + 2, name: "broken", apply: func(kvTxn) error { return errdefs.ErrInternal }},
	)
	err := migrate(context.Background(), db.kv, steps)
	if !errors.Is(err, errdefs.ErrInternal) {
		t.Fatalf("migrate with a broken step: %v", err)
	}
	if v, _ := db.SchemaVersion(ctx); v != n+1 || runs != 1 {
		t.Fatalf("version %d after %d runs, want %d after 1", v, runs, n+1)
	}
	if err := db.Check(ctx); err != nil {
		t.Fatalf("Check after the reindex: %v", err)
	}
	// Applied steps are not applied again.
	if err := migrate(context.Background(), db.kv, steps[:n+1]); err != nil || runs != 1 {
		t.Fatalf("second migrate: %v, %d runs", err, runs)
	}
	// A database newer than the steps is refused.
	if err := migrate(context.Background(), db.kv, steps[:n]); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("migrate down: %v", err)
	}
	// Gaps in the list are a programming error.
	if err := migrate(context.Background(), db.kv, []migration{{version: n + 1, name: "gap", apply: func(kvTxn) error { return nil }}}); !errors.Is(err, errdefs.ErrInternal) {
		t.Fatalf("gap: %v", err)
	}
	// Put the version back so the cleanup's Check sees this binary's layout.
	if err := db.kv.update(context.Background(), func(kt kvTxn) error { return kt.set([]byte(schemaVersionKey), []byte(strconv.Itoa(n))) }); err != nil {
		t.Fatal(err)
	}
}

// Migration 4 indexes the jobs a version-3 database holds by created_by
// (and the token kind, new in version 4, has nothing to index yet).
func TestMigration4JobsByCreator(t *testing.T) {
	db := openTest(t)
	if _, err := db.Jobs().Create(ctx, &stowagev1.Job{Id: "j1", Kind: "volume.create", CreatedBy: "ci (t1)"}); err != nil {
		t.Fatal(err)
	}
	if err := db.kv.update(context.Background(), func(kt kvTxn) error {
		if err := kt.delete(indexKey("job", IndexCreatedBy, "ci (t1)", "j1")); err != nil {
			return err
		}
		return kt.set([]byte(schemaVersionKey), []byte("3"))
	}); err != nil {
		t.Fatal(err)
	}
	if got, _ := db.Jobs().ListBy(ctx, IndexCreatedBy, "ci (t1)"); len(got) != 0 {
		t.Fatalf("setup: index entry still there")
	}
	if err := migrate(context.Background(), db.kv, migrations); err != nil {
		t.Fatal(err)
	}
	got, err := db.Jobs().ListBy(ctx, IndexCreatedBy, "ci (t1)")
	if err != nil || len(got) != 1 || got[0].GetId() != "j1" {
		t.Fatalf("jobs by creator after migration 4: %v, %v", got, err)
	}
	if v, _ := db.SchemaVersion(ctx); v != 4 {
		t.Fatalf("schema version %d, want 4", v)
	}
}

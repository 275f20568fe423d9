package meta

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/stowage/stowage/errdefs"
)

// migration moves the stored data from schema version-1 to version. Each
// runs in one transaction together with the write of the new version, so a
// crash leaves the database at the old or at the new version, never between.
type migration struct {
	version int
	name    string
	apply   func(kt kvTxn) error
}

// migrations is ordered by version, from 1 without gaps. Append; never edit
// or reorder a released entry. Each entry has its own test in
// migrations_test.go.
//
// A migration that adds or changes an index calls reindexKinds for the
// kinds it touches (or all of allKinds).
var migrations = []migration{
	{version: 1, name: "initial layout", apply: func(kvTxn) error { return nil }},
	{version: 2, name: "index templates by name", apply: func(kt kvTxn) error { return reindexKinds(kt, Templates) }},
	{version: 3, name: "typed job parameters", apply: migrateJobParams},
	{version: 4, name: "index jobs by creator; API tokens", apply: func(kt kvTxn) error { return reindexKinds(kt, Jobs, Tokens) }},
}

// latestSchemaVersion is the version this binary writes.
func latestSchemaVersion() int { return migrations[len(migrations)-1].version }

// readSchemaVersion returns the stored version; 0 for a new database.
func readSchemaVersion(kt kvTxn) (int, error) {
	val, err := kt.get([]byte(schemaVersionKey))
	if errors.Is(err, errKeyNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("meta: read schema version: %w", err)
	}
	v, err := strconv.Atoi(string(val))
	if err != nil || v < 1 {
		return 0, fmt.Errorf("meta: schema version %q is not a positive number: %w", val, errdefs.ErrDataLoss)
	}
	return v, nil
}

// migrate brings kv to the last version in migs, one transaction per step.
// It refuses a database whose version is newer than the last of migs, and
// one a restore did not finish (backup.go).
func migrate(ctx context.Context, kv kvStore, migs []migration) error {
	if err := kv.view(ctx, func(kt kvTxn) error {
		started, err := kt.get([]byte(restoreMarkerKey))
		if errors.Is(err, errKeyNotFound) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("meta: read the restore marker: %w", err)
		}
		return fmt.Errorf("meta: a restore into this store did not finish (backup sha256 %s); "+
			"empty it (a new directory or etcd prefix) and restore again: %w", started, errdefs.ErrFailedPrecondition)
	}); err != nil {
		return err
	}
	return applyMigrations(ctx, kv, migs)
}

// applyMigrations is migrate without the restore check (Restore runs it
// while its marker is set).
func applyMigrations(ctx context.Context, kv kvStore, migs []migration) error {
	for i, m := range migs {
		if m.version != i+1 {
			return fmt.Errorf("meta: migration %q has version %d, want %d: %w", m.name, m.version, i+1, errdefs.ErrInternal)
		}
	}
	latest := len(migs)
	var current int
	if err := kv.view(ctx, func(kt kvTxn) error {
		var err error
		current, err = readSchemaVersion(kt)
		return err
	}); err != nil {
		return err
	}
	if current > latest {
		return fmt.Errorf("meta: schema version %d is newer than %d, the newest this build of Stowage knows; "+
			"run a newer Stowage or restore a backup: %w", current, latest, errdefs.ErrFailedPrecondition)
	}
	for _, m := range migs[current:] {
		err := kv.update(ctx, func(kt kvTxn) error {
			// Re-read inside the transaction, so a step is applied once.
			v, err := readSchemaVersion(kt)
			if err != nil {
				return err
			}
			if v >= m.version {
				return nil
			}
			if err := m.apply(kt); err != nil {
				return err
			}
			return kt.set([]byte(schemaVersionKey), []byte(strconv.Itoa(m.version)))
		})
		if err != nil {
			return fmt.Errorf("meta: migration %d (%s): %w", m.version, m.name, err)
		}
	}
	return nil
}

// reindexKinds rebuilds the indexes of the given kinds.
func reindexKinds(kt kvTxn, kinds ...reindexer) error {
	for _, k := range kinds {
		if err := k.reindex(kt); err != nil {
			return err
		}
	}
	return nil
}

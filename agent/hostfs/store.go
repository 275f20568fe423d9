package hostfs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/stowage/stowage/datapath/chunkstore"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/errdefs"
)

// marker is the content of MarkerFile.
type marker struct {
	StoreID   string    `json:"store_id"`
	CreatedAt time.Time `json:"created_at"`
}

// PrepareStore creates the store directory path (and its missing parents,
// mode 0755), the subdirectories subdirs (relative, clean, no ".."), and
// the marker naming storeID, then probes the store. A directory whose
// marker names another store is refused with errdefs.ErrFailedPrecondition;
// one that already carries storeID's marker is completed (missing subdirs
// are created again) and probed. When PrepareStore fails, it removes every
// directory and file it created.
func (l *Local) PrepareStore(ctx context.Context, path, storeID string, subdirs []string) (StoreProbe, error) {
	probe, err := l.prepareStore(ctx, path, storeID, subdirs)
	if err != nil {
		return StoreProbe{}, fmt.Errorf("prepare store %s at %s on host %s: %w", storeID, path, l.hostID, err)
	}
	return probe, nil
}

func (l *Local) prepareStore(ctx context.Context, path, storeID string, subdirs []string) (_ StoreProbe, err error) {
	if err := checkPath(path); err != nil {
		return StoreProbe{}, err
	}
	if err := checkStoreID(storeID); err != nil {
		return StoreProbe{}, err
	}
	if err := checkSubdirs(subdirs); err != nil {
		return StoreProbe{}, err
	}
	if err := ctx.Err(); err != nil {
		return StoreProbe{}, err
	}
	dir := l.onHost(path)
	if fi, err := os.Stat(dir); err == nil && !fi.IsDir() {
		return StoreProbe{}, fmt.Errorf("%s exists and is not a directory: %w", path, errdefs.ErrFailedPrecondition)
	}
	m, hasMarker, err := readMarker(dir, path)
	if err != nil {
		return StoreProbe{}, err
	}
	if hasMarker && m.StoreID != storeID {
		return StoreProbe{}, ownedError(path, m.StoreID)
	}

	// Undo on failure: what this call created, newest first. Only empty
	// directories and our own marker are ever removed.
	var createdDirs []string
	wroteMarker := false
	keep := false
	defer func() {
		if err == nil || keep {
			return
		}
		if wroteMarker {
			_ = os.Remove(filepath.Join(dir, MarkerFile))
		}
		for i := len(createdDirs) - 1; i >= 0; i-- {
			_ = os.Remove(createdDirs[i])
		}
	}()

	created, err := mkdirAll(dir)
	createdDirs = append(createdDirs, created...)
	if err != nil {
		return StoreProbe{}, classed(err)
	}
	for _, sd := range subdirs {
		created, err := mkdirAll(filepath.Join(dir, sd))
		createdDirs = append(createdDirs, created...)
		if err != nil {
			return StoreProbe{}, classed(err)
		}
	}
	if err := ctx.Err(); err != nil {
		return StoreProbe{}, err
	}
	if !hasMarker {
		wroteMarker, err = writeMarker(dir, marker{StoreID: storeID, CreatedAt: nowUTC()})
		if err != nil {
			return StoreProbe{}, classed(err)
		}
		if !wroteMarker {
			// A concurrent PrepareStore wrote a marker first.
			m, _, err := readMarker(dir, path)
			if err != nil {
				return StoreProbe{}, err
			}
			if m.StoreID != storeID {
				keep = true // the directories are the other store's layout now
				return StoreProbe{}, ownedError(path, m.StoreID)
			}
		}
	}
	// Make the new directory entries durable: each created directory's parent.
	for _, d := range createdDirs {
		if err := durable.SyncDir(filepath.Dir(d)); err != nil {
			return StoreProbe{}, classed(err)
		}
	}
	return l.probe(ctx, dir)
}

// ownedError is the refusal to touch a directory of another store.
func ownedError(path, owner string) error {
	return fmt.Errorf("directory %s already belongs to store %s; pick another path or delete that store: %w",
		path, owner, errdefs.ErrFailedPrecondition)
}

// checkSubdirs requires each subdirectory to be a clean relative path inside the store.
func checkSubdirs(subdirs []string) error {
	for _, sd := range subdirs {
		if sd == "." || !filepath.IsLocal(sd) || filepath.Clean(sd) != sd || strings.IndexByte(sd, 0) >= 0 {
			return fmt.Errorf("store subdirectory %q is not a clean relative path inside the store: %w", sd, errdefs.ErrInvalid)
		}
		if b := filepath.Base(sd); b == MarkerFile || isTemp(b) {
			return fmt.Errorf("store subdirectory %q uses a name reserved by Stowage: %w", sd, errdefs.ErrInvalid)
		}
	}
	return nil
}

// mkdirAll is os.MkdirAll that returns the directories it created, parents first.
func mkdirAll(dir string) ([]string, error) {
	var missing []string
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err == nil {
			if !fi.IsDir() {
				return nil, &fs.PathError{Op: "mkdir", Path: d, Err: syscall.ENOTDIR}
			}
			break
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		missing = append(missing, d)
		if d == filepath.Dir(d) {
			break
		}
	}
	var created []string
	for i := len(missing) - 1; i >= 0; i-- {
		err := os.Mkdir(missing[i], 0o755)
		if errors.Is(err, fs.ErrExist) {
			if fi, serr := os.Stat(missing[i]); serr == nil && fi.IsDir() {
				continue // made concurrently
			}
		}
		if err != nil {
			return created, err
		}
		created = append(created, missing[i])
	}
	return created, nil
}

// readMarker reads the marker of the store directory dir (path for messages).
func readMarker(dir, path string) (marker, bool, error) {
	b, err := os.ReadFile(filepath.Join(dir, MarkerFile))
	if errors.Is(err, fs.ErrNotExist) {
		return marker{}, false, nil
	}
	if err != nil {
		return marker{}, false, classed(err)
	}
	var m marker
	if err := json.Unmarshal(b, &m); err != nil || m.StoreID == "" {
		return marker{}, true, fmt.Errorf("store marker %s/%s is unreadable (not written by Stowage, or damaged); move it away if the directory is free: %w",
			path, MarkerFile, errdefs.ErrFailedPrecondition)
	}
	return m, true, nil
}

// writeMarker writes m as dir's marker unless one exists; it reports
// whether it wrote it. Crash-safe: temp file, fsync, no-replace rename, fsync dir.
func writeMarker(dir string, m marker) (bool, error) {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return false, err
	}
	b = append(b, '\n')
	tmp := tempName(dir, MarkerFile)
	if err := durable.WriteNew(tmp, b, 0o644); err != nil {
		return false, err
	}
	defer os.Remove(tmp) // a no-op once renamed
	if err := durable.RenameNoReplace(tmp, filepath.Join(dir, MarkerFile)); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return false, nil
		}
		return false, err
	}
	return true, durable.SyncDir(dir)
}

// ProbeStore reads the capacity, filesystem type and reflink support of the
// store directory path, which must carry storeID's marker: a missing
// directory or marker is errdefs.ErrNotFound, another store's marker
// errdefs.ErrFailedPrecondition. It returns when ctx ends even if the kernel
// is stuck (a hard NFS mount of a dead server); the stuck goroutine then
// finishes when the kernel lets it.
func (l *Local) ProbeStore(ctx context.Context, path, storeID string) (StoreProbe, error) {
	fail := func(err error) (StoreProbe, error) {
		return StoreProbe{}, fmt.Errorf("probe store %s at %s on host %s: %w", storeID, path, l.hostID, err)
	}
	if err := checkPath(path); err != nil {
		return fail(err)
	}
	if err := checkStoreID(storeID); err != nil {
		return fail(err)
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	type result struct {
		probe StoreProbe
		err   error
	}
	done := make(chan result, 1)
	go func() {
		p, err := l.probeStore(ctx, path, storeID)
		done <- result{p, err}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			return fail(r.err)
		}
		return r.probe, nil
	case <-ctx.Done():
		return fail(ctx.Err())
	}
}

func (l *Local) probeStore(ctx context.Context, path, storeID string) (StoreProbe, error) {
	dir := l.onHost(path)
	fi, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return StoreProbe{}, fmt.Errorf("store directory %s does not exist: %w", path, errdefs.ErrNotFound)
	}
	if err != nil {
		return StoreProbe{}, classed(err)
	}
	if !fi.IsDir() {
		return StoreProbe{}, fmt.Errorf("%s is not a directory: %w", path, errdefs.ErrFailedPrecondition)
	}
	m, ok, err := readMarker(dir, path)
	if err != nil {
		return StoreProbe{}, err
	}
	if !ok {
		return StoreProbe{}, fmt.Errorf("%s has no store marker (never prepared, already released, or the export is not mounted on this host): %w",
			path, errdefs.ErrNotFound)
	}
	if m.StoreID != storeID {
		return StoreProbe{}, fmt.Errorf("directory %s belongs to store %s, not %s: %w", path, m.StoreID, storeID, errdefs.ErrFailedPrecondition)
	}
	return l.probe(ctx, dir)
}

// ReleaseStore removes the store's layout and then its marker. It refuses
// (errdefs.ErrFailedPrecondition, with the count of entries left per
// subdirectory) while any subdirectory holds anything but stale TempPrefix
// files, which it removes: it never removes data. The store directory itself
// stays (it may be a mount point or an operator's directory). A directory
// without a marker is already released: success. One whose marker names
// another store is refused.
func (l *Local) ReleaseStore(ctx context.Context, path, storeID string, subdirs []string) error {
	if err := l.releaseStore(ctx, path, storeID, subdirs); err != nil {
		return fmt.Errorf("release store %s at %s on host %s: %w", storeID, path, l.hostID, err)
	}
	return nil
}

func (l *Local) releaseStore(ctx context.Context, path, storeID string, subdirs []string) error {
	if err := checkPath(path); err != nil {
		return err
	}
	if err := checkStoreID(storeID); err != nil {
		return err
	}
	if err := checkSubdirs(subdirs); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	dir := l.onHost(path)
	m, ok, err := readMarker(dir, path)
	if err != nil {
		return err
	}
	if !ok {
		return nil
	}
	if m.StoreID != storeID {
		return fmt.Errorf("directory %s belongs to store %s, not %s; not releasing it: %w", path, m.StoreID, storeID, errdefs.ErrFailedPrecondition)
	}

	layout := map[string]bool{}
	for _, sd := range subdirs {
		layout[sd] = true
	}
	total := 0
	var counts []string
	for _, sd := range subdirs {
		entries, err := os.ReadDir(filepath.Join(dir, sd))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return classed(err)
		}
		n := 0
		for _, e := range entries {
			switch {
			case layout[filepath.Join(sd, e.Name())]:
				// a nested layout directory, released below
			case (isTemp(e.Name()) || e.Name() == chunkstore.LockFile) && e.Type().IsRegular():
				// A step's leftover, or the chunk store's lock: no data.
				if err := os.Remove(filepath.Join(dir, sd, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
					return classed(err)
				}
			default:
				n++
			}
		}
		if n > 0 {
			total += n
			counts = append(counts, fmt.Sprintf("%s/: %d", sd, n))
		}
	}
	if total > 0 {
		return fmt.Errorf("store directory %s still holds %d entries (%s); release never removes data, delete them first: %w",
			path, total, strings.Join(counts, ", "), errdefs.ErrFailedPrecondition)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	// Deepest first, so nested layout directories go before their parents.
	ordered := append([]string(nil), subdirs...)
	sort.Slice(ordered, func(i, j int) bool { return len(ordered[i]) > len(ordered[j]) })
	for _, sd := range ordered {
		if err := os.Remove(filepath.Join(dir, sd)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return classed(err)
		}
	}
	// The marker goes last: a crash before this leaves a store that a retry releases.
	if err := os.Remove(filepath.Join(dir, MarkerFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return classed(err)
	}
	return classed(durable.SyncDir(dir))
}

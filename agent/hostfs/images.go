package hostfs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/stowage/stowage/failpoint"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// The image steps (imageOps, requests.go) share these rules, on top of the
// package's path contract:
//
//   - A step that makes an object writes it under a staging name in the
//     destination's directory (stagePath: TempPrefix + step + "." + name;
//     the copy engine's own work files for it start with "." + TempPrefix),
//     fsyncs it and renames it into place without replacing anything. A
//     staging name is the same for every attempt at the same destination,
//     so a download interrupted by a dropped connection or a cancelled step
//     resumes from the copy engine's checkpoint on the next attempt;
//     DeletePath of the destination removes those leftovers.
//   - Steps on one object path run one at a time (per-path locks that
//     honour the context); steps on different objects run in parallel.
//   - A destination that already exists is accepted when it is what the
//     step would have made (format, size, backing file, checksum when one
//     was asked for) and refused with errdefs.ErrAlreadyExists otherwise.

// stagePath is the staging name of step for the object at final (a path
// on this machine).
func stagePath(final, step string) string {
	base := filepath.Base(final)
	name := TempPrefix + step + "." + base
	if len(name)+len(".stowage-ckpt")+1 > 255 {
		sum := sha256.Sum256([]byte(base))
		name = TempPrefix + step + "." + hex.EncodeToString(sum[:])
	}
	return filepath.Join(filepath.Dir(final), name)
}

// stageSteps are the steps that stage objects; DeletePath clears their leftovers.
var stageSteps = []string{"fetch", "copy", "convert", "clone", "snap", "revert", "restore", "restore-raw"}

// removeStaged removes what an interrupted step left for the object at
// final (staging files and the copy engine's work files), unless a step on
// final is running.
func (l *Local) removeStaged(final string) {
	unlock, ok := l.locks.tryLock(final)
	if !ok {
		return
	}
	defer unlock()
	for _, step := range stageSteps {
		removeStage(stagePath(final, step))
	}
}

// discardIfCancelled removes the staging file of a step that stopped
// because it was cancelled on request (drivers.CancelledOnRequest: `stowage
// job cancel`): its job has ended and nothing will resume it. A step
// interrupted otherwise (the agent stopping, a dropped connection) keeps
// its stage so the next attempt resumes from the checkpoint.
func discardIfCancelled(ctx context.Context, stage string) {
	if drivers.CancelledOnRequest(ctx) {
		removeStage(stage)
	}
}

// removeStage removes a staging file and the copy engine's files for it.
func removeStage(stage string) {
	dir, base := filepath.Split(stage)
	os.Remove(stage)
	for _, suffix := range []string{".stowage-tmp", ".stowage-ckpt", ".stowage-raw"} {
		os.Remove(filepath.Join(dir, "."+base+suffix))
	}
}

// objectPath checks path (the package's path contract, and not a reserved
// name) and returns it on this machine.
func (l *Local) objectPath(path string) (string, error) {
	if err := checkPath(path); err != nil {
		return "", err
	}
	if b := filepath.Base(path); isTemp(b) || b == MarkerFile {
		return "", fmt.Errorf("name %s is reserved by Stowage: %w", b, errdefs.ErrInvalid)
	}
	return l.onHost(path), nil
}

// existingPath checks path and returns it on this machine.
func (l *Local) existingPath(path string) (string, error) {
	if err := checkPath(path); err != nil {
		return "", err
	}
	return l.onHost(path), nil
}

// callerPath maps a path on this machine back to the caller's view.
func (l *Local) callerPath(host string) string {
	if l.root == "" || host == "" {
		return host
	}
	if rel, ok := strings.CutPrefix(host, l.root); ok && strings.HasPrefix(rel, "/") {
		return rel
	}
	return host
}

// needDir checks that the directory of final exists.
func needDir(final, callerPath string) error {
	fi, err := os.Stat(filepath.Dir(final))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("directory %s does not exist: %w", filepath.Dir(callerPath), errdefs.ErrNotFound)
		}
		return classed(err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory: %w", filepath.Dir(callerPath), errdefs.ErrFailedPrecondition)
	}
	return nil
}

// makeDir makes sure the directory of final exists. Missing directories are
// created (0755, made durable) only inside a store, that is below a
// directory carrying the store marker, so that a step writing
// snapshots/<volume>/<snapshot>.qcow2 needs no separate mkdir while a
// mistyped path outside any store still fails with errdefs.ErrNotFound.
func (l *Local) makeDir(final, callerPath string) error {
	err := needDir(final, callerPath)
	if !errors.Is(err, errdefs.ErrNotFound) {
		return err
	}
	dir := filepath.Dir(final)
	if !l.inStore(dir) {
		return fmt.Errorf("directory %s does not exist and is not inside a store: %w", filepath.Dir(callerPath), errdefs.ErrNotFound)
	}
	created, err := mkdirAll(dir)
	if err != nil {
		return classed(err)
	}
	for _, d := range created {
		if err := durable.SyncDir(filepath.Dir(d)); err != nil {
			return classed(err)
		}
	}
	return nil
}

// inStore reports whether dir (on this machine) is inside a store
// directory: one of its existing ancestors carries MarkerFile.
func (l *Local) inStore(dir string) bool {
	for d := filepath.Dir(dir); ; d = filepath.Dir(d) {
		if l.root != "" && !strings.HasPrefix(d+"/", l.root+"/") {
			return false
		}
		if fi, err := os.Lstat(filepath.Join(d, MarkerFile)); err == nil && fi.Mode().IsRegular() {
			return true
		}
		if d == filepath.Dir(d) {
			return false
		}
	}
}

// exists reports whether something is at p.
func exists(p string) (bool, error) {
	_, err := os.Lstat(p)
	if err == nil {
		return true, nil
	}
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return false, classed(err)
}

// publish makes the staged file tmp visible as final: fsync, a rename that
// never replaces, a directory fsync. An existing final is fs.ErrExist. A
// ctx that ended by the time tmp is synced stops it before the rename.
func publish(ctx context.Context, tmp, final string) error {
	if err := durable.SyncFile(tmp); err != nil {
		return classed(err)
	}
	return publishSynced(ctx, tmp, final)
}

// publishSynced is publish for a staged file its step has fsynced itself.
func publishSynced(ctx context.Context, tmp, final string) error {
	if err := ctx.Err(); err != nil {
		// Cancelled while the stage was synced: never put it in place.
		return err
	}
	if err := failpoint.Hit(failpoint.AgentBeforePublish); err != nil {
		return err
	}
	if err := durable.RenameNoReplace(tmp, final); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%s appeared meanwhile: %w", final, errors.Join(err, errdefs.ErrAlreadyExists))
		}
		return classed(err)
	}
	if err := classed(durable.SyncDir(filepath.Dir(final))); err != nil {
		return err
	}
	return failpoint.Hit(failpoint.AgentAfterPublish)
}

// lockDest prepares the destination of an image step: it makes sure the
// directory of final (dest as the caller named it) exists, as makeDir does,
// and locks final. The caller defers unlock.
func (l *Local) lockDest(ctx context.Context, final, dest string) (unlock func(), err error) {
	if err := l.makeDir(final, dest); err != nil {
		return nil, err
	}
	return l.locks.lock(ctx, final)
}

// publishImage ends an image step: unless ctx ended, it publishes the
// staged image stage as final and describes it (dest as the caller named
// it), opened as format.
func (l *Local) publishImage(ctx context.Context, stage, final, dest, format string, opts ...qemuimg.InfoOption) (ImageInfo, error) {
	if err := ctx.Err(); err != nil {
		return ImageInfo{}, err
	}
	if err := publish(ctx, stage, final); err != nil {
		return ImageInfo{}, err
	}
	info, _, err := l.imageInfo(ctx, dest, final, format, opts...)
	if err != nil {
		return ImageInfo{}, err
	}
	return info, nil
}

// replace makes tmp visible as final, replacing what is there.
func replace(tmp, final string) error {
	if err := durable.SyncFile(tmp); err != nil {
		return classed(err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return classed(err)
	}
	return classed(durable.SyncDir(filepath.Dir(final)))
}

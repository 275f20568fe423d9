package hostfs

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// SweepStages removes what steps interrupted by a crash of this agent left
// in the store directory root: staging files (TempPrefix) and their work
// files, unless the stage can be resumed (the copy engine's checkpoint is
// beside it: the step, run again, continues from it) or a step on its
// object is running. It returns the files it removed. Run it when the
// agent starts serving a store, before steps arrive.
func (l *Local) SweepStages(ctx context.Context, root string) []string {
	var removed []string
	dir := l.onHost(root)
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || ctx.Err() != nil {
			return nil
		}
		if d.IsDir() {
			if rel, _ := filepath.Rel(dir, p); strings.Count(rel, string(filepath.Separator)) >= 3 {
				return filepath.SkipDir
			}
			return nil
		}
		name := d.Name()
		if !strings.HasPrefix(name, TempPrefix) {
			return nil
		}
		parent := filepath.Dir(p)
		if _, err := os.Stat(filepath.Join(parent, "."+name+".stowage-ckpt")); err == nil {
			return nil // resumable
		}
		// TempPrefix + step + "." + the object's name.
		rest := strings.TrimPrefix(name, TempPrefix)
		_, base, ok := strings.Cut(rest, ".")
		if !ok {
			return nil
		}
		unlock, free := l.locks.tryLock(filepath.Join(parent, base))
		if !free {
			return nil
		}
		removeStage(p)
		unlock()
		removed = append(removed, p)
		return nil
	})
	return removed
}

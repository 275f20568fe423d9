package hostfs

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

func TestSweepStagesKeepsResumableAndObjects(t *testing.T) {
	root := t.TempDir()
	vols := filepath.Join(root, "volumes")
	if err := os.MkdirAll(vols, 0o750); err != nil {
		t.Fatal(err)
	}
	write := func(name string) string {
		p := filepath.Join(vols, name)
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	clone := write(TempPrefix + "clone.v1.qcow2") // a crashed clone: goes
	cloneWork := write("." + TempPrefix + "clone.v1.qcow2.stowage-tmp")
	copyStage := write(TempPrefix + "copy.v2.raw") // a download that resumes: stays
	write("." + TempPrefix + "copy.v2.raw.stowage-ckpt")
	object := write("v3.qcow2") // an object: stays
	l := New("h1")
	unlock, _ := l.locks.tryLock(filepath.Join(vols, "v4.raw")) // a running step: its stage stays
	running := write(TempPrefix + "convert.v4.raw")
	removed := l.SweepStages(context.Background(), root)
	unlock()
	if len(removed) != 1 || removed[0] != clone {
		t.Fatalf("removed %v, want only %s", removed, clone)
	}
	for _, p := range []string{clone, cloneWork} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s left: %v", p, err)
		}
	}
	for _, p := range []string{copyStage, object, running} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s removed: %v", p, err)
		}
	}
}

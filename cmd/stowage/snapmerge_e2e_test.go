package main

// Deleting a snapshot in the middle of a qcow2 chain merges it (its child
// is rebased onto its parent) and gives the space back; the snapshots left
// keep their bytes, revert, copy, back up and restore.

import (
	"context"
	"encoding/json"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// storeUsed is what the files under dir occupy on disk (allocated blocks).
func storeUsed(t *testing.T, dir string) int64 {
	t.Helper()
	syscall.Sync()
	var used int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			used += st.Blocks * 512
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return used
}

// backingOf is the backing file the qcow2 at path records ("" for none).
func backingOf(t *testing.T, path string) string {
	t.Helper()
	var info struct {
		Backing string `json:"full-backing-filename"`
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "info", "-U", "--output=json", path)), &info); err != nil {
		t.Fatalf("qemu-img info %s: %v", path, err)
	}
	return info.Backing
}

func TestSnapMergeEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "qemu-img", "qemu-io")
	root := t.TempDir()
	ctx := context.Background()
	web, qcow := patternedQcow2(t, root, "write -P 0x33 10M 2M")
	srv := httptest.NewServer(http.FileServer(http.Dir(web)))
	defer srv.Close()

	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "controller"))
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"))
	waitFor(t, "host Up", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	a := newAPI(server)
	addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), &stowagev1.Scope{Zone: "z1"})
	pz := addStore(t, a, "pz", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "pz"), &stowagev1.Scope{Zone: "z1"})
	pzDir := pz.GetDetails()["path"]
	path := func(rel string) string { return filepath.Join(pzDir, rel) }

	rt, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "base", Url: srv.URL + "/base.qcow2",
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Checksum: "sha256:" + sha256File(t, qcow)}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, rt.Msg.GetJob())
	cv, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "v0", TemplateId: rt.Msg.GetTemplate().GetId(), StoreId: pz.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, cv.Msg.GetJob())
	v0 := cv.Msg.GetVolume()
	v0path := path(v0.GetInstallPath())

	write := func(cmds ...string) {
		t.Helper()
		args := []string{"-f", "qcow2"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		run(t, "qemu-io", append(args, v0path)...)
	}
	rawOf := func(name, p string) string {
		t.Helper()
		out := filepath.Join(root, name+".raw")
		run(t, "qemu-img", "convert", "-U", "-O", "raw", p, out)
		return out
	}
	same := func(what, raw, p string) {
		t.Helper()
		if out, err := exec.Command("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", raw, p).CombinedOutput(); err != nil {
			t.Fatalf("%s does not read as expected: %v\n%s", what, err, out)
		}
	}
	take := func(name string) (*stowagev1.Snapshot, string) {
		t.Helper()
		resp, err := a.snapshots.TakeSnapshot(ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: v0.GetId(), Name: name}))
		if err != nil {
			t.Fatalf("take %s: %v", name, err)
		}
		mustSucceed(t, a, resp.Msg.GetJob())
		g, err := a.snapshots.GetSnapshot(ctx, connect.NewRequest(&stowagev1.GetSnapshotRequest{Id: resp.Msg.GetSnapshot().GetId()}))
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range g.Msg.GetStores() {
			if r.GetRole() == stowagev1.StoreRole_STORE_ROLE_PRIMARY {
				return g.Msg.GetSnapshot(), path(r.GetInstallPath())
			}
		}
		t.Fatalf("snapshot %s has no primary copy", name)
		return nil, ""
	}
	backup := func(s *stowagev1.Snapshot) {
		t.Helper()
		resp, err := a.snapshots.BackupSnapshot(ctx, connect.NewRequest(&stowagev1.BackupSnapshotRequest{Id: s.GetId()}))
		if err != nil {
			t.Fatalf("backup %s: %v", s.GetName(), err)
		}
		mustSucceed(t, a, resp.Msg.GetJob())
	}
	del := func(s *stowagev1.Snapshot) *stowagev1.Job {
		t.Helper()
		resp, err := a.snapshots.DeleteSnapshot(ctx, connect.NewRequest(&stowagev1.DeleteSnapshotRequest{Id: s.GetId()}))
		if err != nil {
			t.Fatalf("delete %s: %v", s.GetName(), err)
		}
		if st := resp.Msg.GetPlan().GetStrategy(); st != "chain-merge-delete" {
			t.Errorf("delete %s: plan %q (%v), want chain-merge-delete", s.GetName(), st, resp.Msg.GetPlan().GetReasons())
		}
		return mustSucceed(t, a, resp.Msg.GetJob())
	}
	fromSnapshot := func(name string, s *stowagev1.Snapshot, strategy string) string {
		t.Helper()
		resp, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: name, SnapshotId: s.GetId(), StoreId: pz.GetId()}))
		if err != nil {
			t.Fatalf("volume from %s: %v", s.GetName(), err)
		}
		if got := resp.Msg.GetPlan().GetStrategy(); got != strategy {
			t.Errorf("volume from %s: plan %q, want %q", s.GetName(), got, strategy)
		}
		mustSucceed(t, a, resp.Msg.GetJob())
		return path(resp.Msg.GetVolume().GetInstallPath())
	}

	// The chain: template <- s1 <- s2 <- s3 <- v0. s2 holds 8 MiB at 16M
	// that s3 overwrites (only s2 reads it: the space the merge gives back)
	// and 2 MiB at 32M that s3 and the volume still read through s2.
	const onlyS2 = 8 << 20
	write("write -P 0xa1 0 4M")
	s1, s1path := take("s1")
	s1want := rawOf("s1", v0path)
	write("write -P 0xb2 16M 8M", "write -P 0xb3 32M 2M")
	s2, s2path := take("s2")
	write("write -P 0xc3 16M 8M")
	s3want := rawOf("s3", v0path)
	s3, s3path := take("s3")
	write("write -P 0xd4 40M 1M")
	backup(s1)
	backup(s2)
	vwant := rawOf("v0", v0path)
	s1sum := sha256File(t, s1path)
	if got := backingOf(t, s3path); got != s2path {
		t.Fatalf("setup: s3 is backed by %q, want s2 %q", got, s2path)
	}
	s2size := func() int64 {
		fi, err := os.Stat(s2path)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Sys().(*syscall.Stat_t).Blocks * 512
	}()

	before := storeUsed(t, pzDir)
	j := del(s2)
	after := storeUsed(t, pzDir)
	freed := before - after
	t.Logf("store pz used: %d bytes before deleting s2, %d after: %d freed (s2's file held %d; %d of it only s2 read)", before, after, freed, s2size, onlyS2)
	t.Logf("delete job: %v", j.GetResult())
	if freed < onlyS2-(1<<20) || freed > onlyS2+(2<<20) {
		t.Errorf("deleting s2 freed %d bytes, want about %d (the data only s2 held)", freed, onlyS2)
	}
	if _, err := os.Stat(s2path); !os.IsNotExist(err) {
		t.Errorf("s2's file remains: %v", err)
	}
	if _, err := a.snapshots.GetSnapshot(ctx, connect.NewRequest(&stowagev1.GetSnapshotRequest{Id: s2.GetId()})); code(err) != connect.CodeNotFound {
		t.Errorf("s2 after delete: %v, want not found", err)
	}
	if got := backingOf(t, s3path); got != s1path {
		t.Errorf("s3 is backed by %q after the merge, want s1 %q", got, s1path)
	}
	if got := sha256File(t, s1path); got != s1sum {
		t.Error("s1's file changed: the merge must not write into a snapshot still needed")
	}
	if fi, err := os.Stat(s3path); err != nil || fi.Mode().Perm()&0o222 != 0 {
		t.Errorf("s3's file after the merge: %v %v, want read-only", fi.Mode(), err)
	}
	run(t, "qemu-img", "check", "-U", s3path)
	same("the volume after the merge", vwant, v0path)
	same("s3's file after the merge", s3want, s3path)

	// The snapshots left copy and revert as before.
	same("a volume from s1", s1want, fromSnapshot("from-s1", s1, "copy-from-primary-snapshot"))
	same("a volume from s3", s3want, fromSnapshot("from-s3", s3, "copy-from-primary-snapshot"))
	backup(s3)
	rv, err := a.snapshots.RevertSnapshot(ctx, connect.NewRequest(&stowagev1.RevertSnapshotRequest{Id: s3.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, rv.Msg.GetJob())
	same("the volume reverted to s3", s3want, v0path)

	// The newest snapshot with the volume on it merges into the volume.
	write("write -P 0xe5 48M 1M", "write -P 0xe6 0 1M")
	s4, s4path := take("s4")
	write("write -P 0xe7 0 1M")
	vwant = rawOf("v0-2", v0path)
	before = storeUsed(t, pzDir)
	del(s4)
	after = storeUsed(t, pzDir)
	t.Logf("store pz used: %d bytes before deleting s4 (the volume on it), %d after: %d freed (1 MiB only s4 read)", before, after, before-after)
	if before-after < 512<<10 || before-after > 1792<<10 {
		t.Errorf("deleting s4 freed %d bytes, want about 1 MiB", before-after)
	}
	if _, err := os.Stat(s4path); !os.IsNotExist(err) {
		t.Errorf("s4's file remains: %v", err)
	}
	if got := backingOf(t, v0path); got != s3path {
		t.Errorf("the volume is backed by %q after s4's merge, want s3 %q", got, s3path)
	}
	same("the volume after s4's merge", vwant, v0path)
	g, err := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: v0.GetId()}))
	if err != nil || g.Msg.GetVolume().GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
		t.Fatalf("volume after s4's merge: %v %v", g, err)
	}
	// Snapshots still stack on the merged chain.
	s5, _ := take("s5")
	same("a volume from s5", vwant, fromSnapshot("from-s5", s5, "copy-from-primary-snapshot"))

	// A merge resumed after a crash between the rebase and the records:
	// the child is already on the new backing (done here by hand), the
	// records still say s5; deleting s5 finishes the merge.
	s5path := backingOf(t, v0path)
	write("write -P 0xf1 8M 1M")
	s6, s6path := take("s6")
	write("write -P 0xf2 9M 1M")
	vwant = rawOf("v0-3", v0path)
	run(t, "qemu-img", "rebase", "-f", "qcow2", "-F", "qcow2", "-b", s3path, s6path)
	del(s5)
	if _, err := os.Stat(s5path); !os.IsNotExist(err) {
		t.Errorf("s5's file remains after the resumed merge: %v", err)
	}
	same("the volume after the resumed merge", vwant, v0path)
	if gs, err := a.snapshots.GetSnapshot(ctx, connect.NewRequest(&stowagev1.GetSnapshotRequest{Id: s6.GetId()})); err != nil || gs.Msg.GetSnapshot().GetParentId() != s3.GetId() {
		t.Errorf("s6 after s5's merge: %v %v, want parent s3", gs, err)
	}

	// Two files on one snapshot (s6 and, reverted, the volume): merging
	// would store its data twice, so it is hidden and keeps its file.
	rv, err = a.snapshots.RevertSnapshot(ctx, connect.NewRequest(&stowagev1.RevertSnapshotRequest{Id: s3.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, rv.Msg.GetJob())
	ds, err := a.snapshots.DeleteSnapshot(ctx, connect.NewRequest(&stowagev1.DeleteSnapshotRequest{Id: s3.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	if st := ds.Msg.GetPlan().GetStrategy(); st != "chain-aware-delete" {
		t.Errorf("delete s3 with two files on it: plan %q, want chain-aware-delete", st)
	}
	if hj := mustSucceed(t, a, ds.Msg.GetJob()); !strings.Contains(hj.GetResult(), "hidden") {
		t.Errorf("delete s3 with two files on it: %q, want hidden", hj.GetResult())
	}
	if _, err := os.Stat(s3path); err != nil {
		t.Errorf("hidden s3's file: %v", err)
	}
	same("the volume reverted to the hidden s3", s3want, v0path)

	// s3's backup, taken after the merge, restores byte-equal once the
	// volume and its files on primary are gone.
	dv, err := a.volumes.DeleteVolume(ctx, connect.NewRequest(&stowagev1.DeleteVolumeRequest{Id: v0.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, dv.Msg.GetJob())
	same("s3 restored from its backup", s3want, fromSnapshot("restored-s3", s3, "restore-from-backup"))
	same("s1 restored from its backup", s1want, fromSnapshot("restored-s1", s1, "restore-from-backup"))
	if !strings.Contains(j.GetResult(), "merged out of its chain: rebase snapshot "+s3.GetId()+" onto snapshot "+s1.GetId()) {
		t.Errorf("delete s2 result: %q", j.GetResult())
	}
}

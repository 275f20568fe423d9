//go:build ceph

package rbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ceph/go-ceph/rados"
	cephrbd "github.com/ceph/go-ceph/rbd"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// cephDir is the one-node cluster of deploy/ceph/bootstrap.sh the tests
// run against ("" when none could be started).
var cephDir string

func TestMain(m *testing.M) {
	code := func() int {
		if _, err := exec.LookPath("ceph-mon"); err != nil {
			if os.Getenv("CI") != "" {
				fmt.Fprintln(os.Stderr, "ceph-mon is required (scripts/test.sh installs it)")
				return 1
			}
			fmt.Fprintln(os.Stderr, "no Ceph packages: skipping the rbd tests (deploy/ceph/bootstrap.sh up --install)")
			return m.Run()
		}
		dir, err := os.MkdirTemp("", "stowage-rbd-test")
		if err != nil {
			panic(err)
		}
		defer os.RemoveAll(dir)
		script, _ := filepath.Abs("../../deploy/ceph/bootstrap.sh")
		defer exec.Command(script, "down", "--dir", dir).Run()
		if out, err := exec.Command(script, "up", "--dir", dir, "--size", "2G").CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "bootstrap: %v\n%s", err, out)
			return 1
		}
		if out, err := exec.Command(script, "user", "stowage-test", "stowage", "--dir", dir).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "user: %v\n%s", err, out)
			return 1
		}
		cephDir = dir
		return m.Run()
	}()
	os.Exit(code)
}

// monHost reads the monitors' addresses from the cluster's configuration.
func monHost(t *testing.T) string {
	t.Helper()
	if cephDir == "" {
		t.Skip("no Ceph cluster")
	}
	conf, err := os.ReadFile(filepath.Join(cephDir, "ceph.conf"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(conf), "\n") {
		if v, ok := strings.CutPrefix(l, "mon host = "); ok {
			// [v2:127.0.0.1:3300,v1:127.0.0.1:6789]: the v1 address, the
			// form qemu's rbd: filenames and librados both take.
			for _, a := range strings.Split(strings.Trim(v, "[]"), ",") {
				if addr, ok := strings.CutPrefix(a, "v1:"); ok {
					return addr
				}
			}
			return v
		}
	}
	t.Fatal("no mon host in ceph.conf")
	return ""
}

// spec is a store on pool stowage as client.stowage-test (a user limited
// to that pool), with keyring.
func spec(t *testing.T, id, keyring string) drivers.StoreSpec {
	return drivers.StoreSpec{ID: id, Name: "rbd-" + id, Role: drivers.RolePrimary,
		URL:     "rbd://stowage?mon_host=" + monHost(t) + "&id=stowage-test",
		Details: map[string]string{"keyring": keyring}, Scope: drivers.Scope{Zone: "z1"}}
}

func userKeyring() string { return filepath.Join(cephDir, "keyring.client.stowage-test") }

// admin opens the pool as client.admin, to look from outside the driver.
func admin(t *testing.T) *rados.IOContext {
	t.Helper()
	conn, err := rados.NewConnWithUser("admin")
	if err != nil {
		t.Fatal(err)
	}
	if err := conn.ReadConfigFile(filepath.Join(cephDir, "ceph.conf")); err != nil {
		t.Fatal(err)
	}
	if err := conn.Connect(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(conn.Shutdown)
	io, err := conn.OpenIOContext("stowage")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(io.Destroy)
	return io
}

func marker(t *testing.T, io *rados.IOContext) string {
	t.Helper()
	owner, err := readMarker(io)
	if errdefs.IsNotFound(err) {
		return ""
	}
	if err != nil {
		t.Fatal(err)
	}
	return owner
}

// writeAt writes p at off of image name, as an import would.
func writeAt(t *testing.T, io *rados.IOContext, name string, p []byte, off int64) {
	t.Helper()
	img, err := cephrbd.OpenImage(io, name, cephrbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := img.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
}

func readAt(t *testing.T, io *rados.IOContext, name string, n int, off int64) []byte {
	t.Helper()
	img, err := cephrbd.OpenImageReadOnly(io, name, cephrbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	buf := make([]byte, n)
	if _, err := img.ReadAt(buf, off); err != nil {
		t.Fatal(err)
	}
	return buf
}

// A wrong key is a clear authentication error and claims nothing; bad
// URLs are refused before any call; one pool is one store.
func TestLifeCycle(t *testing.T) {
	ctx := context.Background()
	p := New(nil)
	io := admin(t)
	bad := filepath.Join(t.TempDir(), "wrong.keyring")
	if err := os.WriteFile(bad, []byte("[client.stowage-test]\n\tkey = AQDKcFNnAAAAABAAS2V5S2V5S2V5S2V5S2V5S2V5Sw==\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := p.LifeCycle().Initialize(ctx, spec(t, "s-bad", bad))
	if !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("wrong key: %v, want unauthenticated", err)
	}
	if strings.Contains(err.Error(), "AQDKcFNn") {
		t.Errorf("the error shows the key: %v", err)
	}
	if owner := marker(t, io); owner != "" {
		t.Fatalf("a refused store claimed the pool for %q", owner)
	}
	for _, url := range []string{"rbd://", "rbd://stowage", "rbd://stowage?mon_host=127.0.0.1:3300", "rbd://st owage?mon_host=a&id=u", "file:///x"} {
		s := spec(t, "s-url", userKeyring())
		s.URL = url
		if _, err := p.LifeCycle().Initialize(ctx, s); !errdefs.IsInvalid(err) {
			t.Errorf("url %q: %v, want invalid", url, err)
		}
	}
	s := spec(t, "s1", userKeyring())
	info, err := p.LifeCycle().Initialize(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	if info.CapacityBytes <= 0 || info.AvailableBytes <= 0 || info.AvailableBytes > info.CapacityBytes || info.Details["keyring"] != userKeyring() {
		t.Errorf("store info %+v", info)
	}
	if owner := marker(t, io); owner != "s1" {
		t.Errorf("pool owner %q, want s1", owner)
	}
	if _, err := p.LifeCycle().Initialize(ctx, s); err != nil {
		t.Errorf("Initialize again: %v", err)
	}
	if _, err := p.LifeCycle().Initialize(ctx, spec(t, "s2", userKeyring())); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "belongs to store s1") {
		t.Errorf("a second store on the pool: %v", err)
	}
	vol := drivers.DataObject{ID: "v-lc", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw, Size: 1 << 20}
	if _, err := p.Driver().Create(ctx, vol); err != nil {
		t.Fatal(err)
	}
	if err := p.LifeCycle().Delete(ctx, info); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Delete with an image left: %v", err)
	}
	if err := p.Driver().Delete(ctx, vol); err != nil {
		t.Fatal(err)
	}
	if err := p.LifeCycle().Delete(ctx, info); err != nil {
		t.Fatal(err)
	}
	if owner := marker(t, io); owner != "" {
		t.Errorf("Delete left the pool claimed by %q", owner)
	}
}

// Volumes, snapshots, clones and grants on a real pool.
func TestObjects(t *testing.T) {
	ctx := context.Background()
	p := New(nil)
	d := p.Driver().(*Driver)
	io := admin(t)
	info, err := p.LifeCycle().Initialize(ctx, spec(t, "s3", userKeyring()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.LifeCycle().Delete(context.Background(), info) })
	const odd = 5<<20 + 3*512
	vol := drivers.DataObject{ID: "v1", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw, Size: odd}
	t.Cleanup(func() { _ = d.Delete(context.Background(), vol) })

	// Create: the exact size, thin, again a no-op; qcow2 refused.
	got, err := d.Create(ctx, vol)
	if err != nil || got.Size != odd || got.PhysicalSize != 0 || got.Key != "volume-v1" {
		t.Fatalf("create: %+v %v", got, err)
	}
	if _, err := d.Create(ctx, vol); err != nil {
		t.Errorf("create again: %v", err)
	}
	q := vol
	q.ID, q.Format = "v-q", drivers.FormatQCOW2
	if _, err := d.Create(ctx, q); !errdefs.IsInvalid(err) {
		t.Errorf("qcow2: %v", err)
	}

	// Snapshot, write, revert: the volume reads what the snapshot held.
	a, b := bytes.Repeat([]byte{0xaa}, 1<<20), bytes.Repeat([]byte{0xbb}, 1<<20)
	writeAt(t, io, "volume-v1", a, 1<<20)
	snap := drivers.SnapshotObject{DataObject: drivers.DataObject{ID: "sn1", Type: drivers.ObjectSnapshot, Store: info}, Volume: vol}
	si, err := d.TakeSnapshot(ctx, snap)
	if err != nil || si.Key != "snap-sn1" {
		t.Fatalf("snapshot: %+v %v", si, err)
	}
	writeAt(t, io, "volume-v1", b, 1<<20)
	if err := d.RevertSnapshot(ctx, snap); err != nil {
		t.Fatal(err)
	}
	if got := readAt(t, io, "volume-v1", 1<<20, 1<<20); !bytes.Equal(got, a) {
		t.Errorf("after revert the volume reads %x..., want the snapshot's %x...", got[:4], a[:4])
	}
	if st, err := d.Stat(ctx, vol); err != nil || st.PhysicalSize < 1<<20 || st.PhysicalSize > 4<<20 {
		t.Errorf("stat: %+v %v (want 1 MiB written, at most one 4 MiB object allocated)", st, err)
	}

	// A second snapshot after 64 KiB written at 3 MiB: the diff between
	// the two is that write's 4 MiB object only (librbd diffs whole
	// objects without the fast-diff feature), found from the snapshot
	// alone (the snapshot index), and Stat and Delete find it too.
	writeAt(t, io, "volume-v1", bytes.Repeat([]byte{0xcc}, 64<<10), 3<<20)
	snap2 := drivers.SnapshotObject{DataObject: drivers.DataObject{ID: "sn2", Type: drivers.ObjectSnapshot, Store: info}, Volume: vol}
	if _, err := d.TakeSnapshot(ctx, snap2); err != nil {
		t.Fatal(err)
	}
	changed, err := d.Changed(ctx, snap2, snap)
	if err != nil || len(changed) != 1 || changed[0].Offset > 3<<20 || changed[0].Offset+changed[0].Length < 3<<20+64<<10 || changed[0].Length > 4<<20 {
		t.Errorf("changed between sn1 and sn2: %+v %v, want the range holding [3 MiB, 3 MiB + 64 KiB) within one 4 MiB object", changed, err)
	}
	if st, err := d.Stat(ctx, snap2.DataObject); err != nil || st.Key != "snap-sn2" || st.Size != vol.Size {
		t.Errorf("stat of a snapshot: %+v %v", st, err)
	}
	if err := d.Delete(ctx, snap2.DataObject); err != nil {
		t.Fatalf("delete snapshot sn2: %v", err)
	}
	if _, err := d.Stat(ctx, snap2.DataObject); !errdefs.IsNotFound(err) {
		t.Errorf("stat of a deleted snapshot: %v", err)
	}
	if _, err := d.Changed(ctx, snap2, snap); !errdefs.IsNotFound(err) {
		t.Errorf("changed since a deleted snapshot: %v", err)
	}
	if err := d.Delete(ctx, snap2.DataObject); err != nil {
		t.Errorf("delete a deleted snapshot: %v", err)
	}

	// A volume made from snapshot sn1 by the driver's native copy is an
	// RBD clone of it (protected first), no byte copied, grown to the size
	// asked for; only a snapshot of this store copies natively. Deleting
	// sn1 then flattens that clone first, as it must: the clone keeps the
	// data it read through the snapshot and has no parent after.
	hang := drivers.DataObject{ID: "hang", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw, Size: 12 << 20}
	other := info
	other.ID = "elsewhere"
	for _, c := range []struct {
		name     string
		src, dst drivers.DataObject
		want     bool
	}{
		{"snapshot to volume", snap.DataObject, hang, true},
		{"volume to volume", vol, hang, false},
		{"snapshot to a volume of another store", snap.DataObject, drivers.DataObject{ID: "x", Type: drivers.ObjectVolume, Store: other, Format: drivers.FormatRaw}, false},
		{"snapshot to qcow2", snap.DataObject, drivers.DataObject{ID: "x", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatQCOW2}, false},
	} {
		if got := d.CanCopy(c.src, c.dst); got != c.want {
			t.Errorf("CanCopy %s = %v, want %v", c.name, got, c.want)
		}
	}
	if _, err := d.Copy(ctx, vol, hang, nil); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Errorf("Copy of a volume: %v, want ErrNotImplemented", err)
	}
	hi, err := d.Copy(ctx, snap.DataObject, hang, nil)
	if err != nil || hi.Method != "rbd-clone" || hi.Key != "volume-hang" || hi.Size != 12<<20 || hi.PhysicalSize != 0 {
		t.Fatalf("copy of snapshot sn1: %+v %v; want an rbd clone of 12 MiB with no byte of its own", hi, err)
	}
	if _, err := d.Copy(ctx, snap.DataObject, hang, nil); err != nil {
		t.Errorf("the same copy again: %v", err)
	}
	himg, err := cephrbd.OpenImageReadOnly(io, "volume-hang", cephrbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	if p, err := himg.GetParent(); err != nil || p.Image.ImageName != "volume-v1" || p.Snap.SnapName != "snap-sn1" {
		t.Errorf("the copy's parent: %+v %v, want volume-v1@snap-sn1", p, err)
	}
	himg.Close()
	if got := readAt(t, io, "volume-hang", 1<<20, 1<<20); !bytes.Equal(got, a) {
		t.Errorf("the copy reads %x..., want the snapshot's %x...", got[:4], a[:4])
	}
	if err := d.Delete(ctx, snap.DataObject); err != nil {
		t.Fatalf("delete a snapshot with a clone: %v", err)
	}
	himg, err = cephrbd.OpenImageReadOnly(io, "volume-hang", cephrbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	if p, err := himg.GetParent(); err == nil {
		t.Errorf("the clone of a deleted snapshot still has parent %+v", p)
	}
	himg.Close()
	if got := readAt(t, io, "volume-hang", 1<<20, 1<<20); !bytes.Equal(got, a) {
		t.Errorf("the flattened clone reads %x..., want the snapshot's %x...", got[:4], a[:4])
	}
	if has, err := hasSnapshot(io, "volume-v1", "snap-sn1"); err != nil || has {
		t.Errorf("snapshot sn1 after its delete: %v %v", has, err)
	}
	if err := d.Delete(ctx, hang); err != nil {
		t.Fatal(err)
	}

	// Resize grows, never shrinks.
	if st, err := d.Resize(ctx, vol, 8<<20); err != nil || st.Size != 8<<20 {
		t.Errorf("grow: %+v %v", st, err)
	}
	if _, err := d.Resize(ctx, vol, 1<<20); !errdefs.IsInvalid(err) {
		t.Errorf("shrink: %v", err)
	}

	// A template in the pool; two volumes cloned from it: no byte copied,
	// each names the template's base snapshot as parent, each reads the
	// template's data.
	tmpl := drivers.DataObject{ID: "t1", Type: drivers.ObjectTemplate, Store: info, Format: drivers.FormatRaw, Size: 16 << 20}
	if _, err := d.Create(ctx, tmpl); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("template"), 512<<10) // 4 MiB
	writeAt(t, io, "template-t1", data, 0)
	for _, id := range []string{"c1", "c2"} {
		dst := drivers.DataObject{ID: id, Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw, Size: 32 << 20}
		ci, err := d.Clone(ctx, drivers.CloneSpec{Base: tmpl, Dst: dst, Mode: drivers.CloneLinked}, nil)
		if err != nil {
			t.Fatalf("clone %s: %v", id, err)
		}
		t.Cleanup(func() { _ = d.Delete(context.Background(), dst) })
		if ci.Method != "rbd-clone" || ci.PhysicalSize != 0 || ci.Size != 32<<20 {
			t.Errorf("clone %s: %+v; want rbd-clone, no byte of its own, grown to 32 MiB", id, ci)
		}
		img, err := cephrbd.OpenImageReadOnly(io, "volume-"+id, cephrbd.NoSnapshot)
		if err != nil {
			t.Fatal(err)
		}
		parent, err := img.GetParent()
		img.Close()
		if err != nil || parent.Image.ImageName != "template-t1" || parent.Snap.SnapName != baseSnapshot {
			t.Errorf("clone %s parent: %+v %v", id, parent, err)
		}
		if got := readAt(t, io, "volume-"+id, len(data), 0); !bytes.Equal(got, data) {
			t.Errorf("clone %s does not read the template's data", id)
		}
	}
	// A full clone is flattened: its own bytes, no parent.
	full := drivers.DataObject{ID: "f1", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw, Size: 16 << 20}
	fi, err := d.Clone(ctx, drivers.CloneSpec{Base: tmpl, Dst: full, Mode: drivers.CloneFull}, nil)
	if err != nil || fi.Method != "rbd-clone-flatten" || fi.PhysicalSize < int64(len(data)) {
		t.Errorf("full clone: %+v %v", fi, err)
	}
	t.Cleanup(func() { _ = d.Delete(context.Background(), full) })

	// The template cannot go while clones hang from it.
	if err := d.Delete(ctx, tmpl); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("delete a template with clones: %v", err)
	}
	objs, err := d.ListObjects(ctx, info)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, o := range objs {
		keys = append(keys, o.Key)
	}
	if strings.Join(keys, ",") != "template-t1,volume-c1,volume-c2,volume-f1,volume-v1" && len(keys) != 5 {
		t.Errorf("objects: %v", keys)
	}

	// Attach: an rbd: URI qemu opens (with the user's keyring, as a host
	// keeps it in /etc/ceph).
	acc, err := d.GrantAccess(ctx, vol, drivers.Client{HostID: "h1", Purpose: drivers.PurposeAttach})
	if err != nil || !strings.HasPrefix(string(acc.URI), "rbd:stowage/volume-v1:id=stowage-test:mon_host=") {
		t.Fatalf("grant: %+v %v", acc, err)
	}
	if _, err := exec.LookPath("qemu-img"); err == nil {
		out, err := exec.Command("qemu-img", "info", "--output=json", string(acc.URI)+":keyring="+userKeyring()).CombinedOutput()
		if err != nil || !strings.Contains(string(out), `"virtual-size": 8388608`) {
			t.Errorf("qemu-img info %s: %v\n%s", acc.URI, err, out)
		}
	}
	if _, err := d.GrantAccess(ctx, vol, drivers.Client{HostID: "h1", Purpose: drivers.PurposeRead}); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("read grant without agents: %v", err)
	}
	// Deleting the volume removes its snapshots too; again is a no-op.
	if err := d.Delete(ctx, vol); err != nil {
		t.Fatal(err)
	}
	if err := d.Delete(ctx, vol); err != nil {
		t.Errorf("delete again: %v", err)
	}
}

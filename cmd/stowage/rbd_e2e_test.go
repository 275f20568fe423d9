//go:build ceph && pacific

package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The stowage binary of this test run gets the rbd provider.
func init() { buildTags = append(buildTags, "ceph", "pacific") }

// TestRBDStoreEndToEnd: a Ceph pool of the one-node cluster
// (deploy/ceph/bootstrap.sh) as a primary store of a real controller,
// through the CLI. A wrong key is refused as unauthenticated and adds
// nothing; with the right one the store is Up with the pool's capacity; a
// blank volume is an RBD image; its grant is an rbd: URI qemu writes
// through; a snapshot, a write and a revert bring the first data back; a
// qcow2 template becomes two RBD clones; backups, restores and migrations
// move bytes in and out of the pool (rbdBackupsAndMigration); deleting the
// volume removes the image and its snapshot.
func TestRBDStoreEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Ceph cluster and processes")
	}
	needTools(t, "ceph-mon", "rbd", "qemu-io")
	dir := filepath.Join(t.TempDir(), "ceph")
	script, err := filepath.Abs("../../deploy/ceph/bootstrap.sh")
	if err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "ceph.conf")
	sh := func(name string, args ...string) string {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Env = append(os.Environ(), "CEPH_CONF="+conf)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	t.Cleanup(func() { _ = exec.Command(script, "down", "--dir", dir).Run() })
	sh(script, "up", "--dir", dir, "--size", "2G")
	keyring := strings.TrimSpace(sh(script, "user", "stowage-e2e", "stowage", "--dir", dir))
	var mon string
	for _, l := range strings.Split(sh("cat", conf), "\n") {
		if v, ok := strings.CutPrefix(l, "mon host = "); ok {
			for _, a := range strings.Split(strings.Trim(v, "[]"), ",") {
				if addr, ok := strings.CutPrefix(a, "v1:"); ok {
					mon = addr
				}
			}
		}
	}
	if mon == "" {
		t.Fatal("no v1 monitor address in ceph.conf")
	}
	url := "rbd://stowage?mon_host=" + mon + "&id=stowage-e2e"

	// h1's NBD listener keeps its port across the restart below.
	h1NBD := freePort(t)
	hostRoot, server, _ := oneHost(t, nil, []string{"--nbd-listen", h1NBD})
	bad := filepath.Join(t.TempDir(), "wrong.keyring")
	if err := os.WriteFile(bad, []byte("[client.stowage-e2e]\n\tkey = AQDKcFNnAAAAABAAS2V5S2V5S2V5S2V5S2V5S2V5Sw==\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, errOut, code := cli(t, server, "store", "add", "--name", "ceph1", "--role", "primary", "--provider", "rbd", "--url", url,
		"--scope", "z1", "--details", "keyring="+bad); code != 8 || !strings.Contains(errOut, "unauthenticated") || strings.Contains(errOut, "AQDKcFNn") {
		t.Fatalf("store add with a wrong key: exit %d: %s", code, errOut)
	}
	if n := len(listStores(t, server)); n != 0 {
		t.Fatalf("a refused add left %d stores", n)
	}
	var st struct {
		ID            string `json:"id"`
		State         string `json:"state"`
		CapacityBytes string `json:"capacityBytes"`
	}
	cliJSON(t, server, &st, "store", "add", "--name", "ceph1", "--role", "primary", "--provider", "rbd", "--url", url,
		"--scope", "z1", "--details", "keyring="+keyring)
	if st.State != "STORE_STATE_UP" || st.CapacityBytes == "" || st.CapacityBytes == "0" {
		t.Fatalf("rbd store: %+v", st)
	}

	if _, errOut, code := cli(t, server, "volume", "create", "--name", "r1", "--size", "64M", "--store", "ceph1", "--wait"); code != 0 {
		t.Fatalf("volume create: exit %d %s", code, errOut)
	}
	var got struct {
		Volume struct {
			ID          string `json:"id"`
			State       string `json:"state"`
			InstallPath string `json:"installPath"`
			Format      string `json:"format"`
		} `json:"volume"`
	}
	cliJSON(t, server, &got, "volume", "get", "r1")
	vol := got.Volume
	if vol.State != "VOLUME_STATE_READY" || vol.InstallPath != "volume-"+vol.ID || vol.Format != "IMAGE_FORMAT_RAW" {
		t.Fatalf("volume on rbd: %+v", vol)
	}
	if info := sh("rbd", "info", "stowage/"+vol.InstallPath); !strings.Contains(info, "size 64 MiB") {
		t.Errorf("rbd info:\n%s", info)
	}
	out, errOut, code := cli(t, server, "volume", "access", vol.ID, "--host", "h1")
	uri := strings.TrimSpace(out)
	if code != 0 {
		t.Fatalf("volume access: exit %d %s", code, errOut)
	}
	if !strings.HasPrefix(uri, "rbd:stowage/"+vol.InstallPath+":id=stowage-e2e:mon_host=") {
		t.Fatalf("attach grant: %q", uri)
	}
	// The host keeps the user's keyring (as in /etc/ceph); qemu opens the grant.
	drive := uri + ":keyring=" + keyring
	sh("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", drive)
	if _, errOut, code := cli(t, server, "volume", "access", vol.ID, "--host", "h1", "--revoke"); code != 0 {
		t.Fatalf("revoke: %s", errOut)
	}
	if _, errOut, code := cli(t, server, "snapshot", "take", vol.ID, "--name", "s1", "--wait"); code != 0 {
		t.Fatalf("snapshot take: exit %d %s", code, errOut)
	}
	var snaps struct {
		Snapshots []struct {
			ID string `json:"id"`
		} `json:"snapshots"`
	}
	cliJSON(t, server, &snaps, "snapshot", "list", "--volume", vol.ID)
	if len(snaps.Snapshots) != 1 {
		t.Fatalf("snapshots of the volume: %+v", snaps)
	}
	snap := snaps.Snapshots[0]
	if ls := sh("rbd", "snap", "ls", "stowage/"+vol.InstallPath); !strings.Contains(ls, "snap-"+snap.ID) {
		t.Fatalf("rbd snap ls (snapshot %q):\n%s", snap.ID, ls)
	}
	sh("qemu-io", "-f", "raw", "-c", "write -P 0xa5 0 1M", drive)
	if _, errOut, code := cli(t, server, "snapshot", "revert", snap.ID, "--wait"); code != 0 {
		t.Fatalf("snapshot revert: exit %d %s", code, errOut)
	}
	if got := sh("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 1M", drive); strings.Contains(got, "Pattern verification failed") {
		t.Errorf("after the revert the volume does not read the snapshot's data:\n%s", got)
	}
	// A host without librbd (h2 serves no NBD, so it reports no
	// rbd_export) is granted an NBD export of the volume that h1 serves
	// through its qemu-storage-daemon's rbd driver: qemu on h2 opens it.
	agentProc(t, server, "h2", "z1", "c1", filepath.Join(hostRoot, "a2"), "--nbd-listen", "")
	waitFor(t, "h2 Up", 20*time.Second, func() bool { return hostState(t, server, "h2") == "HOST_STATE_UP" })
	out, errOut, code = cli(t, server, "volume", "access", vol.ID, "--host", "h2")
	if nbdURI := strings.TrimSpace(out); code != 0 || !strings.HasPrefix(nbdURI, "nbd://") {
		t.Errorf("attach grant for a host without librbd: exit %d %q %s, want an nbd:// export", code, nbdURI, errOut)
	} else {
		if got := sh("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 1M", "-c", "write -P 0x6b 2M 64k", nbdURI); strings.Contains(got, "Pattern verification failed") {
			t.Errorf("the volume read over the nbd export:\n%s", got)
		}
		if got := sh("qemu-io", "-f", "raw", "-c", "read -P 0x6b 2M 64k", drive); strings.Contains(got, "Pattern verification failed") {
			t.Errorf("a write through the nbd export is not in the image:\n%s", got)
		}
		// h1 is killed and restarts: the export h2 holds comes back with
		// it (its qemu-storage-daemon, which outlived the agent, adopted;
		// the key kept beside it), at the same URI.
		killAgent(t, "h1")
		p := agentProc(t, server, "h1", "z1", "c1", filepath.Join(hostRoot, "a1"), "--nbd-listen", h1NBD)
		agentProcs.Store("h1", p)
		waitFor(t, "h1 serving NBD again", 30*time.Second, func() bool { return strings.Contains(p.log.String(), "NBD server listening") })
		if got := sh("qemu-io", "-f", "raw", "-c", "read -P 0x6b 2M 64k", nbdURI); strings.Contains(got, "Pattern verification failed") {
			t.Errorf("the nbd export after h1's restart:\n%s", got)
		}
		if !strings.Contains(p.log.String(), "adopted") {
			t.Logf("h1's restart did not adopt the export's daemon (a new one serves it):\n%s", grepLines(p.log.String(), "nbd exports"))
		}
		if _, errOut, code := cli(t, server, "volume", "access", vol.ID, "--host", "h2", "--revoke"); code != 0 {
			t.Fatalf("revoke h2's grant: %s", errOut)
		}
		if _, err := exec.Command("qemu-io", "-f", "raw", "-c", "read 0 4k", nbdURI).CombinedOutput(); err == nil {
			t.Errorf("the nbd export still answers after its revoke")
		}
	}

	// A template: imported into the pool once (another store's host makes
	// a raw staging copy and exports it; the controller writes it through
	// librbd, zero blocks skipped), then each volume from it is an RBD
	// clone of it: no byte of its own, its parent named, the template's
	// content read back through rbd: by qemu-img compare.
	raw := filepath.Join(t.TempDir(), "t.raw")
	sh("qemu-img", "create", "-q", "-f", "raw", raw, "32M")
	sh("qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 3M", "-c", "write -P 0x7e 20M 1M", raw)
	qcow := filepath.Join(filepath.Dir(raw), "t.qcow2") // the template is qcow2; the pool holds raw
	sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
	webDir := filepath.Dir(raw)
	web := httptest.NewServer(http.FileServer(http.Dir(webDir)))
	defer web.Close()
	if _, errOut, code := cli(t, server, "store", "add", "--name", "img", "--role", "image", "--url", "file://"+filepath.Join(hostRoot, "img"), "--scope", "z1"); code != 0 {
		t.Fatalf("image store: %s", errOut)
	}
	if _, errOut, code := cli(t, server, "template", "register", "--name", "t", "--format", "qcow2", "--url", web.URL+"/t.qcow2",
		"--checksum", "sha256:"+sha256File(t, qcow), "--wait"); code != 0 {
		t.Fatalf("template register: exit %d %s", code, errOut)
	}
	var clones []string
	for _, name := range []string{"c1", "c2"} {
		if _, errOut, code := cli(t, server, "volume", "create", "--name", name, "--template", "t", "--store", "ceph1", "--wait"); code != 0 {
			t.Fatalf("volume %s from the template: exit %d %s", name, code, errOut)
		}
		var g struct {
			Volume struct {
				InstallPath   string `json:"installPath"`
				InstallMethod string `json:"installMethod"`
			} `json:"volume"`
		}
		cliJSON(t, server, &g, "volume", "get", name)
		img := "stowage/" + g.Volume.InstallPath
		clones = append(clones, img)
		if info := sh("rbd", "info", img); !strings.Contains(info, "parent: stowage/template-") || !strings.Contains(info, "@stowage-base") {
			t.Errorf("volume %s (%s, method %s) is not a clone of the template image:\n%s", name, img, g.Volume.InstallMethod, info)
		}
		// rbd du counts an image's own objects (not its parent's).
		if du := sh("rbd", "du", img); !strings.HasSuffix(strings.TrimSpace(du), " 0 B") {
			t.Errorf("volume %s has bytes of its own right after its clone (none were to be copied):\n%s", name, du)
		}
		if out := sh("qemu-img", "compare", "-f", "raw", "-F", "raw", raw, "rbd:"+img+":id=stowage-e2e:keyring="+keyring); !strings.Contains(out, "Images are identical") {
			t.Errorf("volume %s differs from the template:\n%s", name, out)
		}
	}
	var tmplImages []string
	for _, l := range strings.Split(sh("rbd", "ls", "stowage"), "\n") {
		if strings.HasPrefix(l, "template-") {
			tmplImages = append(tmplImages, l)
		}
	}
	if len(tmplImages) != 1 {
		t.Errorf("template images in the pool: %v, want one", tmplImages)
	} else if d := sh("rbd", "diff", "stowage/"+tmplImages[0]); strings.Count(d, "data") == 0 || strings.Contains(d, "12582912") {
		t.Errorf("the template image is not thin (4 MiB objects, 4 MiB of data written):\n%s", d)
	}
	t.Logf("two volumes cloned from one imported template: %v", clones)

	rbdBackupsAndMigration(t, server, hostRoot, keyring, sh)

	if _, errOut, code := cli(t, server, "volume", "delete", vol.ID, "--wait"); code != 0 {
		t.Fatalf("volume delete: exit %d %s", code, errOut)
	}
	if images := sh("rbd", "ls", "stowage"); strings.Contains(images, vol.InstallPath) {
		t.Errorf("the image is left after the delete:\n%s", images)
	}
}

// rbdVolume is what the tests read of a volume.
type rbdVolume struct {
	ID            string `json:"id"`
	StoreID       string `json:"storeId"`
	State         string `json:"state"`
	InstallPath   string `json:"installPath"`
	InstallMethod string `json:"installMethod"`
	Format        string `json:"format"`
}

func getVolume(t *testing.T, server, name string) rbdVolume {
	t.Helper()
	var g struct {
		Volume rbdVolume `json:"volume"`
	}
	cliJSON(t, server, &g, "volume", "get", name)
	return g.Volume
}

// rbdBackupsAndMigration: on rbd store ceph1 (pool stowage, user
// stowage-e2e) and image store img of a running controller and agent h1,
// with a new directory store dir1:
//   - two backups of a volume: the first reads the volume's data, the
//     second (64 KiB written since) reads only the 4 MiB chunk rbd diff
//     names; a volume copied onto dir1 from the primary snapshot, and ones
//     restored from the backup onto dir1 and back into the pool after the
//     RBD volume and its snapshots are gone, are byte-equal to the snapshot;
//   - a volume migrates dir1 -> ceph1 -> dir1, byte-equal at each step, its
//     source removed each time. The agent serves the RBD images over NBD
//     through qemu-storage-daemon's rbd driver (h1 has librbd; a host
//     without it would read the same export over the network).
func rbdBackupsAndMigration(t *testing.T, server, hostRoot, keyring string, sh func(string, ...string) string) {
	t.Helper()
	if _, errOut, code := cli(t, server, "store", "add", "--name", "dir1", "--role", "primary", "--url", "file://"+filepath.Join(hostRoot, "dir1"), "--scope", "z1"); code != 0 {
		t.Fatalf("directory store: %s", errOut)
	}
	rbdDrive := func(image string) string { return "rbd:stowage/" + image + ":id=stowage-e2e:keyring=" + keyring }
	dirFile := func(v rbdVolume) string { return filepath.Join(hostRoot, "dir1", v.InstallPath) }

	if _, errOut, code := cli(t, server, "volume", "create", "--name", "b1", "--size", "64M", "--store", "ceph1", "--wait"); code != 0 {
		t.Fatalf("volume b1: exit %d %s", code, errOut)
	}
	b1 := getVolume(t, server, "b1")
	sh("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 16M", rbdDrive(b1.InstallPath))
	type ref struct {
		Role      string `json:"role"`
		State     string `json:"state"`
		ReadBytes string `json:"readBytes"`
		NewBytes  string `json:"newBytes"`
	}
	backup := func(name string) (id string, read, stored int64) {
		t.Helper()
		if _, errOut, code := cli(t, server, "snapshot", "take", b1.ID, "--name", name, "--wait"); code != 0 {
			t.Fatalf("snapshot %s: exit %d %s", name, code, errOut)
		}
		var list struct {
			Snapshots []struct {
				ID   string `json:"id"`
				Name string `json:"name"`
			} `json:"snapshots"`
		}
		cliJSON(t, server, &list, "snapshot", "list", "--volume", b1.ID)
		for _, s := range list.Snapshots {
			if s.Name == name {
				id = s.ID
			}
		}
		if _, errOut, code := cli(t, server, "snapshot", "backup", id, "--store", "img", "--wait"); code != 0 {
			t.Fatalf("backup of %s: exit %d %s", name, code, errOut)
		}
		var got struct {
			Stores []ref `json:"stores"`
		}
		cliJSON(t, server, &got, "snapshot", "get", id)
		for _, r := range got.Stores {
			if r.Role == "STORE_ROLE_IMAGE" && r.State == "OBJECT_STATE_READY" {
				fmt.Sscan(r.ReadBytes, &read)
				fmt.Sscan(r.NewBytes, &stored)
				return id, read, stored
			}
		}
		t.Fatalf("snapshot %s has no Ready backup: %+v", name, got)
		return
	}
	s1, read1, new1 := backup("bs1")
	sh("qemu-io", "-f", "raw", "-c", "write -P 0x22 40M 64k", rbdDrive(b1.InstallPath))
	s2, read2, new2 := backup("bs2")
	t.Logf("backups of a 64 MiB RBD volume: full read %d bytes (stored %d), incremental read %d bytes (stored %d)", read1, new1, read2, new2)
	if read1 < 16<<20 || read1 > 20<<20 {
		t.Errorf("the full backup read %d bytes, want the volume's 16 MiB of data (its holes not read)", read1)
	}
	if read2 <= 0 || read2 > 4<<20 {
		t.Errorf("the incremental backup read %d bytes, want one 4 MiB chunk at most (the 64 KiB changed since the first)", read2)
	}

	// From the primary snapshot (an NBD export of the RBD snapshot) onto dir1.
	if _, errOut, code := cli(t, server, "volume", "create", "--name", "fromsnap", "--snapshot", s2, "--store", "dir1", "--format", "raw", "--wait"); code != 0 {
		t.Fatalf("volume from the primary snapshot: exit %d %s", code, errOut)
	}
	fromSnap := getVolume(t, server, "fromsnap")
	snapDrive := rbdDrive(b1.InstallPath + "@snap-" + s2)
	if out := sh("qemu-img", "compare", "-f", "raw", "-F", "raw", dirFile(fromSnap), snapDrive); !strings.Contains(out, "Images are identical") {
		t.Errorf("the volume copied from snapshot bs2 differs from it:\n%s", out)
	}
	// From the primary snapshot onto its own store: the rbd driver copies
	// it natively, an RBD clone of the snapshot (no byte copied).
	if _, errOut, code := cli(t, server, "volume", "create", "--name", "snapclone", "--snapshot", s2, "--store", "ceph1", "--wait"); code != 0 {
		t.Fatalf("volume from the primary snapshot on its own store: exit %d %s", code, errOut)
	}
	snapClone := getVolume(t, server, "snapclone")
	if snapClone.InstallMethod != "native" {
		t.Errorf("volume from a snapshot on its own rbd store: method %q, want native (the driver's clone)", snapClone.InstallMethod)
	}
	if info := sh("rbd", "info", "stowage/"+snapClone.InstallPath); !strings.Contains(info, "parent: stowage/"+b1.InstallPath+"@snap-"+s2) {
		t.Errorf("the volume from snapshot bs2 is not an RBD clone of it:\n%s", info)
	}
	if du := sh("rbd", "du", "stowage/"+snapClone.InstallPath); !strings.HasSuffix(strings.TrimSpace(du), " 0 B") {
		t.Errorf("the clone of snapshot bs2 has bytes of its own (none were to be copied):\n%s", du)
	}
	if out := sh("qemu-img", "compare", "-f", "raw", "-F", "raw", dirFile(fromSnap), rbdDrive(snapClone.InstallPath)); !strings.Contains(out, "Images are identical") {
		t.Errorf("the clone of snapshot bs2 differs from it:\n%s", out)
	}
	// Once the RBD volume and its snapshots are gone, from the backup.
	if _, errOut, code := cli(t, server, "volume", "delete", b1.ID, "--wait"); code != 0 {
		t.Fatalf("delete b1: exit %d %s", code, errOut)
	}
	// The clone hung from one of them: it was flattened first, and reads
	// as before, with no parent.
	if info := sh("rbd", "info", "stowage/"+snapClone.InstallPath); strings.Contains(info, "parent:") {
		t.Errorf("the clone of a deleted snapshot still has a parent:\n%s", info)
	}
	if out := sh("qemu-img", "compare", "-f", "raw", "-F", "raw", dirFile(fromSnap), rbdDrive(snapClone.InstallPath)); !strings.Contains(out, "Images are identical") {
		t.Errorf("the clone of snapshot bs2, flattened when b1 went, differs from the snapshot:\n%s", out)
	}
	if images := sh("rbd", "ls", "stowage"); strings.Contains(images, b1.InstallPath) {
		t.Errorf("b1's image is left after its delete:\n%s", images)
	}
	if _, errOut, code := cli(t, server, "volume", "create", "--name", "restored", "--snapshot", s2, "--store", "dir1", "--format", "raw", "--wait"); code != 0 {
		t.Fatalf("restore from the backup: exit %d %s", code, errOut)
	}
	restored := getVolume(t, server, "restored")
	if restored.InstallMethod != "restore" {
		t.Errorf("volume restored: method %q, want restore (from the backup)", restored.InstallMethod)
	}
	if out := sh("qemu-img", "compare", "-f", "raw", "-F", "raw", dirFile(fromSnap), dirFile(restored)); !strings.Contains(out, "Images are identical") {
		t.Errorf("the volume restored from the incremental backup differs from the snapshot:\n%s", out)
	}
	// And from the backup into the pool: an NBD export of a new image,
	// written in place.
	if _, errOut, code := cli(t, server, "volume", "create", "--name", "restored-rbd", "--snapshot", s2, "--store", "ceph1", "--wait"); code != 0 {
		t.Fatalf("restore from the backup onto rbd: exit %d %s", code, errOut)
	}
	onPool := getVolume(t, server, "restored-rbd")
	if onPool.InstallMethod != "restore" {
		t.Errorf("volume restored onto rbd: method %q, want restore (from the backup)", onPool.InstallMethod)
	}
	if out := sh("qemu-img", "compare", "-f", "raw", "-F", "raw", dirFile(fromSnap), rbdDrive(onPool.InstallPath)); !strings.Contains(out, "Images are identical") {
		t.Errorf("the volume restored onto rbd differs from the snapshot:\n%s", out)
	}
	_ = s1

	// Migration directory -> rbd -> directory.
	if _, errOut, code := cli(t, server, "volume", "create", "--name", "m1", "--size", "32M", "--store", "dir1", "--format", "raw", "--wait"); code != 0 {
		t.Fatalf("volume m1: exit %d %s", code, errOut)
	}
	m1 := getVolume(t, server, "m1")
	sh("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 8M", "-c", "write -P 0x44 20M 1M", dirFile(m1))
	want := filepath.Join(t.TempDir(), "m1.raw")
	sh("cp", "--sparse=always", dirFile(m1), want)
	if _, errOut, code := cli(t, server, "volume", "migrate", m1.ID, "--store", "ceph1", "--wait"); code != 0 {
		t.Fatalf("migrate m1 to rbd: exit %d %s", code, errOut)
	}
	onRBD := getVolume(t, server, "m1")
	if onRBD.State != "VOLUME_STATE_READY" || !strings.HasPrefix(onRBD.InstallPath, "volume-") {
		t.Fatalf("m1 after its migration to rbd: %+v", onRBD)
	}
	if out := sh("qemu-img", "compare", "-f", "raw", "-F", "raw", want, rbdDrive(onRBD.InstallPath)); !strings.Contains(out, "Images are identical") {
		t.Errorf("m1 on rbd differs from what it was:\n%s", out)
	}
	var du struct {
		Images []struct {
			Used int64 `json:"used_size"`
		} `json:"images"`
	}
	if err := json.Unmarshal([]byte(sh("rbd", "du", "--format", "json", "stowage/"+onRBD.InstallPath)), &du); err != nil || len(du.Images) != 1 {
		t.Fatalf("rbd du: %v %+v", err, du)
	}
	if used := du.Images[0].Used; used > 12<<20 {
		t.Errorf("m1 on rbd uses %d bytes, want the 4 MiB objects its 9 MiB of data fall in (12 MiB): its holes were written", used)
	}
	if _, err := os.Stat(dirFile(m1)); !os.IsNotExist(err) {
		t.Errorf("m1's file on dir1 remains after its migration: %v", err)
	}
	if _, errOut, code := cli(t, server, "volume", "migrate", m1.ID, "--store", "dir1", "--wait"); code != 0 {
		t.Fatalf("migrate m1 back to dir1: exit %d %s", code, errOut)
	}
	back := getVolume(t, server, "m1")
	if out := sh("qemu-img", "compare", "-f", "raw", "-F", "raw", want, dirFile(back)); !strings.Contains(out, "Images are identical") {
		t.Errorf("m1 back on dir1 differs from what it was:\n%s", out)
	}
	if images := sh("rbd", "ls", "stowage"); strings.Contains(images, onRBD.InstallPath) {
		t.Errorf("m1's image is left on rbd after its migration back:\n%s", images)
	}
}

//go:build ceph && pacific

package main

import (
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The stowage binary of this test run gets the rbd provider.
func init() { buildTags = append(buildTags, "ceph", "pacific") }

// TestRBDStoreEndToEnd: a Ceph pool of the one-node cluster
// (deploy/ceph/bootstrap.sh) as a primary store of a real controller,
// through the CLI. A wrong key is refused as unauthenticated and adds
// nothing; with the right one the store is Up with the pool's capacity; a
// blank volume is an RBD image; its grant is an rbd: URI qemu writes
// through; a snapshot, a write and a revert bring the first data back;
// deleting the volume removes the image and its snapshot.
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

	hostRoot, server, _ := oneHost(t, nil, nil)
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

	if _, errOut, code := cli(t, server, "volume", "delete", vol.ID, "--wait"); code != 0 {
		t.Fatalf("volume delete: exit %d %s", code, errOut)
	}
	if images := sh("rbd", "ls", "stowage"); strings.Contains(images, vol.InstallPath) {
		t.Errorf("the image is left after the delete:\n%s", images)
	}
}

package main

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/datapath/iscsi/tgttest"
	"github.com/stowage/stowage/drivers/iscsi"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// lunOpts are the qemu-img secret object and image options that open LUN
// n of iqn at portal as hostID with its CHAP secret (passed in a 0600 file,
// never in argv).
func lunOpts(t *testing.T, dir, portal, iqn string, n int, hostID, user, secret string) (object, opts string) {
	t.Helper()
	sec := filepath.Join(dir, fmt.Sprintf("chap-%d-%d", n, time.Now().UnixNano()))
	if err := os.WriteFile(sec, []byte(secret), 0o600); err != nil {
		t.Fatal(err)
	}
	return "secret,id=chap0,file=" + sec,
		fmt.Sprintf("driver=raw,file.driver=iscsi,file.transport=tcp,file.portal=%s,file.target=%s,file.lun=%d,file.user=%s,file.password-secret=chap0,file.initiator-name=%s",
			portal, iqn, n, user, iscsi.InitiatorName(hostID))
}

// compareLUN runs qemu-img compare of the qcow2 file want against LUN n,
// read through libiscsi.
func compareLUN(t *testing.T, want, object, lun string) {
	t.Helper()
	run(t, "qemu-img", "compare", "--object", object, "--image-opts", "driver=qcow2,file.driver=file,file.filename="+want, lun)
}

// addISCSIStore adds primary store name: target iqn at portal, run by
// targetHost's agent with the LUNs' files in dir; it must come Up.
func addISCSIStore(t *testing.T, a *clientAPI, name, portal, iqn, targetHost, dir string, scope *stowagev1.Scope) *stowagev1.DataStore {
	t.Helper()
	resp, err := a.stores.AddStore(context.Background(), connect.NewRequest(&stowagev1.AddStoreRequest{
		Name: name, Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY, Provider: "iscsi", Url: "iscsi://" + portal + "/" + iqn,
		Scope: scope, Details: map[string]string{"target_host": targetHost, "backing_dir": dir},
	}))
	if err != nil {
		t.Fatalf("add the iSCSI store %s: %v", name, err)
	}
	st := resp.Msg.GetStore()
	if st.GetState() != stowagev1.StoreState_STORE_STATE_UP {
		t.Fatalf("iSCSI store %s: %v", name, st)
	}
	return st
}

// tgtLUNs is what tgtadm shows of target iqn: LUN number -> backing file.
func tgtLUNs(t *testing.T, ctl int, iqn string) map[int]string {
	t.Helper()
	var out []byte
	var err error
	// tgtd drops a request now and then while another process talks to it
	// ("failed to send request hdr"), for a second or two while it is busy:
	// the request never reached it.
	for try := 0; try < 50; try++ {
		if out, err = exec.Command("tgtadm", "-C", strconv.Itoa(ctl), "--lld", "iscsi", "--op", "show", "--mode", "target").CombinedOutput(); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("tgtadm show: %v: %s", err, out)
	}
	luns := map[int]string{}
	in, lun := false, -1
	for _, line := range strings.Split(string(out), "\n") {
		l := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "Target "):
			in = strings.HasSuffix(l, " "+iqn)
		case in && strings.HasPrefix(l, "LUN: "):
			lun, _ = strconv.Atoi(strings.TrimPrefix(l, "LUN: "))
		case in && strings.HasPrefix(l, "Backing store path: ") && lun > 0:
			luns[lun] = strings.TrimPrefix(l, "Backing store path: ")
		}
	}
	return luns
}

// TestISCSIStoreEndToEnd runs the iscsi provider against a real tgtd on
// loopback with CHAP: a store, a volume from a qcow2 template served over
// HTTP compared through iscsi://, resize, a wrong CHAP secret, migration to
// a directory store and back, and delete (the LUN gone from tgtadm).
func TestISCSIStoreEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "qemu-img", "qemu-io", "tgtadm")
	portal, ctl := tgttest.Start(t)
	root := t.TempDir()
	ctx := context.Background()
	web, qcow := patternedQcow2(t, root, "write -P 0x5a 20M 3M")
	hs := httptest.NewServer(http.StripPrefix("/t/", http.FileServer(http.Dir(web))))
	defer hs.Close()

	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "ctl"))
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), "--store-roots", root,
		"--iscsi-target", "--tgt-control-port", strconv.Itoa(ctl))
	// h2 cannot log in to targets (no userspace initiator): it gets LUNs over NBD.
	agentProc(t, server, "h2", "z1", "c1", filepath.Join(root, "a2"), "--store-roots", root, "--iscsi-userspace=false")
	waitFor(t, "h1 and h2 Up", 20*time.Second, func() bool {
		return hostState(t, server, "h1") == "HOST_STATE_UP" && hostState(t, server, "h2") == "HOST_STATE_UP"
	})
	if hostCaps(t, server, "h2").GetIscsiUserspace() || !hostCaps(t, server, "h1").GetIscsiUserspace() || !hostCaps(t, server, "h1").GetIscsiTarget() {
		t.Fatalf("capabilities: h1 %v, h2 %v", hostCaps(t, server, "h1"), hostCaps(t, server, "h2"))
	}
	a := newAPI(server)
	img := addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), &stowagev1.Scope{Zone: "z1"})
	dir := addStore(t, a, "dir", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "dir"), &stowagev1.Scope{Zone: "z1"})

	const iqn = "iqn.2026-12.org.stowage.test:san1"
	san := addISCSIStore(t, a, "san1", portal, iqn, "h1", filepath.Join(root, "san1"), &stowagev1.Scope{Zone: "z1"})
	key, err := os.ReadFile(filepath.Join(root, "ctl", "pki", "chap.key"))
	if err != nil {
		t.Fatal(err)
	}
	user, secret := iscsi.CHAP(key, san.GetId(), "h1")
	for k, v := range san.GetDetails() {
		if strings.Contains(v, secret) {
			t.Errorf("the API echoes the CHAP secret in detail %s", k)
		}
	}

	r, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "base", Url: hs.URL + "/t/base.qcow2",
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Checksum: "sha256:" + sha256File(t, qcow), StoreIds: []string{img.GetId()}}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, r.Msg.GetJob())

	// A volume from the template: raw in a LUN, the guest view of the qcow2.
	cv, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "v1", TemplateId: r.Msg.GetTemplate().GetId(), StoreId: san.GetId()}))
	if err != nil {
		t.Fatalf("create volume on iSCSI: %v", err)
	}
	mustSucceed(t, a, cv.Msg.GetJob())
	vol := cv.Msg.GetVolume()
	gv, _ := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: vol.GetId()}))
	if gv.Msg.GetVolume().GetFormat() != stowagev1.ImageFormat_IMAGE_FORMAT_RAW {
		t.Fatalf("volume on iSCSI is %v, want raw", gv.Msg.GetVolume().GetFormat())
	}
	lunOf := func() int {
		t.Helper()
		for n, b := range tgtLUNs(t, ctl, iqn) {
			if strings.Contains(b, vol.GetId()) && strings.Contains(b, "volume-") {
				return n
			}
		}
		return 0
	}
	n := lunOf()
	if n == 0 {
		t.Fatalf("no LUN of volume %s on %s: %v", vol.GetId(), iqn, tgtLUNs(t, ctl, iqn))
	}
	obj, lun := lunOpts(t, root, portal, iqn, n, "h1", user, secret)
	compareLUN(t, qcow, obj, lun)

	// A blank volume: a raw LUN of its size; qcow2 is refused on a LUN.
	bv, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "blank", Size: 16 << 20, StoreId: san.GetId()}))
	if err != nil {
		t.Fatalf("blank volume on iSCSI: %v", err)
	}
	mustSucceed(t, a, bv.Msg.GetJob())
	blankLUN := 0
	for n, b := range tgtLUNs(t, ctl, iqn) {
		if strings.Contains(b, bv.Msg.GetVolume().GetId()) {
			blankLUN = n
		}
	}
	if blankLUN == 0 {
		t.Fatal("the blank volume has no LUN")
	}
	obj, lun = lunOpts(t, root, portal, iqn, blankLUN, "h1", user, secret)
	if info := run(t, "qemu-img", "info", "--output", "json", "--object", obj, "--image-opts", lun); !strings.Contains(info, `"virtual-size": 16777216`) {
		t.Fatalf("blank LUN: %s", info)
	}
	if _, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "q", Size: 16 << 20, StoreId: san.GetId(),
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2})); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Fatalf("a qcow2 volume on iSCSI: %v, want invalid_argument", err)
	}

	// The grant a hypervisor gets: iscsi:// to that LUN, the secret redacted in the reply.
	g, err := a.volumes.GrantAccess(ctx, connect.NewRequest(&stowagev1.GrantAccessRequest{Id: vol.GetId(), HostId: "h1"}))
	if err != nil {
		t.Fatal(err)
	}
	if u := g.Msg.GetUri(); !strings.HasPrefix(u, "iscsi://") || !strings.Contains(u, iqn+"/"+strconv.Itoa(n)) || strings.Contains(u, secret) {
		t.Fatalf("grant: %q", u)
	}

	// h2, without the userspace initiator, is given an NBD export of the
	// LUN by the target host; it reads the same guest view.
	g2, err := a.volumes.GrantAccess(ctx, connect.NewRequest(&stowagev1.GrantAccessRequest{Id: vol.GetId(), HostId: "h2"}))
	if err != nil {
		t.Fatalf("grant to h2: %v", err)
	}
	if !strings.HasPrefix(g2.Msg.GetUri(), "nbd://") {
		t.Fatalf("grant to a host that cannot log in: %q, want nbd://", g2.Msg.GetUri())
	}
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", qcow, g2.Msg.GetUri())
	if _, err := a.volumes.RevokeAccess(ctx, connect.NewRequest(&stowagev1.RevokeAccessRequest{Id: vol.GetId(), HostId: "h2"})); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "info", "-f", "raw", g2.Msg.GetUri()).CombinedOutput(); err == nil {
		t.Fatalf("the NBD export of the LUN outlived its revocation: %s", out)
	}

	// Wrong CHAP secret: authentication fails, nothing opened.
	obj, lun = lunOpts(t, root, portal, iqn, n, "h1", user, "wrong-secret-0000")
	out, err := exec.Command("qemu-img", "info", "--object", obj, "--image-opts", lun).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "Authentication failure") {
		t.Fatalf("wrong CHAP secret: %v: %s", err, out)
	}

	// Resize: the LUN grows.
	rs, err := a.volumes.ResizeVolume(ctx, connect.NewRequest(&stowagev1.ResizeVolumeRequest{Id: vol.GetId(), Size: 128 << 20}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, rs.Msg.GetJob())
	obj, lun = lunOpts(t, root, portal, iqn, lunOf(), "h1", user, secret)
	info := run(t, "qemu-img", "info", "--output", "json", "--object", obj, "--image-opts", lun)
	if !strings.Contains(info, `"virtual-size": 134217728`) {
		t.Fatalf("after resize the LUN is: %s", info)
	}

	// Migrate to the directory store and back: through the generic motion path.
	for _, to := range []*stowagev1.DataStore{dir, san} {
		mg, err := a.volumes.MigrateVolume(ctx, connect.NewRequest(&stowagev1.MigrateVolumeRequest{Id: vol.GetId(), StoreId: to.GetId()}))
		if err != nil {
			t.Fatalf("migrate to %s: %v", to.GetName(), err)
		}
		mustSucceed(t, a, mg.Msg.GetJob())
	}
	if n = lunOf(); n == 0 {
		t.Fatal("the volume migrated back has no LUN")
	}
	obj, lun = lunOpts(t, root, portal, iqn, n, "h1", user, secret)
	compareLUN(t, qcow, obj, lun)

	// A snapshot (a full copy into a LUN of its own: tgt has none), backed
	// up into the image store's chunk store through libiscsi.
	ts, err := a.snapshots.TakeSnapshot(ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: vol.GetId(), Name: "s1"}))
	if err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	mustSucceed(t, a, ts.Msg.GetJob())
	bs, err := a.snapshots.BackupSnapshot(ctx, connect.NewRequest(&stowagev1.BackupSnapshotRequest{Id: ts.Msg.GetSnapshot().GetId()}))
	if err != nil {
		t.Fatalf("backup: %v", err)
	}
	mustSucceed(t, a, bs.Msg.GetJob())

	// Delete: the LUNs are gone from the target.
	for _, id := range []string{vol.GetId(), bv.Msg.GetVolume().GetId()} {
		dr, err := a.volumes.DeleteVolume(ctx, connect.NewRequest(&stowagev1.DeleteVolumeRequest{Id: id}))
		if err != nil {
			t.Fatal(err)
		}
		// Until the job ends the records still place the volume's
		// snapshot on the store (its LUN may already be gone): the
		// restore below must see it only in the backup.
		mustSucceed(t, a, dr.Msg.GetJob())
	}
	waitFor(t, "the volume's and snapshot's LUNs gone from tgtadm", 30*time.Second, func() bool {
		for _, b := range tgtLUNs(t, ctl, iqn) {
			if strings.Contains(b, vol.GetId()) || strings.Contains(b, ts.Msg.GetSnapshot().GetId()) || strings.Contains(b, bv.Msg.GetVolume().GetId()) {
				return false
			}
		}
		return true
	})
	// What stays is the template cached on the store, one LUN.
	if left := tgtLUNs(t, ctl, iqn); len(left) != 1 {
		t.Errorf("LUNs left on %s: %v, want the cached template only", iqn, left)
	}

	// Restored from the backup onto the directory store: byte-equal.
	rv, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "restored", SnapshotId: ts.Msg.GetSnapshot().GetId(), StoreId: dir.GetId()}))
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	mustSucceed(t, a, rv.Msg.GetJob())
	restored, _ := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: rv.Msg.GetVolume().GetId()}))
	run(t, "qemu-img", "compare", "-f", "qcow2", qcow, filepath.Join(dir.GetDetails()["path"], restored.Msg.GetVolume().GetInstallPath()))
}

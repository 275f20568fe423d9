package main

// A host that leaves an iSCSI store's scope loses its login (issue 13/14
// leftover): three agents in zone z1 are admitted to the store's target
// (ACL + CHAP); h3 restarts in zone z2, the controller re-applies the
// store's host set (drivers.ScopeReconciler), and the target host's agent
// removes h3's initiator and CHAP account and logs out its live session.
// h3's old credentials then fail; h2's still work.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/agent/iscsi/tgt"
	"github.com/stowage/stowage/datapath/iscsi/tgttest"
	"github.com/stowage/stowage/drivers/iscsi"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func TestISCSIHostLeavesScope(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "qemu-img", "qemu-nbd", "tgtadm")
	portal, ctl := tgttest.Start(t)
	root := t.TempDir()
	ctx := context.Background()
	m := tgt.New(tgt.WithControlPort(ctl))

	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "ctl"))
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), "--store-roots", root,
		"--iscsi-target", "--tgt-control-port", strconv.Itoa(ctl))
	agentProc(t, server, "h2", "z1", "c1", filepath.Join(root, "a2"), "--store-roots", root)
	h3 := agentProc(t, server, "h3", "z1", "c1", filepath.Join(root, "a3"), "--store-roots", root)
	waitFor(t, "h1, h2 and h3 Up", 20*time.Second, func() bool {
		return hostState(t, server, "h1") == "HOST_STATE_UP" && hostState(t, server, "h2") == "HOST_STATE_UP" && hostState(t, server, "h3") == "HOST_STATE_UP"
	})
	a := newAPI(server)
	const iqn = "iqn.2026-12.org.stowage.test:scope1"
	san := addISCSIStore(t, a, "san1", portal, iqn, "h1", filepath.Join(root, "san1"), &stowagev1.Scope{Zone: "z1"})
	key := readFile(t, filepath.Join(root, "ctl", "pki", "chap.key"))
	cred := func(h string) (user, secret string) { return iscsi.CHAP(key, san.GetId(), h) }
	// The test's tgtadm runs beside the agent's: a read that crosses a
	// change is read again.
	target := func() tgt.Target {
		var err error
		for range 20 {
			var tg tgt.Target
			if tg, err = m.Target(ctx, iqn); err == nil {
				return tg
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("tgtadm show %s: %v", iqn, err)
		return tgt.Target{}
	}
	admitted := func(tg tgt.Target, h string) (acl, account bool) {
		u, _ := cred(h)
		return slices.Contains(tg.ACLs, iscsi.InitiatorName(h)), slices.Contains(tg.Accounts, u)
	}
	for _, h := range []string{"h1", "h2", "h3"} {
		if acl, acct := admitted(target(), h); !acl || !acct {
			t.Fatalf("after attach %s: ACL %v, CHAP account %v; target %+v", h, acl, acct, target())
		}
	}

	bv, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "blank", Size: 16 << 20, StoreId: san.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, bv.Msg.GetJob())
	lun := 0
	for n, b := range tgtLUNs(t, ctl, iqn) {
		if strings.Contains(b, bv.Msg.GetVolume().GetId()) {
			lun = n
		}
	}
	if lun == 0 {
		t.Fatal("the volume has no LUN")
	}
	info := func(h string) (string, error) {
		u, s := cred(h)
		obj, opts := lunOpts(t, root, portal, iqn, lun, h, u, s)
		out, err := exec.Command("qemu-img", "info", "--output", "json", "--object", obj, "--image-opts", opts).CombinedOutput()
		return string(out), err
	}
	for _, h := range []string{"h2", "h3"} {
		if out, err := info(h); err != nil || !strings.Contains(out, `"virtual-size": 16777216`) {
			t.Fatalf("%s opens the LUN before the move: %v: %s", h, err, out)
		}
	}
	// h3 keeps a session open (a guest's disk): qemu-nbd reading the LUN
	// through libiscsi as h3.
	u3, s3 := cred("h3")
	obj, opts := lunOpts(t, root, portal, iqn, lun, "h3", u3, s3)
	nbd := exec.Command("qemu-nbd", "--persistent", "--read-only", "-k", filepath.Join(root, "h3.sock"), "--object", obj, "--image-opts", opts)
	var nbdOut syncBuffer
	nbd.Stdout, nbd.Stderr = &nbdOut, &nbdOut
	if err := nbd.Start(); err != nil {
		t.Fatal(err)
	}
	nbdDone := make(chan struct{})
	go func() { _ = nbd.Wait(); close(nbdDone) }()
	t.Cleanup(func() { _ = nbd.Process.Kill(); <-nbdDone }) // by PID: the process this test started
	sessions := func(h string) int {
		n := 0
		for _, nx := range target().Nexuses {
			if nx.Initiator == iscsi.InitiatorName(h) {
				n++
			}
		}
		return n
	}
	waitFor(t, "h3's session", 10*time.Second, func() bool { return sessions("h3") == 1 })

	// h3 moves to zone z2: out of the store's scope.
	h3.kill(syscall.SIGTERM)
	movedAt := time.Now()
	agentProc(t, server, "h3", "z2", "c1", filepath.Join(root, "a3"), "--store-roots", root)
	var last tgt.Target
	for deadline := time.Now().Add(30 * time.Second); ; {
		last = target()
		acl, acct := admitted(last, "h3")
		if !acl && !acct && sessions("h3") == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("h3 still admitted 30 s after it moved to z2: ACL %v, CHAP account %v, sessions %d; target %+v", acl, acct, sessions("h3"), last)
		}
		time.Sleep(50 * time.Millisecond)
	}
	revoked := time.Since(movedAt)
	for _, h := range []string{"h1", "h2"} {
		if acl, acct := admitted(last, h); !acl || !acct {
			t.Fatalf("after h3 left %s lost its admission: ACL %v, CHAP account %v; target %+v", h, acl, acct, last)
		}
	}

	// libiscsi reconnects at once: it must stay out.
	time.Sleep(time.Second)
	if n := sessions("h3"); n != 0 {
		t.Fatalf("h3 logged in again after the revoke (%d sessions)", n)
	}
	// Its initiator is refused by the ACL: tgt answers an initiator its
	// ACL does not admit with login status 0x0203, "Target not found",
	// as if the target were not there.
	out, err := info("h3")
	if err == nil {
		t.Fatalf("h3 opens the LUN with its old CHAP after leaving the scope: %s", out)
	}
	if !strings.Contains(out, "Target not found") {
		t.Fatalf("h3's login failed, but not by the target's ACL: %s", out)
	}
	// And its CHAP account is gone: h3's old user and secret fail
	// authentication even under an initiator name the ACL admits.
	chapOnly := func(user, secret string) (string, error) {
		obj, opts := lunOpts(t, root, portal, iqn, lun, "h2", user, secret)
		out, err := exec.Command("qemu-img", "info", "--object", obj, "--image-opts", opts).CombinedOutput()
		return string(out), err
	}
	if out, err := chapOnly(u3, s3); err == nil || !strings.Contains(out, "Authentication failure") {
		t.Fatalf("h3's old CHAP account under an admitted initiator name: %v: %s, want an authentication failure", err, out)
	}
	if out, err := info("h2"); err != nil || !strings.Contains(out, `"virtual-size": 16777216`) {
		t.Fatalf("h2 opens the LUN after h3 left: %v: %s", err, out)
	}
	t.Logf("h3 left zone z1: initiator, CHAP account and live session gone from the target %s after its agent restarted in z2; its login now fails (%s), its old CHAP too; h2 still opens the LUN",
		revoked.Round(time.Millisecond), firstLine(out[strings.LastIndex(out, "iSCSI:"):]))
}

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return fmt.Sprintf("%.160s", s)
}

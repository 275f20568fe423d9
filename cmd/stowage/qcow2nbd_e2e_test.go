package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// TestQcow2VolumesOverNBD: a linked clone and a lazy volume (its chain
// ending in h1's template mount) on a store only h1 reaches are granted
// to h2, which attaches them over nbds:// from h1's agent: each grant is
// served by a qemu-storage-daemon behind the agent's NBD listener, read by
// nbdinfo --map and nbdcopy as the guest view (qemu-img compare with the
// template), written by qemu-io with FUA and write-zeroes; the grant
// survives a kill -9 of h1's agent with the same daemon adopted (one daemon
// per grant, never two), and a revoke stops the daemon.
func TestQcow2VolumesOverNBD(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needFUSE(t)
	needTools(t, "qemu-img", "qemu-io", "qemu-storage-daemon", "nbdinfo", "nbdcopy", "pgrep")
	root := t.TempDir()
	ctx := context.Background()
	web, qcow := patternedQcow2(t, root, "write -P 0x33 10M 3M")
	origin := httptest.NewServer(http.StripPrefix("/t/", http.FileServer(http.Dir(web))))
	defer origin.Close()

	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "ctl"))
	c1 := startCache(t, "cache h1", filepath.Join(root, "c1"), "--pki-dir", filepath.Join(root, "a1", "pki"))
	nbdAddr := freePort(t)
	h1args := []string{"--image-cache-socket", c1.socket, "--nbd-tls", "require", "--nbd-listen", nbdAddr}
	h1 := agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), h1args...)
	agentProc(t, server, "h2", "z1", "c1", filepath.Join(root, "a2"))
	waitFor(t, "h1 and h2 Up", 20*time.Second, func() bool {
		return hostState(t, server, "h1") == "HOST_STATE_UP" && hostState(t, server, "h2") == "HOST_STATE_UP"
	})
	waitFor(t, "h1 reports its template mount", 20*time.Second, func() bool {
		return hostCaps(t, server, "h1").GetTemplateCache().GetMount() != ""
	})
	a := newAPI(server)
	scope := &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h1"}
	addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), scope)
	p1 := addStore(t, a, "p1", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p1"), scope)
	resp, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{
		Name: "base", Url: origin.URL + "/t/" + filepath.Base(qcow), Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Checksum: "sha256:" + sha256File(t, qcow)}))
	if err != nil {
		t.Fatalf("register: %v", err)
	}
	tmpl := resp.Msg.GetTemplate()
	mustSucceed(t, a, resp.Msg.GetJob())

	tlsDir := libnbdTLSDir(t, root, server, "a2")
	daemons := func(sockDir string) int {
		out, _ := exec.Command("pgrep", "-c", "-f", "qemu-storage-daemon.*"+sockDir).Output()
		n := 0
		for _, c := range strings.TrimSpace(string(out)) {
			n = n*10 + int(c-'0')
		}
		return n
	}
	qsdDir := filepath.Join(root, "a1", "qsd")

	for i, strategy := range []string{"linked", "lazy"} {
		name := "v-" + strategy
		cr, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{
			Name: name, TemplateId: tmpl.GetId(), StoreId: p1.GetId(), Strategy: strategy}))
		if err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		j := mustSucceed(t, a, cr.Msg.GetJob())
		if j.GetPlan().GetStrategy() != strategy && !strings.Contains(j.GetPlan().GetStrategy(), "link") {
			t.Fatalf("%s: plan %v", name, j.GetPlan())
		}
		v, err := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: cr.Msg.GetVolume().GetId()}))
		if err != nil {
			t.Fatal(err)
		}
		volFile := filepath.Join(p1.GetDetails()["path"], v.Msg.GetVolume().GetInstallPath())
		if info := run(t, "qemu-img", "info", "-U", "-f", "qcow2", "--output", "json", volFile); !strings.Contains(info, `"backing-filename"`) {
			t.Fatalf("%s is not a qcow2 with a backing file: %s", name, info)
		}

		var grant struct {
			URI string `json:"uri"`
		}
		cliJSON(t, server, &grant, "volume", "access", name, "--host", "h2")
		if !strings.HasPrefix(grant.URI, "nbds://127.0.0.1:") {
			t.Fatalf("%s: grant to h2: %q, want nbds://", name, grant.URI)
		}
		tlsURI := grant.URI + "?tls-certificates=" + tlsDir
		if got := daemons(qsdDir); got != 1 {
			t.Fatalf("%s: %d qemu-storage-daemons serve the grant, want 1", name, got)
		}
		if out := strings.TrimSpace(run(t, "nbdinfo", "--size", tlsURI)); out != "67108864" {
			t.Fatalf("%s: size %s", name, out)
		}
		// The guest view's map: 5 MiB of data (0x5a, 0x33, 0x77), the rest holes.
		if m := run(t, "nbdinfo", "--map", "--totals", tlsURI); !strings.Contains(m, "5242880") {
			t.Fatalf("%s: nbdinfo --map --totals:\n%s", name, m)
		}
		copied := filepath.Join(root, name+".raw")
		run(t, "nbdcopy", tlsURI, copied)
		run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", copied, qcow)

		// Guest writes through the grant: FUA data, zeroes over template data.
		port := nbdAddr[strings.LastIndex(nbdAddr, ":")+1:]
		exportName := grant.URI[strings.LastIndex(grant.URI, "/")+1:]
		run(t, "qemu-io", "--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+tlsDir, "--image-opts",
			"-c", "write -f -P 0x44 20M 1M", "-c", "write -z 0 64k",
			"driver=raw,file.driver=nbd,file.export="+exportName+",file.server.type=inet,file.server.host=127.0.0.1,file.server.port="+port+",file.tls-creds=tls0")
		run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x44 20M 1M", "-c", "write -z 0 64k", copied)

		if i == 0 {
			// kill -9 of h1's agent: the grant reads again from the
			// restarted agent, through the same (adopted) daemon.
			before, _ := exec.Command("pgrep", "-f", "qemu-storage-daemon.*"+qsdDir).Output()
			h1.kill(9)
			h1 = agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), h1args...)
			waitFor(t, "the restarted h1 serving NBD", 20*time.Second, func() bool { return strings.Contains(h1.log.String(), "NBD server listening") })
			after, _ := exec.Command("pgrep", "-f", "qemu-storage-daemon.*"+qsdDir).Output()
			if strings.TrimSpace(string(before)) == "" || string(before) != string(after) {
				t.Fatalf("daemon before the agent's restart %q, after %q: want the same one adopted", before, after)
			}
			if !strings.Contains(h1.log.String(), "adopted") {
				t.Fatalf("the restarted agent did not log an adoption:\n%s", h1.log.String())
			}
			waitFor(t, "h1 Up again", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
		}
		reread := filepath.Join(root, name+".2.raw")
		run(t, "nbdcopy", tlsURI, reread)
		run(t, "cmp", copied, reread)

		if _, errOut, code := cli(t, server, "volume", "access", name, "--host", "h2", "--revoke"); code != 0 {
			t.Fatalf("%s: revoke: %s", name, errOut)
		}
		if out, err := exec.Command("nbdinfo", "--size", tlsURI).CombinedOutput(); err == nil {
			t.Fatalf("%s: a revoked grant still answers: %s", name, out)
		}
		waitFor(t, "the grant's daemon gone", 10*time.Second, func() bool { return daemons(qsdDir) == 0 })
		// Stopped cleanly: the volume file holds the guest's writes.
		run(t, "qemu-img", "check", "-f", "qcow2", volFile)
		run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", copied, volFile)

		if strategy != "linked" {
			continue
		}
		// A snapshot granted to h2 reads, read-only over nbds://, as the
		// volume read when it was taken (served by the Go qcow2 reader:
		// no daemon), whatever the volume holds since.
		run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5b 40M 1M", volFile)
		want := filepath.Join(root, name+".snap.raw")
		run(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", volFile, want)
		ts, err := a.snapshots.TakeSnapshot(ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: v.Msg.GetVolume().GetId(), Name: "s1"}))
		if err != nil {
			t.Fatal(err)
		}
		mustSucceed(t, a, ts.Msg.GetJob())
		v, _ = a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: cr.Msg.GetVolume().GetId()}))
		run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 40M 1M", filepath.Join(p1.GetDetails()["path"], v.Msg.GetVolume().GetInstallPath()))
		var sg struct {
			URI string `json:"uri"`
		}
		snapID := ts.Msg.GetSnapshot().GetId()
		cliJSON(t, server, &sg, "snapshot", "access", snapID, "--host", "h2")
		if !strings.HasPrefix(sg.URI, "nbds://127.0.0.1:") {
			t.Fatalf("snapshot grant to h2: %q, want nbds://", sg.URI)
		}
		snapRead := filepath.Join(root, name+".snap.read")
		run(t, "nbdcopy", sg.URI+"?tls-certificates="+tlsDir, snapRead)
		run(t, "cmp", want, snapRead)
		if got := daemons(qsdDir); got != 0 {
			t.Fatalf("a read-only snapshot grant started %d qemu-storage-daemons; the Go reader serves it", got)
		}
		if _, errOut, code := cli(t, server, "snapshot", "access", snapID, "--host", "h2", "--revoke"); code != 0 {
			t.Fatalf("snapshot revoke: %s", errOut)
		}
		if out, err := exec.Command("nbdinfo", "--size", sg.URI+"?tls-certificates="+tlsDir).CombinedOutput(); err == nil {
			t.Fatalf("a revoked snapshot grant still answers: %s", out)
		}
	}
}

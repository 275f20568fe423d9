package main

import (
	"context"
	"crypto/rand"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// countingProxy forwards TCP connections from a loopback listener to
// target and counts the bytes it carries each way: what went over the
// wire, TLS and NBD framing included.
type countingProxy struct {
	l        net.Listener
	toClient atomic.Int64 // target → client
	toServer atomic.Int64 // client → target
	wg       sync.WaitGroup
}

func newCountingProxy(t *testing.T, target string) *countingProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &countingProxy{l: l}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			pipe := func(dst, src net.Conn, n *atomic.Int64) {
				defer p.wg.Done()
				k, _ := io.Copy(dst, src)
				n.Add(k)
				dst.(*net.TCPConn).CloseWrite()
			}
			p.wg.Add(2)
			go pipe(c, s, &p.toClient)
			go pipe(s, c, &p.toServer)
		}
	}()
	t.Cleanup(func() { l.Close() })
	return p
}

func (p *countingProxy) addr() string { return p.l.Addr().String() }

// allocated is the bytes a file holds on disk.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestMigrationOverNBD moves volumes between two agents that share no
// store: p1 is reached by h1 only, p2 by h2 only. h2 reads each source over
// NBD from h1's agent, whose NBD traffic goes through a counting proxy
// (--nbd-address), so the bytes on the wire are counted, not estimated:
//
//   - a 1 GiB raw volume with 10% data (1 MiB of random bytes every 10 MiB)
//     moves with at most 1.1x its allocated bytes on the wire, and arrives
//     byte-equal and as sparse;
//   - a qcow2 linked clone (its chain on p1: the template copy there) moves
//     as its guest view, flattened as the plan says, reads as before, and
//     the wire carries about its guest data, not its virtual size.
func TestMigrationOverNBD(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "qemu-img", "qemu-io", "qemu-storage-daemon", "cmp")
	root := t.TempDir()
	ctx := context.Background()
	web, qcow := patternedQcow2(t, root, "write -P 0x33 10M 3M")
	origin := httptest.NewServer(http.StripPrefix("/t/", http.FileServer(http.Dir(web))))
	defer origin.Close()

	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "ctl"))
	nbdListen := freePort(t)
	proxy := newCountingProxy(t, nbdListen)
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), "--nbd-listen", nbdListen, "--nbd-address", proxy.addr())
	agentProc(t, server, "h2", "z1", "c1", filepath.Join(root, "a2"))
	waitFor(t, "h1 and h2 Up", 20*time.Second, func() bool {
		return hostState(t, server, "h1") == "HOST_STATE_UP" && hostState(t, server, "h2") == "HOST_STATE_UP"
	})
	a := newAPI(server)
	s1 := &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h1"}
	s2 := &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h2"}
	addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), s1)
	p1 := addStore(t, a, "p1", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p1"), s1)
	p2 := addStore(t, a, "p2", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p2"), s2)
	file := func(st *stowagev1.DataStore, v *stowagev1.Volume) string {
		return filepath.Join(st.GetDetails()["path"], v.GetInstallPath())
	}
	get := func(id string) *stowagev1.Volume {
		t.Helper()
		r, err := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: id}))
		if err != nil {
			t.Fatal(err)
		}
		return r.Msg.GetVolume()
	}
	migrate := func(v *stowagev1.Volume) (*stowagev1.Volume, *stowagev1.Plan, int64) {
		t.Helper()
		before := proxy.toClient.Load() + proxy.toServer.Load()
		mg, err := a.volumes.MigrateVolume(ctx, connect.NewRequest(&stowagev1.MigrateVolumeRequest{Id: v.GetId(), StoreId: p2.GetId()}))
		if err != nil {
			t.Fatalf("migrate %s: %v", v.GetName(), err)
		}
		mustSucceed(t, a, mg.Msg.GetJob())
		proxy.wg.Wait() // every connection closed and counted
		moved := get(v.GetId())
		if moved.GetStoreId() != p2.GetId() {
			t.Fatalf("%s is on %s after the migration", v.GetName(), moved.GetStoreId())
		}
		return moved, mg.Msg.GetPlan(), proxy.toClient.Load() + proxy.toServer.Load() - before
	}

	// 1. A 1 GiB raw volume with 10% data.
	cr, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{
		Name: "big", Size: 1 << 30, Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW, StoreId: p1.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, cr.Msg.GetJob())
	v := get(cr.Msg.GetVolume().GetId())
	src := file(p1, v)
	f, err := os.OpenFile(src, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	for off := int64(0); off < 1<<30; off += 10 << 20 {
		rand.Read(chunk)
		if _, err := f.WriteAt(chunk, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(root, "big.want")
	run(t, "cp", "--sparse=always", src, want)
	alloc := allocated(t, src)
	// Attached (granted to h2), it does not move: a cold migration.
	if _, err := a.volumes.GrantAccess(ctx, connect.NewRequest(&stowagev1.GrantAccessRequest{Id: v.GetId(), HostId: "h2"})); err != nil {
		t.Fatal(err)
	}
	if _, err := a.volumes.MigrateVolume(ctx, connect.NewRequest(&stowagev1.MigrateVolumeRequest{Id: v.GetId(), StoreId: p2.GetId()})); connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Fatalf("migrate an attached volume: %v, want failed_precondition", err)
	}
	if _, err := a.volumes.RevokeAccess(ctx, connect.NewRequest(&stowagev1.RevokeAccessRequest{Id: v.GetId(), HostId: "h2"})); err != nil {
		t.Fatal(err)
	}
	v = get(v.GetId())
	moved, plan, wire := migrate(v)
	if plan.GetStrategy() != "migrate-agent-to-agent" || !strings.Contains(strings.Join(plan.GetReasons(), " "), "NBD") {
		t.Fatalf("plan: %v", plan)
	}
	dst := file(p2, moved)
	run(t, "cmp", want, dst)
	ratio := float64(wire) / float64(alloc)
	t.Logf("1 GiB raw volume, %d MiB allocated: %d bytes on the wire (%.3fx allocated); destination holds %d MiB",
		alloc>>20, wire, ratio, allocated(t, dst)>>20)
	if wire == 0 || ratio > 1.1 {
		t.Fatalf("%d bytes on the wire for %d allocated: %.3fx, want ≤ 1.1x", wire, alloc, ratio)
	}
	if got := allocated(t, dst); got > alloc+alloc/10 {
		t.Fatalf("destination holds %d bytes, the source %d: holes were written", got, alloc)
	}

	// 2. A linked clone of a qcow2 template: its guest view moves, flattened.
	resp, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{
		Name: "base", Url: origin.URL + "/t/" + filepath.Base(qcow), Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Checksum: "sha256:" + sha256File(t, qcow)}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, resp.Msg.GetJob())
	tmplID := resp.Msg.GetTemplate().GetId()
	linked := func(name string, st *stowagev1.DataStore) *stowagev1.Volume {
		t.Helper()
		lc, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{
			Name: name, TemplateId: tmplID, StoreId: st.GetId(), Strategy: "linked"}))
		if err != nil {
			t.Fatal(err)
		}
		mustSucceed(t, a, lc.Msg.GetJob())
		return get(lc.Msg.GetVolume().GetId())
	}
	cv := linked("clone", p1)
	cfile := file(p1, cv)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x66 30M 2M", cfile)
	cwant := filepath.Join(root, "clone.want")
	run(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", cfile, cwant)
	moved, plan, wire = migrate(cv)
	if !strings.Contains(strings.Join(plan.GetReasons(), " "), "flattened") {
		t.Fatalf("the plan does not say the clone is flattened: %v", plan.GetReasons())
	}
	dst = file(p2, moved)
	info := run(t, "qemu-img", "info", "-f", "qcow2", "--output", "json", dst)
	if strings.Contains(info, "backing-filename") {
		t.Fatalf("the migrated clone still has a backing file: %s", info)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", cwant, dst)
	// Guest data: 5 MiB from the template and 2 MiB written into the clone.
	const guest = 7 << 20
	t.Logf("linked clone, 64 MiB virtual, %d MiB of guest data: %d bytes on the wire (%.3fx)", guest>>20, wire, float64(wire)/guest)
	if wire == 0 || wire > guest+guest/10 {
		t.Fatalf("%d bytes on the wire for %d bytes of guest data", wire, guest)
	}

	// 3. Once the template is cached on p2 (a linked clone there caches it,
	// agent to agent over NBD as stored), a linked clone migrates with its
	// chain kept: only its overlay moves, renamed onto p2's template copy.
	onP2 := linked("on-p2", p2)
	cv2 := linked("clone2", p1)
	cfile2 := file(p1, cv2)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x67 40M 2M", cfile2)
	cwant2 := filepath.Join(root, "clone2.want")
	run(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", cfile2, cwant2)
	overlay := allocated(t, cfile2)
	moved, plan, wire = migrate(cv2)
	if !strings.Contains(strings.Join(plan.GetReasons(), " "), "chain kept") {
		t.Fatalf("the plan does not keep the chain: %v", plan.GetReasons())
	}
	p2base := get(onP2.GetId()).GetBaseRefId()
	if moved.GetBaseRefId() == "" || moved.GetBaseRefId() != p2base {
		t.Fatalf("migrated clone names template copy %q, want p2's %q", moved.GetBaseRefId(), p2base)
	}
	dst = file(p2, moved)
	info = run(t, "qemu-img", "info", "-f", "qcow2", "--output", "json", dst)
	if !strings.Contains(info, `"backing-filename": "`+p2.GetDetails()["path"]) {
		t.Fatalf("the migrated clone's backing file is not p2's template copy: %s", info)
	}
	run(t, "qemu-img", "check", "-f", "qcow2", dst)
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", cwant2, dst)
	t.Logf("linked clone with its chain kept: overlay %d KiB allocated, %d KiB on the wire", overlay>>10, wire>>10)
	if wire == 0 || wire > overlay+overlay/10 {
		t.Fatalf("%d bytes on the wire for an overlay of %d allocated bytes", wire, overlay)
	}
	tr, err := a.images.GetTemplate(ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: tmplID}))
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range tr.Msg.GetStores() {
		// p1: "clone2" left it; p2: "on-p2" and the migrated "clone2".
		want := map[string]int32{p1.GetId(): 0, p2.GetId(): 2}[r.GetStoreId()]
		if r.GetRefCount() != want {
			t.Errorf("template copy on %s: ref count %d, want %d", r.GetStoreId(), r.GetRefCount(), want)
		}
	}
}

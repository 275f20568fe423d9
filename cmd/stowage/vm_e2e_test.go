package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/agent/cachemount"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// vmKernel is the host's kernel and initramfs (Debian's linux-image-amd64
// with initramfs-tools: it mounts root=/dev/vda from virtio-blk).
func vmKernel(t *testing.T) (kernel, initrd string) {
	t.Helper()
	ks, _ := filepath.Glob("/boot/vmlinuz-*")
	for _, k := range ks {
		i := strings.Replace(k, "vmlinuz-", "initrd.img-", 1)
		if _, err := os.Stat(i); err == nil {
			return k, i
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("no /boot/vmlinuz-* with its initrd.img (scripts/test.sh installs linux-image-amd64)")
	}
	t.Skip("no kernel in /boot to boot a VM with (apt-get install linux-image-amd64)")
	return "", ""
}

// rootImage builds a qcow2 root filesystem (ext4) holding busybox and an
// /init that writes /marker (with the token from the kernel command line)
// and powers off; pad adds that many bytes of random data, so that the
// image takes a while to fetch.
func rootImage(t *testing.T, dir string, pad int) string {
	t.Helper()
	fs := filepath.Join(dir, "rootfs")
	for _, d := range []string{"bin", "proc", "sys", "dev", "run", "tmp"} {
		if err := os.MkdirAll(filepath.Join(fs, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", bb, filepath.Join(fs, "bin", "busybox")).CombinedOutput(); err != nil {
		t.Fatalf("cp busybox: %v %s", err, out)
	}
	init := `#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
tok=$(/bin/busybox sed -n 's/.*stowage.token=\([^ ]*\).*/\1/p' /proc/cmdline)
/bin/busybox echo "stowage-vm $tok" > /marker
/bin/busybox sync
/bin/busybox echo STOWAGE-GUEST-DONE
/bin/busybox poweroff -f
`
	if err := os.WriteFile(filepath.Join(fs, "init"), []byte(init), 0o755); err != nil {
		t.Fatal(err)
	}
	if pad > 0 {
		b := make([]byte, pad)
		rand.Read(b)
		if err := os.WriteFile(filepath.Join(fs, "pad"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	raw := filepath.Join(dir, "root.raw")
	run(t, "truncate", "-s", "160M", raw)
	run(t, "mkfs.ext4", "-q", "-d", fs, raw)
	qcow := filepath.Join(dir, "root.qcow2")
	run(t, "qemu-img", "convert", "-O", "qcow2", raw, qcow)
	return qcow
}

// bootVM boots qemu-system-x86_64 (TCG) from drive and waits for the guest
// to power off; it returns the token the guest must have written.
func bootVM(t *testing.T, name, drive, format string) string {
	t.Helper()
	kernel, initrd := vmKernel(t)
	token := fmt.Sprintf("%s-%d", name, time.Now().UnixNano())
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	// 768 MiB: the guest unpacks the host's initramfs, which grows with
	// the packages installed (Debian's Ceph packages took it to 34 MB, and
	// a 256 MiB guest ran out of memory unpacking it).
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", "-accel", "tcg", "-m", "768", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
		"-kernel", kernel, "-initrd", initrd, "-append", "root=/dev/vda rw console=ttyS0 init=/init panic=-1 quiet stowage.token="+token,
		"-drive", "file="+drive+",format="+format+",if=virtio,cache=none")
	out, err := cmd.CombinedOutput()
	took := time.Since(start)
	if err != nil || !strings.Contains(string(out), "STOWAGE-GUEST-DONE") {
		t.Fatalf("VM %s from %s: %v after %s:\n%s", name, drive, err, took, tail(string(out), 3000))
	}
	t.Logf("VM %s booted from %s and powered off in %s", name, drive, took.Round(time.Millisecond))
	return token
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// marker reads /marker from the root filesystem in image (any format qemu
// reads, its backing chain followed).
func marker(t *testing.T, dir, image, format string) string {
	t.Helper()
	raw := filepath.Join(dir, fmt.Sprintf("after-%d.raw", time.Now().UnixNano()))
	run(t, "qemu-img", "convert", "-U", "-f", format, "-O", "raw", image, raw)
	defer os.Remove(raw)
	out, err := exec.Command("debugfs", "-R", "cat /marker", raw).Output()
	if err != nil {
		t.Fatalf("debugfs %s: %v", raw, err)
	}
	return strings.TrimSpace(string(out))
}

// TestVMBootsFromVolumes boots a real VM (qemu-system-x86_64, TCG) whose
// root disk is (a) a linked clone volume, (b) a lazy volume on the host's
// template mount while the template is still being fetched, and (c) a
// volume attached over NBD from another agent; the guest writes a marker
// and powers off, and the test reads the marker from the volume.
func TestVMBootsFromVolumes(t *testing.T) {
	if testing.Short() {
		t.Skip("boots VMs")
	}
	needFUSE(t)
	needTools(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4", "debugfs", "busybox")
	vmKernel(t)
	root := t.TempDir()
	ctx := context.Background()
	web := filepath.Join(root, "web")
	if err := os.MkdirAll(web, 0o755); err != nil {
		t.Fatal(err)
	}
	// 96 MiB of random data in the root filesystem: the template mount
	// fetches it at 512 KiB/s in the background (the slow source), so it is
	// far from complete when the guest (which reads a few MiB) has finished.
	tmpl := rootImage(t, web, 96<<20)
	origin := httptest.NewServer(http.StripPrefix("/t/", http.FileServer(http.Dir(web))))
	defer origin.Close()

	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "controller"))
	c2 := startCache(t, "cache h2", filepath.Join(root, "c2"), "--pki-dir", filepath.Join(root, "a2", "pki"), "--prefetch-rate", "512K")
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"))
	agentProc(t, server, "h2", "z1", "c1", filepath.Join(root, "a2"), "--image-cache-socket", c2.socket)
	waitFor(t, "both hosts Up", 20*time.Second, func() bool {
		return hostState(t, server, "h1") == "HOST_STATE_UP" && hostState(t, server, "h2") == "HOST_STATE_UP"
	})
	a := newAPI(server)
	addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h1"})
	p1 := addStore(t, a, "p1", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p1"), &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h1"})
	p2 := addStore(t, a, "p2", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p2"), &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h2"})
	path := func(st *stowagev1.DataStore, rel string) string { return filepath.Join(st.GetDetails()["path"], rel) }
	r, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "busybox", Url: origin.URL + "/t/root.qcow2",
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Checksum: "sha256:" + sha256File(t, tmpl)}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, r.Msg.GetJob())
	tid := r.Msg.GetTemplate().GetId()
	create := func(name string, st *stowagev1.DataStore, strategy string, f stowagev1.ImageFormat) *stowagev1.Volume {
		t.Helper()
		cv, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: name, TemplateId: tid, StoreId: st.GetId(), Strategy: strategy, Format: f}))
		if err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		mustSucceed(t, a, cv.Msg.GetJob())
		g, _ := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: cv.Msg.GetVolume().GetId()}))
		return g.Msg.GetVolume()
	}

	t.Run("linked clone", func(t *testing.T) {
		v := create("vm-linked", p1, "linked", stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)
		file := path(p1, v.GetInstallPath())
		token := bootVM(t, "linked", file, "qcow2")
		if got := marker(t, root, file, "qcow2"); got != "stowage-vm "+token {
			t.Fatalf("marker %q, want the token of this boot", got)
		}
	})

	t.Run("lazy volume while the template is fetched", func(t *testing.T) {
		v := create("vm-lazy", p2, "lazy", stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)
		file := path(p2, v.GetInstallPath())
		token := bootVM(t, "lazy", file, "qcow2")
		st, err := cachemount.NewClient(c2.socket).GetCache(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var cached, size int64
		for _, ct := range st.GetTemplates() {
			if ct.GetId() == tid {
				cached, size = ct.GetCachedBytes(), ct.GetSize()
			}
		}
		t.Logf("when the guest had powered off, the template mount held %d of %d bytes of the template", cached, size)
		if size == 0 || cached >= size {
			t.Fatalf("the template was complete (%d of %d) before the VM finished: nothing proves it booted before the download", cached, size)
		}
		if got := marker(t, root, file, "qcow2"); got != "stowage-vm "+token {
			t.Fatalf("marker %q, want the token of this boot", got)
		}
	})

	t.Run("raw volume over NBD from another agent", func(t *testing.T) {
		v := create("vm-nbd", p1, "full", stowagev1.ImageFormat_IMAGE_FORMAT_RAW)
		g, err := a.volumes.GrantAccess(ctx, connect.NewRequest(&stowagev1.GrantAccessRequest{Id: v.GetId(), HostId: "h2"}))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(g.Msg.GetUri(), "nbd://") {
			t.Fatalf("grant to h2: %q, want nbd://", g.Msg.GetUri())
		}
		token := bootVM(t, "nbd", g.Msg.GetUri(), "raw")
		if got := marker(t, root, path(p1, v.GetInstallPath()), "raw"); got != "stowage-vm "+token {
			t.Fatalf("marker %q, want the token of this boot", got)
		}
	})
}

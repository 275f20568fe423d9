package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/hostops"
	"github.com/stowage/stowage/internal/envtest"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// TestImportDirEndToEnd: with a controller and an agent that both have
// --import-dir, a qcow2 made with qemu-img in the import directory
// registers Ready from its file:// URL (its checksum verified: a wrong one
// fails the job); /etc/shadow and a path with ".." are refused at
// registration, a symbolic link inside the import directory to a file
// outside it (or to a directory outside it) by the agent, each with the
// rule named; the image store holds nothing but the good template.
func TestImportDirEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		envtest.Skip(t, "no qemu-img")
	}
	root := t.TempDir()
	importDir := filepath.Join(root, "import")
	if err := os.Mkdir(importDir, 0o750); err != nil {
		t.Fatal(err)
	}
	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "controller"), "--import-dir", importDir)
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), "--import-dir", importDir)
	waitFor(t, "h1 Up", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	a := newAPI(server)
	ctx := context.Background()
	img := addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), &stowagev1.Scope{Zone: "z1"})

	good := filepath.Join(importDir, "good.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", good, "64M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	register := func(name, url, sum string) (*stowagev1.RegisterTemplateResponse, error) {
		r, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: name,
			Url: url, Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Checksum: sum}))
		if err != nil {
			return nil, err
		}
		return r.Msg, nil
	}

	// The good one, checksum verified, Ready.
	r, err := register("good", "file://"+good, "sha256:"+sha256File(t, good))
	if err != nil {
		t.Fatalf("register file://%s: %v", good, err)
	}
	if j := waitJob(t, a, r.GetJob()); j.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("import of %s: job %s %q", good, j.GetState(), j.GetError())
	}
	got, err := a.images.GetTemplate(ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: "good"}))
	if err != nil {
		t.Fatal(err)
	}
	if s := got.Msg.GetStores(); len(s) != 1 || s[0].GetState() != stowagev1.ObjectState_OBJECT_STATE_READY || got.Msg.GetTemplate().GetVirtualSize() != 64<<20 {
		t.Fatalf("template good: %v, want Ready on one store with 64 MiB", got.Msg)
	}

	// A checksum that does not match fails, as for http.
	r, err = register("badsum", "file://"+good, "sha256:"+strings.Repeat("0", 64))
	if err != nil {
		t.Fatalf("register with a wrong checksum: %v", err)
	}
	if j := waitJob(t, a, r.GetJob()); j.GetState() != stowagev1.JobState_JOB_STATE_FAILED || !strings.Contains(j.GetError(), "checksum") {
		t.Fatalf("wrong checksum: job %s %q, want failed naming the checksum", j.GetState(), j.GetError())
	}

	// Outside the import directory: refused at registration.
	for _, u := range []string{"file:///etc/shadow", "file://" + importDir + "/../../../etc/shadow"} {
		_, err := register("outside", u, "")
		if code(err) != connect.CodePermissionDenied || !strings.Contains(err.Error(), hostops.ImportRule) || !strings.Contains(err.Error(), importDir) {
			t.Errorf("register %s: %v, want permission_denied naming the rule and the directory", u, err)
		}
		t.Logf("%s: %v", u, err)
	}

	// Inside it lexically, but through a symbolic link: the agent refuses.
	if err := os.Symlink("/etc/shadow", filepath.Join(importDir, "shadow.qcow2")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/etc", filepath.Join(importDir, "etc")); err != nil {
		t.Fatal(err)
	}
	for name, u := range map[string]string{"linked": "file://" + importDir + "/shadow.qcow2", "linkeddir": "file://" + importDir + "/etc/shadow"} {
		r, err := register(name, u, "")
		if err != nil {
			t.Fatalf("register %s: %v (lexically beneath the import directory, for the agent to refuse)", u, err)
		}
		j := waitJob(t, a, r.GetJob())
		if j.GetState() != stowagev1.JobState_JOB_STATE_FAILED || !strings.Contains(j.GetError(), hostops.ImportRule) || !strings.Contains(j.GetError(), "symbolic link") {
			t.Errorf("%s: job %s %q, want failed naming the rule and the symbolic link", u, j.GetState(), j.GetError())
		}
		t.Logf("%s: %s", u, j.GetError())
	}

	// Nothing but the good template was written (besides the store's
	// marker and the chunk store's lock, which the orphan reconciler's
	// chunk collection takes).
	var files []string
	_ = filepath.WalkDir(img.GetDetails()["path"], func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && d.Name() != ".stowage-store" && !(d.Name() == ".lock" && filepath.Base(filepath.Dir(p)) == "chunks") {
			files = append(files, p)
		}
		return nil
	})
	if len(files) != 1 || filepath.Ext(files[0]) != ".qcow2" {
		t.Fatalf("files on the image store: %v, want the good template only", files)
	}
}

// TestImportDirDev: stowage dev creates DATA/import (0750), names it in its
// banner, and a raw image put there registers Ready from its file:// URL
// with no flag given.
func TestImportDirDev(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	data := t.TempDir()
	// Runs last: a killed dev leaves its template mount behind.
	t.Cleanup(func() { _ = unix.Unmount(filepath.Join(data, "templates"), unix.MNT_DETACH) })
	addr := freePort(t)
	server := "https://" + addr
	controllers.Store(server, filepath.Join(data, "controller"))
	p := startProc(t, "dev", "dev", "--data", data, "--listen", addr, "--agent-listen", freePort(t), "--nbd-listen", "127.0.0.1:0", "--client-config", "")
	waitFor(t, "dev banner", 30*time.Second, func() bool { return strings.Contains(p.log.String(), "Stowage dev is running") })
	importDir := filepath.Join(data, "import")
	if !strings.Contains(p.log.String(), "import directory (file:// URLs) "+importDir) {
		t.Errorf("dev banner lacks the import directory:\n%s", p.log.String())
	}
	st, err := os.Stat(importDir)
	if err != nil || !st.IsDir() || st.Mode().Perm() != 0o750 {
		t.Fatalf("dev import directory: %v %v, want a directory 0750", st, err)
	}
	raw := filepath.Join(importDir, "disk.raw")
	if err := os.WriteFile(raw, []byte(strings.Repeat("stowage", 1<<12)), 0o640); err != nil {
		t.Fatal(err)
	}
	a := newAPI(server)
	r, err := a.images.RegisterTemplate(context.Background(), connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "disk",
		Url: "file://" + raw, Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW, Checksum: "sha256:" + sha256File(t, raw)}))
	if err != nil {
		t.Fatalf("register file://%s: %v", raw, err)
	}
	if j := waitJob(t, a, r.Msg.GetJob()); j.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("dev import of %s: job %s %q", raw, j.GetState(), j.GetError())
	}
}

package agent_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/agent"
	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/agent/nbdexports"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	"github.com/stowage/stowage/internal/envtest"
)

// nbdRig runs an agent (Run, so its NBD listener is the real one) and a
// hostops.Remote to its AgentService, and returns it with a directory the
// agent accepts store roots in.
func nbdRig(t *testing.T) (*hostops.Remote, string) {
	t.Helper()
	for _, tool := range []string{"nbdinfo", "nbdcopy", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			envtest.Skipf(t, "%s is not installed: %v", tool, err)
		}
	}
	n := nbdexports.New(slog.New(slog.NewTextHandler(io.Discard, nil)))
	local := hostfs.New("h1", hostfs.WithNBDExporter(n))
	base := t.TempDir()
	a, err := agent.New(agent.Config{ControllerURL: "http://127.0.0.1:1", HostID: "h1", StateDir: t.TempDir(),
		Listen: "127.0.0.1:0", NBDListen: "127.0.0.1:0", StoreRoots: []string{base}},
		local, slog.New(slog.NewTextHandler(io.Discard, nil)), agent.WithNBD(n))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent Run: %v", err)
		}
	})
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(srv.Close)
	deadline := time.Now().Add(10 * time.Second)
	for a.NBDAddress() == "" {
		if time.Now().After(deadline) {
			t.Fatal("the agent's NBD server did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.HasPrefix(a.NBDAddress(), "127.0.0.1:") || strings.HasSuffix(a.NBDAddress(), ":0") {
		t.Fatalf("NBD address %q", a.NBDAddress())
	}
	return hostops.NewRemote("h1", srv.URL, srv.Client()), base
}

func run(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

func TestExportNBDThroughRemote(t *testing.T) {
	ep, base := nbdRig(t)
	ctx := t.Context()
	store := filepath.Join(base, "s1")
	if _, err := ep.PrepareStore(ctx, hostops.StoreRoot{ID: "s1", Path: store, Subdirs: []string{"volumes"}}); err != nil {
		t.Fatal(err)
	}
	// 8 MiB raw: 1 MiB of data, a 6 MiB hole, 1 MiB of data.
	vol := filepath.Join(store, "volumes", "v1.raw")
	data := make([]byte, 1<<20)
	_, _ = rand.Read(data)
	f, err := os.Create(vol)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, 0); err == nil {
		_, err = f.WriteAt(data, 7<<20)
	}
	if err != nil {
		t.Fatal(err)
	}
	f.Close()

	volRef := hostops.Ref{Store: "s1", Key: "volumes/v1.raw"}
	uri, err := ep.ExportNBD(ctx, hostops.NBDExportRequest{Ref: volRef, Format: drivers.FormatRaw, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	name, err := nbdexports.NameOf(string(uri))
	if err != nil || len(name) != 32 || !strings.HasPrefix(string(uri), "nbd://127.0.0.1:") {
		t.Fatalf("export URI %q: %v", uri, err)
	}
	if out, err := run(t, "nbdinfo", "--size", string(uri)); err != nil || strings.TrimSpace(out) != "8388608" {
		t.Fatalf("nbdinfo --size: %q %v", out, err)
	}
	out, err := run(t, "nbdinfo", "--map", string(uri))
	if err != nil || !strings.Contains(out, "hole,zero") || !strings.Contains(strings.Join(strings.Fields(out), " "), "1048576 6291456 3 hole,zero") {
		t.Fatalf("nbdinfo --map shows no 6 MiB hole at 1 MiB:\n%s %v", out, err)
	}
	// Names are capabilities: the default name opens nothing and the
	// export list is refused, so a grant's name cannot be discovered.
	host := strings.TrimSuffix(string(uri), "/"+name)
	if out, err := run(t, "nbdinfo", "--size", host); err == nil {
		t.Fatalf("the default export opened something: %q", out)
	}
	if out, err := run(t, "nbdinfo", "--list", host); err == nil || strings.Contains(out, name) {
		t.Fatalf("nbdinfo --list revealed the export: %q %v", out, err)
	}

	copyPath := filepath.Join(t.TempDir(), "copy.raw")
	if out, err := run(t, "nbdcopy", string(uri), copyPath); err != nil {
		t.Fatalf("nbdcopy: %s %v", out, err)
	}
	if out, err := run(t, "cmp", vol, copyPath); err != nil {
		t.Fatalf("cmp: %s %v", out, err)
	}
	if out, err := run(t, "qemu-io", "-f", "raw", "-c", "write 0 4k", string(uri)); err == nil && !strings.Contains(out, "failed") {
		t.Fatalf("write to a read-only export succeeded: %s", out)
	}
	if got, _ := os.ReadFile(vol); !bytes.Equal(got[:1<<20], data) {
		t.Fatal("the read-only export changed the volume")
	}

	// A writable export takes writes.
	rw, err := ep.ExportNBD(ctx, hostops.NBDExportRequest{Ref: volRef, Format: drivers.FormatRaw})
	if err != nil || rw == uri {
		t.Fatalf("second export: %q %v", rw, err)
	}
	if out, err := run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", "-c", "flush", string(rw)); err != nil || strings.Contains(out, "failed") {
		t.Fatalf("write to a writable export: %s %v", out, err)
	}
	if got, _ := os.ReadFile(vol); got[0] != 0x5a || got[4095] != 0x5a {
		t.Fatal("the write did not reach the volume")
	}

	// Unexport ends the export (twice is fine); the other keeps serving.
	for range 2 {
		if err := ep.UnexportNBD(ctx, uri); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := run(t, "nbdinfo", "--size", string(uri)); err == nil {
		t.Fatalf("nbdinfo after unexport succeeded: %s", out)
	}
	if out, err := run(t, "nbdinfo", "--size", string(rw)); err != nil {
		t.Fatalf("the other export stopped: %s %v", out, err)
	}
	if err := ep.UnexportNBD(ctx, rw); err != nil {
		t.Fatal(err)
	}
}

func TestExportNBDRefuses(t *testing.T) {
	ep, base := nbdRig(t)
	ctx := t.Context()
	store := filepath.Join(base, "s1")
	if _, err := ep.PrepareStore(ctx, hostops.StoreRoot{ID: "s1", Path: store, Subdirs: []string{"volumes"}}); err != nil {
		t.Fatal(err)
	}
	vol := filepath.Join(store, "volumes", "v.raw")
	if err := os.WriteFile(vol, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	outside := filepath.Join(t.TempDir(), "secret.raw")
	if err := os.WriteFile(outside, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(store, "volumes", "link.raw")); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-b", outside, "-F", "raw", filepath.Join(store, "volumes", "escape.qcow2")).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v %s", err, out)
	}
	s1 := func(key string) hostops.Ref { return hostops.Ref{Store: "s1", Key: key} }
	for _, c := range []struct {
		req  hostops.NBDExportRequest
		want error
	}{
		// A raw file declared qcow2, and a qcow2 whose backing file is outside the store.
		{hostops.NBDExportRequest{Ref: s1("volumes/v.raw"), Format: drivers.FormatQCOW2}, errdefs.ErrInvalid},
		{hostops.NBDExportRequest{Ref: s1("volumes/escape.qcow2"), Format: drivers.FormatQCOW2}, errdefs.ErrInvalid},
		{hostops.NBDExportRequest{Ref: s1("volumes/v.raw")}, errdefs.ErrInvalid},
		{hostops.NBDExportRequest{Ref: s1(vol), Format: drivers.FormatRaw}, errdefs.ErrPermissionDenied},
		{hostops.NBDExportRequest{Ref: s1("../" + filepath.Base(filepath.Dir(outside)) + "/secret.raw"), Format: drivers.FormatRaw}, errdefs.ErrPermissionDenied},
		{hostops.NBDExportRequest{Ref: s1("volumes/link.raw"), Format: drivers.FormatRaw}, errdefs.ErrPermissionDenied},
		{hostops.NBDExportRequest{Ref: s1(hostfs.MarkerFile), Format: drivers.FormatRaw}, errdefs.ErrPermissionDenied},
		{hostops.NBDExportRequest{Ref: hostops.Ref{Store: "s2", Key: "volumes/v.raw"}, Format: drivers.FormatRaw}, errdefs.ErrPermissionDenied},
		{hostops.NBDExportRequest{Ref: s1("volumes/missing.raw"), Format: drivers.FormatRaw}, errdefs.ErrNotFound},
	} {
		if uri, err := ep.ExportNBD(ctx, c.req); !errors.Is(err, c.want) {
			t.Errorf("ExportNBD(%+v) = %q, %v; want %v", c.req, uri, err, c.want)
		}
	}
	if err := ep.UnexportNBD(ctx, "http://x/exports/00"); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("UnexportNBD of a non-NBD URI: %v", err)
	}
	if err := ep.UnexportNBD(ctx, "nbd://127.0.0.1:1/00112233445566778899aabbccddeeff"); err != nil {
		t.Errorf("UnexportNBD of an unknown export: %v", err)
	}
}

// TestExportNBDTTLThroughRemote: the TTL travels in the task to the agent;
// past it the export does not open.
func TestExportNBDTTLThroughRemote(t *testing.T) {
	ep, base := nbdRig(t)
	ctx := t.Context()
	store := filepath.Join(base, "s1")
	if _, err := ep.PrepareStore(ctx, hostops.StoreRoot{ID: "s1", Path: store, Subdirs: []string{"volumes"}}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(store, "volumes", "v1.raw"), make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	uri, err := ep.ExportNBD(ctx, hostops.NBDExportRequest{Ref: hostops.Ref{Store: "s1", Key: "volumes/v1.raw"}, Format: drivers.FormatRaw, ReadOnly: true, TTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if out, err := run(t, "nbdinfo", "--size", string(uri)); err != nil {
		t.Fatalf("nbdinfo before expiry: %v %s", err, out)
	}
	time.Sleep(1100 * time.Millisecond)
	if out, err := run(t, "nbdinfo", "--size", string(uri)); err == nil {
		t.Fatalf("nbdinfo after expiry succeeded: %s", out)
	}
}

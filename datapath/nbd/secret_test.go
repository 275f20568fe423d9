package nbd

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stowage/stowage/internal/envtest"
)

// With SecretNames, a client must know an export's name: listing is refused
// and the empty name does not fall back to the only export.
func TestSecretNames(t *testing.T) {
	if _, err := exec.LookPath("nbdinfo"); err != nil {
		envtest.Skip(t, "nbdinfo not installed")
	}
	dir := t.TempDir()
	f := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(f, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	srv := NewServer(ServerOptions{SecretNames: true})
	if err := srv.AddExport("0123456789abcdef", f, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.Serve(ctx, ln)
	base := "nbd+unix://"
	if out, err := exec.Command("nbdinfo", "--list", base+"?socket="+sock).CombinedOutput(); err == nil || strings.Contains(string(out), "0123456789abcdef") {
		t.Fatalf("list: %s %v", out, err)
	}
	if out, err := exec.Command("nbdinfo", "--size", base+"?socket="+sock).CombinedOutput(); err == nil {
		t.Fatalf("the empty name opened the only export: %s", out)
	}
	out, err := exec.Command("nbdinfo", "--size", base+"/0123456789abcdef?socket="+sock).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "1048576" {
		t.Fatalf("the named export: %s %v", out, err)
	}
}

package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/internal/envtest"
)

// TestNBDTLSEndToEnd grants a volume over NBD from an agent that requires
// TLS and reads it with nbdinfo and nbdcopy over nbds:// with the
// controller's CA and a host's certificate; plaintext to the same export
// is refused.
func TestNBDTLSEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	for _, bin := range []string{"nbdinfo", "nbdcopy"} {
		if _, err := exec.LookPath(bin); err != nil {
			envtest.Skipf(t, "%s not installed (libnbd-bin)", bin)
		}
	}
	root := t.TempDir()
	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "ctl"))
	nbdAddr := freePort(t)
	h1 := agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), "--nbd-tls", "require", "--nbd-listen", nbdAddr)
	agentProc(t, server, "h2", "z1", "c1", filepath.Join(root, "a2"))
	waitFor(t, "h1 and h2 Up", 20*time.Second, func() bool {
		return hostState(t, server, "h1") == "HOST_STATE_UP" && hostState(t, server, "h2") == "HOST_STATE_UP"
	})
	p1 := filepath.Join(root, "p1")
	if _, errOut, code := cli(t, server, "store", "add", "--name", "p1", "--role", "primary", "--provider", "filesystem",
		"--url", "file://"+p1, "--scope", "z1/c1/h1"); code != 0 {
		t.Fatalf("store add: %s", errOut)
	}
	if _, errOut, code := cli(t, server, "volume", "create", "--name", "v1", "--size", "8M", "--format", "raw", "--store", "p1", "--wait"); code != 0 {
		t.Fatalf("volume create: %s", errOut)
	}
	var grant struct {
		URI string `json:"uri"`
	}
	cliJSON(t, server, &grant, "volume", "access", "v1", "--host", "h2")
	if !strings.HasPrefix(grant.URI, "nbds://127.0.0.1:") {
		t.Fatalf("grant to h2 from an agent requiring TLS: %q, want nbds://", grant.URI)
	}

	tlsDir := libnbdTLSDir(t, root, server, "a2")
	tlsURI := grant.URI + "?tls-certificates=" + tlsDir
	out, err := exec.Command("nbdinfo", "--size", tlsURI).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "8388608" {
		t.Fatalf("nbdinfo over TLS: %v: %s", err, out)
	}
	copied := filepath.Join(root, "copied.raw")
	if out, err := exec.Command("nbdcopy", tlsURI, copied).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy over TLS: %v: %s", err, out)
	}
	if fi, err := os.Stat(copied); err != nil || fi.Size() != 8<<20 {
		t.Fatalf("nbdcopy result: %v %v", fi, err)
	}
	plain := "nbd://" + strings.TrimPrefix(grant.URI, "nbds://")
	if out, err := exec.Command("nbdinfo", "--size", plain).CombinedOutput(); err == nil {
		t.Fatalf("plaintext NBD to a TLS-required export answered: %s", out)
	}

	// The grant survives an agent restart (kill -9): the same URI reads again.
	h1.kill(9)
	again := agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), "--nbd-tls", "require", "--nbd-listen", nbdAddr)
	waitFor(t, "the restarted h1 serving NBD", 20*time.Second, func() bool { return strings.Contains(again.log.String(), "NBD server listening") })
	out, err = exec.Command("nbdinfo", "--size", tlsURI).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "8388608" {
		t.Fatalf("nbdinfo after the agent restarted: %v: %s", err, out)
	}
	waitFor(t, "h1 Up again", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	// Revoked, it is gone.
	if _, errOut, code := cli(t, server, "volume", "access", "v1", "--host", "h2", "--revoke"); code != 0 {
		t.Fatalf("revoke: %s", errOut)
	}
	if out, err := exec.Command("nbdinfo", "--size", tlsURI).CombinedOutput(); err == nil {
		t.Fatalf("a revoked grant still answers: %s", out)
	}
}

// libnbdTLSDir writes root/tls, libnbd's certificate directory for the
// host whose agent state is root/agentDir: the controller's CA, and the
// host's certificate and key (nbds://…?tls-certificates=DIR).
func libnbdTLSDir(t *testing.T, root, server, agentDir string) string {
	t.Helper()
	tlsDir := filepath.Join(root, "tls")
	if err := os.Mkdir(tlsDir, 0o700); err != nil {
		t.Fatal(err)
	}
	for src, dst := range map[string]string{
		caFile(server): "ca-cert.pem",
		filepath.Join(root, agentDir, "pki", "host.crt"): "client-cert.pem",
		filepath.Join(root, agentDir, "pki", "host.key"): "client-key.pem",
	} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(tlsDir, dst), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return tlsDir
}

package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/trust"
)

// runAgentOnce runs an agent that is expected to fail to enrol and returns
// its output and exit code.
func runAgentOnce(t *testing.T, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, stowageBin, append([]string{"agent", "--listen", freePort(t), "--nbd-listen", ""}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("agent %v did not exit: %s", args, out.String())
	}
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	}
	return out.String(), code
}

// hostCert reads the certificate an agent keeps in its state directory.
func hostCert(t *testing.T, stateDir string) *trust.KeyPair {
	t.Helper()
	kp, _, err := trust.LoadKeyPair(filepath.Join(stateDir, "pki"))
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

// TestAgentTrustEndToEnd checks enrolment and mutual TLS between real
// processes: joins with valid, used, expired and mis-pinned tokens; a
// second agent claiming an enrolled host id; a certificate of one host
// calling as another; a client without a certificate at an agent; and
// certificates renewed while everything runs.
func TestAgentTrustEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	root := t.TempDir()
	addr := freePort(t)
	server := "https://" + addr
	// Certificates live 9 s: they renew every 6 s during the test.
	controllerProc(t, addr, filepath.Join(root, "ctl"), "--cert-ttl", "9s")
	h1Addr := freePort(t)
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), "--listen", h1Addr)
	agentProc(t, server, "h2", "z1", "c1", filepath.Join(root, "a2"))
	waitFor(t, "h1 and h2 Up", 20*time.Second, func() bool {
		return hostState(t, server, "h1") == "HOST_STATE_UP" && hostState(t, server, "h2") == "HOST_STATE_UP"
	})
	if fi, err := os.Stat(filepath.Join(root, "a1", "pki", trust.KeyFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("h1's key file: %v %v", fi, err)
	}
	firstSerial := hostCert(t, filepath.Join(root, "a1")).Leaf().SerialNumber

	t.Run("no certificate at an agent: TLS handshake failure", func(t *testing.T) {
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: trustPool(t, server)}}} // presents nothing
		_, err := c.Post("https://"+h1Addr+"/stowage.v1.AgentService/GetTask", "application/json", strings.NewReader(`{"taskId":"x"}`))
		if err == nil || !strings.Contains(err.Error(), "certificate required") {
			t.Fatalf("call without a certificate: %v, want a handshake failure (certificate required)", err)
		}
	})

	t.Run("a host's certificate at another agent's RPC", func(t *testing.T) {
		h2 := hostCert(t, filepath.Join(root, "a2"))
		pool := trustPool(t, server)
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, GetClientCertificate: h2.GetClientCertificate}}}
		_, err := stowagev1connect.NewAgentServiceClient(c, "https://"+h1Addr).GetTask(context.Background(), connect.NewRequest(&stowagev1.GetTaskRequest{TaskId: "x"}))
		if connect.CodeOf(err) != connect.CodePermissionDenied {
			t.Fatalf("h2 calling h1's AgentService: %v, want permission_denied", err)
		}
	})

	t.Run("a host's certificate registering as another host", func(t *testing.T) {
		h2 := hostCert(t, filepath.Join(root, "a2"))
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: trust.ClientConfig(h2, trustPool(t, server), trust.Is(trust.Controller))}}
		ctl := stowagev1connect.NewAgentControlServiceClient(c, server)
		_, err := ctl.Register(context.Background(), connect.NewRequest(&stowagev1.RegisterRequest{HostId: "h1", AgentUrl: "https://127.0.0.1:1", SessionId: "forged"}))
		if connect.CodeOf(err) != connect.CodePermissionDenied {
			t.Fatalf("h2's certificate registering as h1: %v, want permission_denied", err)
		}
		_, err = ctl.Heartbeat(context.Background(), connect.NewRequest(&stowagev1.HeartbeatRequest{HostId: "h1", SessionId: "forged"}))
		if connect.CodeOf(err) != connect.CodePermissionDenied {
			t.Fatalf("h2's certificate heartbeating as h1: %v, want permission_denied", err)
		}
		// Without a certificate: unauthenticated.
		anon := stowagev1connect.NewAgentControlServiceClient(testClient(t, server), server)
		_, err = anon.Register(context.Background(), connect.NewRequest(&stowagev1.RegisterRequest{HostId: "h1", AgentUrl: "https://127.0.0.1:1", SessionId: "forged"}))
		if connect.CodeOf(err) != connect.CodeUnauthenticated {
			t.Fatalf("registering without a certificate: %v, want unauthenticated", err)
		}
		if hostState(t, server, "h1") != "HOST_STATE_UP" {
			t.Fatal("h1 is no longer Up after the forged calls")
		}
	})

	t.Run("a second agent claiming an enrolled host id", func(t *testing.T) {
		tok, pin := joinToken(t, server, "", time.Minute) // not bound to h1
		out, code := runAgentOnce(t, "--controller", server, "--host-id", "h1", "--state-dir", filepath.Join(root, "impostor"),
			"--join-token", tok, "--ca-pin", pin)
		if code == 0 || !strings.Contains(out, "enrolled already") || !strings.Contains(out, "permission denied") {
			t.Fatalf("impostor h1: exit %d:\n%s", code, out)
		}
		if strings.Contains(out, tok) {
			t.Fatal("the agent logged its join token")
		}
	})

	t.Run("expired token", func(t *testing.T) {
		tok, pin := joinToken(t, server, "h3", time.Second)
		time.Sleep(1500 * time.Millisecond)
		out, code := runAgentOnce(t, "--controller", server, "--host-id", "h3", "--state-dir", filepath.Join(root, "a3"),
			"--join-token", tok, "--ca-pin", pin)
		if code == 0 || !strings.Contains(out, "expired") || !strings.Contains(out, "unauthenticated") {
			t.Fatalf("expired token: exit %d:\n%s", code, out)
		}
	})

	t.Run("wrong CA pin: the token is never sent", func(t *testing.T) {
		tok, pin := joinToken(t, server, "h4", time.Minute)
		wrong := "sha256:" + strings.Repeat("0", 64)
		out, code := runAgentOnce(t, "--controller", server, "--host-id", "h4", "--state-dir", filepath.Join(root, "a4"),
			"--join-token", tok, "--ca-pin", wrong)
		if code == 0 || !strings.Contains(out, "no CA with pin") {
			t.Fatalf("wrong pin: exit %d:\n%s", code, out)
		}
		// The token was not used: the same token joins with the right pin.
		p := startProc(t, "agent h4", "agent", "--controller", server, "--host-id", "h4", "--listen", freePort(t), "--nbd-listen", "",
			"--state-dir", filepath.Join(root, "a4"), "--store-roots", root, "--join-token", tok, "--ca-pin", pin)
		waitFor(t, "h4 Up", 20*time.Second, func() bool { return hostState(t, server, "h4") == "HOST_STATE_UP" })
		// A used token does not admit a second join.
		out, code = runAgentOnce(t, "--controller", server, "--host-id", "h5", "--state-dir", filepath.Join(root, "a5"),
			"--join-token", tok, "--ca-pin", pin)
		if code == 0 || !strings.Contains(out, "unknown or already used") {
			t.Fatalf("reused token: exit %d:\n%s", code, out)
		}
		p.kill(9)
	})

	t.Run("certificates renew without a restart", func(t *testing.T) {
		waitFor(t, "h1's certificate renewed", 20*time.Second, func() bool {
			kp, _, err := trust.LoadKeyPair(filepath.Join(root, "a1", "pki"))
			return err == nil && kp.Leaf().SerialNumber.Cmp(firstSerial) != 0
		})
		// Past the first certificates' expiry, the controller still runs
		// steps on h1 (new handshakes both ways) and h1 heartbeats.
		time.Sleep(4 * time.Second)
		dir := filepath.Join(root, "rotated")
		if out, errOut, code := cli(t, server, "store", "add", "--name", "rot", "--role", "primary", "--provider", "filesystem",
			"--url", "file://"+dir, "--scope", "z1/c1/h1"); code != 0 {
			t.Fatalf("store add after renewal: %s %s", out, errOut)
		}
		waitFor(t, "store rot Up after renewal", 20*time.Second, func() bool {
			for _, s := range listStores(t, server) {
				if s.Name == "rot" && s.State == "STORE_STATE_UP" {
					return true
				}
			}
			return false
		})
		if hostState(t, server, "h1") != "HOST_STATE_UP" {
			t.Fatal("h1 is not Up after its certificate was renewed")
		}
	})
}

// trustPool is the CA pool of the controller at server.
func trustPool(t *testing.T, server string) *x509.CertPool {
	t.Helper()
	data, err := os.ReadFile(caFile(server))
	if err != nil {
		t.Fatal(err)
	}
	ca, err := trust.ParseCertificate(data)
	if err != nil {
		t.Fatal(err)
	}
	return trust.Pool(ca)
}

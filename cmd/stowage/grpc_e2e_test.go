package main

// gRPC server reflection and the gRPC health protocol, checked with the
// clients operators use, run as separate processes: grpc_health_probe
// (github.com/grpc-ecosystem/grpc-health-probe) and grpcurl
// (github.com/fullstorydev/grpcurl), both pinned and installed by
// scripts/test.sh.

import (
	"go/build"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/trust"
)

// goTool finds a Go tool the tests run: on PATH or in $(go env GOPATH)/bin.
func goTool(t *testing.T, name string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, dir := range filepath.SplitList(build.Default.GOPATH) {
		p := filepath.Join(dir, "bin", name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	t.Fatalf("%s is required (scripts/test.sh installs it with go install)", name)
	return ""
}

// runTool runs a client and returns its stdout, stderr and exit code.
func runTool(t *testing.T, bin string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("%s: %v", filepath.Base(bin), err)
		}
		code = ee.ExitCode()
	}
	return out.String(), errOut.String(), code
}

func TestGRPCReflectionAndHealthEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test starts processes")
	}
	probe, grpcurl := goTool(t, "grpc-health-probe"), goTool(t, "grpcurl")
	root := t.TempDir()
	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "ctl"))
	ca := caFile(server)

	// Health: no token, the controller's CA, its certificate's name.
	ctlProbe := []string{"-addr", addr, "-tls", "-tls-ca-cert", ca, "-tls-server-name", "localhost", "-connect-timeout", "5s", "-rpc-timeout", "5s"}
	for _, svc := range []string{"", "stowage.v1.StoreService", "stowage.v1.VolumeService"} {
		out, errOut, code := runTool(t, probe, append(ctlProbe, "-service", svc)...)
		if code != 0 || !strings.Contains(out+errOut, "SERVING") {
			t.Fatalf("grpc_health_probe -service %q: exit %d: %s%s", svc, code, out, errOut)
		}
	}
	if out, errOut, code := runTool(t, probe, append(ctlProbe, "-service", "stowage.v1.NoSuchService")...); code == 0 {
		t.Fatalf("grpc_health_probe of an unknown service: exit 0: %s%s", out, errOut)
	}

	// Reflection needs a token of the API (reader or higher). A store
	// (which needs a host in its zone) for ListStores to show.
	agentAddr := freePort(t)
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), "--listen", agentAddr)
	waitFor(t, "h1 Up", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	if _, _, code := cli(t, server, "store", "add", "--name", "p1", "--role", "primary", "--provider", "filesystem",
		"--url", "file://"+filepath.Join(root, "p1"), "--scope", "z1"); code != 0 {
		t.Fatal("store add failed")
	}
	var tok struct {
		Secret string `json:"secret"`
	}
	cliJSON(t, server, &tok, "token", "create", "--name", "grpcurl", "--role", "reader")
	ctlCurl := []string{"-cacert", ca, "-servername", "localhost", "-max-time", "10"}
	if out, errOut, code := runTool(t, grpcurl, append(ctlCurl, addr, "list")...); code == 0 || !strings.Contains(errOut, "Unauthenticated") {
		t.Fatalf("grpcurl list without a token: exit %d: %s%s", code, out, errOut)
	}
	withToken := append(ctlCurl, "-H", "authorization: Bearer "+tok.Secret)
	out, errOut, code := runTool(t, grpcurl, append(withToken, addr, "list")...)
	if code != 0 {
		t.Fatalf("grpcurl list: exit %d: %s", code, errOut)
	}
	for _, svc := range []string{"stowage.v1.StoreService", "stowage.v1.VolumeService", "stowage.v1.JobService", "stowage.v1.TokenService", "grpc.health.v1.Health"} {
		if !strings.Contains(out, svc+"\n") {
			t.Errorf("grpcurl list: no %s in\n%s", svc, out)
		}
	}
	if out, errOut, code := runTool(t, grpcurl, append(withToken, addr, "describe", "stowage.v1.StoreService.ListStores")...); code != 0 || !strings.Contains(out, "ListStoresRequest") {
		t.Errorf("grpcurl describe: exit %d: %s%s", code, out, errOut)
	}
	out, errOut, code = runTool(t, grpcurl, append(withToken, "-d", `{"pageSize": 10}`, addr, "stowage.v1.StoreService/ListStores")...)
	if code != 0 || !strings.Contains(out, `"name": "p1"`) {
		t.Fatalf("grpcurl ListStores: exit %d: %s%s", code, out, errOut)
	}
	// The API's roles hold for grpcurl's calls too: a reader cannot write.
	if out, errOut, code := runTool(t, grpcurl, append(withToken, "-d", `{"id": "p1"}`, addr, "stowage.v1.StoreService/DeleteStore")...); code == 0 || !strings.Contains(errOut, "PermissionDenied") {
		t.Fatalf("grpcurl DeleteStore as a reader: exit %d: %s%s", code, out, errOut)
	}

	// The agent: mutual TLS with a certificate of the controller's CA.
	pki, err := trust.LoadOrCreateCA(filepath.Join(controllerDir(server), "pki"))
	if err != nil {
		t.Fatal(err)
	}
	certs := map[string]trust.Identity{"ctl": trust.Controller, "host": trust.HostIdentity("h9")}
	for dir, id := range certs {
		kp, err := trust.NewIssued(pki, trust.Request{Identity: id, TTL: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		if err := kp.Store(filepath.Join(root, dir), pki.PEM()); err != nil {
			t.Fatal(err)
		}
	}
	cert := func(dir string) (string, string) {
		return filepath.Join(root, dir, trust.CertFile), filepath.Join(root, dir, trust.KeyFile)
	}
	ctlCert, ctlKey := cert("ctl")
	agentProbe := []string{"-addr", agentAddr, "-tls", "-tls-ca-cert", ca, "-connect-timeout", "5s", "-rpc-timeout", "5s"}
	for _, svc := range []string{"", "stowage.v1.AgentService"} {
		out, errOut, code := runTool(t, probe, append(agentProbe, "-tls-client-cert", ctlCert, "-tls-client-key", ctlKey, "-service", svc)...)
		if code != 0 || !strings.Contains(out+errOut, "SERVING") {
			t.Fatalf("grpc_health_probe of the agent -service %q: exit %d: %s%s", svc, code, out, errOut)
		}
	}
	// Any enrolled peer may ask the agent's health; nobody without a certificate.
	hostCert, hostKey := cert("host")
	if out, errOut, code := runTool(t, probe, append(agentProbe, "-tls-client-cert", hostCert, "-tls-client-key", hostKey)...); code != 0 {
		t.Fatalf("grpc_health_probe of the agent with a host certificate: exit %d: %s%s", code, out, errOut)
	}
	if out, errOut, code := runTool(t, probe, agentProbe...); code == 0 {
		t.Fatalf("grpc_health_probe of the agent without a client certificate: exit 0: %s%s", out, errOut)
	}
	// Reflection on the agent answers the controller only, like AgentService.
	agentCurl := []string{"-cacert", ca, "-max-time", "10"}
	out, errOut, code = runTool(t, grpcurl, append(agentCurl, "-cert", ctlCert, "-key", ctlKey, agentAddr, "list")...)
	if code != 0 || !strings.Contains(out, "stowage.v1.AgentService\n") {
		t.Fatalf("grpcurl list on the agent: exit %d: %s%s", code, out, errOut)
	}
	if out, errOut, code := runTool(t, grpcurl, append(agentCurl, "-cert", hostCert, "-key", hostKey, agentAddr, "list")...); code == 0 || !strings.Contains(errOut, "PermissionDenied") {
		t.Fatalf("grpcurl list on the agent with a host certificate: exit %d: %s%s", code, out, errOut)
	}
}

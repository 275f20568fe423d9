package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// cliAs runs a client command against server with token (and the
// controller's CA), never the admin configuration.
func cliAs(t *testing.T, server, token string, args ...string) (string, string, int) {
	t.Helper()
	return runStowage(t, append(os.Environ(), "STOWAGE_CONFIG=/nonexistent/stowage-test-config", "STOWAGE_CA_FILE="+caFile(server), "STOWAGE_TOKEN="+token),
		append(args, "--server", server)...)
}

// TestAPIAuthEndToEnd checks the API's tokens and roles between real
// processes: a call without a token, with a wrong one, a reader creating a
// volume, an operator deleting a store, /metrics and /healthz, and that no
// secret reaches a log.
func TestAPIAuthEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	root := t.TempDir()
	addr := freePort(t)
	server := "https://" + addr
	ctl := controllerProc(t, addr, filepath.Join(root, "ctl"))
	ag := agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"))
	waitFor(t, "h1 Up", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	if fi, err := os.Stat(filepath.Join(root, "ctl", "admin.json")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin.json: %v %v", fi, err)
	}
	if _, _, code := cli(t, server, "store", "add", "--name", "p1", "--role", "primary", "--provider", "filesystem",
		"--url", "file://"+filepath.Join(root, "p1"), "--scope", "z1"); code != 0 {
		t.Fatal("admin: store add failed")
	}
	token := func(role string) string {
		var resp struct {
			Secret string `json:"secret"`
		}
		cliJSON(t, server, &resp, "token", "create", "--name", role+"-1", "--role", role)
		if !strings.HasPrefix(resp.Secret, "stw_") {
			t.Fatalf("token create: %+v", resp)
		}
		return resp.Secret
	}
	reader, operator := token("reader"), token("operator")

	// No token and a wrong token: unauthenticated, at curl and at the CLI.
	code, body := exec.Command("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", caFile(server),
		"-H", "Content-Type: application/json", "-d", "{}", server+"/stowage.v1.StoreService/ListStores").Output()
	if string(code) != "401" || body != nil {
		t.Fatalf("ListStores without a token: HTTP %s %v", code, body)
	}
	wrong := operator[:len(operator)-4] + "AAAA"
	if wrong == operator {
		wrong = operator[:len(operator)-4] + "BBBB"
	}
	if _, errOut, rc := cliAs(t, server, wrong, "volume", "list"); rc == 0 || !strings.Contains(errOut, "unauthenticated") {
		t.Fatalf("wrong token: exit %d %s", rc, errOut)
	}
	if _, errOut, rc := cliAs(t, server, "", "volume", "list"); rc == 0 || !strings.Contains(errOut, "unauthenticated") {
		t.Fatalf("no token: exit %d %s", rc, errOut)
	}

	// A reader reads and cannot create.
	if _, errOut, rc := cliAs(t, server, reader, "volume", "list"); rc != 0 {
		t.Fatalf("reader: volume list: %s", errOut)
	}
	if _, errOut, rc := cliAs(t, server, reader, "volume", "create", "--name", "v1", "--size", "1M", "--wait"); rc == 0 || !strings.Contains(errOut, "permission denied") {
		t.Fatalf("reader: volume create: exit %d %s", rc, errOut)
	}
	// An operator creates volumes and cannot delete a store (nor make tokens).
	if _, errOut, rc := cliAs(t, server, operator, "volume", "create", "--name", "v1", "--size", "1M", "--wait"); rc != 0 {
		t.Fatalf("operator: volume create: %s", errOut)
	}
	if _, errOut, rc := cliAs(t, server, operator, "store", "delete", "p1"); rc == 0 || !strings.Contains(errOut, "permission denied") {
		t.Fatalf("operator: store delete: exit %d %s", rc, errOut)
	}
	if _, errOut, rc := cliAs(t, server, operator, "token", "create", "--name", "x", "--role", "admin"); rc == 0 || !strings.Contains(errOut, "permission denied") {
		t.Fatalf("operator: token create: exit %d %s", rc, errOut)
	}
	if _, errOut, rc := cliAs(t, server, operator, "host", "token", "create"); rc == 0 || !strings.Contains(errOut, "permission denied") {
		t.Fatalf("operator: host token create: exit %d %s", rc, errOut)
	}
	// The job records who asked.
	var vols struct {
		Volumes []struct {
			Name string `json:"name"`
		} `json:"volumes"`
	}
	out, _, _ := cliAs(t, server, reader, "volume", "list", "-o", "json")
	if err := json.Unmarshal([]byte(out), &vols); err != nil || len(vols.Volumes) != 1 {
		t.Fatalf("volume list: %v %s", err, out)
	}
	jobs, _, _ := cliAs(t, server, reader, "job", "list", "-o", "json")
	if !strings.Contains(jobs, "operator-1") {
		t.Fatalf("the job does not name its caller: %s", jobs)
	}

	// /metrics needs a reader token; /healthz is open.
	for _, c := range []struct {
		path, token, want string
	}{{"/metrics", "", "401"}, {"/metrics", reader, "200"}, {"/healthz", "", "200"}} {
		args := []string{"-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", caFile(server)}
		if c.token != "" {
			args = append(args, "-H", "Authorization: Bearer "+c.token)
		}
		got, _ := exec.Command("curl", append(args, server+c.path)...).Output()
		if string(got) != c.want {
			t.Errorf("GET %s (token %v): HTTP %s, want %s", c.path, c.token != "", got, c.want)
		}
	}

	// Refusals are logged with who and what, never a secret.
	logs := ctl.log.String() + ag.log.String()
	if !strings.Contains(logs, "reader-1") || !strings.Contains(logs, "CreateVolume") {
		t.Errorf("the controller's log does not say who was refused what")
	}
	for _, tok := range []string{reader, operator, wrong} {
		if secret := tok[strings.IndexByte(tok, '.')+1:]; strings.Contains(logs, secret) {
			t.Errorf("a token secret is in the logs")
		}
	}
}

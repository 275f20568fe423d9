package main

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestDevCommand runs `stowage dev` as a newcomer would and checks that it
// comes up with one Up host and two Up stores, says where things are, and
// picks up its state again after a restart.
func TestDevCommand(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	data := t.TempDir()
	// Runs last: a killed dev leaves its template mount behind.
	t.Cleanup(func() { _ = unix.Unmount(filepath.Join(data, "templates"), unix.MNT_DETACH) })
	addr := freePort(t)
	server := "https://" + addr
	controllers.Store(server, filepath.Join(data, "controller"))
	clientCfg := filepath.Join(data, "client.json")
	start := func() *proc {
		p := startProc(t, "dev", "dev", "--data", data, "--listen", addr, "--agent-listen", freePort(t), "--nbd-listen", "127.0.0.1:0", "--client-config", clientCfg)
		waitFor(t, "dev banner", 30*time.Second, func() bool { return strings.Contains(p.log.String(), "Stowage dev is running") })
		return p
	}
	p := start()
	for _, want := range []string{server, filepath.Join(data, "primary"), filepath.Join(data, "images"), "stowage store list"} {
		if !strings.Contains(p.log.String(), want) {
			t.Errorf("dev banner lacks %q:\n%s", want, p.log.String())
		}
	}
	if canMountFUSE() {
		if !strings.Contains(p.log.String(), "template mount (lazy volumes)   "+filepath.Join(data, "templates")) {
			t.Errorf("dev banner lacks the template mount:\n%s", p.log.String())
		}
		waitFor(t, "dev host reports its template mount", 10*time.Second, func() bool {
			return hostCaps(t, server, "dev-host").GetTemplateCache().GetMount() == filepath.Join(data, "templates")
		})
	}
	// The CLI reaches dev with the configuration dev wrote: no flags.
	if fi, err := os.Stat(clientCfg); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("dev's client configuration: %v %v", fi, err)
	}
	cmd := exec.Command(stowageBin, "store", "list")
	cmd.Env = append(os.Environ(), "STOWAGE_CONFIG="+clientCfg)
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "primary") {
		t.Fatalf("stowage store list with dev's configuration: %v\n%s", err, out)
	}
	stores := listStores(t, server)
	if len(stores) != 2 {
		t.Fatalf("dev: %d stores, want 2", len(stores))
	}
	for _, s := range stores {
		if s.State != "STORE_STATE_UP" || len(s.HostIDs) != 1 || s.HostIDs[0] != "dev-host" {
			t.Errorf("dev store %+v", s)
		}
	}
	if st := hostState(t, server, "dev-host"); st != "HOST_STATE_UP" {
		t.Errorf("dev host is %s", st)
	}
	p.kill(syscall.SIGTERM)
	start()
	if again := listStores(t, server); len(again) != 2 || again[0].ID != stores[0].ID && again[0].ID != stores[1].ID {
		t.Fatalf("dev restart: stores %+v, want the same two", again)
	}
}

// TestAgentNotifiesSystemd checks READY=1 reaches NOTIFY_SOCKET once the
// agent has registered (Type=notify units depend on it).
func TestAgentNotifiesSystemd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(dir, "ctl"))
	token, pin := joinToken(t, server, "n1", time.Minute)
	cmd := exec.Command(stowageBin, "agent", "--controller", server, "--host-id", "n1", "--listen", freePort(t), "--nbd-listen", "127.0.0.1:0", "--state-dir", filepath.Join(dir, "a"),
		"--join-token", token, "--ca-pin", pin)
	cmd.Env = append(cmd.Environ(), "NOTIFY_SOCKET="+sock)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	_ = conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 4096)
	n, _, err := conn.ReadFromUnix(buf)
	if err != nil {
		t.Fatalf("no sd_notify datagram: %v", err)
	}
	msg := string(buf[:n])
	sc := bufio.NewScanner(strings.NewReader(msg))
	ready := false
	for sc.Scan() {
		ready = ready || sc.Text() == "READY=1"
	}
	if !ready || !strings.Contains(msg, "registered as host n1") {
		t.Fatalf("sd_notify message %q", msg)
	}
	if st := hostState(t, server, "n1"); st != "HOST_STATE_UP" {
		t.Fatalf("READY sent but host is %s", st)
	}
}

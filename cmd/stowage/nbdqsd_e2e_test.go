package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stowage/stowage/internal/envtest"
)

// TestNBDServeQcow2 serves a qcow2 linked clone with `stowage nbd serve
// --format qcow2` (through qemu-storage-daemon): nbdcopy of the export is
// the guest view of the chain, a FUA write lands in the clone, SIGTERM
// stops the daemon cleanly.
func TestNBDServeQcow2(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	for _, bin := range []string{"qemu-storage-daemon", "qemu-img", "qemu-io", "nbdinfo", "nbdcopy"} {
		if _, err := exec.LookPath(bin); err != nil {
			envtest.Skipf(t, "%s not installed", bin)
		}
	}
	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	dir := t.TempDir()
	base, clone := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "clone.qcow2")
	run("qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
	run("qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 2M", "-c", "write -P 0xbb 8M 1M", base)
	run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", clone)
	run("qemu-io", "-f", "qcow2", "-c", "write -P 0xcc 1M 2M", clone)

	sock := filepath.Join(dir, "nbd.sock")
	uri := "nbd+unix:///?socket=" + sock
	srv := startProc(t, "nbd serve qcow2", "nbd", "serve", "--unix", sock, "--format", "qcow2", clone)
	waitFor(t, "nbd serve --format qcow2", 20*time.Second, func() bool {
		return exec.Command("nbdinfo", "--size", uri).Run() == nil
	})
	if size := strings.TrimSpace(run("nbdinfo", "--size", uri)); size != "16777216" {
		t.Errorf("export size %s, want the guest's 16777216", size)
	}
	if m := run("nbdinfo", "--list", "--content", uri); !strings.Contains(m, "qemu:allocation-depth") || !strings.Contains(m, "base:allocation") {
		t.Errorf("meta contexts:\n%s", m)
	}
	out := filepath.Join(dir, "out.raw")
	run("nbdcopy", uri, out)
	run("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", out, clone) // -U: the export holds the write lock
	run("qemu-io", "-f", "raw", "-c", "write -f -P 0xdd 12M 64K", uri)

	srv.kill(syscall.SIGTERM)
	if code := srv.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("nbd serve exit %d after SIGTERM:\n%s", code, srv.log.String())
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
	run("qemu-io", "-f", "qcow2", "-c", "read -P 0xdd 12M 64K", "-c", "read -P 0xcc 1M 2M", "-c", "read -P 0xbb 8M 1M", clone)
	run("qemu-img", "check", "-q", clone)

	// A killed nbd serve takes its daemon with it (the parent-death signal).
	srv = startProc(t, "nbd serve qcow2 (killed)", "nbd", "serve", "--unix", sock, "--read-only", "--format", "qcow2", "--qcow2-server", "qemu", clone)
	var pid int
	waitFor(t, "nbd serve's daemon pid", 20*time.Second, func() bool {
		_, after, ok := strings.Cut(srv.log.String(), "qemu_storage_daemon_pid=")
		if ok {
			pid, _ = strconv.Atoi(strings.Fields(after)[0])
		}
		return pid > 0
	})
	srv.kill(syscall.SIGKILL)
	waitFor(t, "the daemon gone with its parent", 10*time.Second, func() bool {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		return err != nil || strings.Contains(string(b), ") Z ")
	})

	// On --listen: Stowage's server in front of the daemon (writable), or
	// its own qcow2 reader (read-only), as the agent serves grants.
	for _, extra := range [][]string{nil, {"--read-only"}, {"--read-only", "--qcow2-server", "qemu"}} {
		addr := freePort(t)
		args := append([]string{"nbd", "serve", "--listen", addr, "--format", "qcow2"}, extra...)
		srv = startProc(t, "nbd serve qcow2 --listen", append(args, clone)...)
		waitFor(t, "nbd serve listening", 20*time.Second, func() bool { return strings.Contains(srv.log.String(), "nbd: serving") })
		if go_ := strings.Contains(srv.log.String(), "reader=go"); go_ != (len(extra) == 1) {
			t.Errorf("%v: served by the Go reader: %v\n%s", extra, go_, srv.log.String())
		}
		out := filepath.Join(t.TempDir(), "out.raw")
		run("nbdcopy", "nbd://"+addr, out)
		run("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", out, clone)
		srv.kill(syscall.SIGTERM)
	}

	// The format is declared.
	for _, args := range [][]string{
		{"nbd", "serve", "--unix", sock, "--format", "vmdk", clone},
		{"nbd", "serve", "--unix", sock, "--format", "qcow2", "--qcow2-server", "nbdkit", clone},
	} {
		err := exec.Command(stowageBin, args...).Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 {
			t.Errorf("stowage %s: %v, want exit 2", strings.Join(args, " "), err)
		}
	}
}

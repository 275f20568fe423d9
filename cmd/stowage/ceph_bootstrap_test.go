package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestCephBootstrap brings up the one-node Ceph cluster of
// deploy/ceph/bootstrap.sh (scripts/test.sh installs the Debian Ceph
// packages) in a temporary directory with cephx on, and checks what the
// rbd primary store will rely on: a pool-limited cephx user lists the
// pool and another pool is closed to it, a clone of a protected snapshot
// names its parent, `rbd diff` lists only written extents, and qemu's rbd
// driver writes into the pool. It stops the daemons it started.
func TestCephBootstrap(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Ceph cluster")
	}
	if _, err := exec.LookPath("ceph-mon"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("ceph-mon is required (scripts/test.sh installs it)")
		}
		t.Skip("no Ceph packages here (deploy/ceph/bootstrap.sh up --install)")
	}
	dir := filepath.Join(t.TempDir(), "ceph")
	script, err := filepath.Abs("../../deploy/ceph/bootstrap.sh")
	if err != nil {
		t.Fatal(err)
	}
	run := func(name string, args ...string) string {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Env = append(os.Environ(), "CEPH_CONF="+filepath.Join(dir, "ceph.conf"))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	t.Cleanup(func() { _ = exec.Command(script, "down", "--dir", dir).Run() })
	out := run(script, "up", "--dir", dir, "--size", "2G")
	t.Logf("bootstrap: %s", lastLine(out))
	if !strings.Contains(out, "export CEPH_CONF="+filepath.Join(dir, "ceph.conf")) {
		t.Fatalf("up printed no environment:\n%s", out)
	}
	keyring := strings.TrimSpace(run(script, "user", "stowage-h1", "stowage", "--dir", dir))
	if st, err := os.Stat(keyring); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("user keyring %s: %v %v", keyring, st, err)
	}
	run("rbd", "--id", "stowage-h1", "create", "--size", "64M", "stowage/base")
	run("rbd", "--id", "stowage-h1", "snap", "create", "stowage/base@s1")
	run("rbd", "--id", "stowage-h1", "snap", "protect", "stowage/base@s1")
	run("rbd", "--id", "stowage-h1", "clone", "stowage/base@s1", "stowage/vol1")
	if info := run("rbd", "--id", "stowage-h1", "info", "stowage/vol1"); !strings.Contains(info, "parent: stowage/base@s1") {
		t.Errorf("clone without its parent:\n%s", info)
	}
	run("qemu-img", "create", "-q", "-f", "raw", "rbd:stowage/img:id=stowage-h1", "16M")
	run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4M 1M", "rbd:stowage/img:id=stowage-h1")
	if diff := run("rbd", "--id", "stowage-h1", "diff", "stowage/img"); !strings.Contains(diff, "4194304  1048576  data") || strings.Count(diff, "data") != 1 {
		t.Errorf("rbd diff of one written MiB:\n%s", diff)
	}
	// The user is limited to its pool.
	run("ceph", "osd", "pool", "create", "other", "8")
	cmd := exec.Command("rbd", "--id", "stowage-h1", "create", "--size", "1M", "other/x")
	cmd.Env = append(os.Environ(), "CEPH_CONF="+filepath.Join(dir, "ceph.conf"))
	if out, err := cmd.CombinedOutput(); err == nil {
		t.Errorf("a user limited to pool stowage created an image in pool other: %s", out)
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.HasPrefix(lines[i], "ceph bootstrap: up") {
			return lines[i]
		}
	}
	return lines[len(lines)-1]
}

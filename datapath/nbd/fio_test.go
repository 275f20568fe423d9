package nbd

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/stowage/stowage/internal/envtest"
)

// TestFioNBDEngine drives the server with fio's nbd engine (libnbd): random
// writes at queue depth 16 over several in-flight requests, each block
// verified by checksum when read back. Bounded by size, not time.
func TestFioNBDEngine(t *testing.T) {
	fio, err := exec.LookPath("fio")
	if err != nil {
		envtest.Skip(t, "fio not installed")
	}
	if out, _ := exec.Command(fio, "--enghelp").CombinedOutput(); !strings.Contains(string(out), "nbd") {
		t.Skip("this fio has no nbd engine")
	}
	ts := startServer(t, ServerOptions{}, false)
	path, _ := sparseImage(t, ts.dir, 32<<20)
	if err := ts.AddExport("fio", path, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(fio, "--name=nbd", "--ioengine=nbd", "--uri="+ts.uri("fio"),
		"--rw=randwrite", "--bs=4k", "--size=32m", "--iodepth=16", "--io_size=8m",
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=1", "--verify_state_save=0").CombinedOutput()
	if err != nil {
		t.Fatalf("fio: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "err= 0") {
		t.Fatalf("fio reported errors:\n%s", out)
	}
}

package qsd

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/internal/envtest"
)

func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range append([]string{DefaultBinary, "qemu-img", "qemu-io"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			envtest.Skipf(t, "%s not installed", tool)
		}
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// linkedClone makes base.qcow2 (8 MiB: 0xaa at 0-1M, 0xbb at 4-5M) and
// clone.qcow2 on it (0xcc at 512K-1.5M, zeroes at 4M-4M+64K), and returns
// the clone's path.
func linkedClone(t *testing.T, dir string) string {
	t.Helper()
	base := filepath.Join(dir, "base.qcow2")
	clone := filepath.Join(dir, "clone.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 1M", "-c", "write -P 0xbb 4M 1M", base)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", clone)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xcc 512K 1M", "-c", "write -z 4M 64K", clone)
	return clone
}

func start(t *testing.T, o Options) *Daemon {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	d, err := Start(ctx, o)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Stop(context.Background()); err != nil {
			t.Error(err)
		}
		cancel()
	})
	return d
}

func uri(o Options) string { return "nbd+unix:///" + o.Name + "?socket=" + o.Socket }

func TestFormatDeclared(t *testing.T) {
	if _, err := Args(Options{File: "f", Socket: "s"}); err == nil {
		t.Fatal("no format: want an error")
	}
	if _, err := Args(Options{File: "f", Socket: "s", Format: "vmdk"}); err == nil {
		t.Fatal("format vmdk: want an error")
	}
	args, err := Args(Options{File: "/a,b/c.qcow2", Socket: "/s", Format: Qcow2, Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	var bdev map[string]any
	for i, a := range args {
		if a == "--blockdev" {
			if err := json.Unmarshal([]byte(args[i+1]), &bdev); err != nil {
				t.Fatal(err)
			}
		}
	}
	if bdev["driver"] != "qcow2" || bdev["detect-zeroes"] != "unmap" || bdev["file"].(map[string]any)["filename"] != "/a,b/c.qcow2" {
		t.Fatalf("blockdev %v", bdev)
	}
}

// TestMapAndCopy: nbdinfo --map of the clone's export agrees with qemu-img
// map of the chain, and nbdcopy of the export equals the guest view.
func TestMapAndCopy(t *testing.T) {
	need(t, "nbdinfo", "nbdcopy")
	dir := t.TempDir()
	clone := linkedClone(t, dir)
	o := Options{File: clone, Format: Qcow2, Socket: filepath.Join(dir, "nbd.sock"), Name: "clone"}
	d := start(t, o)
	if d.PID() == 0 {
		t.Fatal("no pid")
	}

	// Data in qemu-img map is data in base:allocation.
	var qmap []struct {
		Start, Length int64
		Data, Zero    bool
		Depth         int
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "map", "--output=json", "-f", "qcow2", clone)), &qmap); err != nil {
		t.Fatal(err)
	}
	var nmap []struct {
		Offset, Length int64
		Type           int
		Description    string
	}
	if err := json.Unmarshal([]byte(run(t, "nbdinfo", "--json", "--map", uri(o))), &nmap); err != nil {
		t.Fatal(err)
	}
	// Compare byte-range classification at 64 KiB granularity.
	const g = 64 << 10
	classify := func(off int64) (qdata, ndata bool) {
		for _, e := range qmap {
			if off >= e.Start && off < e.Start+e.Length {
				qdata = e.Data
			}
		}
		for _, e := range nmap {
			if off >= e.Offset && off < e.Offset+e.Length {
				ndata = e.Type&1 == 0 // NBD_STATE_HOLE clear
			}
		}
		return
	}
	datas := 0
	for off := int64(0); off < 8<<20; off += g {
		q, n := classify(off)
		if q != n {
			t.Errorf("offset %d: qemu-img map data=%v, nbdinfo --map data=%v", off, q, n)
		}
		if n {
			datas++
		}
	}
	if datas == 0 {
		t.Fatal("no data extents in the export")
	}
	// 0-1.5M and 4M+64K-5M are data: 24 + 15 chunks of 64K.
	if datas != 39 {
		t.Errorf("%d data chunks of 64K, want 39", datas)
	}

	// qemu:allocation-depth: the overlay's clusters at depth 1, base's at 2.
	depth := run(t, "nbdinfo", "--map=qemu:allocation-depth", uri(o))
	if !strings.Contains(depth, "local") || !strings.Contains(depth, "backing depth 2") {
		t.Errorf("allocation depth map lacks local or backing extents:\n%s", depth)
	}

	out := filepath.Join(dir, "out.raw")
	run(t, "nbdcopy", uri(o), out)
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", out, clone)
}

// TestWritable: qemu-io writes with FUA and write-zeroes through a
// writable export land in the clone (and not in its base).
func TestWritable(t *testing.T) {
	need(t, "nbdcopy")
	dir := t.TempDir()
	clone := linkedClone(t, dir)
	base := filepath.Join(dir, "base.qcow2")
	baseBefore := run(t, "qemu-img", "map", "--output=json", "-f", "qcow2", base)
	o := Options{File: clone, Format: Qcow2, Socket: filepath.Join(dir, "nbd.sock"), Name: "clone", Writable: true}
	d := start(t, o)
	run(t, "qemu-io", "-f", "raw", "-c", "write -f -P 0xdd 6M 256K", "-c", "write -z -f 0 64K", "-c", "write -z -u 4718592 64K", "-c", "flush", uri(o))
	if err := d.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(o.Socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left after stop: %v", err)
	}
	run(t, "qemu-io", "-f", "qcow2",
		"-c", "read -P 0xdd 6M 256K",
		"-c", "read -P 0 0 64K",
		"-c", "read -P 0xaa 64K 448K",
		"-c", "read -P 0xcc 512K 1M",
		"-c", "read -P 0 4718592 64K",
		"-c", "read -P 0xbb 4784128 448K", clone)
	if after := run(t, "qemu-img", "map", "--output=json", "-f", "qcow2", base); after != baseBefore {
		t.Errorf("the base changed:\n%s\n%s", baseBefore, after)
	}
	run(t, "qemu-img", "check", "-q", clone)

	// nbdcopy into a writable export of a new overlay on the clone: the
	// guest view afterwards is the raw source.
	if _, err := exec.LookPath("nbdcopy"); err == nil {
		src := filepath.Join(dir, "in.raw")
		run(t, "qemu-img", "create", "-q", "-f", "raw", src, "8M")
		run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 2M 3M", src)
		top := filepath.Join(dir, "top.qcow2")
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", clone, "-F", "qcow2", top)
		o2 := Options{File: top, Format: Qcow2, Socket: filepath.Join(dir, "top.sock"), Name: "top", Writable: true}
		d2 := start(t, o2)
		run(t, "nbdcopy", src, uri(o2))
		if err := d2.Stop(context.Background()); err != nil {
			t.Fatal(err)
		}
		run(t, "qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", src, top)
	}
}

// TestReadOnly: a read-only export refuses writes and leaves the file alone.
func TestReadOnly(t *testing.T) {
	need(t)
	dir := t.TempDir()
	clone := linkedClone(t, dir)
	sum := run(t, "sha256sum", clone)
	o := Options{File: clone, Format: Qcow2, Socket: filepath.Join(dir, "nbd.sock"), Name: "clone"}
	start(t, o)
	out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0xee 0 64K", uri(o)).CombinedOutput()
	t.Logf("qemu-io write to a read-only export: %v: %s", err, out)
	if err == nil && !strings.Contains(string(out), "failed") {
		t.Fatalf("write to a read-only export succeeded:\n%s", out)
	}
	run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0xaa 0 64K", uri(o))
	// Stowage's client sends the write anyway: the server refuses it.
	c, err := nbd.Dial(context.Background(), uri(o), nbd.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !c.ReadOnly() {
		t.Error("export not flagged read-only")
	}
	if _, err := c.WriteAt(make([]byte, 4096), 0); err == nil {
		t.Error("the server accepted a write to a read-only export")
	} else {
		t.Logf("write refused: %v", err)
	}
	if got := run(t, "sha256sum", clone); got != sum {
		t.Error("the image changed under a read-only export")
	}
}

// TestRestartAndKill: a daemon killed by PID is seen as exited; Restart
// brings the export back; a failing image reports qemu's stderr.
func TestRestartAndKill(t *testing.T) {
	need(t)
	dir := t.TempDir()
	clone := linkedClone(t, dir)
	o := Options{File: clone, Format: Qcow2, Socket: filepath.Join(dir, "nbd.sock"), Name: "clone"}
	d := start(t, o)
	pid := d.PID()
	p, _ := os.FindProcess(pid)
	p.Kill()
	select {
	case <-d.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("killed daemon not seen as exited")
	}
	if err := d.Wait(); !errors.Is(err, ErrExited) {
		t.Fatalf("wait: %v", err)
	}
	rctx, rcancel := context.WithTimeout(context.Background(), 10*time.Second)
	if err := d.Restart(rctx); err != nil {
		t.Fatal(err)
	}
	rcancel() // bounds the restart only: the daemon lives as long as Start's ctx
	time.Sleep(50 * time.Millisecond)
	if d.PID() == pid {
		t.Fatal("same pid after restart")
	}
	run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0xcc 512K 1M", uri(o))

	// Declared raw over a qcow2 is served as raw (no probing): the guest
	// sees the qcow2 header bytes.
	ro := Options{File: clone, Format: Raw, Socket: filepath.Join(dir, "raw.sock"), Name: "asraw"}
	start(t, ro)
	run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x51 0 1", uri(ro))

	_, err := Start(context.Background(), Options{File: filepath.Join(dir, "missing.qcow2"), Format: Qcow2, Socket: filepath.Join(dir, "m.sock")})
	if err == nil || !strings.Contains(err.Error(), "missing.qcow2") {
		t.Fatalf("missing image: %v", err)
	}
	// No daemon binary: unavailable.
	_, err = Start(context.Background(), Options{File: clone, Format: Raw, Socket: filepath.Join(dir, "m.sock"), Binary: filepath.Join(dir, "no-such-qsd")})
	if !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("missing binary: %v", err)
	}
	// qemu itself fails: its stderr is in the error.
	_, err = Start(context.Background(), Options{File: filepath.Join(dir, "missing.raw"), Format: Raw, Socket: filepath.Join(dir, "m.sock")})
	if !errors.Is(err, ErrExited) || !strings.Contains(err.Error(), "missing.raw") {
		t.Fatalf("missing raw image: %v", err)
	}
}

// TestChainRefused: an image with an external data file is refused before
// any daemon starts.
func TestChainRefused(t *testing.T) {
	need(t)
	dir := t.TempDir()
	df := filepath.Join(dir, "df.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "data.raw"), df, "1M")
	_, err := Start(context.Background(), Options{File: df, Format: Qcow2, Socket: filepath.Join(dir, "s.sock")})
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "external data file") {
		t.Fatalf("external data file: %v", err)
	}
	clone := linkedClone(t, dir)
	chain, err := CheckChain(context.Background(), clone, Qcow2)
	if err != nil || len(chain) != 2 || chain[1] != filepath.Join(dir, "base.qcow2") {
		t.Fatalf("chain %v, %v", chain, err)
	}
}

// TestFioNBDEngine drives a writable qcow2 clone export with fio's nbd
// engine: random writes at queue depth 16, each block verified by checksum
// when read back; the image is consistent after stop.
func TestFioNBDEngine(t *testing.T) {
	need(t)
	fio, err := exec.LookPath("fio")
	if err != nil {
		envtest.Skip(t, "fio not installed")
	}
	if out, _ := exec.Command(fio, "--enghelp").CombinedOutput(); !strings.Contains(string(out), "nbd") {
		t.Skip("this fio has no nbd engine")
	}
	dir := t.TempDir()
	clone := linkedClone(t, dir)
	o := Options{File: clone, Format: Qcow2, Socket: filepath.Join(dir, "nbd.sock"), Name: "fio", Writable: true}
	d := start(t, o)
	out, err := exec.Command(fio, "--name=nbd", "--ioengine=nbd", "--uri="+uri(o),
		"--rw=randwrite", "--bs=4k", "--size=8m", "--iodepth=16", "--io_size=8m",
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=1", "--verify_state_save=0").CombinedOutput()
	if err != nil {
		t.Fatalf("fio: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "err= 0") {
		t.Fatalf("fio reported errors:\n%s", out)
	}
	if err := d.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "check", "-q", clone)
}

package nbd

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
)

const mib = 1 << 20

// TestNbdinfo checks what nbdinfo (libnbd) sees: size, flags, the export
// list and the base:allocation map with holes and data.
func TestNbdinfo(t *testing.T) {
	needBin(t, "nbdinfo")
	ts := startServer(t, ServerOptions{}, true)
	path, _ := sparseImage(t, ts.dir, 64*mib, 0, mib, 10*mib, 4096, 40*mib, 8*mib)
	if err := ts.AddExport("disk", path, ExportOptions{Description: "test disk"}); err != nil {
		t.Fatal(err)
	}
	ro, _ := sparseImage(t, ts.dir, 8*mib, 0, mib)
	if err := ts.AddExport("ro", ro, ExportOptions{ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	for _, uri := range []string{ts.uri("disk"), ts.tcpURI("disk")} {
		if out := mustRun(t, "nbdinfo", "--size", uri); strings.TrimSpace(out) != "67108864" {
			t.Errorf("%s: size %q", uri, out)
		}
		for _, c := range []string{"flush", "trim", "zero", "fua", "multi-conn", "fast-zero", "cache", "df", "structured-reply"} {
			if out, err := run(t, "nbdinfo", "--can", c, uri); err != nil {
				t.Errorf("nbdinfo --can %s %s: %v %s", c, uri, err, out)
			}
		}
		if _, err := run(t, "nbdinfo", "--is", "read-only", uri); err == nil {
			t.Errorf("%s: read-write export reported read-only", uri)
		}
	}
	if out, err := run(t, "nbdinfo", "--is", "read-only", ts.uri("ro")); err != nil {
		t.Errorf("read-only export not reported read-only: %v %s", err, out)
	}
	for _, c := range []string{"trim", "zero", "fua"} {
		if _, err := run(t, "nbdinfo", "--can", c, ts.uri("ro")); err == nil {
			t.Errorf("read-only export says it can %s", c)
		}
	}

	out := mustRun(t, "nbdinfo", "--map", ts.uri("disk"))
	want := [][3]string{
		{"0", "1048576", "data"},
		{"1048576", "9437184", "hole,zero"},
		{"10485760", "4096", "data"},
		{"10489856", "31453184", "hole,zero"},
		{"41943040", "8388608", "data"},
		{"50331648", "16777216", "hole,zero"},
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != len(want) {
		t.Fatalf("nbdinfo --map:\n%s", out)
	}
	for i, l := range lines {
		f := strings.Fields(l)
		if len(f) < 4 || f[0] != want[i][0] || f[1] != want[i][1] || f[3] != want[i][2] {
			t.Errorf("map line %d = %q, want %v", i, l, want[i])
		}
	}

	out = mustRun(t, "nbdinfo", "--list", ts.uri(""))
	if !strings.Contains(out, "export=\"disk\"") || !strings.Contains(out, "test disk") || !strings.Contains(out, "export=\"ro\"") {
		t.Errorf("nbdinfo --list:\n%s", out)
	}
	// unknown export: a clean error, not a hang
	if out, err := run(t, "nbdinfo", ts.uri("nope")); err == nil {
		t.Errorf("nbdinfo of a missing export succeeded:\n%s", out)
	}
}

// TestNbdinfoDefaultExport: with one export, the empty name selects it (the
// bench hook's nbd+unix:///?socket=... URI).
func TestNbdinfoDefaultExport(t *testing.T) {
	needBin(t, "nbdinfo")
	ts := startServer(t, ServerOptions{}, false)
	path, _ := sparseImage(t, ts.dir, 4*mib, 0, mib)
	if err := ts.AddExport("only", path, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	if out := mustRun(t, "nbdinfo", "--size", ts.uri("")); strings.TrimSpace(out) != "4194304" {
		t.Errorf("size %q", out)
	}
}

// TestNbdcopy copies out of and into the server with nbdcopy (4
// connections, many requests in flight): byte-exact, and sparse on output.
func TestNbdcopy(t *testing.T) {
	needBin(t, "nbdcopy")
	ts := startServer(t, ServerOptions{}, true)
	src, want := sparseImage(t, ts.dir, 64*mib, 0, 3*mib, 20*mib+4096, 8192, 60*mib, 4*mib)
	if err := ts.AddExport("src", src, ExportOptions{ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	// out of the server, over unix and TCP
	for i, uri := range []string{ts.uri("src"), ts.tcpURI("src")} {
		out := filepath.Join(ts.dir, "out"+itoa(int64(i))+".raw")
		mustRun(t, "nbdcopy", "--connections=4", uri, out)
		fileEqual(t, out, want)
		if a := allocated(t, out); a > 8*mib {
			t.Errorf("nbdcopy output allocates %d bytes, want <= 8 MiB (sparse)", a)
		}
	}
	// into the server: a fresh sparse target
	dst := filepath.Join(ts.dir, "dst.raw")
	if err := os.WriteFile(dst, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(dst, 64*mib); err != nil {
		t.Fatal(err)
	}
	if err := ts.AddExport("dst", dst, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "nbdcopy", "--flush", "--connections=4", src, ts.uri("dst"))
	fileEqual(t, dst, want)
	if a := allocated(t, dst); a > 8*mib {
		t.Errorf("export written by nbdcopy allocates %d bytes, want <= 8 MiB", a)
	}
	// and over data that must be overwritten with zeros: the target is full
	// of data first, zeros must punch or zero it.
	dense, _ := sparseImage(t, ts.dir, 64*mib, 0, 64*mib)
	if err := ts.AddExport("dense", dense, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "nbdcopy", "--flush", src, ts.uri("dense"))
	fileEqual(t, dense, want)
}

// TestQemuImg converts and compares through the server with qemu-img over
// nbd+unix:// and nbd://127.0.0.1, raw and qcow2.
func TestQemuImg(t *testing.T) {
	needBin(t, "qemu-img")
	ts := startServer(t, ServerOptions{}, true)
	src, want := sparseImage(t, ts.dir, 32*mib, 0, mib, 5*mib, 64<<10, 31*mib, mib)
	if err := ts.AddExport("src", src, ExportOptions{ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	for i, uri := range []string{ts.uri("src"), ts.tcpURI("src")} {
		out := filepath.Join(ts.dir, "q"+itoa(int64(i))+".raw")
		mustRun(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out)
		fileEqual(t, out, want)
		if a := allocated(t, out); a > 4*mib {
			t.Errorf("qemu-img output allocates %d bytes, want sparse", a)
		}
		mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
		qc := filepath.Join(ts.dir, "q"+itoa(int64(i))+".qcow2")
		mustRun(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, qc)
		mustRun(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", qc, uri)
	}
	if out := mustRun(t, "qemu-img", "info", "-f", "raw", ts.tcpURI("src")); !strings.Contains(out, "33554432") {
		t.Errorf("qemu-img info:\n%s", out)
	}
	// into a writable export, from a qcow2 image
	qc := filepath.Join(ts.dir, "q0.qcow2")
	dst, _ := sparseImage(t, ts.dir, 32*mib, 0, 32*mib) // full of other data
	if err := ts.AddExport("dst", dst, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, uri := range []string{ts.uri("dst"), ts.tcpURI("dst")} {
		mustRun(t, "qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", qc, uri)
		mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
	}
	fileEqual(t, dst, want)
}

// syncCounter counts Sync calls (FLUSH and FUA).
type syncCounter struct {
	*FileBackend
	syncs atomic.Int64
}

func (s *syncCounter) Sync() error {
	s.syncs.Add(1)
	return s.FileBackend.Sync()
}

// TestQemuIo writes with FUA, writes zeroes with and without unmap, discards,
// flushes and reads back, through qemu's NBD client.
func TestQemuIo(t *testing.T) {
	needBin(t, "qemu-io")
	ts := startServer(t, ServerOptions{}, true)
	path, want := sparseImage(t, ts.dir, 8*mib, 0, 8*mib)
	fb, err := OpenFileBackend(path, false)
	if err != nil {
		t.Fatal(err)
	}
	sc := &syncCounter{FileBackend: fb}
	if err := ts.AddBackend("d", sc, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	cmds := []string{
		"write -f -P 0xab 0 64k",
		"write -P 0xcd 1M 1M",
		"write -z 1M 64k",
		"write -z -u 1088k 64k",
		"write -z -f 4M 1M",
		"discard 6M 1M",
		"flush",
		"read -P 0xab 0 64k",
		"read -P 0 1M 128k",
		"read -P 0xcd 1152k 896k",
		"read -P 0 4M 1M",
	}
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := mustRun(t, "qemu-io", append(args, ts.uri("d"))...)
	if strings.Contains(out, "fail") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	if n := sc.syncs.Load(); n < 3 {
		t.Errorf("%d syncs, want at least 3 (2 FUA writes and a flush)", n)
	}
	fill := func(off, n int, b byte) {
		for i := off; i < off+n; i++ {
			want[i] = b
		}
	}
	fill(0, 64<<10, 0xab)
	fill(mib, mib, 0xcd)
	fill(mib, 128<<10, 0)
	fill(4*mib, mib, 0)
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// the discarded range is unspecified; compare around it
	if !bytes.Equal(got[:6*mib], want[:6*mib]) || !bytes.Equal(got[7*mib:], want[7*mib:]) {
		t.Fatalf("content differs at %d", firstDiff(got, want))
	}
	// punched ranges are holes now
	m := mustRunOrSkip(t, "nbdinfo", "--map", ts.uri("d"))
	if m != "" && !strings.Contains(m, "hole") {
		t.Errorf("no holes after zeroes with unmap and discard:\n%s", m)
	}
}

func mustRunOrSkip(t *testing.T, name string, args ...string) string {
	if _, err := exec.LookPath(name); err != nil {
		return ""
	}
	return mustRun(t, name, args...)
}

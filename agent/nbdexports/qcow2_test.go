package nbdexports

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/datapath/qsd"
	"github.com/stowage/stowage/errdefs"
)

// linkedClone makes dir/base.raw (1 MiB of 0x11 at 0, 0x22 at 4 MiB, 8 MiB
// virtual) and dir/clone.qcow2 on it, with 0x33 written through the clone
// at 2 MiB; it returns the clone.
func linkedClone(t *testing.T, dir string) string {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io", "qemu-storage-daemon"} {
		needBin(t, tool)
	}
	base, clone := filepath.Join(dir, "base.raw"), filepath.Join(dir, "clone.qcow2")
	for _, c := range [][]string{
		{"qemu-img", "create", "-q", "-f", "raw", base, "8M"},
		{"qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 4M 1M", base},
		{"qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", clone},
		{"qemu-io", "-f", "qcow2", "-c", "write -P 0x33 2M 1M", clone},
	} {
		if out, err := run(t, c[0], c[1:]...); err != nil {
			t.Fatalf("%v: %v\n%s", c, err, out)
		}
	}
	return clone
}

// runDir is a short private directory for daemon sockets (a unix socket
// path is limited to 108 bytes, and t.TempDir's are long).
func runDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "qsd")
	if err != nil {
		t.Fatal(err)
	}
	run := filepath.Join(d, "run")
	t.Cleanup(func() {
		// Daemons outlive their agent by design: a test that failed
		// half-way quits those its run directory still holds.
		qmps, _ := filepath.Glob(filepath.Join(run, "*.qmp"))
		for _, m := range qmps {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = qsd.Quit(ctx, m)
			cancel()
		}
		os.RemoveAll(d)
	})
	return run
}

func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := run(t, name, args...)
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return out
}

func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	if err := syscall.Kill(pid, 0); err != nil {
		return false
	}
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	f := strings.Fields(string(b))
	return len(f) > 2 && f[2] != "Z"
}

func pidOf(t *testing.T, state, name string) int {
	t.Helper()
	var st stateFile
	b, err := os.ReadFile(state)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	for _, e := range st.Exports {
		if e.Name == name {
			return e.PID
		}
	}
	t.Fatalf("export %s not in the state file", name)
	return 0
}

// TestQcow2Export: a linked clone is served as its guest view through a
// qemu-storage-daemon, to real clients (nbdinfo --map, nbdcopy, qemu-io
// with FUA and write-zeroes, qemu-img compare), over the same listener and
// TLS as raw files; its daemon is restarted when it dies, adopted by a new
// agent after a crash, and gone after Unexport.
func TestQcow2Export(t *testing.T) {
	needBin(t, "nbdinfo")
	needBin(t, "nbdcopy")
	dir := t.TempDir()
	clone := linkedClone(t, dir)
	caPool, cert := testCerts(t, dir)
	cfg := &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &cert, nil }}
	state, rd := filepath.Join(dir, "state", "nbd-exports.json"), runDir(t)

	s1 := New(quiet(), WithStateFile(state), WithQcow2(rd, ""), WithTLS(cfg, true))
	addr, crash1 := serveUntil(t, s1)
	if _, err := New(quiet()).ExportFormat(clone, FormatQcow2, false, time.Time{}, exports.Owner{}); err == nil {
		t.Fatal("a server without WithQcow2 exported a qcow2 image")
	}
	// A read-only export refuses writes.
	ro, err := s1.ExportFormat(clone, FormatQcow2, true, time.Time{}, exports.Owner{})
	if err != nil {
		t.Fatal(err)
	}
	rc, err := nbd.Dial(context.Background(), ro, nbd.ClientOptions{TLS: &tls.Config{RootCAs: caPool}, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rc.WriteAt([]byte("x"), 0); !rc.ReadOnly() || err == nil {
		t.Fatalf("a write into a read-only qcow2 export: read-only %v, %v", rc.ReadOnly(), err)
	}
	rc.Close()
	if err := s1.Unexport(ro); err != nil {
		t.Fatal(err)
	}
	uri, err := s1.ExportFormat(clone, FormatQcow2, false, time.Time{}, exports.Owner{Store: "p1", Key: "volumes/clone.qcow2"})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(uri, "nbds://"+addr+"/") {
		t.Fatalf("URI %s", uri)
	}
	name, _ := NameOf(uri)
	if fi, err := os.Stat(rd); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("run directory: %v %v", fi, err)
	}
	tlsURI := uri + "?tls-certificates=" + dir

	// The guest view: 8 MiB, data where the base or the clone has it.
	if out := strings.TrimSpace(mustRun(t, "nbdinfo", "--size", tlsURI)); out != "8388608" {
		t.Fatalf("size %s", out)
	}
	m := mustRun(t, "nbdinfo", "--map", "--totals", tlsURI)
	// 3 MiB of data (base 0-1M and 4M-5M, clone 2M-3M), 5 MiB of holes.
	if !strings.Contains(m, "3145728") || !strings.Contains(m, "5242880") {
		t.Fatalf("nbdinfo --map --totals:\n%s", m)
	}
	if _, err := readHead("nbd"+strings.TrimPrefix(uri, "nbds"), 1, nil); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("plaintext client: %v", err)
	}
	out := filepath.Join(dir, "out.raw")
	mustRun(t, "nbdcopy", tlsURI, out)
	mustRun(t, "qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", out, clone)
	if got, err := readHead(uri, 4, &tls.Config{RootCAs: caPool}); err != nil || got != "\x11\x11\x11\x11" {
		t.Fatalf("read through our client: %q %v", got, err)
	}

	// Writes: FUA, write-zeroes (over base data) and a plain write; then
	// nbdcopy back in.
	mustRun(t, "qemu-io", "--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+dir, "--image-opts",
		"-c", "write -f -P 0x44 6M 64k", "-c", "write -z 4M 64k", "-c", "write -P 0x55 7M 4k",
		"driver=raw,file.driver=nbd,file.export="+name+",file.server.type=inet,file.server.host=127.0.0.1,file.server.port="+strings.Split(addr, ":")[1]+",file.tls-creds=tls0")
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x44 6M 64k", "-c", "write -z 4M 64k", "-c", "write -P 0x55 7M 4k", out)

	// fio (nbd engine): random writes at queue depth 16 through the
	// agent's server and the daemon, each block verified by checksum when
	// read back; on a second clone, and in plaintext (fio's libnbd may not
	// read certificate files).
	if fio, err := exec.LookPath("fio"); err == nil {
		if eh, _ := exec.Command(fio, "--enghelp").CombinedOutput(); strings.Contains(string(eh), "nbd") {
			clone2 := filepath.Join(dir, "clone2.qcow2")
			mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", filepath.Join(dir, "base.raw"), "-F", "raw", clone2)
			plain := New(quiet(), WithQcow2(runDir(t), ""))
			_, stopPlain := serve(t, plain, "127.0.0.1:0")
			defer stopPlain()
			u2, err := plain.ExportFormat(clone2, FormatQcow2, false, time.Time{}, exports.Owner{})
			if err != nil {
				t.Fatal(err)
			}
			fo := mustRun(t, fio, "--name=nbd", "--ioengine=nbd", "--uri="+u2,
				"--rw=randwrite", "--bs=4k", "--size=8m", "--iodepth=16", "--io_size=8m",
				"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=1", "--verify_state_save=0")
			if !strings.Contains(fo, "err= 0") {
				t.Fatalf("fio reported errors:\n%s", fo)
			}
			if err := plain.Unexport(u2); err != nil {
				t.Fatal(err)
			}
			mustRun(t, "qemu-img", "check", "-q", "-f", "qcow2", clone2)
		}
	}

	// The daemon dies: it is restarted, and our client's next request
	// goes through.
	pid := pidOf(t, state, name)
	if !alive(pid) {
		t.Fatalf("daemon pid %d not running", pid)
	}
	syscall.Kill(pid, syscall.SIGKILL)
	deadline := time.Now().Add(20 * time.Second)
	for pidOf(t, state, name) == pid && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if pidOf(t, state, name) == pid {
		t.Fatal("the daemon was not restarted")
	}
	if got, err := readHead(uri, 4, &tls.Config{RootCAs: caPool}); err != nil || got != "\x11\x11\x11\x11" {
		t.Fatalf("read after the daemon's restart: %q %v", got, err)
	}

	// The agent crashes (its daemons outlive it); a new one adopts the
	// daemon and serves the same URI.
	pid = pidOf(t, state, name)
	s1.mu.Lock()
	s1.daemons = map[string]*qsd.Daemon{} // a dead agent supervises nothing
	s1.mu.Unlock()
	crash1()
	s2 := New(quiet(), WithStateFile(state), WithQcow2(rd, ""), WithTLS(cfg, true))
	if err := s2.Load(nil); err != nil {
		t.Fatal(err)
	}
	_, stop2 := serve(t, s2, addr)
	defer stop2()
	if got := pidOf(t, state, name); got != pid {
		t.Fatalf("after restart the export runs on daemon %d, want the adopted %d", got, pid)
	}
	mustRun(t, "nbdcopy", tlsURI, out+".2")
	if err := s2.Unexport(uri); err != nil {
		t.Fatal(err)
	}
	if alive(pid) {
		t.Fatalf("daemon %d still runs after Unexport", pid)
	}
	// Stopping flushed the image: the file itself holds every write.
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", out, clone)
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", out, out+".2")
	mustRun(t, "qemu-img", "check", "-f", "qcow2", clone)
	if ents, _ := os.ReadDir(rd); len(ents) != 0 {
		t.Fatalf("run directory not empty: %v", ents)
	}
}

// serveUntil is serve without the Close: the returned crash stops the
// listener and every connection, as the death of the agent would, and
// leaves the daemons running.
func serveUntil(t *testing.T, s *Server) (string, func()) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.SetAddress(l.Addr().String())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	return l.Addr().String(), func() {
		cancel()
		<-done
		s.srv.Close()
	}
}

// TestQcow2ReadOnlyGoReader: a read-only qcow2 export is served by
// Stowage's own qcow2 reader, no daemon: a chain with compressed clusters
// in its base and zero clusters over base data in its top reads as qemu
// reads it (nbdcopy, then qemu-img compare), and nbdinfo --map agrees with
// qemu-img map on where the data is.
func TestQcow2ReadOnlyGoReader(t *testing.T) {
	needBin(t, "nbdinfo")
	needBin(t, "nbdcopy")
	dir := t.TempDir()
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		needBin(t, tool)
	}
	raw, base, top := filepath.Join(dir, "seed.raw"), filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	mustRun(t, "qemu-img", "create", "-q", "-f", "raw", raw, "16M")
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4M", "-c", "write -P 0x22 8M 2M", raw)
	mustRun(t, "qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", raw, base) // compressed clusters
	mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	mustRun(t, "qemu-io", "-f", "qcow2", "-c", "write -z 1M 1M", "-c", "write -P 0x33 12M 1M", "-c", "write -P 0x44 3M 64k", top)

	state, rd := filepath.Join(dir, "state", "nbd-exports.json"), runDir(t)
	s := New(quiet(), WithStateFile(state), WithQcow2(rd, ""))
	_, stop := serve(t, s, "127.0.0.1:0")
	defer stop()
	uri, err := s.ExportFormat(top, FormatQcow2, true, time.Time{}, exports.Owner{})
	if err != nil {
		t.Fatal(err)
	}
	name, _ := NameOf(uri)
	if pid := pidOf(t, state, name); pid != 0 {
		t.Fatalf("a read-only export started daemon %d; the Go reader serves it", pid)
	}
	out := filepath.Join(dir, "out.raw")
	mustRun(t, "nbdcopy", uri, out)
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", out, top)

	// Data bytes: qemu-img map's (data and not zero) and nbdinfo's non-holes.
	var entries []struct {
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
		Zero   bool  `json:"zero"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "qemu-img", "map", "-f", "qcow2", "--output", "json", top)), &entries); err != nil {
		t.Fatal(err)
	}
	var want int64
	for _, e := range entries {
		if e.Data && !e.Zero {
			want += e.Length
		}
	}
	var got int64
	for _, line := range strings.Split(strings.TrimSpace(mustRun(t, "nbdinfo", "--map", uri)), "\n") {
		f := strings.Fields(line)
		if len(f) >= 4 && f[3] == "data" {
			n, _ := strconv.ParseInt(f[1], 10, 64)
			got += n
		}
	}
	if want == 0 || got != want {
		t.Fatalf("nbdinfo --map says %d data bytes, qemu-img map %d", got, want)
	}
	if ents, _ := os.ReadDir(rd); len(ents) != 0 {
		t.Fatalf("run directory holds %v: a daemon was started", ents)
	}
	if err := s.Unexport(uri); err != nil {
		t.Fatal(err)
	}
}

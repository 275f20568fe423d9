package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stowage/stowage/internal/envtest"
)

// testLogger logs to the test log at debug level.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// testServer is a server on a unix socket (and optionally TCP) in a temp dir.
type testServer struct {
	*Server
	sock string
	tcp  string
	dir  string
}

// uri is the nbd+unix URI of export name.
func (s *testServer) uri(name string) string {
	return "nbd+unix:///" + name + "?socket=" + s.sock
}

func (s *testServer) tcpURI(name string) string {
	return "nbd://" + s.tcp + "/" + name
}

// startServer starts a server; it stops when the test ends.
func startServer(t testing.TB, opts ServerOptions, tcp bool) *testServer {
	t.Helper()
	dir := t.TempDir()
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	srv := NewServer(opts)
	ts := &testServer{Server: srv, sock: filepath.Join(dir, "nbd.sock"), dir: dir}
	l, err := net.Listen("unix", ts.sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 2)
	go func() { done <- srv.Serve(ctx, l) }()
	n := 1
	if tcp {
		tl, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ts.tcp = tl.Addr().String()
		go func() { done <- srv.Serve(ctx, tl) }()
		n = 2
	}
	t.Cleanup(func() {
		cancel()
		for range n {
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Serve: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Errorf("Serve did not return after cancel")
			}
		}
		if err := srv.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return ts
}

// sparseImage writes a file of size with random data at the given
// [off, off+len) pairs and holes elsewhere, and returns its path and content.
func sparseImage(t testing.TB, dir string, size int64, data ...int64) (string, []byte) {
	t.Helper()
	path := filepath.Join(dir, "img-"+randName()+".raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	for i := 0; i+1 < len(data); i += 2 {
		off, n := data[i], data[i+1]
		rand.Read(want[off : off+n])
		if _, err := f.WriteAt(want[off:off+n], off); err != nil {
			t.Fatal(err)
		}
	}
	return path, want
}

func randName() string {
	var b [6]byte
	rand.Read(b[:])
	const hex = "0123456789abcdef"
	out := make([]byte, 0, 12)
	for _, c := range b {
		out = append(out, hex[c>>4], hex[c&15])
	}
	return string(out)
}

// needBin skips the test when a binary is missing.
func needBin(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			envtest.Skipf(t, "%s not installed", n)
		}
	}
}

// run runs a command with a timeout and returns its combined output.
func run(t testing.TB, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func mustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := run(t, name, args...)
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return out
}

// fileEqual fails the test when path does not hold want.
func fileEqual(t testing.TB, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: content differs (len %d, want %d) at %d", path, len(got), len(want), firstDiff(got, want))
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// allocated is the number of bytes a file has allocated on disk.
func allocated(t testing.TB, path string) int64 {
	t.Helper()
	out := mustRun(t, "stat", "-c", "%b %B", path)
	var blocks, bs int64
	if _, err := fmt.Sscan(out, &blocks, &bs); err != nil {
		t.Fatal(err)
	}
	return blocks * bs
}

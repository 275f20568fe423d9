package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
)

// startNbdkit runs nbdkit on a unix socket with the given plugin arguments.
func startNbdkit(t *testing.T, args ...string) string {
	t.Helper()
	needBin(t, "nbdkit")
	sock := filepath.Join(t.TempDir(), "nbdkit.sock")
	cmd := exec.Command("nbdkit", append([]string{"-f", "--exit-with-parent", "-U", sock}, args...)...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	// The socket file exists from bind(2) on; nbdkit serves once it listens.
	for range 200 {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return "nbd+unix:///?socket=" + sock
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("nbdkit did not start")
	return ""
}

// exerciseClient writes, zeroes, trims, flushes and reads back through c,
// from several goroutines at once.
func exerciseClient(t *testing.T, c *Client) {
	t.Helper()
	ctx := context.Background()
	size := c.Size()
	want := make([]byte, size)
	got := make([]byte, size)
	if _, err := c.ReadAtContext(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	copy(want, got)
	// 64 concurrent writes of 256 KiB, FUA on some
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 64 {
		off := int64(i) * (size / 64)
		n := min(int64(256<<10), size/64)
		rand.Read(want[off : off+n])
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := c.WriteAtContext(ctx, want[off:off+n], off, i%8 == 0); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := c.Zero(ctx, 4096, 8192, ZeroOptions{}); err != nil {
		t.Fatal(err)
	}
	clear(want[4096 : 4096+8192])
	if err := c.Zero(ctx, size/2, 65536, ZeroOptions{NoHole: true, FUA: true}); err != nil {
		t.Fatal(err)
	}
	clear(want[size/2 : size/2+65536])
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// read back in parallel pieces, and once in one large read
	clear(got)
	for i := range 16 {
		off := int64(i) * (size / 16)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := c.ReadAtContext(ctx, got[off:off+size/16], off); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if !bytes.Equal(got, want) {
		t.Fatalf("read back differs at %d", firstDiff(got, want))
	}
	if err := c.Trim(ctx, size-mib, mib); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadAtContext(ctx, got[:mib], size); !errdefs.IsInvalid(err) {
		t.Fatalf("read past the end: %v", err)
	}
}

func TestClientNbdkitMemory(t *testing.T) {
	uri := startNbdkit(t, "memory", "64M")
	c, err := Dial(context.Background(), uri, ClientOptions{Connections: 4, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Size() != 64*mib || !c.HasBlockStatus() || c.Connections() != 4 {
		t.Fatalf("size %d block status %v connections %d", c.Size(), c.HasBlockStatus(), c.Connections())
	}
	exerciseClient(t, c)
	exts, err := c.BlockStatus(context.Background(), 0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	data := dataBytes(exts)
	if data == 0 || data == c.Size() || exts[len(exts)-1].End() != c.Size() {
		t.Fatalf("block status of a sparse memory disk: %+v", exts)
	}
}

func TestClientNbdkitFile(t *testing.T) {
	dir := t.TempDir()
	path, want := sparseImage(t, dir, 16*mib, 0, mib, 8*mib, 4096)
	uri := startNbdkit(t, "--readonly", "file", path)
	c, err := Dial(context.Background(), uri, ClientOptions{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !c.ReadOnly() {
		t.Error("read-only export not reported")
	}
	got := make([]byte, len(want))
	if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read: %v, equal %v", err, bytes.Equal(got, want))
	}
	exts, err := c.BlockStatus(context.Background(), 0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	wantExt := []stream.Extent{{Off: 0, Len: mib}, {Off: mib, Len: 7 * mib, Hole: true}, {Off: 8 * mib, Len: 4096}, {Off: 8*mib + 4096, Len: 8*mib - 4096, Hole: true}}
	if len(exts) != len(wantExt) {
		t.Fatalf("extents %+v", exts)
	}
	for i := range exts {
		if exts[i] != wantExt[i] {
			t.Fatalf("extents %+v, want %+v", exts, wantExt)
		}
	}
	if _, err := c.WriteAt(got[:512], 0); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("write to a read-only export: %v", err)
	}
}

func TestClientOwnServer(t *testing.T) {
	ts := startServer(t, ServerOptions{}, true)
	path, _ := sparseImage(t, ts.dir, 32*mib, 0, mib)
	if err := ts.AddExport("d", path, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, uri := range []string{ts.uri("d"), ts.tcpURI("d")} {
		c, err := Dial(context.Background(), uri, ClientOptions{Connections: 3, Logger: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		if c.Connections() != 3 || !c.HasBlockStatus() {
			t.Fatalf("connections %d block status %v", c.Connections(), c.HasBlockStatus())
		}
		exerciseClient(t, c)
		c.Close()
	}
	if _, err := Dial(context.Background(), ts.uri("nope"), ClientOptions{}); !errdefs.IsNotFound(err) {
		t.Fatalf("unknown export: %v", err)
	}
	// nbds:// to a plaintext server: STARTTLS is refused, a clear error.
	if _, err := Dial(context.Background(), "nbds+unix:///d?socket="+ts.sock, ClientOptions{}); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "TLS") {
		t.Fatalf("nbds to a server without TLS: %v", err)
	}
}

// TestClientCancel: a read stuck in the server returns when its context
// ends, and the connection keeps working (the late reply is discarded).
func TestClientCancel(t *testing.T) {
	ts := startServer(t, ServerOptions{}, false)
	path, want := sparseImage(t, ts.dir, 4*mib, 0, 4*mib)
	fb, err := OpenFileBackend(path, false)
	if err != nil {
		t.Fatal(err)
	}
	gb := &gateBackend{FileBackend: fb, gateOff: mib, gate: make(chan struct{}), entered: make(chan struct{})}
	if err := ts.AddBackend("g", gb, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := Dial(context.Background(), ts.uri("g"), ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	buf := make([]byte, 4096)
	if _, err := c.ReadAtContext(ctx, buf, mib); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("stuck read: %v", err)
	}
	close(gb.gate)
	got := make([]byte, 8192)
	if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, want[:8192]) {
		t.Fatalf("read after a cancelled one: %v", err)
	}
}

// TestStreamCopyThroughNBD copies a sparse file into an export and back out
// with the copy engine, through the nbd+unix and nbd schemes: byte-exact,
// holes kept.
func TestStreamCopyThroughNBD(t *testing.T) {
	Register()
	Register() // idempotent
	ts := startServer(t, ServerOptions{}, true)
	src, want := sparseImage(t, ts.dir, 48*mib, 0, 2*mib, 20*mib, 4096, 40*mib, mib)
	// the export starts full of other data: holes must be zeroed there
	exp, _ := sparseImage(t, ts.dir, 48*mib, 0, 48*mib)
	if err := ts.AddExport("e", exp, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	copyURL := func(from, to string) stream.Result {
		t.Helper()
		s, err := stream.OpenSource(ctx, from, stream.SourceOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		d, err := stream.OpenSink(ctx, to, s.Size(), stream.SinkOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Abort()
		res, err := stream.Copy(ctx, s, d, stream.Options{SHA256: true})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	copyURL(src, ts.uri("e"))
	fileEqual(t, exp, want)
	if a := allocated(t, exp); a > 8*mib {
		t.Errorf("export allocates %d bytes after the copy, want holes punched", a)
	}
	out := filepath.Join(ts.dir, "out.raw")
	res := copyURL(ts.tcpURI("e"), out)
	fileEqual(t, out, want)
	if a := allocated(t, out); a > 8*mib {
		t.Errorf("copy out of the export allocates %d bytes, want sparse", a)
	}
	if res.BytesHoles == 0 {
		t.Errorf("no holes skipped: %+v", res)
	}
	// read-only export refuses to be a sink
	if err := ts.AddExport("ro", src, ExportOptions{ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.OpenSink(ctx, ts.uri("ro"), mib, stream.SinkOptions{}); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("sink on a read-only export: %v", err)
	}
	if _, err := stream.OpenSink(ctx, ts.uri("e"), 64*mib, stream.SinkOptions{}); !errdefs.IsInvalid(err) {
		t.Fatalf("sink larger than the export: %v", err)
	}
}

// TestClientQemuNbd reads a sparse image from qemu-nbd, which sends holes
// as structured OFFSET_HOLE chunks and reports zero extents.
func TestClientQemuNbd(t *testing.T) {
	needBin(t, "qemu-nbd")
	dir := t.TempDir()
	path, want := sparseImage(t, dir, 16*mib, 0, mib, 8*mib, 65536)
	sock := filepath.Join(dir, "q.sock")
	cmd := exec.Command("qemu-nbd", "-f", "raw", "-t", "-k", sock, path)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	var c *Client
	var err error
	for range 200 {
		if c, err = Dial(context.Background(), "nbd+unix:///?socket="+sock, ClientOptions{Connections: 2}); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make([]byte, len(want))
	if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read: %v, equal %v", err, bytes.Equal(got, want))
	}
	exts, err := c.BlockStatus(context.Background(), 0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	data := dataBytes(exts)
	if data < mib+65536 || data > 4*mib {
		t.Fatalf("qemu-nbd extents: %+v", exts)
	}
	if err := c.Zero(context.Background(), 0, 4096, ZeroOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadAt(got[:4096], 0); err != nil || !bytes.Equal(got[:4096], make([]byte, 4096)) {
		t.Fatalf("read after zero: %v", err)
	}
}

// dataBytes is how many bytes of exts are data (not holes).
func dataBytes(exts []stream.Extent) int64 {
	var n int64
	for _, x := range exts {
		if !x.Hole {
			n += x.Len
		}
	}
	return n
}

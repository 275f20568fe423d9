package stream

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/internal/envtest"
)

// rangeServer serves content with Range support. Before a request is
// answered, hook may change how: drop after some bytes, stall, etc.
type rangeServer struct {
	content  []byte
	etag     string
	digest   string // Repr-Digest value, if any
	noRanges bool
	requests atomic.Int64
	// misbehave returns how many bytes to send before dropping (-1: all)
	// and whether to stall instead of dropping.
	misbehave func(n int64) (cut int64, stall bool)
}

func (s *rangeServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := s.requests.Add(1)
	if s.digest != "" {
		w.Header().Set("Repr-Digest", s.digest)
	}
	w.Header().Set("ETag", s.etag)
	size := int64(len(s.content))
	from, to := int64(0), size-1
	status := http.StatusOK
	if rg := r.Header.Get("Range"); rg != "" && !s.noRanges {
		if ir := r.Header.Get("If-Range"); ir != "" && ir != s.etag {
			goto full
		}
		a, b, ok := strings.Cut(strings.TrimPrefix(rg, "bytes="), "-")
		if !ok {
			http.Error(w, "bad range", http.StatusBadRequest)
			return
		}
		from, _ = strconv.ParseInt(a, 10, 64)
		to, _ = strconv.ParseInt(b, 10, 64)
		if from >= size {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
			w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
			return
		}
		to = min(to, size-1)
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", from, to, size))
		status = http.StatusPartialContent
	}
full:
	body := s.content[from : to+1]
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	if s.misbehave != nil && len(body) > 1 {
		if cut, stall := s.misbehave(n); cut >= 0 {
			cut = min(cut, int64(len(body))/2)
			w.Write(body[:cut])
			w.(http.Flusher).Flush()
			if stall {
				select {
				case <-r.Context().Done():
				case <-time.After(10 * time.Second):
				}
			}
			panic(http.ErrAbortHandler) // drop the connection mid-body
		}
	}
	w.Write(body)
}

func newRangeServer(t *testing.T, content []byte) (*rangeServer, *httptest.Server) {
	s := &rangeServer{content: content, etag: `"` + sha(content)[:16] + `"`}
	ts := httptest.NewServer(s)
	t.Cleanup(ts.Close)
	return s, ts
}

func testOptions() Options {
	return Options{ChunkSize: testChunk, Workers: 3, CheckpointInterval: 20 * time.Millisecond}
}

func fastHTTP() HTTPOptions {
	return HTTPOptions{RetryBase: 5 * time.Millisecond, RetryMax: 20 * time.Millisecond, StallTimeout: 2 * time.Second}
}

// TestCopyMatrix copies every layout from every kind of source into every
// kind of sink and compares bytes and allocation.
func TestCopyMatrix(t *testing.T) {
	ctx := context.Background()
	haveQemu := false
	if _, err := qemuimg.Version(ctx); err == nil {
		haveQemu = true
	}
	type srcKind struct {
		name string
		open func(t *testing.T, path string, content []byte) Source
	}
	srcs := []srcKind{
		{"file", func(t *testing.T, path string, _ []byte) Source {
			s, err := OpenSource(ctx, path, SourceOptions{})
			if err != nil {
				t.Fatal(err)
			}
			return s
		}},
		{"file-direct", func(t *testing.T, path string, _ []byte) Source {
			s, err := OpenFileSource(path, ReadDirect)
			if err != nil {
				t.Fatal(err)
			}
			return s
		}},
		{"http", func(t *testing.T, _ string, content []byte) Source {
			_, ts := newRangeServer(t, content)
			s, err := OpenSource(ctx, ts.URL+"/img", SourceOptions{HTTP: fastHTTP()})
			if err != nil {
				t.Fatal(err)
			}
			return s
		}},
		{"http-no-ranges", func(t *testing.T, _ string, content []byte) Source {
			rs, ts := newRangeServer(t, content)
			rs.noRanges = true
			s, err := OpenSource(ctx, ts.URL+"/img", SourceOptions{HTTP: fastHTTP()})
			if err != nil {
				t.Fatal(err)
			}
			if !s.(Sequential).Sequential() {
				t.Fatal("server without ranges not detected")
			}
			return s
		}},
		{"qcow2", func(t *testing.T, path string, content []byte) Source {
			if !haveQemu {
				envtest.Skip(t, "qemu-img not installed")
			}
			if len(content)%512 != 0 {
				t.Skip("qcow2 sizes are multiples of 512")
			}
			q := path + ".qcow2"
			if err := qemuimg.New().Convert(ctx, path, q, "qcow2", qemuimg.SourceFormat("raw")); err != nil {
				t.Fatal(err)
			}
			s, err := OpenSource(ctx, q, SourceOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := s.(*Qcow2Source); !ok {
				t.Fatalf("qcow2 not detected: %T", s)
			}
			return s
		}},
		{"block-device", func(t *testing.T, path string, content []byte) Source {
			if len(content)%512 != 0 || len(content) == 0 {
				t.Skip("loop devices have a size in 512-byte sectors")
			}
			dev := loopDevice(t, path)
			s, err := OpenSource(ctx, dev, SourceOptions{})
			if err != nil {
				t.Fatal(err)
			}
			return s
		}},
	}
	type sinkKind struct {
		name  string
		opts  SinkOptions
		block bool
	}
	sinks := []sinkKind{
		{name: "file-evict"},
		{name: "file-direct", opts: SinkOptions{WriteMode: WriteDirect}},
		{name: "file-buffered", opts: SinkOptions{WriteMode: WriteBuffered}},
		{name: "qcow2", opts: SinkOptions{Format: "qcow2"}},
		{name: "block-device", block: true},
	}
	for _, l := range layouts {
		for _, sk := range srcs {
			for _, dk := range sinks {
				t.Run(l.name+"/"+sk.name+"/"+dk.name, func(t *testing.T) {
					if dk.opts.Format == "qcow2" && (!haveQemu || l.size%512 != 0) {
						t.Skip("needs qemu-img and a size multiple of 512")
					}
					dir := t.TempDir()
					path, content := makeImage(t, dir, l, uint64(len(l.name)))
					src := sk.open(t, path, content)
					defer src.Close()
					if src.Size() != l.size {
						t.Fatalf("source size %d, want %d", src.Size(), l.size)
					}
					out := filepath.Join(dir, "out.img")
					var backing string
					if dk.block {
						if l.size == 0 || l.size%512 != 0 {
							t.Skip("loop devices have a size in 512-byte sectors")
						}
						// a device full of garbage: holes must be zeroed on it
						backing = filepath.Join(dir, "dev.img")
						if err := os.WriteFile(backing, bytes.Repeat([]byte{0xAB}, int(l.size)), 0o644); err != nil {
							t.Fatal(err)
						}
						out = loopDevice(t, backing)
					}
					dst, err := OpenSink(ctx, out, src.Size(), dk.opts)
					if err != nil {
						t.Fatal(err)
					}
					res, err := Copy(ctx, src, dst, Options{ChunkSize: testChunk, Workers: 3, SHA256: true})
					if err != nil {
						t.Fatal(err)
					}
					if res.SHA256 != sha(content) {
						t.Fatalf("in-stream sha256 %s, want %s", res.SHA256, sha(content))
					}
					if res.Size != l.size {
						t.Fatalf("result size %d", res.Size)
					}
					check := out
					if dk.opts.Format == "qcow2" {
						q, err := OpenSource(ctx, out, SourceOptions{})
						if err != nil {
							t.Fatal(err)
						}
						buf := make([]byte, l.size)
						if _, err := q.ReadAt(buf, 0); err != nil && l.size > 0 {
							t.Fatal(err)
						}
						q.Close()
						if !bytes.Equal(buf, content) {
							t.Fatal("qcow2 output differs")
						}
						m, err := qemuimg.New().Map(ctx, out, "qcow2")
						if err != nil {
							t.Fatal(err)
						}
						// qemu-img allocates whole 64 KiB clusters
						if got, max := qemuimg.DataBytes(m), expectedData(content)+40*65536; got > max {
							t.Fatalf("qcow2 output maps %d data bytes, want at most %d", got, max)
						}
						if expectedData(content) == 0 && qemuimg.DataBytes(m) != 0 {
							t.Fatalf("all-zero input gave %d data bytes in qcow2", qemuimg.DataBytes(m))
						}
						return
					}
					if fileSHA(t, check) != sha(content) {
						t.Fatalf("output differs from source")
					}
					if dk.block {
						if got, want := dataBytes(t, backing), expectedData(content); got != want {
							t.Logf("device backing file holds %d data bytes, exact would be %d (zeroed, not punched)", got, want)
						}
						return
					}
					if got, want := dataBytes(t, out), expectedData(content); got != want {
						t.Fatalf("destination holds %d data bytes, want exactly %d", got, want)
					}
					if names := onlyFiles(t, dir); len(names) > 3 {
						t.Fatalf("leftover files: %v", names)
					}
				})
			}
		}
	}
}

func TestZeroFilledDenseBecomesHoles(t *testing.T) {
	dir := t.TempDir()
	l := layout{name: "zeros", size: 4 << 20, parts: []part{{0, 4 << 20, true}}}
	path, _ := makeImage(t, dir, l, 1)
	if dataBytes(t, path) != 4<<20 {
		t.Fatal("source should be fully allocated")
	}
	out := filepath.Join(dir, "out")
	res := copyPath(t, path, out, testOptions())
	if res.BytesZero != 4<<20 || res.BytesWritten != 0 {
		t.Fatalf("zeros %d written %d", res.BytesZero, res.BytesWritten)
	}
	if n := dataBytes(t, out); n != 0 {
		t.Fatalf("destination has %d data bytes", n)
	}
}

func TestDenseOptionAllocatesEverything(t *testing.T) {
	dir := t.TempDir()
	l := layouts[4]
	path, content := makeImage(t, dir, l, 3)
	out := filepath.Join(dir, "out")
	o := testOptions()
	o.Dense = true
	copyPath(t, path, out, o)
	if fileSHA(t, out) != sha(content) {
		t.Fatal("differs")
	}
	if n := dataBytes(t, out); n != l.size {
		t.Fatalf("dense copy has %d data bytes of %d", n, l.size)
	}
}

func TestCopyFileRangeModeKeepsHoles(t *testing.T) {
	dir := t.TempDir()
	l := layouts[4]
	path, content := makeImage(t, dir, l, 5)
	out := filepath.Join(dir, "out")
	o := testOptions()
	o.Mode = CopyCFR
	res := copyPath(t, path, out, o)
	if res.Method != "copy_file_range" {
		t.Fatalf("method %s", res.Method)
	}
	if fileSHA(t, out) != sha(content) {
		t.Fatal("differs")
	}
	// only data extents are passed to copy_file_range: holes stay holes
	if got, src := dataBytes(t, out), dataBytes(t, path); got > src {
		t.Fatalf("cfr copy holds %d data bytes, source %d", got, src)
	}
}

func copyPath(t *testing.T, from, to string, o Options) Result {
	t.Helper()
	ctx := context.Background()
	src, err := OpenSource(ctx, from, SourceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := OpenSink(ctx, to, src.Size(), SinkOptions{Resume: o.Resume})
	if err != nil {
		t.Fatal(err)
	}
	res, err := Copy(ctx, src, dst, o)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func TestExpectedChecksum(t *testing.T) {
	dir := t.TempDir()
	path, content := makeImage(t, dir, layouts[3], 9)
	ctx := context.Background()
	for _, tc := range []struct {
		sum  string
		fail bool
	}{{"sha256:" + sha(content), false}, {"sha256:" + strings.Repeat("0", 64), true}} {
		out := filepath.Join(dir, "out")
		src, _ := OpenSource(ctx, path, SourceOptions{})
		dst, err := OpenSink(ctx, out, src.Size(), SinkOptions{})
		if err != nil {
			t.Fatal(err)
		}
		o := testOptions()
		o.ExpectSHA256 = tc.sum
		_, err = Copy(ctx, src, dst, o)
		src.Close()
		if !tc.fail {
			if err != nil {
				t.Fatal(err)
			}
			os.Remove(out)
			continue
		}
		if !errors.Is(err, errdefs.ErrDataLoss) {
			t.Fatalf("want data loss, got %v", err)
		}
		if names := onlyFiles(t, dir); len(names) != 1 {
			t.Fatalf("a failed copy left files behind: %v", names)
		}
	}
	src, _ := OpenSource(ctx, path, SourceOptions{})
	defer src.Close()
	dst, _ := OpenSink(ctx, filepath.Join(dir, "x"), src.Size(), SinkOptions{})
	o := testOptions()
	o.ExpectSHA256 = "md5:abc"
	if _, err := Copy(ctx, src, dst, o); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("bad checksum syntax: %v", err)
	}
}

func TestHTTPDropsConnectionMidway(t *testing.T) {
	dir := t.TempDir()
	path, content := makeImage(t, dir, layouts[4], 11)
	rs, ts := newRangeServer(t, content)
	// every second request of the first eight is cut after 1000 bytes:
	// four cuts, fewer than the source's six attempts, so no interleaving
	// of the workers' requests can make one range fail six times running
	// (cutting every second request for ever did, now and then, under load)
	rs.misbehave = func(n int64) (int64, bool) {
		if n%2 == 0 && n <= 8 {
			return 1000, false
		}
		return -1, false
	}
	ctx := context.Background()
	src, err := OpenSource(ctx, ts.URL, SourceOptions{HTTP: fastHTTP()})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	out := filepath.Join(dir, "out")
	dst, _ := OpenSink(ctx, out, src.Size(), SinkOptions{})
	res, err := Copy(ctx, src, dst, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	if res.ReadRetries == 0 {
		t.Fatal("expected retries")
	}
	if fileSHA(t, out) != fileSHA(t, path) {
		t.Fatal("differs")
	}
	if got, want := dataBytes(t, out), expectedData(content); got != want {
		t.Fatalf("allocation %d want %d", got, want)
	}
}

func TestHTTPStallRetriesThenFails(t *testing.T) {
	dir := t.TempDir()
	_, content := makeImage(t, dir, layouts[3], 12)
	ctx := context.Background()
	h := HTTPOptions{RetryBase: time.Millisecond, RetryMax: 5 * time.Millisecond, StallTimeout: 150 * time.Millisecond, MaxRetries: 2}

	// stalls once, then serves: the copy succeeds
	rs, ts := newRangeServer(t, content)
	rs.misbehave = func(n int64) (int64, bool) {
		if n == 2 {
			return 10, true
		}
		return -1, false
	}
	src, err := OpenSource(ctx, ts.URL, SourceOptions{HTTP: h})
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	dst, _ := OpenSink(ctx, out, src.Size(), SinkOptions{})
	res, err := Copy(ctx, src, dst, Options{ChunkSize: testChunk, Workers: 1})
	src.Close()
	if err != nil {
		t.Fatal(err)
	}
	if res.ReadRetries == 0 || fileSHA(t, out) != sha(content) {
		t.Fatalf("retries %d, or output differs", res.ReadRetries)
	}

	// always stalls: unavailable, quickly, with nothing visible
	rs2, ts2 := newRangeServer(t, content)
	rs2.misbehave = func(n int64) (int64, bool) {
		if n > 1 {
			return 10, true
		}
		return -1, false
	}
	src, err = OpenSource(ctx, ts2.URL, SourceOptions{HTTP: h})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	out2 := filepath.Join(dir, "out2")
	dst, _ = OpenSink(ctx, out2, src.Size(), SinkOptions{})
	start := time.Now()
	_, err = Copy(ctx, src, dst, Options{ChunkSize: testChunk, Workers: 2})
	if !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("want unavailable, got %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("took %s to give up", d)
	}
	if _, err := os.Stat(out2); !os.IsNotExist(err) {
		t.Fatal("destination visible after a failed copy")
	}
}

func TestHTTPAnnouncedChecksum(t *testing.T) {
	dir := t.TempDir()
	_, content := makeImage(t, dir, layouts[3], 13)
	ctx := context.Background()
	good := sha256.Sum256(content)
	bad := sha256.Sum256([]byte("something else"))
	for _, tc := range []struct {
		name   string
		digest string
		fail   bool
	}{
		{"right", "sha-256=:" + base64.StdEncoding.EncodeToString(good[:]) + ":", false},
		{"wrong", "sha-256=:" + base64.StdEncoding.EncodeToString(bad[:]) + ":", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rs, ts := newRangeServer(t, content)
			rs.digest = tc.digest
			src, err := OpenSource(ctx, ts.URL, SourceOptions{HTTP: fastHTTP()})
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			sub := t.TempDir()
			out := filepath.Join(sub, "out")
			dst, _ := OpenSink(ctx, out, src.Size(), SinkOptions{})
			res, err := Copy(ctx, src, dst, testOptions())
			if !tc.fail {
				if err != nil || !res.SourceChecked || res.SHA256 != sha(content) {
					t.Fatalf("err %v checked %v", err, res.SourceChecked)
				}
				return
			}
			if !errors.Is(err, errdefs.ErrDataLoss) {
				t.Fatalf("want data loss, got %v", err)
			}
			if names := onlyFiles(t, sub); len(names) != 0 {
				t.Fatalf("left behind: %v", names)
			}
		})
	}
}

func TestHTTPErrors(t *testing.T) {
	ctx := context.Background()
	ts := httptest.NewServer(http.NotFoundHandler())
	defer ts.Close()
	if _, err := OpenSource(ctx, ts.URL+"/nope", SourceOptions{HTTP: fastHTTP()}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("404: %v", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	h := fastHTTP()
	h.MaxRetries = 2
	if _, err := OpenSource(ctx, "http://"+addr+"/x", SourceOptions{HTTP: h}); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("refused: %v", err)
	}
	if _, err := OpenSource(ctx, "nbd://127.0.0.1/x", SourceOptions{}); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Fatalf("nbd: %v", err)
	}
	if _, err := OpenSource(ctx, "/does/not/exist", SourceOptions{}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("missing file: %v", err)
	}
}

// interrupted starts a copy limited to rate bytes/s and cancels it once a
// checkpoint lists some chunks; it returns the source and destination paths.
func interrupted(t *testing.T, sha bool) (dir, path, out string, content []byte) {
	t.Helper()
	dir = t.TempDir()
	l := layout{name: "big", size: 64 * testChunk, parts: []part{{0, 20 * testChunk, false}, {30 * testChunk, 34 * testChunk, false}}}
	path, content = makeImage(t, dir, l, 21)
	out = filepath.Join(dir, "out")
	ctx, cancel := context.WithCancel(context.Background())
	src, err := OpenSource(ctx, path, SourceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := OpenSink(ctx, out, src.Size(), SinkOptions{})
	if err != nil {
		t.Fatal(err)
	}
	o := testOptions()
	o.RateLimit = 8 << 20 // 54 chunks of data at 8 MiB/s: about 0.4 s
	o.SHA256 = sha
	go func() {
		for {
			time.Sleep(10 * time.Millisecond)
			if c, err := loadCheckpoint(CheckpointPathFor(out)); err == nil {
				n := 0
				for i := range int64(64) {
					if bitGet(c.Done, i) {
						n++
					}
				}
				if n >= 20 {
					cancel()
					return
				}
			}
		}
	}()
	_, err = Copy(ctx, src, dst, o)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("want canceled, got %v", err)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Fatal("partial destination is visible")
	}
	if _, err := os.Stat(TempPath(out)); err != nil {
		t.Fatal("partial work was not kept")
	}
	return dir, path, out, content
}

func TestResumeAfterCancel(t *testing.T) {
	for _, withSHA := range []bool{false, true} {
		t.Run(fmt.Sprintf("sha=%v", withSHA), func(t *testing.T) {
			_, path, out, content := interrupted(t, withSHA)
			o := testOptions()
			o.Resume, o.SHA256 = true, withSHA
			res := copyPath(t, path, out, o)
			if !res.Resumed || res.BytesResumed == 0 || res.BytesResumed == res.Size {
				t.Fatalf("resumed %v bytes %d", res.Resumed, res.BytesResumed)
			}
			if fileSHA(t, out) != sha(content) {
				t.Fatal("resumed copy differs")
			}
			if withSHA && res.SHA256 != sha(content) {
				t.Fatalf("sha after resume %s", res.SHA256)
			}
			if _, err := os.Stat(CheckpointPathFor(out)); !os.IsNotExist(err) {
				t.Fatal("checkpoint left after success")
			}
		})
	}
}

func TestResumeRedoesCorruptChunks(t *testing.T) {
	_, path, out, content := interrupted(t, false)
	c, err := loadCheckpoint(CheckpointPathFor(out))
	if err != nil {
		t.Fatal(err)
	}
	// corrupt the first done chunk in the partial file
	f, err := os.OpenFile(TempPath(out), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := int64(0); i < 64; i++ {
		if bitGet(c.Done, i) {
			f.WriteAt([]byte("garbage"), i*testChunk+100)
			break
		}
	}
	f.Close()
	o := testOptions()
	o.Resume = true
	res := copyPath(t, path, out, o)
	if res.ChunksRedone != 1 {
		t.Fatalf("redone %d chunks, want 1", res.ChunksRedone)
	}
	if fileSHA(t, out) != sha(content) {
		t.Fatal("differs")
	}
}

func TestResumeAfterSourceChanged(t *testing.T) {
	_, path, out, _ := interrupted(t, false)
	f, _ := os.OpenFile(path, os.O_RDWR, 0)
	f.WriteAt([]byte("changed"), 5)
	f.Close()
	now := time.Now().Add(time.Second)
	os.Chtimes(path, now, now)
	o := testOptions()
	o.Resume = true
	res := copyPath(t, path, out, o)
	if res.BytesResumed != 0 {
		t.Fatalf("resumed %d bytes from a stale checkpoint", res.BytesResumed)
	}
	if fileSHA(t, out) != fileSHA(t, path) {
		t.Fatal("differs")
	}
}

func TestNoResumeStartsOver(t *testing.T) {
	_, path, out, content := interrupted(t, false)
	res := copyPath(t, path, out, testOptions())
	if res.Resumed || res.BytesResumed != 0 {
		t.Fatal("resumed without Resume")
	}
	if fileSHA(t, out) != sha(content) {
		t.Fatal("differs")
	}
}

func TestVerify(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	a, content := makeImage(t, dir, layouts[4], 31)
	b := filepath.Join(dir, "b")
	copyPath(t, a, b, testOptions())
	open := func(p string) Source {
		s, err := OpenSource(ctx, p, SourceOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	res, err := Verify(ctx, open(a), open(b), VerifyOptions{ChunkSize: testChunk})
	if err != nil || !res.Equal || res.BytesSkipped == 0 {
		t.Fatalf("equal copies: %+v %v", res, err)
	}
	// a byte in a hole of a, and a byte changed in data
	for _, off := range []int64{20*testChunk + 3, 5*testChunk + 200} {
		c := filepath.Join(dir, fmt.Sprintf("c%d", off))
		copyPath(t, a, c, testOptions())
		f, _ := os.OpenFile(c, os.O_RDWR, 0)
		f.WriteAt([]byte{content[off] ^ 0xff}, off)
		f.Close()
		res, err = Verify(ctx, open(a), open(c), VerifyOptions{ChunkSize: testChunk})
		if !errors.Is(err, errdefs.ErrDataLoss) || res.Equal || res.FirstDiff != off {
			t.Fatalf("diff at %d: %+v %v", off, res, err)
		}
	}
	short := filepath.Join(dir, "short")
	os.WriteFile(short, content[:100], 0o644)
	res, err = Verify(ctx, open(a), open(short), VerifyOptions{})
	if !errors.Is(err, errdefs.ErrDataLoss) || res.Equal {
		t.Fatalf("sizes differ: %+v %v", res, err)
	}
}

func TestCancelStopsPromptly(t *testing.T) {
	dir := t.TempDir()
	path, _ := makeImage(t, dir, layouts[3], 41)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	src, _ := OpenSource(ctx, path, SourceOptions{})
	defer src.Close()
	dst, _ := OpenSink(ctx, filepath.Join(dir, "out"), src.Size(), SinkOptions{})
	_, err := Copy(ctx, src, dst, testOptions())
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v", err)
	}
}

func TestProgressReported(t *testing.T) {
	dir := t.TempDir()
	path, _ := makeImage(t, dir, layouts[4], 51)
	var last Progress
	calls := 0
	o := testOptions()
	o.Progress = func(p Progress) { last = p; calls++ }
	o.ProgressInterval = time.Millisecond
	copyPath(t, path, filepath.Join(dir, "out"), o)
	if calls == 0 || !last.Final || last.Done != last.Total {
		t.Fatalf("progress %+v after %d calls", last, calls)
	}
}

// TestReflinkXFS copies within a loop-mounted XFS with reflink=1.
func TestReflinkXFS(t *testing.T) {
	needRoot(t)
	needTool(t, "mkfs.xfs")
	dir := t.TempDir()
	img := filepath.Join(dir, "xfs.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Truncate(img, 320<<20)
	run(t, "mkfs.xfs", "-q", "-m", "reflink=1", img)
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	if out, err := execCommand("mount", "-o", "loop", img, mnt); err != nil {
		t.Skipf("cannot mount xfs: %v %s", err, out)
	}
	t.Cleanup(func() { execCommand("umount", mnt) })
	path, content := makeImage(t, mnt, layouts[4], 61)
	out := filepath.Join(mnt, "clone")
	o := testOptions()
	o.SHA256 = true
	res := copyPath(t, path, out, o)
	if res.Method != "reflink" || res.BytesReflink != res.Size {
		t.Fatalf("method %s", res.Method)
	}
	if fileSHA(t, out) != sha(content) || res.SHA256 != sha(content) {
		t.Fatal("differs")
	}
	if n := dataBytes(t, out); n != dataBytes(t, path) {
		t.Fatalf("clone allocation %d", n)
	}
	// CopyReflink on ext4/tmp (another filesystem): not implemented
	src, _ := OpenSource(context.Background(), path, SourceOptions{})
	defer src.Close()
	dst, _ := OpenSink(context.Background(), filepath.Join(dir, "x"), src.Size(), SinkOptions{})
	o.Mode = CopyReflink
	if _, err := Copy(context.Background(), src, dst, o); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Fatalf("reflink across filesystems: %v", err)
	}
}

func TestZeroRuns(t *testing.T) {
	buf := make([]byte, 5*4096+10)
	buf[4096+7] = 1
	buf[4*4096] = 1
	var got []string
	zeroRuns(buf, 0, 4096, func(s, e int, z bool) error {
		got = append(got, fmt.Sprintf("%d-%d:%v", s, e, z))
		return nil
	})
	want := "0-4096:true 4096-8192:false 8192-16384:true 16384-20480:false 20480-20490:true"
	if strings.Join(got, " ") != want {
		t.Fatalf("got %v", got)
	}
	// unaligned start offset: blocks follow absolute offsets
	got = nil
	b := make([]byte, 8192)
	b[100] = 1
	zeroRuns(b, 4000, 4096, func(s, e int, z bool) error {
		got = append(got, fmt.Sprintf("%d-%d:%v", s, e, z))
		return nil
	})
	if strings.Join(got, " ") != "0-96:true 96-4192:false 4192-8192:true" {
		t.Fatalf("got %v", got)
	}
}

func TestAnnouncedSHA256(t *testing.T) {
	sum := sha256.Sum256([]byte("x"))
	hexs := fmt.Sprintf("%x", sum)
	b64 := base64.StdEncoding.EncodeToString(sum[:])
	for _, h := range []http.Header{
		{"Repr-Digest": {"sha-512=:AAAA:, sha-256=:" + b64 + ":"}},
		{"Digest": {"SHA-256=" + b64}},
		{"X-Checksum-Sha256": {hexs}},
	} {
		if got := announcedSHA256(h); got != hexs {
			t.Fatalf("%v: %q", h, got)
		}
	}
}

// TestReadTotals: the counters an agent reports in its heartbeat follow
// the copies (other tests of the package may copy at the same time, so
// only lower bounds hold), and a checksum mismatch is counted as such.
func TestReadTotals(t *testing.T) {
	dir := t.TempDir()
	path, _ := makeImage(t, dir, layouts[3], 11)
	before := ReadTotals()
	res := copyPath(t, path, filepath.Join(dir, "out"), testOptions())
	after := ReadTotals()
	if got := after.Bytes["read"] - before.Bytes["read"]; got < res.BytesRead || res.BytesRead == 0 {
		t.Errorf("read bytes went up by %d, the copy read %d", got, res.BytesRead)
	}
	if got := after.Bytes["written"] - before.Bytes["written"]; got < res.BytesWritten || res.BytesWritten == 0 {
		t.Errorf("written bytes went up by %d, the copy wrote %d", got, res.BytesWritten)
	}
	ok := CopyKey{Method: res.Method, Result: "ok"}
	if after.Copies[ok]-before.Copies[ok] < 1 {
		t.Errorf("copies %+v: %d before, %d after, want one more", ok, before.Copies[ok], after.Copies[ok])
	}

	ctx := context.Background()
	src, err := OpenSource(ctx, path, SourceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := OpenSink(ctx, filepath.Join(dir, "bad"), src.Size(), SinkOptions{})
	if err != nil {
		t.Fatal(err)
	}
	o := testOptions()
	o.ExpectSHA256 = "sha256:" + strings.Repeat("0", 64)
	if _, err := Copy(ctx, src, dst, o); !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("a copy with the wrong checksum: %v", err)
	}
	mismatches := 0
	for k, n := range ReadTotals().Copies {
		if k.Result == "checksum_mismatch" {
			mismatches += int(n)
		}
	}
	if mismatches < 1 {
		t.Errorf("no checksum_mismatch copy counted: %+v", ReadTotals().Copies)
	}
}

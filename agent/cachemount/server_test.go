package cachemount

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stowage/stowage/datapath/imagecache"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/internal/envtest"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		envtest.Skip(t, "FUSE mounts need root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		envtest.Skip(t, "no /dev/fuse")
	}
}

// origin serves one blob with Range support and counts GETs; down makes
// it answer 503.
type origin struct {
	*httptest.Server
	gets atomic.Int64
	down atomic.Bool
}

func newOrigin(t *testing.T, data []byte) *origin {
	o := &origin{}
	o.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if o.down.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		if r.Method == http.MethodGet {
			o.gets.Add(1)
		}
		http.ServeContent(w, r, "t", time.Time{}, bytes.NewReader(data))
	}))
	t.Cleanup(o.Close)
	return o
}

func openServer(t *testing.T, dir string) *Server {
	t.Helper()
	s, err := Open(t.Context(), Config{
		Mount: filepath.Join(dir, "mnt"),
		Cache: imagecache.Options{Dir: filepath.Join(dir, "cache"), ChunkSize: 64 << 10, PrefetchRate: -1, ReadAhead: -1,
			Open: imagecache.OpenStream(defaultHTTP())},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(time.Second) })
	return s
}

func status(t *testing.T, s *Server, id string) *stowagev1.CachedTemplate {
	t.Helper()
	for _, ct := range s.Status().GetTemplates() {
		if ct.GetId() == id {
			return ct
		}
	}
	return nil
}

func readAt(t *testing.T, path string, n int, off int64) ([]byte, error) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, n)
	_, err = f.ReadAt(b, off)
	return b, err
}

// The source of a template moves (its serving agent restarted under a new
// export URL): the chunks cached so far are kept and later reads go to the
// new URL. A different content identity drops them.
func TestSyncMovesSourceKeepsChunks(t *testing.T) {
	needRoot(t)
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	o1, o2 := newOrigin(t, data), newOrigin(t, data)
	s := openServer(t, t.TempDir())
	ctx := context.Background()
	spec := &stowagev1.CacheSpec{Id: "t1", Url: o1.URL, Size: int64(len(data)), Identity: "sha256:a"}
	if _, err := s.Sync(ctx, []*stowagev1.CacheSpec{spec}); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(s.cfg.Mount, "t1")
	if b, err := readAt(t, file, 256<<10, 0); err != nil || !bytes.Equal(b, data[:256<<10]) {
		t.Fatalf("first read: %v", err)
	}
	cached := status(t, s, "t1").GetCachedBytes()
	if cached < 256<<10 {
		t.Fatalf("cached %d bytes after reading 256 KiB", cached)
	}
	o1.down.Store(true)
	spec.Url = o2.URL
	if _, err := s.Sync(ctx, []*stowagev1.CacheSpec{spec}); err != nil {
		t.Fatal(err)
	}
	if got := status(t, s, "t1").GetCachedBytes(); got != cached {
		t.Fatalf("cached bytes %d -> %d after the source moved", cached, got)
	}
	if b, err := readAt(t, file, len(data), 0); err != nil || !bytes.Equal(b, data) {
		t.Fatalf("whole read after the move: %v", err)
	}
	if o2.gets.Load() == 0 {
		t.Fatal("the new source was never read")
	}
	// Same id, other content: the cached chunks go.
	spec.Identity = "sha256:b"
	if _, err := s.Sync(ctx, []*stowagev1.CacheSpec{spec}); err != nil {
		t.Fatal(err)
	}
	if got := status(t, s, "t1").GetCachedBytes(); got != 0 {
		t.Fatalf("a new identity kept %d cached bytes", got)
	}
}

// A pinned template dropped from the desired set stays one more sync,
// unpinned, then goes; bad requests change nothing; state survives a
// restart of the server.
func TestSyncPinsBadInputAndState(t *testing.T) {
	needRoot(t)
	data := bytes.Repeat([]byte{7}, 200<<10)
	o := newOrigin(t, data)
	dir := t.TempDir()
	s := openServer(t, dir)
	ctx := context.Background()
	a := &stowagev1.CacheSpec{Id: "a", Url: o.URL, Size: int64(len(data)), Pinned: true}
	b := &stowagev1.CacheSpec{Id: "b", Url: o.URL, Size: int64(len(data))}
	if _, err := s.Sync(ctx, []*stowagev1.CacheSpec{a, b}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range [][]*stowagev1.CacheSpec{
		{{Id: "x/y", Url: o.URL, Size: 1}},
		{{Id: "..", Url: o.URL, Size: 1}},
		{{Id: "z", Size: 1}},
		{{Id: "z", Url: o.URL}},
		{a, a},
	} {
		if _, err := s.Sync(ctx, bad); !errors.Is(err, errdefs.ErrInvalid) {
			t.Fatalf("sync %v: %v, want invalid", bad, err)
		}
	}
	if st := s.Status(); len(st.GetTemplates()) != 2 {
		t.Fatalf("a refused sync changed the mount: %v", st)
	}
	if _, err := s.Sync(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if ct := status(t, s, "a"); ct == nil || ct.GetPinned() {
		t.Fatalf("pinned template after the first sync without it: %v (want kept, unpinned)", ct)
	}
	if status(t, s, "b") != nil {
		t.Fatal("unpinned template b kept")
	}
	if _, err := s.Sync(ctx, []*stowagev1.CacheSpec{b}); err != nil {
		t.Fatal(err)
	}
	if status(t, s, "a") != nil {
		t.Fatal("template a kept after two syncs without it")
	}
	if _, err := os.Stat(filepath.Join(s.cfg.Mount, "b")); err != nil {
		t.Fatalf("b in the mount: %v", err)
	}
	// Restart: the state file brings b back before anyone syncs.
	if err := s.Close(time.Second); err != nil {
		t.Fatal(err)
	}
	s2 := openServer(t, dir)
	if b2, err := readAt(t, filepath.Join(s2.cfg.Mount, "b"), len(data), 0); err != nil || !bytes.Equal(b2, data) {
		t.Fatalf("b after a restart: %v", err)
	}
}

// A read whose source dies waits for the template's location to move and
// then succeeds from the new one, instead of failing the VM's read.
func TestReadWaitsForSourceMove(t *testing.T) {
	needRoot(t)
	data := bytes.Repeat([]byte("stowage!"), 64<<10) // 512 KiB
	o1, o2 := newOrigin(t, data), newOrigin(t, data)
	s := openServer(t, t.TempDir())
	ctx := context.Background()
	spec := &stowagev1.CacheSpec{Id: "t1", Url: o1.URL, Size: int64(len(data)), Identity: "sha256:x"}
	if _, err := s.Sync(ctx, []*stowagev1.CacheSpec{spec}); err != nil {
		t.Fatal(err)
	}
	o1.down.Store(true)
	done := make(chan error, 1)
	go func() {
		b, err := readAt(t, filepath.Join(s.cfg.Mount, "t1"), 64<<10, 128<<10)
		if err == nil && !bytes.Equal(b, data[128<<10:192<<10]) {
			err = errors.New("wrong bytes")
		}
		done <- err
	}()
	// The read is waiting (its source answers 503); move the template.
	select {
	case err := <-done:
		t.Fatalf("the read ended before the source moved: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	spec.Url = o2.URL
	if _, err := s.Sync(ctx, []*stowagev1.CacheSpec{spec}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("read after the move: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the read did not finish after the move")
	}
}

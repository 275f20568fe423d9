package hostfs

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/datapath/chunkstore"
	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/internal/envtest"
)

func needQemuIO(t *testing.T) {
	t.Helper()
	needQemuImg(t)
	if _, err := exec.LookPath("qemu-io"); err != nil {
		envtest.Skipf(t, "qemu-io is not installed (apt-get install qemu-utils): %v", err)
	}
}

// qio runs qemu-io commands on an image.
func qio(t *testing.T, path, format string, cmds ...string) {
	t.Helper()
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := exec.Command("qemu-io", append(args, path)...).CombinedOutput()
	if err != nil || bytes.Contains(out, []byte("Pattern verification failed")) || bytes.Contains(out, []byte("failed")) {
		t.Fatalf("qemu-io %s %q: %v: %s", path, cmds, err, out)
	}
}

// qemuCompare reports whether two images read the same (qemu-img compare).
func qemuCompare(t *testing.T, a, fa, b, fb string) bool {
	t.Helper()
	err := exec.Command("qemu-img", "compare", "-f", fa, "-F", fb, a, b).Run()
	var exit *exec.ExitError
	if errors.As(err, &exit) && exit.ExitCode() == 1 {
		return false
	}
	if err != nil {
		t.Fatalf("qemu-img compare %s %s: %v", a, b, err)
	}
	return true
}

// storeDir makes dir a store directory (its marker), so that backing
// chains inside it pass the agent's checks; it returns dir.
func storeDir(t *testing.T, dir string) string {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, MarkerFile), []byte(`{"store_id":"test"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func qcreate(t *testing.T, path, format string, size int64, opts ...qemuimg.CreateOption) {
	t.Helper()
	if err := qemuimg.New().Create(t.Context(), path, format, size, opts...); err != nil {
		t.Fatal(err)
	}
}

func digest(t *testing.T, path string) (sha, sha5, m5 string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	a, c, d := sha256.Sum256(b), sha512.Sum512(b), md5.Sum(b)
	return hex.EncodeToString(a[:]), hex.EncodeToString(c[:]), hex.EncodeToString(d[:])
}

// onlyEntries fails unless dir holds exactly names (temporary files included).
func onlyEntries(t *testing.T, dir string, names ...string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		if e.Name() != MarkerFile {
			got = append(got, e.Name())
		}
	}
	if strings.Join(got, " ") != strings.Join(names, " ") {
		t.Fatalf("%s holds %q, want %q", dir, got, names)
	}
}

// progressRecorder counts callbacks and checks they never run concurrently.
type progressRecorder struct {
	calls   atomic.Int32
	running atomic.Int32
	last    atomic.Int64
	t       *testing.T
}

func (p *progressRecorder) fn(done, total int64) {
	if p.running.Add(1) != 1 {
		p.t.Error("progress called concurrently")
	}
	p.calls.Add(1)
	p.last.Store(done)
	if total > 0 && done > total {
		p.t.Errorf("progress %d of %d", done, total)
	}
	p.running.Add(-1)
}

// templates writes the images the fetch tests serve into dir.
func templates(t *testing.T, dir string) {
	t.Helper()
	raw := filepath.Join(dir, "t.raw")
	qcreate(t, raw, "raw", 4<<20)
	qio(t, raw, "raw", "write -P 0x5a 0 1M", "write -P 0x11 3M 64k")
	q := filepath.Join(dir, "t.qcow2")
	qcreate(t, q, "qcow2", 4<<20)
	qio(t, q, "qcow2", "write -P 0x22 0 256k")
	qcreate(t, filepath.Join(dir, "backed.qcow2"), "qcow2", 0, qemuimg.BackingFile(q, "qcow2"))
	iso := make([]byte, 64<<10)
	copy(iso[isoMagicOffset:], isoMagic)
	os.WriteFile(filepath.Join(dir, "t.iso"), iso, 0o644)
	os.WriteFile(filepath.Join(dir, "fake.iso"), make([]byte, 64<<10), 0o644)
}

func TestFetchImage(t *testing.T) {
	needQemuIO(t)
	ctx := t.Context()
	srcDir := t.TempDir()
	templates(t, srcDir)
	srv := httptest.NewServer(http.FileServer(http.Dir(srcDir)))
	defer srv.Close()
	l := New("h1")
	dst := t.TempDir()
	sha, sha5, m5 := digest(t, filepath.Join(srcDir, "t.raw"))

	// Good checksums of each kind, over HTTP, file:// and a plain path.
	for i, c := range []struct{ src, sum string }{
		{srv.URL + "/t.raw", "sha256:" + sha},
		{srv.URL + "/t.raw", "sha512:" + sha5},
		{srv.URL + "/t.raw", "md5:" + strings.ToUpper(m5)},
		{"file://" + filepath.Join(srcDir, "t.raw"), "{SHA-256}" + sha},
		{filepath.Join(srcDir, "t.raw"), m5},
	} {
		dest := filepath.Join(dst, "r"+string(rune('0'+i))+".raw")
		var p progressRecorder
		p.t = t
		info, err := l.FetchImage(ctx, FetchRequest{Source: c.src, Dest: dest, Format: drivers.FormatRaw, Checksum: c.sum}, p.fn)
		if err != nil {
			t.Fatalf("fetch %s with %s: %v", c.src, c.sum, err)
		}
		if info.SHA256 != sha || info.VirtualSize != 4<<20 || info.Format != drivers.FormatRaw || info.Path != dest {
			t.Errorf("fetch %s: info %+v", c.src, info)
		}
		if info.PhysicalSize >= 3<<20 {
			t.Errorf("fetch %s: %d bytes allocated, want a sparse copy", c.src, info.PhysicalSize)
		}
		if p.calls.Load() == 0 || p.last.Load() != 4<<20 {
			t.Errorf("fetch %s: progress calls %d, last %d", c.src, p.calls.Load(), p.last.Load())
		}
		if got, _, _ := digest(t, dest); got != sha {
			t.Fatalf("fetched bytes differ")
		}
	}
	onlyEntries(t, dst, "r0.raw", "r1.raw", "r2.raw", "r3.raw", "r4.raw")

	// A retried fetch returns the image; another image at the path is refused.
	again, err := l.FetchImage(ctx, FetchRequest{Source: srv.URL + "/t.raw", Dest: filepath.Join(dst, "r0.raw"), Format: drivers.FormatRaw, Checksum: "sha256:" + sha}, nil)
	if err != nil || again.SHA256 != sha {
		t.Fatalf("fetch again: %+v %v", again, err)
	}
	if _, err := l.FetchImage(ctx, FetchRequest{Source: srv.URL + "/t.raw", Dest: filepath.Join(dst, "r0.raw"), Format: drivers.FormatRaw, Checksum: "md5:" + strings.Repeat("0", 32)}, nil); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("fetch over another image: %v", err)
	}

	// Failures leave nothing, not even staging files.
	bad := t.TempDir()
	for _, c := range []struct {
		name   string
		req    FetchRequest
		class  error
		inText string
	}{
		{"bad sha256", FetchRequest{Source: srv.URL + "/t.raw", Format: drivers.FormatRaw, Checksum: "sha256:" + strings.Repeat("0", 64)}, errdefs.ErrDataLoss, "checksum"},
		{"bad sha512", FetchRequest{Source: srv.URL + "/t.raw", Format: drivers.FormatRaw, Checksum: "sha512:" + strings.Repeat("0", 128)}, errdefs.ErrDataLoss, "checksum"},
		{"bad md5", FetchRequest{Source: srv.URL + "/t.raw", Format: drivers.FormatRaw, Checksum: "md5:" + strings.Repeat("0", 32)}, errdefs.ErrDataLoss, "checksum"},
		{"404", FetchRequest{Source: srv.URL + "/missing.raw", Format: drivers.FormatRaw}, errdefs.ErrNotFound, "404"},
		{"qcow2 declared raw", FetchRequest{Source: srv.URL + "/t.qcow2", Format: drivers.FormatRaw}, errdefs.ErrInvalid, "qcow2"},
		{"raw declared qcow2", FetchRequest{Source: srv.URL + "/t.raw", Format: drivers.FormatQCOW2}, errdefs.ErrInvalid, "raw"},
		{"backing file", FetchRequest{Source: srv.URL + "/backed.qcow2", Format: drivers.FormatQCOW2}, errdefs.ErrInvalid, "qcow2 template has a backing file"},
		{"iso without signature", FetchRequest{Source: srv.URL + "/fake.iso", Format: drivers.FormatISO}, errdefs.ErrInvalid, "ISO 9660"},
		{"qcow2 declared iso", FetchRequest{Source: srv.URL + "/t.qcow2", Format: drivers.FormatISO}, errdefs.ErrInvalid, "qcow2"},
		{"bad checksum syntax", FetchRequest{Source: srv.URL + "/t.raw", Format: drivers.FormatRaw, Checksum: "crc32:1234"}, errdefs.ErrInvalid, "checksum"},
		{"unknown format", FetchRequest{Source: srv.URL + "/t.raw", Format: "vdi"}, errdefs.ErrInvalid, "format"},
	} {
		c.req.Dest = filepath.Join(bad, "x.img")
		_, err := l.FetchImage(ctx, c.req, nil)
		if !errors.Is(err, c.class) || !strings.Contains(err.Error(), c.inText) {
			t.Errorf("%s: err = %v, want %v mentioning %q", c.name, err, c.class, c.inText)
		}
		onlyEntries(t, bad)
	}

	// Good qcow2 and iso.
	info, err := l.FetchImage(ctx, FetchRequest{Source: srv.URL + "/t.qcow2", Dest: filepath.Join(dst, "t.qcow2"), Format: drivers.FormatQCOW2}, nil)
	if err != nil || info.Format != drivers.FormatQCOW2 || info.VirtualSize != 4<<20 || info.BackingFile != "" {
		t.Fatalf("fetch qcow2: %+v %v", info, err)
	}
	info, err = l.FetchImage(ctx, FetchRequest{Source: srv.URL + "/t.iso", Dest: filepath.Join(dst, "t.iso"), Format: drivers.FormatISO}, nil)
	if err != nil || info.Format != drivers.FormatISO || info.VirtualSize != 64<<10 {
		t.Fatalf("fetch iso: %+v %v", info, err)
	}
}

func TestFetchResumesAfterCancel(t *testing.T) {
	needQemuImg(t)
	srcDir := t.TempDir()
	src := filepath.Join(srcDir, "big.raw")
	data := bytes.Repeat([]byte{1, 2, 3, 4, 5, 6, 7, 8}, 4<<20) // 32 MiB of data
	os.WriteFile(src, data, 0o644)
	sum := sha256.Sum256(data)
	// A server that stalls after the first megabytes until released.
	release := make(chan struct{})
	var served atomic.Int64
	fs := http.FileServer(http.Dir(srcDir))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Range") != "bytes=0-0" && served.Add(1) > 2 {
			select {
			case <-release:
			case <-r.Context().Done():
				return
			}
		}
		fs.ServeHTTP(w, r)
	}))
	defer srv.Close()
	l := New("h1")
	dst := t.TempDir()
	req := FetchRequest{Source: srv.URL + "/big.raw", Dest: filepath.Join(dst, "big.raw"), Format: drivers.FormatRaw, Checksum: "sha256:" + hex.EncodeToString(sum[:])}
	ctx, cancel := context.WithCancel(t.Context())
	go func() {
		for served.Load() < 3 {
			select {
			case <-t.Context().Done():
				return
			case <-time.After(time.Millisecond):
			}
		}
		cancel()
	}()
	if _, err := l.FetchImage(ctx, req, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled fetch: %v", err)
	}
	if _, err := os.Stat(req.Dest); !os.IsNotExist(err) {
		t.Fatal("a cancelled fetch left the destination")
	}
	// The partial download and its checkpoint are kept, hidden: ListDir
	// does not show them, the next attempt resumes from them.
	if list, err := l.ListDir(t.Context(), dst); err != nil || len(list) != 0 {
		t.Fatalf("ListDir during an interrupted fetch: %v %v", list, err)
	}
	kept, _ := os.ReadDir(dst)
	var ckpt bool
	for _, e := range kept {
		ckpt = ckpt || strings.HasSuffix(e.Name(), ".stowage-ckpt")
	}
	if !ckpt {
		t.Errorf("no checkpoint kept for the resume: %v", kept)
	}
	close(release)
	info, err := l.FetchImage(t.Context(), req, nil)
	if err != nil || info.SHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("resumed fetch: %+v %v", info, err)
	}
	onlyEntries(t, dst, "big.raw")
}

func TestCopyImage(t *testing.T) {
	needQemuIO(t)
	ctx := t.Context()
	dir := storeDir(t, t.TempDir())
	l := New("h1")
	base := filepath.Join(dir, "base.qcow2")
	qcreate(t, base, "qcow2", 8<<20)
	qio(t, base, "qcow2", "write -P 0x11 0 1M")
	top := filepath.Join(dir, "top.qcow2")
	qcreate(t, top, "qcow2", 0, qemuimg.BackingFile(base, "qcow2"))
	qio(t, top, "qcow2", "write -P 0x22 4M 64k")

	out := t.TempDir()
	// Same format: the file's bytes, backing file kept.
	info, err := l.CopyImage(ctx, CopyRequest{Source: top, SourceFormat: drivers.FormatQCOW2, Dest: filepath.Join(out, "same.qcow2")}, nil)
	if err != nil || info.Format != drivers.FormatQCOW2 || info.BackingFile != base {
		t.Fatalf("copy as is: %+v %v", info, err)
	}
	// Flatten: standalone, reads the same.
	var p progressRecorder
	p.t = t
	info, err = l.CopyImage(ctx, CopyRequest{Source: top, SourceFormat: drivers.FormatQCOW2, Dest: filepath.Join(out, "flat.qcow2"), Flatten: true}, p.fn)
	if err != nil || info.BackingFile != "" || info.Method != "qemu-img convert" {
		t.Fatalf("flatten: %+v %v", info, err)
	}
	if !qemuCompare(t, top, "qcow2", filepath.Join(out, "flat.qcow2"), "qcow2") {
		t.Fatal("flattened copy reads differently")
	}
	if p.calls.Load() == 0 {
		t.Error("no progress from qemu-img convert")
	}
	// Format change.
	info, err = l.CopyImage(ctx, CopyRequest{Source: "file://" + top, SourceFormat: drivers.FormatQCOW2, Dest: filepath.Join(out, "flat.raw"), Format: drivers.FormatRaw}, nil)
	if err != nil || info.Format != drivers.FormatRaw || info.VirtualSize != 8<<20 {
		t.Fatalf("to raw: %+v %v", info, err)
	}
	if !qemuCompare(t, top, "qcow2", filepath.Join(out, "flat.raw"), "raw") {
		t.Fatal("raw copy reads differently")
	}
	// Retry and conflict.
	if _, err := l.CopyImage(ctx, CopyRequest{Source: top, SourceFormat: drivers.FormatQCOW2, Dest: filepath.Join(out, "flat.raw"), Format: drivers.FormatRaw}, nil); err != nil {
		t.Fatalf("copy again: %v", err)
	}
	if _, err := l.CopyImage(ctx, CopyRequest{Source: top, SourceFormat: drivers.FormatQCOW2, Dest: filepath.Join(out, "flat.raw"), Format: drivers.FormatQCOW2}, nil); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("copy over another image: %v", err)
	}
	if _, err := l.CopyImage(ctx, CopyRequest{Source: filepath.Join(dir, "missing"), SourceFormat: drivers.FormatRaw, Dest: filepath.Join(out, "m.raw")}, nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("copy of a missing image: %v", err)
	}
	onlyEntries(t, out, "flat.qcow2", "flat.raw", "same.qcow2")
}

func TestCloneImage(t *testing.T) {
	needQemuIO(t)
	ctx := t.Context()
	dir := storeDir(t, t.TempDir())
	l := New("h1")
	base := filepath.Join(dir, "tmpl.qcow2")
	qcreate(t, base, "qcow2", 4<<20)
	qio(t, base, "qcow2", "write -P 0x33 0 512k", "write -P 0x44 2M 64k")

	linked := filepath.Join(dir, "linked.qcow2")
	info, err := l.CloneImage(ctx, CloneRequest{Base: base, BaseFormat: drivers.FormatQCOW2, Dest: linked, Mode: drivers.CloneLinked}, nil)
	if err != nil || info.BackingFile != base || info.Format != drivers.FormatQCOW2 || info.Method != "linked" {
		t.Fatalf("linked clone: %+v %v", info, err)
	}
	if !qemuCompare(t, base, "qcow2", linked, "qcow2") {
		t.Fatal("linked clone does not read the base's bytes")
	}
	if _, err := l.CloneImage(ctx, CloneRequest{Base: base, BaseFormat: drivers.FormatQCOW2, Dest: linked, Mode: drivers.CloneLinked}, nil); err != nil {
		t.Fatalf("linked clone again: %v", err)
	}
	big := filepath.Join(dir, "big.qcow2")
	info, err = l.CloneImage(ctx, CloneRequest{Base: base, BaseFormat: drivers.FormatQCOW2, Dest: big, Mode: drivers.CloneLinked, Size: 8 << 20}, nil)
	if err != nil || info.VirtualSize != 8<<20 {
		t.Fatalf("larger linked clone: %+v %v", info, err)
	}
	if _, err := l.CloneImage(ctx, CloneRequest{Base: base, BaseFormat: drivers.FormatQCOW2, Dest: filepath.Join(dir, "small.qcow2"), Mode: drivers.CloneLinked, Size: 1 << 20}, nil); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("smaller clone: %v", err)
	}

	for _, f := range []drivers.Format{drivers.FormatRaw, drivers.FormatQCOW2} {
		dest := filepath.Join(dir, "full."+string(f))
		info, err := l.CloneImage(ctx, CloneRequest{Base: linked, BaseFormat: drivers.FormatQCOW2, Dest: dest, Mode: drivers.CloneFull, Format: f, Size: 6 << 20}, nil)
		if err != nil || info.Format != f || info.BackingFile != "" || info.VirtualSize != 6<<20 {
			t.Fatalf("full %s clone: %+v %v", f, info, err)
		}
		if !qemuCompare(t, base, "qcow2", dest, string(f)) {
			t.Fatalf("full %s clone reads differently", f)
		}
	}
	// tmp is ext4 here: no reflink, and nothing left behind.
	if p, _ := l.ProbeStore(ctx, dir, "x"); p.Reflink {
		t.Skip("the test directory supports reflink")
	}
	if _, err := l.CloneImage(ctx, CloneRequest{Base: base, BaseFormat: drivers.FormatQCOW2, Dest: filepath.Join(dir, "rl.qcow2"), Mode: drivers.CloneReflink}, nil); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Fatalf("reflink clone on a filesystem without reflink: %v", err)
	}
	onlyEntries(t, dir, "big.qcow2", "full.qcow2", "full.raw", "linked.qcow2", "tmpl.qcow2")
}

func TestReflinkCloneAndRawSnapshotOnXFS(t *testing.T) {
	needQemuIO(t)
	mnt := mountXFS(t)
	ctx := t.Context()
	l := New("h1")
	base := filepath.Join(mnt, "tmpl.raw")
	qcreate(t, base, "raw", 4<<20)
	qio(t, base, "raw", "write -P 0x33 0 1M")
	vol := filepath.Join(mnt, "vol.raw")
	info, err := l.CloneImage(ctx, CloneRequest{Base: base, BaseFormat: drivers.FormatRaw, Dest: vol, Mode: drivers.CloneReflink, Size: 8 << 20}, nil)
	if err != nil || info.Method != "reflink" || info.VirtualSize != 8<<20 || info.Format != drivers.FormatRaw {
		t.Fatalf("reflink clone: %+v %v", info, err)
	}
	if !qemuCompare(t, base, "raw", vol, "raw") {
		t.Fatal("reflink clone reads differently")
	}
	snap := filepath.Join(mnt, "snap.raw")
	si, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: snap, Format: drivers.FormatRaw})
	if err != nil || si.Method != "reflink" {
		t.Fatalf("raw snapshot on xfs: %+v %v", si, err)
	}
	qio(t, vol, "raw", "write -P 0xab 0 64k")
	ri, err := l.RevertImage(ctx, SnapshotRequest{Volume: vol, Snapshot: snap, Format: drivers.FormatRaw})
	if err != nil || ri.Method != "reflink" {
		t.Fatalf("raw revert on xfs: %+v %v", ri, err)
	}
	qio(t, vol, "raw", "read -P 0x33 0 64k")
}

func TestSnapshotRevertQcow2(t *testing.T) {
	needQemuIO(t)
	ctx := t.Context()
	store := storeDir(t, t.TempDir())
	vols, snaps := filepath.Join(store, "volumes"), filepath.Join(store, "snapshots")
	os.Mkdir(vols, 0o755)
	os.Mkdir(snaps, 0o755)
	l := New("h1")
	tmpl := filepath.Join(store, "tmpl.qcow2")
	qcreate(t, tmpl, "qcow2", 4<<20)
	qio(t, tmpl, "qcow2", "write -P 0x11 0 1M")
	vol := filepath.Join(vols, "v1.qcow2")
	if _, err := l.CloneImage(ctx, CloneRequest{Base: tmpl, BaseFormat: drivers.FormatQCOW2, Dest: vol, Mode: drivers.CloneLinked}, nil); err != nil {
		t.Fatal(err)
	}
	qio(t, vol, "qcow2", "write -P 0x22 1M 64k")
	os.Chmod(vol, 0o600)

	s1 := filepath.Join(snaps, "s1.qcow2")
	si, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: s1, Format: drivers.FormatQCOW2})
	if err != nil || si.Method != "qcow2-external" || si.Volume.BackingFile != s1 || si.Snapshot.BackingFile != tmpl {
		t.Fatalf("snapshot: %+v %v", si, err)
	}
	if fi, _ := os.Stat(s1); fi.Mode().Perm() != 0o440 {
		t.Errorf("snapshot mode %v, want 0440 (read-only, not world-readable)", fi.Mode().Perm())
	}
	if fi, _ := os.Stat(vol); fi.Mode().Perm()&0o077 != 0 {
		t.Errorf("new overlay mode %v, want the volume's 0600", fi.Mode().Perm())
	}
	if again, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: s1, Format: drivers.FormatQCOW2}); err != nil || again.Volume.BackingFile != s1 {
		t.Fatalf("snapshot again: %+v %v", again, err)
	}
	// The guest writes after the snapshot, then reverts.
	qio(t, vol, "qcow2", "write -P 0xab 0 64k")
	s2 := filepath.Join(snaps, "s2.qcow2")
	if _, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: s2, Format: drivers.FormatQCOW2}); err != nil {
		t.Fatal(err)
	}
	frozen := filepath.Join(store, "s2-flat.raw")
	if err := qemuimg.New().Convert(ctx, s2, frozen, "raw", qemuimg.SourceFormat("qcow2")); err != nil {
		t.Fatal(err)
	}
	qio(t, vol, "qcow2", "write -P 0xcd 2M 64k")
	ri, err := l.RevertImage(ctx, SnapshotRequest{Volume: vol, Snapshot: s1, Format: drivers.FormatQCOW2})
	if err != nil || ri.BackingFile != s1 || ri.Method != "qcow2-external" {
		t.Fatalf("revert: %+v %v", ri, err)
	}
	if !qemuCompare(t, vol, "qcow2", s1, "qcow2") {
		t.Fatal("reverted volume does not read as the snapshot")
	}
	qio(t, vol, "qcow2", "read -P 0x11 0 64k", "read -P 0x22 1M 64k")
	if !qemuCompare(t, s2, "qcow2", frozen, "raw") {
		t.Fatal("the later snapshot changed with the revert")
	}
	if again, err := l.RevertImage(ctx, SnapshotRequest{Volume: vol, Snapshot: s1, Format: drivers.FormatQCOW2}); err != nil || again.Method != "existing" {
		t.Fatalf("revert again: %+v %v", again, err)
	}

	// A crash between the two renames of a snapshot: the volume file is
	// already the snapshot. Running the step again finishes it.
	s3 := filepath.Join(snaps, "s3.qcow2")
	if err := os.Rename(vol, s3); err != nil {
		t.Fatal(err)
	}
	if _, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: s3, Format: drivers.FormatQCOW2}); err != nil {
		t.Fatalf("finish an interrupted snapshot: %v", err)
	}
	if !qemuCompare(t, vol, "qcow2", s3, "qcow2") {
		t.Fatal("finished snapshot reads differently")
	}
	if _, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: s2, Format: drivers.FormatQCOW2}); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("snapshot onto another snapshot's path: %v", err)
	}
	if _, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: filepath.Join(vols, "none"), Snapshot: filepath.Join(snaps, "x"), Format: drivers.FormatQCOW2}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("snapshot of a missing volume: %v", err)
	}
	onlyEntries(t, vols, "v1.qcow2")
}

func TestSnapshotRevertRaw(t *testing.T) {
	needQemuIO(t)
	ctx := t.Context()
	dir := t.TempDir()
	l := New("h1")
	vol := filepath.Join(dir, "v.raw")
	qcreate(t, vol, "raw", 4<<20)
	qio(t, vol, "raw", "write -P 0x11 0 1M")
	snap := filepath.Join(dir, "s.raw")
	si, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: snap, Format: drivers.FormatRaw})
	if err != nil || (si.Method != "copy" && si.Method != "reflink") || si.Snapshot.Format != drivers.FormatRaw {
		t.Fatalf("raw snapshot: %+v %v", si, err)
	}
	if si.Snapshot.PhysicalSize > 2<<20 {
		t.Errorf("raw snapshot allocates %d bytes; want a sparse copy", si.Snapshot.PhysicalSize)
	}
	qio(t, vol, "raw", "write -P 0xab 0 64k")
	if _, err := l.RevertImage(ctx, SnapshotRequest{Volume: vol, Snapshot: snap, Format: drivers.FormatRaw}); err != nil {
		t.Fatal(err)
	}
	qio(t, vol, "raw", "read -P 0x11 0 1M")
	if fi, _ := os.Stat(vol); fi.Mode().Perm() != 0o644 {
		t.Errorf("reverted volume mode %v", fi.Mode().Perm())
	}
	onlyEntries(t, dir, "s.raw", "v.raw")
}

func TestRebaseAndResize(t *testing.T) {
	needQemuIO(t)
	ctx := t.Context()
	dir := storeDir(t, t.TempDir())
	l := New("h1")
	base := filepath.Join(dir, "base.qcow2")
	qcreate(t, base, "qcow2", 4<<20)
	qio(t, base, "qcow2", "write -P 0x11 0 1M")
	mid := filepath.Join(dir, "mid.qcow2")
	qcreate(t, mid, "qcow2", 0, qemuimg.BackingFile(base, "qcow2"))
	qio(t, mid, "qcow2", "write -P 0x22 1M 64k")
	top := filepath.Join(dir, "top.qcow2")
	qcreate(t, top, "qcow2", 0, qemuimg.BackingFile(mid, "qcow2"))
	qio(t, top, "qcow2", "write -P 0x33 2M 64k")
	flat := filepath.Join(dir, "flat.raw")
	if err := qemuimg.New().Convert(ctx, top, flat, "raw", qemuimg.SourceFormat("qcow2")); err != nil {
		t.Fatal(err)
	}

	// Drop mid from the chain: data merged, same bytes.
	info, err := l.RebaseImage(ctx, top, base, drivers.FormatQCOW2)
	if err != nil || info.BackingFile != base || info.Method != "rebase" {
		t.Fatalf("rebase: %+v %v", info, err)
	}
	if !qemuCompare(t, top, "qcow2", flat, "raw") {
		t.Fatal("rebased image reads differently")
	}
	// Onto an identical copy of the base: only the name changes.
	twin := filepath.Join(dir, "twin.qcow2")
	b, _ := os.ReadFile(base)
	os.WriteFile(twin, b, 0o644)
	if info, err = l.RebaseImage(ctx, top, twin, drivers.FormatQCOW2); err != nil || info.Method != "rebase -u" || info.BackingFile != twin {
		t.Fatalf("rebase onto an identical base: %+v %v", info, err)
	}
	if info, err = l.RebaseImage(ctx, top, twin, drivers.FormatQCOW2); err != nil || info.Method != "unchanged" {
		t.Fatalf("rebase again: %+v %v", info, err)
	}
	if info, err = l.RebaseImage(ctx, top, "", ""); err != nil || info.BackingFile != "" {
		t.Fatalf("standalone: %+v %v", info, err)
	}
	if !qemuCompare(t, top, "qcow2", flat, "raw") {
		t.Fatal("standalone image reads differently")
	}
	if _, err := l.RebaseImage(ctx, flat, base, drivers.FormatQCOW2); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("rebase of a raw image: %v", err)
	}

	// Resize.
	if info, err = l.ResizeImage(ctx, top, drivers.FormatQCOW2, 8<<20); err != nil || info.VirtualSize != 8<<20 {
		t.Fatalf("grow qcow2: %+v %v", info, err)
	}
	if info, err = l.ResizeImage(ctx, flat, drivers.FormatRaw, 6<<20); err != nil || info.VirtualSize != 6<<20 || info.Format != drivers.FormatRaw {
		t.Fatalf("grow raw: %+v %v", info, err)
	}
	if _, err = l.ResizeImage(ctx, flat, drivers.FormatRaw, 6<<20); err != nil {
		t.Fatalf("same size: %v", err)
	}
	if _, err = l.ResizeImage(ctx, top, drivers.FormatQCOW2, 4<<20); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("shrink: %v", err)
	}
	if info, err = l.InspectImage(ctx, top, drivers.FormatQCOW2); err != nil || info.VirtualSize != 8<<20 || info.Format != drivers.FormatQCOW2 {
		t.Fatalf("inspect: %+v %v", info, err)
	}
}

func TestBackupRestoreSnapshotChain(t *testing.T) {
	needQemuIO(t)
	ctx := t.Context()
	store := storeDir(t, t.TempDir())
	l := New("h1")
	img := t.TempDir() // the image store
	chunks := filepath.Join(img, "chunks")
	mdir := filepath.Join(img, "backups")
	os.Mkdir(mdir, 0o755)
	os.Mkdir(chunks, 0o755)
	const cs = chunkstore.MinChunkSize

	// Random data (no two chunks alike) at 0-1M and 2M-2.25M.
	raw := filepath.Join(store, "v.raw")
	f, _ := os.Create(raw)
	f.Truncate(4 << 20)
	noise := make([]byte, 1<<20)
	rand.Read(noise)
	f.WriteAt(noise, 0)
	rand.Read(noise)
	f.WriteAt(noise[:256<<10], 2<<20)
	f.Close()
	vol := filepath.Join(store, "v.qcow2")
	if err := qemuimg.New().Convert(ctx, raw, vol, "qcow2", qemuimg.SourceFormat("raw")); err != nil {
		t.Fatal(err)
	}
	s1 := filepath.Join(store, "s1.qcow2")
	if _, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: s1, Format: drivers.FormatQCOW2}); err != nil {
		t.Fatal(err)
	}
	var p progressRecorder
	p.t = t
	b1, err := l.BackupImage(ctx, BackupRequest{Source: s1, SourceFormat: drivers.FormatQCOW2, ChunkDir: chunks, Manifest: filepath.Join(mdir, "s1.json"), ChunkSize: cs}, p.fn)
	if err != nil {
		t.Fatal(err)
	}
	if b1.Size != 4<<20 || b1.Chunks != 64 || b1.NewChunks != 20 || b1.ZeroChunks != 44 || b1.ReadBytes != 20*cs {
		t.Fatalf("first backup: %+v", b1)
	}
	if p.calls.Load() == 0 || p.last.Load() != 4<<20 {
		t.Errorf("backup progress: %d calls, last %d", p.calls.Load(), p.last.Load())
	}

	// A small change, a second snapshot, an incremental backup from the first.
	qio(t, vol, "qcow2", "write -P 0x33 1M 4k")
	s2 := filepath.Join(store, "s2.qcow2")
	if _, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: s2, Format: drivers.FormatQCOW2}); err != nil {
		t.Fatal(err)
	}
	b2, err := l.BackupImage(ctx, BackupRequest{Source: s2, SourceFormat: drivers.FormatQCOW2, ChunkDir: chunks, Manifest: filepath.Join(mdir, "s2.json"), ParentManifest: filepath.Join(mdir, "s1.json")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b2.NewChunks != 1 || b2.NewBytes != cs || b2.ReadBytes != cs {
		t.Fatalf("incremental backup: %+v; want one %d-byte chunk read and stored", b2, cs)
	}
	// A parent that is not the backup of s2's backing file is not trusted
	// for unread ranges: everything is read, the result is still right.
	wrong := filepath.Join(store, "other.raw")
	qcreate(t, wrong, "raw", 4<<20)
	qio(t, wrong, "raw", "write -P 0x99 0 4M")
	if _, err := l.BackupImage(ctx, BackupRequest{Source: wrong, SourceFormat: drivers.FormatRaw, ChunkDir: chunks, Manifest: filepath.Join(img, "other.json"), ChunkSize: cs}, nil); err != nil {
		t.Fatal(err)
	}
	b3, err := l.BackupImage(ctx, BackupRequest{Source: s2, SourceFormat: drivers.FormatQCOW2, ChunkDir: chunks, Manifest: filepath.Join(img, "s2-wrong-parent.json"), ParentManifest: filepath.Join(img, "other.json")}, nil)
	if err != nil || b3.ReadBytes != 21*cs || b3.NewChunks != 0 {
		t.Fatalf("backup with a foreign parent: %+v %v; want every data chunk read, none new", b3, err)
	}
	if _, err := l.RestoreImage(ctx, RestoreRequest{Manifest: filepath.Join(img, "s2-wrong-parent.json"), ChunkDir: chunks, Dest: filepath.Join(img, "w.raw")}, nil); err != nil {
		t.Fatal(err)
	}
	if !qemuCompare(t, s2, "qcow2", filepath.Join(img, "w.raw"), "raw") {
		t.Fatal("backup with a foreign parent restores differently")
	}
	if again, err := l.BackupImage(ctx, BackupRequest{Source: s2, SourceFormat: drivers.FormatQCOW2, ChunkDir: chunks, Manifest: filepath.Join(mdir, "s2.json")}, nil); err != nil || again.Chunks != 64 {
		t.Fatalf("backup again: %+v %v", again, err)
	}

	// Restore both, as raw and qcow2, and compare with the snapshots.
	out := t.TempDir()
	for _, c := range []struct {
		snap, manifest string
		format         drivers.Format
	}{{s1, "s1.json", drivers.FormatRaw}, {s2, "s2.json", drivers.FormatQCOW2}, {s2, "s2.json", drivers.FormatRaw}} {
		dest := filepath.Join(out, strings.TrimSuffix(c.manifest, ".json")+"."+string(c.format))
		info, err := l.RestoreImage(ctx, RestoreRequest{Manifest: filepath.Join(mdir, c.manifest), ChunkDir: chunks, Dest: dest, Format: c.format}, nil)
		if err != nil || info.Format != c.format || info.VirtualSize != 4<<20 {
			t.Fatalf("restore %s as %s: %+v %v", c.manifest, c.format, info, err)
		}
		if !qemuCompare(t, c.snap, "qcow2", dest, string(c.format)) {
			t.Fatalf("restore of %s as %s reads differently", c.manifest, c.format)
		}
	}

	// Delete the first backup: the second still restores.
	if _, err := l.DeleteBackup(ctx, DeleteBackupRequest{Manifest: filepath.Join(mdir, "s1.json"), ChunkDir: chunks}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.DeleteBackup(ctx, DeleteBackupRequest{Manifest: filepath.Join(mdir, "s1.json"), ChunkDir: chunks}); err != nil {
		t.Fatalf("delete again: %v", err)
	}
	if _, err := l.RestoreImage(ctx, RestoreRequest{Manifest: filepath.Join(mdir, "s2.json"), ChunkDir: chunks, Dest: filepath.Join(out, "after.raw")}, nil); err != nil {
		t.Fatal(err)
	}
	if !qemuCompare(t, s2, "qcow2", filepath.Join(out, "after.raw"), "raw") {
		t.Fatal("restore after deleting the parent reads differently")
	}

	// A corrupt chunk: ErrDataLoss, nothing left.
	m, _ := chunkstore.LoadManifest(filepath.Join(mdir, "s2.json"))
	st, _ := chunkstore.Open(chunks)
	for _, h := range m.Chunks {
		if h != chunkstore.ZeroChunk {
			p := st.ChunkPath(h)
			os.Chmod(p, 0o644)
			b, _ := os.ReadFile(p)
			b[7] ^= 0xff
			os.WriteFile(p, b, 0o644)
			break
		}
	}
	bad := t.TempDir()
	if _, err := l.RestoreImage(ctx, RestoreRequest{Manifest: filepath.Join(mdir, "s2.json"), ChunkDir: chunks, Dest: filepath.Join(bad, "x.raw")}, nil); !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("restore with a corrupt chunk: %v", err)
	}
	onlyEntries(t, bad)
}

func TestExportCopiedByAnotherHost(t *testing.T) {
	needQemuIO(t)
	ctx := t.Context()
	x := exports.New()
	mux := http.NewServeMux()
	mux.Handle(exports.Prefix, x)
	srv := httptest.NewServer(mux)
	defer srv.Close()
	x.SetBaseURL(srv.URL)

	// Two hosts on one machine, each with its own tree.
	h1 := New("h1", WithRoot(t.TempDir()), WithExporter(x))
	h2 := New("h2", WithRoot(t.TempDir()))
	os.MkdirAll(h1.onHost("/srv/primary"), 0o755)
	os.MkdirAll(h2.onHost("/srv/primary"), 0o755)
	vol := "/srv/primary/v.qcow2"
	if _, err := h1.CreateImage(ctx, vol, drivers.FormatQCOW2, 8<<20); err != nil {
		t.Fatal(err)
	}
	qio(t, h1.onHost(vol), "qcow2", "write -P 0x77 0 1M", "write -P 0x78 5M 64k")
	uri, err := h1.Export(ctx, vol, time.Time{}, exports.Owner{})
	if err != nil || !strings.HasPrefix(string(uri), srv.URL+exports.Prefix) {
		t.Fatalf("export: %q %v", uri, err)
	}
	var p progressRecorder
	p.t = t
	info, err := h2.CopyImage(ctx, CopyRequest{Source: string(uri), SourceFormat: drivers.FormatQCOW2, Dest: vol}, p.fn)
	if err != nil || info.Format != drivers.FormatQCOW2 || info.Path != vol {
		t.Fatalf("copy from the export: %+v %v", info, err)
	}
	a, _ := os.ReadFile(h1.onHost(vol))
	b, _ := os.ReadFile(h2.onHost(vol))
	if !bytes.Equal(a, b) {
		t.Fatal("the copy differs from the exported file")
	}
	if p.calls.Load() == 0 {
		t.Error("no progress")
	}
	// Converted on the way.
	if _, err := h2.CopyImage(ctx, CopyRequest{Source: string(uri), SourceFormat: drivers.FormatQCOW2, Dest: "/srv/primary/v.raw", Format: drivers.FormatRaw}, nil); err != nil {
		t.Fatal(err)
	}
	if !qemuCompare(t, h1.onHost(vol), "qcow2", h2.onHost("/srv/primary/v.raw"), "raw") {
		t.Fatal("converted copy reads differently")
	}
	if err := h1.Unexport(ctx, uri); err != nil {
		t.Fatal(err)
	}
	if _, err := h2.CopyImage(ctx, CopyRequest{Source: string(uri), SourceFormat: drivers.FormatQCOW2, Dest: "/srv/primary/w.qcow2"}, nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("copy after unexport: %v", err)
	}
	if _, err := h2.Export(ctx, vol, time.Time{}, exports.Owner{}); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Fatalf("export without an exporter: %v", err)
	}
}

func TestImageOpsRefuseBadPaths(t *testing.T) {
	ctx := t.Context()
	l := New("h1", WithExporter(exports.New()))
	good := filepath.Join(t.TempDir(), "x")
	for _, p := range []string{"", "rel/x", good + "/../y", good + "/", "/"} {
		errs := map[string]error{}
		_, errs["fetch"] = l.FetchImage(ctx, FetchRequest{Source: good, Dest: p, Format: drivers.FormatRaw}, nil)
		_, errs["copy"] = l.CopyImage(ctx, CopyRequest{Source: good, SourceFormat: drivers.FormatRaw, Dest: p}, nil)
		_, errs["copy-src"] = l.CopyImage(ctx, CopyRequest{Source: p, SourceFormat: drivers.FormatRaw, Dest: good}, nil)
		_, errs["clone"] = l.CloneImage(ctx, CloneRequest{Base: good, BaseFormat: drivers.FormatRaw, Dest: p, Mode: drivers.CloneLinked}, nil)
		_, errs["inspect"] = l.InspectImage(ctx, p, drivers.FormatRaw)
		_, errs["resize"] = l.ResizeImage(ctx, p, drivers.FormatRaw, 1<<20)
		_, errs["snapshot"] = l.SnapshotImage(ctx, SnapshotRequest{Volume: p, Snapshot: good, Format: drivers.FormatRaw})
		_, errs["revert"] = l.RevertImage(ctx, SnapshotRequest{Volume: good, Snapshot: p, Format: drivers.FormatRaw})
		_, errs["rebase"] = l.RebaseImage(ctx, p, "", "")
		_, errs["backup"] = l.BackupImage(ctx, BackupRequest{Source: p, SourceFormat: drivers.FormatRaw, ChunkDir: good, Manifest: good}, nil)
		_, errs["restore"] = l.RestoreImage(ctx, RestoreRequest{Manifest: good, ChunkDir: good, Dest: p}, nil)
		_, errs["delete-backup"] = l.DeleteBackup(ctx, DeleteBackupRequest{Manifest: p, ChunkDir: good})
		_, errs["export"] = l.Export(ctx, p, time.Time{}, exports.Owner{})
		for op, err := range errs {
			if !errors.Is(err, errdefs.ErrInvalid) {
				t.Errorf("%s with path %q: err = %v, want ErrInvalid", op, p, err)
			}
		}
	}
	if _, err := l.FetchImage(ctx, FetchRequest{Source: good, Dest: filepath.Join(filepath.Dir(good), TempPrefix+"x"), Format: drivers.FormatRaw}, nil); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("fetch to a reserved name: %v", err)
	}
}

func TestImageOpsConcurrentFetchesOfOneDest(t *testing.T) {
	needQemuIO(t)
	srcDir := t.TempDir()
	templates(t, srcDir)
	srv := httptest.NewServer(http.FileServer(http.Dir(srcDir)))
	defer srv.Close()
	l := New("h1")
	dest := filepath.Join(t.TempDir(), "t.raw")
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = l.FetchImage(t.Context(), FetchRequest{Source: srv.URL + "/t.raw", Dest: dest, Format: drivers.FormatRaw}, nil)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatalf("concurrent fetch: %v", err)
		}
	}
	onlyEntries(t, filepath.Dir(dest), "t.raw")
}

func TestStepsCreateDirectoriesOnlyInsideStores(t *testing.T) {
	needQemuIO(t)
	ctx := t.Context()
	srcDir := t.TempDir()
	templates(t, srcDir)
	l := New("h1")
	store := filepath.Join(t.TempDir(), "primary")
	if _, err := l.PrepareStore(ctx, store, "s1", layout); err != nil {
		t.Fatal(err)
	}
	vol := filepath.Join(store, "volumes", "v.qcow2")
	if _, err := l.CloneImage(ctx, CloneRequest{Base: filepath.Join(srcDir, "t.qcow2"), BaseFormat: drivers.FormatQCOW2, Dest: vol, Mode: drivers.CloneFull}, nil); err != nil {
		t.Fatal(err)
	}
	snap := filepath.Join(store, "snapshots", "v", "s1.qcow2")
	if _, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: snap, Format: drivers.FormatQCOW2}); err != nil {
		t.Fatalf("snapshot into a new per-volume directory: %v", err)
	}
	if _, err := l.BackupImage(ctx, BackupRequest{Source: snap, SourceFormat: drivers.FormatQCOW2, ChunkDir: filepath.Join(store, "snapshots", "chunks"), Manifest: filepath.Join(store, "snapshots", "manifests", "s1.json")}, nil); err != nil {
		t.Fatalf("backup into new directories: %v", err)
	}
	outside := filepath.Join(t.TempDir(), "no", "such", "dir", "x.raw")
	if _, err := l.FetchImage(ctx, FetchRequest{Source: filepath.Join(srcDir, "t.raw"), Dest: outside, Format: drivers.FormatRaw}, nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("fetch into a missing directory outside any store: %v", err)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(outside), "..")); !os.IsNotExist(err) {
		t.Fatal("directories were created outside a store")
	}
}

package stream

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stowage/stowage/internal/envtest"
)

// testChunk keeps test files small while still crossing many chunks.
const testChunk = 64 << 10

// layout describes a test image: size and the data written into it.
type layout struct {
	name  string
	size  int64
	parts []part
}

type part struct {
	off  int64
	len  int64
	zero bool // write zeros (allocated zero blocks) instead of random data
}

var layouts = []layout{
	{name: "empty", size: 0},
	{name: "one-byte", size: 1, parts: []part{{0, 1, false}}},
	{name: "one-zero-byte", size: 1, parts: []part{{0, 1, true}}},
	{name: "dense-odd", size: 3*testChunk + 12345, parts: []part{{0, 3*testChunk + 12345, false}}},
	{name: "sparse-odd", size: 40*testChunk + 777, parts: []part{
		{4096, 8192, false},                  // small data extent inside the first chunk
		{3 * testChunk, 2 * testChunk, true}, // allocated zeros: must become a hole
		{5*testChunk + 100, 3 * testChunk, false},
		{12 * testChunk, testChunk, false},
		{12*testChunk + 8192, 4096, true}, // a zero block inside data
		{40 * testChunk, 777, false},      // unaligned tail
	}},
	{name: "sparse-aligned", size: 24 * testChunk, parts: []part{
		{0, 4096, false},
		{2 * testChunk, 3 * testChunk, false},
		{5 * testChunk, testChunk, true},
		{9*testChunk + 4096, 8192, false},
		{23 * testChunk, testChunk, false},
	}},
	{name: "dense-aligned", size: 16*testChunk + 512, parts: []part{{0, 16*testChunk + 512, false}}},
	{name: "all-zero-dense", size: 8*testChunk + 5, parts: []part{{0, 8*testChunk + 5, true}}},
}

// makeImage writes l into dir and returns its path and content.
func makeImage(t testing.TB, dir string, l layout, seed uint64) (string, []byte) {
	t.Helper()
	path := filepath.Join(dir, l.name+".raw")
	content := make([]byte, l.size)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(l.size); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(seed, 7))
	for _, p := range l.parts {
		b := make([]byte, p.len)
		if !p.zero {
			for i := range b {
				b[i] = byte(r.Uint32()) | 1 // never zero: every block is data
			}
		}
		copy(content[p.off:], b)
		if _, err := f.WriteAt(b, p.off); err != nil {
			t.Fatal(err)
		}
	}
	return path, content
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func fileSHA(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// dataBytes is the number of bytes in data extents of path (SEEK_DATA), the
// allocation as filefrag or qemu-img map would show it.
func dataBytes(t testing.TB, path string) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	exts, err := seekExtents(context.Background(), f, 0, st.Size(), st.Size())
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, e := range exts {
		if !e.Hole {
			n += e.Len
		}
	}
	return n
}

// expectedData is the allocation an exact sparse copy of content has: every
// 4 KiB block holding a non-zero byte.
func expectedData(content []byte) int64 {
	var n int64
	for off := 0; off < len(content); off += 4096 {
		end := min(off+4096, len(content))
		if !isZero(content[off:end]) {
			n += int64(end - off)
		}
	}
	return n
}

// onlyFiles lists the names in dir.
func onlyFiles(t testing.TB, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		envtest.Skip(t, "needs root")
	}
}

func needTool(t testing.TB, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		envtest.Skipf(t, "%s not installed", name)
	}
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// loopDevice attaches path to a free loop device, detached at cleanup.
func loopDevice(t testing.TB, path string) string {
	t.Helper()
	needRoot(t)
	needTool(t, "losetup")
	out, err := exec.Command("losetup", "-f", "--show", path).CombinedOutput()
	if err != nil {
		envtest.Skipf(t, "no loop device: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	return dev
}

func execCommand(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

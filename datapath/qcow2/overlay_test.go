package qcow2

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/internal/envtest"
)

func needTools(t *testing.T) {
	t.Helper()
	for _, bin := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(bin); err != nil {
			envtest.Skipf(t, "%s is not installed (apt-get install qemu-utils): %v", bin, err)
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

// bases writes a 64 MiB raw and a 64 MiB qcow2 base with data at the
// start, in the middle and in the last cluster.
func bases(t *testing.T, dir string) map[string]string {
	t.Helper()
	raw, qcow := filepath.Join(dir, "base.raw"), filepath.Join(dir, "base.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "raw", raw, "64M")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", qcow, "64M")
	for f, path := range map[string]string{FormatRaw: raw, FormatQCOW2: qcow} {
		run(t, "qemu-io", "-f", f, "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x33 10M 3M", "-c", "write -P 0x77 65472K 64K", path)
	}
	return map[string]string{FormatRaw: raw, FormatQCOW2: qcow}
}

type qinfo struct {
	VirtualSize   int64  `json:"virtual-size"`
	ClusterSize   int64  `json:"cluster-size"`
	Format        string `json:"format"`
	Backing       string `json:"backing-filename"`
	FullBacking   string `json:"full-backing-filename"`
	BackingFormat string `json:"backing-filename-format"`
	DirtyFlag     bool   `json:"dirty-flag"`
	Specific      struct {
		Data struct {
			Compat        string `json:"compat"`
			LazyRefcounts bool   `json:"lazy-refcounts"`
			RefcountBits  int    `json:"refcount-bits"`
			Corrupt       bool   `json:"corrupt"`
			ExtendedL2    bool   `json:"extended-l2"`
			Compression   string `json:"compression-type"`
		} `json:"data"`
	} `json:"format-specific"`
}

func info(t *testing.T, path string) qinfo {
	t.Helper()
	var qi qinfo
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "info", "-f", "qcow2", "--output=json", path)), &qi); err != nil {
		t.Fatal(err)
	}
	return qi
}

// check runs qemu-img check and fails on any error, corruption or leak.
func check(t *testing.T, path string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", "-f", "qcow2", "--output=json", path).Output()
	if err != nil {
		t.Fatalf("qemu-img check %s: %v\n%s", path, err, out)
	}
	var r map[string]any
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"check-errors", "corruptions", "leaks", "corruptions-fixed", "leaks-fixed"} {
		if v, ok := r[k]; ok && v != float64(0) {
			t.Fatalf("qemu-img check %s: %s = %v: %s", path, k, v, out)
		}
	}
}

// header is the fields of a qcow2 header and its backing format extension.
type header struct {
	Version, BackingSize, ClusterBits, Crypt, L1Size, RefTableClusters, Snapshots uint32
	Size, L1Offset, RefTableOffset, SnapshotsOffset                               uint64
	Incompat, Compat, Autoclear                                                   uint64
	RefcountOrder, HeaderLength                                                   uint32
	Compression                                                                   byte
	Backing, BackingFormat                                                        string
	// Exts are the extension types in order, in hex, the end marker excluded.
	Exts string
}

func readHeader(t *testing.T, path string) (header, []byte) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b[:4], []byte("QFI\xfb")) {
		t.Fatalf("%s: no qcow2 magic", path)
	}
	be := binary.BigEndian
	h := header{
		Version: be.Uint32(b[4:]), BackingSize: be.Uint32(b[16:]), ClusterBits: be.Uint32(b[20:]), Size: be.Uint64(b[24:]),
		Crypt: be.Uint32(b[32:]), L1Size: be.Uint32(b[36:]), L1Offset: be.Uint64(b[40:]), RefTableOffset: be.Uint64(b[48:]),
		RefTableClusters: be.Uint32(b[56:]), Snapshots: be.Uint32(b[60:]), SnapshotsOffset: be.Uint64(b[64:]),
		Incompat: be.Uint64(b[72:]), Compat: be.Uint64(b[80:]), Autoclear: be.Uint64(b[88:]),
		RefcountOrder: be.Uint32(b[96:]), HeaderLength: be.Uint32(b[100:]), Compression: b[104],
	}
	off := be.Uint64(b[8:])
	h.Backing = string(b[off : off+uint64(h.BackingSize)])
	for p := int(h.HeaderLength); ; {
		typ, n := be.Uint32(b[p:]), int(be.Uint32(b[p+4:]))
		if typ == 0 {
			break
		}
		h.Exts += fmt.Sprintf("%x ", typ)
		if typ == extBackingFmt {
			h.BackingFormat = string(b[p+8 : p+8+n])
		}
		p += 8 + pad8(n)
	}
	return h, b
}

// sizes are virtual sizes to test: 0 (an empty base), one sector, not a
// cluster multiple, 1 MiB, the bases' own, a few L2 spans plus a bit,
// 1 TiB (a 16 KiB L1 table) and 16 TiB (an L1 table of four clusters).
var sizes = []int64{0, 512, 1<<20 + 512, 1 << 20, 64 << 20, 3<<29 + 7*512, 1 << 40, 16 << 40}

// TestOverlayMatchesQemuImg compares an overlay of every size on a raw and
// a qcow2 base with what qemu-img create -b -F writes: the same header
// fields (but the backing name's offset: qemu-img writes a feature name
// table before it), the same refcount table and block, the same file
// length; qemu-img info reads the same backing file, format, size and
// cluster size, and qemu-img check finds no error and no leak.
func TestOverlayMatchesQemuImg(t *testing.T) {
	needTools(t)
	dir := t.TempDir()
	bs := bases(t, dir)
	for _, format := range []string{FormatRaw, FormatQCOW2} {
		for _, size := range sizes {
			t.Run(fmt.Sprintf("%s-%d", format, size), func(t *testing.T) {
				ours := filepath.Join(dir, fmt.Sprintf("ours-%s-%d.qcow2", format, size))
				theirs := filepath.Join(dir, fmt.Sprintf("theirs-%s-%d.qcow2", format, size))
				if err := Create(ours, Overlay{Size: size, BackingFile: bs[format], BackingFormat: format}, 0o644); err != nil {
					t.Fatal(err)
				}
				run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", bs[format], "-F", format, theirs, fmt.Sprint(size))
				check(t, ours)
				qo, qt := info(t, ours), info(t, theirs)
				if qo != qt {
					t.Errorf("qemu-img info:\n ours   %+v\n theirs %+v", qo, qt)
				}
				if qo.VirtualSize != size || qo.ClusterSize != ClusterSize || qo.Backing != bs[format] || qo.BackingFormat != format ||
					qo.Specific.Data.Compat != "1.1" || qo.Specific.Data.RefcountBits != 16 || qo.DirtyFlag || qo.Specific.Data.Corrupt {
					t.Errorf("qemu-img info of ours: %+v", qo)
				}
				ho, bo := readHeader(t, ours)
				ht, bt := readHeader(t, theirs)
				const featureNames = 0x6803f857
				if ho.Exts != fmt.Sprintf("%x ", extBackingFmt) || ht.Exts != fmt.Sprintf("%x %x ", extBackingFmt, featureNames) {
					t.Errorf("header extensions: ours %x, qemu-img's %x", ho.Exts, ht.Exts)
				}
				ho.Exts, ht.Exts = "", ""
				if ho != ht {
					t.Errorf("header:\n ours   %+v\n theirs %+v", ho, ht)
				}
				if len(bo) != len(bt) {
					t.Errorf("file length: ours %d, qemu-img's %d", len(bo), len(bt))
				}
				// Everything after the header cluster is byte for byte qemu-img's.
				if !bytes.Equal(bo[ClusterSize:], bt[ClusterSize:]) {
					t.Errorf("refcount table, refcount block or L1 table differ from qemu-img's")
				}
			})
		}
	}
}

// TestOverlayReadsAndWrites has qemu-io write into overlays of several
// sizes and compares each with a raw copy of its base that got the same
// writes (qemu-img compare, which also reads the base through the
// overlay), then checks the overlay again: its refcounts stay right when
// qemu allocates L2 tables and data clusters.
func TestOverlayReadsAndWrites(t *testing.T) {
	needTools(t)
	dir := t.TempDir()
	bs := bases(t, dir)
	for _, format := range []string{FormatRaw, FormatQCOW2} {
		for _, size := range []int64{64 << 20, 64<<20 + 512, 1<<30 + 3*512} {
			t.Run(fmt.Sprintf("%s-%d", format, size), func(t *testing.T) {
				ov := filepath.Join(dir, fmt.Sprintf("ov-%s-%d.qcow2", format, size))
				want := filepath.Join(dir, fmt.Sprintf("want-%s-%d.raw", format, size))
				if err := Create(ov, Overlay{Size: size, BackingFile: bs[format], BackingFormat: format}, 0o644); err != nil {
					t.Fatal(err)
				}
				run(t, "qemu-img", "convert", "-f", format, "-O", "raw", bs[format], want)
				if err := os.Truncate(want, size); err != nil {
					t.Fatal(err)
				}
				run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", ov, want)
				last := size/512*512 - 512
				writes := []string{"write -P 0xa1 512K 1M", "write -P 0xb2 20M 64K", fmt.Sprintf("write -P 0xc3 %d 512", last), "write -z 10M 1M"}
				for _, w := range writes {
					run(t, "qemu-io", "-f", "qcow2", "-c", w, ov)
					run(t, "qemu-io", "-f", "raw", "-c", w, want)
				}
				run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", ov, want)
				run(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("read -P 0xc3 %d 512", last), "-c", "read -P 0x5a 0 512K", "-c", "read -P 0x33 11M 2M", ov)
				check(t, ov)
			})
		}
	}
}

// TestOverlayOneTiB writes at both ends of a 1 TiB overlay on a 64 MiB
// base and reads the base through it.
func TestOverlayOneTiB(t *testing.T) {
	needTools(t)
	dir := t.TempDir()
	bs := bases(t, dir)
	ov := filepath.Join(dir, "tib.qcow2")
	if err := Create(ov, Overlay{Size: 1 << 40, BackingFile: bs[FormatQCOW2], BackingFormat: FormatQCOW2}, 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xd4 1048575M 1M", "-c", "write -P 0xe5 32M 64K", ov)
	run(t, "qemu-io", "-f", "qcow2",
		"-c", "read -P 0xd4 1048575M 1M", "-c", "read -P 0xe5 32M 64K", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x77 65472K 64K",
		"-c", "read -P 0 64M 1M", "-c", "read -P 0 512G 1M", ov)
	check(t, ov)
	if qi := info(t, ov); qi.VirtualSize != 1<<40 || qi.BackingFormat != FormatQCOW2 {
		t.Fatalf("info: %+v", qi)
	}
}

// TestOverlayRelativeBacking: a relative backing name is recorded as given
// and resolved from the overlay's directory, as qemu-img's.
func TestOverlayRelativeBacking(t *testing.T) {
	needTools(t)
	dir := t.TempDir()
	bs := bases(t, dir)
	sub := filepath.Join(dir, "vols")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	ov := filepath.Join(sub, "v.qcow2")
	if err := Create(ov, Overlay{Size: 64 << 20, BackingFile: "../base.raw", BackingFormat: FormatRaw}, 0o600); err != nil {
		t.Fatal(err)
	}
	qi := info(t, ov)
	if qi.Backing != "../base.raw" || filepath.Clean(qi.FullBacking) != bs[FormatRaw] {
		t.Fatalf("info: %+v", qi)
	}
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", ov, bs[FormatRaw])
	if fi, err := os.Stat(ov); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode: %v %v", fi, err)
	}
}

func TestCreateRefuses(t *testing.T) {
	dir := t.TempDir()
	ok := Overlay{Size: 1 << 20, BackingFile: "/b", BackingFormat: FormatRaw}
	for name, o := range map[string]Overlay{
		"negative size":         {Size: -512, BackingFile: "/b", BackingFormat: FormatRaw},
		"odd size":              {Size: 1000, BackingFile: "/b", BackingFormat: FormatRaw},
		"no backing":            {Size: 1 << 20, BackingFormat: FormatRaw},
		"long name":             {Size: 1 << 20, BackingFile: "/" + strings.Repeat("a", MaxBackingName), BackingFormat: FormatRaw},
		"NUL in name":           {Size: 1 << 20, BackingFile: "/b\x00c", BackingFormat: FormatRaw},
		"no format":             {Size: 1 << 20, BackingFile: "/b"},
		"probed format":         {Size: 1 << 20, BackingFile: "/b", BackingFormat: "vmdk"},
		"L1 past qemu's 32 MiB": {Size: (MaxL1Bytes/8 + 1) * l2Span, BackingFile: "/b", BackingFormat: FormatRaw},
	} {
		p := filepath.Join(dir, strings.ReplaceAll(name, " ", "-"))
		if err := Create(p, o, 0o644); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
		if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s: left a file: %v", name, err)
		}
	}
	// The largest size qemu takes is accepted.
	if err := Create(filepath.Join(dir, "max"), Overlay{Size: MaxL1Bytes / 8 * l2Span, BackingFile: "/b", BackingFormat: FormatRaw}, 0o644); err != nil {
		t.Errorf("2 PiB: %v", err)
	}
	// Never replaces: an existing file (or a symbolic link) is fs.ErrExist and kept.
	p := filepath.Join(dir, "exists")
	if err := os.WriteFile(p, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(p, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"exists", "link"} {
		if err := Create(filepath.Join(dir, name), ok, 0o644); !errors.Is(err, fs.ErrExist) {
			t.Errorf("%s: %v, want fs.ErrExist", name, err)
		}
	}
	if b, _ := os.ReadFile(p); string(b) != "keep" {
		t.Errorf("existing file changed: %q", b)
	}
	// A missing directory is fs.ErrNotExist.
	if err := Create(filepath.Join(dir, "no", "x"), ok, 0o644); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing dir: %v", err)
	}
}

func BenchmarkCreate(b *testing.B) {
	dir := b.TempDir()
	o := Overlay{Size: 10 << 30, BackingFile: "/srv/store/templates/t.qcow2", BackingFormat: FormatQCOW2}
	for i := 0; b.Loop(); i++ {
		if err := Create(filepath.Join(dir, fmt.Sprint(i)), o, 0o644); err != nil {
			b.Fatal(err)
		}
	}
}

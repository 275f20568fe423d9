package hostfs

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stowage/stowage/datapath/chunkstore"
	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// primaryStore makes a store directory with the usual layout.
func primaryStore(t *testing.T) string {
	t.Helper()
	store := storeDir(t, t.TempDir())
	for _, d := range layout {
		if err := os.Mkdir(filepath.Join(store, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return store
}

// guestQcow2Header returns the bytes of a qcow2 image of 1 MiB whose
// backing file is backing (raw), as a guest could write them into the
// first sectors of its raw disk.
func guestQcow2Header(t *testing.T, backing string) []byte {
	t.Helper()
	x := filepath.Join(t.TempDir(), "x.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", x, "1M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	b, err := os.ReadFile(x)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// writeRaw writes a raw disk of size bytes starting with head.
func writeRaw(t *testing.T, path string, head []byte, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(head); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// guestView is what a guest of the image at path (of format) reads.
func guestView(t *testing.T, path, format string) []byte {
	t.Helper()
	flat := filepath.Join(t.TempDir(), "flat.raw")
	if err := qemuimg.New().Convert(t.Context(), path, flat, "raw", qemuimg.SourceFormat(format)); err != nil {
		t.Fatal(err)
	}
	return readFile(t, flat)
}

// A raw volume whose guest wrote a qcow2 header naming a file outside the
// store (/etc/hostname, or a file of another tenant) is copied, cloned,
// snapshotted, reverted, backed up and restored as raw: every result holds
// exactly the volume's bytes, and the named file's content appears nowhere.
func TestRawVolumeWithGuestQcow2HeaderStaysRaw(t *testing.T) {
	needQemuImg(t)
	secret := make([]byte, 64<<10)
	rand.Read(secret)
	other := filepath.Join(t.TempDir(), "other-tenant.raw")
	if err := os.WriteFile(other, secret, 0o600); err != nil {
		t.Fatal(err)
	}
	targets := []string{other}
	if b, err := os.ReadFile("/etc/hostname"); err == nil && len(bytes.TrimSpace(b)) > 0 {
		targets = append([]string{"/etc/hostname"}, targets...)
	}
	for _, target := range targets {
		t.Run(filepath.Base(target), func(t *testing.T) {
			testGuestHeader(t, target)
		})
	}
}

func testGuestHeader(t *testing.T, target string) {
	ctx := t.Context()
	secret := readFile(t, target)
	l := New("h1")
	store := primaryStore(t)
	images := storeDir(t, t.TempDir())
	const size = 1 << 20
	vol := filepath.Join(store, "volumes", "evil.raw")
	writeRaw(t, vol, guestQcow2Header(t, target), size)
	want := readFile(t, vol)
	if !bytes.HasPrefix(want, []byte("QFI\xfb")) || bytes.Contains(want, secret) {
		t.Fatal("test setup: the volume must start with a qcow2 header and not hold the secret")
	}
	// qemu-img itself would follow the header: the hole is real.
	if probed, err := qemuimg.New().Info(ctx, vol); err != nil || probed.Format != "qcow2" || probed.BackingFilename != target {
		t.Fatalf("test setup: qemu-img probes %+v %v, want a qcow2 backed by %s", probed, err, target)
	}

	var outputs []string // raw files that must equal the volume
	check := func(what, path string) {
		t.Helper()
		got := readFile(t, path)
		if bytes.Contains(got, secret) {
			t.Fatalf("%s: %s holds the content of %s", what, path, target)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: %s differs from the volume's bytes (%d bytes, want %d)", what, path, len(got), len(want))
		}
		outputs = append(outputs, path)
	}
	checkGuest := func(what, path, format string) {
		t.Helper()
		if bytes.Contains(readFile(t, path), secret) {
			t.Fatalf("%s: %s holds the content of %s", what, path, target)
		}
		if got := guestView(t, path, format); !bytes.Equal(got, want) {
			t.Fatalf("%s: the guest of %s does not read the volume's bytes", what, path)
		}
	}

	// Inspect reports the raw disk, not what the header claims.
	info, err := l.InspectImage(ctx, vol, drivers.FormatRaw)
	if err != nil || info.Format != drivers.FormatRaw || info.BackingFile != "" || info.VirtualSize != size {
		t.Fatalf("inspect: %+v %v", info, err)
	}

	// Copy: as it is, flattened to raw (template from volume, migration),
	// converted to qcow2, and from a file:// URL.
	for i, req := range []CopyRequest{
		{Source: vol, Dest: filepath.Join(store, "volumes", "copy.raw")},
		{Source: vol, Dest: filepath.Join(images, "t-raw.raw"), Format: drivers.FormatRaw, Flatten: true},
		{Source: "file://" + vol, Dest: filepath.Join(store, "volumes", "copy2.raw"), Flatten: true},
	} {
		req.SourceFormat = drivers.FormatRaw
		info, err := l.CopyImage(ctx, req, nil)
		if err != nil || info.Format != drivers.FormatRaw || info.BackingFile != "" || info.VirtualSize != size {
			t.Fatalf("copy %d: %+v %v", i, info, err)
		}
		check("copy", req.Dest)
	}
	conv := filepath.Join(images, "t.qcow2")
	info, err = l.CopyImage(ctx, CopyRequest{Source: vol, SourceFormat: drivers.FormatRaw, Dest: conv, Format: drivers.FormatQCOW2, Flatten: true}, nil)
	if err != nil || info.Format != drivers.FormatQCOW2 || info.BackingFile != "" || info.VirtualSize != size {
		t.Fatalf("copy to qcow2: %+v %v", info, err)
	}
	checkGuest("copy to qcow2", conv, "qcow2")

	// Clone: full (raw and qcow2) and linked, the volume serving as a base.
	full := filepath.Join(store, "volumes", "full.raw")
	info, err = l.CloneImage(ctx, CloneRequest{Base: vol, BaseFormat: drivers.FormatRaw, Dest: full, Mode: drivers.CloneFull, Format: drivers.FormatRaw}, nil)
	if err != nil || info.Format != drivers.FormatRaw || info.VirtualSize != size {
		t.Fatalf("full clone: %+v %v", info, err)
	}
	check("full clone", full)
	fullQ := filepath.Join(store, "volumes", "full.qcow2")
	if _, err := l.CloneImage(ctx, CloneRequest{Base: vol, BaseFormat: drivers.FormatRaw, Dest: fullQ, Mode: drivers.CloneFull, Format: drivers.FormatQCOW2}, nil); err != nil {
		t.Fatalf("full qcow2 clone: %v", err)
	}
	checkGuest("full qcow2 clone", fullQ, "qcow2")
	linked := filepath.Join(store, "volumes", "linked.qcow2")
	info, err = l.CloneImage(ctx, CloneRequest{Base: vol, BaseFormat: drivers.FormatRaw, Dest: linked, Mode: drivers.CloneLinked}, nil)
	if err != nil || info.BackingFile != vol {
		t.Fatalf("linked clone: %+v %v", info, err)
	}
	if qi, err := qemuimg.New().Info(ctx, linked, qemuimg.AssumeFormat("qcow2")); err != nil || qi.BackingFormat != "raw" {
		t.Fatalf("linked clone records backing format %q (%v), want raw", qi.BackingFormat, err)
	}
	checkGuest("linked clone", linked, "qcow2")

	// Snapshot (reflink or copy), then the guest changes its disk, then revert.
	snap := filepath.Join(store, "snapshots", "evil", "s1.raw")
	si, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: snap, Format: drivers.FormatRaw})
	if err != nil || (si.Method != "copy" && si.Method != "reflink") || si.Snapshot.Format != drivers.FormatRaw || si.Snapshot.BackingFile != "" {
		t.Fatalf("snapshot: %+v %v", si, err)
	}
	check("snapshot", snap)
	if again, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: snap, Format: drivers.FormatRaw}); err != nil || again.Method != "existing" {
		t.Fatalf("snapshot again: %+v %v", again, err)
	}
	f, _ := os.OpenFile(vol, os.O_WRONLY, 0)
	f.WriteAt(bytes.Repeat([]byte{0xab}, 4096), 64<<10)
	f.Close()
	if ri, err := l.RevertImage(ctx, SnapshotRequest{Volume: vol, Snapshot: snap, Format: drivers.FormatRaw}); err != nil || ri.Format != drivers.FormatRaw || ri.BackingFile != "" {
		t.Fatalf("revert: %+v %v", ri, err)
	}
	check("revert", vol)

	// Backup of the snapshot and of the volume, restored as raw and qcow2.
	chunks := filepath.Join(images, "snapshots", "chunks")
	for _, src := range []string{snap, vol} {
		manifest := filepath.Join(images, "snapshots", "manifests", filepath.Base(src)+".json")
		b, err := l.BackupImage(ctx, BackupRequest{Source: src, SourceFormat: drivers.FormatRaw, ChunkDir: chunks, Manifest: manifest, ChunkSize: chunkstore.MinChunkSize}, nil)
		if err != nil || b.Size != size {
			t.Fatalf("backup of %s: %+v %v", src, b, err)
		}
		restored := filepath.Join(store, "volumes", "restored-"+filepath.Base(src))
		if _, err := l.RestoreImage(ctx, RestoreRequest{Manifest: manifest, ChunkDir: chunks, Dest: restored, Format: drivers.FormatRaw}, nil); err != nil {
			t.Fatalf("restore: %v", err)
		}
		check("backup and restore", restored)
		restoredQ := restored + ".qcow2"
		if _, err := l.RestoreImage(ctx, RestoreRequest{Manifest: manifest, ChunkDir: chunks, Dest: restoredQ, Format: drivers.FormatQCOW2}, nil); err != nil {
			t.Fatalf("restore as qcow2: %v", err)
		}
		checkGuest("backup and restore as qcow2", restoredQ, "qcow2")
	}
	// No chunk holds the secret either.
	filepath.WalkDir(chunks, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && bytes.Contains(readFile(t, p), secret) {
			t.Fatalf("chunk %s holds the content of %s", p, target)
		}
		return nil
	})

	// A resize keeps it raw: the header stays guest data.
	if info, err := l.ResizeImage(ctx, vol, drivers.FormatRaw, 2*size); err != nil || info.VirtualSize != 2*size || info.Format != drivers.FormatRaw {
		t.Fatalf("resize: %+v %v", info, err)
	}
	if got := readFile(t, vol); !bytes.Equal(got[:size], want) {
		t.Fatal("resize changed the volume's bytes")
	}
	if len(outputs) < 8 {
		t.Fatalf("checked %d outputs", len(outputs))
	}
}

// Without a declared format nothing is opened: no step falls back to probing.
func TestStepsWithoutDeclaredFormatAreRefused(t *testing.T) {
	needQemuImg(t)
	ctx := t.Context()
	l := New("h1")
	store := primaryStore(t)
	vol := filepath.Join(store, "volumes", "v.raw")
	writeRaw(t, vol, guestQcow2Header(t, "/etc/hostname"), 1<<20)
	other := filepath.Join(store, "volumes", "w.raw")
	snap := filepath.Join(store, "snapshots", "s.raw")
	errs := map[string]error{}
	_, errs["copy"] = l.CopyImage(ctx, CopyRequest{Source: vol, Dest: other, Format: drivers.FormatRaw}, nil)
	_, errs["clone"] = l.CloneImage(ctx, CloneRequest{Base: vol, Dest: other, Mode: drivers.CloneFull}, nil)
	_, errs["inspect"] = l.InspectImage(ctx, vol, "")
	_, errs["resize"] = l.ResizeImage(ctx, vol, "", 2<<20)
	_, errs["snapshot"] = l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: snap})
	_, errs["revert"] = l.RevertImage(ctx, SnapshotRequest{Volume: vol, Snapshot: snap})
	_, errs["rebase"] = l.RebaseImage(ctx, other, vol, "")
	_, errs["backup"] = l.BackupImage(ctx, BackupRequest{Source: vol, ChunkDir: filepath.Join(store, "snapshots", "chunks"), Manifest: filepath.Join(store, "snapshots", "m.json")}, nil)
	_, errs["copy-vmdk"] = l.CopyImage(ctx, CopyRequest{Source: vol, SourceFormat: "vmdk", Dest: other}, nil)
	for op, err := range errs {
		if !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%s without a declared format: %v, want ErrInvalid", op, err)
		}
	}
	onlyEntries(t, filepath.Join(store, "volumes"), "v.raw")
	onlyEntries(t, filepath.Join(store, "snapshots"))
}

// dropBackingFormat removes the backing format extension of the qcow2 at
// path (its magic becomes an unknown one, which qemu ignores), as an image
// made by an old qemu-img would have.
func dropBackingFormat(t *testing.T, path string) {
	t.Helper()
	b := readFile(t, path)
	i := bytes.Index(b[:4096], []byte{0xe2, 0x79, 0x2a, 0xca})
	if i < 0 {
		t.Fatal("no backing format extension")
	}
	copy(b[i:], "mmmm")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if qi, err := qemuimg.New().Info(t.Context(), path, qemuimg.AssumeFormat("qcow2")); err != nil || qi.BackingFormat != "" || qi.BackingFilename == "" {
		t.Fatalf("test setup: %+v %v", qi, err)
	}
}

// A declared qcow2 whose backing chain leaves its store is refused by
// every step that would read through it, with ErrInvalid naming the
// backing path; nothing is written.
func TestQcow2BackingOutsideStoreIsRefused(t *testing.T) {
	needQemuImg(t)
	ctx := t.Context()
	secret := make([]byte, 64<<10)
	rand.Read(secret)
	outsideDir := t.TempDir()
	outside := filepath.Join(outsideDir, "other-tenant.raw")
	if err := os.WriteFile(outside, secret, 0o600); err != nil {
		t.Fatal(err)
	}
	otherStore := storeDir(t, t.TempDir())
	inOther := filepath.Join(otherStore, "t.raw")
	if err := os.WriteFile(inOther, secret, 0o600); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name    string
		mk      func(t *testing.T, store, vol string)
		offends string // what the error must name
	}{
		{"absolute /etc/hostname", func(t *testing.T, store, vol string) {
			qcreate(t, vol, "qcow2", 1<<20, qemuimg.BackingFile("/etc/hostname", "raw"))
		}, "/etc/hostname"},
		{"another tenant's file", func(t *testing.T, store, vol string) {
			qcreate(t, vol, "qcow2", 1<<20, qemuimg.BackingFile(outside, "raw"))
		}, outside},
		{"another store", func(t *testing.T, store, vol string) {
			qcreate(t, vol, "qcow2", 1<<20, qemuimg.BackingFile(inOther, "raw"))
		}, inOther},
		{"relative name leaving the store", func(t *testing.T, store, vol string) {
			rel, _ := filepath.Rel(filepath.Dir(vol), outside)
			qcreate(t, vol, "qcow2", 1<<20, qemuimg.BackingFile(rel, "raw"), qemuimg.SkipBackingCheck())
		}, outside},
		{"symbolic link out of the store", func(t *testing.T, store, vol string) {
			link := filepath.Join(store, "templates", "t.raw")
			os.Symlink(outside, link)
			qcreate(t, vol, "qcow2", 1<<20, qemuimg.BackingFile(link, "raw"))
		}, filepath.Join("templates", "t.raw")},
		{"deeper in the chain", func(t *testing.T, store, vol string) {
			mid := filepath.Join(store, "snapshots", "s1.qcow2")
			qcreate(t, mid, "qcow2", 1<<20, qemuimg.BackingFile(outside, "raw"))
			qcreate(t, vol, "qcow2", 1<<20, qemuimg.BackingFile(mid, "qcow2"))
		}, outside},
		{"qemu protocol", func(t *testing.T, store, vol string) {
			qcreate(t, vol, "qcow2", 1<<20, qemuimg.BackingFile("nbd:localhost:10809", "raw"), qemuimg.SkipBackingCheck())
		}, "nbd:localhost:10809"},
		{"backing format not recorded", func(t *testing.T, store, vol string) {
			tmpl := filepath.Join(store, "templates", "t.raw")
			writeRaw(t, tmpl, guestQcow2Header(t, outside), 1<<20)
			qcreate(t, vol, "qcow2", 1<<20, qemuimg.BackingFile(tmpl, "raw"))
			dropBackingFormat(t, vol)
		}, filepath.Join("templates", "t.raw")},
		{"external data file", func(t *testing.T, store, vol string) {
			if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+outside, vol, "1M").CombinedOutput(); err != nil {
				t.Fatalf("qemu-img create: %v: %s", err, out)
			}
		}, outside},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := New("h1")
			store := primaryStore(t)
			vol := filepath.Join(store, "volumes", "v.qcow2")
			c.mk(t, store, vol)
			before := readFile(t, vol)
			refused := func(op string, err error) {
				t.Helper()
				if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), c.offends) {
					t.Errorf("%s: err = %v, want ErrInvalid naming %s", op, err, c.offends)
				}
			}
			q := drivers.FormatQCOW2
			_, err := l.CopyImage(ctx, CopyRequest{Source: vol, SourceFormat: q, Dest: filepath.Join(store, "templates", "flat.raw"), Format: drivers.FormatRaw, Flatten: true}, nil)
			refused("copy (flatten)", err)
			_, err = l.CopyImage(ctx, CopyRequest{Source: vol, SourceFormat: q, Dest: filepath.Join(store, "volumes", "same.qcow2")}, nil)
			refused("copy (as is)", err)
			_, err = l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: filepath.Join(store, "snapshots", "v", "s.qcow2"), Format: q})
			refused("snapshot", err)
			_, err = l.BackupImage(ctx, BackupRequest{Source: vol, SourceFormat: q, ChunkDir: filepath.Join(store, "snapshots", "chunks"), Manifest: filepath.Join(store, "snapshots", "m.json")}, nil)
			refused("backup", err)
			_, err = l.CloneImage(ctx, CloneRequest{Base: vol, BaseFormat: q, Dest: filepath.Join(store, "volumes", "full.raw"), Mode: drivers.CloneFull, Format: drivers.FormatRaw}, nil)
			refused("full clone", err)
			_, err = l.CloneImage(ctx, CloneRequest{Base: vol, BaseFormat: q, Dest: filepath.Join(store, "volumes", "linked.qcow2"), Mode: drivers.CloneLinked}, nil)
			refused("linked clone", err)
			_, err = l.ResizeImage(ctx, vol, q, 2<<20)
			refused("resize", err)
			_, err = l.RebaseImage(ctx, vol, "", "")
			refused("rebase", err)
			_, err = l.RevertImage(ctx, SnapshotRequest{Volume: filepath.Join(store, "volumes", "w.qcow2"), Snapshot: vol, Format: q})
			refused("revert onto it", err)

			if !bytes.Equal(readFile(t, vol), before) {
				t.Error("the volume changed")
			}
			onlyEntries(t, filepath.Join(store, "volumes"), "v.qcow2")
			onlyEntries(t, filepath.Join(store, "snapshots", "v"))
			if _, err := os.Stat(filepath.Join(store, "snapshots", "m.json")); !os.IsNotExist(err) {
				t.Errorf("a manifest was written: %v", err)
			}
			filepath.WalkDir(store, func(p string, d os.DirEntry, err error) error {
				if err == nil && d.Type().IsRegular() && bytes.Contains(readFile(t, p), secret) {
					t.Errorf("%s holds the secret", p)
				}
				return nil
			})
		})
	}
}

// Chains inside the store pass: a linked clone of a template, snapshots of
// it, a backup of a snapshot and a rebase that drops one.
func TestQcow2ChainsInsideTheStorePass(t *testing.T) {
	needQemuImg(t)
	ctx := t.Context()
	l := New("h1")
	store := primaryStore(t)
	tmpl := filepath.Join(store, "templates", "t.raw")
	noise := make([]byte, 256<<10)
	rand.Read(noise)
	writeRaw(t, tmpl, noise, 1<<20)
	vol := filepath.Join(store, "volumes", "v.qcow2")
	q := drivers.FormatQCOW2
	if _, err := l.CloneImage(ctx, CloneRequest{Base: tmpl, BaseFormat: drivers.FormatRaw, Dest: vol, Mode: drivers.CloneLinked}, nil); err != nil {
		t.Fatal(err)
	}
	s1 := filepath.Join(store, "snapshots", "v", "s1.qcow2")
	s2 := filepath.Join(store, "snapshots", "v", "s2.qcow2")
	for _, s := range []string{s1, s2} {
		if _, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: s, Format: q}); err != nil {
			t.Fatal(err)
		}
	}
	m := filepath.Join(store, "snapshots", "manifests", "s2.json")
	chunks := filepath.Join(store, "snapshots", "chunks")
	if _, err := l.BackupImage(ctx, BackupRequest{Source: s2, SourceFormat: q, ChunkDir: chunks, Manifest: m}, nil); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(store, "volumes", "r.raw")
	if _, err := l.RestoreImage(ctx, RestoreRequest{Manifest: m, ChunkDir: chunks, Dest: out, Format: drivers.FormatRaw}, nil); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readFile(t, out), readFile(t, tmpl)) {
		t.Fatal("the restored chain differs from the template")
	}
	if info, err := l.RebaseImage(ctx, vol, s1, q); err != nil || info.BackingFile != s1 {
		t.Fatalf("rebase onto s1: %+v %v", info, err)
	}
	if _, err := l.CopyImage(ctx, CopyRequest{Source: vol, SourceFormat: q, Dest: filepath.Join(store, "volumes", "flat.raw"), Format: drivers.FormatRaw, Flatten: true}, nil); err != nil {
		t.Fatal(err)
	}
	// Rebasing onto an image outside the store is refused.
	outside := filepath.Join(t.TempDir(), "x.raw")
	writeRaw(t, outside, nil, 1<<20)
	if _, err := l.RebaseImage(ctx, vol, outside, drivers.FormatRaw); !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), outside) {
		t.Fatalf("rebase out of the store: %v", err)
	}
	// A linked clone of a base in another store is refused.
	other := storeDir(t, t.TempDir())
	if _, err := l.CloneImage(ctx, CloneRequest{Base: tmpl, BaseFormat: drivers.FormatRaw, Dest: filepath.Join(other, "v.qcow2"), Mode: drivers.CloneLinked}, nil); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("linked clone across stores: %v", err)
	}
}

// The same on a filesystem that shares extents: the reflinked snapshot,
// clone and revert of the raw volume are its bytes.
func TestRawGuestHeaderReflinkOnXFS(t *testing.T) {
	needQemuImg(t)
	mnt := mountXFS(t)
	ctx := t.Context()
	l := New("h1")
	store := storeDir(t, mnt)
	vol := filepath.Join(store, "evil.raw")
	writeRaw(t, vol, guestQcow2Header(t, "/etc/hostname"), 1<<20)
	want := readFile(t, vol)
	secret := readFile(t, "/etc/hostname")
	snap := filepath.Join(store, "s.raw")
	si, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: snap, Format: drivers.FormatRaw})
	if err != nil || si.Method != "reflink" || si.Snapshot.BackingFile != "" {
		t.Fatalf("reflink snapshot: %+v %v", si, err)
	}
	clone := filepath.Join(store, "c.raw")
	if info, err := l.CloneImage(ctx, CloneRequest{Base: vol, BaseFormat: drivers.FormatRaw, Dest: clone, Mode: drivers.CloneReflink}, nil); err != nil || info.Method != "reflink" {
		t.Fatalf("reflink clone: %+v %v", info, err)
	}
	if _, err := l.RevertImage(ctx, SnapshotRequest{Volume: vol, Snapshot: snap, Format: drivers.FormatRaw}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{snap, clone, vol} {
		got := readFile(t, p)
		if !bytes.Equal(got, want) || (len(bytes.TrimSpace(secret)) > 0 && bytes.Contains(got, secret)) {
			t.Fatalf("%s differs from the volume's bytes", p)
		}
	}
}

// A backing root (the host's template mount) may end a chain that starts
// in a store, and only when set: a lazy volume's overlay on a template in
// it, and snapshots on top, pass; a template there whose own backing file
// leaves the root is refused; nothing outside stores and roots is read.
func TestChainsEndingInABackingRoot(t *testing.T) {
	needQemuImg(t)
	ctx := t.Context()
	l := New("h1")
	store := primaryStore(t)
	mount := t.TempDir() // stands in for the FUSE mount: a directory outside every store
	tmpl := filepath.Join(mount, "t1")
	noise := make([]byte, 256<<10)
	rand.Read(noise)
	writeRaw(t, tmpl, noise, 1<<20)
	vol := filepath.Join(store, "volumes", "lazy.qcow2")
	req := CloneRequest{Base: tmpl, BaseFormat: drivers.FormatRaw, Dest: vol, Mode: drivers.CloneLinked}
	if _, err := l.CloneImage(ctx, req, nil); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("a clone on a file outside the store with no backing root set: %v", err)
	}
	l.SetBackingRoots(mount)
	if _, err := l.CloneImage(ctx, req, nil); err != nil {
		t.Fatalf("lazy clone on the backing root: %v", err)
	}
	q := drivers.FormatQCOW2
	snap := filepath.Join(store, "snapshots", "lazy", "s1.qcow2")
	if _, err := l.SnapshotImage(ctx, SnapshotRequest{Volume: vol, Snapshot: snap, Format: q}); err != nil {
		t.Fatalf("snapshot of a lazy volume: %v", err)
	}
	flat := filepath.Join(store, "volumes", "flat.raw")
	if _, err := l.CopyImage(ctx, CopyRequest{Source: vol, SourceFormat: q, Dest: flat, Format: drivers.FormatRaw, Flatten: true}, nil); err != nil {
		t.Fatalf("flatten a lazy volume: %v", err)
	}
	if !bytes.Equal(readFile(t, flat), readFile(t, tmpl)) {
		t.Fatal("the flattened lazy volume differs from its template")
	}
	// A qcow2 "template" in the root whose backing file points out of it
	// (at a file no store or root holds) is refused.
	secret := filepath.Join(t.TempDir(), "secret.raw")
	writeRaw(t, secret, []byte("secret"), 1<<20)
	evil := filepath.Join(mount, "evil")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", evil).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v %s", err, out)
	}
	_, err := l.CloneImage(ctx, CloneRequest{Base: evil, BaseFormat: q, Dest: filepath.Join(store, "volumes", "evil.qcow2"), Mode: drivers.CloneLinked}, nil)
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), secret) {
		t.Fatalf("a chain leaving the backing root: %v", err)
	}
	// Unset, the lazy volume's chain is refused again.
	l.SetBackingRoots()
	if _, err := l.CopyImage(ctx, CopyRequest{Source: vol, SourceFormat: q, Dest: filepath.Join(store, "volumes", "flat2.raw"), Format: drivers.FormatRaw, Flatten: true}, nil); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("flatten with no backing root set: %v", err)
	}
}

package driverstest

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// imageSize is the virtual size of the suite's images: 3 MiB + 512 bytes.
const imageSize = 3<<20 + 512

// imageServer serves the suite's images over HTTP on loopback.
type imageServer struct {
	srv   *httptest.Server
	raw   []byte // the raw image, also the qcow2's guest data
	files map[string][]byte
}

// images makes a raw image with a pattern and a qcow2 of the same data
// (qemu-img convert), and serves them as /raw and /qcow2 until the test
// ends. It skips the test when qemu-img is not installed.
func images(t *testing.T) *imageServer {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skipf("qemu-img is not installed (apt-get install qemu-utils): %v", err)
	}
	dir := t.TempDir()
	raw := make([]byte, imageSize)
	for i := range 1 << 20 {
		raw[i] = byte(i*7 + i>>9)
	}
	copy(raw[imageSize-512:], bytes.Repeat([]byte("stowage!"), 64))
	rawPath, qcowPath := filepath.Join(dir, "img.raw"), filepath.Join(dir, "img.qcow2")
	if err := os.WriteFile(rawPath, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.CommandContext(t.Context(), "qemu-img", "convert", "-f", "raw", "-O", "qcow2", rawPath, qcowPath).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, out)
	}
	qcow, err := os.ReadFile(qcowPath)
	if err != nil {
		t.Fatal(err)
	}
	s := &imageServer{raw: raw, files: map[string][]byte{"raw": raw, "qcow2": qcow}}
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, ok := s.files[strings.TrimPrefix(r.URL.Path, "/")]
		if !ok {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, "", time0, bytes.NewReader(b))
	}))
	t.Cleanup(s.srv.Close)
	return s
}

func (s *imageServer) url(name string) string { return s.srv.URL + "/" + name }

func (s *imageServer) sum(name string) string {
	h := sha256.Sum256(s.files[name])
	return "sha256:" + hex.EncodeToString(h[:])
}

// template returns a template of store info in format f, located.
func template(t *testing.T, d drivers.Driver, info drivers.StoreInfo, id string, f drivers.Format) drivers.DataObject {
	t.Helper()
	return located(t, d, drivers.DataObject{ID: id, Type: drivers.ObjectTemplate, Store: info, Format: f, Size: imageSize})
}

// importTemplate imports image name of s as a template in format f.
func importTemplate(t *testing.T, e Env, s *imageServer, info drivers.StoreInfo, id string, f drivers.Format) drivers.DataObject {
	t.Helper()
	imp := capability[drivers.Importer](t, e, "Importer")
	obj := template(t, e.Provider.Driver(), info, id, f)
	got, err := imp.Import(t.Context(), obj, drivers.ImportSource{URL: s.url(string(f)), Checksum: s.sum(string(f))}, nil)
	if err != nil {
		t.Fatalf("Import %s (%s): %v", id, f, err)
	}
	if got.Key != obj.Key || got.Size != imageSize {
		t.Errorf("Import %s = %+v, want key %q and virtual size %d", id, got, obj.Key, imageSize)
	}
	return obj
}

func testImport(t *testing.T, e Env) {
	imp := capability[drivers.Importer](t, e, "Importer")
	ctx := t.Context()
	d := e.Provider.Driver()
	s := images(t)
	info := attached(t, e)

	for _, f := range objectFormats(e, drivers.FormatRaw, drivers.FormatQCOW2) {
		obj := importTemplate(t, e, s, info, "tmpl-"+string(f), f)
		st := wantSize(t, d, obj, imageSize, "an imported "+string(f))
		if st.Format != f {
			t.Errorf("Stat of an imported %s = %+v", f, st)
		}
		again, err := imp.Import(ctx, obj, drivers.ImportSource{URL: s.url(string(f)), Checksum: s.sum(string(f))}, nil)
		if err != nil || again.Key != obj.Key {
			t.Errorf("Import of %s again = %+v, %v; want the same object (idempotent)", obj.ID, again, err)
		}
		remove(t, d, obj)
		wantGone(t, d, obj, "a deleted template")
	}

	bad := template(t, d, info, "tmpl-bad", drivers.FormatRaw)
	_, err := imp.Import(ctx, bad, drivers.ImportSource{URL: s.url("raw"), Checksum: "sha256:" + strings.Repeat("0", 64)}, nil)
	if !errors.Is(err, errdefs.ErrDataLoss) {
		t.Errorf("Import with a wrong checksum: err = %v, want ErrDataLoss", err)
	}
	wantGone(t, d, bad, "an import with a wrong checksum")

	// The content must be the declared format.
	liar := template(t, d, info, "tmpl-liar", drivers.FormatQCOW2)
	if _, err := imp.Import(ctx, liar, drivers.ImportSource{URL: s.url("raw"), Checksum: s.sum("raw")}, nil); err == nil {
		t.Errorf("Import of raw bytes as a qcow2 succeeded")
	}
	wantGone(t, d, liar, "an import of the wrong format")

	gone := template(t, d, info, "tmpl-404", drivers.FormatRaw)
	if _, err := imp.Import(ctx, gone, drivers.ImportSource{URL: s.url("missing")}, nil); err == nil {
		t.Errorf("Import from a URL that answers 404 succeeded")
	}
	wantGone(t, d, gone, "an import from a missing URL")

	if objs, err := d.ListObjects(ctx, info); err != nil || len(objs) != 0 {
		t.Errorf("after the imports, ListObjects = %+v, %v; want nothing", objs, err)
	}
}

func testClone(t *testing.T, e Env) {
	needPrimary(t, e.Spec)
	c := capability[drivers.Cloner](t, e, "Cloner")
	ctx := t.Context()
	d := e.Provider.Driver()
	s := images(t)
	info := attached(t, e)
	raw := importTemplate(t, e, s, info, "base-raw", drivers.FormatRaw)
	qcowVolumes := len(volumeFormats(e, drivers.FormatQCOW2)) > 0
	var qcow drivers.DataObject
	if len(objectFormats(e, drivers.FormatQCOW2)) > 0 {
		qcow = importTemplate(t, e, s, info, "base-qcow2", drivers.FormatQCOW2)
	}

	cases := []struct {
		name string
		base drivers.DataObject
		mode drivers.CloneMode
		f    drivers.Format
		size int64
	}{
		{"full raw from raw", raw, drivers.CloneFull, drivers.FormatRaw, 0},
		{"full qcow2 from raw, grown", raw, drivers.CloneFull, drivers.FormatQCOW2, 2 * imageSize},
		{"full raw from qcow2", qcow, drivers.CloneFull, drivers.FormatRaw, 0},
		{"linked on qcow2", qcow, drivers.CloneLinked, drivers.FormatQCOW2, 0},
		{"linked on raw, grown", raw, drivers.CloneLinked, drivers.FormatQCOW2, 2 * imageSize},
		{"reflink raw", raw, drivers.CloneReflink, drivers.FormatRaw, 0},
	}
	if !qcowVolumes {
		// Raw volumes only: a linked clone is the store's own
		// copy-on-write clone (an RBD clone), raw.
		cases = append(cases, struct {
			name string
			base drivers.DataObject
			mode drivers.CloneMode
			f    drivers.Format
			size int64
		}{"linked raw on raw", raw, drivers.CloneLinked, drivers.FormatRaw, 0}, struct {
			name string
			base drivers.DataObject
			mode drivers.CloneMode
			f    drivers.Format
			size int64
		}{"linked raw on raw, grown", raw, drivers.CloneLinked, drivers.FormatRaw, 2 * imageSize})
	}
	for i, cs := range cases {
		if cs.base.ID == "" || len(volumeFormats(e, cs.f)) == 0 {
			t.Logf("%s: not a format the store holds", cs.name)
			continue
		}
		dst := located(t, d, drivers.DataObject{ID: "clone-" + string(rune('a'+i)), Type: drivers.ObjectVolume, Store: info, Format: cs.f, Size: cs.size})
		got, err := c.Clone(ctx, drivers.CloneSpec{Base: cs.base, Dst: dst, Mode: cs.mode}, nil)
		if cs.mode == drivers.CloneReflink && errors.Is(err, errdefs.ErrNotImplemented) {
			t.Logf("%s: %v (the store cannot share extents)", cs.name, err)
			wantGone(t, d, dst, cs.name+": a refused reflink")
			continue
		}
		if err != nil {
			t.Errorf("%s: Clone: %v", cs.name, err)
			continue
		}
		want := int64(imageSize)
		if cs.size != 0 {
			want = cs.size
		}
		if got.Key != dst.Key || got.Size != want {
			t.Errorf("%s: Clone = %+v, want key %q, size %d", cs.name, got, dst.Key, want)
		}
		wantSize(t, d, dst, want, cs.name)
		if cs.f == drivers.FormatRaw && cs.base.ID == raw.ID && cs.size == 0 {
			wantBytes(t, e, dst, s.raw, cs.name)
		}
		remove(t, d, dst)
	}
	if qcowVolumes {
		bad := located(t, d, drivers.DataObject{ID: "clone-bad", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw})
		if _, err := c.Clone(ctx, drivers.CloneSpec{Base: raw, Dst: bad, Mode: drivers.CloneLinked}, nil); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("a linked clone into a raw volume: err = %v, want ErrInvalid", err)
		}
		wantGone(t, d, bad, "a refused clone")
		remove(t, d, qcow)
	}
	remove(t, d, raw)
}

func testRebase(t *testing.T, e Env) {
	needPrimary(t, e.Spec)
	r := capability[drivers.Rebaser](t, e, "Rebaser")
	c := capability[drivers.Cloner](t, e, "Cloner")
	ctx := t.Context()
	d := e.Provider.Driver()
	s := images(t)
	info := attached(t, e)
	qcow := importTemplate(t, e, s, info, "rebase-base", drivers.FormatQCOW2)
	other := importTemplate(t, e, s, info, "rebase-other", drivers.FormatRaw)
	vol := located(t, d, drivers.DataObject{ID: "rebase-vol", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatQCOW2})
	if _, err := c.Clone(ctx, drivers.CloneSpec{Base: qcow, Dst: vol, Mode: drivers.CloneLinked}, nil); err != nil {
		t.Fatalf("linked Clone: %v", err)
	}
	// Onto another base with the same data, then standalone.
	if _, err := r.Rebase(ctx, vol, &other); err != nil {
		t.Fatalf("Rebase onto %s: %v", other.ID, err)
	}
	remove(t, d, qcow)
	wantSize(t, d, vol, imageSize, "rebased onto another base, the first one deleted")
	got, err := r.Rebase(ctx, vol, nil)
	if err != nil {
		t.Fatalf("Rebase to standalone: %v", err)
	}
	if got.Key != vol.Key || got.Size != imageSize {
		t.Errorf("Rebase = %+v, want key %q, size %d", got, vol.Key, imageSize)
	}
	remove(t, d, other)
	wantSize(t, d, vol, imageSize, "standalone, its bases deleted")
	remove(t, d, vol)
}

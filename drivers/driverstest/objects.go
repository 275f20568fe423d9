package driverstest

import (
	"errors"
	"slices"
	"testing"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

func testLocate(t *testing.T, e Env) {
	d := e.Provider.Driver()
	// Locate is pure: it needs no initialised store and no host.
	info := drivers.StoreInfo{ID: e.Spec.ID, Name: e.Spec.Name, Role: e.Spec.Role, Provider: e.Provider.Name(), URL: e.Spec.URL, Scope: e.Spec.Scope, Details: e.Spec.Details}
	var objs []drivers.DataObject
	for _, f := range []drivers.Format{drivers.FormatRaw, drivers.FormatQCOW2} {
		objs = append(objs,
			drivers.DataObject{ID: "t-" + string(f), Type: drivers.ObjectTemplate, Store: info, Format: f},
			drivers.DataObject{ID: "s-" + string(f), Type: drivers.ObjectSnapshot, Store: info, Format: f})
		if e.Spec.Role == drivers.RolePrimary {
			objs = append(objs, drivers.DataObject{ID: "v-" + string(f), Type: drivers.ObjectVolume, Store: info, Format: f})
		}
	}
	seen := map[string]string{}
	for _, o := range objs {
		k1, err := d.Locate(o)
		if err != nil {
			t.Errorf("Locate(%s %s %s): %v", o.Type, o.ID, o.Format, err)
			continue
		}
		k2, _ := d.Locate(o)
		if k1 == "" || k1 != k2 {
			t.Errorf("Locate(%s %s) = %q then %q; want one non-empty key", o.Type, o.ID, k1, k2)
		}
		if prev, dup := seen[k1]; dup {
			t.Errorf("Locate gives %s and %s the same key %q", prev, o.ID, k1)
		}
		seen[k1] = o.ID
	}
	if _, err := d.Locate(drivers.DataObject{ID: "", Type: drivers.ObjectTemplate, Store: info, Format: drivers.FormatRaw}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("Locate of an object without an id: err = %v, want ErrInvalid", err)
	}
	if _, err := d.Locate(drivers.DataObject{ID: "x", Type: "bogus", Store: info, Format: drivers.FormatRaw}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("Locate of an object of an unknown type: err = %v, want ErrInvalid", err)
	}
}

func testVolumeLifecycle(t *testing.T, e Env) {
	needPrimary(t, e.Spec)
	ctx := t.Context()
	lc, drv := e.Provider.LifeCycle(), e.Provider.Driver()
	info := attached(t, e)

	vol := located(t, drv, blankVolume(info, "vol-1", OddSize))
	got, err := drv.Create(ctx, vol)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	if got.ID != vol.ID || got.Type != drivers.ObjectVolume || got.Format != drivers.FormatRaw || got.Size != OddSize || got.Key != vol.Key {
		t.Errorf("Create = %+v, want volume vol-1, raw, %d bytes, key %q", got, OddSize, vol.Key)
	}
	again, err := drv.Create(ctx, vol)
	if err != nil {
		t.Errorf("Create of the same volume again: %v, want success (idempotent)", err)
	} else if again.Key != got.Key || again.Size != got.Size {
		t.Errorf("Create again = %+v, want %+v", again, got)
	}
	bigger := blankVolume(info, "vol-1", 2*OddSize)
	if _, err := drv.Create(ctx, bigger); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("Create vol-1 with another size: err = %v, want ErrAlreadyExists", err)
	}
	if st := wantSize(t, drv, vol, OddSize, "after Create"); st.Format != drivers.FormatRaw || st.Key != vol.Key {
		t.Errorf("Stat = %+v, want raw at %q", st, vol.Key)
	}
	missing := located(t, drv, blankVolume(info, "vol-missing", OddSize))
	wantGone(t, drv, missing, "a volume never created")

	objs, err := drv.ListObjects(ctx, info)
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != 1 {
		t.Fatalf("ListObjects = %+v, want vol-1 alone", objs)
	}
	if o := objs[0]; o.ID != "vol-1" || o.Type != drivers.ObjectVolume || o.Key != vol.Key || o.Format != drivers.FormatRaw || o.Size != OddSize {
		t.Errorf("ListObjects shows %+v, want %+v", o, got)
	}

	err = lc.Delete(ctx, info)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("Delete of a store holding vol-1: err = %v, want ErrFailedPrecondition", err)
	}
	objs, err = drv.ListObjects(ctx, info)
	if err != nil || len(objs) != 1 {
		t.Fatalf("after a refused Delete, ListObjects = %+v, %v; want the store intact with vol-1", objs, err)
	}
	if _, err := lc.Attach(ctx, info, e.Spec.Scope); err != nil {
		t.Fatalf("after a refused Delete, Attach: %v", err)
	}

	for i := range 2 {
		if err := drv.Delete(ctx, vol); err != nil {
			t.Fatalf("Delete vol-1 (%d): %v", i+1, err)
		}
	}
	wantGone(t, drv, vol, "after Delete")
	if err := lc.Delete(ctx, info); err != nil {
		t.Fatalf("Delete of the empty store: %v", err)
	}
	if err := lc.Delete(ctx, info); err != nil {
		t.Errorf("Delete of the store again: %v, want success (idempotent)", err)
	}
}

// source makes an object to copy, snapshot or grant access to on e's
// store: a blank raw volume on a primary store, an imported raw template
// on an image store (skipping when the provider cannot import). Its bytes
// are want when want is not nil.
func source(t *testing.T, e Env, info drivers.StoreInfo, id string) (obj drivers.DataObject, want []byte) {
	t.Helper()
	d := e.Provider.Driver()
	if info.Role == drivers.RolePrimary {
		return create(t, d, blankVolume(info, id, OddSize)), nil
	}
	imp := capability[drivers.Importer](t, e, "Importer")
	img := images(t)
	obj = located(t, d, drivers.DataObject{ID: id, Type: drivers.ObjectTemplate, Store: info, Format: drivers.FormatRaw, Size: int64(len(img.raw))})
	if _, err := imp.Import(t.Context(), obj, drivers.ImportSource{URL: img.url("raw"), Checksum: img.sum("raw")}, nil); err != nil {
		t.Fatalf("Import %s: %v", id, err)
	}
	return obj, img.raw
}

func testCopy(t *testing.T, e Env) {
	ctx := t.Context()
	d := e.Provider.Driver()
	info := attached(t, e)
	src, _ := source(t, e, info, "copy-src")
	size := wantSize(t, d, src, src.Size, "the copy's source").Size

	foreign := src
	foreign.Store = drivers.StoreInfo{ID: info.ID + "-elsewhere", Role: info.Role, Provider: e.Provider.Name() + "-other", URL: "other://x", Scope: info.Scope}
	cases := []struct {
		name     string
		src, dst drivers.DataObject
	}{
		{"same store, same format", src, withID(src, "copy-dst-1")},
		{"same store, to qcow2", src, withFormat(withID(src, "copy-dst-2"), drivers.FormatQCOW2)},
		{"from another provider's store", foreign, withID(src, "copy-dst-3")},
	}
	for _, c := range cases {
		dst := located(t, d, c.dst)
		if !d.CanCopy(c.src, dst) {
			_, err := d.Copy(ctx, c.src, dst, nil)
			if !errors.Is(err, errdefs.ErrNotImplemented) {
				t.Errorf("%s: CanCopy is false, but Copy: err = %v, want ErrNotImplemented", c.name, err)
			}
			wantGone(t, d, dst, c.name+": a copy CanCopy refused")
			continue
		}
		t.Logf("%s: CanCopy is true", c.name)
		got, err := d.Copy(ctx, c.src, dst, nil)
		if err != nil {
			t.Errorf("%s: CanCopy is true, but Copy: %v", c.name, err)
			continue
		}
		if got.Key != dst.Key {
			t.Errorf("%s: Copy = key %q, Locate said %q", c.name, got.Key, dst.Key)
		}
		wantSize(t, d, dst, size, c.name+": the copy")
		remove(t, d, dst)
	}
	remove(t, d, src)
}

func withID(o drivers.DataObject, id string) drivers.DataObject {
	o.ID, o.Key = id, ""
	return o
}

func withFormat(o drivers.DataObject, f drivers.Format) drivers.DataObject {
	o.Format, o.Key = f, ""
	return o
}

func testSnapshot(t *testing.T, e Env) {
	needPrimary(t, e.Spec)
	ctx := t.Context()
	pd, ok := e.Provider.Driver().(drivers.PrimaryDriver)
	if !ok {
		t.Fatalf("%T serves primary stores but is not a drivers.PrimaryDriver", e.Provider.Driver())
	}
	resizer, canResize := e.Provider.Driver().(drivers.Resizer)
	info := attached(t, e)
	for _, f := range volumeFormats(e, drivers.FormatQCOW2, drivers.FormatRaw) {
		vol := blankVolume(info, "snapvol-"+string(f), OddSize)
		vol.Format = f
		vol = create(t, pd, vol)
		snap := drivers.SnapshotObject{
			DataObject: located(t, pd, drivers.DataObject{ID: "snap-" + string(f), Type: drivers.ObjectSnapshot, Store: info, Format: f, Size: OddSize}),
			Volume:     vol,
		}
		got, err := pd.TakeSnapshot(ctx, snap)
		if err != nil {
			t.Fatalf("TakeSnapshot of a %s volume: %v", f, err)
		}
		if got.Key != snap.Key || got.Method == "" {
			t.Errorf("TakeSnapshot = %+v, want key %q and a Method", got, snap.Key)
		}
		wantSize(t, pd, snap.DataObject, OddSize, "the snapshot")
		wantSize(t, pd, vol, OddSize, "the volume after its snapshot")
		if canResize {
			if _, err := resizer.Resize(ctx, vol, 2*OddSize); err != nil {
				t.Fatalf("Resize after the snapshot: %v", err)
			}
			wantSize(t, pd, vol, 2*OddSize, "the volume grown after its snapshot")
		}
		if err := pd.RevertSnapshot(ctx, snap); err != nil {
			t.Fatalf("RevertSnapshot of a %s volume: %v", f, err)
		}
		wantSize(t, pd, vol, OddSize, "the volume reverted")
		wantSize(t, pd, snap.DataObject, OddSize, "the snapshot after a revert")
		if err := pd.RevertSnapshot(ctx, snap); err != nil {
			t.Errorf("RevertSnapshot again: %v", err)
		}
		for i := range 2 {
			if err := pd.Delete(ctx, snap.DataObject); err != nil {
				t.Errorf("Delete the snapshot (%d): %v", i+1, err)
			}
		}
		wantGone(t, pd, snap.DataObject, "a deleted snapshot")
		remove(t, pd, vol)
	}
}

func testResize(t *testing.T, e Env) {
	needPrimary(t, e.Spec)
	r := capability[drivers.Resizer](t, e, "Resizer")
	d := e.Provider.Driver()
	info := attached(t, e)
	for _, f := range volumeFormats(e, drivers.FormatRaw, drivers.FormatQCOW2) {
		vol := blankVolume(info, "grow-"+string(f), OddSize)
		vol.Format = f
		vol = create(t, d, vol)
		got, err := r.Resize(t.Context(), vol, 3*OddSize)
		if err != nil {
			t.Fatalf("Resize %s: %v", f, err)
		}
		if got.Size != 3*OddSize {
			t.Errorf("Resize %s = %+v, want size %d", f, got, 3*OddSize)
		}
		wantSize(t, d, vol, 3*OddSize, "after Resize")
		if _, err := r.Resize(t.Context(), vol, 3*OddSize); err != nil {
			t.Errorf("Resize to the same size again: %v, want success", err)
		}
		if _, err := r.Resize(t.Context(), vol, OddSize); err == nil {
			t.Errorf("shrinking a %s volume succeeded; want an error (data would be lost)", f)
		}
		wantSize(t, d, vol, 3*OddSize, "after a refused shrink")
		remove(t, d, vol)
	}
}

// volumeFormats are those of want a volume of e's store can be in (all of
// them unless its driver says otherwise: drivers.VolumeFormats).
func volumeFormats(e Env, want ...drivers.Format) []drivers.Format {
	if vf, ok := e.Provider.Driver().(drivers.VolumeFormats); ok {
		return allowed(vf.VolumeFormats(), want)
	}
	return want
}

// objectFormats are those of want a template of e's store can be in (all
// of them unless its driver says otherwise: drivers.ObjectFormats).
func objectFormats(e Env, want ...drivers.Format) []drivers.Format {
	if of, ok := e.Provider.Driver().(drivers.ObjectFormats); ok {
		return allowed(of.ObjectFormats(), want)
	}
	return want
}

func allowed(have, want []drivers.Format) []drivers.Format {
	var out []drivers.Format
	for _, f := range want {
		if slices.Contains(have, f) {
			out = append(out, f)
		}
	}
	return out
}

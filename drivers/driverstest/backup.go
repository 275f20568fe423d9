package driverstest

import (
	"errors"
	"net/url"
	"testing"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

func testChunkTarget(t *testing.T, e Env) {
	if e.Spec.Role != drivers.RoleImage {
		t.Skipf("backups live on image stores; this spec is a %s store", e.Spec.Role)
	}
	ct := capability[drivers.ChunkTarget](t, e, "ChunkTarget")
	ctx := t.Context()
	d := e.Provider.Driver()
	info := attached(t, e)
	backup := func(id string) drivers.DataObject {
		return located(t, d, drivers.DataObject{ID: id, Type: drivers.ObjectSnapshot, Store: info, Size: imageSize})
	}
	b1, b2 := backup("backup-1"), backup("backup-2")

	a1, err := ct.BackupAccess(ctx, b1, drivers.Client{HostID: e.Client, Purpose: drivers.PurposeWrite})
	if err != nil {
		t.Fatalf("BackupAccess for %s: %v", e.Client, err)
	}
	if u, err := url.Parse(string(a1.Chunks)); err != nil || u.Scheme == "" || a1.Manifest == "" {
		t.Errorf("BackupAccess = %+v: want a chunk store URI with a scheme and a manifest name", a1)
	}
	a2, err := ct.BackupAccess(ctx, b2, drivers.Client{HostID: e.Client, Purpose: drivers.PurposeWrite})
	if err != nil {
		t.Fatal(err)
	}
	if a2.Chunks != a1.Chunks || a2.Manifest == a1.Manifest {
		t.Errorf("BackupAccess gives %+v and %+v: want one chunk store (chunks are shared) and two manifests", a1, a2)
	}
	if e.Remote != "" {
		if _, err := ct.BackupAccess(ctx, b1, drivers.Client{HostID: e.Remote, Purpose: drivers.PurposeWrite}); err != nil && !errors.Is(err, errdefs.ErrFailedPrecondition) {
			t.Errorf("BackupAccess for %s, outside the scope: err = %v, want success or ErrFailedPrecondition", e.Remote, err)
		}
	}

	st, err := ct.DeleteBackup(ctx, b1)
	if err != nil || st.ManifestGone || st.Chunks != 0 {
		t.Errorf("DeleteBackup of a backup never made = %+v, %v; want nothing done and no error", st, err)
	}

	hr, rooted := e.Provider.(drivers.HostRooted)
	if e.Hosts == nil || !rooted || hr.HostRoot(info, "") == "" {
		t.Logf("no hosts or not a host-rooted store: the backup round trip is not run")
		return
	}
	// Back a template of the store up twice, as the snapshot workflow does
	// on a host in scope with the access the driver gave.
	s := images(t)
	src := importTemplate(t, e, s, info, "backup-src", drivers.FormatRaw)
	h, err := e.Hosts.ForScope(drivers.WithHost(ctx, e.Client), info.Scope)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []drivers.BackupAccess{a1, a2} {
		bi, err := h.BackupImage(ctx, hostops.BackupRequest{
			Source: hostops.Ref{Store: info.ID, Key: src.Key}, SourceFormat: drivers.FormatRaw,
			Chunks: hostops.ChunkStore{URI: a.Chunks, Secret: a.Secret}, Manifest: a.Manifest, ChunkSize: 1 << 20,
		}, nil)
		if err != nil {
			t.Fatalf("BackupImage into %+v: %v", a, err)
		}
		if bi.Size != imageSize {
			t.Errorf("BackupImage = %+v, want size %d", bi, imageSize)
		}
	}
	for _, b := range []drivers.DataObject{b1, b2} {
		if _, err := d.Stat(ctx, b); err != nil {
			t.Errorf("Stat of backup %s: %v", b.ID, err)
		}
	}
	objs, err := d.ListObjects(ctx, info)
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, o := range objs {
		if o.Key == b1.Key || o.Key == b2.Key {
			found++
			if o.Type != drivers.ObjectSnapshot {
				t.Errorf("ListObjects shows backup %+v, want type snapshot", o)
			}
		}
	}
	if found != 2 {
		t.Errorf("ListObjects = %+v, want both backups", objs)
	}

	st, err = ct.DeleteBackup(ctx, b1)
	if err != nil || !st.ManifestGone || st.Chunks != 0 {
		t.Errorf("DeleteBackup of %s, whose chunks %s shares = %+v, %v; want the manifest gone and no chunk removed", b1.ID, b2.ID, st, err)
	}
	wantGone(t, d, b1, "a deleted backup")
	if _, err := d.Stat(ctx, b2); err != nil {
		t.Errorf("deleting %s damaged %s: %v", b1.ID, b2.ID, err)
	}
	st, err = ct.DeleteBackup(ctx, b2)
	if err != nil || !st.ManifestGone || st.Chunks == 0 || st.FreedBytes == 0 {
		t.Errorf("DeleteBackup of %s, the last backup = %+v, %v; want the manifest gone and its chunks removed (counted)", b2.ID, st, err)
	}
	wantGone(t, d, b2, "a deleted backup")
	if st, err := ct.DeleteBackup(ctx, b2); err != nil || st.ManifestGone {
		t.Errorf("DeleteBackup of %s again = %+v, %v; want nothing done and no error", b2.ID, st, err)
	}
	remove(t, d, src)
}

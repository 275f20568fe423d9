package driverstest

import (
	"testing"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/hostops"
)

// testChunkCollector checks what the orphan reconciler relies on: on a
// fresh store CollectChunks finds nothing and fails nothing; next to live
// backups it removes nothing and both still restore byte-equal; once the
// manifests are gone without their chunks (the driver's Delete of a backup
// object, or a backup killed before its manifest), it removes what they
// left, and a second run finds nothing.
func testChunkCollector(t *testing.T, e Env) {
	if e.Spec.Role != drivers.RoleImage {
		t.Skipf("backups live on image stores; this spec is a %s store", e.Spec.Role)
	}
	cc := capability[drivers.ChunkCollector](t, e, "ChunkCollector")
	ct := capability[drivers.ChunkTarget](t, e, "ChunkTarget")
	ctx := t.Context()
	d := e.Provider.Driver()
	info := attached(t, e)

	for range 2 {
		if st, err := cc.CollectChunks(ctx, info); err != nil || st != (drivers.BackupStats{}) {
			t.Fatalf("CollectChunks of a store without backups = %+v, %v; want nothing done and no error", st, err)
		}
	}

	hr, rooted := e.Provider.(drivers.HostRooted)
	if e.Hosts == nil || !rooted || hr.HostRoot(info, "") == "" {
		t.Logf("no hosts or not a host-rooted store: CollectChunks next to backups is not run")
		return
	}
	s := images(t)
	src := importTemplate(t, e, s, info, "collect-src", drivers.FormatRaw)
	h, err := e.Hosts.ForScope(drivers.WithHost(ctx, e.Client), info.Scope)
	if err != nil {
		t.Fatal(err)
	}
	var backups []drivers.DataObject
	var accesses []drivers.BackupAccess
	for _, id := range []string{"collect-1", "collect-2"} {
		b := located(t, d, drivers.DataObject{ID: id, Type: drivers.ObjectSnapshot, Store: info, Size: imageSize})
		a, err := ct.BackupAccess(ctx, b, drivers.Client{HostID: e.Client, Purpose: drivers.PurposeWrite})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h.BackupImage(ctx, hostops.BackupRequest{
			Source: hostops.Ref{Store: info.ID, Key: src.Key}, SourceFormat: drivers.FormatRaw,
			Chunks: hostops.ChunkStore{URI: a.Chunks, Secret: a.Secret}, Manifest: a.Manifest, ChunkSize: 1 << 20,
		}, nil); err != nil {
			t.Fatalf("BackupImage into %+v: %v", a, err)
		}
		backups, accesses = append(backups, b), append(accesses, a)
	}

	st, err := cc.CollectChunks(ctx, info)
	if err != nil || st.Chunks != 0 || st.FreedBytes != 0 || st.KeptShared == 0 {
		t.Fatalf("CollectChunks next to two live backups = %+v, %v; want nothing removed and their chunks kept", st, err)
	}
	for i, a := range accesses {
		out := template(t, d, info, "collect-restored-"+backups[i].ID, drivers.FormatRaw)
		if _, err := h.RestoreImage(ctx, hostops.RestoreRequest{Chunks: hostops.ChunkStore{URI: a.Chunks, Secret: a.Secret},
			Manifest: a.Manifest, Dest: hostops.Ref{Store: info.ID, Key: out.Key}, Format: drivers.FormatRaw}, nil); err != nil {
			t.Fatalf("restore of %s after CollectChunks: %v", backups[i].ID, err)
		}
		wantBytes(t, e, out, s.raw, "backup "+backups[i].ID+" restored after CollectChunks")
		remove(t, d, out)
	}

	// The manifests go without their chunks where the driver's Delete
	// does that; what is left is collected, and only once.
	for _, b := range backups {
		remove(t, d, b)
	}
	st, err = cc.CollectChunks(ctx, info)
	if err != nil || st.KeptShared != 0 {
		t.Fatalf("CollectChunks after every backup was deleted = %+v, %v; want no chunk kept", st, err)
	}
	t.Logf("CollectChunks after the backups' Delete removed %d chunks (%d bytes)", st.Chunks, st.FreedBytes)
	if st, err := cc.CollectChunks(ctx, info); err != nil || st != (drivers.BackupStats{}) {
		t.Fatalf("CollectChunks again = %+v, %v; want nothing left to do", st, err)
	}
	remove(t, d, src)
}

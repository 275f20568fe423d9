package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/minio/minio-go/v7"

	"github.com/stowage/stowage/drivers/s3/s3test"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// TestS3ImageStoreEndToEnd is issue 11's proof that a store need not be a
// directory: with an S3 image store only (versitygw on loopback, started
// here), a qcow2 template is registered from HTTP with its sha256 (and a
// wrong checksum leaves no object in the bucket), two volumes are made from
// it by an agent reading presigned URLs, a snapshot is backed up twice (the
// second backup uploads only the changed chunk, counted from the S3
// server's own log), a volume is restored byte-equal from the backup, and
// deleting a backup removes only the chunks no other backup uses.
func TestS3ImageStoreEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "qemu-img", "qemu-io")
	srv := s3test.Start(t)
	root := t.TempDir()
	ctx := context.Background()
	cred := filepath.Join(root, "s3.cred")
	if err := os.WriteFile(cred, fmt.Appendf(nil, "access_key=%s\nsecret_key=%s\n", srv.AccessKey, srv.SecretKey), 0o600); err != nil {
		t.Fatal(err)
	}
	web, qcow := patternedQcow2(t, root, "write -P 0x33 10M 2M")
	hs := httptest.NewServer(http.StripPrefix("/t/", http.FileServer(http.Dir(web))))
	defer hs.Close()

	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "controller"))
	cache := startCache(t, "cache h1", filepath.Join(root, "c1"), "--pki-dir", filepath.Join(root, "a1", "pki"))
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), "--store-roots", root, "--image-cache-socket", cache.socket)
	waitFor(t, "h1 Up", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	a := newAPI(server)
	pz := addStore(t, a, "pz", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "pz"), &stowagev1.Scope{Zone: "z1"})
	const prefix = "zone1/images"
	resp, err := a.stores.AddStore(ctx, connect.NewRequest(&stowagev1.AddStoreRequest{
		Name: "s3img", Role: stowagev1.StoreRole_STORE_ROLE_IMAGE, Provider: "s3", Url: "s3://" + srv.Bucket + "/" + prefix,
		Details: map[string]string{"endpoint": srv.Endpoint, "region": srv.Region, "credentials_file": cred}, Scope: &stowagev1.Scope{Zone: "z1"}}))
	if err != nil {
		t.Fatalf("add the s3 store: %v", err)
	}
	img := resp.Msg.GetStore()
	if img.GetState() != stowagev1.StoreState_STORE_STATE_UP {
		t.Fatalf("s3 store: %v", img)
	}
	for k, v := range img.GetDetails() {
		if strings.Contains(v, srv.SecretKey) || strings.Contains(v, srv.AccessKey) {
			t.Errorf("the API echoes a credential in detail %s", k)
		}
	}
	mc := srv.Client()
	list := func(sub string) []string {
		t.Helper()
		var keys []string
		for o := range mc.ListObjects(ctx, srv.Bucket, minio.ListObjectsOptions{Prefix: prefix + "/" + sub, Recursive: true}) {
			if o.Err != nil {
				t.Fatal(o.Err)
			}
			keys = append(keys, strings.TrimPrefix(o.Key, prefix+"/"))
		}
		return keys
	}

	// Register: streamed into the bucket, checksum verified; a wrong one
	// leaves no object, no part, no incomplete upload.
	reg := func(name, sum string) (*stowagev1.Template, *stowagev1.Job) {
		t.Helper()
		r, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: name, Url: hs.URL + "/t/base.qcow2",
			Format: stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, Checksum: sum, StoreIds: []string{img.GetId()}}))
		if err != nil {
			t.Fatalf("register %s: %v", name, err)
		}
		return r.Msg.GetTemplate(), r.Msg.GetJob()
	}
	tq, jq := reg("base", "sha256:"+sha256File(t, qcow))
	_, jbad := reg("bad", "sha256:"+strings.Repeat("0", 64))
	mustSucceed(t, a, jq)
	if j := waitJob(t, a, jbad); j.GetState() != stowagev1.JobState_JOB_STATE_FAILED || !strings.Contains(strings.ToLower(j.GetError()), "checksum") {
		t.Fatalf("wrong checksum: %s %q", j.GetState(), j.GetError())
	}
	if got := list("templates/"); len(got) != 1 {
		t.Fatalf("templates in the bucket: %v, want just the good one", got)
	}
	for u := range mc.ListIncompleteUploads(ctx, srv.Bucket, prefix, true) {
		t.Errorf("an incomplete upload is left: %s %v", u.Key, u.Err)
	}
	obj, err := mc.GetObject(ctx, srv.Bucket, prefix+"/"+list("templates/")[0], minio.GetObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	stored := filepath.Join(root, "stored.qcow2")
	f, _ := os.Create(stored)
	if _, err := io.Copy(f, obj); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if sha256File(t, stored) != sha256File(t, qcow) {
		t.Fatal("the template in the bucket is not the one served")
	}

	// The host's template mount shows the S3 template, fetched by presigned
	// Range GETs (the cache process never holds the bucket's keys), and a
	// lazy volume is an overlay on it.
	mounted := filepath.Join(cache.mount, tq.GetId())
	waitFor(t, "the S3 template in the host's template mount", 20*time.Second, func() bool {
		fi, err := os.Stat(mounted)
		return err == nil && fi.Size() > 0
	})
	mustEqualFiles(t, mounted, qcow)
	// The log shows where, never the signature (quoted: the redacted query has '=').
	if l := cache.log.String(); !strings.Contains(l, `source="`+srv.Endpoint+"/"+srv.Bucket+"/"+prefix+"/templates/") ||
		!strings.Contains(l, "X-Amz-Signature=REDACTED") {
		t.Errorf("the template mount did not read the object's (presigned) URL; log:\n%s", l)
	}
	waitFor(t, "h1 reports the template in its mount", 10*time.Second, func() bool {
		return cachedTemplate(hostCaps(t, server, "h1"), tq.GetId()) != nil
	})
	lz, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "lazy", TemplateId: tq.GetId(), StoreId: pz.GetId(), Strategy: "lazy"}))
	if err != nil {
		t.Fatalf("lazy volume: %v", err)
	}
	mustSucceed(t, a, lz.Msg.GetJob())
	lzv, _ := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: lz.Msg.GetVolume().GetId()}))
	run(t, "qemu-img", "compare", "-F", "qcow2", qcow, filepath.Join(root, "pz", lzv.Msg.GetVolume().GetInstallPath()))

	// Two volumes from the S3 template: the agent reads a presigned URL.
	var vols []*stowagev1.Volume
	for i := range 2 {
		r, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: fmt.Sprintf("v%d", i), TemplateId: tq.GetId(), StoreId: pz.GetId()}))
		if err != nil {
			t.Fatalf("create v%d: %v", i, err)
		}
		mustSucceed(t, a, r.Msg.GetJob())
		g, _ := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: r.Msg.GetVolume().GetId()}))
		vols = append(vols, g.Msg.GetVolume())
		run(t, "qemu-img", "compare", "-F", "qcow2", qcow, filepath.Join(root, "pz", g.Msg.GetVolume().GetInstallPath()))
	}

	// A template made from a volume (a linked clone: flattened on the host
	// that serves its store, exported, and imported into the bucket by the
	// s3 driver, since no host writes to an object store).
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x42 1M 64k", filepath.Join(root, "pz", vols[1].GetInstallPath()))
	ct, err := a.images.CreateTemplate(ctx, connect.NewRequest(&stowagev1.CreateTemplateRequest{Name: "golden", Source: &stowagev1.CreateTemplateRequest_VolumeId{VolumeId: vols[1].GetId()}, StoreId: img.GetId()}))
	if err != nil {
		t.Fatalf("template from a volume onto the s3 store: %v", err)
	}
	mustSucceed(t, a, ct.Msg.GetJob())
	gt, _ := a.images.GetTemplate(ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: ct.Msg.GetTemplate().GetId()}))
	golden := filepath.Join(root, "golden.qcow2")
	if err := mc.FGetObject(ctx, srv.Bucket, prefix+"/"+gt.Msg.GetStores()[0].GetInstallPath(), golden, minio.GetObjectOptions{}); err != nil {
		t.Fatalf("the template made from a volume is not in the bucket: %v", err)
	}
	if info := run(t, "qemu-img", "info", "-f", "qcow2", "--output", "json", golden); strings.Contains(info, "backing-filename") {
		t.Errorf("the template made from a linked clone still has a backing file: %s", info)
	}
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", golden, filepath.Join(root, "pz", vols[1].GetInstallPath()))
	if left, _ := os.ReadDir(filepath.Join(root, "pz", "templates")); len(left) != 1 {
		t.Errorf("the staging copy stayed on the primary store: %v", left)
	}

	// Back a snapshot up twice with a small change between: the second
	// backup uploads one chunk, counted from the server's side.
	v0 := filepath.Join(root, "pz", vols[0].GetInstallPath())
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", v0)
	snapshot := func(name string) *stowagev1.Snapshot {
		t.Helper()
		r, err := a.snapshots.TakeSnapshot(ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: vols[0].GetId(), Name: name}))
		if err != nil {
			t.Fatalf("take %s: %v", name, err)
		}
		mustSucceed(t, a, r.Msg.GetJob())
		return r.Msg.GetSnapshot()
	}
	backup := func(s *stowagev1.Snapshot) {
		t.Helper()
		r, err := a.snapshots.BackupSnapshot(ctx, connect.NewRequest(&stowagev1.BackupSnapshotRequest{Id: s.GetId(), StoreId: img.GetId()}))
		if err != nil {
			t.Fatalf("backup %s: %v", s.GetName(), err)
		}
		mustSucceed(t, a, r.Msg.GetJob())
	}
	chunkPuts := func() int { return srv.CountRequests("PutObject", prefix+"/backups/chunks/") }
	s1 := snapshot("s1")
	backup(s1)
	first := chunkPuts()
	if first == 0 || len(list("backups/chunks/")) != first {
		t.Fatalf("first backup: %d chunk uploads, %d chunks in the bucket", first, len(list("backups/chunks/")))
	}
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xef 10M 4k", v0) // inside a chunk the first backup stored
	s2 := snapshot("s2")
	backup(s2)
	second := chunkPuts() - first
	if second != 1 {
		t.Fatalf("second backup uploaded %d chunks, want the one that changed", second)
	}
	t.Logf("chunk uploads counted by the S3 server: first backup %d, second backup %d", first, second)
	manifest := func(s *stowagev1.Snapshot) []string {
		t.Helper()
		o, err := mc.GetObject(ctx, srv.Bucket, prefix+"/backups/manifests/"+s.GetId()+".json", minio.GetObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var m struct{ Chunks []string }
		if err := json.NewDecoder(o).Decode(&m); err != nil {
			t.Fatalf("manifest of %s: %v", s.GetName(), err)
		}
		return m.Chunks
	}
	m1, m2 := manifest(s1), manifest(s2)

	// Restore from the backup (the volume and its snapshots on primary are
	// gone first, so the backup is the only copy), byte-equal.
	want := filepath.Join(root, "want.raw")
	run(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", v0, want)
	dv, err := a.volumes.DeleteVolume(ctx, connect.NewRequest(&stowagev1.DeleteVolumeRequest{Id: vols[0].GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, dv.Msg.GetJob())
	rs, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "restored", SnapshotId: s2.GetId(), StoreId: pz.GetId()}))
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	if rs.Msg.GetPlan().GetStrategy() != "restore-from-backup" {
		t.Errorf("restore plan: %v", rs.Msg.GetPlan())
	}
	mustSucceed(t, a, rs.Msg.GetJob())
	rv, _ := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: rs.Msg.GetVolume().GetId()}))
	run(t, "qemu-img", "compare", "-f", "raw", "-F", hostFormat(rv.Msg.GetVolume()), want, filepath.Join(root, "pz", rv.Msg.GetVolume().GetInstallPath()))

	// Delete the first backup: its manifest and only the chunks the second
	// does not use leave the bucket.
	var unshared []string
	for _, c := range m1 {
		if c != "zero" && !slices.Contains(m2, c) && !slices.Contains(unshared, c) {
			unshared = append(unshared, c)
		}
	}
	if len(unshared) == 0 {
		t.Fatal("setup: the two backups share every chunk")
	}
	before := len(list("backups/chunks/"))
	ds, err := a.snapshots.DeleteSnapshot(ctx, connect.NewRequest(&stowagev1.DeleteSnapshotRequest{Id: s1.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, ds.Msg.GetJob())
	left := list("backups/chunks/")
	t.Logf("chunks in the bucket: %d before deleting the first backup, %d after (%d only it used)", before, len(left), len(unshared))
	for _, c := range unshared {
		if slices.ContainsFunc(left, func(k string) bool { return strings.HasSuffix(k, "/"+c) }) {
			t.Errorf("chunk %s only the deleted backup used is still in the bucket", c)
		}
	}
	for _, c := range m2 {
		if c != "zero" && !slices.ContainsFunc(left, func(k string) bool { return strings.HasSuffix(k, "/"+c) }) {
			t.Errorf("chunk %s of the remaining backup is gone", c)
		}
	}
	if got := list("backups/manifests/"); len(got) != 1 || !strings.Contains(got[0], s2.GetId()) {
		t.Errorf("manifests left: %v, want only s2's", got)
	}
}

// hostFormat is a volume's format as qemu-img names it.
func hostFormat(v *stowagev1.Volume) string {
	if v.GetFormat() == stowagev1.ImageFormat_IMAGE_FORMAT_RAW {
		return "raw"
	}
	return "qcow2"
}

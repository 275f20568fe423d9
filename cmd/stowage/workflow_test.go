package main

// The seed's integration test: the controller and two agents as separate
// processes; templates served over HTTP on loopback; volumes, snapshots,
// backups, restores, kills and bad input, checked with qemu-img and qemu-io.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/minio/minio-go/v7"

	"github.com/stowage/stowage/drivers/s3/s3test"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

type clientAPI struct {
	stores    stowagev1connect.StoreServiceClient
	images    stowagev1connect.ImageServiceClient
	volumes   stowagev1connect.VolumeServiceClient
	snapshots stowagev1connect.SnapshotServiceClient
	jobs      stowagev1connect.JobServiceClient
}

func newAPI(server string) *clientAPI {
	hc, err := clientFor(server)
	if err != nil {
		panic(err)
	}
	return &clientAPI{
		stores:    stowagev1connect.NewStoreServiceClient(hc, server),
		images:    stowagev1connect.NewImageServiceClient(hc, server),
		volumes:   stowagev1connect.NewVolumeServiceClient(hc, server),
		snapshots: stowagev1connect.NewSnapshotServiceClient(hc, server),
		jobs:      stowagev1connect.NewJobServiceClient(hc, server),
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

func sha256File(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// waitJob follows a job with WatchJob until it ends and returns it.
func waitJob(t *testing.T, a *clientAPI, job *stowagev1.Job) *stowagev1.Job {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	stream, err := a.jobs.WatchJob(ctx, connect.NewRequest(&stowagev1.WatchJobRequest{Id: job.GetId()}))
	if err != nil {
		t.Fatalf("watch job %s: %v", job.GetId(), err)
	}
	var last *stowagev1.Job
	for stream.Receive() {
		last = stream.Msg().GetJob()
	}
	if err := stream.Err(); err != nil {
		// On a timeout, say where the job stood.
		t.Fatalf("watch job %s: %v; last seen: %v", job.GetId(), err, last)
	}
	if last == nil {
		t.Fatalf("watch job %s: no update", job.GetId())
	}
	return last
}

func mustSucceed(t *testing.T, a *clientAPI, job *stowagev1.Job) *stowagev1.Job {
	t.Helper()
	j := waitJob(t, a, job)
	if j.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("job %s (%s) ended %s: %s", j.GetId(), j.GetKind(), j.GetState(), j.GetError())
	}
	return j
}

func addStore(t *testing.T, a *clientAPI, name string, role stowagev1.StoreRole, dir string, scope *stowagev1.Scope) *stowagev1.DataStore {
	t.Helper()
	resp, err := a.stores.AddStore(context.Background(), connect.NewRequest(&stowagev1.AddStoreRequest{
		Name: name, Role: role, Provider: "filesystem", Url: "file://" + dir, Scope: scope}))
	if err != nil {
		t.Fatalf("add store %s: %v", name, err)
	}
	return resp.Msg.GetStore()
}

func code(err error) connect.Code { return connect.CodeOf(err) }

// needTools fails the test unless every bin is on PATH.
func needTools(t *testing.T, bins ...string) {
	t.Helper()
	for _, bin := range bins {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s is required (scripts/test.sh installs it)", bin)
		}
	}
}

// patternedQcow2 writes ROOT/web/base.qcow2, 64 MiB virtual with 0x5a at
// 0 (1 MiB), 0x77 at 63M (1 MiB) and the qemu-io write middle, and returns
// the web directory and the file.
func patternedQcow2(t *testing.T, root, middle string) (web, qcow string) {
	t.Helper()
	web = filepath.Join(root, "web")
	if err := os.MkdirAll(web, 0o755); err != nil {
		t.Fatal(err)
	}
	qcow = filepath.Join(web, "base.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", qcow, "64M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", middle, "-c", "write -P 0x77 63M 1M", qcow)
	return web, qcow
}

// slowHandler serves a file slowly, so a test can kill a process mid-copy.
func slowHandler(path string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f, err := os.Open(path)
		if err != nil {
			http.NotFound(w, r)
			return
		}
		defer f.Close()
		st, _ := f.Stat()
		w.Header().Set("Content-Length", fmt.Sprint(st.Size()))
		buf := make([]byte, 256<<10)
		for {
			n, err := f.Read(buf)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return
				}
				w.(http.Flusher).Flush()
				time.Sleep(20 * time.Millisecond)
			}
			if err != nil {
				return
			}
		}
	})
}

// TestWorkflowsEndToEnd runs every workflow twice: with a directory image
// store and with an S3 image store (versitygw on loopback); the primary
// stores are directories in both.
func TestWorkflowsEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "qemu-img", "qemu-io")
	for _, kind := range []string{"directory", "s3"} {
		t.Run(kind, func(t *testing.T) { workflows(t, kind) })
	}
}

// imageStore is the image store of a workflow run, as the test looks at it
// from outside Stowage.
type imageStore struct {
	rec *stowagev1.DataStore
	// templates lists the template objects it holds.
	templates func(t *testing.T) []string
	// file returns a local file holding the bytes of the object at key.
	file func(t *testing.T, key string) string
}

// addImageStore adds the image store of kind ("directory" or "s3").
func addImageStore(t *testing.T, a *clientAPI, kind, root string) imageStore {
	t.Helper()
	scope := &stowagev1.Scope{Zone: "z1"}
	if kind == "directory" {
		st := addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), scope)
		dir := st.GetDetails()["path"]
		return imageStore{rec: st,
			templates: func(t *testing.T) []string {
				entries, _ := os.ReadDir(filepath.Join(dir, "templates"))
				var names []string
				for _, e := range entries {
					names = append(names, e.Name())
				}
				return names
			},
			file: func(t *testing.T, key string) string { return filepath.Join(dir, key) },
		}
	}
	srv := s3test.Start(t)
	cred := filepath.Join(root, "s3.cred")
	if err := os.WriteFile(cred, fmt.Appendf(nil, "access_key=%s\nsecret_key=%s\n", srv.AccessKey, srv.SecretKey), 0o600); err != nil {
		t.Fatal(err)
	}
	const prefix = "img"
	resp, err := a.stores.AddStore(context.Background(), connect.NewRequest(&stowagev1.AddStoreRequest{
		Name: "img", Role: stowagev1.StoreRole_STORE_ROLE_IMAGE, Provider: "s3", Url: "s3://" + srv.Bucket + "/" + prefix, Scope: scope,
		Details: map[string]string{"endpoint": srv.Endpoint, "region": srv.Region, "credentials_file": cred}}))
	if err != nil {
		t.Fatalf("add the s3 image store: %v", err)
	}
	mc := srv.Client()
	return imageStore{rec: resp.Msg.GetStore(),
		templates: func(t *testing.T) []string {
			var names []string
			for o := range mc.ListObjects(context.Background(), srv.Bucket, minio.ListObjectsOptions{Prefix: prefix + "/templates/", Recursive: true}) {
				if o.Err != nil {
					t.Fatal(o.Err)
				}
				names = append(names, filepath.Base(o.Key))
			}
			return names
		},
		file: func(t *testing.T, key string) string {
			f := filepath.Join(t.TempDir(), filepath.Base(key))
			if err := mc.FGetObject(context.Background(), srv.Bucket, prefix+"/"+key, f, minio.GetObjectOptions{}); err != nil {
				t.Fatalf("get %s: %v", key, err)
			}
			return f
		},
	}
}

func workflows(t *testing.T, imageKind string) {
	root := t.TempDir()
	ctx := context.Background()

	// Templates: a qcow2 with known data written by qemu-io, a raw one, and
	// a big slow one for the kill tests.
	web, qcow := patternedQcow2(t, root, "write -P 0x33 10M 2M")
	rawT := filepath.Join(web, "base.raw")
	run(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow, rawT)
	bigT := filepath.Join(web, "big.raw")
	run(t, "qemu-img", "create", "-q", "-f", "raw", bigT, "96M")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 96M", bigT)
	mux := http.NewServeMux()
	mux.Handle("/t/", http.StripPrefix("/t/", http.FileServer(http.Dir(web))))
	mux.Handle("/slow/big.raw", slowHandler(bigT))
	web0 := httptest.NewServer(mux)
	defer web0.Close()

	addr := freePort(t)
	server := "https://" + addr
	ctlDir := filepath.Join(root, "controller")
	ctl := controllerProc(t, addr, ctlDir)
	a1 := agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"))
	agentProc(t, server, "h2", "z1", "c1", filepath.Join(root, "a2"))
	waitFor(t, "both hosts Up", 20*time.Second, func() bool {
		return hostState(t, server, "h1") == "HOST_STATE_UP" && hostState(t, server, "h2") == "HOST_STATE_UP"
	})
	a := newAPI(server)
	images := addImageStore(t, a, imageKind, root)
	pz := addStore(t, a, "pz", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "pz"), &stowagev1.Scope{Zone: "z1"})
	p1 := addStore(t, a, "p1", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p1"), &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h1"})
	p2 := addStore(t, a, "p2", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p2"), &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h2"})
	path := func(st *stowagev1.DataStore, rel string) string { return filepath.Join(st.GetDetails()["path"], rel) }

	// 1. Register both templates with their sha256; a wrong checksum fails
	// and leaves nothing on the store.
	register := func(name, url string, f stowagev1.ImageFormat, sum string) (*stowagev1.Template, *stowagev1.Job) {
		t.Helper()
		resp, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: name, Url: url, Format: f, Checksum: sum}))
		if err != nil {
			t.Fatalf("register %s: %v", name, err)
		}
		return resp.Msg.GetTemplate(), resp.Msg.GetJob()
	}
	tq, jq := register("base-qcow2", web0.URL+"/t/base.qcow2", stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2, "sha256:"+sha256File(t, qcow))
	tr, jr := register("base-raw", web0.URL+"/t/base.raw", stowagev1.ImageFormat_IMAGE_FORMAT_RAW, "sha256:"+sha256File(t, rawT))
	bad, jb := register("bad-sum", web0.URL+"/t/base.raw", stowagev1.ImageFormat_IMAGE_FORMAT_RAW, "sha256:"+strings.Repeat("0", 64))
	mustSucceed(t, a, jq)
	mustSucceed(t, a, jr)
	if j := waitJob(t, a, jb); j.GetState() != stowagev1.JobState_JOB_STATE_FAILED || !strings.Contains(strings.ToLower(j.GetError()), "checksum") {
		t.Fatalf("wrong checksum: job %s %q", j.GetState(), j.GetError())
	}
	got, err := a.images.GetTemplate(ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: bad.GetId()}))
	if err != nil || len(got.Msg.GetStores()) != 1 || got.Msg.GetStores()[0].GetState() != stowagev1.ObjectState_OBJECT_STATE_FAILED || got.Msg.GetStores()[0].GetError() == "" {
		t.Fatalf("bad template record: %v %v", got, err)
	}
	if names := images.templates(t); len(names) != 2 {
		t.Fatalf("image store templates/ holds %v, want just the two good templates", names)
	}
	gq, _ := a.images.GetTemplate(ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: tq.GetId()}))
	if gq.Msg.GetTemplate().GetVirtualSize() != 64<<20 || gq.Msg.GetStores()[0].GetState() != stowagev1.ObjectState_OBJECT_STATE_READY {
		t.Fatalf("qcow2 template: %v", gq.Msg)
	}
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", qcow, images.file(t, gq.Msg.GetStores()[0].GetInstallPath()))

	// 2. Two volumes from the qcow2 template on one primary store, at once:
	// the template is copied there once; both read the template's bytes.
	var wg sync.WaitGroup
	vols := make([]*stowagev1.Volume, 2)
	vjobs := make([]*stowagev1.Job, 2)
	for i := range vols {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{
				Name: fmt.Sprintf("vol%d", i), TemplateId: tq.GetId(), StoreId: pz.GetId()}))
			if err != nil {
				t.Errorf("create vol%d: %v", i, err)
				return
			}
			vols[i], vjobs[i] = resp.Msg.GetVolume(), resp.Msg.GetJob()
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	copies := 0
	for i := range vols {
		j := mustSucceed(t, a, vjobs[i])
		for _, st := range j.GetPlan().GetSteps() {
			// The job that claims the copy runs the step (and records the
			// host that ran its task), whichever of the two planned it:
			// the job planned second may claim first, its planned step
			// "wait for the copy" then has no host.
			if st.GetName() == "cache-template" && st.GetState() == stowagev1.JobState_JOB_STATE_SUCCEEDED && len(st.GetTaskHosts()) > 0 {
				copies++
			}
		}
		v, err := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: vols[i].GetId()}))
		if err != nil || v.Msg.GetVolume().GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
			t.Fatalf("vol%d: %v %v", i, v, err)
		}
		vols[i] = v.Msg.GetVolume()
		run(t, "qemu-img", "compare", "-F", "qcow2", qcow, path(pz, vols[i].GetInstallPath()))
	}
	spools, _ := os.ReadDir(path(pz, "templates"))
	if len(spools) != 1 {
		t.Fatalf("primary store caches %d template files, want exactly 1", len(spools))
	}
	gq, _ = a.images.GetTemplate(ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: tq.GetId()}))
	for _, r := range gq.Msg.GetStores() {
		if r.GetStoreId() == pz.GetId() && (r.GetRefCount() != 2 || r.GetState() != stowagev1.ObjectState_OBJECT_STATE_READY) {
			t.Fatalf("spool ref on pz: %v", r)
		}
	}
	// One of the two jobs copied the template; the other found the copy
	// it claimed and waited for it.
	if copies != 1 {
		t.Fatalf("the template was copied to the primary store by %d jobs' cache-template steps, want 1", copies)
	}

	// 3. Write, snapshot, write again, revert: the bytes are the snapshot's.
	v0 := vols[0]
	v0path := path(pz, v0.GetInstallPath())
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", v0path)
	snap := func(v *stowagev1.Volume, name string) *stowagev1.Snapshot {
		t.Helper()
		resp, err := a.snapshots.TakeSnapshot(ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{VolumeId: v.GetId(), Name: name}))
		if err != nil {
			t.Fatalf("take %s: %v", name, err)
		}
		mustSucceed(t, a, resp.Msg.GetJob())
		return resp.Msg.GetSnapshot()
	}
	s1 := snap(v0, "s1")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xcd 0 64k", v0path)
	rv, err := a.snapshots.RevertSnapshot(ctx, connect.NewRequest(&stowagev1.RevertSnapshotRequest{Id: s1.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, rv.Msg.GetJob())
	if out := run(t, "qemu-io", "-f", "qcow2", "-c", "read -P 0xab 0 64k", v0path); strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("after revert: %s", out)
	}

	// 4. Back up twice with a small change between: the second backup stores
	// only the changed chunk. Delete the volume, restore from the backup.
	backup := func(s *stowagev1.Snapshot) *stowagev1.SnapshotOnStore {
		t.Helper()
		resp, err := a.snapshots.BackupSnapshot(ctx, connect.NewRequest(&stowagev1.BackupSnapshotRequest{Id: s.GetId()}))
		if err != nil {
			t.Fatalf("backup: %v", err)
		}
		mustSucceed(t, a, resp.Msg.GetJob())
		g, err := a.snapshots.GetSnapshot(ctx, connect.NewRequest(&stowagev1.GetSnapshotRequest{Id: s.GetId()}))
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range g.Msg.GetStores() {
			if r.GetRole() == stowagev1.StoreRole_STORE_ROLE_IMAGE {
				return r
			}
		}
		t.Fatalf("no backup copy of %s", s.GetId())
		return nil
	}
	b1 := backup(s1)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xef 20M 4k", v0path)
	s2 := snap(v0, "s2")
	b2 := backup(s2)
	if b1.GetNewBytes() < 4<<20 || b2.GetNewBytes() != 4<<20 || b2.GetReusedBytes() < b1.GetNewBytes() {
		t.Fatalf("incremental backup: first stored %d new bytes, second %d new / %d reused; want the second to store one 4 MiB chunk",
			b1.GetNewBytes(), b2.GetNewBytes(), b2.GetReusedBytes())
	}
	// Tenant data is private: nothing the agent (or the qemu-img it ran)
	// wrote into the stores is world-readable (umask 027).
	for _, dir := range []string{filepath.Join(root, "pz"), filepath.Join(root, "img")} {
		_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
			if err != nil || d.Type()&os.ModeSymlink != 0 {
				return nil
			}
			if fi, err := d.Info(); err == nil && fi.Mode().Perm()&0o007 != 0 {
				t.Errorf("%s is mode %v: others may access tenant data", p, fi.Mode().Perm())
			}
			return nil
		})
	}
	want := filepath.Join(root, "want.raw")
	run(t, "qemu-img", "convert", "-O", "raw", v0path, want)
	dv, err := a.volumes.DeleteVolume(ctx, connect.NewRequest(&stowagev1.DeleteVolumeRequest{Id: v0.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, dv.Msg.GetJob())
	if _, err := os.Stat(v0path); !os.IsNotExist(err) {
		t.Fatalf("deleted volume's file remains: %v", err)
	}
	rs, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "restored", SnapshotId: s2.GetId(), StoreId: pz.GetId()}))
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	if rs.Msg.GetPlan().GetStrategy() != "restore-from-backup" {
		t.Errorf("restore plan: %v", rs.Msg.GetPlan())
	}
	mustSucceed(t, a, rs.Msg.GetJob())
	restored, _ := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: rs.Msg.GetVolume().GetId()}))
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", want, path(pz, restored.Msg.GetVolume().GetInstallPath()))

	// A raw volume on p1 (host h1 only) migrates to p2 (host h2 only):
	// agent to agent, never through the image store.
	rv1, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "rawvol", TemplateId: tr.GetId(), StoreId: p1.GetId(), Strategy: "full",
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW}))
	if err != nil {
		t.Fatal(err)
	}
	mustSucceed(t, a, rv1.Msg.GetJob())
	// Granted to h2, outside p1's scope, the volume is served over NBD by
	// h1's agent; to h1 it is its file. Revoking ends the export.
	grant := func(host string) string {
		t.Helper()
		g, err := a.volumes.GrantAccess(ctx, connect.NewRequest(&stowagev1.GrantAccessRequest{Id: rv1.Msg.GetVolume().GetId(), HostId: host}))
		if err != nil {
			t.Fatalf("grant %s: %v", host, err)
		}
		return g.Msg.GetUri()
	}
	nbdURI := grant("h2")
	if !strings.HasPrefix(nbdURI, "nbd://127.0.0.1:") {
		t.Fatalf("grant to h2: %q, want nbd://", nbdURI)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", rawT, nbdURI)
	if u := grant("h1"); !strings.HasPrefix(u, "file://") {
		t.Errorf("grant to h1: %q, want file://", u)
	}
	gv, _ := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: rv1.Msg.GetVolume().GetId()}))
	if gv.Msg.GetVolume().GetNbdExportUri() != nbdURI || gv.Msg.GetVolume().GetAttachedHostId() != "h2" {
		t.Errorf("volume after grants: attached %q, nbd %q", gv.Msg.GetVolume().GetAttachedHostId(), gv.Msg.GetVolume().GetNbdExportUri())
	}
	if _, err := a.volumes.RevokeAccess(ctx, connect.NewRequest(&stowagev1.RevokeAccessRequest{Id: rv1.Msg.GetVolume().GetId(), HostId: "h2"})); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "info", "-f", "raw", nbdURI).CombinedOutput(); err == nil {
		t.Errorf("the NBD export outlived its revocation: %s", out)
	}
	gv, _ = a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: rv1.Msg.GetVolume().GetId()}))
	if gv.Msg.GetVolume().GetNbdExportUri() != "" {
		t.Errorf("revoked volume still records %q", gv.Msg.GetVolume().GetNbdExportUri())
	}
	mg, err := a.volumes.MigrateVolume(ctx, connect.NewRequest(&stowagev1.MigrateVolumeRequest{Id: rv1.Msg.GetVolume().GetId(), StoreId: p2.GetId()}))
	if err != nil {
		t.Fatal(err)
	}
	if mg.Msg.GetPlan().GetStrategy() != "migrate-agent-to-agent" {
		t.Errorf("migrate plan: %v", mg.Msg.GetPlan())
	}
	mustSucceed(t, a, mg.Msg.GetJob())
	mv, _ := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: rv1.Msg.GetVolume().GetId()}))
	if mv.Msg.GetVolume().GetStoreId() != p2.GetId() {
		t.Fatalf("migrated volume is on %s", mv.Msg.GetVolume().GetStoreId())
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", rawT, path(p2, mv.Msg.GetVolume().GetInstallPath()))
	if _, err := os.Stat(path(p1, rv1.Msg.GetVolume().GetInstallPath())); !os.IsNotExist(err) {
		t.Errorf("source of the migration remains: %v", err)
	}

	// 5a. kill -9 the agent during a template copy: the job fails with a
	// reason and the copy ends Failed, not Creating.
	big, jbig := register("big", web0.URL+"/slow/big.raw", stowagev1.ImageFormat_IMAGE_FORMAT_RAW, "sha256:"+sha256File(t, bigT))
	waitFor(t, "the slow download to start", 20*time.Second, func() bool {
		j, err := a.jobs.GetJob(ctx, connect.NewRequest(&stowagev1.GetJobRequest{Id: jbig.GetId()}))
		return err == nil && j.Msg.GetJob().GetProgress().GetBytesDone() > 0
	})
	j, _ := a.jobs.GetJob(ctx, connect.NewRequest(&stowagev1.GetJobRequest{Id: jbig.GetId()}))
	victim := j.Msg.GetJob().GetPlan().GetSteps()[0].GetHostId()
	if victim == "h1" {
		a1.kill(syscall.SIGKILL)
	} else {
		t.Logf("download runs on %s", victim)
		// find and kill the agent process of that host
		killAgent(t, victim)
	}
	end := waitJob(t, a, jbig)
	gb, _ := a.images.GetTemplate(ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: big.GetId()}))
	st := gb.Msg.GetStores()[0].GetState()
	if !(end.GetState() == stowagev1.JobState_JOB_STATE_FAILED && st == stowagev1.ObjectState_OBJECT_STATE_FAILED && end.GetError() != "") &&
		!(end.GetState() == stowagev1.JobState_JOB_STATE_SUCCEEDED && st == stowagev1.ObjectState_OBJECT_STATE_READY) {
		t.Fatalf("after agent kill: job %s (%q), copy %s", end.GetState(), end.GetError(), st)
	}
	restartAgent(t, server, victim, root)

	// 5b. kill -9 the controller during a volume create: after a restart the
	// job finishes or fails, and the volume is Ready or Failed.
	cv, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "during-crash", TemplateId: tr.GetId(), StoreId: pz.GetId(), Strategy: "full"}))
	if err != nil {
		t.Fatal(err)
	}
	ctl.kill(syscall.SIGKILL)
	ctl = controllerProc(t, addr, ctlDir)
	end = waitJob(t, a, cv.Msg.GetJob())
	after, _ := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: cv.Msg.GetVolume().GetId()}))
	vs := after.Msg.GetVolume().GetState()
	if !(end.GetState() == stowagev1.JobState_JOB_STATE_SUCCEEDED && vs == stowagev1.VolumeState_VOLUME_STATE_READY) &&
		!(end.GetState() == stowagev1.JobState_JOB_STATE_FAILED && vs == stowagev1.VolumeState_VOLUME_STATE_FAILED) {
		t.Fatalf("after controller kill: job %s, volume %s", end.GetState(), vs)
	}
	// 5c. kill -9 the controller in the middle of a (slow) template download:
	// the restarted controller re-issues the step with the same task id and
	// the agent, which kept downloading, answers with its journalled result.
	_, jslow := register("big2", web0.URL+"/slow/big.raw", stowagev1.ImageFormat_IMAGE_FORMAT_RAW, "sha256:"+sha256File(t, bigT))
	waitFor(t, "the second slow download to start", 20*time.Second, func() bool {
		j, err := a.jobs.GetJob(ctx, connect.NewRequest(&stowagev1.GetJobRequest{Id: jslow.GetId()}))
		return err == nil && j.Msg.GetJob().GetProgress().GetBytesDone() > 0
	})
	ctl.kill(syscall.SIGKILL)
	ctl = controllerProc(t, addr, ctlDir)
	if end := waitJob(t, a, jslow); end.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("download across a controller crash: %s %q", end.GetState(), end.GetError())
	}

	// Nothing is left in a transitional state.
	all, _ := a.volumes.ListVolumes(ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{}))
	for _, v := range all.Msg.GetVolumes() {
		if v.GetState() != stowagev1.VolumeState_VOLUME_STATE_READY && v.GetState() != stowagev1.VolumeState_VOLUME_STATE_FAILED {
			t.Errorf("volume %s left %s", v.GetName(), v.GetState())
		}
	}

	// 6. Bad input: clear errors, nothing written.
	before := len(all.Msg.GetVolumes())
	for _, tc := range []struct {
		req  *stowagev1.CreateVolumeRequest
		code connect.Code
	}{
		{&stowagev1.CreateVolumeRequest{Name: "x", TemplateId: "no-such-template"}, connect.CodeNotFound},
		{&stowagev1.CreateVolumeRequest{Name: "x", Size: 0}, connect.CodeInvalidArgument},
		{&stowagev1.CreateVolumeRequest{Name: "x", Size: -5}, connect.CodeInvalidArgument},
		{&stowagev1.CreateVolumeRequest{Name: "../etc", Size: 1 << 20}, connect.CodeInvalidArgument},
	} {
		if _, err := a.volumes.CreateVolume(ctx, connect.NewRequest(tc.req)); code(err) != tc.code {
			t.Errorf("create %v: %v, want %v", tc.req, err, tc.code)
		}
	}
	if _, err := a.stores.EnableMaintenance(ctx, connect.NewRequest(&stowagev1.EnableMaintenanceRequest{Id: "p2"})); err != nil {
		t.Fatal(err)
	}
	_, err = a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "x", Size: 1 << 20, StoreId: "p2"}))
	if code(err) != connect.CodeFailedPrecondition || !strings.Contains(err.Error(), "Maintenance") {
		t.Errorf("create on a store in maintenance: %v", err)
	}
	r404, j404 := register("missing", web0.URL+"/t/nope.raw", stowagev1.ImageFormat_IMAGE_FORMAT_RAW, "sha256:"+strings.Repeat("0", 64))
	// A plain-http template needs a checksum: refused at registration.
	if _, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{Name: "nosum", Url: web0.URL + "/t/base.raw",
		Format: stowagev1.ImageFormat_IMAGE_FORMAT_RAW})); code(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "checksum") {
		t.Errorf("http template without a checksum: %v, want invalid_argument naming the checksum", err)
	}
	if j := waitJob(t, a, j404); j.GetState() != stowagev1.JobState_JOB_STATE_FAILED || !strings.Contains(j.GetError(), "404") && !strings.Contains(strings.ToLower(j.GetError()), "not found") {
		t.Errorf("404 template: %s %q", j.GetState(), j.GetError())
	}
	_ = r404
	all2, _ := a.volumes.ListVolumes(ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{}))
	if len(all2.Msg.GetVolumes()) != before {
		t.Errorf("bad input created volumes: %d -> %d", before, len(all2.Msg.GetVolumes()))
	}
	// A dry run plans and writes nothing.
	dr, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "dry", TemplateId: tq.GetId(), DryRun: true}))
	if err != nil || dr.Msg.GetJob() != nil || len(dr.Msg.GetPlan().GetSteps()) == 0 || len(dr.Msg.GetPlan().GetReasons()) == 0 {
		t.Fatalf("dry run: %v %v", dr, err)
	}
	if _, err := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: dr.Msg.GetVolume().GetId()})); code(err) != connect.CodeNotFound {
		t.Errorf("dry run wrote a volume: %v", err)
	}
	_ = bytes.Equal
	_ = errors.Is
}

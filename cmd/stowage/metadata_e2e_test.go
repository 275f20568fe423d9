package main

// Backup and restore of the controller's metadata between real processes:
// a controller and an agent make a store, a template and a volume; the
// CLI takes a backup from the running controller; the controller stops;
// the backup is restored into a new data directory with the old pki/ and
// admin token copied in (what docs/operations.md says to keep); a
// controller started on it serves the same records to the same agent and
// runs a new job.

import (
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func TestMetadataBackupRestore(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "qemu-img", "qemu-io")
	root := t.TempDir()
	web, qcow := patternedQcow2(t, root, "write -P 0x33 10M 2M")
	web0 := httptest.NewServer(http.StripPrefix("/t/", http.FileServer(http.Dir(web))))
	defer web0.Close()

	addr := freePort(t)
	server := "https://" + addr
	oldDir := filepath.Join(root, "ctl-old")
	ctl := controllerProc(t, addr, oldDir)
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"))
	waitFor(t, "h1 Up", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	s := newCLISession(t, server)

	rec := makeRecords(t, s, root, web0.URL+"/t/base.qcow2", qcow)
	reader := rec.reader

	// A backup needs an admin token: the reader is refused.
	backup := filepath.Join(root, "backups", "meta.stowage-backup")
	if err := os.MkdirAll(filepath.Dir(backup), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, errOut, rc := cliAs(t, server, reader, "metadata", "backup", backup); rc == 0 || !strings.Contains(errOut, "permission denied") {
		t.Fatalf("reader: metadata backup: exit %d %s", rc, errOut)
	}
	if _, err := os.Stat(backup); !os.IsNotExist(err) {
		t.Fatalf("a refused backup left a file: %v", err)
	}
	var sum stowagev1.BackupSummary
	s.json(&sum, "metadata", "backup", backup)
	fi, err := os.Stat(backup)
	if err != nil || fi.Mode().Perm() != 0o600 || uint64(fi.Size()) != sum.GetBytes() || sum.GetRecords() < 10 || len(sum.GetSha256()) != 64 {
		t.Fatalf("backup file %v (%v), summary %v", fi, err, &sum)
	}
	if left, _ := filepath.Glob(filepath.Join(filepath.Dir(backup), ".tmp-*")); len(left) != 0 {
		t.Fatalf("temporary files left: %v", left)
	}
	var ver stowagev1.BackupSummary
	s.json(&ver, "metadata", "verify", backup)
	if !proto.Equal(&ver, &sum) {
		t.Fatalf("verify says %v, backup said %v", &ver, &sum)
	}
	// A second backup replaces the first atomically.
	s.json(&sum, "metadata", "backup", backup)

	// Restore refuses the running controller's directory (locked) and a
	// damaged file, and writes nothing for either.
	s.fails(6, "stop it first", "metadata", "restore", "--data-dir", oldDir, backup)
	data, err := os.ReadFile(backup)
	if err != nil {
		t.Fatal(err)
	}
	cut := filepath.Join(root, "cut.backup")
	if err := os.WriteFile(cut, data[:len(data)-100], 0o600); err != nil {
		t.Fatal(err)
	}
	s.fails(7, "cut short", "metadata", "verify", cut)
	s.fails(7, "cut short", "metadata", "restore", "--data-dir", filepath.Join(root, "ctl-cut"), cut)
	if _, err := os.Stat(filepath.Join(root, "ctl-cut")); !os.IsNotExist(err) {
		t.Fatalf("a refused restore made its directory: %v", err)
	}
	s.fails(2, "--data-dir or --metadata", "metadata", "restore", backup)

	ctl.kill(syscall.SIGTERM)

	// The new data directory: the old pki/ (CA key, CHAP key) and admin
	// token copied in, then the metadata restored.
	newDir := filepath.Join(root, "ctl-new")
	copyTree(t, filepath.Join(oldDir, "pki"), filepath.Join(newDir, "pki"))
	copyTree(t, filepath.Join(oldDir, "admin.token"), filepath.Join(newDir, "admin.token"))
	var rest stowagev1.BackupSummary
	s.json(&rest, "metadata", "restore", "--data-dir", newDir, backup)
	if rest.GetSha256() != sum.GetSha256() || rest.GetRecords() != sum.GetRecords() {
		t.Fatalf("restore read %v, backup was %v", &rest, &sum)
	}
	s.fails(5, "not empty", "metadata", "restore", "--data-dir", newDir, backup)

	controllerProc(t, addr, newDir)
	// The same agent comes back to the restored controller (same CA, same
	// address), and the records are there.
	waitFor(t, "h1 Up after restore", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	checkRecords(t, s, server, rec, "v2", qcow)
}

// cloudRecords are what makeRecords made.
type cloudRecords struct {
	p1     *stowagev1.DataStore
	tmplID string
	vol    *stowagev1.Volume
	reader string // a reader token's secret
}

// makeRecords adds an image and a primary store, registers a template,
// creates a volume from it and a reader token, through the CLI.
func makeRecords(t *testing.T, s *cliSession, root, url, qcow string) cloudRecords {
	t.Helper()
	var img, p1 stowagev1.DataStore
	for _, st := range []struct {
		m          *stowagev1.DataStore
		name, role string
	}{{&img, "img", "image"}, {&p1, "p1", "primary"}} {
		s.json(st.m, "store", "add", "--name", st.name, "--role", st.role, "--provider", "filesystem",
			"--url", "file://"+filepath.Join(root, st.name), "--scope", "z1")
	}
	var reg stowagev1.GetTemplateResponse
	s.wait(&reg, "template", "register", "--name", "t1", "--url", url, "--format", "qcow2", "--checksum", "sha256:"+sha256File(t, qcow))
	var vr stowagev1.GetVolumeResponse
	s.wait(&vr, "volume", "create", "--name", "v1", "--template", "t1", "--store", "p1")
	var tok stowagev1.CreateTokenResponse
	s.json(&tok, "token", "create", "--name", "reader-1", "--role", "reader")
	return cloudRecords{p1: &p1, tmplID: reg.GetTemplate().GetId(), vol: vr.GetVolume(), reader: tok.GetSecret()}
}

// checkRecords waits for h1 to be Up at the controller at server, checks
// that it serves what makeRecords made, that the reader token works, and
// that a new job (volume newVol from the template) succeeds.
func checkRecords(t *testing.T, s *cliSession, server string, rec cloudRecords, newVol, qcow string) {
	t.Helper()
	waitFor(t, "h1 Up after restore", 30*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	var got stowagev1.GetVolumeResponse
	s.json(&got, "volume", "get", rec.vol.GetId())
	if got.GetVolume().GetName() != "v1" || got.GetVolume().GetStoreId() != rec.p1.GetId() || got.GetVolume().GetInstallPath() != rec.vol.GetInstallPath() ||
		got.GetVolume().GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
		t.Fatalf("restored volume: %v, was %v", got.GetVolume(), rec.vol)
	}
	var stores stowagev1.ListStoresResponse
	s.json(&stores, "store", "list")
	if len(stores.GetStores()) != 2 {
		t.Fatalf("restored stores: %v", &stores)
	}
	var tg stowagev1.GetTemplateResponse
	s.json(&tg, "template", "get", "t1")
	if tg.GetTemplate().GetId() != rec.tmplID {
		t.Fatalf("restored template: %v", &tg)
	}
	// Tokens come back: the reader's still works.
	if _, errOut, rc := cliAs(t, server, rec.reader, "volume", "list"); rc != 0 {
		t.Fatalf("reader token after restore: %s", errOut)
	}
	// And a new job runs.
	var v2 stowagev1.GetVolumeResponse
	s.wait(&v2, "volume", "create", "--name", newVol, "--template", "t1", "--store", "p1")
	if v2.GetVolume().GetState() != stowagev1.VolumeState_VOLUME_STATE_READY {
		t.Fatalf("new volume after restore: %v", v2.GetVolume())
	}
	run(t, "qemu-img", "compare", "-F", "qcow2", qcow, filepath.Join(rec.p1.GetDetails()["path"], v2.GetVolume().GetInstallPath()))
}

// copyTree copies a file or a directory tree, keeping modes.
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		target := filepath.Join(dst, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		if d.IsDir() {
			return os.MkdirAll(target, info.Mode().Perm())
		}
		if err := os.MkdirAll(filepath.Dir(target), 0o700); err != nil {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(target, b, info.Mode().Perm())
	})
	if err != nil {
		t.Fatalf("copy %s: %v", src, err)
	}
}

// TestMetadataEtcdBackupRestore: the controller's metadata on a real etcd
// process. Both ways back, as docs/operations.md gives them: etcd's own
// snapshot (etcdctl snapshot save, then snapshot restore into a new
// member directory and an etcd started from it), and the logical backup
// (stowage metadata backup, restored into an empty etcd prefix). After
// each, a controller on the restored metadata serves the records to the
// same agent and runs a new job.
func TestMetadataEtcdBackupRestore(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "qemu-img", "qemu-io", "etcd", "etcdctl")
	root := t.TempDir()
	web, qcow := patternedQcow2(t, root, "write -P 0x44 20M 1M")
	web0 := httptest.NewServer(http.StripPrefix("/t/", http.FileServer(http.Dir(web))))
	defer web0.Close()

	etcd1 := startEtcdCluster(t, root, 1)[0]
	addr := freePort(t)
	server := "https://" + addr
	ctlDir := filepath.Join(root, "ctl")
	ctlArgs := func(spec string) []string {
		return []string{"--metadata", spec, "--leader-lease", "3s", "--orphan-interval", "0"}
	}
	ctl := controllerProc(t, addr, ctlDir, ctlArgs("etcd://"+etcd1.client+"/stowage")...)
	waitFor(t, "the controller leads", 20*time.Second, func() bool { return role(t, server) == "leader" })
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"))
	waitFor(t, "h1 Up", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	s := newCLISession(t, server)
	rec := makeRecords(t, s, root, web0.URL+"/t/base.qcow2", qcow)

	// Both backups of the running cloud.
	backup := filepath.Join(root, "meta.stowage-backup")
	var sum stowagev1.BackupSummary
	s.json(&sum, "metadata", "backup", backup)
	snap := filepath.Join(root, "etcd.snapshot")
	run(t, "etcdctl", "--endpoints", "http://"+etcd1.client, "snapshot", "save", snap)
	// A restore into the prefix the controller uses is refused.
	s.fails(5, "not empty", "metadata", "restore", "--metadata", "etcd://"+etcd1.client+"/stowage", backup)

	ctl.kill(syscall.SIGTERM)
	etcd1.p.kill(syscall.SIGTERM)

	// etcd's snapshot: restored into a new member directory, served by a
	// new etcd process on new ports.
	restored := &etcdMember{name: "r1", client: freeAddr(t), peer: freeAddr(t), dir: filepath.Join(root, "etcd-restored")}
	run(t, "etcdctl", "snapshot", "restore", snap, "--name", restored.name, "--data-dir", restored.dir,
		"--initial-cluster", restored.name+"=http://"+restored.peer, "--initial-advertise-peer-urls", "http://"+restored.peer,
		"--initial-cluster-token", "stowage-restored")
	startEtcdMember(t, restored)
	start := time.Now()
	ctl = controllerProc(t, addr, ctlDir, ctlArgs("etcd://"+restored.client+"/stowage")...)
	waitFor(t, "the controller on the restored etcd leads", 30*time.Second, func() bool { return role(t, server) == "leader" })
	t.Logf("the controller on the restored snapshot led after %s", time.Since(start).Round(100*time.Millisecond))
	checkRecords(t, s, server, rec, "v2", qcow)
	ctl.kill(syscall.SIGTERM)

	// The logical backup, restored into an empty prefix of that etcd.
	spec := "etcd://" + restored.client + "/stowage-restored"
	var rest stowagev1.BackupSummary
	s.json(&rest, "metadata", "restore", "--metadata", spec, backup)
	if rest.GetSha256() != sum.GetSha256() {
		t.Fatalf("restore read %v, backup was %v", &rest, &sum)
	}
	s.fails(5, "not empty", "metadata", "restore", "--metadata", spec, backup)
	controllerProc(t, addr, ctlDir, ctlArgs(spec)...)
	waitFor(t, "the controller on the restored prefix leads", 30*time.Second, func() bool { return role(t, server) == "leader" })
	checkRecords(t, s, server, rec, "v3", qcow)
}

// startEtcdMember starts one etcd process on m's directory (made by
// etcdctl snapshot restore) and waits until it is healthy.
func startEtcdMember(t *testing.T, m *etcdMember) {
	t.Helper()
	m.p = startBin(t, "etcd "+m.name, "etcd", nil, "--name", m.name, "--data-dir", m.dir,
		"--listen-client-urls", "http://"+m.client, "--advertise-client-urls", "http://"+m.client,
		"--listen-peer-urls", "http://"+m.peer, "--initial-advertise-peer-urls", "http://"+m.peer, "--log-level", "warn")
	waitEtcdHealthy(t, m)
}

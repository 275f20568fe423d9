package agent_test

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/agent"
	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/agent/nbdexports"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// fileState is what the confinement test watches of a file it must not
// touch: content, modification time and access time.
type fileState struct {
	data  string
	mtime time.Time
	atime time.Time
}

func stateOf(t *testing.T, p string) fileState {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return fileState{data: string(b), mtime: time.Unix(st.Mtim.Unix()), atime: time.Unix(st.Atim.Unix())}
}

// atime reads p's access time without reading p.
func atime(t *testing.T, p string) time.Time {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return time.Unix(st.Atim.Unix())
}

// tree lists every entry under dir with its size and modification time.
func tree(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		out[p] = fmt.Sprint(fi.Mode(), fi.ModTime(), fi.Size())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestAgentRefusesPathsOutsideItsStores sends tasks naming /etc/hostname,
// a secret file outside every store, keys with "..", symbolic links inside
// a store that lead out of it and stores the agent does not serve, over
// real HTTP to a running agent. Every one is refused with permission_denied
// before it is journalled, and nothing is read or written: /etc/hostname
// and the secret keep their content, modification and access times, the
// store's tree is unchanged, no export is made and no task is journalled.
func TestAgentRefusesPathsOutsideItsStores(t *testing.T) {
	base := t.TempDir()
	state := filepath.Join(base, "agent") // reserved: no store may hold it
	x := exports.New()
	n := nbdexports.New(slog.New(slog.NewTextHandler(io.Discard, nil)))
	local := hostfs.New("h1", hostfs.WithExporter(x), hostfs.WithNBDExporter(n))
	a, err := agent.New(agent.Config{ControllerURL: "http://127.0.0.1:1", HostID: "h1", StateDir: state, StoreRoots: []string{base}},
		local, slog.New(slog.NewTextHandler(io.Discard, nil)), agent.WithExports(x), agent.WithNBD(n))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(srv.Close)
	t.Cleanup(a.Close)
	x.SetBaseURL(srv.URL)
	client := stowagev1connect.NewAgentServiceClient(srv.Client(), srv.URL)
	ctx := t.Context()
	run := func(step *stowagev1.Task) (*stowagev1.TaskResult, error) {
		resp, err := client.RunTask(ctx, connect.NewRequest(&stowagev1.RunTaskRequest{Task: step}))
		if err != nil {
			return nil, err
		}
		return resp.Msg.GetResult(), nil
	}

	// The store the agent serves, with an image and three links out.
	store := filepath.Join(base, "s1")
	remote := hostops.NewRemote("h1", srv.URL, srv.Client())
	if _, err := remote.PrepareStore(ctx, hostops.StoreRoot{ID: "s1", Path: store, Subdirs: []string{"volumes", "templates"}}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(store, "volumes", "v.raw"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	secretDir := t.TempDir()
	secret := filepath.Join(secretDir, "secret.raw")
	if err := os.WriteFile(secret, []byte(strings.Repeat("secret", 1000)), 0o644); err != nil {
		t.Fatal(err)
	}
	// A decoy of /etc/hostname for the steps that would write or delete:
	// were the agent broken, this test must not break the host it runs on.
	victim := t.TempDir()
	decoy := filepath.Join(victim, "etc", "hostname")
	os.Mkdir(filepath.Dir(decoy), 0o755)
	if err := os.WriteFile(decoy, []byte("decoy\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for link, target := range map[string]string{
		"volumes/etc":         "/etc",
		"volumes/vetc":        filepath.Dir(decoy),
		"volumes/out":         secretDir,
		"volumes/secret.raw":  secret,
		"templates/host.raw":  "/etc/hostname",
		"templates/vhost.raw": decoy,
	} {
		if err := os.Symlink(target, filepath.Join(store, link)); err != nil {
			t.Fatal(err)
		}
	}
	// An access time older than the modification time: on a relatime
	// mount any read of the file moves it (checked below on a probe file).
	old := time.Date(2001, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, p := range []string{secret, decoy} {
		if err := os.Chtimes(p, old, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	probe := filepath.Join(t.TempDir(), "probe")
	os.WriteFile(probe, []byte("x"), 0o644)
	os.Chtimes(probe, old, time.Now())
	os.ReadFile(probe)
	atimeMoves := atime(t, probe).After(old)

	const hostname = "/etc/hostname"
	_, err = os.Stat(hostname)
	haveHostname := err == nil
	var etcBefore fileState
	if haveHostname {
		etcBefore = stateOf(t, hostname)
	}
	etcEntries := func() []string {
		es, _ := os.ReadDir("/etc")
		names := make([]string, len(es))
		for i, e := range es {
			names[i] = e.Name()
		}
		return names
	}
	etcNames := strings.Join(etcEntries(), "\n")
	secretBefore := stateOf(t, secret) // reads it: its atime moves once, now
	os.Chtimes(secret, old, secretBefore.mtime)
	decoyBefore := stateOf(t, decoy)
	os.Chtimes(decoy, old, decoyBefore.mtime)
	treeBefore, victimBefore := tree(t, base), tree(t, victim)

	up := strings.Repeat("../", 16)
	rel, _ := filepath.Rel(store, secret)
	s1 := func(key string) *stowagev1.ObjectRef { return &stowagev1.ObjectRef{StoreId: "s1", Key: key} }
	good := s1("volumes/new.raw")
	// Refs that name something outside the store, for every kind of step.
	relDecoy, _ := filepath.Rel(store, decoy)
	// Refs that name something outside the store. host: it is a file of
	// the host itself, named only in steps that merely read (so that a
	// broken agent could not damage the machine running the test); the
	// decoys stand in for it in the steps that write or delete.
	type badRef struct {
		ref  *stowagev1.ObjectRef
		host bool
	}
	bad := map[string]badRef{
		"absolute /etc/hostname":            {s1(hostname), false}, // would stay in the store if CheckKey broke
		"absolute secret":                   {s1(secret), false},
		"../../etc/hostname":                {s1(up + "etc/hostname"), true},
		"../ to the decoy hostname":         {s1(relDecoy), false},
		"../ to the secret":                 {s1(rel), false},
		"dir link to /etc":                  {s1("volumes/etc/hostname"), true},
		"dir link to the decoy /etc":        {s1("volumes/vetc/hostname"), false},
		"dir link to the secret's dir":      {s1("volumes/out/secret.raw"), false},
		"leaf link to the secret":           {s1("volumes/secret.raw"), false},
		"leaf link to /etc/hostname":        {s1("templates/host.raw"), true},
		"leaf link to the decoy hostname":   {s1("templates/vhost.raw"), false},
		"unknown store":                     {&stowagev1.ObjectRef{StoreId: "s9", Key: "etc/hostname"}, false},
		"store id with a path":              {&stowagev1.ObjectRef{StoreId: "/etc", Key: "hostname"}, false},
		"the template mount":                {&stowagev1.ObjectRef{StoreId: hostops.TemplateMount, Key: "hostname"}, false},
		"the marker":                        {s1(hostfs.MarkerFile), false},
		"a NUL byte":                        {s1("volumes/v.raw\x00/etc/hostname"), false},
		"not clean (volumes/../../..)":      {s1("volumes/../../etc/hostname"), true},
		"empty key (the store root)":        {s1(""), false},
		"a temporary name in the store":     {s1("volumes/" + hostfs.TempPrefix + "x"), false},
		"link to /etc as a directory":       {s1("volumes/etc"), true},
		"link to the decoy /etc as a dir":   {s1("volumes/vetc"), false},
		"link to the secret's dir as a dir": {s1("volumes/out"), false},
	}
	// The steps that only read what the Ref names.
	reads := map[string]bool{"Export": true, "ExportNBD": true, "CopyImage source": true, "StatObject": true,
		"ListObjects": true, "InspectImage": true, "CloneImage base": true, "BackupImage source": true}
	raw := stowagev1.ImageFormat_IMAGE_FORMAT_RAW
	type attempt struct {
		name string
		task *stowagev1.Task
	}
	var attempts []attempt
	for what, b := range bad {
		r := b.ref
		uri := "store://" + r.GetStoreId() + "/" + r.GetKey()
		for kind, task := range map[string]*stowagev1.Task{
			"Export":              {Step: &stowagev1.Task_Export{Export: &stowagev1.ExportStep{Ref: r}}},
			"ExportNBD":           {Step: &stowagev1.Task_ExportNbd{ExportNbd: &stowagev1.ExportNbdStep{Ref: r, Format: raw, ReadOnly: true}}},
			"CopyImage source":    {Step: &stowagev1.Task_CopyImage{CopyImage: &stowagev1.CopyImageStep{Source: uri, SourceFormat: raw, Dest: good}}},
			"CopyImage dest":      {Step: &stowagev1.Task_CopyImage{CopyImage: &stowagev1.CopyImageStep{Source: "store://s1/volumes/v.raw", SourceFormat: raw, Dest: r}}},
			"FetchImage dest":     {Step: &stowagev1.Task_FetchImage{FetchImage: &stowagev1.FetchImageStep{Source: "http://127.0.0.1:1/t.raw", Dest: r, Format: raw}}},
			"DeleteObject":        {Step: &stowagev1.Task_DeleteObject{DeleteObject: &stowagev1.DeleteObjectStep{Ref: r}}},
			"ListObjects":         {Step: &stowagev1.Task_ListObjects{ListObjects: &stowagev1.ListObjectsStep{Dir: r}}},
			"StatObject":          {Step: &stowagev1.Task_StatObject{StatObject: &stowagev1.StatObjectStep{Ref: r}}},
			"CreateImage":         {Step: &stowagev1.Task_CreateImage{CreateImage: &stowagev1.CreateImageStep{Ref: r, Format: raw, SizeBytes: 1 << 20}}},
			"InspectImage":        {Step: &stowagev1.Task_InspectImage{InspectImage: &stowagev1.InspectImageStep{Ref: r, Format: raw}}},
			"ResizeImage":         {Step: &stowagev1.Task_ResizeImage{ResizeImage: &stowagev1.ResizeImageStep{Ref: r, Format: raw, SizeBytes: 2 << 20}}},
			"CloneImage base":     {Step: &stowagev1.Task_CloneImage{CloneImage: &stowagev1.CloneImageStep{Base: r, BaseFormat: raw, Dest: good, Mode: stowagev1.CloneMode_CLONE_MODE_FULL, Format: raw}}},
			"SnapshotImage":       {Step: &stowagev1.Task_SnapshotImage{SnapshotImage: &stowagev1.SnapshotImageStep{Volume: s1("volumes/v.raw"), Snapshot: r, Format: raw}}},
			"BackupImage source":  {Step: &stowagev1.Task_BackupImage{BackupImage: &stowagev1.BackupImageStep{Source: r, SourceFormat: raw, Chunks: &stowagev1.ChunkStoreRef{Uri: "store://s1/volumes"}, Manifest: "m"}}},
			"RestoreImage dest":   {Step: &stowagev1.Task_RestoreImage{RestoreImage: &stowagev1.RestoreImageStep{Chunks: &stowagev1.ChunkStoreRef{Uri: "store://s1/volumes"}, Manifest: "m", Dest: r, Format: raw}}},
			"chunk store":         {Step: &stowagev1.Task_DeleteBackup{DeleteBackup: &stowagev1.DeleteBackupStep{Chunks: &stowagev1.ChunkStoreRef{Uri: uri}, Manifest: "m"}}},
			"collect chunk store": {Step: &stowagev1.Task_CollectChunks{CollectChunks: &stowagev1.CollectChunksStep{Chunks: &stowagev1.ChunkStoreRef{Uri: uri}}}},
		} {
			if what == "the template mount" && (kind == "CopyImage source" || kind == "StatObject" || kind == "InspectImage" || kind == "CloneImage base") {
				continue // reads of the template mount are allowed (none is known here: failed precondition)
			}
			if b.host && !reads[kind] {
				continue
			}
			attempts = append(attempts, attempt{kind + " of " + what, task})
		}
	}
	for _, src := range []string{hostname, "file://" + hostname, "file://" + secret, secret, "nbd+unix:///x?socket=/run/x.sock", "ftp://h/x"} {
		attempts = append(attempts,
			attempt{"CopyImage from " + src, &stowagev1.Task{Step: &stowagev1.Task_CopyImage{CopyImage: &stowagev1.CopyImageStep{Source: src, SourceFormat: raw, Dest: good}}}},
			attempt{"FetchImage from " + src, &stowagev1.Task{Step: &stowagev1.Task_FetchImage{FetchImage: &stowagev1.FetchImageStep{Source: src, Dest: good, Format: raw}}}})
	}
	// Store roots: system directories only in the steps that write nothing
	// without a marker naming the store (probe, release); the policy itself
	// is unit-tested (TestRootPolicy).
	decoyRoots := []string{secretDir, filepath.Dir(decoy), filepath.Join(store, "volumes", "vetc"), filepath.Join(base, "..", "x"), base, state, filepath.Join(state, "tasks")}
	for _, p := range decoyRoots {
		attempts = append(attempts, attempt{"PrepareStore " + p, &stowagev1.Task{Step: &stowagev1.Task_PrepareStore{PrepareStore: &stowagev1.PrepareStoreStep{Path: p, StoreId: "s2", Subdirs: []string{"volumes"}, Claim: true}}}})
	}
	for _, p := range append([]string{"/etc", "/etc/stowage", "/", "/proc/self", "/usr/lib/s", "/lib64/s", filepath.Join(store, "volumes", "etc")}, decoyRoots...) {
		attempts = append(attempts,
			attempt{"ProbeStore " + p, &stowagev1.Task{Step: &stowagev1.Task_ProbeStore{ProbeStore: &stowagev1.ProbeStoreStep{Path: p, StoreId: "s2"}}}},
			attempt{"ReleaseStore " + p, &stowagev1.Task{Step: &stowagev1.Task_ReleaseStore{ReleaseStore: &stowagev1.ReleaseStoreStep{Path: p, StoreId: "s2"}}}})
	}

	t.Logf("%d attempts", len(attempts))
	for i, at := range attempts {
		at.task.Id = fmt.Sprintf("attack-%d", i)
		res, err := run(at.task)
		if connect.CodeOf(err) != connect.CodePermissionDenied {
			t.Errorf("%s: got %v (result %v), want permission_denied", at.name, err, res)
		}
	}

	// Nothing was read or written.
	if haveHostname {
		if after := stateOf(t, hostname); after.data != etcBefore.data || !after.mtime.Equal(etcBefore.mtime) {
			t.Errorf("/etc/hostname changed: %+v -> %+v", etcBefore, after)
		}
	}
	if got := strings.Join(etcEntries(), "\n"); got != etcNames {
		t.Error("an entry appeared in or left /etc")
	}
	if at := atime(t, secret); atimeMoves && !at.Equal(old) {
		t.Errorf("the secret outside the store was read (atime %v)", at)
	}
	if after := stateOf(t, secret); after.data != secretBefore.data || !after.mtime.Equal(secretBefore.mtime) {
		t.Error("the secret outside the store changed")
	}
	if at := atime(t, decoy); atimeMoves && !at.Equal(old) {
		t.Errorf("the decoy /etc/hostname was read (atime %v)", at)
	}
	if after := stateOf(t, decoy); after.data != decoyBefore.data || !after.mtime.Equal(decoyBefore.mtime) {
		t.Error("the decoy /etc/hostname changed")
	}
	if got := tree(t, victim); fmt.Sprint(got) != fmt.Sprint(victimBefore) {
		t.Errorf("the decoy /etc changed: %v -> %v", victimBefore, got)
	}
	treeAfter := tree(t, base)
	for p, v := range treeAfter {
		if treeBefore[p] != v {
			t.Errorf("%s appeared or changed in the store", p)
		}
	}
	for p := range treeBefore {
		if _, ok := treeAfter[p]; !ok {
			t.Errorf("%s disappeared from the store", p)
		}
	}
	if e := x.Exported(); len(e) != 0 {
		t.Errorf("HTTP exports made: %v", e)
	}
	if e := n.Exported(); len(e) != 0 {
		t.Errorf("NBD exports made: %v", e)
	}
	if es, _ := os.ReadDir(filepath.Join(state, "tasks")); len(es) != 1 { // the PrepareStore of s1
		t.Errorf("refused tasks were journalled: %d entries", len(es))
	}

	// The same steps on the store's own objects work: the refusals are
	// about where, not what.
	if res, err := run(&stowagev1.Task{Id: "ok-stat", Step: &stowagev1.Task_StatObject{StatObject: &stowagev1.StatObjectStep{Ref: s1("volumes/v.raw")}}}); err != nil || res.GetFile().GetKey() != "volumes/v.raw" || res.GetFile().GetSize() != 1<<20 {
		t.Fatalf("stat of the store's image: %v %v", res, err)
	}
	res, err := run(&stowagev1.Task{Id: "ok-list", Step: &stowagev1.Task_ListObjects{ListObjects: &stowagev1.ListObjectsStep{Dir: s1("volumes")}}})
	if err != nil || res.GetError() != "" {
		t.Fatalf("list: %v %v", res, err)
	}
	var keys []string
	for _, f := range res.GetFiles().GetFiles() {
		keys = append(keys, f.GetKey())
	}
	if strings.Join(keys, ",") != "volumes/etc,volumes/out,volumes/secret.raw,volumes/v.raw,volumes/vetc" {
		t.Errorf("list of volumes/: %v (links are listed as themselves, never followed)", keys)
	}
	if res, err := run(&stowagev1.Task{Id: "ok-export", Step: &stowagev1.Task_Export{Export: &stowagev1.ExportStep{Ref: s1("volumes/v.raw")}}}); err != nil || !strings.HasPrefix(res.GetUri(), srv.URL) {
		t.Fatalf("export of the store's image: %v %v", res, err)
	}
	// A link is not an object: deleting one is refused too, and what it
	// points to stays.
	if _, err := run(&stowagev1.Task{Id: "del-link", Step: &stowagev1.Task_DeleteObject{DeleteObject: &stowagev1.DeleteObjectStep{Ref: s1("volumes/secret.raw")}}}); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("delete of a link: %v", err)
	}
	if _, err := os.Stat(secret); err != nil {
		t.Fatal(errors.Join(errors.New("the secret is gone"), err))
	}
}

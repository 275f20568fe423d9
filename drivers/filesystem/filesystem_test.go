package filesystem

import (
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/driverstest"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	"github.com/stowage/stowage/internal/envtest"
)

var zone1 = drivers.Scope{Zone: "z1"}

func needQemuImg(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		envtest.Skipf(t, "qemu-img is not installed (apt-get install qemu-utils): %v", err)
	}
}

// TestConformance runs the driver suite on real host work: h1 in zone z1
// serves the store; h2, in zone z2 with a filesystem of its own, is the
// remote client that gets exports.
func TestConformance(t *testing.T) {
	needQemuImg(t)
	for _, role := range []drivers.Role{drivers.RolePrimary, drivers.RoleImage} {
		driverstest.Run(t, string(role), func(t *testing.T) driverstest.Env {
			hosts := driverstest.NewHosts(newLocalHost(t, "h1"), newLocalHost(t, "h2", hostfs.WithRoot(t.TempDir())))
			hosts.Place("h1", "z1", "")
			hosts.Place("h2", "z2", "")
			return driverstest.Env{
				Provider: New(hosts),
				Spec: drivers.StoreSpec{
					ID: "store-1", Name: "st1", Role: role, Scope: zone1,
					URL: "file://" + filepath.Join(t.TempDir(), string(role)),
				},
				Client: "h1", Remote: "h2", Hosts: hosts,
			}
		})
	}
}

func TestParseURL(t *testing.T) {
	good := map[string]string{
		"file:///var/lib/stowage/primary": "/var/lib/stowage/primary",
		"FILE:///srv/x":                   "/srv/x",
		"file:///srv/with%20space":        "/srv/with space",
	}
	for raw, want := range good {
		got, err := parseURL(raw)
		if err != nil || got != want {
			t.Errorf("parseURL(%q) = %q, %v; want %q", raw, got, err, want)
		}
	}
	bad := []struct{ url, says string }{
		{"", "store URL is missing"},
		{"/var/lib/stowage", "has no scheme"},
		{"nfs://filer/export", `has scheme "nfs"`},
		{"file:var/lib/stowage", `relative path "var/lib/stowage"`},
		{"file://filer/export/primary", `names host "filer"; a file URL has no host part`},
		{"file://var/lib/stowage", "write file:///var/lib/stowage (three slashes)"},
		{"file://user@/x", "no host part"},
		{"file:/var/lib/stowage", "lacks the //"},
		{"file:///var/lib/../stowage", "write file:///var/stowage"},
		{"file:///var/lib/stowage/", "not clean"},
		{"file:///var//lib", "not clean"},
		{"file:///var/./lib", "not clean"},
		{"file:///", "root directory"},
		{"file://", "has no path"},
		{"file:///x?ro=1", "query or fragment"},
		{"file:///x#frag", "query or fragment"},
		{"file:///a%2Fb", "percent-encodes"},
		{"file:///a%00b", "NUL"},
		{"::", "does not parse"},
	}
	for _, c := range bad {
		_, err := parseURL(c.url)
		if !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("parseURL(%q): err = %v, want ErrInvalid", c.url, err)
			continue
		}
		if !strings.Contains(err.Error(), c.says) {
			t.Errorf("parseURL(%q) = %q, want it to say %q", c.url, err, c.says)
		}
		if !strings.Contains(err.Error(), "file:///") {
			t.Errorf("parseURL(%q) = %q gives no example of a good URL", c.url, err)
		}
	}
}

// setup returns a provider over hosts and an initialised primary store.
func setup(t *testing.T, hosts hostops.Selector) (*Provider, drivers.StoreInfo) {
	t.Helper()
	p := New(hosts)
	info, err := p.LifeCycle().Initialize(t.Context(), drivers.StoreSpec{
		ID: "s1", Role: drivers.RolePrimary, Scope: zone1, URL: "file://" + filepath.Join(t.TempDir(), "primary"),
	})
	if err != nil {
		t.Fatal(err)
	}
	return p, info
}

// oneHost returns a selector over host h1 in zone z1.
func oneHost(t *testing.T) *driverstest.Hosts {
	hosts := driverstest.NewHosts(newLocalHost(t, "h1"))
	hosts.Place("h1", "z1", "")
	return hosts
}

func names(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

func TestInitialize(t *testing.T) {
	p, info := setup(t, oneHost(t))
	dir := strings.TrimPrefix(info.URL, "file://")
	if info.Details["path"] != dir || info.Details["fs_type"] == "" || info.Details["reflink"] == "" {
		t.Errorf("Details = %v, want path %s, fs_type and reflink", info.Details, dir)
	}
	if p.HostRoot(info, "h1") != dir {
		t.Errorf("HostRoot = %q, want %q", p.HostRoot(info, "h1"), dir)
	}
	if got, want := names(t, dir), []string{hostfs.MarkerFile, "snapshots", "templates", "tmp", "volumes"}; !slices.Equal(got, want) {
		t.Errorf("primary layout = %q, want %q", got, want)
	}
	img, err := p.LifeCycle().Initialize(t.Context(), drivers.StoreSpec{
		ID: "i1", Role: drivers.RoleImage, Scope: zone1, URL: "file://" + filepath.Join(t.TempDir(), "image"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := names(t, img.Details["path"]), []string{hostfs.MarkerFile, "snapshots", "templates", "tmp"}; !slices.Equal(got, want) {
		t.Errorf("image layout = %q, want %q", got, want)
	}
	if got, want := names(t, img.Details["path"]+"/snapshots"), []string{"chunks", "manifests"}; !slices.Equal(got, want) {
		t.Errorf("image snapshots/ = %q, want %q", got, want)
	}
	for _, role := range []drivers.Role{drivers.RoleImageCache, "bogus"} {
		_, err := p.LifeCycle().Initialize(t.Context(), drivers.StoreSpec{ID: "x", Role: role, URL: "file:///srv/x"})
		if !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("Initialize of a %s store: err = %v, want ErrInvalid", role, err)
		}
	}
}

func TestInitializeLeavesNothingWhenItFails(t *testing.T) {
	base := t.TempDir()
	if err := os.WriteFile(filepath.Join(base, "file"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	hosts := oneHost(t)
	p := New(hosts)
	spec := drivers.StoreSpec{ID: "s1", Role: drivers.RolePrimary, Scope: zone1, URL: "file://" + base + "/file/primary"}
	if _, err := p.LifeCycle().Initialize(t.Context(), spec); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("Initialize below a file: err = %v, want ErrFailedPrecondition", err)
	}
	hosts.SetUp("h1", false)
	spec.URL = "file://" + base + "/primary"
	_, err := p.LifeCycle().Initialize(t.Context(), spec)
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), `no Up host in scope "z1" can initialise the store`) {
		t.Errorf("Initialize with no Up host: err = %v, want ErrUnavailable naming the scope", err)
	}
	if entries, _ := os.ReadDir(base); len(entries) != 1 {
		t.Errorf("failed Initialize calls left %d entries in %s", len(entries), base)
	}
}

func TestAttach(t *testing.T) {
	// h2 has a filesystem of its own: it does not see h1's directories.
	hosts := driverstest.NewHosts(newLocalHost(t, "h1"), newLocalHost(t, "h2", hostfs.WithRoot(t.TempDir())), newLocalHost(t, "h3"))
	hosts.Place("h1", "z1", "")
	hosts.Place("h2", "z1", "")
	hosts.Place("h3", "z2", "")
	p, info := setup(t, hosts)
	lc := p.LifeCycle()
	ctx := t.Context()

	got, err := lc.Attach(ctx, info, drivers.Scope{})
	if err != nil || !slices.Equal(got, []string{"h1"}) {
		t.Fatalf("Attach = %q, %v; want [h1] (h2 cannot see the store, h3 is in another zone)", got, err)
	}
	got, err = lc.Attach(ctx, info, drivers.Scope{Zone: "z1", HostID: "h1"})
	if err != nil || !slices.Equal(got, []string{"h1"}) {
		t.Fatalf("Attach to h1 alone = %q, %v", got, err)
	}
	if _, err := lc.Attach(ctx, info, drivers.Scope{Zone: "z2"}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("Attach to a scope outside the store's: err = %v, want ErrInvalid", err)
	}
	hosts.SetUp("h1", false)
	_, err = lc.Attach(ctx, info, zone1)
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "h2: probe store s1") {
		t.Errorf("Attach with only h2 Up: err = %v, want ErrUnavailable with h2's reason", err)
	}
	hosts.SetUp("h2", false)
	if _, err = lc.Attach(ctx, info, zone1); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("Attach with no host Up: err = %v, want ErrUnavailable", err)
	}
}

func TestMaintenanceOfAnUnreachableStore(t *testing.T) {
	hosts := oneHost(t)
	p, info := setup(t, hosts)
	hosts.SetUp("h1", false)
	if err := p.LifeCycle().Maintain(t.Context(), info); err != nil {
		t.Errorf("Maintain of an unreachable store: %v, want success", err)
	}
	if err := p.LifeCycle().CancelMaintain(t.Context(), info); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("CancelMaintain of an unreachable store: err = %v, want ErrUnavailable", err)
	}
	hosts.SetUp("h1", true)
	if err := os.Remove(filepath.Join(info.Details["path"], hostfs.MarkerFile)); err != nil {
		t.Fatal(err)
	}
	if err := p.LifeCycle().CancelMaintain(t.Context(), info); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("CancelMaintain of a store without its marker: err = %v, want ErrNotFound", err)
	}
}

func TestLocate(t *testing.T) {
	p := New(oneHost(t))
	d := p.Driver()
	primary := drivers.StoreInfo{ID: "p1", Role: drivers.RolePrimary, Provider: Name}
	image := drivers.StoreInfo{ID: "i1", Role: drivers.RoleImage, Provider: Name}
	good := []struct {
		obj  drivers.DataObject
		want string
	}{
		{drivers.DataObject{ID: "v1", Type: drivers.ObjectVolume, Store: primary, Format: drivers.FormatQCOW2}, "volumes/v1.qcow2"},
		{drivers.DataObject{ID: "v1", Type: drivers.ObjectVolume, Store: primary, Format: drivers.FormatRaw}, "volumes/v1.raw"},
		{drivers.DataObject{ID: "t1", Type: drivers.ObjectTemplate, Store: image, Format: drivers.FormatISO}, "templates/t1.iso"},
		{drivers.DataObject{ID: "t1", Type: drivers.ObjectTemplate, Store: primary, Format: drivers.FormatQCOW2}, "templates/t1.qcow2"},
		{drivers.DataObject{ID: "s1", Type: drivers.ObjectSnapshot, Store: primary, Format: drivers.FormatQCOW2}, "snapshots/s1.qcow2"},
		{drivers.DataObject{ID: "s1", Type: drivers.ObjectSnapshot, Store: image}, "snapshots/manifests/s1.manifest.json"},
	}
	for _, c := range good {
		if got, err := d.Locate(c.obj); err != nil || got != c.want {
			t.Errorf("Locate(%+v) = %q, %v; want %q", c.obj, got, err, c.want)
		}
	}
	bad := []drivers.DataObject{
		{ID: "v1", Type: drivers.ObjectVolume, Store: image, Format: drivers.FormatRaw},
		{ID: "v1", Type: drivers.ObjectVolume, Store: primary, Format: drivers.FormatISO},
		{ID: "../v1", Type: drivers.ObjectVolume, Store: primary, Format: drivers.FormatRaw},
		{ID: ".v1", Type: drivers.ObjectVolume, Store: primary, Format: drivers.FormatRaw},
		{ID: "a\nb", Type: drivers.ObjectVolume, Store: primary, Format: drivers.FormatRaw},
		{ID: "t1", Type: drivers.ObjectTemplate, Store: primary},
	}
	for _, o := range bad {
		if got, err := d.Locate(o); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("Locate(%+v) = %q, %v; want ErrInvalid", o, got, err)
		}
	}
}

func TestCreateVolume(t *testing.T) {
	needQemuImg(t)
	p, info := setup(t, oneHost(t))
	drv := p.Driver()
	ctx := t.Context()
	vol := func(id string, f drivers.Format, size int64) drivers.DataObject {
		return drivers.DataObject{ID: id, Type: drivers.ObjectVolume, Store: info, Format: f, Size: size}
	}
	q, err := drv.Create(ctx, vol("v1", drivers.FormatQCOW2, 1<<30))
	if err != nil {
		t.Fatal(err)
	}
	if q.Key != "volumes/v1.qcow2" || q.Size != 1<<30 || q.Format != drivers.FormatQCOW2 || q.PhysicalSize <= 0 {
		t.Errorf("Create qcow2 = %+v", q)
	}
	if _, err := drv.Create(ctx, vol("v1", drivers.FormatRaw, 1<<30)); !errors.Is(err, errdefs.ErrAlreadyExists) ||
		!strings.Contains(err.Error(), "already exists as volumes/v1.qcow2") {
		t.Errorf("Create raw v1 next to qcow2 v1: err = %v, want ErrAlreadyExists", err)
	}
	objs, err := drv.ListObjects(ctx, info)
	if err != nil || len(objs) != 1 || objs[0].ID != "v1" || objs[0].Format != drivers.FormatQCOW2 || objs[0].Size != 1<<30 {
		t.Errorf("ListObjects = %+v, %v; want v1 as qcow2 of 1 GiB virtual size (from its header)", objs, err)
	}
	withKey := vol("v2", drivers.FormatRaw, 1<<20)
	withKey.Key = "templates/v2.raw"
	bad := []struct {
		obj   drivers.DataObject
		class error
	}{
		{vol("v2", drivers.FormatRaw, 1000001), errdefs.ErrInvalid},
		{vol("v2", drivers.FormatRaw, 0), errdefs.ErrInvalid},
		{vol("v2", drivers.FormatISO, 1<<20), errdefs.ErrInvalid},
		{vol("v2", "", 1<<20), errdefs.ErrInvalid},
		{vol("", drivers.FormatRaw, 1<<20), errdefs.ErrInvalid},
		{vol("../v2", drivers.FormatRaw, 1<<20), errdefs.ErrInvalid},
		{withKey, errdefs.ErrInvalid},
		{drivers.DataObject{ID: "t1", Type: drivers.ObjectTemplate, Store: info, Format: drivers.FormatQCOW2, Size: 1 << 20}, errdefs.ErrNotImplemented},
		{drivers.DataObject{ID: "v2", Type: drivers.ObjectVolume, Store: drivers.StoreInfo{ID: "i1", Role: drivers.RoleImage, URL: info.URL}, Format: drivers.FormatRaw, Size: 1 << 20}, errdefs.ErrInvalid},
	}
	for _, c := range bad {
		if _, err := drv.Create(ctx, c.obj); !errors.Is(err, c.class) {
			t.Errorf("Create(%+v): err = %v, want %v", c.obj, err, c.class)
		}
	}
	if objs, _ := drv.ListObjects(ctx, info); len(objs) != 1 {
		t.Errorf("refused creates left objects: %+v", objs)
	}
	// Deleting by id and format, without the key, works too.
	if err := drv.Delete(ctx, vol("v1", drivers.FormatQCOW2, 0)); err != nil {
		t.Fatal(err)
	}
	if objs, _ := drv.ListObjects(ctx, info); len(objs) != 0 {
		t.Errorf("after Delete: %+v", objs)
	}
}

func TestKeysStayInTheLayout(t *testing.T) {
	p, info := setup(t, oneHost(t))
	keep := filepath.Join(info.Details["path"], "keep")
	if err := os.WriteFile(keep, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"keep", "../keep", "volumes/../keep", "tmp/x", "volumes/.x", "volumes/", "/etc/passwd", "volumes/a/b", "templates/t.raw", "snapshots/chunks/ab/x", ".stowage-store"} {
		obj := drivers.DataObject{ID: "x", Type: drivers.ObjectVolume, Store: info, Key: key}
		if err := p.Driver().Delete(t.Context(), obj); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("Delete with key %q: err = %v, want ErrInvalid", key, err)
		}
	}
	if _, err := os.Stat(keep); err != nil {
		t.Fatal(err)
	}
	if err := p.Driver().Delete(t.Context(), drivers.DataObject{ID: "x", Type: drivers.ObjectVolume, Store: info}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("Delete without key or format: err = %v, want ErrInvalid", err)
	}
}

// Snapshots taken before keys were recorded live under their volume's
// directory; their recorded keys keep working and ListObjects shows them.
func TestOlderSnapshotKeys(t *testing.T) {
	p, info := setup(t, oneHost(t))
	dir := info.Details["path"]
	if err := os.MkdirAll(filepath.Join(dir, "snapshots", "v1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "snapshots", "v1", "s1.raw"), make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	objs, err := p.Driver().ListObjects(t.Context(), info)
	if err != nil || len(objs) != 1 || objs[0].Key != "snapshots/v1/s1.raw" || objs[0].ID != "s1" || objs[0].Type != drivers.ObjectSnapshot || objs[0].Size != 4096 {
		t.Fatalf("ListObjects = %+v, %v; want snapshot s1 at snapshots/v1/s1.raw", objs, err)
	}
	snap := drivers.DataObject{ID: "s1", Type: drivers.ObjectSnapshot, Store: info, Format: drivers.FormatRaw, Key: "snapshots/v1/s1.raw"}
	if st, err := p.Driver().Stat(t.Context(), snap); err != nil || st.Size != 4096 {
		t.Errorf("Stat by the older key = %+v, %v", st, err)
	}
	if err := p.Driver().Delete(t.Context(), snap); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "snapshots", "v1", "s1.raw")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Delete by the older key left the file: %v", err)
	}
}

func TestDeleteStoreWithObjects(t *testing.T) {
	p, info := setup(t, oneHost(t))
	dir := info.Details["path"]
	for _, f := range []string{"volumes/v1.raw", "templates/t1.qcow2"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	err := p.LifeCycle().Delete(t.Context(), info)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) ||
		!strings.Contains(err.Error(), "store s1 still holds 2 objects (e.g. templates/t1.qcow2); delete them first") {
		t.Fatalf("Delete: err = %v", err)
	}
	// A file the driver does not list as an object still blocks the release.
	for _, f := range []string{"volumes/v1.raw", "templates/t1.qcow2"} {
		if err := os.Remove(filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "volumes", ".hidden"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := p.LifeCycle().Delete(t.Context(), info); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("Delete with a hidden file left: err = %v, want ErrFailedPrecondition", err)
	}
	if _, err := os.Stat(filepath.Join(dir, hostfs.MarkerFile)); err != nil {
		t.Fatalf("refused Delete removed the marker: %v", err)
	}
}

// A host that does not see the store does not make Delete forget it.
func TestDeleteAsksEveryHost(t *testing.T) {
	hosts := driverstest.NewHosts(newLocalHost(t, "blind", hostfs.WithRoot(t.TempDir())), newLocalHost(t, "h1"))
	hosts.SetUp("blind", false)
	p, info := setup(t, hosts)
	hosts.SetUp("blind", true)
	if err := os.WriteFile(filepath.Join(info.Details["path"], "volumes", "v1.raw"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := p.LifeCycle().Delete(t.Context(), info); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("Delete: err = %v, want ErrFailedPrecondition (h1 sees v1)", err)
	}
	if err := os.Remove(filepath.Join(info.Details["path"], "volumes", "v1.raw")); err != nil {
		t.Fatal(err)
	}
	if err := p.LifeCycle().Delete(t.Context(), info); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(info.Details["path"], hostfs.MarkerFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("marker still there after Delete: %v", err)
	}
	if err := p.LifeCycle().Delete(t.Context(), info); err != nil {
		t.Errorf("Delete again: %v", err)
	}
}

// TestGrantAccess checks the table of the package doc.
func TestGrantAccess(t *testing.T) {
	needQemuImg(t)
	hosts := driverstest.NewHosts(newLocalHost(t, "h1"), newLocalHost(t, "h2", hostfs.WithRoot(t.TempDir())), newLocalHost(t, "h3"))
	hosts.Place("h1", "z1", "")
	hosts.Place("h2", "z2", "")
	hosts.Place("h3", "z1", "")
	p, info := setup(t, hosts)
	if _, err := p.LifeCycle().Attach(t.Context(), info, zone1); err != nil {
		t.Fatal(err)
	}
	drv := p.Driver()
	ctx := t.Context()
	obj := drivers.DataObject{ID: "v1", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw, Size: 1 << 20}
	o, err := drv.Create(ctx, obj)
	if err != nil {
		t.Fatal(err)
	}
	obj.Key = o.Key
	grant := func(host string, purpose drivers.Purpose, transport string) (drivers.Access, error) {
		return drv.GrantAccess(ctx, obj, drivers.Client{HostID: host, Purpose: purpose, Transport: transport})
	}
	prefix := func(a drivers.Access, p string) bool { return strings.HasPrefix(string(a.URI), p) }

	a, err := grant("h3", drivers.PurposeAttach, "")
	if want := "file://" + info.Details["path"] + "/volumes/v1.raw"; err != nil || string(a.URI) != want || a.Revocable || a.ReadOnly {
		t.Errorf("attach for h3 (in scope) = %+v, %v; want %s", a, err, want)
	}
	a, err = grant("h3", drivers.PurposeRead, "")
	if err != nil || a.URI != "store://s1/volumes/v1.raw" || a.Revocable || !a.ReadOnly {
		t.Errorf("read for h3 = %+v, %v; want store://s1/volumes/v1.raw", a, err)
	}
	a, err = grant("h3", drivers.PurposeWrite, "")
	if err != nil || a.URI != "store://s1/volumes/v1.raw" || a.ReadOnly {
		t.Errorf("write for h3 = %+v, %v; want store://s1/volumes/v1.raw", a, err)
	}
	a, err = grant("h2", drivers.PurposeAttach, "")
	if err != nil || !prefix(a, "nbd://") || !a.Revocable || a.HostID != "h1" || a.ReadOnly || !a.Expires.IsZero() {
		t.Errorf("attach for h2 (outside) = %+v, %v; want a read-write nbd export from h1 without expiry", a, err)
	} else if err := drv.RevokeAccess(ctx, obj, drivers.Client{HostID: "h2"}, a); err != nil {
		t.Errorf("RevokeAccess: %v", err)
	}
	a, err = grant("h2", drivers.PurposeRead, "")
	if left := time.Until(a.Expires); err != nil || !prefix(a, "http://") || !a.Revocable || a.HostID != "h1" || left > drivers.DefaultGrantTTL || left < drivers.DefaultGrantTTL-time.Minute {
		t.Errorf("read for h2 = %+v, %v; want an http export from h1 expiring in %s", a, err, drivers.DefaultGrantTTL)
	} else if err := drv.RevokeAccess(ctx, obj, drivers.Client{HostID: "h2"}, a); err != nil {
		t.Errorf("RevokeAccess: %v", err)
	}
	a, err = grant("h2", drivers.PurposeRead, "nbd")
	if err != nil || !prefix(a, "nbd://") || !a.ReadOnly || a.HostID != "h1" {
		t.Errorf("read over nbd for h2 = %+v, %v; want a read-only nbd export from h1", a, err)
	} else if err := drv.RevokeAccess(ctx, obj, drivers.Client{HostID: "h2"}, a); err != nil {
		t.Errorf("RevokeAccess: %v", err)
	}
	// An attach asked with a TTL expires: the export stops opening.
	a, err = drv.GrantAccess(ctx, obj, drivers.Client{HostID: "h2", Purpose: drivers.PurposeAttach, TTL: time.Second})
	if left := time.Until(a.Expires); err != nil || !prefix(a, "nbd://") || left > time.Second || left <= 0 {
		t.Errorf("attach for h2 with a TTL of 1s = %+v, %v", a, err)
	} else {
		if c, err := nbd.Dial(ctx, string(a.URI), nbd.ClientOptions{}); err != nil {
			t.Errorf("open before expiry: %v", err)
		} else {
			c.Close()
		}
		time.Sleep(time.Until(a.Expires) + 50*time.Millisecond)
		if _, err := nbd.Dial(ctx, string(a.URI), nbd.ClientOptions{}); !errdefs.IsNotFound(err) {
			t.Errorf("open after expiry: %v, want not found", err)
		}
		if err := drv.RevokeAccess(ctx, obj, drivers.Client{HostID: "h2"}, a); err != nil {
			t.Errorf("RevokeAccess of an expired export: %v", err)
		}
	}
	// A step pinned to h3 exports from h3.
	a, err = drv.GrantAccess(drivers.WithHost(ctx, "h3"), obj, drivers.Client{HostID: "h2", Purpose: drivers.PurposeRead})
	if err != nil || a.HostID != "h3" {
		t.Errorf("read for h2 with the step on h3 = %+v, %v; want the export on h3", a, err)
	}
	_, err = grant("h2", drivers.PurposeWrite, "")
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "host h2 is outside the scope \"z1\" of store s1") {
		t.Errorf("write for h2: err = %v, want ErrFailedPrecondition naming host and store", err)
	}
	if _, err := grant("h2", drivers.PurposeAttach, "file"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("attach over file for h2: err = %v, want ErrFailedPrecondition", err)
	}
	if _, err := grant("h3", drivers.PurposeWrite, "http"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("write over http: err = %v, want ErrFailedPrecondition", err)
	}
	if _, err := grant("h9", drivers.PurposeRead, ""); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("read for an unknown host: err = %v, want ErrNotFound", err)
	}
	if _, err := grant("", drivers.PurposeRead, ""); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("read for no host: err = %v, want ErrInvalid", err)
	}
	tmpl := drivers.DataObject{ID: "t1", Type: drivers.ObjectTemplate, Store: info, Format: drivers.FormatRaw, Key: "templates/t1.raw"}
	if err := os.WriteFile(filepath.Join(info.Details["path"], tmpl.Key), make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	a, err = drv.GrantAccess(ctx, tmpl, drivers.Client{HostID: "h2", Purpose: drivers.PurposeAttach})
	if err != nil || !a.ReadOnly {
		t.Errorf("attach of a template for h2 = %+v, %v; want a read-only export", a, err)
	}
}

func TestRevokeAccess(t *testing.T) {
	hosts := oneHost(t)
	p, info := setup(t, hosts)
	drv := p.Driver()
	ctx := t.Context()
	obj := drivers.DataObject{ID: "v1", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw}
	if err := drv.RevokeAccess(ctx, obj, drivers.Client{HostID: "h1"}, drivers.Access{URI: "file:///x"}); err != nil {
		t.Errorf("revoking a file access: %v", err)
	}
	exp := drivers.Access{URI: "http://127.0.0.1:1/exports/00", Revocable: true, HostID: "h1"}
	hosts.SetUp("h1", false)
	if err := drv.RevokeAccess(ctx, obj, drivers.Client{HostID: "h2"}, exp); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("revoking on a host that is not Up: err = %v, want ErrUnavailable", err)
	}
	hosts.Remove("h1")
	if err := drv.RevokeAccess(ctx, obj, drivers.Client{HostID: "h2"}, exp); err != nil {
		t.Errorf("revoking on a host that is gone: %v, want nil", err)
	}
	bad := exp
	bad.URI = "store://s1/volumes/v1.raw"
	if err := drv.RevokeAccess(ctx, obj, drivers.Client{HostID: "h2"}, bad); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("revoking a store:// access marked revocable: err = %v, want ErrInvalid", err)
	}
}

func TestCanCopy(t *testing.T) {
	d := New(oneHost(t)).Driver()
	reflink := drivers.StoreInfo{ID: "s1", Role: drivers.RolePrimary, Provider: Name, Details: map[string]string{"reflink": "true"}}
	plain := reflink
	plain.Details = map[string]string{"reflink": "false"}
	other := reflink
	other.ID = "s2"
	obj := func(s drivers.StoreInfo, id string, f drivers.Format) drivers.DataObject {
		return drivers.DataObject{ID: id, Type: drivers.ObjectVolume, Store: s, Format: f}
	}
	cases := []struct {
		src, dst drivers.DataObject
		want     bool
	}{
		{obj(reflink, "a", drivers.FormatRaw), obj(reflink, "b", drivers.FormatRaw), true},
		{obj(reflink, "a", drivers.FormatRaw), obj(reflink, "b", drivers.FormatQCOW2), false},
		{obj(other, "a", drivers.FormatRaw), obj(reflink, "b", drivers.FormatRaw), false},
		{obj(plain, "a", drivers.FormatRaw), obj(plain, "b", drivers.FormatRaw), false},
	}
	for _, c := range cases {
		if got := d.CanCopy(c.src, c.dst); got != c.want {
			t.Errorf("CanCopy(%s on %s %s, %s on %s %s) = %v, want %v", c.src.ID, c.src.Store.ID, c.src.Format, c.dst.ID, c.dst.Store.ID, c.dst.Format, got, c.want)
		}
		if !c.want {
			if _, err := d.Copy(t.Context(), c.src, c.dst, nil); !errors.Is(err, errdefs.ErrNotImplemented) {
				t.Errorf("Copy where CanCopy is false: err = %v, want ErrNotImplemented", err)
			}
		}
	}
}

func TestBackupAccess(t *testing.T) {
	hosts := driverstest.NewHosts(newLocalHost(t, "h1"), newLocalHost(t, "h2"))
	hosts.Place("h1", "z1", "")
	hosts.Place("h2", "z2", "")
	d := New(hosts).drv
	img := drivers.StoreInfo{ID: "i1", Role: drivers.RoleImage, Provider: Name, Scope: zone1, URL: "file:///srv/image"}
	b := drivers.DataObject{ID: "snap-1", Type: drivers.ObjectSnapshot, Store: img}
	a, err := d.BackupAccess(t.Context(), b, drivers.Client{HostID: "h1"})
	if err != nil || a.Chunks != "store://i1/snapshots" || a.Manifest != "snap-1.manifest.json" || a.Secret != nil {
		t.Errorf("BackupAccess = %+v, %v", a, err)
	}
	// An older record's key gives the manifest its base name.
	b.Key = "snapshots/manifests/older.manifest.json"
	if a, err := d.BackupAccess(t.Context(), b, drivers.Client{HostID: "h1"}); err != nil || a.Manifest != "older.manifest.json" {
		t.Errorf("BackupAccess by key = %+v, %v", a, err)
	}
	if _, err := d.BackupAccess(t.Context(), b, drivers.Client{HostID: "h2"}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("BackupAccess for a host outside the scope: err = %v, want ErrFailedPrecondition", err)
	}
	b.Store.Role = drivers.RolePrimary
	b.Key = ""
	if _, err := d.BackupAccess(t.Context(), b, drivers.Client{HostID: "h1"}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("BackupAccess on a primary store: err = %v, want ErrInvalid", err)
	}
}

func TestBackupStats(t *testing.T) {
	got := backupStats(hostops.BackupInfo{Manifest: "m", Size: 8 << 20, Chunks: 8, ZeroChunks: 2, NewChunks: 4, NewBytes: 4 << 20})
	want := drivers.BackupStats{Chunks: 4, FreedBytes: 4 << 20, KeptShared: 2, ManifestGone: true}
	if got != want {
		t.Errorf("backupStats = %+v, want %+v", got, want)
	}
	if got := backupStats(hostops.BackupInfo{Manifest: "m"}); got != (drivers.BackupStats{}) {
		t.Errorf("backupStats of a missing backup = %+v", got)
	}
}

// A lazy volume: a linked clone on the template in the host's mount.
func TestCloneFromTemplateMount(t *testing.T) {
	needQemuImg(t)
	mount := t.TempDir()
	if out, err := exec.Command("qemu-img", "create", "-f", "qcow2", filepath.Join(mount, "t1"), "4M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v: %s", err, out)
	}
	hosts := driverstest.NewHosts(newLocalHost(t, "h1").withMount(mount))
	hosts.Place("h1", "z1", "")
	p, info := setup(t, hosts)
	dst := drivers.DataObject{ID: "lazy", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatQCOW2, Size: 8 << 20}
	got, err := p.drv.Clone(drivers.WithHost(t.Context(), "h1"), drivers.CloneSpec{
		Base:        drivers.DataObject{ID: "t1", Type: drivers.ObjectTemplate, Format: drivers.FormatQCOW2},
		BaseInMount: true, Dst: dst, Mode: drivers.CloneLinked,
	}, nil)
	if err != nil || got.Key != "volumes/lazy.qcow2" || got.Size != 8<<20 {
		t.Fatalf("Clone from the template mount = %+v, %v", got, err)
	}
	_, err = p.drv.Clone(t.Context(), drivers.CloneSpec{
		Base: drivers.DataObject{ID: "t1", Type: drivers.ObjectTemplate, Store: drivers.StoreInfo{ID: "elsewhere"}, Format: drivers.FormatQCOW2},
		Dst:  dst, Mode: drivers.CloneLinked,
	}, nil)
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("Clone from a template of another store: err = %v, want ErrInvalid", err)
	}
}

func TestImportRefusesOtherSchemes(t *testing.T) {
	p, info := setup(t, oneHost(t))
	dst := drivers.DataObject{ID: "t1", Type: drivers.ObjectTemplate, Store: info, Format: drivers.FormatRaw}
	for _, u := range []string{"/etc/hostname", "ftp://x/y", "http:///nohost"} {
		if _, err := p.drv.Import(t.Context(), dst, drivers.ImportSource{URL: u}, nil); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("Import from %q: err = %v, want ErrInvalid", u, err)
		}
	}
	// A file:// URL goes to the agent as it is, which reads it only beneath
	// its import directory: this one has none.
	if _, err := p.drv.Import(t.Context(), dst, drivers.ImportSource{URL: "file:///etc/hostname"}, nil); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("Import from file:///etc/hostname: err = %v, want ErrPermissionDenied from the agent", err)
	}
}

// The adapter of these tests refuses what the agent refuses.
func TestLocalHostStaysInStores(t *testing.T) {
	h := newLocalHost(t, "h1")
	for _, ref := range []hostops.Ref{{Store: "nope", Key: "x"}, {Store: "s1", Key: "../x"}, {Store: "s1", Key: "/etc/hostname"}} {
		if _, err := h.StatObject(t.Context(), ref); !errors.Is(err, errdefs.ErrPermissionDenied) {
			t.Errorf("StatObject(%v): err = %v, want ErrPermissionDenied", ref, err)
		}
	}
}

// TestConformanceReflink runs the suite on a primary store on XFS with
// reflink, where CanCopy is true and Copy and reflink clones share extents.
// It needs root (losetup, mount).
func TestConformanceReflink(t *testing.T) {
	needQemuImg(t)
	mnt := mountXFS(t)
	driverstest.Run(t, "xfs", func(t *testing.T) driverstest.Env {
		dir, err := os.MkdirTemp(mnt, "store-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		hosts := driverstest.NewHosts(newLocalHost(t, "h1"), newLocalHost(t, "h2", hostfs.WithRoot(t.TempDir())))
		hosts.Place("h1", "z1", "")
		hosts.Place("h2", "z2", "")
		return driverstest.Env{
			Provider: New(hosts),
			Spec:     drivers.StoreSpec{ID: "store-x", Role: drivers.RolePrimary, Scope: zone1, URL: "file://" + dir + "/primary"},
			Client:   "h1", Remote: "h2", Hosts: hosts,
		}
	})
	// The copy the suite made went through CanCopy true.
	hosts := driverstest.NewHosts(newLocalHost(t, "h1"))
	p := New(hosts)
	info, err := p.LifeCycle().Initialize(t.Context(), drivers.StoreSpec{ID: "s-x", Role: drivers.RolePrimary, Scope: zone1, URL: "file://" + mnt + "/direct"})
	if err != nil {
		t.Fatal(err)
	}
	if info.Details["reflink"] != "true" {
		t.Fatalf("Details = %v, want reflink true on XFS", info.Details)
	}
	src, err := p.drv.Create(t.Context(), drivers.DataObject{ID: "a", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw, Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	a := drivers.DataObject{ID: "a", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw, Key: src.Key}
	b := drivers.DataObject{ID: "b", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw}
	if !p.drv.CanCopy(a, b) {
		t.Fatal("CanCopy inside an XFS store with reflink is false")
	}
	got, err := p.drv.Copy(t.Context(), a, b, nil)
	if err != nil || got.Key != "volumes/b.raw" || got.Size != 1<<20 || got.Method != "reflink" {
		t.Errorf("Copy = %+v, %v; want volumes/b.raw by reflink", got, err)
	}
}

func mountXFS(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		envtest.Skip(t, "needs root for losetup and mount")
	}
	for _, tool := range []string{"losetup", "mkfs.xfs", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			envtest.Skipf(t, "%s is not installed: %v", tool, err)
		}
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "xfs.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// mkfs.xfs wants at least 300 MiB; the file is sparse.
	if err := os.Truncate(img, 512<<20); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		envtest.Skipf(t, "cannot attach a loop device here: %v: %s", err, out)
	}
	loop := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "--detach", loop).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v: %s", loop, err, out)
		}
	})
	if out, err := exec.Command("mkfs.xfs", "-q", "-f", "-m", "reflink=1", loop).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.xfs: %v: %s", err, out)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "xfs", loop, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount %s: %v: %s", loop, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", mnt, err, out)
		}
	})
	return mnt
}

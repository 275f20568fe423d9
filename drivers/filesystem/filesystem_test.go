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

	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/driverstest"
	"github.com/stowage/stowage/errdefs"
)

var zone1 = drivers.Scope{Zone: "z1"}

func needQemuImg(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skipf("qemu-img is not installed (apt-get install qemu-utils): %v", err)
	}
}

func TestConformance(t *testing.T) {
	needQemuImg(t)
	for _, role := range []drivers.Role{drivers.RolePrimary, drivers.RoleImage} {
		driverstest.Run(t, string(role), func(t *testing.T) (drivers.Provider, drivers.StoreSpec) {
			p := New(drivers.Deps{Endpoints: driverstest.LocalEndpoints("h1")})
			return p, drivers.StoreSpec{
				ID: "store-1", Name: "st1", Role: role, Scope: zone1,
				URL: "file://" + filepath.Join(t.TempDir(), string(role)),
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
func setup(t *testing.T, hosts *driverstest.LocalHosts) (*Provider, drivers.StoreInfo) {
	t.Helper()
	p := New(drivers.Deps{Endpoints: hosts})
	info, err := p.LifeCycle().Initialize(t.Context(), drivers.StoreSpec{
		ID: "s1", Role: drivers.RolePrimary, Scope: zone1, URL: "file://" + filepath.Join(t.TempDir(), "primary"),
	})
	if err != nil {
		t.Fatal(err)
	}
	return p, info
}

func TestInitialize(t *testing.T) {
	hosts := driverstest.LocalEndpoints("h1")
	p, info := setup(t, hosts)
	dir := strings.TrimPrefix(info.URL, "file://")
	if info.Details["path"] != dir || info.Details["fs_type"] == "" || info.Details["reflink"] == "" {
		t.Errorf("Details = %v, want path %s, fs_type and reflink", info.Details, dir)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{hostfs.MarkerFile, "snapshots", "templates", "tmp", "volumes"}; !slices.Equal(names, want) {
		t.Errorf("primary layout = %q, want %q", names, want)
	}

	// The image layout.
	img, err := p.LifeCycle().Initialize(t.Context(), drivers.StoreSpec{
		ID: "i1", Role: drivers.RoleImage, Scope: zone1, URL: "file://" + filepath.Join(t.TempDir(), "image"),
	})
	if err != nil {
		t.Fatal(err)
	}
	entries, _ = os.ReadDir(img.Details["path"])
	names = names[:0]
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{hostfs.MarkerFile, "snapshots", "templates", "tmp"}; !slices.Equal(names, want) {
		t.Errorf("image layout = %q, want %q", names, want)
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
	hosts := driverstest.LocalEndpoints("h1")
	p := New(drivers.Deps{Endpoints: hosts})
	spec := drivers.StoreSpec{ID: "s1", Role: drivers.RolePrimary, Scope: zone1, URL: "file://" + base + "/file/primary"}
	if _, err := p.LifeCycle().Initialize(t.Context(), spec); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("Initialize below a file: err = %v, want ErrFailedPrecondition", err)
	}
	hosts.SetUp("h1", false)
	spec.URL = "file://" + base + "/primary"
	_, err := p.LifeCycle().Initialize(t.Context(), spec)
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), `no Up agent in scope "z1" can initialise the store`) {
		t.Errorf("Initialize with no Up host: err = %v, want ErrUnavailable naming the scope", err)
	}
	entries, _ := os.ReadDir(base)
	if len(entries) != 1 {
		t.Errorf("failed Initialize calls left %d entries in %s", len(entries), base)
	}
}

func TestAttach(t *testing.T) {
	hosts := driverstest.LocalEndpoints("h1")
	// h2 has a filesystem of its own: it does not see h1's directories.
	hosts.Add("h2", hostfs.WithRoot(t.TempDir()))
	hosts.Add("h3")
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
	hosts := driverstest.LocalEndpoints("h1")
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

func TestCreateVolume(t *testing.T) {
	needQemuImg(t)
	hosts := driverstest.LocalEndpoints("h1")
	p, info := setup(t, hosts)
	drv := p.Driver()
	ctx := t.Context()
	vol := func(id string, f drivers.Format, size int64) drivers.DataObject {
		return drivers.DataObject{ID: id, Type: drivers.ObjectVolume, Store: info, Format: f, Size: size}
	}

	q, err := drv.Create(ctx, vol("v1", drivers.FormatQCOW2, 1<<30))
	if err != nil {
		t.Fatal(err)
	}
	if q.Path != "volumes/v1.qcow2" || q.Size != 1<<30 || q.Format != drivers.FormatQCOW2 || q.PhysicalSize <= 0 {
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
		{vol(".hidden", drivers.FormatRaw, 1<<20), errdefs.ErrInvalid},
		{vol("a\nb", drivers.FormatRaw, 1<<20), errdefs.ErrInvalid},
		{drivers.DataObject{ID: "v2", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw, Size: 1 << 20, Path: "templates/v2.raw"}, errdefs.ErrInvalid},
		{drivers.DataObject{ID: "t1", Type: drivers.ObjectTemplate, Store: info, Format: drivers.FormatQCOW2, Size: 1 << 20}, errdefs.ErrNotImplemented},
		{drivers.DataObject{ID: "v2", Type: drivers.ObjectVolume, Store: drivers.StoreInfo{ID: "i1", Role: drivers.RoleImage, URL: info.URL}, Format: drivers.FormatRaw, Size: 1 << 20}, errdefs.ErrInvalid},
	}
	for _, c := range bad {
		if _, err := drv.Create(ctx, c.obj); !errors.Is(err, c.class) {
			t.Errorf("Create(%+v): err = %v, want %v", c.obj, err, c.class)
		}
	}
	objs, _ = drv.ListObjects(ctx, info)
	if len(objs) != 1 {
		t.Errorf("refused creates left objects: %+v", objs)
	}

	// Deleting by id and format, without the path, works too.
	if err := drv.Delete(ctx, vol("v1", drivers.FormatQCOW2, 0)); err != nil {
		t.Fatal(err)
	}
	if objs, _ := drv.ListObjects(ctx, info); len(objs) != 0 {
		t.Errorf("after Delete: %+v", objs)
	}
}

func TestDeleteChecksPaths(t *testing.T) {
	hosts := driverstest.LocalEndpoints("h1")
	p, info := setup(t, hosts)
	keep := filepath.Join(info.Details["path"], "keep")
	if err := os.WriteFile(keep, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, rel := range []string{"keep", "../keep", "volumes/../keep", "tmp/x", "volumes/.x", "volumes/", "/etc/passwd", "volumes/a/b"} {
		obj := drivers.DataObject{ID: "x", Type: drivers.ObjectVolume, Store: info, Path: rel}
		if err := p.Driver().Delete(t.Context(), obj); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("Delete with path %q: err = %v, want ErrInvalid", rel, err)
		}
	}
	if _, err := os.Stat(keep); err != nil {
		t.Fatal(err)
	}
	if err := p.Driver().Delete(t.Context(), drivers.DataObject{ID: "x", Type: drivers.ObjectVolume, Store: info}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("Delete without path or format: err = %v, want ErrInvalid", err)
	}
}

func TestDeleteStoreWithObjects(t *testing.T) {
	hosts := driverstest.LocalEndpoints("h1")
	p, info := setup(t, hosts)
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
	hosts := driverstest.LocalEndpoints()
	hosts.Add("blind", hostfs.WithRoot(t.TempDir())) // first: ForScope picks it
	hosts.Add("h1")
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

func TestGrantAccess(t *testing.T) {
	needQemuImg(t)
	hosts := driverstest.LocalEndpoints("h1")
	hosts.Add("h2", hostfs.WithRoot(t.TempDir()))
	hosts.Add("h3")
	p, info := setup(t, hosts)
	drv := p.Driver()
	ctx := t.Context()
	obj := drivers.DataObject{ID: "v1", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw, Size: 1 << 20}
	o, err := drv.Create(ctx, obj)
	if err != nil {
		t.Fatal(err)
	}
	obj.Path = o.Path

	uri, err := drv.GrantAccess(ctx, obj, drivers.Client{HostID: "h1"})
	if want := "file://" + info.Details["path"] + "/volumes/v1.raw"; err != nil || string(uri) != want {
		t.Errorf("GrantAccess to h1 = %q, %v; want %q", uri, err, want)
	}
	_, err = drv.GrantAccess(ctx, obj, drivers.Client{HostID: "h2"})
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "store s1 is not reachable from host h2") {
		t.Errorf("GrantAccess to h2: err = %v, want ErrFailedPrecondition", err)
	}
	hosts.SetUp("h3", false)
	if _, err := drv.GrantAccess(ctx, obj, drivers.Client{HostID: "h3"}); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("GrantAccess to a host that is not Up: err = %v, want ErrUnavailable", err)
	}
	if _, err := drv.GrantAccess(ctx, obj, drivers.Client{HostID: "h9"}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("GrantAccess to an unknown host: err = %v, want ErrNotFound", err)
	}
	if _, err := drv.GrantAccess(ctx, obj, drivers.Client{}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("GrantAccess to no host: err = %v, want ErrInvalid", err)
	}
	missing := obj
	missing.ID, missing.Path = "v9", ""
	if _, err := drv.GrantAccess(ctx, missing, drivers.Client{HostID: "h1"}); !errors.Is(err, errdefs.ErrNotFound) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("GrantAccess to a missing volume: err = %v, want ErrNotFound", err)
	}
	if err := drv.RevokeAccess(ctx, obj, drivers.Client{HostID: "h1"}); err != nil {
		t.Errorf("RevokeAccess: %v", err)
	}
}

func TestNotImplemented(t *testing.T) {
	p := New(drivers.Deps{Endpoints: driverstest.LocalEndpoints("h1")})
	drv := p.Driver().(drivers.PrimaryDriver)
	var a, b drivers.DataObject
	if drv.CanCopy(a, b) {
		t.Error("CanCopy = true")
	}
	if _, err := drv.Copy(t.Context(), a, b); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Errorf("Copy: err = %v", err)
	}
	if _, err := drv.TakeSnapshot(t.Context(), drivers.SnapshotObject{}); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Errorf("TakeSnapshot: err = %v", err)
	}
	if err := drv.RevertSnapshot(t.Context(), drivers.SnapshotObject{}); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Errorf("RevertSnapshot: err = %v", err)
	}
	if _, ok := p.Driver().(drivers.Resizer); ok {
		t.Error("the driver claims Resizer without implementing it")
	}
}

func TestFactory(t *testing.T) {
	if _, err := Factory(drivers.Deps{}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("Factory without Endpoints: err = %v, want ErrInvalid", err)
	}
	p, err := Factory(drivers.Deps{Endpoints: driverstest.LocalEndpoints("h1")})
	if err != nil {
		t.Fatal(err)
	}
	r := drivers.NewRegistry()
	r.Register(p)
	if got, err := r.Get(Name); err != nil || got.Name() != "filesystem" || !drivers.HasRole(got, drivers.RoleImage) {
		t.Errorf("registry Get = %v, %v", got, err)
	}
}

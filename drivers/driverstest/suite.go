// Package driverstest is the conformance suite for storage providers
// (drivers.Provider): any provider's test calls Run with a setup that
// returns the provider and the spec of a fresh store, and the suite checks
// the behaviour the controller relies on — idempotent Initialize, Attach,
// refusal to initialise a directory another store owns, bad URLs refused
// before anything is written, objects created at their exact size and
// listed, deletes idempotent, a store with objects not deletable.
//
// The suite drives real host work: providers reach hosts through
// LocalEndpoints, a drivers.Endpoints over agent/hostfs on this machine.
//
//	func TestConformance(t *testing.T) {
//		driverstest.Run(t, "filesystem", func(t *testing.T) (drivers.Provider, drivers.StoreSpec) {
//			p := filesystem.New(drivers.Deps{Endpoints: driverstest.LocalEndpoints("h1")})
//			return p, drivers.StoreSpec{ID: "s1", Role: drivers.RolePrimary,
//				URL: "file://" + t.TempDir() + "/primary", Scope: drivers.Scope{Zone: "z1"}}
//		})
//	}
//
// setup is called once per subtest and must return a store nobody has
// initialised yet. When spec.URL is a file:// URL, the suite also checks on
// this machine that refused calls write nothing next to it; that holds when
// the provider's hosts see this machine's filesystem (LocalEndpoints without
// hostfs.WithRoot). Volume tests run only for a primary store spec.
//
// This is a non-test package so that every provider's tests can import it;
// it imports "testing" on purpose and must not be linked into binaries.
package driverstest

import (
	"context"
	"errors"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// OddSize is the virtual size of the suite's volumes: an odd number of
// 512-byte sectors, not a multiple of any cluster, extent or MiB, so that a
// provider that rounds sizes is caught.
const OddSize = 5<<20 + 3*512

// Run runs the conformance suite against the provider setup returns, as
// subtests of a test called name.
func Run(t *testing.T, name string, setup func(t *testing.T) (drivers.Provider, drivers.StoreSpec)) {
	t.Helper()
	cases := []struct {
		name string
		fn   func(t *testing.T, p drivers.Provider, spec drivers.StoreSpec)
	}{
		{"Provider", testProvider},
		{"InitializeAttach", testInitializeAttach},
		{"ListObjectsEmpty", testListObjectsEmpty},
		{"VolumeLifecycle", testVolumeLifecycle},
		{"DeleteEmptyStore", testDeleteEmptyStore},
		{"BadURLs", testBadURLs},
		{"Reinitialize", testReinitialize},
		{"OwnedByAnotherStore", testOwnedByAnotherStore},
		{"Maintenance", testMaintenance},
		{"CanceledContext", testCanceledContext},
	}
	t.Run(name, func(t *testing.T) {
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				p, spec := setup(t)
				c.fn(t, p, spec)
			})
		}
	})
}

func testProvider(t *testing.T, p drivers.Provider, spec drivers.StoreSpec) {
	if p.Name() == "" {
		t.Error("Name is empty")
	}
	if !drivers.HasRole(p, spec.Role) {
		t.Errorf("Roles = %v, does not hold the spec's role %s", p.Roles(), spec.Role)
	}
	if p.LifeCycle() == nil || p.Driver() == nil {
		t.Fatal("LifeCycle or Driver is nil")
	}
	if spec.Role == drivers.RolePrimary {
		if _, ok := p.Driver().(drivers.PrimaryDriver); !ok {
			t.Errorf("%T serves primary stores but is not a drivers.PrimaryDriver", p.Driver())
		}
	}
}

// initialize initialises spec or fails the test.
func initialize(t *testing.T, p drivers.Provider, spec drivers.StoreSpec) drivers.StoreInfo {
	t.Helper()
	info, err := p.LifeCycle().Initialize(t.Context(), spec)
	if err != nil {
		t.Fatalf("Initialize(%+v): %v", spec, err)
	}
	return info
}

func testInitializeAttach(t *testing.T, p drivers.Provider, spec drivers.StoreSpec) {
	info := initialize(t, p, spec)
	if info.ID != spec.ID || info.Role != spec.Role || info.URL != spec.URL || info.Scope != spec.Scope || info.Name != spec.Name {
		t.Errorf("StoreInfo %+v does not carry the spec %+v", info, spec)
	}
	if info.Provider != p.Name() {
		t.Errorf("StoreInfo.Provider = %q, want %q", info.Provider, p.Name())
	}
	if info.CapacityBytes <= 0 || info.AvailableBytes < 0 || info.AvailableBytes > info.CapacityBytes {
		t.Errorf("capacity %d, available %d: want capacity > 0 and 0 <= available <= capacity", info.CapacityBytes, info.AvailableBytes)
	}
	hosts, err := p.LifeCycle().Attach(t.Context(), info, spec.Scope)
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	if len(hosts) == 0 {
		t.Fatal("Attach succeeded with no host")
	}
	for _, h := range hosts {
		if h == "" {
			t.Errorf("Attach returned an empty host id in %q", hosts)
		}
	}
}

func testListObjectsEmpty(t *testing.T, p drivers.Provider, spec drivers.StoreSpec) {
	info := initialize(t, p, spec)
	objs, err := p.Driver().ListObjects(t.Context(), info)
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != 0 {
		t.Errorf("a new store lists %+v, want nothing", objs)
	}
}

func blankVolume(info drivers.StoreInfo, id string, size int64) drivers.DataObject {
	return drivers.DataObject{ID: id, Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw, Size: size}
}

func needPrimary(t *testing.T, spec drivers.StoreSpec) {
	t.Helper()
	if spec.Role != drivers.RolePrimary {
		t.Skipf("volumes live on primary stores; this spec is a %s store", spec.Role)
	}
}

func testVolumeLifecycle(t *testing.T, p drivers.Provider, spec drivers.StoreSpec) {
	needPrimary(t, spec)
	ctx := t.Context()
	lc, drv := p.LifeCycle(), p.Driver()
	info := initialize(t, p, spec)
	hosts, err := lc.Attach(ctx, info, spec.Scope)
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}

	vol := blankVolume(info, "vol-1", OddSize)
	got, err := drv.Create(ctx, vol)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	if got.ID != vol.ID || got.Type != drivers.ObjectVolume || got.Format != drivers.FormatRaw || got.Size != OddSize || got.Path == "" {
		t.Errorf("Create = %+v, want volume vol-1, raw, %d bytes, with a path", got, OddSize)
	}
	vol.Path = got.Path

	again, err := drv.Create(ctx, vol)
	if err != nil {
		t.Errorf("Create of the same volume again: %v, want success (idempotent)", err)
	} else if again.Path != got.Path || again.Size != got.Size {
		t.Errorf("Create again = %+v, want %+v", again, got)
	}
	bigger := blankVolume(info, "vol-1", 2*OddSize)
	if _, err := drv.Create(ctx, bigger); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("Create vol-1 with another size: err = %v, want ErrAlreadyExists", err)
	}

	objs, err := drv.ListObjects(ctx, info)
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != 1 {
		t.Fatalf("ListObjects = %+v, want vol-1 alone", objs)
	}
	if o := objs[0]; o.ID != "vol-1" || o.Type != drivers.ObjectVolume || o.Path != got.Path || o.Format != drivers.FormatRaw || o.Size != OddSize {
		t.Errorf("ListObjects shows %+v, want %+v", o, got)
	}

	uri, err := drv.GrantAccess(ctx, vol, drivers.Client{HostID: hosts[0]})
	if err != nil {
		t.Fatalf("GrantAccess to %s: %v", hosts[0], err)
	}
	if u, err := url.Parse(string(uri)); err != nil || u.Scheme == "" {
		t.Errorf("GrantAccess URI %q does not parse as a URL with a scheme: %v", uri, err)
	}
	if err := drv.RevokeAccess(ctx, vol, drivers.Client{HostID: hosts[0]}); err != nil {
		t.Errorf("RevokeAccess: %v", err)
	}

	err = lc.Delete(ctx, info)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("Delete of a store holding vol-1: err = %v, want ErrFailedPrecondition", err)
	}
	objs, err = drv.ListObjects(ctx, info)
	if err != nil || len(objs) != 1 {
		t.Fatalf("after a refused Delete, ListObjects = %+v, %v; want the store intact with vol-1", objs, err)
	}
	if _, err := lc.Attach(ctx, info, spec.Scope); err != nil {
		t.Fatalf("after a refused Delete, Attach: %v", err)
	}

	for i := range 2 {
		if err := drv.Delete(ctx, vol); err != nil {
			t.Fatalf("Delete vol-1 (%d): %v", i+1, err)
		}
	}
	objs, err = drv.ListObjects(ctx, info)
	if err != nil || len(objs) != 0 {
		t.Fatalf("after Delete, ListObjects = %+v, %v; want nothing", objs, err)
	}
	if err := lc.Delete(ctx, info); err != nil {
		t.Fatalf("Delete of the empty store: %v", err)
	}
	if err := lc.Delete(ctx, info); err != nil {
		t.Errorf("Delete of the store again: %v, want success (idempotent)", err)
	}
}

func testDeleteEmptyStore(t *testing.T, p drivers.Provider, spec drivers.StoreSpec) {
	info := initialize(t, p, spec)
	if err := p.LifeCycle().Delete(t.Context(), info); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if err := p.LifeCycle().Delete(t.Context(), info); err != nil {
		t.Errorf("Delete again: %v, want success (idempotent)", err)
	}
	// The location is free again.
	info = initialize(t, p, spec)
	if err := p.LifeCycle().Delete(t.Context(), info); err != nil {
		t.Errorf("Delete after re-Initialize: %v", err)
	}
}

// badURLs returns URLs no provider accepts, plus, for a file:// spec, the
// malformed variants of the spec's own URL.
func badURLs(good string) []string {
	urls := []string{"", "::not a url", "gopher://example.invalid/store"}
	u, err := url.Parse(good)
	if err != nil || u.Scheme != "file" || !filepath.IsAbs(u.Path) {
		return urls
	}
	p := u.Path
	return append(urls,
		"file://somehost"+p,                 // host part
		"file:"+strings.TrimPrefix(p, "/"),  // relative
		"file://"+p+"/",                     // not clean
		"file://"+p+"/../"+filepath.Base(p), // not clean
		"file://"+filepath.Dir(p)+"//"+filepath.Base(p),
		"file:///",
		"nfs://server"+p,
	)
}

// watchDir returns the local directory next to a file:// URL that refused
// calls must leave as it was, or "" when there is none to watch.
func watchDir(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil || u.Scheme != "file" || !filepath.IsAbs(u.Path) {
		return ""
	}
	dir := filepath.Dir(filepath.Clean(u.Path))
	if dir == "/" {
		return ""
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return ""
	}
	return dir
}

// snapshot lists what is under dir ("" lists nothing).
func snapshot(t *testing.T, dir string) []string {
	t.Helper()
	if dir == "" {
		return nil
	}
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		out = append(out, p)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func unchanged(t *testing.T, what, dir string, before []string) {
	t.Helper()
	if after := snapshot(t, dir); !slices.Equal(before, after) {
		t.Errorf("%s changed %s:\nbefore %q\nafter  %q", what, dir, before, after)
	}
}

func testBadURLs(t *testing.T, p drivers.Provider, spec drivers.StoreSpec) {
	dir := watchDir(spec.URL)
	before := snapshot(t, dir)
	for _, bad := range badURLs(spec.URL) {
		s := spec
		s.URL = bad
		if _, err := p.LifeCycle().Initialize(t.Context(), s); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("Initialize with URL %q: err = %v, want ErrInvalid", bad, err)
		} else if err.Error() == errdefs.ErrInvalid.Error() {
			t.Errorf("Initialize with URL %q: the error %q does not say what is wrong", bad, err)
		}
	}
	s := spec
	s.ID = ""
	if _, err := p.LifeCycle().Initialize(t.Context(), s); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("Initialize without a store id: err = %v, want ErrInvalid", err)
	}
	unchanged(t, "refused Initialize calls", dir, before)
	initialize(t, p, spec)
}

func testReinitialize(t *testing.T, p drivers.Provider, spec drivers.StoreSpec) {
	first := initialize(t, p, spec)
	var vol drivers.DataObject
	if spec.Role == drivers.RolePrimary {
		obj, err := p.Driver().Create(t.Context(), blankVolume(first, "vol-keep", OddSize))
		if err != nil {
			t.Fatalf("Create: %v", err)
		}
		vol = blankVolume(first, obj.ID, obj.Size)
		vol.Path = obj.Path
	}
	second := initialize(t, p, spec)
	if second.ID != first.ID || second.URL != first.URL || second.Provider != first.Provider {
		t.Errorf("second Initialize = %+v, first was %+v", second, first)
	}
	objs, err := p.Driver().ListObjects(t.Context(), second)
	if err != nil {
		t.Fatal(err)
	}
	if spec.Role == drivers.RolePrimary && (len(objs) != 1 || objs[0].ID != "vol-keep") {
		t.Errorf("after re-Initialize, ListObjects = %+v, want vol-keep kept", objs)
	}
	if spec.Role == drivers.RolePrimary {
		if err := p.Driver().Delete(t.Context(), vol); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.LifeCycle().Delete(t.Context(), second); err != nil {
		t.Errorf("Delete: %v", err)
	}
}

func testOwnedByAnotherStore(t *testing.T, p drivers.Provider, spec drivers.StoreSpec) {
	info := initialize(t, p, spec)
	other := spec
	other.ID = spec.ID + "-other"
	dir := watchDir(spec.URL)
	before := snapshot(t, dir)
	if _, err := p.LifeCycle().Initialize(t.Context(), other); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("Initialize of %s's location for store %s: err = %v, want ErrFailedPrecondition", spec.ID, other.ID, err)
	}
	unchanged(t, "a refused Initialize", dir, before)
	if _, err := p.Driver().ListObjects(t.Context(), info); err != nil {
		t.Fatalf("the first store is damaged: %v", err)
	}
	otherInfo := info
	otherInfo.ID = other.ID
	if err := p.LifeCycle().Delete(t.Context(), otherInfo); err == nil {
		if _, err := p.Driver().ListObjects(t.Context(), info); err != nil {
			t.Fatalf("Delete of store %s released %s's location: %v", other.ID, spec.ID, err)
		}
	}
	if err := p.LifeCycle().Delete(t.Context(), info); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	// Released, the location can be taken by the other store.
	otherInfo = initialize(t, p, other)
	if err := p.LifeCycle().Delete(t.Context(), otherInfo); err != nil {
		t.Errorf("Delete of %s: %v", other.ID, err)
	}
}

func testMaintenance(t *testing.T, p drivers.Provider, spec drivers.StoreSpec) {
	info := initialize(t, p, spec)
	if err := p.LifeCycle().Maintain(t.Context(), info); err != nil {
		t.Fatalf("Maintain: %v", err)
	}
	if err := p.LifeCycle().Maintain(t.Context(), info); err != nil {
		t.Fatalf("Maintain again: %v", err)
	}
	if err := p.LifeCycle().CancelMaintain(t.Context(), info); err != nil {
		t.Fatalf("CancelMaintain: %v", err)
	}
	if _, err := p.Driver().ListObjects(t.Context(), info); err != nil {
		t.Errorf("ListObjects after maintenance: %v", err)
	}
}

func testCanceledContext(t *testing.T, p drivers.Provider, spec drivers.StoreSpec) {
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	dir := watchDir(spec.URL)
	before := snapshot(t, dir)
	if _, err := p.LifeCycle().Initialize(ctx, spec); !errors.Is(err, context.Canceled) {
		t.Errorf("Initialize with a cancelled context: err = %v, want context.Canceled", err)
	}
	unchanged(t, "Initialize with a cancelled context", dir, before)
	info := initialize(t, p, spec)
	if _, err := p.Driver().ListObjects(ctx, info); !errors.Is(err, context.Canceled) {
		t.Errorf("ListObjects with a cancelled context: err = %v, want context.Canceled", err)
	}
	if spec.Role == drivers.RolePrimary {
		if _, err := p.Driver().Create(ctx, blankVolume(info, "vol-c", OddSize)); !errors.Is(err, context.Canceled) {
			t.Errorf("Create with a cancelled context: err = %v, want context.Canceled", err)
		}
		objs, err := p.Driver().ListObjects(t.Context(), info)
		if err != nil || len(objs) != 0 {
			t.Errorf("after a cancelled Create, ListObjects = %+v, %v; want nothing", objs, err)
		}
	}
	if err := p.LifeCycle().Delete(ctx, info); !errors.Is(err, context.Canceled) {
		t.Errorf("Delete with a cancelled context: err = %v, want context.Canceled", err)
	}
	if _, err := p.Driver().ListObjects(t.Context(), info); err != nil {
		t.Errorf("a cancelled Delete damaged the store: %v", err)
	}
}

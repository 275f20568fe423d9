// Package driverstest is the conformance suite for storage providers
// (drivers.Provider): a provider's test calls Run with a setup that returns
// an Env — the provider, the spec of a fresh store and the hosts around it
// — and the suite checks, against real host work, the behaviour the
// controller's workflows rely on:
//
//   - the store life cycle: idempotent Initialize, Attach, refusal of a
//     location another store owns, bad URLs refused before anything is
//     written, Maintain / CancelMaintain, Delete refused while objects
//     remain, a cancelled context honoured;
//   - objects: Locate pure and deterministic, Create at the exact size and
//     idempotent, Stat, ListObjects, Delete idempotent;
//   - Copy and CanCopy both ways (CanCopy false makes Copy
//     errdefs.ErrNotImplemented and leaves nothing; true makes it work);
//   - GrantAccess / RevokeAccess for each purpose, from a host in the
//     store's scope and (Env.Remote) from one outside it, reading the
//     bytes of http(s) URIs;
//   - snapshot take and revert (drivers.PrimaryDriver), and the optional
//     capabilities Resizer, Cloner, Importer (from an HTTP server the suite
//     starts on loopback, serving raw and qcow2 images made with qemu-img;
//     a wrong checksum is errdefs.ErrDataLoss and leaves no object),
//     Rebaser and ChunkTarget (the shape of BackupAccess, a backup made on
//     a host through it when Env.Hosts is set, DeleteBackup) and
//     ChunkCollector (nothing removed next to live backups, which restore
//     byte-equal after it; what deleted manifests left removed once).
//
// A capability the provider lacks is skipped with t.Skip naming the
// interface; the controller then routes around it or refuses with a reason.
//
//	func TestConformance(t *testing.T) {
//		driverstest.Run(t, "filesystem", func(t *testing.T) driverstest.Env {
//			hosts := driverstest.NewHosts(myLocalHost(t, "h1"), myLocalHost(t, "h2"))
//			hosts.Place("h1", "z1", "")
//			hosts.Place("h2", "z2", "")
//			return driverstest.Env{
//				Provider: filesystem.New(hosts),
//				Spec: drivers.StoreSpec{ID: "s1", Role: drivers.RolePrimary,
//					URL: "file://" + t.TempDir() + "/primary", Scope: drivers.Scope{Zone: "z1"}},
//				Client: "h1", Remote: "h2", Hosts: hosts,
//			}
//		})
//	}
//
// setup is called once per subtest and must return a store nobody has
// initialised yet. When Spec.URL is a file:// URL, the suite also checks on
// this machine that refused calls write nothing next to it. Volume,
// snapshot, resize, clone and rebase tests run for a primary store spec,
// chunk target tests for an image store spec.
//
// This is a non-test package so that every provider's tests can import it;
// it imports "testing" on purpose and must not be linked into binaries. It
// imports nothing under agent/: hosts come from the caller (Hosts wraps any
// hostops.Host).
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
	"github.com/stowage/stowage/hostops"
)

// OddSize is the virtual size of the suite's volumes: an odd number of
// 512-byte sectors, not a multiple of any cluster, extent or MiB, so that a
// provider that rounds sizes is caught.
const OddSize = 5<<20 + 3*512

// Env is what one subtest runs against.
type Env struct {
	Provider drivers.Provider
	Spec     drivers.StoreSpec
	// Client is an Up host in Spec.Scope that can reach the store once it
	// is attached (required).
	Client string
	// Remote is an Up host outside Spec.Scope, "" when there is none: the
	// suite then skips the checks of access from outside the scope.
	Remote string
	// Hosts is the selector the provider was built with, nil for a
	// provider that needs no hosts; with it the suite runs host steps
	// itself where a workflow would (a backup through BackupAccess).
	Hosts hostops.Selector
}

// Run runs the conformance suite against the Env setup returns, as
// subtests of a test called name.
func Run(t *testing.T, name string, setup func(t *testing.T) Env) {
	t.Helper()
	cases := []struct {
		name string
		fn   func(t *testing.T, e Env)
	}{
		{"Provider", testProvider},
		{"InitializeAttach", testInitializeAttach},
		{"ListObjectsEmpty", testListObjectsEmpty},
		{"Locate", testLocate},
		{"VolumeLifecycle", testVolumeLifecycle},
		{"Copy", testCopy},
		{"Access", testAccess},
		{"Snapshot", testSnapshot},
		{"Resize", testResize},
		{"Import", testImport},
		{"Clone", testClone},
		{"Rebase", testRebase},
		{"ChunkTarget", testChunkTarget},
		{"ChunkCollector", testChunkCollector},
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
				e := setup(t)
				if e.Provider == nil || e.Client == "" {
					t.Fatal("setup returned an Env without a Provider or a Client host")
				}
				c.fn(t, e)
			})
		}
	})
}

func testProvider(t *testing.T, e Env) {
	p, spec := e.Provider, e.Spec
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
	var has []string
	d := p.Driver()
	for name, ok := range map[string]bool{
		"Resizer": is[drivers.Resizer](d), "Cloner": is[drivers.Cloner](d), "Importer": is[drivers.Importer](d),
		"Rebaser": is[drivers.Rebaser](d), "ChunkTarget": is[drivers.ChunkTarget](d),
		"ChunkCollector": is[drivers.ChunkCollector](d), "HostRooted": is[drivers.HostRooted](p),
	} {
		if ok {
			has = append(has, name)
		}
	}
	slices.Sort(has)
	t.Logf("%s implements %v", p.Name(), has)
}

func is[T any](v any) bool { _, ok := v.(T); return ok }

// capability returns the driver of e as T, or skips the test naming T.
func capability[T any](t *testing.T, e Env, name string) T {
	t.Helper()
	c, ok := e.Provider.Driver().(T)
	if !ok {
		t.Skipf("%s: the driver %T does not implement drivers.%s (the workflows route around it)", e.Provider.Name(), e.Provider.Driver(), name)
	}
	return c
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

// attached initialises and attaches e's store.
func attached(t *testing.T, e Env) drivers.StoreInfo {
	t.Helper()
	info := initialize(t, e.Provider, e.Spec)
	hosts, err := e.Provider.LifeCycle().Attach(t.Context(), info, e.Spec.Scope)
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	if !slices.Contains(hosts, e.Client) {
		t.Fatalf("Attach = %q, does not hold the client host %s", hosts, e.Client)
	}
	return info
}

func testInitializeAttach(t *testing.T, e Env) {
	p, spec := e.Provider, e.Spec
	info := initialize(t, p, spec)
	if info.ID != spec.ID || info.Role != spec.Role || info.URL != spec.URL || info.Scope != spec.Scope || info.Name != spec.Name {
		t.Errorf("StoreInfo %+v does not carry the spec %+v", info, spec)
	}
	if info.Provider != p.Name() {
		t.Errorf("StoreInfo.Provider = %q, want %q", info.Provider, p.Name())
	}
	// 0/0 is "unknown" (an object store has no capacity to report).
	if info.CapacityBytes < 0 || info.AvailableBytes < 0 || info.AvailableBytes > info.CapacityBytes ||
		info.CapacityBytes == 0 && info.AvailableBytes != 0 {
		t.Errorf("capacity %d, available %d: want 0 <= available <= capacity (0/0: unknown)", info.CapacityBytes, info.AvailableBytes)
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
	if e.Remote != "" && slices.Contains(hosts, e.Remote) {
		t.Errorf("Attach = %q holds %s, a host outside the store's scope", hosts, e.Remote)
	}
}

func testListObjectsEmpty(t *testing.T, e Env) {
	info := initialize(t, e.Provider, e.Spec)
	objs, err := e.Provider.Driver().ListObjects(t.Context(), info)
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

// located returns obj with the key its driver gives it, as the controller
// records it before any work starts.
func located(t *testing.T, d drivers.Driver, obj drivers.DataObject) drivers.DataObject {
	t.Helper()
	key, err := d.Locate(obj)
	if err != nil {
		t.Fatalf("Locate(%s %s): %v", obj.Type, obj.ID, err)
	}
	if key == "" {
		t.Fatalf("Locate(%s %s) returned an empty key", obj.Type, obj.ID)
	}
	obj.Key = key
	return obj
}

// create creates a blank volume with its key recorded, or fails the test.
func create(t *testing.T, d drivers.Driver, obj drivers.DataObject) drivers.DataObject {
	t.Helper()
	obj = located(t, d, obj)
	got, err := d.Create(t.Context(), obj)
	if err != nil {
		t.Fatalf("Create(%s %s): %v", obj.Type, obj.ID, err)
	}
	if got.Key != obj.Key {
		t.Errorf("Create(%s) = key %q, Locate said %q", obj.ID, got.Key, obj.Key)
	}
	return obj
}

// wantSize checks that obj exists with virtual size want.
func wantSize(t *testing.T, d drivers.Driver, obj drivers.DataObject, want int64, what string) drivers.ObjectInfo {
	t.Helper()
	info, err := d.Stat(t.Context(), obj)
	if err != nil {
		t.Fatalf("%s: Stat(%s %s): %v", what, obj.Type, obj.ID, err)
	}
	if info.Size != want {
		t.Errorf("%s: Stat(%s %s).Size = %d, want %d", what, obj.Type, obj.ID, info.Size, want)
	}
	return info
}

// wantGone checks that obj is not on its store.
func wantGone(t *testing.T, d drivers.Driver, obj drivers.DataObject, what string) {
	t.Helper()
	if info, err := d.Stat(t.Context(), obj); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("%s: Stat(%s %s) = %+v, %v; want ErrNotFound", what, obj.Type, obj.ID, info, err)
	}
	objs, err := d.ListObjects(t.Context(), obj.Store)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if o.Key == obj.Key {
			t.Errorf("%s: ListObjects shows %+v", what, o)
		}
	}
}

// remove deletes obj, failing the test on an error.
func remove(t *testing.T, d drivers.Driver, obj drivers.DataObject) {
	t.Helper()
	if err := d.Delete(t.Context(), obj); err != nil {
		t.Errorf("Delete(%s %s): %v", obj.Type, obj.ID, err)
	}
}

func testDeleteEmptyStore(t *testing.T, e Env) {
	p, spec := e.Provider, e.Spec
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

func testBadURLs(t *testing.T, e Env) {
	p, spec := e.Provider, e.Spec
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

func testReinitialize(t *testing.T, e Env) {
	p, spec := e.Provider, e.Spec
	first := initialize(t, p, spec)
	var vol drivers.DataObject
	if spec.Role == drivers.RolePrimary {
		obj, err := p.Driver().Create(t.Context(), blankVolume(first, "vol-keep", OddSize))
		if err != nil {
			t.Fatalf("Create: %v", err)
		}
		vol = blankVolume(first, obj.ID, obj.Size)
		vol.Key = obj.Key
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

func testOwnedByAnotherStore(t *testing.T, e Env) {
	p, spec := e.Provider, e.Spec
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

func testMaintenance(t *testing.T, e Env) {
	p, spec := e.Provider, e.Spec
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

func testCanceledContext(t *testing.T, e Env) {
	p, spec := e.Provider, e.Spec
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

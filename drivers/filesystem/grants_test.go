package filesystem

import (
	"context"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/driverstest"
)

// TestListGrants: the exports GrantAccess made for a host outside the
// scope, on two hosts that serve the store, are listed with the task they
// were made under; RevokeAccess with a listed Access (URI, host, nothing
// else) ends the export, and a host that is not Up is not asked.
func TestListGrants(t *testing.T) {
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
	lister, ok := drv.(drivers.GrantLister)
	if !ok {
		t.Fatal("the filesystem driver is no GrantLister")
	}
	ctx := t.Context()
	obj := drivers.DataObject{ID: "v1", Type: drivers.ObjectVolume, Store: info, Format: drivers.FormatRaw, Size: 1 << 20}
	o, err := drv.Create(ctx, obj)
	if err != nil {
		t.Fatal(err)
	}
	obj.Key = o.Key
	if grants, err := lister.ListGrants(ctx, info); err != nil || len(grants) != 0 {
		t.Fatalf("before any grant: %+v %v", grants, err)
	}

	before := time.Now()
	step := func(id, host string) context.Context { return drivers.WithHost(drivers.WithTaskID(ctx, id), host) }
	read := drivers.Client{HostID: "h2", Purpose: drivers.PurposeRead}
	httpA, err := drv.GrantAccess(step("job-1.copy", "h1"), obj, read)
	if err != nil {
		t.Fatal(err)
	}
	// A second grant of the same object on the same host shares the export.
	httpB, err := drv.GrantAccess(step("job-3.copy", "h1"), obj, read)
	if err != nil || httpB.URI != httpA.URI {
		t.Fatalf("second read grant: %+v %v", httpB, err)
	}
	nbdA, err := drv.GrantAccess(step("job-2.attach", "h3"), obj, drivers.Client{HostID: "h2", Purpose: drivers.PurposeAttach})
	if err != nil || nbdA.HostID != "h3" {
		t.Fatalf("attach grant: %+v %v", nbdA, err)
	}

	grants, err := lister.ListGrants(ctx, info)
	if err != nil {
		t.Fatal(err)
	}
	if len(grants) != 2 {
		t.Fatalf("listed %d grants, want 2: %+v", len(grants), grants)
	}
	gh, gn := grants[0], grants[1] // sorted by host: h1, h3
	if gh.Access.URI != httpA.URI || gh.Access.HostID != "h1" || !gh.Access.Revocable || !gh.Access.ReadOnly ||
		gh.Key != obj.Key || gh.TaskID != "job-1.copy" || !slices.Equal(gh.SharedWith, []string{"job-3.copy"}) {
		t.Errorf("HTTP grant listed as %+v, want %+v made under job-1.copy and shared with job-3.copy", gh, httpA)
	}
	if d := gh.Access.Expires.Sub(httpB.Expires); d < -time.Minute || d > time.Minute {
		t.Errorf("HTTP grant expires %v, granted until %v", gh.Access.Expires, httpB.Expires)
	}
	if gn.Access.URI != nbdA.URI || gn.Access.HostID != "h3" || !gn.Access.Revocable || gn.Access.ReadOnly || !gn.Access.Expires.IsZero() ||
		gn.Key != obj.Key || gn.TaskID != "job-2.attach" || gn.SharedWith != nil {
		t.Errorf("NBD grant listed as %+v, want %+v made under job-2.attach", gn, nbdA)
	}
	for _, g := range grants {
		if g.Created.Before(before.Add(-time.Second)) || g.Created.After(time.Now()) {
			t.Errorf("grant %s created %v", g.TaskID, g.Created)
		}
	}

	// The orphan reconciler revokes with what it listed and a bare object
	// of the store.
	orphan := drivers.DataObject{Store: info, Key: gn.Key}
	if err := drv.RevokeAccess(ctx, orphan, drivers.Client{}, gn.Access); err != nil {
		t.Fatal(err)
	}
	if c, err := nbd.Dial(ctx, string(nbdA.URI), nbd.ClientOptions{}); err == nil {
		c.Close()
		t.Fatal("the revoked NBD export still opens")
	}
	grants, err = lister.ListGrants(ctx, info)
	if err != nil || len(grants) != 1 || grants[0].Access.URI != httpA.URI {
		t.Fatalf("after revoking the NBD grant: %+v %v", grants, err)
	}
	// The HTTP export has two grants: it ends at the second revoke.
	for i := range 2 {
		if err := drv.RevokeAccess(ctx, orphan, drivers.Client{}, gh.Access); err != nil {
			t.Fatal(err)
		}
		grants, err = lister.ListGrants(ctx, info)
		if err != nil || len(grants) != 1-i {
			t.Fatalf("after revoke %d of the HTTP grant: %+v %v", i+1, grants, err)
		}
	}
	resp, err := http.Get(string(httpA.URI))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("the revoked HTTP export answers %d", resp.StatusCode)
	}

	// A host that is not Up is not asked: its exports come back with it.
	if _, err := drv.GrantAccess(step("job-4.copy", "h3"), obj, read); err != nil {
		t.Fatal(err)
	}
	hosts.SetUp("h3", false)
	if grants, err := lister.ListGrants(ctx, info); err != nil || len(grants) != 0 {
		t.Fatalf("with h3 down: %+v %v", grants, err)
	}
	hosts.SetUp("h3", true)
	if grants, err := lister.ListGrants(ctx, info); err != nil || len(grants) != 1 || grants[0].TaskID != "job-4.copy" || grants[0].Access.HostID != "h3" {
		t.Fatalf("with h3 up again: %+v %v", grants, err)
	}
	// Another store's grants are not this store's.
	other := info
	other.ID = "s2"
	if grants, err := lister.ListGrants(ctx, other); err != nil || len(grants) != 0 {
		t.Fatalf("store s2: %+v %v", grants, err)
	}
}

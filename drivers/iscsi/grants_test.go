package iscsi

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stowage/stowage/agent/agenttest"
	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/driverstest"
	"github.com/stowage/stowage/hostops"
)

// TestListGrantsOfNBDFallback: the NBD export a target host makes for a
// host that cannot log in (what GrantAccess falls back to) is listed with
// its task, and RevokeAccess with the listed Access ends it. The target
// host is the agent's own LocalHost with a real NBD server on loopback
// (agenttest).
func TestListGrantsOfNBDFallback(t *testing.T) {
	target := agenttest.LocalHost(t, "t1", agenttest.Config{})
	hosts := driverstest.NewHosts(target)
	hosts.Place("t1", "z1", "")

	dir := filepath.Join(t.TempDir(), "san1")
	info := drivers.StoreInfo{ID: "san1", URL: "iscsi://127.0.0.1/iqn.2026-12.org.example:san1",
		Details: map[string]string{DetailTargetHost: "t1", DetailBackingDir: dir}}
	s, err := storeOf(info)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := target.PrepareStore(t.Context(), s.root()); err != nil {
		t.Fatal(err)
	}
	key := "luns/volume-v1.lun"
	if err := os.WriteFile(filepath.Join(dir, key), make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	// The export GrantAccess makes for a host without an initiator.
	uri, err := target.ExportNBD(drivers.WithTaskID(t.Context(), "job-5.attach"),
		hostops.NBDExportRequest{Ref: hostops.Ref{Store: "san1", Key: key}, Format: drivers.FormatRaw})
	if err != nil {
		t.Fatal(err)
	}

	drv := New(hosts).Driver()
	grants, err := drv.(drivers.GrantLister).ListGrants(t.Context(), info)
	if err != nil {
		t.Fatal(err)
	}
	if len(grants) != 1 || grants[0].Access.URI != uri || grants[0].Access.HostID != "t1" || !grants[0].Access.Revocable ||
		grants[0].Key != key || grants[0].TaskID != "job-5.attach" || grants[0].Created.IsZero() {
		t.Fatalf("listed %+v", grants)
	}
	if err := drv.RevokeAccess(t.Context(), drivers.DataObject{Store: info, Key: key}, drivers.Client{}, grants[0].Access); err != nil {
		t.Fatal(err)
	}
	if c, err := nbd.Dial(t.Context(), string(uri), nbd.ClientOptions{}); err == nil {
		c.Close()
		t.Fatal("the revoked export still opens")
	}
	if grants, err := drv.(drivers.GrantLister).ListGrants(t.Context(), info); err != nil || len(grants) != 0 {
		t.Fatalf("after the revoke: %+v %v", grants, err)
	}
}

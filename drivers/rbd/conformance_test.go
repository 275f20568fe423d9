//go:build ceph

package rbd

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/stowage/stowage/agent"
	"github.com/stowage/stowage/agent/agenttest"
	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/drivers/driverstest"
)

// localHost is the agent's own host work on this machine, its NBD exports
// able to serve RBD images through qemu-storage-daemon: the provider's
// grants are served by real host work.
func localHost(t *testing.T, id string) *agent.LocalHost {
	return agenttest.LocalHost(t, id, agenttest.Config{QSD: true})
}

var pools atomic.Int64

// freshPool makes a new pool (one pool is one store) and removes it when
// the test ends.
func freshPool(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("conf%d", pools.Add(1))
	ceph := func(args ...string) {
		t.Helper()
		args = append([]string{"--conf", filepath.Join(cephDir, "ceph.conf"), "--keyring", filepath.Join(cephDir, "keyring.client.admin")}, args...)
		if out, err := exec.Command("ceph", args...).CombinedOutput(); err != nil {
			t.Fatalf("ceph %v: %v\n%s", args, err, out)
		}
	}
	ceph("osd", "pool", "create", name, "8", "8")
	ceph("osd", "pool", "application", "enable", name, "rbd")
	t.Cleanup(func() {
		args := []string{"--conf", filepath.Join(cephDir, "ceph.conf"), "--keyring", filepath.Join(cephDir, "keyring.client.admin"),
			"osd", "pool", "rm", name, name, "--yes-i-really-really-mean-it"}
		_ = exec.Command("ceph", args...).Run()
	})
	return name
}

func init() { nbd.Register() }

// TestConformance runs the driver conformance suite against the rbd
// provider on the real one-node cluster, one pool per subtest, with a
// real agent host (h1, in scope) serving its NBD grants and h2 outside
// the scope.
func TestConformance(t *testing.T) {
	mon := monHost(t)
	driverstest.Run(t, "rbd", func(t *testing.T) driverstest.Env {
		hosts := driverstest.NewHosts(localHost(t, "h1"), localHost(t, "h2"))
		hosts.Place("h1", "z1", "")
		hosts.Place("h2", "z2", "")
		pool := freshPool(t)
		return driverstest.Env{
			Provider: New(hosts),
			Spec: drivers.StoreSpec{ID: "s-" + pool, Name: "rbd-" + pool, Role: drivers.RolePrimary,
				URL:     "rbd://" + pool + "?mon_host=" + mon + "&id=admin",
				Details: map[string]string{"keyring": filepath.Join(cephDir, "keyring.client.admin")}, Scope: drivers.Scope{Zone: "z1"}},
			Client: "h1", Remote: "h2", Hosts: hosts,
		}
	})
}

// Package agenttest gives other packages' tests the agent's own host work
// on this machine: an agent.LocalHost over agent/hostfs, allowed to serve
// stores under the temporary directory, with an HTTP and an NBD export
// server on loopback, so that a driver's tests run against real host work.
// It imports "testing" on purpose and must not be linked into binaries.
package agenttest

import (
	"context"
	"net"
	"net/http/httptest"
	"os"
	"testing"

	"github.com/stowage/stowage/agent"
	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/agent/nbdexports"
)

// Config is what LocalHost builds.
type Config struct {
	// QSD has the NBD exports serve qcow2 and RBD images through
	// qemu-storage-daemon (a run directory of their own).
	QSD bool
	// Host are options of the host's hostfs.
	Host []hostfs.Option
}

// LocalHost returns host id on this machine, serving exports until the
// test ends.
func LocalHost(t testing.TB, id string, cfg Config) *agent.LocalHost {
	t.Helper()
	x := exports.New()
	srv := httptest.NewServer(x)
	t.Cleanup(srv.Close)
	x.SetBaseURL(srv.URL)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var nopts []nbdexports.Option
	if cfg.QSD {
		run, err := os.MkdirTemp("", "qsd") // unix socket paths must stay short
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(run) })
		nopts = append(nopts, nbdexports.WithQcow2(run, ""))
	}
	nx := nbdexports.New(nil, nopts...)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = nx.Serve(ctx, ln) }()
	nx.SetAddress(ln.Addr().String())
	t.Cleanup(func() { cancel(); _ = nx.Close(); <-done })

	policy, err := agent.NewRootPolicy([]string{os.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	opts := append(append([]hostfs.Option(nil), cfg.Host...), hostfs.WithExporter(x), hostfs.WithNBDExporter(nx))
	return agent.NewLocalHost(hostfs.New(id, opts...), policy)
}

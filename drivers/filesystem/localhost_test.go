package filesystem

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

// localHost is the agent's own hostops.Host (agent.LocalHost over
// agent/hostfs) on this machine, allowed to serve stores under the test's
// temporary directories, with an HTTP and an NBD export server on
// loopback: the provider runs against the real host work.
type localHost struct {
	*agent.LocalHost
}

// newLocalHost returns host id on this machine, built with opts, serving
// exports until the test ends.
func newLocalHost(t *testing.T, id string, opts ...hostfs.Option) *localHost {
	t.Helper()
	x := exports.New()
	srv := httptest.NewServer(x)
	t.Cleanup(srv.Close)
	x.SetBaseURL(srv.URL)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	nx := nbdexports.New(nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = nx.Serve(ctx, ln) }()
	nx.SetAddress(ln.Addr().String())
	t.Cleanup(func() { cancel(); _ = nx.Close(); <-done })

	policy, err := agent.NewRootPolicy([]string{os.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	opts = append(opts, hostfs.WithExporter(x), hostfs.WithNBDExporter(nx))
	return &localHost{agent.NewLocalHost(hostfs.New(id, opts...), policy)}
}

// withMount gives h a template mount at dir.
func (h *localHost) withMount(dir string) *localHost {
	h.SetTemplateMount(dir)
	return h
}

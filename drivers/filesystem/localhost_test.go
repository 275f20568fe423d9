package filesystem

import (
	"testing"

	"github.com/stowage/stowage/agent"
	"github.com/stowage/stowage/agent/agenttest"
	"github.com/stowage/stowage/agent/hostfs"
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
	return &localHost{agenttest.LocalHost(t, id, agenttest.Config{Host: opts})}
}

// withMount gives h a template mount at dir.
func (h *localHost) withMount(dir string) *localHost {
	h.SetTemplateMount(dir)
	return h
}

package agent

import (
	"fmt"
	"net/http"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/failover"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// newControlClient is the agent's client of the controllers in list (one
// URL, or several comma-separated: it follows whichever leads, see
// package failover), over the HTTP client c.
func newControlClient(c *http.Client, list string) (stowagev1connect.AgentControlServiceClient, error) {
	base := c.Transport
	if base == nil {
		base = http.DefaultTransport
	}
	tr, err := failover.New(base, failover.Split(list))
	if err != nil {
		return nil, fmt.Errorf("agent: --controller: %w: %w", err, errdefs.ErrInvalid)
	}
	fc := *c
	fc.Transport = tr
	return stowagev1connect.NewAgentControlServiceClient(&fc, tr.BaseURL()), nil
}

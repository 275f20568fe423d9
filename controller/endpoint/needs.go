package endpoint

import (
	"context"
	"fmt"
	"strings"

	"github.com/stowage/stowage/drivers"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// has says whether h reported cap.
func has(h *stowagev1.Host, c drivers.Capability) bool {
	caps := h.GetCapabilities()
	switch c {
	case drivers.CapISCSIUserspace:
		return caps.GetIscsiUserspace()
	case drivers.CapISCSIKernel:
		return caps.GetIscsiInitiator()
	case drivers.CapRBDExport:
		return caps.GetRbdExport()
	}
	return false
}

// missing returns the capabilities of ctx (drivers.WithNeeds) h lacks.
func missing(ctx context.Context, h *stowagev1.Host) []string {
	var out []string
	for _, c := range drivers.NeedsFrom(ctx) {
		if !has(h, c) {
			out = append(out, string(c))
		}
	}
	return out
}

// needsText says what ctx's needs are, for errors.
func needsText(ctx context.Context) string {
	var names []string
	for _, c := range drivers.NeedsFrom(ctx) {
		names = append(names, string(c))
	}
	return fmt.Sprintf("has %s (see `stowage host get`)", strings.Join(names, " and "))
}

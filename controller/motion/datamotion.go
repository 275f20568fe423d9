package motion

import (
	"context"
	"fmt"
	"strings"

	"github.com/stowage/stowage/controller/endpoint"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// MotionRequest asks how to move an object's bytes from one store to another.
type MotionRequest struct {
	From, To drivers.Scope
	// Native says the destination store's driver copies the object itself
	// (Driver.CanCopy: reflink inside one filesystem store, server-side
	// copy inside one bucket).
	Native bool
	// Standalone says the source is one self-contained file (no backing
	// chain on its store), so it can travel as a plain file between hosts.
	Standalone bool
	// Flatten says the destination is a standalone image: a chain is read
	// through, so it can travel between hosts as its guest view.
	Flatten bool
}

// HostPicker is the EndPointSelector as strategies see it.
type HostPicker interface {
	Select(ctx context.Context, prefer string, scopes ...drivers.Scope) (endpoint.Choice, error)
}

// DataMotionStrategy is one way of moving bytes between two stores.
type DataMotionStrategy interface {
	Name() string
	// CanHandle says how well the strategy can move req's bytes, and why;
	// the hosts it would use are named in the reason.
	CanHandle(ctx context.Context, req MotionRequest, hosts HostPicker) (Priority, string)
}

// MotionStrategies are the built-in data motion strategies, best first on a tie.
var MotionStrategies = []DataMotionStrategy{driverNative{}, sameHost{}, agentToAgent{}}

// Strategy names, for executors.
const (
	DriverNative = "driver-native"
	SameHost     = "same-host"
	AgentToAgent = "agent-to-agent"
)

type driverNative struct{}

func (driverNative) Name() string { return DriverNative }
func (driverNative) CanHandle(ctx context.Context, req MotionRequest, hosts HostPicker) (Priority, string) {
	if !req.Native {
		return CantHandle, "the destination store's driver cannot copy it itself (CanCopy is false)"
	}
	return Highest, "the destination store's driver copies it itself (reflink or server-side copy): no byte through a host's stream"
}

type sameHost struct{}

func (sameHost) Name() string { return SameHost }
func (sameHost) CanHandle(ctx context.Context, req MotionRequest, hosts HostPicker) (Priority, string) {
	ch, err := hosts.Select(ctx, "", req.From, req.To)
	if err != nil {
		return CantHandle, "no single Up host reaches both stores"
	}
	return Highest, ch.Reason + " reaches both stores: one local copy"
}

type agentToAgent struct{}

func (agentToAgent) Name() string { return AgentToAgent }
func (agentToAgent) CanHandle(ctx context.Context, req MotionRequest, hosts HostPicker) (Priority, string) {
	if !req.Standalone && !req.Flatten {
		return CantHandle, "the source reads through a backing chain, and the copy keeps it: an export of one file does not carry the chain"
	}
	src, err := hosts.Select(ctx, "", req.From)
	if err != nil {
		return CantHandle, "no Up host reaches the source: " + err.Error()
	}
	dst, err := hosts.Select(ctx, "", req.To)
	if err != nil {
		return CantHandle, "no Up host reaches the destination: " + err.Error()
	}
	what := "the source as stored"
	if !req.Standalone {
		what = "the source's guest view (its backing chain read through there: the copy is flattened)"
	}
	return Default, fmt.Sprintf("%s exports %s read-only over NBD, %s pulls it with block status (holes never sent; never through an image store)", src.HostID, what, dst.HostID)
}

// MotionDecision is the data motion strategy that won, with every answer.
type MotionDecision struct {
	Strategy DataMotionStrategy
	Priority Priority
	Reasons  []string
}

// PickMotion asks every strategy and returns the strictly best; none able
// is ErrFailedPrecondition with every refusal.
func PickMotion(ctx context.Context, req MotionRequest, hosts HostPicker) (MotionDecision, error) {
	var d MotionDecision
	for _, s := range MotionStrategies {
		p, why := s.CanHandle(ctx, req, hosts)
		d.Reasons = append(d.Reasons, fmt.Sprintf("data motion %s: %s (%s)", s.Name(), p, why))
		if p > d.Priority {
			d.Strategy, d.Priority = s, p
		}
	}
	if d.Strategy == nil {
		return d, fmt.Errorf("no data motion strategy can move the bytes: %s: %w", strings.Join(d.Reasons, "; "), errdefs.ErrFailedPrecondition)
	}
	return d, nil
}

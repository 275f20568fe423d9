package api

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync/atomic"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/failover"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// LeaderGate lets a controller that does not lead serve reads only: every
// other call is refused with "unavailable", naming the leader's URL in the
// failover.LeaderHeader response header (and the message), which agents and
// the CLI follow. Reads are the methods named Get..., List... and Watch...,
// and MetadataService.Backup; a follower reads the shared metadata store
// as the leader does.
type LeaderGate struct {
	leading atomic.Bool
	leader  func(ctx context.Context) (string, error)
}

// NewLeaderGate returns a gate that does not lead yet; leader says who
// does.
func NewLeaderGate(leader func(ctx context.Context) (string, error)) *LeaderGate {
	return &LeaderGate{leader: leader}
}

// SetLeading opens (true) or closes the gate to writes.
func (g *LeaderGate) SetLeading(on bool) { g.leading.Store(on) }

// Leading reports whether this controller leads.
func (g *LeaderGate) Leading() bool { return g.leading.Load() }

// readProcedures are the reads not named Get, List or Watch.
var readProcedures = map[string]bool{
	stowagev1connect.MetadataServiceBackupProcedure: true, // one consistent read of the store
}

// readOnly reports whether procedure ("/pkg.Service/Method") only reads.
func readOnly(procedure string) bool {
	if readProcedures[procedure] || slices.Contains(ReflectionProcedures, procedure) || slices.Contains(HealthProcedures, procedure) {
		return true
	}
	m := procedure[strings.LastIndexByte(procedure, '/')+1:]
	for _, p := range []string{"Get", "List", "Watch"} {
		if strings.HasPrefix(m, p) {
			return true
		}
	}
	return false
}

// refuse is the error of a write sent to a follower.
func (g *LeaderGate) refuse(ctx context.Context, procedure string) error {
	if g.leading.Load() || readOnly(procedure) {
		return nil
	}
	who, err := g.leader(ctx)
	msg := "this controller does not lead; "
	switch {
	case err != nil:
		msg += "who leads is not known (" + err.Error() + ")"
	case who == "":
		msg += "no controller leads at the moment (an election is under way): retry"
	default:
		msg += "the leader is " + who
	}
	cerr := connect.NewError(connect.CodeUnavailable, errors.New(msg))
	if who != "" {
		cerr.Meta().Set(failover.LeaderHeader, who)
	}
	return cerr
}

func (g *LeaderGate) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if err := g.refuse(ctx, req.Spec().Procedure); err != nil {
			return nil, err
		}
		return next(ctx, req)
	}
}

func (g *LeaderGate) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (g *LeaderGate) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		if err := g.refuse(ctx, conn.Spec().Procedure); err != nil {
			return err
		}
		return next(ctx, conn)
	}
}

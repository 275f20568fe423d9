package main

import (
	"context"
	"log/slog"

	"github.com/stowage/stowage/agent"
	"github.com/stowage/stowage/agent/iscsi/connector"
	"github.com/stowage/stowage/agent/iscsi/tgt"
	"github.com/stowage/stowage/datapath/iscsi"
)

// lunIO is the agent's userspace initiator: datapath/iscsi's qemu-img
// through libiscsi.
type lunIO struct{}

func (lunIO) Convert(ctx context.Context, src, srcFormat, dst, dstFormat string, dstIsZero bool, progress func(done, total int64)) error {
	return iscsi.Convert(ctx, src, srcFormat, dst, dstFormat, dstIsZero, progress)
}

// kernelInitiator is the host's open-iscsi connector when the kernel path
// works here (iscsiadm, iscsi_tcp, iscsid), with the sessions it finds
// adopted: Connect reuses them instead of logging in twice. Else nil, and
// the reason is logged.
func kernelInitiator(ctx context.Context, log *slog.Logger) agent.Connector {
	c := connector.New(connector.WithLogger(log.With("component", "iscsi-connector")))
	if ok, why := c.Available(ctx); !ok {
		log.Info("kernel iSCSI initiator unavailable; LUNs are reached from userspace or over NBD", "reason", why)
		return nil
	}
	if ss, err := c.Adopt(ctx); err == nil && len(ss) > 0 {
		log.Info("adopted iSCSI sessions found at start", "sessions", len(ss))
	}
	return grantConnector{c}
}

// grantConnector is the connector addressed by LUN grants (iscsi://…).
type grantConnector struct{ c *connector.Connector }

func targetOf(grant string) (connector.Target, error) {
	t, err := iscsi.ParseGrant(grant)
	if err != nil {
		return connector.Target{}, err
	}
	return connector.Target{Portal: t.Portal, IQN: t.IQN, LUN: t.LUN, CHAPUser: t.User, CHAPSecret: t.Secret, Initiator: t.Initiator}, nil
}

func (g grantConnector) Connect(ctx context.Context, grant string) (string, error) {
	t, err := targetOf(grant)
	if err != nil {
		return "", err
	}
	d, err := g.c.Connect(ctx, t)
	return d.Path, err
}

func (g grantConnector) Disconnect(ctx context.Context, grant string) error {
	t, err := targetOf(grant)
	if err != nil {
		return err
	}
	return g.c.Disconnect(ctx, t, nil)
}

// iscsiOptions give the agent its iSCSI parts: the LUN manager of tgtd
// when it is a target host (--iscsi-target), the userspace initiator
// (--iscsi-userspace) and the kernel initiator where it works.
func iscsiOptions(cfg agent.Config, log *slog.Logger) []agent.Option {
	var m agent.LUNManager
	if cfg.ISCSITarget {
		m = tgt.New(tgt.WithControlPort(cfg.TGTControlPort), tgt.WithLogger(log.With("component", "tgt")))
	}
	var io agent.LUNIO
	if cfg.ISCSIUserspace {
		io = lunIO{}
	}
	return []agent.Option{agent.WithLUNs(m, io), agent.WithConnector(kernelInitiator(context.Background(), log))}
}

package main

import (
	"context"
	"log/slog"

	"github.com/stowage/stowage/agent"
	"github.com/stowage/stowage/agent/iscsi/tgt"
	"github.com/stowage/stowage/datapath/iscsi"
)

// lunIO is the agent's userspace initiator: datapath/iscsi's qemu-img
// through libiscsi.
type lunIO struct{}

func (lunIO) Convert(ctx context.Context, src, srcFormat, dst, dstFormat string, dstIsZero bool, progress func(done, total int64)) error {
	return iscsi.Convert(ctx, src, srcFormat, dst, dstFormat, dstIsZero, progress)
}

// iscsiOption gives the agent its iSCSI parts: the LUN manager of tgtd
// when it is a target host (--iscsi-target), and the userspace initiator
// (--iscsi-userspace).
func iscsiOption(cfg agent.Config, log *slog.Logger) agent.Option {
	var m agent.LUNManager
	if cfg.ISCSITarget {
		m = tgt.New(tgt.WithControlPort(cfg.TGTControlPort), tgt.WithLogger(log.With("component", "tgt")))
	}
	var io agent.LUNIO
	if cfg.ISCSIUserspace {
		io = lunIO{}
	}
	return agent.WithLUNs(m, io)
}

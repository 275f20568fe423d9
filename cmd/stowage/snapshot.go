package main

import (
	"context"
	"fmt"
	"io"

	"google.golang.org/protobuf/proto"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func newSnapshotCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "snapshot", Short: "Take, revert, back up and delete volume snapshots"}
	cmd.AddCommand(newSnapshotTakeCmd(), newSnapshotListCmd(),
		getCmd("get ID", "Show a snapshot and where its copies are", snapshotView),
		jobCmd("revert ID", "Make the volume read what the snapshot holds", snapshotView, false,
			func(ctx context.Context, c *clients, id string, f *jobFlags) (jobResponse, error) {
				return started(c.snapshots.RevertSnapshot(ctx, connect.NewRequest(&stowagev1.RevertSnapshotRequest{Id: id, DryRun: f.dryRun})))
			}),
		jobCmd("delete ID", "Delete a snapshot (one a later snapshot still needs is hidden)", view{kind: "snapshot"}, false,
			func(ctx context.Context, c *clients, id string, f *jobFlags) (jobResponse, error) {
				return started(c.snapshots.DeleteSnapshot(ctx, connect.NewRequest(&stowagev1.DeleteSnapshotRequest{Id: id, DryRun: f.dryRun})))
			}),
		newSnapshotBackupCmd(), newSnapshotAccessCmd())
	return cmd
}

func newSnapshotAccessCmd() *cobra.Command {
	return accessCmd("snapshot", "Print the URI a host reads the snapshot with (read-only), or revoke the host's access",
		func(ctx context.Context, c *clients, id, host string, ttl int64) (proto.Message, string, error) {
			resp, err := c.snapshots.GrantSnapshotAccess(ctx, connect.NewRequest(&stowagev1.GrantSnapshotAccessRequest{Id: id, HostId: host, TtlSeconds: ttl}))
			if err != nil {
				return nil, "", err
			}
			return resp.Msg, resp.Msg.GetUri(), nil
		},
		func(ctx context.Context, c *clients, id, host string) (proto.Message, error) {
			resp, err := c.snapshots.RevokeSnapshotAccess(ctx, connect.NewRequest(&stowagev1.RevokeSnapshotAccessRequest{Id: id, HostId: host}))
			if err != nil {
				return nil, err
			}
			return resp.Msg, nil
		})
}

var snapshotView = newView("snapshot", func(ctx context.Context, c *clients, id string) (*stowagev1.GetSnapshotResponse, error) {
	return msgOf(c.snapshots.GetSnapshot(ctx, connect.NewRequest(&stowagev1.GetSnapshotRequest{Id: id})))
}, printSnapshot)

func newSnapshotTakeCmd() *cobra.Command {
	var f jobFlags
	var name string
	cmd := &cobra.Command{
		Use:   "take VOLUME [--name N]",
		Short: "Take a snapshot of a volume",
		Args:  exactArgs(1, "a volume id"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runJob(cmd, &f, snapshotView, "", func(ctx context.Context, c *clients) (jobResponse, error) {
				return started(c.snapshots.TakeSnapshot(ctx, connect.NewRequest(&stowagev1.TakeSnapshotRequest{
					VolumeId: args[0], Name: name, DryRun: f.dryRun, IdempotencyKey: f.key,
				})))
			})
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "snapshot name")
	f.register(cmd, true)
	return cmd
}

func newSnapshotBackupCmd() *cobra.Command {
	var store string
	cmd := jobCmd("backup ID [--store S]", "Copy a snapshot into an image store, incremental against the volume's previous backup", snapshotView, true,
		func(ctx context.Context, c *clients, id string, f *jobFlags) (jobResponse, error) {
			return started(c.snapshots.BackupSnapshot(ctx, connect.NewRequest(&stowagev1.BackupSnapshotRequest{
				Id: id, StoreId: store, DryRun: f.dryRun, IdempotencyKey: f.key,
			})))
		})
	cmd.Flags().StringVar(&store, "store", "", "image store id or name (default: the parent backup's, or the one with the most free space)")
	return cmd
}

func newSnapshotListCmd() *cobra.Command {
	var volume string
	cmd := listCmd("list [--volume V]", "List snapshots", []string{"ID", "NAME", "VOLUME", "STATE", "KIND", "METHOD", "PARENT"},
		func(ctx context.Context, c *clients) (*stowagev1.ListSnapshotsResponse, error) {
			return allPages(ctx, func(ctx context.Context, token string) (*stowagev1.ListSnapshotsResponse, error) {
				return msgOf(c.snapshots.ListSnapshots(ctx, connect.NewRequest(&stowagev1.ListSnapshotsRequest{VolumeId: volume, PageToken: token})))
			})
		}, (*stowagev1.ListSnapshotsResponse).GetSnapshots,
		func(s *stowagev1.Snapshot) []string {
			return []string{s.GetId(), orDash(s.GetName()), s.GetVolumeId(), enumName(s.GetState()),
				enumName(s.GetKind()), orDash(s.GetMethod()), orDash(s.GetParentId())}
		})
	cmd.Flags().StringVar(&volume, "volume", "", "only snapshots of this volume")
	return cmd
}

func printSnapshot(w io.Writer, r *stowagev1.GetSnapshotResponse) {
	s := r.GetSnapshot()
	kv := [][2]string{
		{"ID", s.GetId()},
		{"Name", orDash(s.GetName())},
		{"Volume", s.GetVolumeId()},
		{"State", enumName(s.GetState())},
		{"Kind", enumName(s.GetKind())},
		{"Method", orDash(s.GetMethod())},
		{"Parent", orDash(s.GetParentId())},
		{"Size", humanBytes(s.GetSize())},
		{"Created", tsAgo(s.GetCreatedAt())},
	}
	if s.GetError() != "" {
		kv = append(kv, [2]string{"Error", s.GetError()})
	}
	keyValues(w, kv)
	if len(r.GetStores()) == 0 {
		return
	}
	fmt.Fprintln(w)
	rows := [][]string{}
	for _, o := range r.GetStores() {
		rows = append(rows, []string{enumName(o.GetRole()), o.GetStoreId(), enumName(o.GetState()), orDash(o.GetInstallPath()),
			humanBytes(o.GetSize()), humanBytes(o.GetReadBytes()), humanBytes(o.GetNewBytes()), humanBytes(o.GetReusedBytes()), orDash(o.GetError())})
	}
	table(w, []string{"ROLE", "STORE", "STATE", "PATH", "SIZE", "READ", "NEW", "REUSED", "ERROR"}, rows)
}

package main

import (
	"context"
	"fmt"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func newHostCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "host", Short: "Show the hypervisor hosts whose agents registered, put them in maintenance; make join tokens for new ones"}
	var zone string
	list := &cobra.Command{
		Use:   "list",
		Short: "List hosts",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := outputJSON(cmd)
			if err != nil {
				return err
			}
			c, err := newClients(cmd)
			if err != nil {
				return err
			}
			resp, err := allPages(cmd.Context(), func(ctx context.Context, token string) (*stowagev1.ListHostsResponse, error) {
				return msgOf(c.hosts.ListHosts(ctx, connect.NewRequest(&stowagev1.ListHostsRequest{Zone: zone, PageToken: token})))
			})
			if err != nil {
				return c.rpcErr(err)
			}
			if asJSON {
				return printProto(cmd.OutOrStdout(), resp)
			}
			rows := [][]string{}
			for _, h := range resp.GetHosts() {
				rows = append(rows, []string{h.GetId(), h.GetHostname(), stateName(h.GetState()), h.GetZone() + "/" + h.GetCluster(),
					h.GetAgentUrl(), ago(h.GetLastHeartbeat().AsTime()), fmt.Sprint(len(h.GetCapabilities().GetStores()))})
			}
			table(cmd.OutOrStdout(), []string{"ID", "HOSTNAME", "STATE", "ZONE/CLUSTER", "AGENT", "LAST HEARTBEAT", "STORES"}, rows)
			return nil
		},
	}
	list.Flags().StringVar(&zone, "zone", "", "only hosts in this zone")
	get := &cobra.Command{
		Use:   "get ID|HOSTNAME",
		Short: "Show one host with its capabilities",
		Args:  exactArgs(1, "a host id or hostname"),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := outputJSON(cmd)
			if err != nil {
				return err
			}
			c, err := newClients(cmd)
			if err != nil {
				return err
			}
			resp, err := c.hosts.GetHost(cmd.Context(), connect.NewRequest(&stowagev1.GetHostRequest{Id: args[0]}))
			if err != nil {
				return c.rpcErr(err)
			}
			h := resp.Msg.GetHost()
			if asJSON {
				return printProto(cmd.OutOrStdout(), h)
			}
			caps := h.GetCapabilities()
			kv := [][2]string{
				{"ID", h.GetId()},
				{"Hostname", h.GetHostname()},
				{"State", stateName(h.GetState())},
				{"Zone/Cluster", h.GetZone() + "/" + h.GetCluster()},
				{"Agent", h.GetAgentUrl()},
				{"NBD", orDash(h.GetNbdAddress())},
				{"IQN", orDash(h.GetIqn())},
				{"Last heartbeat", ago(h.GetLastHeartbeat().AsTime())},
				{"In-flight tasks", fmt.Sprint(h.GetInFlightTasks())},
				{"Agent version", orDash(caps.GetAgentVersion())},
				{"Kernel", orDash(caps.GetKernel())},
				{"qemu-img", orDash(caps.GetQemuImgVersion())},
				{"FUSE", fmt.Sprintf("%v (passthrough %v)", caps.GetFuse(), caps.GetFusePassthrough())},
				{"NBD kernel module", fmt.Sprint(caps.GetNbdKernel())},
				{"iSCSI initiator", fmt.Sprintf("%v (userspace %v, target %v)", caps.GetIscsiInitiator(), caps.GetIscsiUserspace(), caps.GetIscsiTarget())},
				{"RBD export", fmt.Sprint(caps.GetRbdExport())},
			}
			kv = append(kv, [2]string{"Template mount", mountSummary(caps.GetTemplateCache())})
			if tc := caps.GetTemplateCache(); tc != nil {
				kv = append(kv, [2]string{"Template reads", mountCounters(tc)})
			}
			if h.GetStateReason() != "" {
				kv = append(kv, [2]string{"Reason", h.GetStateReason()})
			}
			keyValues(cmd.OutOrStdout(), kv)
			if tc := caps.GetTemplateCache(); len(tc.GetTemplates()) > 0 {
				fmt.Fprintln(cmd.OutOrStdout())
				mountTable(cmd.OutOrStdout(), tc)
			}
			if len(caps.GetStores()) > 0 {
				fmt.Fprintln(cmd.OutOrStdout())
				rows := [][]string{}
				for _, s := range caps.GetStores() {
					status := "ok"
					if s.GetError() != "" {
						status = s.GetError()
					}
					rows = append(rows, []string{s.GetStoreId(), s.GetPath(), orDash(s.GetFsType()), fmt.Sprint(s.GetReflink()),
						humanBytes(s.GetAvailableBytes()) + " / " + humanBytes(s.GetCapacityBytes()), strings.TrimSpace(status)})
				}
				table(cmd.OutOrStdout(), []string{"STORE", "PATH", "FS", "REFLINK", "FREE / CAPACITY", "STATUS"}, rows)
			}
			return nil
		},
	}
	cmd.AddCommand(list, get, newHostTokenCmd(), newHostMaintainCmd(), newHostCancelMaintainCmd())
	return cmd
}

func newHostMaintainCmd() *cobra.Command {
	return hostCmd("maintain ID|HOSTNAME", "Drain a host: no new task goes to it, running tasks finish, then it is in Maintenance",
		func(ctx context.Context, c *clients, id string) (*stowagev1.Host, error) {
			resp, err := c.hosts.EnableHostMaintenance(ctx, connect.NewRequest(&stowagev1.EnableHostMaintenanceRequest{Id: id}))
			if err != nil {
				return nil, err
			}
			return resp.Msg.GetHost(), nil
		})
}

func newHostCancelMaintainCmd() *cobra.Command {
	return hostCmd("cancel-maintain ID|HOSTNAME", "Bring a host in maintenance back (Up at its next heartbeat)",
		func(ctx context.Context, c *clients, id string) (*stowagev1.Host, error) {
			resp, err := c.hosts.CancelHostMaintenance(ctx, connect.NewRequest(&stowagev1.CancelHostMaintenanceRequest{Id: id}))
			if err != nil {
				return nil, err
			}
			return resp.Msg.GetHost(), nil
		})
}

// hostCmd is a command that takes one host id or hostname, calls the
// controller and prints the host's state as it returns it.
func hostCmd(use, short string, call func(ctx context.Context, c *clients, id string) (*stowagev1.Host, error)) *cobra.Command {
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  exactArgs(1, "a host id or hostname"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withClients(cmd, func(c *clients, asJSON bool) error {
				h, err := call(cmd.Context(), c, args[0])
				if err != nil {
					return c.rpcErr(err)
				}
				if asJSON {
					return printProto(cmd.OutOrStdout(), h)
				}
				keyValues(cmd.OutOrStdout(), [][2]string{{"ID", h.GetId()}, {"State", stateName(h.GetState())}, {"Reason", orDash(h.GetStateReason())}})
				return nil
			})
		},
	}
}

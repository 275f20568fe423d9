package main

import (
	"fmt"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// newHostTokenCmd is `stowage host token create`: a one-time join token.
func newHostTokenCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Make join tokens agents enrol with"}
	var ttl time.Duration
	var hostID string
	create := &cobra.Command{
		Use:   "create",
		Short: "Make a one-time, expiring join token (shown once) and print how an agent uses it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withClients(cmd, func(c *clients, asJSON bool) error {
				resp, err := c.hosts.CreateJoinToken(cmd.Context(), connect.NewRequest(&stowagev1.CreateJoinTokenRequest{
					TtlSeconds: int64(ttl / time.Second), HostId: hostID,
				}))
				if err != nil {
					return c.rpcErr(err)
				}
				if asJSON {
					return printProto(cmd.OutOrStdout(), resp.Msg)
				}
				m := resp.Msg
				keyValues(cmd.OutOrStdout(), [][2]string{
					{"Token", m.GetToken()},
					{"Expires", m.GetExpiresAt().AsTime().Local().Format(time.RFC3339)},
					{"CA pin", m.GetCaPin()},
					{"Host", orDash(hostID)},
				})
				host := "<host-id>"
				if hostID != "" {
					host = hostID
				}
				fmt.Fprintf(cmd.OutOrStdout(), "\nOn the new host (the token is used once, then the agent keeps its certificate):\n  STOWAGE_JOIN_TOKEN=%s stowage agent --controller %s --host-id %s --ca-pin %s\n",
					m.GetToken(), c.all, host, m.GetCaPin())
				return nil
			})
		},
	}
	create.Flags().DurationVar(&ttl, "ttl", time.Hour, "how long the token admits a join (at most 168h)")
	create.Flags().StringVar(&hostID, "host", "", "admit only this host id; lets a host that lost its certificate enrol again")
	cmd.AddCommand(create)
	return cmd
}

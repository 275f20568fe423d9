package main

import (
	"fmt"
	"io"
	"path/filepath"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/stowage/stowage/controller/apiauth"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// newTokenCmd is `stowage token`: the API's bearer tokens (admin only).
func newTokenCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Manage API tokens (admin only): create, list, revoke",
		Long: "API tokens authenticate calls to the controller; each has a role:\n" +
			"admin (everything), operator (templates, volumes, snapshots, jobs) or reader (get, list, watch).\n" +
			"The CLI sends the token given by --token, STOWAGE_TOKEN or its client configuration (written by stowage dev).",
	}
	cmd.AddCommand(newTokenCreateCmd(), newTokenListCmd(), newTokenRevokeCmd(), newTokenResetAdminCmd())
	return cmd
}

// tokenClient is the TokenService client of cmd, with its credentials.
func tokenClient(cmd *cobra.Command) (stowagev1connect.TokenServiceClient, *clients, error) {
	c, err := newClients(cmd)
	if err != nil {
		return nil, nil, err
	}
	return c.tokens, c, nil
}

func newTokenCreateCmd() *cobra.Command {
	var name, role string
	var ttl time.Duration
	cmd := &cobra.Command{
		Use:   "create --name NAME --role admin|operator|reader [--ttl DURATION]",
		Short: "Create a token and print it (the only time it is shown)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := apiauth.ParseRole(role)
			if err != nil {
				return usageError{err}
			}
			if ttl < 0 {
				return usageError{fmt.Errorf("--ttl %s: want a positive duration or 0 (no expiry): %w", ttl, errdefs.ErrInvalid)}
			}
			asJSON, err := outputJSON(cmd)
			if err != nil {
				return err
			}
			tc, c, err := tokenClient(cmd)
			if err != nil {
				return err
			}
			req := &stowagev1.CreateTokenRequest{Name: name, Role: r.Proto()}
			if ttl > 0 {
				req.Ttl = durationpb.New(ttl)
			}
			resp, err := tc.CreateToken(cmd.Context(), connect.NewRequest(req))
			if err != nil {
				return c.rpcErr(err)
			}
			return emit(cmd, asJSON, resp.Msg, func(w io.Writer) {
				fmt.Fprintln(cmd.ErrOrStderr(), "Token created. Store it now: it is not shown again.")
				printToken(cmd.ErrOrStderr(), resp.Msg.GetToken())
				fmt.Fprintln(w, resp.Msg.GetSecret())
			})
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "who or what the token is for (shown in logs and jobs' created_by)")
	cmd.Flags().StringVar(&role, "role", "", "admin, operator or reader")
	cmd.Flags().DurationVar(&ttl, "ttl", 0, "lifetime, e.g. 24h (0: no expiry)")
	_ = cmd.MarkFlagRequired("name")
	_ = cmd.MarkFlagRequired("role")
	return cmd
}

func printToken(w io.Writer, t *stowagev1.Token) {
	keyValues(w, [][2]string{
		{"ID", t.GetId()}, {"Name", t.GetName()}, {"Role", tokenRole(t)},
		{"Created", tsAgo(t.GetCreatedAt())}, {"Expires", expires(t)},
	})
}

func tokenRole(t *stowagev1.Token) string { return apiauth.RoleFromProto(t.GetRole()).String() }

func expires(t *stowagev1.Token) string {
	if t.GetExpiresAt() == nil {
		return "never"
	}
	return t.GetExpiresAt().AsTime().Local().Format(time.RFC3339)
}

func newTokenListCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List tokens (never their secrets)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := outputJSON(cmd)
			if err != nil {
				return err
			}
			tc, c, err := tokenClient(cmd)
			if err != nil {
				return err
			}
			resp, err := tc.ListTokens(cmd.Context(), connect.NewRequest(&stowagev1.ListTokensRequest{}))
			if err != nil {
				return c.rpcErr(err)
			}
			return emit(cmd, asJSON, resp.Msg, func(w io.Writer) {
				rows := [][]string{}
				for _, t := range resp.Msg.GetTokens() {
					revoked := "-"
					if t.GetRevoked() {
						revoked = "revoked"
					}
					rows = append(rows, []string{t.GetId(), t.GetName(), tokenRole(t), tsAgo(t.GetCreatedAt()), expires(t), revoked})
				}
				table(w, []string{"ID", "NAME", "ROLE", "CREATED", "EXPIRES", "REVOKED"}, rows)
			})
		},
	}
}

func newTokenRevokeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "revoke ID",
		Short: "Revoke a token: it stops working at once",
		Args:  exactArgs(1, "a token id (see `stowage token list`)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := outputJSON(cmd)
			if err != nil {
				return err
			}
			tc, c, err := tokenClient(cmd)
			if err != nil {
				return err
			}
			resp, err := tc.RevokeToken(cmd.Context(), connect.NewRequest(&stowagev1.RevokeTokenRequest{Id: args[0]}))
			if err != nil {
				return c.rpcErr(err)
			}
			return emit(cmd, asJSON, resp.Msg, func(w io.Writer) {
				fmt.Fprintf(w, "token %s (%s) revoked\n", resp.Msg.GetToken().GetId(), resp.Msg.GetToken().GetName())
			})
		},
	}
}

// newTokenResetAdminCmd is the recovery for a lost admin token: offline,
// on the controller's metadata directory (the controller must be stopped:
// the database is locked while it runs).
func newTokenResetAdminCmd() *cobra.Command {
	var dataDir, out string
	cmd := &cobra.Command{
		Use:   "reset-admin --data-dir DIR [--out FILE]",
		Short: "Recover from a lost admin token (controller stopped): revoke every admin token, write a new one",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				out = filepath.Join(dataDir, "admin-recovery.token")
			}
			db, err := meta.Open(dataDir)
			if err != nil {
				return fmt.Errorf("%w (stop the controller first: it locks the database)", err)
			}
			defer db.Close()
			if err := apiauth.NewTokens(db).ResetAdmin(cmd.Context(), "recovery-admin", out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "every admin token revoked; a new one is in %s (mode 0600)\n", out)
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", "/var/lib/stowage/controller", "the controller's metadata directory")
	cmd.Flags().StringVar(&out, "out", "", "file for the new admin token (default DIR/admin-recovery.token)")
	return cmd
}

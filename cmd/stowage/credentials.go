package main

// How the CLI proves who it is to the controller: a bearer token from
// --token or STOWAGE_TOKEN, sent on every API call.

import (
	"context"
	"os"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
)

// addCredentialFlags adds --token to root. Its default is empty, never the
// environment's value, so --help cannot print a secret.
func addCredentialFlags(root *cobra.Command) {
	root.PersistentFlags().String("token", "", "API bearer token, stw_<id>.<secret> (env STOWAGE_TOKEN)")
}

// bearerToken is the token to send: --token, else STOWAGE_TOKEN, else "".
func bearerToken(cmd *cobra.Command) string {
	if f := cmd.Flags().Lookup("token"); f != nil && f.Value.String() != "" {
		return strings.TrimSpace(f.Value.String())
	}
	return strings.TrimSpace(os.Getenv("STOWAGE_TOKEN"))
}

// credentialOptions are the client options that send cmd's bearer token
// (none without one).
func credentialOptions(cmd *cobra.Command) connect.ClientOption {
	return connect.WithInterceptors(bearerInterceptor(bearerToken(cmd)))
}

// bearerInterceptor sets "Authorization: Bearer <token>" on unary and
// streaming calls; the empty token sets nothing.
type bearerInterceptor string

var _ connect.Interceptor = bearerInterceptor("")

func (b bearerInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if b != "" && req.Spec().IsClient {
			req.Header().Set("Authorization", "Bearer "+string(b))
		}
		return next(ctx, req)
	}
}

func (b bearerInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		if b != "" {
			conn.RequestHeader().Set("Authorization", "Bearer "+string(b))
		}
		return conn
	}
}

func (b bearerInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

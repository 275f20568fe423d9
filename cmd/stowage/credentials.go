package main

// How the CLI proves who it is to the controller: a bearer token from
// --token, STOWAGE_TOKEN or the client configuration, sent on every API call.

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

// credentials are the client options that send cmd's bearer token, else
// the client configuration's (none without one).
func (c *connection) credentials(cmd *cobra.Command) connect.ClientOption {
	tok := bearerToken(cmd)
	if tok == "" {
		tok = c.config.Token
	}
	return connect.WithInterceptors(bearerInterceptor(tok))
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

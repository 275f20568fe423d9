package api

import (
	"context"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

type tokenHandler struct{ svc TokenService }

var _ stowagev1connect.TokenServiceHandler = (*tokenHandler)(nil)

// CreateToken replies with the token's secret, the only time it is shown;
// the reply is not passed through redactReply, which knows nothing of it.
func (h *tokenHandler) CreateToken(ctx context.Context, req *connect.Request[stowagev1.CreateTokenRequest]) (*connect.Response[stowagev1.CreateTokenResponse], error) {
	resp, err := h.svc.Create(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(resp), nil
}

func (h *tokenHandler) ListTokens(ctx context.Context, _ *connect.Request[stowagev1.ListTokensRequest]) (*connect.Response[stowagev1.ListTokensResponse], error) {
	ts, err := h.svc.List(ctx)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&stowagev1.ListTokensResponse{Tokens: ts}), nil
}

func (h *tokenHandler) RevokeToken(ctx context.Context, req *connect.Request[stowagev1.RevokeTokenRequest]) (*connect.Response[stowagev1.RevokeTokenResponse], error) {
	t, err := h.svc.Revoke(ctx, req.Msg.GetId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&stowagev1.RevokeTokenResponse{Token: t}), nil
}

package apiauth

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/errdefs"
)

// Authenticator checks a bearer token. Tokens implements it.
type Authenticator interface {
	// Authenticate returns the caller of bearer, or an error wrapping
	// errdefs.ErrUnauthenticated (other classes for a failure to check).
	// With an error it may still return what it learned of the caller
	// (token id, name) for the log.
	Authenticate(ctx context.Context, bearer string) (Caller, error)
}

// Caller is who made an authenticated call.
type Caller struct {
	TokenID string
	Name    string
	Role    Role
}

// String is "<name> (<token id>)", the form job records keep in created_by.
func (c Caller) String() string {
	if c.Name == "" {
		return c.TokenID
	}
	return c.Name + " (" + c.TokenID + ")"
}

type callerKey struct{}

// WithCaller returns ctx carrying c. The Guard calls it; tests and internal
// callers that act for someone may too.
func WithCaller(ctx context.Context, c Caller) context.Context {
	return context.WithValue(ctx, callerKey{}, c)
}

// CallerFrom returns the caller the Guard authenticated; false for calls
// that were not token-authenticated (auth off, exempt procedures, work the
// controller does by itself).
func CallerFrom(ctx context.Context) (Caller, bool) {
	c, ok := ctx.Value(callerKey{}).(Caller)
	return c, ok
}

// Guard authenticates and authorizes API calls: a connect.Interceptor for
// the Connect handlers and RequireRole for plain HTTP handlers.
type Guard struct {
	auth   Authenticator
	log    *slog.Logger
	exempt func(procedure string) bool
}

var _ connect.Interceptor = (*Guard)(nil)

// GuardOption configures NewGuard.
type GuardOption func(*Guard)

// WithExempt lets procedures for which exempt returns true through without
// a token, in addition to those the role table marks Exempt (the agent
// control procedures). Their handlers must authenticate callers otherwise.
func WithExempt(exempt func(procedure string) bool) GuardOption {
	return func(g *Guard) { g.exempt = exempt }
}

// NewGuard returns a Guard that checks tokens with auth and logs refusals
// to log.
func NewGuard(auth Authenticator, log *slog.Logger, opts ...GuardOption) *Guard {
	g := &Guard{auth: auth, log: log}
	for _, o := range opts {
		o(g)
	}
	if g.log == nil {
		g.log = slog.New(slog.DiscardHandler)
	}
	return g
}

// check authorizes a call of procedure (need: its minimum role) carrying
// header; it returns the context to run the call with.
func (g *Guard) check(ctx context.Context, procedure, peer string, need Role, header http.Header) (context.Context, error) {
	if need == Exempt || (g.exempt != nil && g.exempt(procedure)) {
		return ctx, nil
	}
	bearer, err := bearerToken(header)
	var c Caller
	if err == nil {
		c, err = g.auth.Authenticate(ctx, bearer)
	}
	if err != nil {
		if !errors.Is(err, errdefs.ErrUnauthenticated) {
			// The token could not be checked (metadata unavailable): say so,
			// with the class the store gave.
			g.log.Warn("API call not authenticated: token check failed", "procedure", procedure, "peer", peer,
				"token_id", c.TokenID, "token_name", c.Name, "err", err)
			return ctx, fmt.Errorf("%s: checking the caller's token: %w", procedure, err)
		}
		g.log.Warn("API call refused: unauthenticated", "procedure", procedure, "peer", peer,
			"token_id", c.TokenID, "token_name", c.Name, "reason", err.Error())
		return ctx, fmt.Errorf("%s: %w", procedure, err)
	}
	if !c.Role.Allows(need) {
		g.log.Warn("API call refused: role too weak", "procedure", procedure, "peer", peer,
			"token_id", c.TokenID, "token_name", c.Name, "role", c.Role.String(), "need", need.String())
		return ctx, fmt.Errorf("%s needs role %s; token %s has role %s: %w", procedure, need, c, c.Role, errdefs.ErrPermissionDenied)
	}
	return WithCaller(ctx, c), nil
}

// bearerToken reads "Authorization: Bearer <token>". The error never
// quotes the header (it may hold a secret).
func bearerToken(h http.Header) (string, error) {
	v := h.Get("Authorization")
	if v == "" {
		return "", fmt.Errorf("no bearer token: send Authorization: Bearer stw_<id>.<secret> (stowage --token or STOWAGE_TOKEN): %w", errdefs.ErrUnauthenticated)
	}
	scheme, tok, ok := strings.Cut(v, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(tok) == "" {
		return "", fmt.Errorf("malformed Authorization header: want Bearer <token>: %w", errdefs.ErrUnauthenticated)
	}
	return strings.TrimSpace(tok), nil
}

// WrapUnary authenticates unary calls.
func (g *Guard) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if req.Spec().IsClient {
			return next(ctx, req)
		}
		proc := req.Spec().Procedure
		ctx, err := g.check(ctx, proc, req.Peer().Addr, RequiredRole(proc), req.Header())
		if err != nil {
			return nil, err
		}
		return next(ctx, req)
	}
}

// WrapStreamingClient leaves clients alone.
func (g *Guard) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

// WrapStreamingHandler authenticates streaming calls (WatchJob) before the
// first message.
func (g *Guard) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		proc := conn.Spec().Procedure
		ctx, err := g.check(ctx, proc, conn.Peer().Addr, RequiredRole(proc), conn.RequestHeader())
		if err != nil {
			return err
		}
		return next(ctx, conn)
	}
}

// RequireRole wraps a plain HTTP handler (/metrics: Prometheus sends a
// bearer token) so that only callers with role or higher reach it: 401
// with a WWW-Authenticate challenge when the token is missing or bad, 403
// when its role is too weak, logged like refused RPCs.
func (g *Guard) RequireRole(role Role, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, err := g.check(r.Context(), r.Method+" "+r.URL.Path, r.RemoteAddr, role, r.Header)
		switch {
		case err == nil:
			h.ServeHTTP(w, r.WithContext(ctx))
		case errors.Is(err, errdefs.ErrUnauthenticated):
			w.Header().Set("WWW-Authenticate", `Bearer realm="stowage"`)
			http.Error(w, "unauthenticated", http.StatusUnauthorized)
		case errors.Is(err, errdefs.ErrPermissionDenied):
			http.Error(w, "permission denied: needs role "+role.String(), http.StatusForbidden)
		default:
			http.Error(w, "cannot check credentials", http.StatusServiceUnavailable)
		}
	})
}

package main

import (
	"bytes"
	"context"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stowage/stowage/controller/api"
	"github.com/stowage/stowage/controller/apiauth"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/rpclimit"
)

type noStores struct{ api.StoreService }

func (noStores) List(context.Context, stowagev1.StoreRole, string, string, int) ([]*stowagev1.DataStore, error) {
	return nil, nil
}

// `stowage token` against an in-process API with authentication on: the
// admin token from --token, a reader token from STOWAGE_TOKEN, revoke.
func TestTokenCommands(t *testing.T) {
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tokens := apiauth.NewTokens(db)
	h := api.NewHandler(api.Services{Stores: noStores{}, Tokens: tokens, Auth: apiauth.NewGuard(tokens, slog.New(slog.DiscardHandler))},
		prometheus.NewRegistry(), rpclimit.Default())
	srv := httptest.NewServer(h)
	defer srv.Close()
	admin, err := tokens.Create(context.Background(), &stowagev1.CreateTokenRequest{Name: "root", Role: stowagev1.TokenRole_TOKEN_ROLE_ADMIN})
	if err != nil {
		t.Fatal(err)
	}
	stowage := func(args ...string) (string, error) {
		root := newRootCmd()
		var out, errOut bytes.Buffer
		root.SetOut(&out)
		root.SetErr(&errOut)
		root.SetArgs(append([]string{"--server", srv.URL}, args...))
		err := root.ExecuteContext(context.Background())
		return out.String(), err
	}
	t.Setenv("STOWAGE_TOKEN", "")
	if _, err := stowage("token", "list"); errdefs.Class(err) != errdefs.ErrUnauthenticated {
		t.Fatalf("token list without a token: %v", err)
	}
	secret, err := stowage("--token", admin.GetSecret(), "token", "create", "--name", "ci", "--role", "reader", "--ttl", "1h")
	if err != nil {
		t.Fatal(err)
	}
	secret = strings.TrimSpace(secret)
	if !strings.HasPrefix(secret, "stw_") {
		t.Fatalf("create printed %q", secret)
	}
	t.Setenv("STOWAGE_TOKEN", secret)
	if _, err := stowage("store", "list"); err != nil {
		t.Fatalf("reader store list via STOWAGE_TOKEN: %v", err)
	}
	if _, err := stowage("token", "list"); errdefs.Class(err) != errdefs.ErrPermissionDenied {
		t.Fatalf("reader token list: %v", err)
	}
	list, err := stowage("--token", admin.GetSecret(), "token", "list")
	if err != nil || !strings.Contains(list, "ci") || !strings.Contains(list, "reader") || strings.Contains(list, secret[20:]) {
		t.Fatalf("token list: %v\n%s", err, list)
	}
	id, _, _ := strings.Cut(strings.TrimPrefix(secret, "stw_"), ".")
	if _, err := stowage("--token", admin.GetSecret(), "token", "revoke", id); err != nil {
		t.Fatal(err)
	}
	if _, err := stowage("store", "list"); errdefs.Class(err) != errdefs.ErrUnauthenticated {
		t.Fatalf("revoked token: %v", err)
	}
}

package apiauth_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/stowage/stowage/controller/api"
	"github.com/stowage/stowage/controller/apiauth"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/rpclimit"
)

// Fakes of the domain services: only what the tests call is implemented
// (the embedded nil interface panics on anything else).
type fakeStores struct{ api.StoreService }

func (fakeStores) Get(_ context.Context, id string) (*stowagev1.DataStore, error) {
	return &stowagev1.DataStore{Id: id}, nil
}
func (fakeStores) Add(_ context.Context, req *stowagev1.AddStoreRequest) (*stowagev1.DataStore, error) {
	return &stowagev1.DataStore{Id: "s1", Name: req.GetName()}, nil
}
func (fakeStores) Delete(context.Context, string) error { return nil }

type fakeHosts struct{ api.HostService }

func (fakeHosts) Heartbeat(context.Context, *stowagev1.HeartbeatRequest) (*stowagev1.HeartbeatResponse, error) {
	return &stowagev1.HeartbeatResponse{}, nil
}

type fakeImages struct{ api.ImageService }
type fakeSnapshots struct{ api.SnapshotService }

// fakeVolumes records the caller each CreateVolume saw.
type fakeVolumes struct {
	api.VolumeService
	mu      sync.Mutex
	callers []apiauth.Caller
}

func (f *fakeVolumes) Create(ctx context.Context, _ *stowagev1.CreateVolumeRequest) (*stowagev1.CreateVolumeResponse, error) {
	c, ok := apiauth.CallerFrom(ctx)
	if !ok {
		return nil, errors.New("no caller in the context")
	}
	f.mu.Lock()
	f.callers = append(f.callers, c)
	f.mu.Unlock()
	return &stowagev1.CreateVolumeResponse{Volume: &stowagev1.Volume{Id: "v1"}}, nil
}

type fakeJobs struct{ api.JobService }

func (fakeJobs) Watch(ctx context.Context, id string, send func(*stowagev1.Job) error) error {
	return send(&stowagev1.Job{Id: id, State: stowagev1.JobState_JOB_STATE_SUCCEEDED})
}

type env struct {
	url    string
	tokens *apiauth.Tokens
	vols   *fakeVolumes
	logs   *syncBuffer
	now    *time.Time
	mu     *sync.Mutex
	bearer map[string]string // role name -> bearer token
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// newEnv serves the real API handler with a Guard over tokens in a real
// Badger database, and creates one token per role plus one that expires.
func newEnv(t *testing.T) *env {
	t.Helper()
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	e := &env{logs: &syncBuffer{}, vols: &fakeVolumes{}, mu: &sync.Mutex{}, bearer: map[string]string{}}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	e.now = &now
	e.tokens = apiauth.NewTokens(db, apiauth.WithClock(func() time.Time { e.mu.Lock(); defer e.mu.Unlock(); return *e.now }))
	log := slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	guard := apiauth.NewGuard(e.tokens, log)
	h := api.NewHandler(api.Services{
		Stores: fakeStores{}, Hosts: fakeHosts{}, Images: fakeImages{}, Volumes: e.vols,
		Snapshots: fakeSnapshots{}, Jobs: fakeJobs{}, Tokens: e.tokens, Auth: guard,
		MetricsAuth: func(h http.Handler) http.Handler { return guard.RequireRole(apiauth.RoleReader, h) },
	}, prometheus.NewRegistry(), rpclimit.Default())
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	e.url = srv.URL
	for name, role := range map[string]stowagev1.TokenRole{
		"admin": stowagev1.TokenRole_TOKEN_ROLE_ADMIN, "operator": stowagev1.TokenRole_TOKEN_ROLE_OPERATOR,
		"reader": stowagev1.TokenRole_TOKEN_ROLE_READER,
	} {
		resp, err := e.tokens.Create(context.Background(), &stowagev1.CreateTokenRequest{Name: name + "-tok", Role: role})
		if err != nil {
			t.Fatal(err)
		}
		e.bearer[name] = resp.GetSecret()
	}
	resp, err := e.tokens.Create(context.Background(), &stowagev1.CreateTokenRequest{
		Name: "short", Role: stowagev1.TokenRole_TOKEN_ROLE_ADMIN, Ttl: durationpb.New(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	e.bearer["short"] = resp.GetSecret()
	return e
}

func (e *env) advance(d time.Duration) {
	e.mu.Lock()
	*e.now = e.now.Add(d)
	e.mu.Unlock()
}

// bearer is a client interceptor that sends tok.
type bearer string

func (b bearer) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if b != "" {
			req.Header().Set("Authorization", "Bearer "+string(b))
		}
		return next(ctx, req)
	}
}
func (b bearer) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, s connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, s)
		if b != "" {
			conn.RequestHeader().Set("Authorization", "Bearer "+string(b))
		}
		return conn
	}
}
func (b bearer) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

type clients struct {
	stores  stowagev1connect.StoreServiceClient
	volumes stowagev1connect.VolumeServiceClient
	jobs    stowagev1connect.JobServiceClient
	tokens  stowagev1connect.TokenServiceClient
	agent   stowagev1connect.AgentControlServiceClient
}

func (e *env) as(tok string) clients {
	o := connect.WithInterceptors(bearer(tok))
	return clients{
		stores:  stowagev1connect.NewStoreServiceClient(http.DefaultClient, e.url, o),
		volumes: stowagev1connect.NewVolumeServiceClient(http.DefaultClient, e.url, o),
		jobs:    stowagev1connect.NewJobServiceClient(http.DefaultClient, e.url, o),
		tokens:  stowagev1connect.NewTokenServiceClient(http.DefaultClient, e.url, o),
		agent:   stowagev1connect.NewAgentControlServiceClient(http.DefaultClient, e.url, o),
	}
}

func wantCode(t *testing.T, what string, err error, code connect.Code) {
	t.Helper()
	if code == 0 {
		if err != nil {
			t.Errorf("%s: %v, want success", what, err)
		}
		return
	}
	if got := connect.CodeOf(err); err == nil || got != code {
		t.Errorf("%s: %v (code %v), want %v", what, err, got, code)
	}
}

var ctx = context.Background()

func TestRolesOverConnect(t *testing.T) {
	e := newEnv(t)
	const ok = connect.Code(0)
	getStore := func(c clients) error {
		_, err := c.stores.GetStore(ctx, connect.NewRequest(&stowagev1.GetStoreRequest{Id: "s1"}))
		return err
	}
	addStore := func(c clients) error {
		_, err := c.stores.AddStore(ctx, connect.NewRequest(&stowagev1.AddStoreRequest{Name: "p1", Role: stowagev1.StoreRole_STORE_ROLE_PRIMARY}))
		return err
	}
	delStore := func(c clients) error {
		_, err := c.stores.DeleteStore(ctx, connect.NewRequest(&stowagev1.DeleteStoreRequest{Id: "s1"}))
		return err
	}
	createVol := func(c clients) error {
		_, err := c.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "v"}))
		return err
	}
	listTokens := func(c clients) error {
		_, err := c.tokens.ListTokens(ctx, connect.NewRequest(&stowagev1.ListTokensRequest{}))
		return err
	}
	anon, reader, operator, admin := e.as(""), e.as(e.bearer["reader"]), e.as(e.bearer["operator"]), e.as(e.bearer["admin"])
	id, _, _ := strings.Cut(strings.TrimPrefix(e.bearer["reader"], "stw_"), ".")
	wrong := e.as("stw_" + id + "." + strings.Repeat("A", 43))
	garbage := e.as("hunter2")

	wantCode(t, "anonymous GetStore", getStore(anon), connect.CodeUnauthenticated)
	wantCode(t, "garbage token GetStore", getStore(garbage), connect.CodeUnauthenticated)
	wantCode(t, "wrong secret GetStore", getStore(wrong), connect.CodeUnauthenticated)
	wantCode(t, "anonymous CreateVolume", createVol(anon), connect.CodeUnauthenticated)

	wantCode(t, "reader GetStore", getStore(reader), ok)
	wantCode(t, "reader CreateVolume", createVol(reader), connect.CodePermissionDenied)
	wantCode(t, "reader AddStore", addStore(reader), connect.CodePermissionDenied)
	wantCode(t, "reader ListTokens", listTokens(reader), connect.CodePermissionDenied)

	wantCode(t, "operator CreateVolume", createVol(operator), ok)
	wantCode(t, "operator DeleteStore", delStore(operator), connect.CodePermissionDenied)
	wantCode(t, "operator AddStore", addStore(operator), connect.CodePermissionDenied)
	wantCode(t, "operator ListTokens", listTokens(operator), connect.CodePermissionDenied)

	wantCode(t, "admin CreateVolume", createVol(admin), ok)
	wantCode(t, "admin AddStore", addStore(admin), ok)
	wantCode(t, "admin DeleteStore", delStore(admin), ok)
	wantCode(t, "admin ListTokens", listTokens(admin), ok)

	// The handler saw who called.
	if len(e.vols.callers) != 2 || e.vols.callers[0].Name != "operator-tok" || e.vols.callers[0].Role != apiauth.RoleOperator ||
		e.vols.callers[1].Name != "admin-tok" {
		t.Errorf("callers seen by CreateVolume: %+v", e.vols.callers)
	}

	// Agents are exempt: their certificate authenticates them.
	_, err := anon.agent.Heartbeat(ctx, connect.NewRequest(&stowagev1.HeartbeatRequest{}))
	wantCode(t, "anonymous agent Heartbeat", err, ok)
}

func TestExpiredAndRevoked(t *testing.T) {
	e := newEnv(t)
	short, admin := e.as(e.bearer["short"]), e.as(e.bearer["admin"])
	list := func(c clients) (*stowagev1.ListTokensResponse, error) {
		r, err := c.tokens.ListTokens(ctx, connect.NewRequest(&stowagev1.ListTokensRequest{}))
		if err != nil {
			return nil, err
		}
		return r.Msg, nil
	}
	_, err := list(short)
	wantCode(t, "short-lived token before expiry", err, 0)
	e.advance(time.Hour)
	_, err = list(short)
	wantCode(t, "expired token", err, connect.CodeUnauthenticated)

	// Create through the API, use, revoke, refused.
	cr, err := admin.tokens.CreateToken(ctx, connect.NewRequest(&stowagev1.CreateTokenRequest{Name: "ci", Role: stowagev1.TokenRole_TOKEN_ROLE_READER}))
	if err != nil {
		t.Fatal(err)
	}
	ci := e.as(cr.Msg.GetSecret())
	if _, err := ci.stores.GetStore(ctx, connect.NewRequest(&stowagev1.GetStoreRequest{Id: "s"})); err != nil {
		t.Fatalf("new reader token: %v", err)
	}
	if _, err := admin.tokens.RevokeToken(ctx, connect.NewRequest(&stowagev1.RevokeTokenRequest{Id: cr.Msg.GetToken().GetId()})); err != nil {
		t.Fatal(err)
	}
	_, err = ci.stores.GetStore(ctx, connect.NewRequest(&stowagev1.GetStoreRequest{Id: "s"}))
	wantCode(t, "revoked token", err, connect.CodeUnauthenticated)

	lr, err := list(admin)
	if err != nil {
		t.Fatal(err)
	}
	var revoked int
	for _, tk := range lr.GetTokens() {
		if tk.GetRevoked() {
			revoked++
			if tk.GetId() != cr.Msg.GetToken().GetId() {
				t.Errorf("revoked: %v", tk)
			}
		}
	}
	if len(lr.GetTokens()) != 5 || revoked != 1 {
		t.Errorf("list: %v", lr.GetTokens())
	}
	_, err = admin.tokens.CreateToken(ctx, connect.NewRequest(&stowagev1.CreateTokenRequest{Name: "x"}))
	wantCode(t, "token without a role", err, connect.CodeInvalidArgument)
	_, err = admin.tokens.RevokeToken(ctx, connect.NewRequest(&stowagev1.RevokeTokenRequest{Id: "000000000000"}))
	wantCode(t, "revoke unknown token", err, connect.CodeNotFound)
	// Given the whole token by mistake, revoke finds the id and never
	// repeats the secret.
	rv, err := admin.tokens.RevokeToken(ctx, connect.NewRequest(&stowagev1.RevokeTokenRequest{Id: e.bearer["reader"]}))
	if err != nil || !rv.Msg.GetToken().GetRevoked() || strings.Contains(rv.Msg.String(), e.bearer["reader"][20:]) {
		t.Errorf("revoke by whole token: %v, %v", rv, err)
	}
}

func TestWatchJobIsAuthenticated(t *testing.T) {
	e := newEnv(t)
	watch := func(c clients) (int, error) {
		s, err := c.jobs.WatchJob(ctx, connect.NewRequest(&stowagev1.WatchJobRequest{Id: "j1"}))
		if err != nil {
			return 0, err
		}
		defer s.Close()
		n := 0
		for s.Receive() {
			n++
		}
		return n, s.Err()
	}
	n, err := watch(e.as(""))
	wantCode(t, "anonymous WatchJob", err, connect.CodeUnauthenticated)
	if n != 0 {
		t.Errorf("anonymous watcher got %d messages", n)
	}
	n, err = watch(e.as(e.bearer["reader"]))
	if err != nil || n != 1 {
		t.Errorf("reader WatchJob: %d messages, %v", n, err)
	}
}

// Refusals are logged with the token's id and name, the procedure and the
// peer, never with the token or its secret.
func TestRefusalsLoggedWithoutSecrets(t *testing.T) {
	e := newEnv(t)
	reader := e.bearer["reader"]
	id, secret, _ := strings.Cut(strings.TrimPrefix(reader, "stw_"), ".")
	_, err := e.as(reader).volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "v"}))
	wantCode(t, "reader CreateVolume", err, connect.CodePermissionDenied)
	wrongSecret := "stw_" + id + "." + strings.Repeat("B", 43)
	_, err = e.as(wrongSecret).stores.GetStore(ctx, connect.NewRequest(&stowagev1.GetStoreRequest{Id: "s"}))
	wantCode(t, "wrong secret", err, connect.CodeUnauthenticated)
	_, err = e.as("not-a-token-SECRETISH").stores.GetStore(ctx, connect.NewRequest(&stowagev1.GetStoreRequest{Id: "s"}))
	wantCode(t, "garbage", err, connect.CodeUnauthenticated)
	req, _ := http.NewRequest("GET", e.url+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+wrongSecret)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
	}

	logs := e.logs.String()
	for _, leak := range []string{secret, strings.Repeat("B", 43), "SECRETISH", reader} {
		if strings.Contains(logs, leak) {
			t.Errorf("logs contain a secret %q:\n%s", leak, logs)
		}
	}
	for _, want := range []string{
		"role too weak", "token_id=" + id, "token_name=reader-tok", "procedure=/stowage.v1.VolumeService/CreateVolume",
		"peer=127.0.0.1:", "unauthenticated", "unknown token or wrong secret", "GET /metrics",
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %q:\n%s", want, logs)
		}
	}
	if strings.Contains(err.Error(), "SECRETISH") {
		t.Errorf("error quotes the token: %v", err)
	}
}

func TestMetricsRequireRoleHealthzOpen(t *testing.T) {
	e := newEnv(t)
	get := func(path, tok string) int {
		req, _ := http.NewRequest("GET", e.url+path, nil)
		if tok != "" {
			req.Header.Set("Authorization", "Bearer "+tok)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusUnauthorized && resp.Header.Get("WWW-Authenticate") == "" {
			t.Error("401 without a challenge")
		}
		return resp.StatusCode
	}
	if c := get("/metrics", ""); c != http.StatusUnauthorized {
		t.Errorf("/metrics anonymous: %d", c)
	}
	if c := get("/metrics", e.bearer["reader"]); c != http.StatusOK {
		t.Errorf("/metrics reader: %d", c)
	}
	if c := get("/healthz", ""); c != http.StatusOK {
		t.Errorf("/healthz anonymous: %d", c)
	}
}

func TestBootstrapOnceAndReset(t *testing.T) {
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tokens := apiauth.NewTokens(db)
	path := filepath.Join(t.TempDir(), "admin.token")
	if err := tokens.Bootstrap(ctx, path); err != nil {
		t.Fatal(err)
	}
	st, err := os.Lstat(path)
	if err != nil || st.Mode().Perm() != 0o600 || !st.Mode().IsRegular() {
		t.Fatalf("token file: %v, %v", st, err)
	}
	first, _ := os.ReadFile(path)
	c, err := tokens.Authenticate(ctx, strings.TrimSpace(string(first)))
	if err != nil || c.Role != apiauth.RoleAdmin || c.Name != apiauth.BootstrapName {
		t.Fatalf("bootstrap token: %+v, %v", c, err)
	}
	// A second start neither rewrites nor recreates the file.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := tokens.Bootstrap(ctx, path); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("bootstrap wrote the file again: %v", err)
	}
	if ts, _ := tokens.List(ctx); len(ts) != 1 {
		t.Fatalf("tokens after two bootstraps: %v", ts)
	}
	// Lost admin token: reset revokes it and writes a new one.
	if err := tokens.ResetAdmin(ctx, "recovered-admin", path); err != nil {
		t.Fatal(err)
	}
	if _, err := tokens.Authenticate(ctx, strings.TrimSpace(string(first))); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Errorf("old admin token after reset: %v", err)
	}
	second, _ := os.ReadFile(path)
	if c, err := tokens.Authenticate(ctx, strings.TrimSpace(string(second))); err != nil || c.Role != apiauth.RoleAdmin {
		t.Errorf("reset token: %+v, %v", c, err)
	}
}

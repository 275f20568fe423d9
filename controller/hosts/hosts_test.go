package hosts

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

type clock struct{ t time.Time }

func (c *clock) now() time.Time          { return c.t }
func (c *clock) advance(d time.Duration) { c.t = c.t.Add(d) }
func newTestService(t *testing.T) (*Service, *clock) {
	t.Helper()
	db, err := meta.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	c := &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	s := New(db, nil, Config{HeartbeatInterval: time.Second, Timeout: 4 * time.Second, PersistEvery: 30 * time.Second}, slog.New(slog.DiscardHandler))
	s.now, s.start = c.now, c.t
	return s, c
}

func register(t *testing.T, s *Service, session string) *stowagev1.Host {
	t.Helper()
	resp, err := s.Register(context.Background(), &stowagev1.RegisterRequest{
		HostId: "h1", Hostname: "node1", AgentUrl: "http://127.0.0.1:8471", SessionId: session, Zone: "z1",
		Capabilities: &stowagev1.HostCapabilities{QemuImgVersion: "7.2.22"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetHeartbeatIntervalMs() != 1000 {
		t.Errorf("interval %d ms", resp.GetHeartbeatIntervalMs())
	}
	return resp.GetHost()
}

func state(t *testing.T, s *Service) stowagev1.HostState {
	t.Helper()
	h, err := s.Get(context.Background(), "h1")
	if err != nil {
		t.Fatal(err)
	}
	return h.GetState()
}

func TestLiveness(t *testing.T) {
	ctx := context.Background()
	s, c := newTestService(t)
	h := register(t, s, "s1")
	if h.GetState() != stowagev1.HostState_HOST_STATE_UP || h.GetCluster() != "default" || h.GetZone() != "z1" {
		t.Fatalf("after register: %v", h)
	}
	beat := func(session string) *stowagev1.HeartbeatResponse {
		t.Helper()
		resp, err := s.Heartbeat(ctx, &stowagev1.HeartbeatRequest{HostId: "h1", SessionId: session,
			Capabilities: &stowagev1.HostCapabilities{QemuImgVersion: "7.2.22"}, InFlightTasks: 3})
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	// Heartbeats within the timeout keep it Up and, unchanged, are not written.
	rev := h.GetRevision()
	for range 3 {
		c.advance(time.Second)
		beat("s1")
		s.checkLiveness(ctx)
	}
	got, _ := s.Get(ctx, "h1")
	if got.GetState() != stowagev1.HostState_HOST_STATE_UP || got.GetRevision() != rev {
		t.Fatalf("steady heartbeats: state %v revision %d (want %d: no writes)", got.GetState(), got.GetRevision(), rev)
	}
	if got.GetInFlightTasks() != 3 || !got.GetLastHeartbeat().AsTime().Equal(c.t) {
		t.Errorf("live facts not shown: %v %v", got.GetInFlightTasks(), got.GetLastHeartbeat().AsTime())
	}
	// Silence past the timeout: Disconnected, with the reason.
	c.advance(5 * time.Second)
	s.checkLiveness(ctx)
	got, _ = s.Get(ctx, "h1")
	if got.GetState() != stowagev1.HostState_HOST_STATE_DISCONNECTED || got.GetStateReason() == "" {
		t.Fatalf("after silence: %v %q", got.GetState(), got.GetStateReason())
	}
	// It comes back with the next heartbeat.
	if resp := beat("s1"); resp.GetState() != stowagev1.HostState_HOST_STATE_UP || resp.GetReregister() {
		t.Fatalf("heartbeat after disconnect: %v", resp)
	}
	// A heartbeat from a session the controller does not know asks for a registration.
	if resp := beat("other"); !resp.GetReregister() {
		t.Fatal("unknown session must be asked to register")
	}
	// The agent restarts: a new session re-registers through Reconnect.
	h = register(t, s, "s2")
	if h.GetState() != stowagev1.HostState_HOST_STATE_UP || h.GetSessionId() != "s2" {
		t.Fatalf("re-register: %v", h)
	}
	// Unknown host heartbeats: re-register.
	resp, err := s.Heartbeat(ctx, &stowagev1.HeartbeatRequest{HostId: "h9", SessionId: "x"})
	if err != nil || !resp.GetReregister() {
		t.Fatalf("unknown host: %v %v", resp, err)
	}
}

func TestRestartedControllerGivesOneTimeout(t *testing.T) {
	ctx := context.Background()
	s, c := newTestService(t)
	register(t, s, "s1")
	// A new controller process over the same records: nothing in memory.
	s2 := New(s.db, nil, s.cfg, slog.New(slog.DiscardHandler))
	s2.now, s2.start = c.now, c.t.Add(time.Minute)
	c.advance(time.Minute + 2*time.Second)
	s2.checkLiveness(ctx)
	if st := state(t, s2); st != stowagev1.HostState_HOST_STATE_UP {
		t.Fatalf("host marked %v before its grace timeout", st)
	}
	c.advance(3 * time.Second)
	s2.checkLiveness(ctx)
	if st := state(t, s2); st != stowagev1.HostState_HOST_STATE_DISCONNECTED {
		t.Fatalf("host silent past the timeout is %v", st)
	}
}

func TestRegisterRejectsBadInput(t *testing.T) {
	s, _ := newTestService(t)
	for _, req := range []*stowagev1.RegisterRequest{
		{HostId: "", AgentUrl: "http://a:1", SessionId: "s"},
		{HostId: "../x", AgentUrl: "http://a:1", SessionId: "s"},
		{HostId: "h1", AgentUrl: "ftp://a:1", SessionId: "s"},
		{HostId: "h1", AgentUrl: "http://a:1"},
	} {
		if _, err := s.Register(context.Background(), req); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("Register(%v) = %v, want invalid", req, err)
		}
	}
	if hs, _ := s.List(context.Background(), "", 0, "", 0); len(hs) != 0 {
		t.Fatalf("bad registrations wrote %d hosts", len(hs))
	}
	if _, err := s.Get(context.Background(), "nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Get(nope) = %v", err)
	}
}

// TestHeartbeatCountersPersistedAtCadence: the template mount's counters
// change with every read; a heartbeat carrying only new counters is not a
// metadata write, and they reach the record at the PersistEvery cadence.
func TestHeartbeatCountersPersistedAtCadence(t *testing.T) {
	ctx := context.Background()
	s, c := newTestService(t)
	h := register(t, s, "s1")
	beat := func(hits int64, mount string) {
		t.Helper()
		_, err := s.Heartbeat(ctx, &stowagev1.HeartbeatRequest{HostId: "h1", SessionId: "s1",
			Capabilities: &stowagev1.HostCapabilities{QemuImgVersion: "7.2.22", TemplateCache: &stowagev1.CacheStatus{
				Mount: mount, ReadHitBytes: hits, ReadMissBytes: hits / 2, FetchedBytes: hits, CorruptChunks: hits / 4096, PassthroughOpens: hits / 8192}}})
		if err != nil {
			t.Fatal(err)
		}
	}
	c.advance(time.Second)
	beat(0, "/run/t") // a new mount: a change of capabilities, written
	got, _ := s.Get(ctx, "h1")
	rev := got.GetRevision()
	if rev == h.GetRevision() {
		t.Fatal("a new template mount was not written")
	}
	for i := range 3 {
		c.advance(time.Second)
		beat(int64(i+1)<<20, "/run/t")
	}
	got, _ = s.Get(ctx, "h1")
	if got.GetRevision() != rev || got.GetCapabilities().GetTemplateCache().GetReadHitBytes() != 0 {
		t.Fatalf("counters alone were written: revision %d (want %d), hits %d", got.GetRevision(), rev, got.GetCapabilities().GetTemplateCache().GetReadHitBytes())
	}
	c.advance(30 * time.Second)
	beat(5<<20, "/run/t")
	got, _ = s.Get(ctx, "h1")
	if tc := got.GetCapabilities().GetTemplateCache(); tc.GetReadHitBytes() != 5<<20 || tc.GetCorruptChunks() != 5<<20/4096 {
		t.Fatalf("after PersistEvery: %v, want the last counters", tc)
	}
}

// TestCopyEngineCounters: the copy engine counters a heartbeat carries are
// kept in memory, per host, the last ones winning; a heartbeat without
// them keeps the previous ones; nothing is written for them.
func TestCopyEngineCounters(t *testing.T) {
	ctx := context.Background()
	s, c := newTestService(t)
	h := register(t, s, "s1")
	if got := s.CopyEngine(); len(got) != 0 {
		t.Fatalf("before any heartbeat: %v", got)
	}
	beat := func(ce *stowagev1.CopyEngineCounters) {
		t.Helper()
		c.advance(time.Second)
		if _, err := s.Heartbeat(ctx, &stowagev1.HeartbeatRequest{HostId: "h1", SessionId: "s1",
			Capabilities: &stowagev1.HostCapabilities{QemuImgVersion: "7.2.22"}, CopyEngine: ce}); err != nil {
			t.Fatal(err)
		}
	}
	beat(&stowagev1.CopyEngineCounters{Bytes: map[string]int64{"written": 10}})
	beat(&stowagev1.CopyEngineCounters{Bytes: map[string]int64{"written": 20}, ReadRetries: 1,
		Copies: []*stowagev1.CopyCount{{Method: "sparse", Result: "checksum_mismatch", Count: 1}}})
	beat(nil)
	got := s.CopyEngine()["h1"]
	if got.GetBytes()["written"] != 20 || got.GetReadRetries() != 1 || len(got.GetCopies()) != 1 {
		t.Fatalf("h1's copy engine counters: %v, want the last reported", got)
	}
	if rec, _ := s.Get(ctx, "h1"); rec.GetRevision() != h.GetRevision() {
		t.Errorf("counters were written: revision %d, want %d", rec.GetRevision(), h.GetRevision())
	}
}

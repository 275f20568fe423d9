package agent_test

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/agent"
	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/agent/nbdexports"
	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/hostops"
)

// grantsRig runs an agent (Run: its NBD listener is the real one) with
// HTTP and NBD exports kept in state files, a Remote to it, and a store
// s1 it serves at dir.
func grantsRig(t *testing.T) (ep *hostops.Remote, dir, state string) {
	t.Helper()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	state = t.TempDir()
	x := exports.New(exports.WithLogger(quiet), exports.WithStateFile(filepath.Join(state, "exports.json")))
	n := nbdexports.New(quiet, nbdexports.WithStateFile(filepath.Join(state, "nbd-exports.json")))
	local := hostfs.New("h1", hostfs.WithExporter(x), hostfs.WithNBDExporter(n))
	base := t.TempDir()
	a, err := agent.New(agent.Config{ControllerURL: "http://127.0.0.1:1", HostID: "h1", StateDir: t.TempDir(),
		Listen: "127.0.0.1:0", NBDListen: "127.0.0.1:0", StoreRoots: []string{base}},
		local, quiet, agent.WithExports(x), agent.WithNBD(n))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent Run: %v", err)
		}
	})
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(srv.Close)
	x.SetBaseURL(srv.URL)
	for deadline := time.Now().Add(10 * time.Second); a.NBDAddress() == ""; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the agent's NBD server did not start")
		}
	}
	ep = hostops.NewRemote("h1", srv.URL, srv.Client())
	dir = filepath.Join(base, "s1")
	if _, err := ep.PrepareStore(t.Context(), hostops.StoreRoot{ID: "s1", Path: dir, Subdirs: []string{"volumes"}}); err != nil {
		t.Fatal(err)
	}
	return ep, dir, state
}

// TestListExportsThroughRemote makes an HTTP and an NBD export under a
// job step's task id, lists them through the agent (each with its URI,
// kind, object, task and times), ends one with the listed URI and lists
// again.
func TestListExportsThroughRemote(t *testing.T) {
	ep, dir, state := grantsRig(t)
	for _, k := range []string{"a.raw", "b.raw"} {
		if err := os.WriteFile(filepath.Join(dir, "volumes", k), make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	a, b := hostops.Ref{Store: "s1", Key: "volumes/a.raw"}, hostops.Ref{Store: "s1", Key: "volumes/b.raw"}
	before := time.Now().Add(-time.Second)
	ctx := drivers.WithTaskID(t.Context(), "job-7.copy")
	httpURI, err := ep.Export(ctx, a, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	nbdURI, err := ep.ExportNBD(ctx, hostops.NBDExportRequest{Ref: b, Format: drivers.FormatRaw, ReadOnly: true, TTL: 2 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	// An export made without a task id: no owner step, still listed.
	plain, err := ep.ExportNBD(t.Context(), hostops.NBDExportRequest{Ref: a, Format: drivers.FormatRaw})
	if err != nil {
		t.Fatal(err)
	}

	list, err := ep.ListExports(t.Context(), "s1")
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 3 {
		t.Fatalf("%d exports listed, want 3: %+v", len(list), list)
	}
	byURI := map[drivers.URI]hostops.ExportInfo{}
	for _, x := range list {
		byURI[x.URI] = x
	}
	check := func(uri drivers.URI, kind hostops.ExportKind, ref hostops.Ref, ttl time.Duration, prefix string) {
		t.Helper()
		x, ok := byURI[uri]
		if !ok {
			t.Fatalf("%s export not listed under the URI the grant handed out", kind)
		}
		if x.Kind != kind || x.Ref != ref || !x.ReadOnly {
			t.Errorf("%s export: kind %s ref %v read-only %v", kind, x.Kind, x.Ref, x.ReadOnly)
		}
		if x.Owner.ParentID != "job-7.copy" || !strings.HasPrefix(x.Owner.TaskID, prefix) || x.Owner.Step() != "job-7.copy" {
			t.Errorf("%s export owner %+v, want parent job-7.copy and a task id %s…", kind, x.Owner, prefix)
		}
		if x.Created.Before(before) || x.Created.After(time.Now()) {
			t.Errorf("%s export created %v", kind, x.Created)
		}
		if d := time.Until(x.Expires); d < ttl-time.Minute || d > ttl {
			t.Errorf("%s export expires in %v, want about %v", kind, d, ttl)
		}
	}
	check(httpURI, hostops.ExportHTTP, a, time.Hour, "job-7.copy.export-")
	check(nbdURI, hostops.ExportNBD, b, 2*time.Hour, "job-7.copy.export_nbd-")
	if x := byURI[plain]; x.Owner.ParentID != "" || x.Owner.Step() != "" || x.Owner.TaskID == "" || !x.Expires.IsZero() || x.ReadOnly {
		t.Errorf("export without a task id: %+v", x)
	}
	if other, err := ep.ListExports(t.Context(), "s2"); err != nil || len(other) != 0 {
		t.Fatalf("another store's exports: %+v %v", other, err)
	}
	// The listing is a read: never journalled, so it is current whatever
	// the context's task id.
	if all, err := ep.ListExports(ctx, ""); err != nil || len(all) != 3 {
		t.Fatalf("every store: %d %v", len(all), err)
	}

	c, err := nbd.Dial(t.Context(), string(nbdURI), nbd.ClientOptions{})
	if err != nil {
		t.Fatalf("the NBD export does not open: %v", err)
	}
	c.Close()
	if err := ep.UnexportNBD(t.Context(), byURI[nbdURI].URI); err != nil {
		t.Fatal(err)
	}
	if err := ep.Unexport(t.Context(), byURI[httpURI].URI); err != nil {
		t.Fatal(err)
	}
	list, err = ep.ListExports(ctx, "s1")
	if err != nil || len(list) != 1 || list[0].URI != plain {
		t.Fatalf("after the revokes: %+v %v", list, err)
	}
	if resp, err := http.Get(string(httpURI)); err != nil || resp.StatusCode != http.StatusNotFound {
		t.Fatalf("the HTTP export still serves: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	if c, err := nbd.Dial(t.Context(), string(nbdURI), nbd.ClientOptions{}); err == nil {
		c.Close()
		t.Fatal("the NBD export still opens")
	}
	// The state files hold no trace of the ended exports.
	for _, f := range []string{"exports.json", "nbd-exports.json"} {
		b, err := os.ReadFile(filepath.Join(state, f))
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(b), "job-7") {
			t.Errorf("%s still names the revoked exports:\n%s", f, b)
		}
	}
}

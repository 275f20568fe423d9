package main

// End-to-end tests of the foundation: the controller and two agents run as
// separate processes of the real binary on loopback; the test drives them
// through the CLI, curl (Connect JSON), and Go clients speaking Connect,
// gRPC and gRPC-Web.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/datapath/qsd"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/trust"
)

var stowageBin string

// buildTags are the build tags the stowage binary gets besides
// failpoints: those of optional providers this test binary was built
// with (rbd_e2e_test.go).
var buildTags []string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "stowage-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	stowageBin = filepath.Join(dir, "stowage")
	// stowage dev writes the CLI's configuration: here, never the user's.
	os.Setenv("STOWAGE_CONFIG", filepath.Join(dir, "config.json"))
	// Failpoints compiled in (tests enable them per process; they do
	// nothing otherwise), and the race detector when this test binary has
	// it: a data race in the controller, an agent or a CLI run then shows
	// up in its log (checked by startProc and cli).
	args := []string{"build", "-tags", strings.Join(append([]string{"failpoints"}, buildTags...), ","), "-o", stowageBin}
	if raceEnabled {
		args = append(args, "-race")
		// A race-built process sleeps a second at a normal exit
		// (atexit_sleep_ms=1000) for late reports; every CLI run would
		// take a second longer. Reports are written as races happen.
		os.Setenv("GORACE", strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	}
	out, err := exec.Command("go", append(args, ".")...).CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build stowage: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is a stowage process started by a test; only it is ever killed.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  *syncBuffer
	done chan struct{}
}

// syncBuffer is a bytes.Buffer safe for the process's writes and the test's reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func startProc(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	return startProcEnv(t, name, nil, args...)
}

// startProcEnv is startProc with extra environment variables.
func startProcEnv(t *testing.T, name string, env []string, args ...string) *proc {
	t.Helper()
	return startBin(t, name, stowageBin, env, args...)
}

// startBin starts another program (a test server such as etcd) as startProc
// starts stowage.
func startBin(t *testing.T, name, bin string, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, log: &syncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout = p.log
	p.cmd.Stderr = p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.kill(syscall.SIGKILL)
		checkRaces(t, name, p.log.String())
		if t.Failed() {
			t.Logf("--- log of %s:\n%s", name, p.log.String())
		}
	})
	return p
}

// raceReport is what a binary built with -race prints when it sees a data race.
const raceReport = "WARNING: DATA RACE"

// checkRaces fails t when the output of a process it started reports a
// data race (the binary is built with -race when the tests run with it).
func checkRaces(t *testing.T, name, output string) {
	t.Helper()
	if i := strings.Index(output, raceReport); i >= 0 {
		t.Errorf("%s: the race detector reported a data race:\n%s", name, output[i:])
	}
}

func (p *proc) kill(sig syscall.Signal) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// controllers maps the URL of each controller a test started to its data
// directory (its CA in pki/, its admin client configuration).
var controllers sync.Map

// controllerDir is the data directory of the controller at server ("" if
// no test started it).
func controllerDir(server string) string {
	for {
		if d, ok := controllers.Load(strings.TrimRight(server, "/")); ok {
			return d.(string)
		}
		i := strings.LastIndexByte(server, '/')
		if i <= len("https://") {
			return ""
		}
		server = server[:i]
	}
}

// caFile is the CA certificate of the controller at server.
func caFile(server string) string {
	if d := controllerDir(server); d != "" {
		return filepath.Join(d, "pki", "ca.crt")
	}
	return ""
}

// clientEnv is the environment of a CLI run against server: the
// controller's admin configuration (its bootstrap token) and CA, nothing
// from the user's own configuration.
func clientEnv(server string) []string {
	cfg := "/nonexistent/stowage-test-config"
	if d := controllerDir(server); d != "" {
		cfg = filepath.Join(d, "admin.json")
	}
	return append(os.Environ(), "STOWAGE_CONFIG="+cfg, "STOWAGE_CA_FILE="+caFile(server))
}

// testClient is an HTTP/1.1 and HTTP/2 client that trusts the controller
// at server by its identity (the CLI's way), presents no certificate and
// sends the controller's bootstrap admin token (DATA/admin.json) when
// there is one.
func testClient(t *testing.T, server string) *http.Client {
	t.Helper()
	c, err := clientFor(server)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func clientFor(server string) (*http.Client, error) {
	data, err := os.ReadFile(caFile(server))
	if err != nil {
		return nil, fmt.Errorf("CA of %s: %w", server, err)
	}
	ca, err := trust.ParseCertificate(data)
	if err != nil {
		return nil, err
	}
	pool := trust.Pool(ca)
	var rt http.RoundTripper = &http.Transport{TLSClientConfig: trust.ClientConfig(nil, pool, trust.Is(trust.Controller)), ForceAttemptHTTP2: true}
	if cfg, err := readClientConfig(filepath.Join(controllerDir(server), "admin.json")); err == nil && cfg.Token != "" {
		rt = bearer{token: cfg.Token, next: rt}
	}
	return &http.Client{Timeout: time.Minute, Transport: rt}, nil
}

// bearer adds an API token to every request.
type bearer struct {
	token string
	next  http.RoundTripper
}

func (b bearer) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.token)
	return b.next.RoundTrip(r)
}

// asController is a client presenting a certificate of the controller's
// identity, issued from the CA of the controller at server: the test
// calls agents as their controller would.
func asController(t *testing.T, server string) *http.Client {
	t.Helper()
	ca, err := trust.LoadOrCreateCA(filepath.Join(controllerDir(server), "pki"))
	if err != nil {
		t.Fatal(err)
	}
	kp, err := trust.NewIssued(ca, trust.Request{Identity: trust.Controller, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return &http.Client{Timeout: time.Minute, Transport: &http.Transport{TLSClientConfig: trust.ClientConfig(kp, ca.Pool(), nil), ForceAttemptHTTP2: true}}
}

// httpGet GETs url of the controller at server through testClient.
func httpGet(t *testing.T, server, url string) (*http.Response, error) {
	t.Helper()
	return testClient(t, server).Get(url)
}

// cli runs a client command against server and returns stdout, stderr and the exit code.
func cli(t *testing.T, server string, args ...string) (string, string, int) {
	t.Helper()
	return runStowage(t, clientEnv(server), append(args, "--server", server)...)
}

// runStowage runs the stowage binary to its end with env and returns
// stdout, stderr and the exit code; a data race it reports fails t.
func runStowage(t *testing.T, env []string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(stowageBin, args...)
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run stowage %v: %v", args, err)
	}
	checkRaces(t, fmt.Sprintf("stowage %v", args), stderr.String())
	return stdout.String(), stderr.String(), code
}

func cliJSON(t *testing.T, server string, v any, args ...string) {
	t.Helper()
	out, errOut, code := cli(t, server, append(args, "-o", "json")...)
	if code != 0 {
		t.Fatalf("stowage %v: exit %d: %s", args, code, errOut)
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("stowage %v: bad json %v: %s", args, err, out)
	}
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s", timeout, what)
}

type jsonStore struct {
	ID      string            `json:"id"`
	Name    string            `json:"name"`
	State   string            `json:"state"`
	HostIDs []string          `json:"hostIds"`
	Details map[string]string `json:"details"`
}

type jsonHost struct {
	ID    string `json:"id"`
	State string `json:"state"`
	Caps  struct {
		QemuImgVersion string `json:"qemuImgVersion"`
		Stores         []struct {
			StoreID string `json:"storeId"`
			Error   string `json:"error"`
		} `json:"stores"`
	} `json:"capabilities"`
}

func listStores(t *testing.T, server string) []jsonStore {
	var resp struct {
		Stores []jsonStore `json:"stores"`
	}
	cliJSON(t, server, &resp, "store", "list")
	return resp.Stores
}

// hostState returns the state of host id, or "" while it is unknown.
func hostState(t *testing.T, server, id string) string {
	t.Helper()
	out, _, code := cli(t, server, "host", "get", id, "-o", "json")
	if code != 0 {
		return ""
	}
	var h jsonHost
	if err := json.Unmarshal([]byte(out), &h); err != nil {
		t.Fatalf("host get %s: %v", id, err)
	}
	return h.State
}

// controllerProc starts the controller on addr with dataDir; it serves
// https://addr.
func controllerProc(t *testing.T, addr, dataDir string, extra ...string) *proc {
	return controllerProcEnv(t, nil, addr, dataDir, extra...)
}

// controllerProcEnv is controllerProc with extra environment variables.
func controllerProcEnv(t *testing.T, env []string, addr, dataDir string, extra ...string) *proc {
	server := "https://" + addr
	controllers.Store(server, dataDir)
	p := startProcEnv(t, "controller", env, append([]string{"controller", "--listen", addr, "--data-dir", dataDir,
		"--heartbeat-interval", "200ms", "--host-timeout", "1500ms", "--log-level", "info", "--fetch-allow-cidrs", "127.0.0.0/8"}, extra...)...)
	waitFor(t, "controller /healthz", 20*time.Second, func() bool {
		if _, err := os.Stat(caFile(server)); err != nil {
			return false
		}
		resp, err := httpGet(t, server, server+"/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	return p
}

// joinToken makes a join token for host id at the controller at server
// and returns it with the CA's pin.
func joinToken(t *testing.T, server, id string, ttl time.Duration) (token, pin string) {
	t.Helper()
	var resp struct {
		Token string `json:"token"`
		CaPin string `json:"caPin"`
	}
	args := []string{"host", "token", "create", "--ttl", ttl.String()}
	if id != "" {
		args = append(args, "--host", id)
	}
	cliJSON(t, server, &resp, args...)
	if !strings.HasPrefix(resp.Token, "stj_") || !strings.HasPrefix(resp.CaPin, "sha256:") {
		t.Fatalf("host token create: %+v", resp)
	}
	return resp.Token, resp.CaPin
}

// agentProc starts an agent with stateDir; it accepts store roots in the
// test's directory, stateDir's parent. It joins with a token made for id
// (an agent whose state holds its certificate already ignores it).
func agentProc(t *testing.T, server, id, zone, cluster, stateDir string, extra ...string) *proc {
	return agentProcEnv(t, nil, server, id, zone, cluster, stateDir, extra...)
}

// agentProcEnv is agentProc with extra environment variables.
func agentProcEnv(t *testing.T, env []string, server, id, zone, cluster, stateDir string, extra ...string) *proc {
	token, pin := joinToken(t, server, id, 10*time.Minute)
	// Registered before the process's own cleanup (SIGKILL), so it runs
	// after it: the qemu-storage-daemons of qcow2 grants outlive a killed
	// agent by design (a restarted one adopts them); the test's end quits
	// them.
	t.Cleanup(func() {
		qmps, _ := filepath.Glob(filepath.Join(stateDir, "qsd", "*.qmp"))
		for _, m := range qmps {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = qsd.Quit(ctx, m)
			cancel()
		}
	})
	p := startProcEnv(t, "agent "+id, env, append([]string{"agent", "--controller", server, "--host-id", id,
		"--join-token", token, "--ca-pin", pin,
		"--listen", freePort(t), "--nbd-listen", "127.0.0.1:0", "--zone", zone, "--cluster", cluster, "--state-dir", stateDir,
		"--store-roots", filepath.Dir(stateDir), "--log-level", "info", "--fetch-allow-cidrs", "127.0.0.0/8"}, extra...)...)
	agentProcs.Store(id, p)
	return p
}

// oneHost starts a controller (with ctlArgs) and one agent, h1 in zone z1
// cluster c1 (with agentArgs), in a fresh directory, waits for h1 to be
// Up, and returns the directory, the controller's URL and the agent.
func oneHost(t *testing.T, ctlArgs, agentArgs []string) (root, server string, agent *proc) {
	t.Helper()
	root = t.TempDir()
	addr := freePort(t)
	server = "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "controller"), ctlArgs...)
	agent = agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"), agentArgs...)
	waitFor(t, "h1 Up", 20*time.Second, func() bool { return hostState(t, server, "h1") == "HOST_STATE_UP" })
	return root, server, agent
}

func curlJSON(t *testing.T, url, body string) (int, string) {
	t.Helper()
	args := []string{"-s", "-o", "-", "-w", "\n%{http_code}", "-H", "Content-Type: application/json", "-d", body}
	if ca := caFile(url); ca != "" {
		args = append(args, "--cacert", ca)
		if cfg, err := readClientConfig(filepath.Join(controllerDir(url), "admin.json")); err == nil && cfg.Token != "" {
			args = append(args, "-H", "Authorization: Bearer "+cfg.Token)
		}
	}
	out, err := exec.Command("curl", append(args, url)...).Output()
	if err != nil {
		t.Fatalf("curl %s: %v", url, err)
	}
	s := strings.TrimRight(string(out), "\n")
	i := strings.LastIndex(s, "\n")
	var code int
	fmt.Sscan(s[i+1:], &code)
	return code, s[:i]
}

func TestFoundationEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test starts processes")
	}
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("curl is required (scripts/test.sh installs it)")
	}
	root := t.TempDir()
	addr := freePort(t)
	server := "https://" + addr
	ctl := controllerProc(t, addr, filepath.Join(root, "controller"))
	agent1 := agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"))
	agent2 := agentProc(t, server, "h2", "z1", "c2", filepath.Join(root, "a2"))
	_ = agent1

	waitFor(t, "both hosts Up", 20*time.Second, func() bool {
		return hostState(t, server, "h1") == "HOST_STATE_UP" && hostState(t, server, "h2") == "HOST_STATE_UP"
	})
	var h1 jsonHost
	cliJSON(t, server, &h1, "host", "get", "h1")
	if _, err := exec.LookPath("qemu-img"); err == nil && !strings.Contains(h1.Caps.QemuImgVersion, ".") {
		t.Errorf("host h1 reports no qemu-img version: %+v", h1.Caps)
	}

	// A zone-wide primary store through the CLI: both hosts reach it.
	p1Dir := filepath.Join(root, "stores", "p1")
	var p1 jsonStore
	cliJSON(t, server, &p1, "store", "add", "--name", "p1", "--role", "primary", "--provider", "filesystem", "--url", "file://"+p1Dir, "--scope", "z1")
	if p1.State != "STORE_STATE_UP" || strings.Join(p1.HostIDs, ",") != "h1,h2" {
		t.Fatalf("p1 after add: %+v", p1)
	}
	for _, sub := range []string{"volumes", "snapshots", "templates", ".stowage-store"} {
		if _, err := os.Stat(filepath.Join(p1Dir, sub)); err != nil {
			t.Errorf("store layout: %v", err)
		}
	}
	// A cluster-scoped image store through curl with Connect JSON: only h2 is in c2.
	imgDir := filepath.Join(root, "stores", "img")
	code, body := curlJSON(t, server+"/stowage.v1.StoreService/AddStore",
		`{"name":"img1","role":"STORE_ROLE_IMAGE","provider":"filesystem","url":"file://`+imgDir+`","scope":{"zone":"z1","cluster":"c2"}}`)
	if code != 200 {
		t.Fatalf("curl AddStore: HTTP %d: %s", code, body)
	}
	var added struct{ Store jsonStore }
	if err := json.Unmarshal([]byte(body), &added); err != nil || added.Store.State != "STORE_STATE_UP" || strings.Join(added.Store.HostIDs, ",") != "h2" {
		t.Fatalf("curl AddStore: %v %s", err, body)
	}

	// The same port speaks gRPC (h2c) and gRPC-Web.
	h2c := testClient(t, server)
	for name, c := range map[string]stowagev1connect.StoreServiceClient{
		"grpc":     stowagev1connect.NewStoreServiceClient(h2c, server, connect.WithGRPC()),
		"grpc-web": stowagev1connect.NewStoreServiceClient(testClient(t, server), server, connect.WithGRPCWeb()),
	} {
		resp, err := c.ListStores(context.Background(), connect.NewRequest(&stowagev1.ListStoresRequest{}))
		if err != nil || len(resp.Msg.GetStores()) != 2 {
			t.Fatalf("%s ListStores: %v (%d stores)", name, err, len(resp.Msg.GetStores()))
		}
		_, err = c.GetStore(context.Background(), connect.NewRequest(&stowagev1.GetStoreRequest{Id: "nope"}))
		if connect.CodeOf(err) != connect.CodeNotFound {
			t.Fatalf("%s GetStore(nope): %v, want NotFound", name, err)
		}
	}

	// Bad input: a clear message, the right exit code, nothing written.
	before := listStores(t, server)
	badDir := filepath.Join(root, "stores", "bad")
	for _, tc := range []struct {
		args []string
		exit int
		want string
	}{
		{[]string{"store", "add", "--name", "x1", "--role", "primary", "--provider", "ceph", "--url", "file://" + badDir}, 2, "unknown storage provider"},
		{[]string{"store", "add", "--name", "x2", "--role", "primary", "--provider", "filesystem", "--url", "file://relative/path"}, 2, "file:///"},
		{[]string{"store", "add", "--name", "x3", "--role", "primary", "--provider", "filesystem", "--url", "file://"}, 2, "path"},
		{[]string{"store", "add", "--name", "x4", "--role", "primary", "--provider", "filesystem", "--url", "/no/scheme"}, 2, "file://"},
		{[]string{"store", "add", "--name", "p1", "--role", "primary", "--provider", "filesystem", "--url", "file://" + badDir}, 4, "already taken"},
		{[]string{"store", "add", "--name", "../etc", "--role", "primary", "--provider", "filesystem", "--url", "file://" + badDir}, 2, "store name"},
		{[]string{"store", "add", "--name", "x5", "--role", "primary", "--provider", "filesystem", "--url", "file://" + p1Dir, "--scope", "z1"}, 5, "belongs to store"},
		{[]string{"store", "add", "--name", "x6", "--role", "primary", "--provider", "filesystem", "--url", "file://" + badDir, "--scope", "nozone"}, 6, "no agent"},
		{[]string{"store", "get", "no-such-store"}, 3, "no store has that id or name"},
		{[]string{"store", "delete", "no-such-store"}, 3, "no store"},
		{[]string{"host", "get", "no-such-host"}, 3, "no host"},
		{[]string{"store", "cancel-maintain", "p1"}, 5, "not in maintenance"},
		{[]string{"store", "add", "--name", "x7", "--role", "sideways", "--url", "file://" + badDir}, 2, "--role"},
	} {
		_, errOut, code := cli(t, server, tc.args...)
		if code != tc.exit || !strings.Contains(errOut, tc.want) {
			t.Errorf("stowage %v: exit %d (want %d), stderr %q (want %q)", tc.args, code, tc.exit, errOut, tc.want)
		}
	}
	if after := listStores(t, server); len(after) != len(before) {
		t.Fatalf("bad input changed the stores: %d before, %d after", len(before), len(after))
	}
	if _, err := os.Stat(badDir); !os.IsNotExist(err) {
		t.Errorf("a refused add left %s behind (%v)", badDir, err)
	}
	// curl gets the Connect error code in JSON.
	code, body = curlJSON(t, server+"/stowage.v1.StoreService/AddStore", `{"name":"x","role":"STORE_ROLE_PRIMARY","provider":"filesystem","url":"file://rel"}`)
	if code != 400 || !strings.Contains(body, `"invalid_argument"`) {
		t.Errorf("curl bad AddStore: HTTP %d %s", code, body)
	}

	// Maintenance: Up -> Maintenance; maintaining again is refused; cancel -> Up.
	var st jsonStore
	cliJSON(t, server, &st, "store", "maintain", "p1")
	if st.State != "STORE_STATE_MAINTENANCE" {
		t.Fatalf("after maintain: %s", st.State)
	}
	if _, errOut, code := cli(t, server, "store", "maintain", "p1"); code != 5 || !strings.Contains(errOut, "Maintenance") {
		t.Errorf("maintain twice: exit %d %q", code, errOut)
	}
	cliJSON(t, server, &st, "store", "cancel-maintain", "p1")
	if st.State != "STORE_STATE_UP" {
		t.Fatalf("after cancel-maintain: %s", st.State)
	}

	// A store that holds an object cannot be deleted, and stays intact.
	obj := filepath.Join(p1Dir, "volumes", "v1.raw")
	if err := os.WriteFile(obj, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, errOut, code := cli(t, server, "store", "delete", "p1"); code != 5 || !strings.Contains(errOut, "still holds") {
		t.Errorf("delete non-empty store: exit %d %q", code, errOut)
	}
	cliJSON(t, server, &st, "store", "get", "p1")
	if st.State != "STORE_STATE_UP" {
		t.Fatalf("refused delete changed the store: %+v", st)
	}

	// kill -9 the controller: nothing is lost, agents carry on.
	ctl.kill(syscall.SIGKILL)
	ctl = controllerProc(t, addr, filepath.Join(root, "controller"))
	after := listStores(t, server)
	if len(after) != 2 {
		t.Fatalf("after controller kill -9: %d stores, want 2", len(after))
	}
	for _, s := range after {
		if s.State != "STORE_STATE_UP" {
			t.Errorf("after restart store %s is %s", s.Name, s.State)
		}
	}
	waitFor(t, "hosts Up after controller restart", 10*time.Second, func() bool {
		return hostState(t, server, "h1") == "HOST_STATE_UP" && hostState(t, server, "h2") == "HOST_STATE_UP"
	})

	// Stop agent 2: it goes Disconnected; start it again: Up.
	agent2.kill(syscall.SIGKILL)
	waitFor(t, "h2 Disconnected", 15*time.Second, func() bool { return hostState(t, server, "h2") == "HOST_STATE_DISCONNECTED" })
	if hostState(t, server, "h1") != "HOST_STATE_UP" {
		t.Errorf("h1 should stay Up while h2 is down")
	}
	agent2 = agentProc(t, server, "h2", "z1", "c2", filepath.Join(root, "a2"))
	waitFor(t, "h2 Up again", 15*time.Second, func() bool { return hostState(t, server, "h2") == "HOST_STATE_UP" })

	// Empty the store, delete it: gone from the list, marker released, data dir kept.
	if err := os.Remove(obj); err != nil {
		t.Fatal(err)
	}
	if out, errOut, code := cli(t, server, "store", "delete", "p1"); code != 0 {
		t.Fatalf("delete p1: exit %d %s %s", code, out, errOut)
	}
	if _, _, code := cli(t, server, "store", "get", "p1"); code != 3 {
		t.Errorf("deleted store still found (exit %d)", code)
	}
	if _, err := os.Stat(filepath.Join(p1Dir, ".stowage-store")); !os.IsNotExist(err) {
		t.Errorf("marker still present after delete: %v", err)
	}
	// The name is free again, and so is the directory.
	cliJSON(t, server, &st, "store", "add", "--name", "p1", "--role", "primary", "--url", "file://"+p1Dir, "--scope", "z1")
	if st.State != "STORE_STATE_UP" {
		t.Fatalf("re-add p1: %+v", st)
	}

	// Human output and metrics.
	out, _, code := cli(t, server, "store", "list")
	if code != 0 || !strings.Contains(out, "p1") || !strings.Contains(out, "Up") || !strings.Contains(out, "NAME") {
		t.Errorf("store list table:\n%s", out)
	}
	resp, err := httpGet(t, server, server+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`stowage_rpc_requests_total{code="not_found"`, `stowage_hosts{state="Up"} 2`, `stowage_stores{role="Primary",state="Up"} 1`} {
		if !bytes.Contains(metrics, []byte(want)) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

var agentProcs sync.Map // host id -> *proc, for the kill tests

func killAgent(t *testing.T, host string) {
	t.Helper()
	p, ok := agentProcs.Load(host)
	if !ok {
		t.Fatalf("no agent process for %s", host)
	}
	p.(*proc).kill(syscall.SIGKILL)
}

func restartAgent(t *testing.T, server, host, root string) {
	t.Helper()
	p := agentProc(t, server, host, "z1", "c1", filepath.Join(root, map[string]string{"h1": "a1", "h2": "a2"}[host]))
	agentProcs.Store(host, p)
	waitFor(t, host+" Up again", 20*time.Second, func() bool { return hostState(t, server, host) == "HOST_STATE_UP" })
}

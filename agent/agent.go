// Package agent is the doing side of Stowage: one agent runs on every
// hypervisor host (a systemd service). It registers with the controller,
// heartbeats with its capabilities and the stores it can reach, and serves
// AgentService, which runs host-side steps (store layout, probes, image
// downloads, copies, clones, snapshots, backups, exports) on the local
// machine through a journal keyed by task id, so a step the controller
// retries runs once. Long steps report progress through GetTask while
// RunTask blocks.
//
// Objects, not paths. Every step names objects as (store id, key)
// (hostops.Ref); LocalHost, the agent's hostops.Host, resolves them with
// its Resolver beneath the root of a store the agent serves and runs the
// step on agent/hostfs. The agent serves a store once hostfs found the
// store's marker in its directory: after PrepareStore or ProbeStore, or a
// StoreAssignment from the controller (probed at registration and every
// heartbeat). A key is relative and clean (no "..", no NUL, not the marker
// nor a temporary name), and openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)
// from the root's descriptor proves it stays beneath the root without
// following a symbolic link. Store roots themselves must pass the
// RootPolicy (--store-roots; never /, /etc, /proc, /sys, /dev, /boot, /usr,
// /bin, /sbin, /lib*, nor the agent's state). The store id
// hostops.TemplateMount names the host's read-only template mount (key: a
// template id), for clone bases and reads only. Sources are store://,
// http(s):// and nbd://; downloads read http(s):// and, only beneath the
// agent's --import-dir (ImportDir), file://; never a path. A task naming
// anything else is refused before it is journalled, with permission_denied
// as the RPC's code (dispatch.go: admit, then Execute, which turns a wire
// Task into a call on the host).
//
// The same listener serves the read-only file exports other agents copy
// from (agent/exports, under /exports/). With WithNBD it serves NBD on its
// own listener (Config.NBDListen, :10809 by default in cmd/stowage): images
// exported under unguessable names (agent/nbdexports) for hosts that
// cannot open a volume's file directly. Exports of both kinds may expire
// and, with their state files, survive an agent restart.
// With WithImageCache it reports the host's template mount (a separate
// long-lived process, agent/cachemount) in its heartbeats and passes the
// controller's desired templates on to it.
//
// The agent decides nothing about placement; it owns host state and reports it.
package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"connectrpc.com/grpcreflect"
	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/google/uuid"

	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/agent/nbdexports"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/errdefs/errconnect"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/rpclimit"
	"github.com/stowage/stowage/trust"
)

// Config is how an agent is set up; cmd/stowage fills it from flags.
type Config struct {
	ControllerURL string
	HostID        string
	Hostname      string
	Listen        string // AgentService address, e.g. ":8471"
	AdvertiseURL  string // how the controller reaches AgentService; derived from Listen if empty
	// NBDListen is the address of the NBD server ("" serves no NBD).
	NBDListen string
	// ISCSITarget makes this host a target host of iSCSI stores (its tgtd
	// is managed with tgtadm -C TGTControlPort).
	ISCSITarget    bool
	TGTControlPort int
	// ISCSIUserspace lets this host reach LUNs through libiscsi in
	// qemu-img (off: it gets LUNs over NBD from their target host).
	ISCSIUserspace bool
	// NBDTLS is "auto" (TLS offered; required unless NBDListen is a
	// loopback address) or "require"; cmd/stowage wires it.
	NBDTLS string
	// NBDAddress is the host:port other hosts reach the NBD server at,
	// reported to the controller and used in nbd:// URIs; derived from
	// NBDListen's port and the advertise URL's host if empty.
	NBDAddress string
	IQN        string
	Zone       string
	Cluster    string
	StateDir   string
	Version    string
	// ImageCacheSocket is the unix socket of the host's template mount
	// process ("" for none); cmd/stowage wires it with WithImageCache.
	ImageCacheSocket string
	// StoreRoots are the directories store roots may be or lie beneath
	// (--store-roots; empty: DefaultStoreRoots). System directories are
	// refused whatever it says (RootPolicy).
	StoreRoots []string
	// FetchAllowCIDRs are the otherwise refused addresses (loopback,
	// private, link-local) template downloads may connect to
	// (--fetch-allow-cidrs, comma list).
	FetchAllowCIDRs string
	// FetchRetryWindow is how long a template download keeps retrying a
	// source that went away before its step fails as unavailable
	// (--fetch-retry-window; hostfs.WithFetchRetryWindow).
	FetchRetryWindow time.Duration
	// ImportDir is the directory file:// template and ISO URLs are read
	// from (--import-dir; "": file:// tasks are refused). It must pass the
	// store roots' policy (StoreRoots).
	ImportDir string
	// ReservedDirs are directories no store root may contain or lie in,
	// besides StateDir (stowage dev: the controller's database).
	ReservedDirs []string
}

// Agent is one running agent.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	host    *LocalHost
	svc     *service
	exports *exports.Server
	nbd     *nbdexports.Server
	control stowagev1connect.AgentControlServiceClient
	session string
	stop    context.CancelFunc // cancels every running task

	cache  ImageCache
	limits rpclimit.Limits
	creds  *Credentials
	// first are the interceptors that run before the agent's own on
	// AgentService (WithInterceptors).
	first []connect.Interceptor

	mu          sync.Mutex
	cacheSync   sync.Mutex                   // one sync with the cache process at a time (heartbeat, show_template)
	cacheSpec   *stowagev1.TemplateCacheSpec // last desired set sent to the cache
	cacheSynced time.Time
	cacheWarned time.Time
	stores      []*stowagev1.StoreAssignment
	interval    time.Duration
	ready       chan struct{}
	readyOne    sync.Once
}

// Option configures an Agent.
type Option func(*Agent)

// WithExports serves x's exports under exports.Prefix on the agent's
// listener and announces them under the agent's advertise URL. Give the
// same x to the hostfs.Local (hostfs.WithExporter) that makes them.
func WithExports(x *exports.Server) Option { return func(a *Agent) { a.exports = x } }

// WithNBD serves x's exports on Config.NBDListen while Run runs and
// announces them under Config.NBDAddress (or the address derived from the
// listener). Give the same x to the hostfs.Local (hostfs.WithNBDExporter).
func WithNBD(x *nbdexports.Server) Option { return func(a *Agent) { a.nbd = x } }

// WithCredentials makes the agent speak mutual TLS with creds (Enrol):
// its listener serves TLS with its certificate, AgentService answers only
// the controller's certificate, its calls to the controller present its
// own, and Run renews it before it expires. The exports on the same
// listener answer any peer with a certificate of the controller's CA and
// the export's unguessable token in its URL; a client without a
// certificate fails the TLS handshake. cmd/stowage always gives credentials;
// without them (package tests) the agent speaks plain HTTP.
func WithCredentials(c *Credentials) Option { return func(a *Agent) { a.creds = c } }

// WithLimits bounds every request the agent's listener reads (AgentService
// and the exports) by l; without it, rpclimit.Default().
func WithLimits(l rpclimit.Limits) Option { return func(a *Agent) { a.limits = l } }

// WithInterceptors runs is first on every AgentService call (e.g. the
// tracing interceptor, so a call refused later is traced too).
func WithInterceptors(is ...connect.Interceptor) Option {
	return func(a *Agent) { a.first = append(a.first, is...) }
}

// WithTaskGrace sets how long a task keeps running after its last caller
// went away (default 2 minutes): long enough for a controller restart to
// send the same task id again and wait for it.
func WithTaskGrace(d time.Duration) Option {
	return func(a *Agent) {
		if d > 0 {
			a.svc.journal.grace = d
		}
	}
}

// journalRetention is how long a finished task's result answers a retry of
// the same task id.
const journalRetention = 24 * time.Hour

// New builds an agent that runs steps on fs, within the stores it serves
// (LocalHost, with the RootPolicy of cfg.StoreRoots).
func New(cfg Config, fs *hostfs.Local, log *slog.Logger, opts ...Option) (*Agent, error) {
	if cfg.ControllerURL == "" {
		return nil, fmt.Errorf("agent: --controller URL is required: %w", errdefs.ErrInvalid)
	}
	if cfg.HostID == "" {
		return nil, fmt.Errorf("agent: --host-id is required: %w", errdefs.ErrInvalid)
	}
	if cfg.StateDir == "" {
		return nil, fmt.Errorf("agent: --state-dir is required: %w", errdefs.ErrInvalid)
	}
	roots := cfg.StoreRoots
	if len(roots) == 0 {
		roots = DefaultStoreRoots
	}
	policy, err := NewRootPolicy(roots, append([]string{cfg.StateDir}, cfg.ReservedDirs...)...)
	if err != nil {
		return nil, fmt.Errorf("agent: --store-roots: %w", err)
	}
	host := NewLocalHost(fs, policy)
	host.scratch = filepath.Join(cfg.StateDir, "scratch")
	imports, err := NewImportDir(cfg.ImportDir, policy)
	if err != nil {
		return nil, fmt.Errorf("agent: --import-dir: %w", err)
	}
	host.SetImportDir(imports)
	j, err := openJournal(cfg.StateDir+"/tasks", journalRetention)
	if err != nil {
		return nil, err
	}
	control, err := newControlClient(http.DefaultClient, cfg.ControllerURL)
	if err != nil {
		return nil, err
	}
	// Tasks outlive the RPC that started them, not the agent.
	base, stop := context.WithCancel(context.Background())
	j.base = base
	a := &Agent{
		cfg:      cfg,
		log:      log.With("host", cfg.HostID),
		host:     host,
		svc:      &service{host: host, journal: j, log: log.With("host", cfg.HostID)},
		control:  control,
		session:  uuid.NewString(),
		stop:     stop,
		interval: 3 * time.Second,
		ready:    make(chan struct{}),
		limits:   rpclimit.Default(),
	}
	a.svc.ready = a.ready
	for _, o := range opts {
		o(a)
	}
	if a.cache != nil {
		a.svc.showTemplate = a.showTemplate
	}
	if a.creds != nil {
		if a.control, err = newControlClient(a.creds.HTTPClient(), cfg.ControllerURL); err != nil {
			return nil, err
		}
	}
	if a.exports != nil && cfg.AdvertiseURL != "" {
		a.exports.SetBaseURL(cfg.AdvertiseURL)
	}
	return a, nil
}

// Handler serves AgentService, gRPC reflection and health, the exports
// (with WithExports) and /healthz,
// every request bounded by the agent's limits (WithLimits); Run serves it
// on the agent's listener, tests on their own.
func (a *Agent) Handler() http.Handler {
	mux := http.NewServeMux()
	interceptors := append(slices.Clone(a.first), errconnect.Interceptor())
	if a.creds != nil {
		interceptors = append(interceptors, controllerOnly(a.log))
	}
	path, h := stowagev1connect.NewAgentServiceHandler(a.svc, a.limits.HandlerOptions(), connect.WithInterceptors(interceptors...))
	mux.Handle(path, h)
	// gRPC reflection (the controller's only, as AgentService) and
	// health (any enrolled peer: the listener's mutual TLS is the gate) for
	// grpcurl and grpc_health_probe. The agent is SERVING while it serves.
	service := strings.Trim(path, "/")
	reflector := grpcreflect.NewStaticReflector(service, grpchealth.HealthV1ServiceName, grpcreflect.ReflectV1ServiceName)
	ropts := connect.WithHandlerOptions(a.limits.HandlerOptions(), connect.WithInterceptors(interceptors...))
	mux.Handle(grpcreflect.NewHandlerV1(reflector, ropts))
	mux.Handle(grpcreflect.NewHandlerV1Alpha(reflector, ropts))
	mux.Handle(grpchealth.NewHandler(grpchealth.NewStaticChecker(service), a.limits.HandlerOptions(), connect.WithInterceptors(errconnect.Interceptor())))
	if a.exports != nil {
		mux.Handle(exports.Prefix, a.exports)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	return a.limits.Wrap(trust.WithPeer(mux))
}

// Host is the agent's local host: the stores it serves and their resolver.
func (a *Agent) Host() *LocalHost { return a.host }

// Close cancels the tasks still running; Run does it when it returns.
func (a *Agent) Close() { a.stop() }

// Ready is closed once the agent has registered.
func (a *Agent) Ready() <-chan struct{} { return a.ready }

// Run serves AgentService on cfg.Listen, registers, and heartbeats until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", a.cfg.Listen)
	if err != nil {
		return fmt.Errorf("agent: listen %s: %w", a.cfg.Listen, err)
	}
	defer a.Close()
	scheme := "http"
	if a.creds != nil {
		scheme = "https"
		// Every peer is enrolled: a client without a certificate of the
		// controller's CA fails the handshake. AgentService then answers
		// the controller only; exports any enrolled peer with the URL's
		// token.
		ln = tls.NewListener(ln, trust.ServerConfig(a.creds.KeyPair, a.creds.Roots(), tls.RequireAnyClientCert, nil))
	}
	if a.cfg.AdvertiseURL == "" {
		a.cfg.AdvertiseURL = advertiseURL(scheme, ln.Addr())
	}
	// An enrolled agent's controller knows it from before (a restart) and
	// may call before the registration below: tasks wait for it.
	a.svc.gated.Store(a.creds != nil)
	if a.exports != nil {
		a.exports.SetBaseURL(a.cfg.AdvertiseURL)
		go a.exports.Run(ctx) // removes expired exports
	}
	nbdErr := make(chan error, 1)
	if a.nbd != nil && a.cfg.NBDListen != "" {
		nl, err := net.Listen("tcp", a.cfg.NBDListen)
		if err != nil {
			ln.Close()
			return fmt.Errorf("agent: NBD listen %s (--nbd-listen; \"\" serves no NBD): %w", a.cfg.NBDListen, err)
		}
		a.mu.Lock()
		if a.cfg.NBDAddress == "" {
			a.cfg.NBDAddress = nbdAddress(a.cfg.AdvertiseURL, nl.Addr())
		}
		a.mu.Unlock()
		a.nbd.SetAddress(a.NBDAddress())
		nbdCtx, stopNBD := context.WithCancel(ctx)
		defer func() {
			stopNBD()
			_ = a.nbd.Close()
		}()
		go func() { nbdErr <- a.nbd.Serve(nbdCtx, nl) }()
		a.log.Info("NBD server listening", "addr", nl.Addr().String(), "advertise", a.NBDAddress())
	}
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetHTTP2(true)
	protocols.SetUnencryptedHTTP2(a.creds == nil)
	// Header and idle bounds; no ReadTimeout: RunTask answers when its task
	// ends and exports stream whole images (bodies are bounded by Handler).
	srv := rpclimit.NewServer(a.Handler(), &protocols)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	a.log.Info("agent service listening", "addr", ln.Addr().String(), "advertise", a.cfg.AdvertiseURL)

	// Finished tasks' results expire while the agent runs, not only at start.
	go a.svc.journal.sweep(ctx, sweepEvery)

	loopErr := make(chan error, 1)
	go func() { loopErr <- a.loop(ctx) }()
	if a.creds != nil {
		go a.creds.Renew(ctx, a.control, a.cfg.HostID, func() []string { return AddressesOf(a.cfg.AdvertiseURL, a.NBDAddress()) }, a.log)
	}

	select {
	case err = <-serveErr:
	case err = <-loopErr:
	case err = <-nbdErr:
	case <-ctx.Done():
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutdown)
	if err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// NBDAddress is the host:port of the agent's NBD server as reported to the
// controller ("" when it serves none or Run has not started it yet).
func (a *Agent) NBDAddress() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cfg.NBDAddress
}

// nbdAddress is the host of the advertise URL (how other hosts reach this
// agent) with the NBD listener's port.
func nbdAddress(advertise string, addr net.Addr) string {
	_, port, err := net.SplitHostPort(addr.String())
	if err != nil {
		return addr.String()
	}
	if u, err := url.Parse(advertise); err == nil && u.Hostname() != "" {
		return net.JoinHostPort(u.Hostname(), port)
	}
	return net.JoinHostPort("127.0.0.1", port)
}

func advertiseURL(scheme string, addr net.Addr) string {
	tcp, ok := addr.(*net.TCPAddr)
	if !ok {
		return scheme + "://" + addr.String()
	}
	host := tcp.IP.String()
	if tcp.IP.IsUnspecified() {
		host = "127.0.0.1"
		if h, err := outboundIP(); err == nil {
			host = h
		}
	}
	return scheme + "://" + net.JoinHostPort(host, fmt.Sprint(tcp.Port))
}

// outboundIP is the first non-loopback address of the host; the controller
// reaches the agent there when it listens on all interfaces.
func outboundIP() (string, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return "", err
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && !n.IP.IsLoopback() && n.IP.To4() != nil {
			return n.IP.String(), nil
		}
	}
	return "", errors.New("no non-loopback address")
}

// loop registers (retrying with backoff) and then heartbeats; a controller
// that no longer knows this session asks for a new registration.
func (a *Agent) loop(ctx context.Context) error {
	backoff := 250 * time.Millisecond
	registered := false
	for {
		if !registered {
			if err := a.register(ctx); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				a.log.Warn("registration failed; retrying", "err", err, "in", backoff)
				if !sleep(ctx, backoff) {
					return nil
				}
				backoff = min(backoff*2, 10*time.Second)
				continue
			}
			registered, backoff = true, 250*time.Millisecond
		}
		a.mu.Lock()
		interval := a.interval
		a.mu.Unlock()
		if !sleep(ctx, interval) {
			return nil
		}
		again, err := a.heartbeat(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			a.log.Warn("heartbeat failed", "err", err)
			continue
		}
		if again {
			a.log.Info("controller asked for a new registration")
			registered = false
		}
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func (a *Agent) register(ctx context.Context) error {
	caps := a.capabilities(ctx)
	resp, err := a.control.Register(ctx, connect.NewRequest(&stowagev1.RegisterRequest{
		HostId:       a.cfg.HostID,
		Hostname:     a.cfg.Hostname,
		AgentUrl:     a.cfg.AdvertiseURL,
		NbdAddress:   a.NBDAddress(),
		Iqn:          a.cfg.IQN,
		Zone:         a.cfg.Zone,
		Cluster:      a.cfg.Cluster,
		Capabilities: caps,
		SessionId:    a.session,
	}))
	if err != nil {
		return errconnect.FromConnect(err)
	}
	a.mu.Lock()
	a.stores = resp.Msg.GetStores()
	if ms := resp.Msg.GetHeartbeatIntervalMs(); ms > 0 {
		a.interval = time.Duration(ms) * time.Millisecond
	}
	a.mu.Unlock()
	// Serve the assigned stores at once (a restarted agent knows none),
	// not only from the first heartbeat on.
	a.probeStores(ctx, resp.Msg.GetStores())
	a.log.Info("registered with controller", "controller", a.cfg.ControllerURL, "state", resp.Msg.GetHost().GetState().String(), "stores", len(resp.Msg.GetStores()))
	a.readyOne.Do(func() {
		close(a.ready)
		if ok, err := daemon.SdNotify(false, daemon.SdNotifyReady+"\nSTATUS=registered as host "+a.cfg.HostID); err != nil {
			a.log.Warn("sd_notify failed", "err", err)
		} else if ok {
			a.log.Debug("notified systemd: READY")
		}
	})
	return nil
}

func (a *Agent) heartbeat(ctx context.Context) (reregister bool, err error) {
	caps := a.capabilities(ctx)
	resp, err := a.control.Heartbeat(ctx, connect.NewRequest(&stowagev1.HeartbeatRequest{
		HostId:        a.cfg.HostID,
		SessionId:     a.session,
		Capabilities:  caps,
		InFlightTasks: a.svc.journal.inFlight(),
		CopyEngine:    copyEngineCounters(),
	}))
	if err != nil {
		return false, errconnect.FromConnect(err)
	}
	a.mu.Lock()
	a.stores = resp.Msg.GetStores()
	a.mu.Unlock()
	a.syncCache(ctx, resp.Msg.GetTemplateCache())
	_, _ = daemon.SdNotify(false, daemon.SdNotifyWatchdog)
	return resp.Msg.GetReregister(), nil
}

package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"connectrpc.com/connect"
	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"

	"github.com/stowage/stowage/controller/api"
	"github.com/stowage/stowage/controller/apiauth"
	"github.com/stowage/stowage/controller/datastore"
	"github.com/stowage/stowage/controller/endpoint"
	"github.com/stowage/stowage/controller/enrol"
	"github.com/stowage/stowage/controller/hosts"
	"github.com/stowage/stowage/controller/image"
	"github.com/stowage/stowage/controller/jobs"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/controller/motion"
	"github.com/stowage/stowage/controller/orphans"
	"github.com/stowage/stowage/controller/snapshot"
	"github.com/stowage/stowage/controller/volume"
	"github.com/stowage/stowage/controller/web"
	"github.com/stowage/stowage/datapath/netguard"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	"github.com/stowage/stowage/rpclimit"
	"github.com/stowage/stowage/trust"
)

type controllerConfig struct {
	listen            string
	dataDir           string
	heartbeatInterval time.Duration
	hostTimeout       time.Duration
	mountTransport    string
	maxRequestBytes   int
	jobRetention      time.Duration
	fetchAllowCIDRs   string
	certTTL           time.Duration
	tlsSANs           []string
	maxJobsPerCaller  int
	metricsPublic     bool
	importDir         string
	orphanGrace       time.Duration
	orphanInterval    time.Duration
	metadata          string
	etcd              meta.EtcdOptions
	leaderLease       time.Duration
	advertiseURL      string
	capacity          datastore.Thresholds
	otlp              tracingFlags
}

func (c *controllerConfig) flags(cmd *cobra.Command, defaultDataDir string) {
	f := cmd.Flags()
	f.StringVar(&c.listen, "listen", "127.0.0.1:8470", "address of the API (Connect, gRPC, gRPC-Web over TLS; agents call it with mutual TLS), /metrics and /healthz")
	f.StringVar(&c.dataDir, "data-dir", defaultDataDir, "directory of the controller's PKI (CA, CHAP key), bootstrap admin token, and of the metadata unless --metadata names another place")
	f.StringVar(&c.metadata, "metadata", "", "where the metadata lives: a directory (embedded Badger: one controller) or etcd://host:port[,host:port...]/prefix (an etcd cluster several controllers share; one leads); default: the --data-dir")
	f.StringVar(&c.etcd.CACert, "etcd-cacert", "", "CA bundle of the etcd members' certificates (enables TLS to etcd)")
	f.StringVar(&c.etcd.Cert, "etcd-cert", "", "client certificate for etcd (mutual TLS)")
	f.StringVar(&c.etcd.Key, "etcd-key", "", "client key for etcd")
	f.StringVar(&c.etcd.Username, "etcd-user", "", "etcd user (when the cluster has auth enabled)")
	f.StringVar(&c.etcd.PasswordFile, "etcd-password-file", "", "file holding the etcd user's password")
	f.IntVar(&c.etcd.MaxTxnOps, "etcd-max-txn-ops", 128, "the etcd cluster's --max-txn-ops")
	f.Float64Var(&c.capacity.Disable, "capacity-disable-threshold", datastore.DefaultThresholds.Disable, "fraction of a store's capacity in use at which no new object is placed on it, for stores without their own (stowage store update --disable-threshold)")
	f.Float64Var(&c.capacity.Notify, "capacity-notify-threshold", datastore.DefaultThresholds.Notify, "fraction of a store's capacity in use above which the StowageStoreCapacityNotify alert fires, for stores without their own")
	c.otlp.register(cmd)
	f.DurationVar(&c.leaderLease, "leader-lease", 10*time.Second, "with etcd metadata: the leader's lease; after a leader dies another controller takes over within it")
	f.StringVar(&c.advertiseURL, "advertise-url", "", "URL agents and clients reach this controller at, given to them by the other controllers when this one leads (default: https:// and the --listen address)")
	f.DurationVar(&c.heartbeatInterval, "heartbeat-interval", 3*time.Second, "how often agents heartbeat")
	f.DurationVar(&c.hostTimeout, "host-timeout", 12*time.Second, "a host without a heartbeat for this long is Disconnected")
	f.StringVar(&c.fetchAllowCIDRs, "fetch-allow-cidrs", "", "comma list of CIDRs template imports in the controller (S3 stores) may reach although the address policy refuses them (loopback, private incl. 100.64.0.0/10 and fc00::/7, link-local, unspecified, reserved, multicast; also as embedded in ::ffff:, NAT64 and 6to4 addresses)")
	f.StringVar(&c.importDir, "import-dir", "", "absolute directory file:// template and ISO URLs must lie beneath (read by the agent, beneath its own --import-dir); empty: file:// URLs are refused")
	f.DurationVar(&c.jobRetention, "job-retention", 7*24*time.Hour, "how long finished jobs are kept (0: forever)")
	f.IntVar(&c.maxRequestBytes, "max-request-bytes", rpclimit.DefaultMaxRequestBytes, "largest request message the API accepts, after decompression (bigger ones: resource_exhausted)")
	f.DurationVar(&c.certTTL, "cert-ttl", trust.DefaultTTL, "validity of the certificates the controller's CA issues (its own and agents'); they are renewed at two thirds of it")
	f.IntVar(&c.maxJobsPerCaller, "max-jobs-per-caller", jobs.DefaultMaxJobsPerCaller, "unfinished jobs one API token may have at once (more: resource_exhausted); 0: no limit")
	f.BoolVar(&c.metricsPublic, "metrics-public", false, "serve /metrics without a token (by default it needs a reader token, as Prometheus' bearer_token sends)")
	f.StringSliceVar(&c.tlsSANs, "tls-san", nil, "extra DNS names or IP addresses for the controller's certificate (besides localhost, the hostname, loopback and the --listen host)")
	f.DurationVar(&c.orphanGrace, "orphan-grace", orphans.DefaultGrace, "how long an object, backup chunk or export no record accounts for must have been seen so (and unmodified) before the orphan reconciler removes it")
	f.DurationVar(&c.orphanInterval, "orphan-interval", 10*time.Minute, "how often the orphan reconciler sweeps the Up stores (it also sweeps at start); 0: never")
	f.StringVar(&c.mountTransport, "template-mount-transport", image.MountTransportHTTP, "how hosts' template mounts read a template from an agent holding its image store: http (read-only HTTP export) or nbd (read-only NBD export)")
}

func newControllerCmd() *cobra.Command {
	var cfg controllerConfig
	cmd := &cobra.Command{
		Use:   "controller",
		Short: "Run the controller: metadata and the API",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(cmd)
			if err != nil {
				return err
			}
			return runController(cmd.Context(), cfg, log, func(addr string) {
				notifySystemd("serving on " + addr)
			})
		},
	}
	cfg.flags(cmd, "/var/lib/stowage/controller")
	return cmd
}

// runController assembles the controller and serves until ctx ends; ready
// is called with the listening address once it serves.
func runController(ctx context.Context, cfg controllerConfig, log *slog.Logger, ready func(addr string)) error {
	// One set of request bounds for every handler on the API port.
	limits := rpclimit.Limits{MaxRequestBytes: cfg.maxRequestBytes}
	if err := limits.Check(); err != nil {
		return usageError{fmt.Errorf("--max-request-bytes: %w", err)}
	}
	if cfg.importDir != "" && (!filepath.IsAbs(cfg.importDir) || filepath.Clean(cfg.importDir) != cfg.importDir || cfg.importDir == "/") {
		return usageError{fmt.Errorf("--import-dir %q: want an absolute clean directory other than /: %w", cfg.importDir, errdefs.ErrInvalid)}
	}
	spec := cfg.metadata
	if spec == "" {
		spec = cfg.dataDir
	}
	db, err := meta.Open(spec, meta.WithLogger(log), meta.WithEtcd(cfg.etcd))
	if err != nil {
		return err
	}
	defer db.Close()
	self := cfg.advertiseURL
	if self == "" {
		self = "https://" + advertised(cfg.listen)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	traced, flushTraces, err := cfg.otlp.setup(ctx, "stowage-controller", self, log)
	if err != nil {
		return err
	}
	defer flushTraces()

	if cfg.certTTL < 5*time.Second {
		return usageError{fmt.Errorf("--cert-ttl %s: at least 5s: %w", cfg.certTTL, errdefs.ErrInvalid)}
	}
	// The controller's CA and certificate: every agent call is mutual TLS.
	tr, err := newControllerTrust(cfg.dataDir, cfg.listen, cfg.tlsSANs, cfg.certTTL)
	if err != nil {
		return err
	}
	hostSvc := hosts.New(db, nil, hosts.Config{HeartbeatInterval: cfg.heartbeatInterval, Timeout: cfg.hostTimeout}, log)
	// Calls to agents carry the trace of the step that makes them.
	selector := endpoint.New(hostSvc, tr.agentClient, hostops.WithClientOptions(connect.WithInterceptors(traced)))
	guard, err := netguard.Parse(cfg.fetchAllowCIDRs)
	if err != nil {
		return fmt.Errorf("--fetch-allow-cidrs: %w", err)
	}
	chap, err := chapKey(cfg.dataDir)
	if err != nil {
		return err
	}
	providers := builtinProviders(selector, guard.Client(nil), tr.peerClient(), chap)
	mover := motion.NewMover(providers, selector)
	storeSvc := datastore.New(db, providers, log)
	if err := storeSvc.SetDefaults(cfg.capacity); err != nil {
		return fmt.Errorf("--capacity-*-threshold: %w", err)
	}
	hostSvc.SetStoreWatcher(storeSvc)
	reg.MustRegister(newStateCollector(db, storeSvc), newCopyEngineCollector(hostSvc.CopyEngine))

	runner := jobs.New(db, log.With("component", "jobs"))
	reg.MustRegister(runner.Collectors()...)
	runner.SetMaxJobsPerCaller(cfg.maxJobsPerCaller)
	// A job resumed in Cancelling cancels its steps' tasks on their agents.
	runner.SetTaskCanceller(selector)
	// A job's capacity reservation ends with the job, and still counts
	// until a heartbeat sent after it has reported the store's free space.
	runner.SetOnEnd(storeSvc.Release)
	storeSvc.SetReservationGrace(2 * cfg.heartbeatInterval)
	// API tokens: the first start writes an admin token (DATA/admin.token)
	// and a client configuration with it (DATA/admin.json), both 0600.
	tokens := apiauth.NewTokens(db)
	if err := tokens.Bootstrap(ctx, filepath.Join(cfg.dataDir, adminTokenFile)); err != nil {
		return fmt.Errorf("bootstrap admin token: %w", err)
	}
	if err := writeAdminConfig(cfg.dataDir, "https://"+advertised(cfg.listen), tr.ca.PEM()); err != nil {
		return err
	}
	authGuard := apiauth.NewGuard(tokens, log.With("component", "auth"))
	metricsAuth := func(h http.Handler) http.Handler { return authGuard.RequireRole(apiauth.RoleReader, h) }
	if cfg.metricsPublic {
		metricsAuth = nil
	}
	imageSvc := image.New(db, storeSvc, selector, mover, runner, log, image.WithImportDir(cfg.importDir))
	volumeSvc := volume.New(db, storeSvc, imageSvc, selector, mover, runner, providers, log)
	// What every host's FUSE template mount shows, handed out in heartbeats.
	mounts, err := image.NewMounts(db, storeSvc, hostSvc, cfg.mountTransport, cfg.heartbeatInterval, log.With("component", "mounts"))
	if err != nil {
		return fmt.Errorf("--template-mount-transport: %w", errors.Join(err, errdefs.ErrInvalid))
	}
	hostSvc.SetMountSpecs(mounts)
	volumeSvc.SetMounts(mounts)
	orphanSweeper := orphans.New(db, storeSvc, cfg.orphanGrace, log.With("component", "orphans"), mounts)
	reg.MustRegister(orphanSweeper.Collectors()...)
	snapshotSvc := snapshot.New(db, storeSvc, volumeSvc, selector, runner, log)

	gate := api.NewLeaderGate(db.Leader)
	handler := api.NewHandler(api.Services{
		Leader:      gate,
		Tracing:     traced,
		UI:          web.Handler(), // the dashboard, /ui/
		Stores:      storeSvc,
		Hosts:       hostSvc,
		Enrol:       enrol.New(db, tr.ca, cfg.certTTL, log.With("component", "enrol")),
		Images:      imageSvc,
		Volumes:     volumeSvc,
		Snapshots:   snapshotSvc,
		Jobs:        runner,
		Tokens:      tokens,
		Metadata:    metadataService{db}, // backups (admin only): cmd/stowage/metadata.go
		Auth:        authGuard,
		MetricsAuth: metricsAuth,
		Health:      func(ctx context.Context) error { _, err := db.SchemaVersion(ctx); return err },
	}, reg, limits)

	ln, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return fmt.Errorf("controller: listen %s: %w", cfg.listen, err)
	}
	srv := rpclimit.NewServer(handler, api.Protocols())
	srv.TLSConfig = tr.serverTLS()
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.ServeTLS(ln, "", "") }()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// What only the leader does: run jobs, watch hosts' liveness, reconcile
	// stores and orphans. With one controller (Badger) it leads at once.
	lead := func(ctx context.Context) {
		if err := storeSvc.Recover(ctx); err != nil {
			log.Warn("recovery of stores left half done", "err", err)
		}
		runner.Start(ctx)
		// Unfinished jobs resume once agents have had a heartbeat to come
		// back (to this controller, if it just took over).
		go func() {
			select {
			case <-ctx.Done():
				return
			case <-time.After(cfg.heartbeatInterval * 2):
			}
			if err := runner.Resume(ctx); err != nil {
				log.Error("resuming jobs", "err", err)
			}
		}()
		go hostSvc.Monitor(ctx)
		go mounts.Run(ctx)
		go runner.ExpireEvery(ctx, cfg.jobRetention, 10*time.Minute)
		go storeSvc.Reconcile(ctx, 10*time.Second)
		if cfg.orphanInterval > 0 {
			// After the jobs resume, so that their objects are accounted for.
			go func() {
				select {
				case <-ctx.Done():
					return
				case <-time.After(cfg.heartbeatInterval * 3):
				}
				orphanSweeper.Run(ctx, cfg.orphanInterval)
			}()
		}
	}
	leaderLost := make(chan error, 1)
	campaignDone := make(chan struct{})
	go func() {
		defer close(campaignDone)
		term, err := db.Campaign(ctx, self, cfg.leaderLease)
		if err != nil {
			if ctx.Err() == nil {
				leaderLost <- fmt.Errorf("leader election: %w", err)
			}
			return
		}
		gate.SetLeading(true)
		if db.Replicated() {
			log.Info("leading", "advertise", self)
		}
		lead(ctx)
		select {
		case <-ctx.Done():
		case <-term.Done():
			// Writes are fenced from now on; the work started above stops with
			// the process, and a restart comes back as a follower.
			gate.SetLeading(false)
			leaderLost <- fmt.Errorf("lost the leadership (lease not renewed within %s): %w", cfg.leaderLease, errdefs.ErrUnavailable)
			<-ctx.Done()
			runner.Wait()
			return
		}
		// A clean stop hands the leadership over at once, once the jobs
		// have stopped where they are.
		runner.Wait()
		rctx, rcancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer rcancel()
		if err := term.Resign(rctx); err != nil {
			log.Warn("resigning the leadership", "err", err)
		}
	}()
	defer func() {
		cancel()
		<-campaignDone // jobs stop where they are (they do not fail), then the leadership is handed over
	}()
	go tr.renew(ctx, log.With("component", "pki"))
	go watchdog(ctx)

	log.Info("controller serving", "addr", "https://"+ln.Addr().String(), "data", cfg.dataDir, "metadata", db.Location(), "ca_pin", tr.ca.Pin())
	if ready != nil {
		ready(ln.Addr().String())
	}
	select {
	case err = <-serveErr:
	case err = <-leaderLost:
	case <-ctx.Done():
	}
	shutdown, stop := context.WithTimeout(context.Background(), 10*time.Second)
	defer stop()
	_ = srv.Shutdown(shutdown)
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	log.Info("controller stopped")
	return nil
}

// notifySystemd tells systemd the service is ready (a no-op outside systemd).
func notifySystemd(status string) {
	_, _ = daemon.SdNotify(false, daemon.SdNotifyReady+"\nSTATUS="+status)
}

// watchdog pings systemd's watchdog at half its interval while ctx lives.
func watchdog(ctx context.Context) {
	every, err := daemon.SdWatchdogEnabled(false)
	if err != nil || every <= 0 {
		return
	}
	t := time.NewTicker(every / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			_, _ = daemon.SdNotify(false, daemon.SdNotifyWatchdog)
		}
	}
}

package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/stowage/stowage/agent"
	"github.com/stowage/stowage/agent/cachemount"
	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/agent/nbdexports"
	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/datapath/netguard"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/rpclimit"
)

// joinFlags are how an agent enrols (agent.EnrolConfig).
type joinFlags struct {
	token, tokenFile, caPin, caFile string
}

func (j *joinFlags) flags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&j.token, "join-token", "", "one-time token from `stowage host token create` for the first start (or $STOWAGE_JOIN_TOKEN); later starts use the certificate kept in --state-dir/pki")
	f.StringVar(&j.tokenFile, "join-token-file", "", "file holding the join token (instead of --join-token)")
	f.StringVar(&j.caPin, "ca-pin", "", "sha256:<hex> pin of the controller's CA, printed with the join token: the agent sends its token only to a controller whose CA has it")
	f.StringVar(&j.caFile, "ca-file", "", "the controller's CA certificate (instead of --ca-pin)")
}

// config resolves the token from the flag, the file or the environment.
func (j *joinFlags) config(cfg agent.Config) (agent.EnrolConfig, error) {
	tok := j.token
	if tok == "" && j.tokenFile != "" {
		b, err := os.ReadFile(j.tokenFile)
		if err != nil {
			return agent.EnrolConfig{}, usageError{fmt.Errorf("--join-token-file: %w", err)}
		}
		tok = strings.TrimSpace(string(b))
	}
	if tok == "" {
		tok = os.Getenv("STOWAGE_JOIN_TOKEN")
	}
	return agent.EnrolConfig{
		ControllerURL: cfg.ControllerURL, HostID: cfg.HostID, StateDir: cfg.StateDir,
		JoinToken: tok, CAPin: j.caPin, CAFile: j.caFile, Addresses: agent.DefaultAddresses(cfg),
	}, nil
}

func agentFlags(cmd *cobra.Command, cfg *agent.Config, limits *rpclimit.Limits, defaultStateDir string) {
	hostname, _ := os.Hostname()
	f := cmd.Flags()
	f.StringVar(&cfg.ControllerURL, "controller", "https://127.0.0.1:8470", "controller URL; several comma-separated for controllers sharing etcd metadata (the agent follows the one that leads)")
	f.StringVar(&cfg.HostID, "host-id", hostname, "this host's id (stable across restarts)")
	f.StringVar(&cfg.Listen, "listen", ":8471", "address of the agent's RPC service")
	f.StringVar(&cfg.AdvertiseURL, "advertise-url", "", "URL the controller uses to reach this agent (default: derived from --listen)")
	f.StringVar(&cfg.NBDListen, "nbd-listen", ":10809", `address of the agent's NBD server for volumes granted to hosts outside their store's scope ("" serves no NBD)`)
	f.BoolVar(&cfg.ISCSITarget, "iscsi-target", false, "this host runs the iSCSI target (tgtd, managed with tgtadm) of the iSCSI stores whose target_host it is")
	f.IntVar(&cfg.TGTControlPort, "tgt-control-port", 0, "tgtd's control port (tgtadm -C; 0: tgtd's default)")
	f.BoolVar(&cfg.ISCSIUserspace, "iscsi-userspace", true, "reach LUNs of iSCSI stores through libiscsi in qemu-img (when qemu-block-extra is installed); false: this host gets them over NBD from their target host")
	f.StringVar(&cfg.NBDTLS, "nbd-tls", "auto", "NBD over TLS (STARTTLS, the agent's certificate): auto (offered; required unless --nbd-listen is a loopback address) or require (grants are nbds:// URIs)")
	f.StringVar(&cfg.NBDAddress, "nbd-address", "", "host:port other hosts reach the NBD server at, reported to the controller (default: the advertise URL's host and --nbd-listen's port)")
	f.StringVar(&cfg.Zone, "zone", "default", "zone of this host")
	f.StringVar(&cfg.Cluster, "cluster", "default", "cluster of this host")
	f.StringVar(&cfg.StateDir, "state-dir", defaultStateDir, "directory for the agent's journal and state")
	f.StringSliceVar(&cfg.StoreRoots, "store-roots", agent.DefaultStoreRoots, "comma list of directories store roots may be or lie beneath; the agent refuses any other (/, /etc, /proc, /sys, /dev, /boot, /usr, /bin, /sbin and /lib* always)")
	f.StringVar(&cfg.FetchAllowCIDRs, "fetch-allow-cidrs", "", "comma list of CIDRs template downloads may reach although the address policy refuses them (loopback, private incl. 100.64.0.0/10 and fc00::/7, link-local, unspecified, reserved, multicast; also as embedded in ::ffff:, NAT64 and 6to4 addresses)")
	f.DurationVar(&cfg.FetchRetryWindow, "fetch-retry-window", 30*time.Second, "how long a template download keeps retrying a server that went away (refused, dropped or stalled connections, 5xx) before the job fails as unavailable; a server back within it is resumed by Range where the download stopped")
	f.StringVar(&cfg.ImportDir, "import-dir", "", "directory file:// template and ISO URLs are read from, opened without following symbolic links; it must lie beneath --store-roots like a store root (empty: file:// imports are refused)")
	f.IntVar(&limits.MaxRequestBytes, "max-request-bytes", rpclimit.DefaultMaxRequestBytes, "largest request message the agent's RPC service accepts, after decompression (bigger ones: resource_exhausted)")
	f.StringVar(&cfg.ImageCacheSocket, "image-cache-socket", "", "unix socket of the host's template mount (`stowage cache serve --socket`, e.g. "+defaultCacheSocket+"); empty: this host has no template mount and gets no lazy volumes")
}

func newAgentCmd() *cobra.Command {
	var cfg agent.Config
	var limits rpclimit.Limits
	var join joinFlags
	var otlp tracingFlags
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the per-host agent: registers with the controller and runs host-side work",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(cmd)
			if err != nil {
				return err
			}
			go watchdog(cmd.Context())
			ec, err := join.config(cfg)
			if err != nil {
				return err
			}
			traced, flushTraces, err := otlp.setup(cmd.Context(), "stowage-agent", cfg.HostID, log)
			if err != nil {
				return err
			}
			defer flushTraces()
			return runAgent(cmd.Context(), cfg, ec, limits, log, agent.WithInterceptors(traced))
		},
	}
	agentFlags(cmd, &cfg, &limits, "/var/lib/stowage/agent")
	join.flags(cmd)
	otlp.register(cmd)
	return cmd
}

// runAgent enrols (or loads the agent's certificate), assembles an agent on
// the local host and runs it until ctx ends.
func runAgent(ctx context.Context, cfg agent.Config, ec agent.EnrolConfig, limits rpclimit.Limits, log *slog.Logger, extra ...agent.Option) error {
	privateFiles()
	creds, err := agent.Enrol(ctx, ec, log)
	if err != nil {
		return err
	}
	a, err := newAgent(cfg, creds, limits, log, extra...)
	if err != nil {
		return err
	}
	return a.Run(ctx)
}

// newAgent assembles an agent with creds whose RPC listener (AgentService
// and the HTTP exports) bounds every request by limits, with the options
// extra added.
func newAgent(cfg agent.Config, creds *agent.Credentials, limits rpclimit.Limits, log *slog.Logger, extra ...agent.Option) (*agent.Agent, error) {
	if err := limits.Check(); err != nil {
		return nil, usageError{fmt.Errorf("--max-request-bytes: %w", err)}
	}
	cfg.Hostname, _ = os.Hostname()
	cfg.Version = version
	if cfg.IQN == "" {
		cfg.IQN = agent.ReadIQN()
	}
	// One exporter serves the agent's read-only file exports (agent-to-agent
	// copies) on its listener; the local host creates them.
	x := exports.New(exports.WithLogger(log.With("component", "exports")), exports.WithStateFile(filepath.Join(cfg.StateDir, "exports.json")))
	// One NBD server serves the images granted to hosts that cannot open
	// their files (outside the store's scope) on --nbd-listen.
	nbdTLS, err := nbdTLSRequired(cfg)
	if err != nil {
		return nil, err
	}
	nopts := []nbdexports.Option{nbdexports.WithStateFile(filepath.Join(cfg.StateDir, "nbd-exports.json")), nbdexports.WithTLS(creds.NBDServerTLS(), nbdTLS)}
	if cfg.StateDir != "" {
		// qcow2 images are served through a qemu-storage-daemon per
		// export, with its private sockets under the state directory.
		nopts = append(nopts, nbdexports.WithQcow2(filepath.Join(cfg.StateDir, "qsd"), ""))
	}
	n := nbdexports.New(log.With("component", "nbd"), nopts...)
	// Copies from other agents' nbds:// exports present this host's certificate.
	nbd.RegisterTLS(creds.PeerTLS())
	guard, err := netguard.Parse(cfg.FetchAllowCIDRs)
	if err != nil {
		return nil, fmt.Errorf("--fetch-allow-cidrs: %w", err)
	}
	local := hostfs.New(cfg.HostID, hostfs.WithExporter(x), hostfs.WithNBDExporter(n), hostfs.WithFetchGuard(guard), hostfs.WithTLS(creds.PeerTLS(), creds.WebTLS()),
		hostfs.WithFetchRetryWindow(cfg.FetchRetryWindow))
	// Grants survive a restart: both serve again what their state files
	// hold that is still a file of a store here.
	if cfg.StateDir != "" {
		if err := errors.Join(x.Load(local.InStore), n.Load(local.InStore)); err != nil {
			return nil, fmt.Errorf("agent: restore exports: %w", err)
		}
	}
	opts := []agent.Option{agent.WithExports(x), agent.WithNBD(n), agent.WithLimits(limits), agent.WithCredentials(creds)}
	opts = append(opts, iscsiOptions(cfg, log)...)
	if cfg.ImageCacheSocket != "" {
		// The template mount is its own process (stowage cache serve); the
		// agent serves its templates read-only (hostops.TemplateMount) and
		// lazy volumes' backing chains may end in it.
		opts = append(opts, agent.WithImageCache(cachemount.NewClient(cfg.ImageCacheSocket)))
	}
	return agent.New(cfg, local, log, append(opts, extra...)...)
}

// nbdTLSRequired says whether the NBD server refuses plaintext: always with
// --nbd-tls require, and with auto unless it listens on loopback only.
func nbdTLSRequired(cfg agent.Config) (bool, error) {
	switch cfg.NBDTLS {
	case "require":
		return true, nil
	case "auto", "":
		host, _, err := net.SplitHostPort(cfg.NBDListen)
		if err != nil {
			return true, nil
		}
		if host == "localhost" {
			return false, nil
		}
		ip := net.ParseIP(host)
		return ip == nil || !ip.IsLoopback(), nil
	}
	return false, usageError{fmt.Errorf("--nbd-tls %q: want auto or require: %w", cfg.NBDTLS, errdefs.ErrInvalid)}
}

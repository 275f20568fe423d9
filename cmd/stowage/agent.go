package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/stowage/stowage/agent"
	"github.com/stowage/stowage/agent/cachemount"
	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/agent/nbdexports"
	"github.com/stowage/stowage/datapath/netguard"
	"github.com/stowage/stowage/rpclimit"
)

func agentFlags(cmd *cobra.Command, cfg *agent.Config, limits *rpclimit.Limits, defaultStateDir string) {
	hostname, _ := os.Hostname()
	f := cmd.Flags()
	f.StringVar(&cfg.ControllerURL, "controller", "http://127.0.0.1:8470", "controller URL")
	f.StringVar(&cfg.HostID, "host-id", hostname, "this host's id (stable across restarts)")
	f.StringVar(&cfg.Listen, "listen", ":8471", "address of the agent's RPC service")
	f.StringVar(&cfg.AdvertiseURL, "advertise-url", "", "URL the controller uses to reach this agent (default: derived from --listen)")
	f.StringVar(&cfg.NBDListen, "nbd-listen", ":10809", `address of the agent's NBD server for volumes granted to hosts outside their store's scope ("" serves no NBD)`)
	f.StringVar(&cfg.NBDAddress, "nbd-address", "", "host:port other hosts reach the NBD server at, reported to the controller (default: the advertise URL's host and --nbd-listen's port)")
	f.StringVar(&cfg.Zone, "zone", "default", "zone of this host")
	f.StringVar(&cfg.Cluster, "cluster", "default", "cluster of this host")
	f.StringVar(&cfg.StateDir, "state-dir", defaultStateDir, "directory for the agent's journal and state")
	f.StringSliceVar(&cfg.StoreRoots, "store-roots", agent.DefaultStoreRoots, "comma list of directories store roots may be or lie beneath; the agent refuses any other (/, /etc, /proc, /sys, /dev, /boot, /usr, /bin, /sbin and /lib* always)")
	f.StringVar(&cfg.FetchAllowCIDRs, "fetch-allow-cidrs", "", "comma list of CIDRs template downloads may reach although they are loopback, private or link-local (refused otherwise)")
	f.IntVar(&limits.MaxRequestBytes, "max-request-bytes", rpclimit.DefaultMaxRequestBytes, "largest request message the agent's RPC service accepts, after decompression (bigger ones: resource_exhausted)")
	f.StringVar(&cfg.ImageCacheSocket, "image-cache-socket", "", "unix socket of the host's template mount (`stowage cache serve --socket`, e.g. "+defaultCacheSocket+"); empty: this host has no template mount and gets no lazy volumes")
}

func newAgentCmd() *cobra.Command {
	var cfg agent.Config
	var limits rpclimit.Limits
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
			return runAgent(cmd.Context(), cfg, limits, log)
		},
	}
	agentFlags(cmd, &cfg, &limits, "/var/lib/stowage/agent")
	return cmd
}

// runAgent assembles an agent on the local host and runs it until ctx ends.
func runAgent(ctx context.Context, cfg agent.Config, limits rpclimit.Limits, log *slog.Logger) error {
	privateFiles()
	a, err := newAgent(cfg, limits, log)
	if err != nil {
		return err
	}
	return a.Run(ctx)
}

// newAgent assembles an agent whose RPC listener (AgentService and the
// HTTP exports) bounds every request by limits.
func newAgent(cfg agent.Config, limits rpclimit.Limits, log *slog.Logger) (*agent.Agent, error) {
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
	n := nbdexports.New(log.With("component", "nbd"), nbdexports.WithStateFile(filepath.Join(cfg.StateDir, "nbd-exports.json")))
	guard, err := netguard.Parse(cfg.FetchAllowCIDRs)
	if err != nil {
		return nil, fmt.Errorf("--fetch-allow-cidrs: %w", err)
	}
	local := hostfs.New(cfg.HostID, hostfs.WithExporter(x), hostfs.WithNBDExporter(n), hostfs.WithFetchGuard(guard))
	// Grants survive a restart: both serve again what their state files
	// hold that is still a file of a store here.
	if cfg.StateDir != "" {
		if err := errors.Join(x.Load(local.InStore), n.Load(local.InStore)); err != nil {
			return nil, fmt.Errorf("agent: restore exports: %w", err)
		}
	}
	opts := []agent.Option{agent.WithExports(x), agent.WithNBD(n), agent.WithLimits(limits)}
	if cfg.ImageCacheSocket != "" {
		// The template mount is its own process (stowage cache serve); the
		// agent serves its templates read-only (hostops.TemplateMount) and
		// lazy volumes' backing chains may end in it.
		opts = append(opts, agent.WithImageCache(cachemount.NewClient(cfg.ImageCacheSocket)))
	}
	return agent.New(cfg, local, log, opts...)
}

package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"github.com/stowage/stowage/agent"
	"github.com/stowage/stowage/agent/cachemount"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/rpclimit"
	"github.com/stowage/stowage/trust"
)

// devFetchAllow is what dev's template downloads may reach beyond public
// addresses: this machine.
const devFetchAllow = "127.0.0.0/8,::1/128"

func newDevCmd() *cobra.Command {
	var data, clientConfigPath string
	var ctl controllerConfig
	var ag agent.Config
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run a controller and one agent in one process, with a primary and an image store",
		Long: `dev runs a complete single-host Stowage: the controller, one agent talking to it
over loopback, a directory primary store and a directory image store, all under
--data. Stop it with Ctrl-C; run it again and it picks up where it stopped.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			privateFiles()
			log, err := newLogger(cmd)
			if err != nil {
				return err
			}
			data, err = filepath.Abs(data)
			if err != nil {
				return err
			}
			if ctl.dataDir == "" {
				ctl.dataDir = filepath.Join(data, "controller")
			}
			if ag.StateDir == "" {
				ag.StateDir = filepath.Join(data, "agent")
			}
			// The dev stores live under --data: the agent accepts store
			// roots there, never in its own state or the controller's
			// database.
			ag.StoreRoots = append(append([]string(nil), agent.DefaultStoreRoots...), data)
			ag.FetchAllowCIDRs = ctl.fetchAllowCIDRs
			// file:// templates and ISOs: beneath DATA/import, for both the
			// controller (registration) and the agent (the read).
			if ctl.importDir == "" {
				ctl.importDir = filepath.Join(data, "import")
			}
			if err := makeImportDir(ctl.importDir); err != nil {
				return err
			}
			ag.ImportDir = ctl.importDir
			ag.ReservedDirs = append(ag.ReservedDirs, ctl.dataDir, filepath.Join(data, "imagecache"), filepath.Join(data, "templates"))
			ctx, cancel := context.WithCancel(cmd.Context())
			defer cancel()

			ready := make(chan string, 1)
			errs := make(chan error, 2)
			go func() {
				errs <- runController(ctx, ctl, log.With("component", "controller"), func(a string) { ready <- a })
			}()
			var addr string
			select {
			case addr = <-ready:
			case err := <-errs:
				return err
			}
			server := "https://" + addr
			ag.ControllerURL = server
			// One process holds the CA: the agent's certificate is issued
			// directly (a separate agent joins with a token instead).
			ca, err := trust.LoadOrCreateCA(pkiDir(ctl.dataDir))
			if err != nil {
				return err
			}
			if err := issueHost(ca, ctl.certTTL, ag.StateDir, ag.HostID, agent.DefaultAddresses(ag)); err != nil {
				return err
			}
			creds, err := agent.Enrol(ctx, agent.EnrolConfig{ControllerURL: server, HostID: ag.HostID, StateDir: ag.StateDir}, log)
			if err != nil {
				return err
			}
			// The host's template mount, in this process for dev (its own
			// process in production), when FUSE can be mounted here.
			mountLine := "off (needs root and /dev/fuse)"
			if canMountFUSE() {
				cc := cacheServeConfig{mount: filepath.Join(data, "templates"), dir: filepath.Join(data, "imagecache"),
					socket: filepath.Join(data, "imagecache.sock"), capacity: "0", chunk: "1M", rate: "100M", allowOther: true,
					pkiDir: agent.PKIDir(ag.StateDir)}
				ccfg, err := cc.config(log.With("component", "imagecache"))
				if err != nil {
					return err
				}
				mounted := make(chan error, 1)
				go func() { mounted <- serveCache(ctx, ccfg, cc.socket, log.With("component", "imagecache"), false) }()
				if err := waitSocket(ctx, cc.socket, mounted); err != nil {
					log.Warn("template mount unavailable; lazy volumes are off", "err", err)
				} else {
					ag.ImageCacheSocket, mountLine = cc.socket, cc.mount
					defer func() { cancel(); <-mounted }() // unmount before returning
				}
			}
			// One process: the agent's listener has the API's bounds.
			// The controller set up this process's tracing; the agent's
			// calls join the same traces.
			traced, _, err := ctl.otlp.setup(ctx, "stowage-controller", ag.HostID, log)
			if err != nil {
				return err
			}
			a, err := newAgent(ag, creds, rpclimit.Limits{MaxRequestBytes: ctl.maxRequestBytes}, log.With("component", "agent"), agent.WithInterceptors(traced))
			if err != nil {
				return err
			}
			go func() { errs <- a.Run(ctx) }()
			select {
			case <-a.Ready():
			case err := <-errs:
				return err
			case <-time.After(30 * time.Second):
				return fmt.Errorf("the agent did not register within 30s: %w", errdefs.ErrUnavailable)
			}
			// The CLI of this user reaches this controller with no flags.
			admin, err := readClientConfig(filepath.Join(ctl.dataDir, "admin.json"))
			if err != nil {
				return err
			}
			if admin.Token == "" {
				return fmt.Errorf("dev: no admin token in %s (removed?); recover one with `stowage token reset-admin`: %w", filepath.Join(ctl.dataDir, "admin.json"), errdefs.ErrFailedPrecondition)
			}
			if clientConfigPath != "" {
				if err := writeClientConfig(clientConfigPath, clientConfig{Server: server, CAPEM: string(ca.PEM()), Token: admin.Token}); err != nil {
					return err
				}
			}
			hc := &http.Client{Timeout: time.Minute, Transport: &http.Transport{TLSClientConfig: trust.ClientConfig(nil, ca.Pool(), trust.Is(trust.Controller))}}
			stores := stowagev1connect.NewStoreServiceClient(hc, server, connect.WithInterceptors(bearerInterceptor(admin.Token)))
			primary, err := ensureStore(ctx, stores, "primary", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(data, "primary"))
			if err != nil {
				return err
			}
			images, err := ensureStore(ctx, stores, "images", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(data, "images"))
			if err != nil {
				return err
			}
			notifySystemd("dev serving on " + addr)
			fmt.Fprintf(cmd.OutOrStdout(), `Stowage dev is running.

  API (Connect, gRPC, gRPC-Web)   %[1]s
  web dashboard (paste a token)   %[1]s/ui/
  REST (read side)                %[1]s/v1/volumes, /v1/jobs/ID, ...
  metrics, health                 %[1]s/metrics  %[1]s/healthz
  %-31[7]s %[3]s
  NBD exports (volume grants)     %[8]s
  template mount (lazy volumes)   %[9]s
  metadata                        %[4]s
  client configuration            %[10]s
  primary store "primary"         %[5]s
  image store "images"            %[6]s
  import directory (file:// URLs) %[12]s

Try:
  stowage store list
  stowage host get %[2]s
  curl -s --cacert %[11]s -H "Authorization: Bearer $(cat %[13]s)" \
    -H 'Content-Type: application/json' -d '{}' %[1]s/stowage.v1.StoreService/ListStores

Stop with Ctrl-C.
`, server, ag.HostID, ag.Listen, ctl.dataDir, primary.GetDetails()["path"], images.GetDetails()["path"], "agent (host "+ag.HostID+")", orDash(a.NBDAddress()), mountLine, orDash(clientConfigPath), filepath.Join(pkiDir(ctl.dataDir), trust.CACertFile), ctl.importDir, filepath.Join(ctl.dataDir, adminTokenFile))
			select {
			case <-ctx.Done():
				return nil
			case err := <-errs:
				return err
			}
		},
	}
	def := filepath.Join(os.TempDir(), "stowage-dev")
	if home, err := os.UserHomeDir(); err == nil {
		def = filepath.Join(home, ".local", "share", "stowage-dev")
	}
	cmd.Flags().StringVar(&data, "data", def, "directory for all dev state")
	cmd.Flags().StringVar(&clientConfigPath, "client-config", defaultConfigPath(), "where to write the CLI's configuration for this controller (URL, CA, token; mode 0600); \"\" writes none")
	ctl.flags(cmd, "")
	cmd.Flags().Lookup("data-dir").Usage = "directory of the metadata database (default DATA/controller)"
	cmd.Flags().Lookup("import-dir").Usage = "directory file:// template and ISO URLs must lie beneath, for the controller and the agent (default DATA/import, created 0750)"
	// dev runs on one machine: templates served from it (a local HTTP
	// server in the walk-through) may be downloaded.
	_ = cmd.Flags().Set("fetch-allow-cidrs", devFetchAllow)
	cmd.Flags().Lookup("fetch-allow-cidrs").DefValue = devFetchAllow
	cmd.Flags().StringVar(&ag.Listen, "agent-listen", "127.0.0.1:8471", "address of the agent's RPC service")
	cmd.Flags().StringVar(&ag.NBDListen, "nbd-listen", "127.0.0.1:10809", `address of the agent's NBD server ("" serves no NBD)`)
	cmd.Flags().StringVar(&ag.NBDTLS, "nbd-tls", "auto", "NBD over TLS: auto (required unless --nbd-listen is loopback) or require")
	cmd.Flags().BoolVar(&ag.ISCSITarget, "iscsi-target", false, "the dev host runs the iSCSI target of iSCSI stores (tgtd must be running; see docs/operations.md)")
	cmd.Flags().IntVar(&ag.TGTControlPort, "tgt-control-port", 0, "tgtd's control port (tgtadm -C)")
	ag.ISCSIUserspace = true
	cmd.Flags().StringVar(&ag.HostID, "host-id", "dev-host", "the agent's host id")
	cmd.Flags().StringVar(&ag.Zone, "zone", "default", "zone of the host and the stores")
	cmd.Flags().StringVar(&ag.Cluster, "cluster", "default", "cluster of the host")
	return cmd
}

// ensureStore adds the store called name unless it already exists.
func ensureStore(ctx context.Context, c stowagev1connect.StoreServiceClient, name string, role stowagev1.StoreRole, dir string) (*stowagev1.DataStore, error) {
	got, err := c.GetStore(ctx, connect.NewRequest(&stowagev1.GetStoreRequest{Id: name}))
	if err == nil {
		return got.Msg.GetStore(), nil
	}
	if connect.CodeOf(err) != connect.CodeNotFound {
		return nil, err
	}
	added, err := c.AddStore(ctx, connect.NewRequest(&stowagev1.AddStoreRequest{
		Name: name, Role: role, Provider: "filesystem", Url: "file://" + dir,
	}))
	if err != nil {
		return nil, errors.Join(fmt.Errorf("dev: add store %s", name), err)
	}
	return added.Msg.GetStore(), nil
}

// canMountFUSE says whether this process can mount FUSE filesystems.
func canMountFUSE() bool {
	if os.Geteuid() != 0 {
		return false
	}
	_, err := os.Stat("/dev/fuse")
	return err == nil
}

// waitSocket waits until the template mount's socket answers, or the
// mount failed (done), for up to 20 s.
func waitSocket(ctx context.Context, socket string, done <-chan error) error {
	cl := cachemount.NewClient(socket)
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-done:
			return fmt.Errorf("template mount: %w", err)
		default:
		}
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := cl.GetCache(cctx)
		cancel()
		if err == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("template mount socket %s did not answer within 20s: %w", socket, errdefs.ErrUnavailable)
}

// makeImportDir creates dir 0750 (the umask of privateFiles would make it
// 0700) unless it exists.
func makeImportDir(dir string) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("dev: import directory: %w", err)
	}
	if err := os.Chmod(dir, 0o750); err != nil {
		return fmt.Errorf("dev: import directory: %w", err)
	}
	return nil
}

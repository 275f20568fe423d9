package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/stowage/stowage/agent/cachemount"
	"github.com/stowage/stowage/datapath/imagecache"
	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/rpclimit"
	"github.com/stowage/stowage/trust"
)

// newCacheCmd is `stowage cache`: the lazily fetched template cache.
func newCacheCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cache",
		Short: "Serve templates from a lazily fetched local chunk cache over FUSE",
	}
	cmd.AddCommand(newCacheMountCmd(), newCacheServeCmd(), newCacheStatusCmd())
	return cmd
}

// newCacheStatusCmd is `stowage cache status`: the local template mount as
// its process sees it, without the controller.
func newCacheStatusCmd() *cobra.Command {
	var socket string
	cmd := &cobra.Command{
		Use:   "status [--socket PATH]",
		Short: "Show this host's template mount and its templates (asks the cache process, not the controller)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := outputJSON(cmd)
			if err != nil {
				return err
			}
			st, err := cachemount.NewClient(socket).GetCache(cmd.Context())
			if err != nil {
				return err
			}
			return emit(cmd, asJSON, st, func(w io.Writer) {
				keyValues(w, [][2]string{{"Template mount", mountSummary(st)}, {"Template reads", mountCounters(st)}})
				if len(st.GetTemplates()) > 0 {
					fmt.Fprintln(w)
					mountTable(w, st)
				}
			})
		},
	}
	cmd.Flags().StringVar(&socket, "socket", defaultCacheSocket, "unix socket of the template mount (stowage cache serve --socket)")
	return cmd
}

// mountSummary is one line about a template mount ("-" when there is none).
func mountSummary(tc *stowagev1.CacheStatus) string {
	if tc == nil {
		return "- (no lazy volumes on this host)"
	}
	capacity := "unlimited"
	if tc.GetCapacityBytes() > 0 {
		capacity = humanBytes(tc.GetCapacityBytes())
	}
	return fmt.Sprintf("%s (%d templates, %s cached, capacity %s, passthrough %v)",
		tc.GetMount(), len(tc.GetTemplates()), humanBytes(tc.GetCachedBytes()), capacity, tc.GetPassthrough())
}

// mountCounters says what a template mount's readers got since its
// process started: bytes from cached chunks and from the origin.
func mountCounters(tc *stowagev1.CacheStatus) string {
	hit, miss := tc.GetReadHitBytes(), tc.GetReadMissBytes()
	ratio := "-"
	if hit+miss > 0 {
		ratio = fmt.Sprintf("%.1f%%", 100*float64(hit)/float64(hit+miss))
	}
	return fmt.Sprintf("%s hit, %s miss (%s hit), %d passthrough opens, %s fetched from origins, %d corrupt chunks",
		humanBytes(hit), humanBytes(miss), ratio, tc.GetPassthroughOpens(), humanBytes(tc.GetFetchedBytes()), tc.GetCorruptChunks())
}

// mountTable lists a template mount's templates.
func mountTable(w io.Writer, tc *stowagev1.CacheStatus) {
	rows := [][]string{}
	for _, t := range tc.GetTemplates() {
		status := "ok"
		switch {
		case t.GetError() != "":
			status = t.GetError()
		case t.GetComplete():
			status = "complete"
		}
		rows = append(rows, []string{t.GetId(), strings.TrimPrefix(t.GetFormat().String(), "IMAGE_FORMAT_"), humanBytes(t.GetSize()),
			humanBytes(t.GetCachedBytes()), fmt.Sprint(t.GetPinned()), status})
	}
	table(w, []string{"TEMPLATE", "FORMAT", "SIZE", "CACHED", "PINNED", "STATUS"}, rows)
}

// Defaults of the host's template mount, shared by `cache serve`, the
// agent's --image-cache-socket and the systemd units.
const (
	defaultTemplateMount = "/run/stowage/templates"
	defaultCacheSocket   = "/run/stowage/imagecache.sock"
)

// fetchTuning are the fetch knobs both cache commands take.
type fetchTuning struct {
	maxFetches int
	readAhead  string
}

func (ft *fetchTuning) flags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.IntVar(&ft.maxFetches, "max-fetches", 8, "ranged fetches in flight at most, over all templates")
	f.StringVar(&ft.readAhead, "read-ahead", "32M", "how far ahead of a sequential reader chunks are fetched (off: none)")
}

// apply sets the knobs on o.
func (ft *fetchTuning) apply(o *imagecache.Options) error {
	if ft.maxFetches < 1 {
		return usageError{fmt.Errorf("--max-fetches %d: want at least 1", ft.maxFetches)}
	}
	o.MaxFetches = ft.maxFetches
	if ft.readAhead == "off" {
		o.ReadAhead = -1
		return nil
	}
	ra, err := parseSizeFlag("--read-ahead", ft.readAhead)
	if err != nil {
		return err
	}
	o.ReadAhead = ra
	return nil
}

// cacheServeConfig is `stowage cache serve`'s setup (also used by dev).
type cacheServeConfig struct {
	mount, dir, socket        string
	capacity, chunk, rate     string
	noPassthrough, allowOther bool
	owner, group              string
	pkiDir                    string
	tuning                    fetchTuning
}

func (c *cacheServeConfig) flags(cmd *cobra.Command, dirDefault string) {
	f := cmd.Flags()
	f.StringVar(&c.mount, "mount", defaultTemplateMount, "mount point: one read-only file per template, named by template id")
	f.StringVar(&c.dir, "cache-dir", dirDefault, "persistent chunk cache and state file")
	f.StringVar(&c.socket, "socket", defaultCacheSocket, "unix socket of ImageCacheService (the local agent's --image-cache-socket)")
	f.StringVar(&c.capacity, "capacity", "0", "disk space the cache may use, e.g. 200G (0: unlimited); least recently read unpinned templates are evicted past it")
	f.StringVar(&c.chunk, "chunk-size", "1M", "fetch and bitmap unit")
	f.StringVar(&c.rate, "prefetch-rate", "100M", "background prefetch rate in bytes/s over all templates (0: unlimited, off: none)")
	f.BoolVar(&c.noPassthrough, "no-passthrough", false, "serve complete templates through this process, not FUSE passthrough")
	f.BoolVar(&c.allowOther, "allow-other", true, "let users other than root reach the mount (reading still needs --owner or --group)")
	f.StringVar(&c.owner, "owner", "root", "user owning the mount's files (mode 0440, never world-readable)")
	f.StringVar(&c.group, "group", "root", "group owning the mount's files: the hypervisor's (QEMU's) group, e.g. kvm")
	f.StringVar(&c.pkiDir, "pki-dir", "/var/lib/stowage/agent/pki", "the local agent's certificate directory: templates are read from agents' HTTPS exports, which need this host's certificate and trust the controller's CA (renewals by the agent are picked up)")
	c.tuning.flags(cmd)
}

// config turns the flags into a cachemount.Config.
func (c *cacheServeConfig) config(log *slog.Logger) (cachemount.Config, error) {
	chunk, err := parseSizeFlag("--chunk-size", c.chunk)
	if err != nil {
		return cachemount.Config{}, err
	}
	capacity, err := parseSizeFlag("--capacity", c.capacity)
	if err != nil {
		return cachemount.Config{}, err
	}
	rate := int64(-1)
	if c.rate != "off" {
		if rate, err = parseSizeFlag("--prefetch-rate", c.rate); err != nil {
			return cachemount.Config{}, err
		}
	}
	httpOpts := cachemount.DefaultHTTP()
	open := imagecache.OpenStream(httpOpts)
	if c.pkiDir != "" {
		open = (&hostTLSOpen{dir: c.pkiDir, http: httpOpts}).open
	}
	co := imagecache.Options{Dir: c.dir, ChunkSize: chunk, PrefetchRate: rate, CapacityBytes: capacity, Open: open}
	if c.tuning.maxFetches == 0 { // dev builds the config without flags
		c.tuning = fetchTuning{maxFetches: 8, readAhead: "32M"}
	}
	if err := c.tuning.apply(&co); err != nil {
		return cachemount.Config{}, err
	}
	uid, gid, err := lookupOwner(c.owner, c.group)
	if err != nil {
		return cachemount.Config{}, err
	}
	return cachemount.Config{
		Mount:        c.mount,
		Cache:        co,
		MountOptions: imagecache.MountOptions{AllowOther: c.allowOther, NoPassthrough: c.noPassthrough, Owner: uid, Group: gid},
		Logger:       log,
	}, nil
}

func newCacheServeCmd() *cobra.Command {
	var c cacheServeConfig
	cmd := &cobra.Command{
		Use:   "serve [--mount DIR] [--cache-dir DIR] [--socket PATH] [--capacity SIZE]",
		Short: "Run the host's template mount (a long-lived process the agent drives)",
		Long: `serve mounts the host's templates read-only at --mount, one file per template
named by its id, fetched lazily by chunk from wherever the controller says the
template is (an agent's HTTP or NBD export, or a local path) into a persistent
cache, and serves ImageCacheService on --socket for the local agent, which
passes on the controller's desired templates. It runs as its own systemd
service so that the mount, and every VM whose disk is backed by a file in it,
outlives agent restarts. After a crash, the next start detaches the stale
mount and mounts the templates of its state file again, keeping their cached
chunks. SIGTERM unmounts (waiting up to 5 s for open files, then detaching).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			privateFiles()
			log, err := newLogger(cmd)
			if err != nil {
				return err
			}
			cfg, err := c.config(log)
			if err != nil {
				return err
			}
			return serveCache(cmd.Context(), cfg, c.socket, log, true)
		},
	}
	c.flags(cmd, "/var/lib/stowage/imagecache")
	return cmd
}

// serveCache mounts and serves the control socket until ctx ends.
func serveCache(ctx context.Context, cfg cachemount.Config, socket string, log *slog.Logger, notify bool) error {
	srv, err := cachemount.Open(ctx, cfg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make(chan error, 1)
	// The socket is the local agent's only (mode 0600); the default bounds
	// hold its requests all the same.
	go func() { errs <- srv.Serve(ctx, socket, rpclimit.Default()) }()
	unmounted := make(chan struct{})
	go func() { srv.Mount().Wait(); close(unmounted) }()
	if notify {
		notifySystemd("template mount at " + cfg.Mount)
	}
	log.Info("template mount serving", "mount", cfg.Mount, "socket", socket)
	select {
	case <-ctx.Done():
		err = nil
	case err = <-errs:
	case <-unmounted:
		err = fmt.Errorf("template mount %s was unmounted from outside: %w", cfg.Mount, errdefs.ErrUnavailable)
	}
	cancel()
	return errors.Join(err, srv.Close(5*time.Second))
}

func newCacheMountCmd() *cobra.Command {
	var tuning fetchTuning
	cmd := &cobra.Command{
		Use:   "mount [--cache-dir DIR] [--chunk-size 1M] [--prefetch-rate 100M] SRC MNT",
		Short: "Mount SRC read-only at MNT, fetching its bytes on demand into the cache",
		Long: `Mount SRC read-only at MNT, fetching its bytes on demand, by chunk, into a
persistent cache, while a background prefetch fills the rest. SRC is an
http(s) URL of one image (shown as one file named after the URL's base name),
a local image file, or a local directory whose regular files are all shown.
Runs in the foreground until SIGTERM or SIGINT, then unmounts. Prints
"MOUNTED passthrough_cap=..." once mounted and "READS=n" (READ requests this
process served) at exit. A stale mount at MNT is detached first.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error { return runCacheMount(cmd, args, tuning) },
	}
	f := cmd.Flags()
	f.String("cache-dir", "", "cache directory (default: a temporary directory removed at exit)")
	f.String("chunk-size", "1M", "fetch and bitmap unit")
	f.String("prefetch-rate", "100M", "background prefetch rate in bytes/s (0: unlimited, off: none)")
	f.Bool("no-passthrough", false, "serve complete templates through this process, not FUSE passthrough")
	f.Bool("allow-other", true, "let other users (QEMU) read the mount")
	f.Bool("debug-fuse", false, "log every FUSE request")
	tuning.flags(cmd)
	return cmd
}

func runCacheMount(cmd *cobra.Command, args []string, tuning fetchTuning) error {
	ctx := cmd.Context()
	log, err := newLogger(cmd)
	if err != nil {
		return err
	}
	src, mnt := args[0], args[1]
	fl := cmd.Flags()
	cs, _ := fl.GetString("chunk-size")
	chunk, err := parseSizeFlag("--chunk-size", cs)
	if err != nil {
		return err
	}
	rs, _ := fl.GetString("prefetch-rate")
	rate := int64(-1)
	if rs != "off" {
		if rate, err = parseSizeFlag("--prefetch-rate", rs); err != nil {
			return err
		}
	}
	dir, _ := fl.GetString("cache-dir")
	if dir == "" {
		if dir, err = os.MkdirTemp("", "stowage-cache-"); err != nil {
			return fmt.Errorf("cache directory: %w", errors.Join(err, errdefs.ErrUnavailable))
		}
		defer os.RemoveAll(dir)
	}
	tmpls, err := cacheSources(src)
	if err != nil {
		return err
	}
	co := imagecache.Options{Dir: dir, ChunkSize: chunk, PrefetchRate: rate, Logger: log}
	if err := tuning.apply(&co); err != nil {
		return err
	}
	c, err := imagecache.New(co)
	if err != nil {
		return err
	}
	defer c.Close()
	for _, t := range tmpls {
		if _, err := c.Add(ctx, t[0], t[1], 0); err != nil {
			return err
		}
	}
	noPT, _ := fl.GetBool("no-passthrough")
	other, _ := fl.GetBool("allow-other")
	debug, _ := fl.GetBool("debug-fuse")
	m, err := imagecache.MountCache(ctx, c, mnt, imagecache.MountOptions{AllowOther: other, NoPassthrough: noPT, Debug: debug, Logger: log})
	if err != nil {
		return err
	}
	fmt.Printf("MOUNTED passthrough_cap=%v templates=%d chunk_size=%d prefetch_rate=%d cache_dir=%s\n", m.Passthrough(), len(tmpls), chunk, rate, dir)
	unmounted := make(chan struct{})
	go func() { m.Wait(); close(unmounted) }()
	select {
	case <-ctx.Done():
		log.Info("cache mount: stopping", "mount", mnt)
		err = m.Unmount(5 * time.Second)
		<-unmounted
	case <-unmounted:
		log.Warn("cache mount: unmounted from outside", "mount", mnt)
	}
	fmt.Printf("READS=%d\n", m.Reads())
	return err
}

// cacheSources maps SRC to (id, source) pairs.
func cacheSources(src string) ([][2]string, error) {
	if strings.Contains(src, "://") {
		u, err := url.Parse(src)
		if err != nil {
			return nil, fmt.Errorf("SRC %q: %w", src, errdefs.ErrInvalid)
		}
		id, _ := url.PathUnescape(path.Base(u.Path))
		if id == "" || id == "/" || id == "." {
			id = "image"
		}
		return [][2]string{{id, src}}, nil
	}
	st, err := os.Stat(src)
	if err != nil {
		return nil, fmt.Errorf("SRC %s: %w", src, errors.Join(err, errdefs.ErrNotFound))
	}
	if !st.IsDir() {
		return [][2]string{{filepath.Base(src), src}}, nil
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		return nil, fmt.Errorf("SRC %s: %w", src, errors.Join(err, errdefs.ErrUnavailable))
	}
	var out [][2]string
	for _, e := range ents {
		if e.Type().IsRegular() {
			out = append(out, [2]string{e.Name(), filepath.Join(src, e.Name())})
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("SRC %s: no regular files: %w", src, errdefs.ErrInvalid)
	}
	return out, nil
}

// hostTLSOpen opens templates from https:// and nbds:// URLs with the local
// agent's certificate (agents serve exports to enrolled peers only) and the
// controller's CA, both read from the agent's pki directory when first
// needed: the mount may start before its agent has enrolled.
type hostTLSOpen struct {
	dir  string
	http stream.HTTPOptions

	mu     sync.Mutex
	opener imagecache.OpenFunc
}

func (h *hostTLSOpen) open(ctx context.Context, url string) (imagecache.Source, error) {
	if !strings.HasPrefix(url, "https://") && !strings.HasPrefix(url, "nbds://") {
		return imagecache.OpenStream(h.http)(ctx, url)
	}
	h.mu.Lock()
	if h.opener == nil {
		kp, ca, err := trust.Follow(h.dir)
		if err != nil {
			h.mu.Unlock()
			return nil, fmt.Errorf("template mount: the agent's certificate in %s (--pki-dir): %w", h.dir, errors.Join(err, errdefs.ErrUnavailable))
		}
		o := h.http
		o.TLS = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: trust.WebPool(ca), GetClientCertificate: kp.GetClientCertificate}
		// Agents' NBD exports (--template-mount-transport nbd) over TLS.
		nbd.RegisterTLS(&tls.Config{MinVersion: tls.VersionTLS12, RootCAs: trust.Pool(ca), GetClientCertificate: kp.GetClientCertificate})
		h.opener = imagecache.OpenStream(o)
	}
	opener := h.opener
	h.mu.Unlock()
	return opener(ctx, url)
}

package main

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/stowage/stowage/datapath/imagecache"
	"github.com/stowage/stowage/errdefs"
)

// newCacheCmd is `stowage cache`: the lazily fetched template cache.
func newCacheCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cache",
		Short: "Serve templates from a lazily fetched local chunk cache over FUSE",
	}
	cmd.AddCommand(newCacheMountCmd())
	return cmd
}

func newCacheMountCmd() *cobra.Command {
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
		RunE: runCacheMount,
	}
	f := cmd.Flags()
	f.String("cache-dir", "", "cache directory (default: a temporary directory removed at exit)")
	f.String("chunk-size", "1M", "fetch and bitmap unit")
	f.String("prefetch-rate", "100M", "background prefetch rate in bytes/s (0: unlimited, off: none)")
	f.Bool("no-passthrough", false, "serve complete templates through this process, not FUSE passthrough")
	f.Bool("allow-other", true, "let other users (QEMU) read the mount")
	f.Bool("debug-fuse", false, "log every FUSE request")
	return cmd
}

func runCacheMount(cmd *cobra.Command, args []string) error {
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
	c, err := imagecache.New(imagecache.Options{Dir: dir, ChunkSize: chunk, PrefetchRate: rate, Logger: log})
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

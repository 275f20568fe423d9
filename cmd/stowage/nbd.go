package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/datapath/qsd"
	"github.com/stowage/stowage/errdefs"
)

// nbdServeFlags are the flags of `stowage nbd serve`.
type nbdServeFlags struct {
	unix        string
	listen      string
	name        string
	description string
	readOnly    bool
	workers     int
	format      string
	qsdBinary   string
}

// newNBDCmd is `stowage nbd ...`: the NBD export server.
func newNBDCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "nbd",
		Short: "Export disk images over NBD (Network Block Device)",
	}
	cmd.AddCommand(newNBDServeCmd())
	return cmd
}

func newNBDServeCmd() *cobra.Command {
	var f nbdServeFlags
	cmd := &cobra.Command{
		Use:   "serve [--unix SOCK | --listen ADDR] [--format raw|qcow2] [--name EXPORT] [--read-only] FILE",
		Short: "Serve a raw or qcow2 image (with its backing chain) over NBD until interrupted",
		Long: `Serve FILE (a raw image or a block device) as one NBD export, in the
foreground, until SIGINT or SIGTERM. Clients: qemu, nbdcopy, nbdinfo,
nbdfuse, qemu-img, or the kernel's nbd-client.

The export answers to --name and, being the only one, also to the empty
(default) name, so nbd+unix:///?socket=SOCK and nbd://HOST:PORT work
without naming it. Several connections may be used at once
(can_multi_conn): they share one file descriptor, so a flush covers all.
There is no TLS: listen on a unix socket or a trusted network.

--format qcow2 serves the guest view of a qcow2 image and its backing
chain (the backing files the image itself names) through a
qemu-storage-daemon child process, on --unix only. The format is what
the flag declares, never probed from the file. The export offers the
base:allocation and qemu:allocation-depth meta contexts; writes land in
FILE only (the backing files are opened read-only), and writes of zeroes
are turned into unmapped clusters. --workers does not apply to it.`,
		Example: `  stowage nbd serve --unix /run/stowage/v1.sock /srv/primary/v1.raw
  stowage nbd serve --listen 127.0.0.1:10809 --name v1 --read-only /srv/images/t.raw
  stowage nbd serve --unix /run/stowage/c1.sock --format qcow2 /srv/primary/c1.qcow2
  nbdinfo --map 'nbd+unix:///?socket=/run/stowage/v1.sock'`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return runNBDServe(cmd, f, args[0]) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.unix, "unix", "", "listen on this unix socket path (a stale socket there is replaced)")
	fl.StringVar(&f.listen, "listen", "", "listen on this TCP address (default 127.0.0.1:10809 when --unix is not given)")
	fl.StringVar(&f.name, "name", "", "export name (the export also answers to the empty name)")
	fl.StringVar(&f.description, "description", "", "export description shown by NBD_OPT_LIST")
	fl.BoolVar(&f.readOnly, "read-only", false, "export read-only: writes, trims and zeroes fail with EPERM")
	fl.IntVar(&f.workers, "workers", nbd.DefaultWorkers, "requests served at once per connection")
	fl.StringVar(&f.format, "format", qsd.Raw, "declared format of FILE: raw (Stowage's server) or qcow2 (qemu-storage-daemon, with the backing chain)")
	fl.StringVar(&f.qsdBinary, "qemu-storage-daemon", qsd.DefaultBinary, "the qemu-storage-daemon binary for --format qcow2")
	return cmd
}

func runNBDServe(cmd *cobra.Command, f nbdServeFlags, file string) error {
	log, err := newLogger(cmd)
	if err != nil {
		return err
	}
	if f.unix != "" && f.listen != "" {
		return usageError{errors.New("--unix and --listen are exclusive")}
	}
	if f.workers < 1 {
		return usageError{fmt.Errorf("--workers %d: want at least 1", f.workers)}
	}
	switch f.format {
	case qsd.Raw:
	case qsd.Qcow2:
		return runNBDServeQSD(cmd, log, f, file)
	default:
		return usageError{fmt.Errorf("--format %q: want raw or qcow2", f.format)}
	}
	srv := nbd.NewServer(nbd.ServerOptions{Logger: log, Workers: f.workers})
	if err := srv.AddExport(f.name, file, nbd.ExportOptions{ReadOnly: f.readOnly, Description: f.description}); err != nil {
		return err
	}
	defer srv.Close()
	var l net.Listener
	if f.unix != "" {
		l, err = listenUnix(f.unix)
	} else {
		addr := f.listen
		if addr == "" {
			addr = "127.0.0.1:10809"
		}
		l, err = net.Listen("tcp", addr)
		if err != nil {
			err = fmt.Errorf("nbd: listen on %s: %w: %w", addr, err, errdefs.ErrUnavailable)
		}
	}
	if err != nil {
		return err
	}
	log.Info("nbd: serving", "file", file, "export", f.name, "read_only", f.readOnly, "addr", l.Addr().String())
	return srv.Serve(cmd.Context(), l)
}

// runNBDServeQSD serves file, a qcow2 image, through a qemu-storage-daemon
// until the command's context ends, then asks the daemon to quit (it
// flushes and closes the image) and kills it by PID if it does not.
func runNBDServeQSD(cmd *cobra.Command, log *slog.Logger, f nbdServeFlags, file string) error {
	if f.unix == "" {
		return usageError{errors.New("--format qcow2 serves on --unix only")}
	}
	if _, err := os.Stat(file); err != nil {
		return fmt.Errorf("nbd: %w: %w", err, errdefs.ErrNotFound)
	}
	// The daemon's lifetime is ours to end (cleanly, with quit), not the
	// command context's (which would kill it).
	life, kill := context.WithCancel(context.WithoutCancel(cmd.Context()))
	defer kill()
	d, err := qsd.Start(life, qsd.Options{
		File: file, Format: f.format, Socket: f.unix, Name: f.name, Description: f.description,
		Writable: !f.readOnly, Binary: f.qsdBinary, KillWithParent: true,
	})
	if errors.Is(err, qsd.ErrExited) {
		return fmt.Errorf("nbd: %w: %w", err, errdefs.ErrUnavailable)
	} else if err != nil {
		return fmt.Errorf("nbd: %w", err)
	}
	log.Info("nbd: serving", "file", file, "format", f.format, "export", f.name, "read_only", f.readOnly,
		"addr", f.unix, "qemu_storage_daemon_pid", d.PID())
	select {
	case <-cmd.Context().Done():
		stop, cancel := context.WithTimeout(context.WithoutCancel(cmd.Context()), 10*time.Second)
		defer cancel()
		return d.Stop(stop)
	case <-d.Done():
		if err := d.Wait(); err != nil {
			return err
		}
		return fmt.Errorf("nbd: %w before it was stopped", qsd.ErrExited)
	}
}

// listenUnix listens on path, replacing a socket left behind by a server
// that died (one nobody answers on).
func listenUnix(path string) (net.Listener, error) {
	if st, err := os.Lstat(path); err == nil && st.Mode()&os.ModeSocket != 0 {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("nbd: %s: another server is listening there: %w", path, errdefs.ErrAlreadyExists)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("nbd: remove stale socket %s: %w", path, err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("nbd: listen on %s: %w: %w", path, err, errdefs.ErrUnavailable)
	}
	return l, nil
}

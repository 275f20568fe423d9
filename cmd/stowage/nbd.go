package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
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
	qcow2Server string
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
qemu-storage-daemon child process (a read-only one by Stowage's own
reader, below). With --unix the daemon listens there itself and offers the base:allocation and qemu:allocation-depth meta
contexts; with --listen it listens on a private socket and Stowage's
server forwards to it from the TCP address (base:allocation), as the
agent serves qcow2 grants. The format is what the flag declares, never
probed from the file. Writes land in FILE only (the backing files are
opened read-only), and writes of zeroes are turned into unmapped
clusters. A --read-only export is served by Stowage's own qcow2 reader
(datapath/stream, no daemon) when it can read the image, as the agent
serves read-only qcow2 grants; --qcow2-server qemu forces the daemon. --workers applies to Stowage's server only.`,
		Example: `  stowage nbd serve --unix /run/stowage/v1.sock /srv/primary/v1.raw
  stowage nbd serve --listen 127.0.0.1:10809 --name v1 --read-only /srv/images/t.raw
  stowage nbd serve --unix /run/stowage/c1.sock --format qcow2 /srv/primary/c1.qcow2
  stowage nbd serve --listen 127.0.0.1:10809 --format qcow2 --read-only /srv/primary/c1.qcow2
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
	fl.StringVar(&f.qcow2Server, "qcow2-server", "auto", "for --format qcow2: auto (a read-only export is served by Stowage's own qcow2 reader when it can read the image, anything else by qemu-storage-daemon) or qemu (always qemu-storage-daemon)")
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
	l, err := f.listener(false)
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
	if _, err := os.Stat(file); err != nil {
		return fmt.Errorf("nbd: %w: %w", err, errdefs.ErrNotFound)
	}
	switch f.qcow2Server {
	case "auto", "qemu":
	default:
		return usageError{fmt.Errorf("--qcow2-server %q: want auto or qemu", f.qcow2Server)}
	}
	if f.readOnly && f.qcow2Server == "auto" {
		if err := serveQcow2Go(cmd, log, f, file); !errors.Is(err, errdefs.ErrNotImplemented) {
			return err
		}
	}
	sock, name := f.unix, f.name
	if sock == "" {
		// Behind our TCP server: the daemon on a private socket.
		dir, err := os.MkdirTemp("", "stowage-nbd-")
		if err != nil {
			return fmt.Errorf("nbd: %w", err)
		}
		defer os.RemoveAll(dir)
		sock, name = filepath.Join(dir, "qsd.sock"), "stowage"
	}
	// The daemon's lifetime is ours to end (cleanly, with quit), not the
	// command context's (which would kill it).
	life, kill := context.WithCancel(context.WithoutCancel(cmd.Context()))
	defer kill()
	d, err := qsd.Start(life, qsd.Options{
		File: file, Format: f.format, Socket: sock, Name: name, Description: f.description,
		Writable: !f.readOnly, Binary: f.qsdBinary, KillWithParent: true,
	})
	if errors.Is(err, qsd.ErrExited) {
		return fmt.Errorf("nbd: %w: %w", err, errdefs.ErrUnavailable)
	} else if err != nil {
		return fmt.Errorf("nbd: %w", err)
	}
	served := make(chan error, 1)
	addr := f.unix
	if f.unix == "" {
		srv, l, err := forwardQSD(cmd.Context(), f, sock, name)
		if err != nil {
			_ = d.Stop(context.WithoutCancel(cmd.Context()))
			return err
		}
		defer srv.Close()
		addr = l.Addr().String()
		go func() { served <- srv.Serve(cmd.Context(), l) }()
	}
	log.Info("nbd: serving", "file", file, "format", f.format, "export", f.name, "read_only", f.readOnly,
		"addr", addr, "qemu_storage_daemon_pid", d.PID())
	select {
	case err := <-served:
		stop, cancel := context.WithTimeout(context.WithoutCancel(cmd.Context()), 10*time.Second)
		defer cancel()
		return errors.Join(err, d.Stop(stop))
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

// forwardQSD serves, on --listen, the daemon's export at sock through
// Stowage's server (nbd.UpstreamBackend), as the agent serves qcow2 grants.
func forwardQSD(ctx context.Context, f nbdServeFlags, sock, name string) (*nbd.Server, net.Listener, error) {
	conns := 1
	if f.readOnly {
		conns = 4 // qemu offers multi-conn on read-only exports
	}
	be, err := nbd.NewUpstreamBackend(ctx, func(ctx context.Context) (*nbd.Client, error) {
		return nbd.Dial(ctx, "nbd+unix:///"+name+"?socket="+sock, nbd.ClientOptions{Connections: conns})
	})
	if err != nil {
		return nil, nil, fmt.Errorf("nbd: %w", err)
	}
	srv := nbd.NewServer(nbd.ServerOptions{Workers: f.workers})
	if err := srv.AddBackend(f.name, be, nbd.ExportOptions{ReadOnly: f.readOnly, Description: f.description}); err != nil {
		be.Close()
		return nil, nil, err
	}
	l, err := f.listener(true)
	if err != nil {
		srv.Close()
		return nil, nil, err
	}
	return srv, l, nil
}

// serveQcow2Go serves file, a qcow2 image, read-only on --listen or --unix with
// Stowage's own qcow2 reader (nbd.Qcow2Backend); errdefs.ErrNotImplemented
// when the reader cannot read it.
func serveQcow2Go(cmd *cobra.Command, log *slog.Logger, f nbdServeFlags, file string) error {
	if _, err := qsd.CheckChain(cmd.Context(), file, qsd.Qcow2); err != nil {
		return fmt.Errorf("nbd: %w", err)
	}
	be, err := nbd.OpenQcow2Backend(file)
	if err != nil {
		return err
	}
	srv := nbd.NewServer(nbd.ServerOptions{Logger: log, Workers: f.workers})
	if err := srv.AddBackend(f.name, be, nbd.ExportOptions{ReadOnly: true, Description: f.description}); err != nil {
		be.Close()
		return err
	}
	defer srv.Close()
	l, err := f.listener(false)
	if err != nil {
		return err
	}
	log.Info("nbd: serving", "file", file, "format", f.format, "export", f.name, "read_only", true, "addr", l.Addr().String(), "reader", "go")
	return srv.Serve(cmd.Context(), l)
}

// listener listens where the flags say: --unix (a stale socket replaced),
// else --listen (default 127.0.0.1:10809); tcpOnly ignores --unix.
func (f nbdServeFlags) listener(tcpOnly bool) (net.Listener, error) {
	if f.unix != "" && !tcpOnly {
		return listenUnix(f.unix)
	}
	addr := f.listen
	if addr == "" {
		addr = "127.0.0.1:10809"
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("nbd: listen on %s: %w: %w", addr, err, errdefs.ErrUnavailable)
	}
	return l, nil
}

package nbdexports

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/datapath/qsd"
	"github.com/stowage/stowage/errdefs"
)

// maxSocketPath is the longest unix socket path (sun_path less its NUL).
const maxSocketPath = 107

// upstreamName is the export name each daemon serves on its private socket.
const upstreamName = "stowage"

// readOnlyConns is how many connections the agent opens to a read-only
// daemon (qemu advertises multi-conn for read-only exports only).
const readOnlyConns = 4

// Restart budget of a daemon that keeps dying: at most maxRestarts within
// restartWindow, then the export stays down (its requests fail) until it
// is unexported.
const (
	maxRestarts   = 5
	restartWindow = time.Minute
)

// serve makes e answer on the agent's server: a raw file directly, a qcow2
// image through its daemon, which load adopts when e.PID still runs it.
// It sets e.PID.
func (s *Server) serve(ctx context.Context, e *export, load bool) error {
	opts := nbd.ExportOptions{ReadOnly: e.ReadOnly, Expires: e.Expires}
	if e.Format == "" {
		return s.srv.AddExport(e.Name, e.Path, opts)
	}
	if e.Format != FormatQcow2 && e.Format != FormatRBD {
		return fmt.Errorf("format %q is not served: %w", e.Format, errdefs.ErrInvalid)
	}
	if s.runDir == "" {
		return fmt.Errorf("this agent serves no qcow2 images over NBD: %w", errdefs.ErrNotImplemented)
	}
	if err := os.MkdirAll(s.runDir, 0o700); err != nil {
		return fmt.Errorf("qcow2 export run directory: %w", err)
	}
	if e.ReadOnly && e.Format == FormatQcow2 {
		// Read-only: Stowage's own qcow2 reader, no daemon, when it can
		// read the image.
		be, err := nbd.OpenQcow2Backend(e.Path)
		if err == nil {
			if err = s.srv.AddBackend(e.Name, be, opts); err != nil {
				be.Close()
			}
			e.PID = 0
			return err
		}
		if !errors.Is(err, errdefs.ErrNotImplemented) {
			return err
		}
		s.log.Info("nbd exports: qcow2 image served through qemu-storage-daemon: the Go reader cannot read it", "path", e.Path, "err", err)
	}
	o := s.daemonOptions(e)
	if len(o.Monitor) > maxSocketPath {
		return fmt.Errorf("qcow2 export socket %s is longer than a unix socket path may be (%d bytes): use a shorter --state-dir: %w", o.Monitor, maxSocketPath, errdefs.ErrInvalid)
	}
	var d *qsd.Daemon
	var err error
	if load && e.PID > 0 {
		if d, err = qsd.Adopt(ctx, o, e.PID); err == nil {
			s.log.Info("nbd exports: adopted the qcow2 export's daemon", "path", e.Path, "pid", e.PID)
		} else {
			s.log.Info("nbd exports: qcow2 export's daemon not adopted; starting a new one", "path", e.Path, "err", err)
			killStale(e.PID, o)
		}
	}
	if d == nil {
		if d, err = qsd.Start(s.life, o); err != nil {
			return err
		}
	}
	sock := o.Socket
	dial := func(ctx context.Context) (*nbd.Client, error) {
		conns := 1
		if e.ReadOnly {
			conns = readOnlyConns
		}
		return nbd.Dial(ctx, "nbd+unix:///"+upstreamName+"?socket="+sock, nbd.ClientOptions{Connections: conns, Logger: s.log})
	}
	be, err := nbd.NewUpstreamBackend(ctx, dial)
	if err == nil {
		if err = s.srv.AddBackend(e.Name, be, opts); err != nil {
			be.Close()
		}
	}
	if err != nil {
		return errors.Join(err, s.stopDaemon(d))
	}
	e.PID = d.PID()
	s.mu.Lock()
	s.daemons[e.Name] = d
	s.mu.Unlock()
	go s.supervise(e.Name, d)
	return nil
}

func (s *Server) daemonOptions(e *export) qsd.Options {
	base := filepath.Join(s.runDir, e.Name)
	o := qsd.Options{
		File: e.Path, Format: qsd.Qcow2, Writable: !e.ReadOnly,
		Socket: base + ".nbd", Monitor: base + ".qmp", LogFile: base + ".log",
		Name: upstreamName, Binary: s.qsdBin,
	}
	if e.RBD != nil {
		o.File, o.RBD, o.Format = "", e.RBD, qsd.Raw
	}
	return o
}

// drop stops serving name and stops its daemon, if it has one.
func (s *Server) drop(name string) error {
	err := s.srv.RemoveExport(name)
	s.mu.Lock()
	d := s.daemons[name]
	delete(s.daemons, name)
	s.mu.Unlock()
	if d != nil {
		err = errors.Join(err, s.stopDaemon(d))
	}
	s.removeKey(name)
	return err
}

// stopDaemon stops d and removes its log.
func (s *Server) stopDaemon(d *qsd.Daemon) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := d.Stop(ctx)
	if lf := d.Options().LogFile; lf != "" {
		os.Remove(lf)
	}
	if err != nil {
		return fmt.Errorf("stop the qcow2 export's daemon: %w", err)
	}
	return nil
}

// supervise restarts name's daemon whenever it dies while the export
// lives, within the restart budget.
func (s *Server) supervise(name string, d *qsd.Daemon) {
	var starts []time.Time
	for {
		select {
		case <-d.Done():
		case <-s.life.Done():
			return
		}
		s.mu.Lock()
		live := s.daemons[name] == d
		s.mu.Unlock()
		if !live || s.life.Err() != nil {
			return
		}
		now := time.Now()
		for len(starts) > 0 && now.Sub(starts[0]) > restartWindow {
			starts = starts[1:]
		}
		if len(starts) >= maxRestarts {
			s.log.Error("nbd exports: the qcow2 export's daemon keeps dying; its export stays down until unexported",
				"path", d.Options().File, "restarts", len(starts), "window", restartWindow, "stderr", d.Stderr())
			return
		}
		starts = append(starts, now)
		s.log.Warn("nbd exports: the qcow2 export's daemon died; restarting it", "path", d.Options().File, "pid", d.PID(), "stderr", d.Stderr())
		ctx, cancel := context.WithTimeout(s.life, 30*time.Second)
		err := d.Restart(ctx)
		cancel()
		if err != nil {
			s.log.Error("nbd exports: restart the qcow2 export's daemon", "path", d.Options().File, "err", err)
			select {
			case <-time.After(time.Second):
			case <-s.life.Done():
				return
			}
			continue
		}
		s.mu.Lock()
		if e := s.exports[name]; e != nil {
			e.PID = d.PID()
		}
		s.mu.Unlock()
		if err := s.save(); err != nil {
			s.log.Error("nbd exports: save state after a daemon restart", "err", err)
		}
	}
}

// killStale kills pid if it is a daemon started for o (same socket) that
// could not be adopted, so that a new one can listen there.
func killStale(pid int, o qsd.Options) {
	if pid <= 0 {
		return
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(b), o.Socket) {
		return
	}
	if p, err := os.FindProcess(pid); err == nil {
		_ = p.Kill()
	}
}

// sweepRunDir stops the daemons of the run directory that no export
// accounts for (an agent that died between recording an Unexport and
// stopping its daemon, or between starting one and recording it) and
// removes their files.
func (s *Server) sweepRunDir() {
	if s.runDir == "" {
		return
	}
	ents, err := os.ReadDir(s.runDir)
	if err != nil {
		return
	}
	s.mu.Lock()
	known := map[string]bool{}
	for name := range s.daemons {
		known[name] = true
	}
	s.mu.Unlock()
	for _, ent := range ents {
		name, ext, _ := strings.Cut(ent.Name(), ".")
		if known[name] || validName(name) != nil {
			continue
		}
		base := filepath.Join(s.runDir, name)
		if ext == "qmp" {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if err := qsd.Quit(ctx, base+".qmp"); err == nil {
				s.log.Info("nbd exports: stopped a daemon no export accounts for", "socket", base+".nbd")
			}
			cancel()
		}
		os.Remove(filepath.Join(s.runDir, ent.Name()))
	}
}

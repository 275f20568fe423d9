// Package qsd exports disk images (qcow2 with their backing chains, or raw)
// over NBD through qemu-storage-daemon, run as a supervised child process:
// one daemon per export, on a unix socket.
//
// Stowage's own server (datapath/nbd) serves raw files; a qcow2 image is
// served by the tool the field trusts for the format. The format is always
// declared by the caller and never probed from the image; the backing chain
// is the one the image itself names (its backing file and backing format
// header fields), opened read-only by qemu. Before a qcow2 export starts,
// CheckChain refuses a layer whose backing format is not recorded (qemu
// would probe it), one with an external data file, or a corrupt one.
//
//	d, err := qsd.Start(ctx, qsd.Options{
//		File: "/srv/primary/v1.qcow2", Format: qsd.Qcow2,
//		Socket: "/run/stowage/v1.sock", Name: "v1", Writable: true,
//	})
//	// nbd+unix:///v1?socket=/run/stowage/v1.sock answers until:
//	err = d.Stop(ctx)
//
// The daemon gets, as JSON options (no comma escaping of paths):
//
//	--blockdev  {driver: FORMAT, node-name: fmt, read-only, discard: unmap,
//	             detect-zeroes: unmap (writable) , file: {driver: file, filename}}
//	--nbd-server {addr: {type: unix, path: SOCK}}
//	--export    {type: nbd, id: exp, node-name: fmt, name: NAME, writable,
//	             allocation-depth: true}
//	--chardev socket,path=QMP,server=on,wait=off --monitor chardev=…
//
// The export offers the base:allocation and qemu:allocation-depth meta
// contexts. The QMP monitor is used to tell when the export is ready
// (query-block-exports lists it and the NBD socket answers) and to stop the
// daemon cleanly (quit); a daemon that does not exit in time is killed by
// its PID. The last lines the daemon wrote to stderr are kept and quoted in
// errors.
package qsd

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/stowage/stowage/errdefs"
)

// Formats a caller can declare.
const (
	Qcow2 = "qcow2"
	Raw   = "raw"
)

// DefaultBinary is the qemu-storage-daemon run when Options.Binary is empty.
const DefaultBinary = "qemu-storage-daemon"

// ErrExited is returned (wrapped, with the daemon's stderr) when the daemon
// exits before its export is ready.
var ErrExited = errors.New("qemu-storage-daemon exited")

// Options describe one export.
type Options struct {
	// File is the image (the top of its chain).
	File string
	// RBD, instead of File, is a Ceph RBD image (or one of its snapshots)
	// opened through qemu's rbd block driver (librbd); Format is Raw.
	RBD *RBD
	// Format is the declared format of File: Qcow2 or Raw. Required.
	Format string
	// Socket is the NBD unix socket path the daemon listens on.
	Socket string
	// Name is the export name; empty is the default export, which
	// nbd+unix:///?socket=SOCK reaches. qemu serves only this name.
	Name string
	// Description is shown by NBD_OPT_LIST and NBD_OPT_INFO.
	Description string
	// Writable exports read-write; otherwise the image is opened
	// read-only and writes are refused.
	Writable bool
	// Monitor is the QMP socket path; default Socket + ".qmp".
	Monitor string
	// Binary is the daemon to run; default DefaultBinary.
	Binary string
	// ReadyTimeout bounds the wait for the export; default 10 s.
	ReadyTimeout time.Duration
	// StopTimeout bounds the wait for a clean quit before SIGKILL;
	// default 5 s.
	StopTimeout time.Duration
	// LogFile, when set, receives the daemon's stderr and stdout (appended)
	// instead of a pipe to this process: a daemon that outlives this
	// process (see Adopt) must not write into a pipe nobody reads. Its
	// tail is what Stderr quotes.
	LogFile string
	// KillWithParent has the kernel kill the daemon when the process that
	// started it dies (PR_SET_PDEATHSIG), for a foreground command whose
	// export must not outlive it. An agent, whose exports outlive its
	// restarts, leaves it false.
	KillWithParent bool
}

func (o *Options) fill() error {
	switch o.Format {
	case Qcow2, Raw:
	case "":
		return errors.New("qsd: format not declared (qcow2 or raw)")
	default:
		return fmt.Errorf("qsd: format %q: want qcow2 or raw", o.Format)
	}
	if (o.File == "") == (o.RBD == nil) || o.Socket == "" {
		return errors.New("qsd: a file or an rbd image, and a socket, are required")
	}
	if o.RBD != nil {
		if err := o.RBD.check(); err != nil {
			return err
		}
		if o.Format != Raw {
			return fmt.Errorf("qsd: an rbd image is raw, not %s", o.Format)
		}
	}
	if o.Monitor == "" {
		o.Monitor = o.Socket + ".qmp"
	}
	if o.Binary == "" {
		o.Binary = DefaultBinary
	}
	if o.ReadyTimeout <= 0 {
		o.ReadyTimeout = 10 * time.Second
	}
	if o.StopTimeout <= 0 {
		o.StopTimeout = 5 * time.Second
	}
	return nil
}

// Args are the daemon's arguments for o (after defaults are filled).
func Args(o Options) ([]string, error) {
	if err := o.fill(); err != nil {
		return nil, err
	}
	bdev := map[string]any{
		"driver":    o.Format,
		"node-name": "fmt",
		"read-only": !o.Writable,
		"file": map[string]any{
			"driver":   "file",
			"filename": o.File,
		},
	}
	var pre []string
	if o.RBD != nil {
		bdev = o.RBD.blockdev(!o.Writable)
		pre = o.RBD.secretArgs()
	}
	if o.Writable {
		bdev["discard"] = "unmap"
		bdev["detect-zeroes"] = "unmap"
	}
	srv := map[string]any{"addr": map[string]any{"type": "unix", "path": o.Socket}}
	exp := map[string]any{
		"type":             "nbd",
		"id":               "exp",
		"node-name":        "fmt",
		"name":             o.Name,
		"writable":         o.Writable,
		"allocation-depth": true,
	}
	if o.Description != "" {
		exp["description"] = o.Description
	}
	js := func(v any) string { b, _ := json.Marshal(v); return string(b) }
	return append(pre,
		"--chardev", "socket,id=qmp,path="+strings.ReplaceAll(o.Monitor, ",", ",,")+",server=on,wait=off",
		"--monitor", "chardev=qmp",
		"--blockdev", js(bdev),
		"--nbd-server", js(srv),
		"--export", js(exp),
	), nil
}

// Daemon is one running qemu-storage-daemon serving one export.
type Daemon struct {
	opts Options
	life context.Context // the daemon is killed when it ends (Start's ctx)

	mu     sync.Mutex
	cmd    *exec.Cmd // nil for an adopted daemon
	pid    int
	stderr *tailBuffer
	done   chan struct{} // closed when the process has been waited for
	err    error         // its exit status, once done
}

// Start runs a daemon for o and waits until its export answers. The daemon
// is killed when ctx ends; Stop ends it cleanly.
func Start(ctx context.Context, o Options) (*Daemon, error) {
	if err := o.fill(); err != nil {
		return nil, err
	}
	if o.Format == Qcow2 {
		if _, err := CheckChain(ctx, o.File, o.Format); err != nil {
			return nil, err
		}
	}
	d := &Daemon{opts: o, life: ctx}
	if err := d.start(ctx); err != nil {
		return nil, err
	}
	return d, nil
}

// start runs the daemon for d.life and waits, within ctx, until it is ready.
func (d *Daemon) start(ctx context.Context) error {
	o := d.opts
	args, err := Args(o)
	if err != nil {
		return err
	}
	for _, p := range []string{o.Socket, o.Monitor} {
		if err := removeStaleSocket(p); err != nil {
			return err
		}
	}
	cmd := exec.CommandContext(d.life, o.Binary, args...)
	cmd.Cancel = func() error { return cmd.Process.Kill() }
	stderr := &tailBuffer{max: 16 << 10}
	cmd.Stderr = stderr
	cmd.Stdout = stderr
	if o.LogFile != "" {
		lf, err := os.OpenFile(o.LogFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("qsd: log file: %w", err)
		}
		defer lf.Close() // the child has its own descriptor once started
		cmd.Stderr, cmd.Stdout = lf, lf
		stderr = &tailBuffer{max: 1, file: o.LogFile}
	}
	if o.KillWithParent {
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	}
	done := make(chan struct{})
	started := make(chan error, 1)
	go func() {
		// The parent-death signal follows the thread that forks, not
		// the process: that thread stays this goroutine's until the
		// daemon has exited.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- fmt.Errorf("qsd: start %s: %w: %w", o.Binary, err, errdefs.ErrUnavailable)
			return
		}
		d.mu.Lock()
		d.cmd, d.pid, d.stderr, d.done, d.err = cmd, cmd.Process.Pid, stderr, done, nil
		d.mu.Unlock()
		started <- nil
		err := cmd.Wait()
		d.mu.Lock()
		d.err = err
		d.mu.Unlock()
		close(done)
	}()
	if err := <-started; err != nil {
		return err
	}
	if err := d.waitReady(ctx); err != nil {
		d.kill()
		return err
	}
	return nil
}

// waitReady polls the monitor until query-block-exports lists the export
// and the NBD socket accepts a connection.
func (d *Daemon) waitReady(ctx context.Context) error {
	o := d.opts
	ctx, cancel := context.WithTimeout(ctx, o.ReadyTimeout)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		if last = d.checkReady(ctx); last == nil {
			return nil
		}
		select {
		case <-d.done:
			return d.exitError()
		case <-ctx.Done():
			return fmt.Errorf("qsd: export %s not ready after %s: %w (stderr: %s)", o.Name, o.ReadyTimeout, last, d.Stderr())
		case <-tick.C:
		}
	}
}

func (d *Daemon) checkReady(ctx context.Context) error {
	var exps []struct {
		ID       string `json:"id"`
		NodeName string `json:"node-name"`
	}
	if err := d.QMP(ctx, "query-block-exports", nil, &exps); err != nil {
		return err
	}
	found := false
	for _, e := range exps {
		found = found || e.ID == "exp"
	}
	if !found {
		return errors.New("export not listed yet")
	}
	c, err := (&net.Dialer{}).DialContext(ctx, "unix", d.opts.Socket)
	if err != nil {
		return err
	}
	return c.Close()
}

// QMP runs one command on the daemon's monitor and decodes its return value
// into out (when out is not nil).
func (d *Daemon) QMP(ctx context.Context, command string, args, out any) error {
	return qmp(ctx, d.opts.Monitor, command, args, out)
}

// Quit asks the daemon whose QMP monitor listens at monitor to quit (a
// daemon found without its Daemon, such as a leftover of a crashed parent).
func Quit(ctx context.Context, monitor string) error {
	return qmp(ctx, monitor, "quit", nil, nil)
}

func qmp(ctx context.Context, monitor, command string, args, out any) error {
	c, err := (&net.Dialer{}).DialContext(ctx, "unix", monitor)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	} else {
		c.SetDeadline(time.Now().Add(10 * time.Second))
	}
	r := json.NewDecoder(bufio.NewReader(c))
	var greeting map[string]json.RawMessage
	if err := r.Decode(&greeting); err != nil {
		return fmt.Errorf("qmp greeting: %w", err)
	}
	if _, err := qmpCall(c, r, "qmp_capabilities", nil); err != nil {
		return err
	}
	ret, err := qmpCall(c, r, command, args)
	if err != nil || out == nil {
		return err
	}
	return json.Unmarshal(ret, out)
}

func qmpCall(c net.Conn, r *json.Decoder, command string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	if _, err := c.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("qmp %s: %w", command, err)
	}
	for {
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := r.Decode(&resp); err != nil {
			return nil, fmt.Errorf("qmp %s: %w", command, err)
		}
		switch {
		case resp.Event != "":
			continue
		case resp.Error != nil:
			return nil, fmt.Errorf("qmp %s: %s: %s", command, resp.Error.Class, resp.Error.Desc)
		default:
			return resp.Return, nil
		}
	}
}

// PID is the daemon's process id (0 before it starts).
func (d *Daemon) PID() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.pid
}

// Options are the options the daemon runs with (defaults filled in).
func (d *Daemon) Options() Options { return d.opts }

// Done is closed when the daemon has exited.
func (d *Daemon) Done() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.done
}

// Stderr is the tail of what the daemon wrote to stderr and stdout.
func (d *Daemon) Stderr() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.stderr == nil {
		return ""
	}
	return strings.TrimSpace(d.stderr.String())
}

// Wait waits for the daemon to exit and returns its exit error (with stderr).
func (d *Daemon) Wait() error {
	<-d.Done()
	d.mu.Lock()
	err := d.err
	d.mu.Unlock()
	if err == nil {
		return nil
	}
	return d.exitError()
}

func (d *Daemon) exitError() error {
	d.mu.Lock()
	err := d.err
	d.mu.Unlock()
	return fmt.Errorf("qsd: export %q of %s: %w (%v): %s", d.opts.Name, d.opts.File, ErrExited, err, d.Stderr())
}

// Stop asks the daemon to quit over QMP (it closes the export, flushes and
// closes the image) and kills it by PID if it has not exited within
// StopTimeout. The sockets are removed. Stopping a stopped daemon is a no-op.
func (d *Daemon) Stop(ctx context.Context) error {
	done := d.Done()
	select {
	case <-done:
		d.cleanup()
		return nil
	default:
	}
	qctx, cancel := context.WithTimeout(ctx, d.opts.StopTimeout)
	defer cancel()
	qerr := d.QMP(qctx, "quit", nil, nil)
	select {
	case <-done:
	case <-qctx.Done():
		d.kill()
		<-done
		d.cleanup()
		return fmt.Errorf("qsd: export %s did not quit (%v); killed pid %d", d.opts.Name, qerr, d.PID())
	}
	d.cleanup()
	d.mu.Lock()
	err := d.err
	d.mu.Unlock()
	if err != nil {
		return d.exitError()
	}
	return nil
}

// Restart stops the daemon (if it runs) and starts a new one with the same
// options, for the life of Start's context; ctx bounds the stop and the
// wait for readiness. The export answers again when it returns.
//
// An adopted daemon is restarted as a child of this process.
func (d *Daemon) Restart(ctx context.Context) error {
	if err := d.Stop(ctx); err != nil && !errors.Is(err, ErrExited) {
		return err
	}
	return d.start(ctx)
}

// kill sends SIGKILL to the daemon's PID (unless it has exited: the PID
// may be another process's by then).
func (d *Daemon) kill() {
	d.mu.Lock()
	pid, done := d.pid, d.done
	d.mu.Unlock()
	select {
	case <-done:
		return
	default:
	}
	if pid > 0 {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

func (d *Daemon) cleanup() {
	os.Remove(d.opts.Socket)
	os.Remove(d.opts.Monitor)
}

// removeStaleSocket removes a socket at path nobody answers on; a live one
// is an error (another daemon serves there).
func removeStaleSocket(path string) error {
	st, err := os.Lstat(path)
	if err != nil {
		return nil
	}
	if st.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("qsd: %s exists and is not a socket", path)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("qsd: %s: another server is listening there", path)
	}
	return os.Remove(path)
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu   sync.Mutex
	max  int
	b    []byte
	file string // String reads the tail of this file instead
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append([]byte(nil), t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	if t.file != "" {
		return fileTail(t.file, 4<<10)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

// fileTail is the last n bytes of the file at path ("" if unreadable).
func fileTail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(st.Size()-n, 0)
	b := make([]byte, st.Size()-off)
	k, _ := f.ReadAt(b, off)
	return string(b[:k])
}

package qsd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/errdefs"
)

// Adopt takes over a daemon a previous instance of this process started for
// o (PID pid) and that outlived it, as an agent does after a restart, so
// that the export's clients keep their connections. It is adopted only if
// PID pid still runs o.Binary with o's NBD socket among its arguments (a
// recycled PID is refused) and its monitor lists the export; otherwise it
// is errdefs.ErrNotFound and the caller starts a new daemon (Start).
//
// An adopted daemon is not a child: its exit is noticed through a pidfd,
// its stderr is read back only from o.LogFile, and ctx (its life) ending does not kill it;
// Stop ends it as it ends a child.
func Adopt(ctx context.Context, o Options, pid int) (*Daemon, error) {
	if err := o.fill(); err != nil {
		return nil, err
	}
	notFound := func(why string) (*Daemon, error) {
		return nil, fmt.Errorf("qsd: adopt pid %d for export %q: %s: %w", pid, o.Name, why, errdefs.ErrNotFound)
	}
	if pid <= 0 {
		return notFound("no pid recorded")
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return notFound("not running")
	}
	args := bytes.Split(bytes.TrimSuffix(cmdline, []byte{0}), []byte{0})
	want, err := Args(o)
	if err != nil {
		return nil, err
	}
	if len(args) != len(want)+1 {
		return notFound("runs something else")
	}
	for i, a := range want {
		if string(args[i+1]) != a {
			return notFound("runs with other arguments")
		}
	}
	done := make(chan struct{})
	d := &Daemon{opts: o, life: ctx, pid: pid, stderr: &tailBuffer{max: 1, file: o.LogFile}, done: done}
	if err := d.checkReady(ctx); err != nil {
		return notFound("its export does not answer: " + err.Error())
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return notFound("pidfd: " + err.Error())
	}
	go func() {
		defer close(done)
		defer unix.Close(fd)
		for {
			_, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, -1)
			if err == nil || !errors.Is(err, unix.EINTR) {
				return // exited (its status went to its new parent)
			}
		}
	}()
	return d, nil
}

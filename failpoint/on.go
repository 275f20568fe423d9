//go:build failpoints

package failpoint

import (
	"fmt"
	"os"
	"syscall"

	"go.etcd.io/gofail/runtime"

	"github.com/stowage/stowage/errdefs"
)

// Enabled says whether this binary carries failpoints.
const Enabled = true

var points = map[string]*runtime.Failpoint{}

func init() {
	for _, names := range [][]string{Controller, Agent, Requests} {
		for _, n := range names {
			points[n] = runtime.NewFailpoint(n)
		}
	}
}

// Hit evaluates failpoint name: nothing unless it is enabled; return("kill")
// kills the process with SIGKILL here, return("error") fails the step,
// sleep and panic do what gofail says.
func Hit(name string) error {
	fp := points[name]
	if fp == nil {
		return nil
	}
	v, err := fp.Acquire()
	if err != nil {
		return nil // disabled
	}
	fmt.Fprintf(os.Stderr, "failpoint %s: %v\n", name, v)
	switch v {
	case "kill":
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is on its way
	case "error":
		return fmt.Errorf("failpoint %s: %w", name, errdefs.ErrUnavailable)
	}
	return nil
}

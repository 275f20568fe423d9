// Command stowage is Stowage's one binary: the controller (`stowage
// controller`), the per-host agent (`stowage agent`), both in one process for
// a laptop (`stowage dev`), the copy engine (`stowage copy`, `stowage
// verify`) and the client commands (`stowage store|host|template|volume|
// snapshot|job ...`).
//
// Exit codes, for scripts: 0 success, 1 internal error, 2 invalid input or
// usage, 3 not found, 4 already exists, 5 failed precondition (wrong state,
// conflict, busy), 6 unavailable (controller or agent unreachable; retry),
// 7 data loss (checksum mismatch), 130 interrupted.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/stowage/stowage/errdefs"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	registerDataSchemes()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "stowage:", err)
		os.Exit(exitCode(err))
	}
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "stowage",
		Short:         "Stowage keeps and moves the disks of virtual machines",
		Long:          "Stowage is a storage subsystem for hypervisor clouds: a controller that decides,\nand an agent on every host that moves the bytes.",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version,
	}
	clientFlags(root)
	root.PersistentFlags().StringP("output", "o", "table", "output format: table or json")
	root.PersistentFlags().String("log-level", "info", "log level: debug, info, warn, error")
	root.PersistentFlags().String("log-format", "text", "log format: text or json")
	addCredentialFlags(root)
	root.AddCommand(
		newControllerCmd(),
		newAgentCmd(),
		newDevCmd(),
		newStoreCmd(),
		newHostCmd(),
		newTemplateCmd(),
		newVolumeCmd(),
		newSnapshotCmd(),
		newJobCmd(),
		newTokenCmd(),
		newMetadataCmd(),
		newCopyCmd(),
		newVerifyCmd(),
		newNBDCmd(),
		newCacheCmd(),
	)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return usageError{fmt.Errorf("%w (see '%s --help')", err, c.CommandPath())}
	})
	return root
}

// usageError marks a command-line mistake (exit code 2).
type usageError struct{ error }

func (u usageError) Unwrap() error { return u.error }

func exitCode(err error) int {
	var u usageError
	if errors.As(err, &u) {
		return 2
	}
	// Cobra's own command-line checks return plain errors.
	for _, usage := range []string{"required flag(s)", "unknown command", "unknown flag", "accepts ", "invalid argument"} {
		if strings.Contains(err.Error(), usage) && errdefs.Class(err) == nil {
			return 2
		}
	}
	switch errdefs.Class(err) {
	case nil:
		if errors.Is(err, context.Canceled) {
			return 130
		}
		return 1
	case errdefs.ErrInvalid:
		return 2
	case errdefs.ErrUnauthenticated, errdefs.ErrPermissionDenied:
		return 8
	case errdefs.ErrNotFound:
		return 3
	case errdefs.ErrAlreadyExists:
		return 4
	case errdefs.ErrFailedPrecondition, errdefs.ErrConflict, errdefs.ErrAborted:
		return 5
	case errdefs.ErrUnavailable, context.DeadlineExceeded:
		return 6
	case errdefs.ErrDataLoss:
		return 7
	case context.Canceled:
		return 130
	}
	return 1
}

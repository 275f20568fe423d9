package main

import (
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/stowage/stowage/datapath/iscsi"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// copyToLUN is `stowage copy SRC iscsi://…`: the agent's path into a LUN
// (datapath/iscsi.Convert: qemu-img through libiscsi, zero blocks skipped,
// parallel out-of-order writes), with the CHAP secret read from a file.
func copyToLUN(cmd *cobra.Command, f copyFlags, src, dst string, asJSON bool) error {
	u, err := url.Parse(dst)
	if err != nil {
		return usageError{fmt.Errorf("DST %s: %v: %w", redact.URL(dst), err, errdefs.ErrInvalid)}
	}
	if u.User != nil {
		if _, has := u.User.Password(); has {
			return usageError{fmt.Errorf("DST %s: put the CHAP secret in --chap-secret-file, not the URL (it would be visible in the process list): %w", redact.URL(dst), errdefs.ErrInvalid)}
		}
		if f.chapSecretFile != "" {
			b, err := os.ReadFile(f.chapSecretFile)
			if err != nil {
				return usageError{fmt.Errorf("--chap-secret-file: %w", err)}
			}
			u.User = url.UserPassword(u.User.Username(), strings.TrimSpace(string(b)))
		}
	}
	format := f.sourceFormat
	if format == "" {
		format = "raw"
	}
	start := time.Now()
	if err := iscsi.Convert(cmd.Context(), src, format, u.String(), "raw", f.lunIsZero, nil); err != nil {
		return err
	}
	took := time.Since(start)
	if asJSON {
		enc := json.NewEncoder(cmd.OutOrStdout())
		enc.SetIndent("", "  ")
		return enc.Encode(map[string]any{"source": src, "destination": redact.URL(dst), "seconds": took.Seconds(), "method": "qemu-img convert (libiscsi)"})
	}
	fmt.Fprintf(cmd.OutOrStdout(), "copied %s to %s in %s (qemu-img through libiscsi)\n", src, redact.URL(dst), took.Round(time.Millisecond))
	return nil
}

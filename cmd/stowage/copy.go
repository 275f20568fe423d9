package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/stowage/stowage/errdefs"
)

// newCopyCmd is `stowage copy SRC DST` (being implemented).
func newCopyCmd() *cobra.Command {
	return &cobra.Command{Use: "copy SRC DST", Short: "Copy a disk image (sparse, resumable, verified)", Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return fmt.Errorf("copy: %w", errdefs.ErrNotImplemented)
		}}
}

// newVerifyCmd is `stowage verify A B` (being implemented).
func newVerifyCmd() *cobra.Command {
	return &cobra.Command{Use: "verify A B", Short: "Compare two disk images by extents", Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return fmt.Errorf("verify: %w", errdefs.ErrNotImplemented)
		}}
}

package qemuimg

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/stowage/stowage/errdefs"
)

// Resize sets the virtual size of the image at path (format asserted, never
// probed) to size bytes, a multiple of SectorSize. Shrinking is refused
// here (errdefs.ErrInvalid) before qemu-img runs: it destroys data, and
// callers that mean it must say so some other way.
func (t *Tool) Resize(ctx context.Context, path, format string, size int64) error {
	if path == "" || format == "" {
		return fmt.Errorf("qemu-img resize: path and format are required: %w", errdefs.ErrInvalid)
	}
	if size <= 0 || size%SectorSize != 0 {
		return fmt.Errorf("qemu-img resize %s: size %d is not a positive multiple of %d: %w", path, size, SectorSize, errdefs.ErrInvalid)
	}
	info, err := t.Info(ctx, path, AssumeFormat(format))
	if err != nil {
		return err
	}
	if size < info.VirtualSize {
		return fmt.Errorf("qemu-img resize %s: %d bytes is smaller than the image's %d; shrinking is refused: %w", path, size, info.VirtualSize, errdefs.ErrInvalid)
	}
	if size == info.VirtualSize {
		return nil
	}
	_, err = t.run(ctx, "resize", path, "resize", "-q", "-f", format, fileArg(path), strconv.FormatInt(size, 10))
	return err
}

// RebaseOption tunes Rebase.
type RebaseOption func(*rebaseConfig)

type rebaseConfig struct{ unsafe bool }

// UnsafeRebase only rewrites the backing file name (qemu-img rebase -u). It
// is correct only when the new backing file reads exactly as the old one;
// anything else silently changes what the guest sees.
func UnsafeRebase() RebaseOption { return func(c *rebaseConfig) { c.unsafe = true } }

// Rebase makes the qcow2 image at path use backing (of backingFormat) as its
// backing file; backing "" makes it standalone. In the default (safe) mode
// qemu-img first copies into the image every cluster where the old and the
// new backing chains differ, so the guest sees the same bytes afterwards.
// A crash in the middle leaves a valid image on the old chain.
func (t *Tool) Rebase(ctx context.Context, path, backing, backingFormat string, opts ...RebaseOption) error {
	var c rebaseConfig
	for _, o := range opts {
		o(&c)
	}
	if path == "" {
		return fmt.Errorf("qemu-img rebase: empty path: %w", errdefs.ErrInvalid)
	}
	if backing != "" && backingFormat == "" {
		return fmt.Errorf("qemu-img rebase %s: backing file %s without its format: %w", path, backing, errdefs.ErrInvalid)
	}
	args := []string{"rebase", "-q", "-f", FormatQCOW2}
	if c.unsafe {
		args = append(args, "-u")
	}
	args = append(args, "-b", backing)
	if backing != "" {
		args = append(args, "-F", backingFormat)
	}
	args = append(args, fileArg(path))
	_, err := t.run(ctx, "rebase", path, args...)
	return err
}

// CheckResult is what qemu-img check --output=json reports.
type CheckResult struct {
	Filename         string `json:"filename"`
	Format           string `json:"format"`
	CheckErrors      int64  `json:"check-errors"`
	Corruptions      int64  `json:"corruptions"`
	Leaks            int64  `json:"leaks"`
	ImageEndOffset   int64  `json:"image-end-offset"`
	TotalClusters    int64  `json:"total-clusters"`
	AllocatedCluster int64  `json:"allocated-clusters"`
}

// OK reports whether the image has neither corruptions nor check errors
// (leaked clusters waste space but lose nothing).
func (r CheckResult) OK() bool { return r.CheckErrors == 0 && r.Corruptions == 0 }

// Check runs qemu-img check on the image at path (format asserted). A
// corrupt image is not an error of Check: the result says so (OK false);
// only a check that could not run is.
func (t *Tool) Check(ctx context.Context, path, format string) (CheckResult, error) {
	if path == "" || format == "" {
		return CheckResult{}, fmt.Errorf("qemu-img check: path and format are required: %w", errdefs.ErrInvalid)
	}
	var stdout bytes.Buffer
	// Exit 2: corruptions found, 3: leaks only; the JSON is printed either way.
	err := t.runTo(ctx, "check", path, &stdout, func(code int) bool { return code == 2 || code == 3 },
		"check", "--output=json", "-f", format, fileArg(path))
	var st *exitStatus
	if err != nil && !errors.As(err, &st) {
		return CheckResult{}, err
	}
	var r CheckResult
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		return CheckResult{}, fmt.Errorf("qemu-img check %s: unexpected output: %v: %w", path, err, errdefs.ErrInternal)
	}
	if st != nil && st.code == 2 && r.OK() {
		r.Corruptions = max(r.Corruptions, 1) // qemu-img said corrupt; never report OK
	}
	return r, nil
}

// Compare reports whether the images a and b (formats asserted) read the
// same to a guest (qemu-img compare, not strict: an unallocated range equals
// zeros, and a larger image's extra bytes must be zeros). It stops at the
// first difference, so images that differ early are cheap to compare.
func (t *Tool) Compare(ctx context.Context, a, aFormat, b, bFormat string) (bool, error) {
	if a == "" || b == "" || aFormat == "" || bFormat == "" {
		return false, fmt.Errorf("qemu-img compare: paths and formats are required: %w", errdefs.ErrInvalid)
	}
	var stdout bytes.Buffer
	err := t.runTo(ctx, "compare", a, &stdout, func(code int) bool { return code == 1 },
		"compare", "-q", "-f", aFormat, "-F", bFormat, fileArg(a), fileArg(b))
	var st *exitStatus
	switch {
	case err == nil:
		return true, nil
	case errors.As(err, &st):
		return false, nil
	}
	return false, err
}

package iscsi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// secretID is the id of the secret object in every qemu-img run.
const secretID = "stowage-iscsi-chap"

// WriteOption tunes Write.
type WriteOption func(*writeConfig)

type writeConfig struct {
	targetIsZero bool
	parallel     int
}

// TargetIsZero tells Write the LUN reads as zeros (a freshly created
// sparse backing), so qemu-img skips zeroing what the source leaves as
// holes (--target-is-zero). Wrong on a reused LUN: old data would show
// through the source's holes.
func TargetIsZero() WriteOption { return func(c *writeConfig) { c.targetIsZero = true } }

// Parallel sets qemu-img's coroutines (-m, 1..16, default 8); writes
// complete out of order (-W) either way.
func Parallel(n int) WriteOption { return func(c *writeConfig) { c.parallel = n } }

// Write copies the image at srcPath (format srcFormat, asserted, never
// probed) into the LUN dst, which exists and is at least as large as the
// image's virtual size. Zero ranges of 4 KiB or more are not written as
// data (-S 4k): they are skipped with TargetIsZero, else zeroed with WRITE
// SAME/UNMAP where the target supports it. progress, when not nil, gets
// bytes done and the total (the image's virtual size) as qemu-img reports
// them, from one goroutine.
func Write(ctx context.Context, srcPath, srcFormat string, dst Target, progress func(done, total int64), opts ...WriteOption) error {
	cmd, cleanup, err := writeCmd(ctx, srcPath, srcFormat, dst, progress != nil, opts...)
	if err != nil {
		return err
	}
	defer cleanup()
	var total int64
	if progress != nil {
		if total, err = fileSize(ctx, srcPath, srcFormat); err != nil {
			return err
		}
		cmd.Stdout = qemuimg.PercentWriter(func(p float64) { progress(int64(p/100*float64(total)), total) })
	}
	if err := run(ctx, cmd, "write "+srcPath+" to", dst); err != nil {
		return err
	}
	if progress != nil {
		progress(total, total)
	}
	return nil
}

func writeCmd(ctx context.Context, srcPath, srcFormat string, dst Target, withProgress bool, opts ...WriteOption) (*exec.Cmd, func(), error) {
	c := writeConfig{parallel: 8}
	for _, o := range opts {
		o(&c)
	}
	if srcPath == "" || srcFormat == "" {
		return nil, nil, fmt.Errorf("iscsi write to %s: source path and format are required: %w", dst, errdefs.ErrInvalid)
	}
	if c.parallel < 1 || c.parallel > 16 {
		return nil, nil, fmt.Errorf("iscsi write to %s: -m %d: want 1..16: %w", dst, c.parallel, errdefs.ErrInvalid)
	}
	if err := dst.validate(); err != nil {
		return nil, nil, err
	}
	obj, cleanup, err := dst.SecretArgs(secretID)
	if err != nil {
		return nil, nil, err
	}
	args := append([]string{"convert", "-n", "-f", srcFormat, "-S", "4k", "-W", "-m", strconv.Itoa(c.parallel)}, obj...)
	if c.targetIsZero {
		args = append(args, "--target-is-zero")
	}
	if withProgress {
		args = append(args, "-p")
	}
	args = append(args, "--target-image-opts", fileArg(srcPath), dst.ImageOpts(secretID))
	return command(ctx, "convert", args), cleanup, nil
}

// Read copies the LUN src into a new image at dstPath in dstFormat
// (overwritten if it exists), sparse: zero ranges of 4 KiB or more become
// holes.
func Read(ctx context.Context, src Target, dstPath, dstFormat string) error {
	if dstPath == "" || dstFormat == "" {
		return fmt.Errorf("iscsi read of %s: destination path and format are required: %w", src, errdefs.ErrInvalid)
	}
	if err := src.validate(); err != nil {
		return err
	}
	obj, cleanup, err := src.SecretArgs(secretID)
	if err != nil {
		return err
	}
	defer cleanup()
	args := append([]string{"convert", "-O", dstFormat, "-S", "4k", "-W", "-m", "8"}, obj...)
	args = append(args, "--image-opts", src.ImageOpts(secretID), fileArg(dstPath))
	return run(ctx, command(ctx, "convert", args), "read to "+dstPath+" from", src)
}

// Size returns the LUN's size in bytes.
func Size(ctx context.Context, t Target) (int64, error) {
	if err := t.validate(); err != nil {
		return 0, err
	}
	obj, cleanup, err := t.SecretArgs(secretID)
	if err != nil {
		return 0, err
	}
	defer cleanup()
	args := append(append([]string{"info", "--output", "json"}, obj...), "--image-opts", t.ImageOpts(secretID))
	cmd := command(ctx, "info", args)
	var out bytes.Buffer
	cmd.Stdout = &out
	if err := run(ctx, cmd, "size of", t); err != nil {
		return 0, err
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(out.Bytes(), &info); err != nil {
		return 0, fmt.Errorf("iscsi size of %s: qemu-img info output: %v: %w", t, err, errdefs.ErrInternal)
	}
	return info.VirtualSize, nil
}

// Compare checks that the LUN t and the image at path (format asserted)
// have the same content (qemu-img compare: a size difference is allowed
// when the extra part reads as zeros). A difference is errdefs.ErrDataLoss
// naming the first differing offset.
func Compare(ctx context.Context, t Target, path, format string) error {
	if path == "" || format == "" {
		return fmt.Errorf("iscsi compare of %s: path and format are required: %w", t, errdefs.ErrInvalid)
	}
	if err := t.validate(); err != nil {
		return err
	}
	obj, cleanup, err := t.SecretArgs(secretID)
	if err != nil {
		return err
	}
	defer cleanup()
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("iscsi compare of %s with %s: %w", t, path, err)
	}
	// --image-opts applies to both images, so the file is options too.
	fileOpts := "driver=" + optEscape(format) + ",file.driver=file,file.filename=" + optEscape(abs)
	args := append(append([]string{"compare"}, obj...), "--image-opts", t.ImageOpts(secretID), fileOpts)
	cmd := command(ctx, "compare", args)
	var out bytes.Buffer
	cmd.Stdout = &out
	err = run(ctx, cmd, "compare with "+path+" of", t)
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 1 {
		return fmt.Errorf("iscsi compare of %s with %s: %s: %w", t, path, strings.TrimSpace(out.String()), errdefs.ErrDataLoss)
	}
	return err
}

// fileSize is the virtual size of a local image.
func fileSize(ctx context.Context, path, format string) (int64, error) {
	cmd := command(ctx, "info", []string{"info", "--output", "json", "-f", format, fileArg(path)})
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("qemu-img info %s: %s: %w", path, strings.TrimSpace(stderr.String()), classify(stderr.String()))
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(out.Bytes(), &info); err != nil {
		return 0, fmt.Errorf("qemu-img info %s: %v: %w", path, err, errdefs.ErrInternal)
	}
	return info.VirtualSize, nil
}

// prlimit is util-linux's prlimit, when installed.
var prlimit = sync.OnceValue(func() string {
	p, _ := exec.LookPath("prlimit")
	return p
})

// command builds a qemu-img process under the limits datapath/qemuimg
// gives the same operation on untrusted images (address space, and CPU
// time for info), through prlimit when it is installed.
func command(ctx context.Context, op string, args []string) *exec.Cmd {
	var cmd *exec.Cmd
	if prlimit() == "" {
		cmd = exec.CommandContext(ctx, "qemu-img", args...)
	} else {
		limits := []string{fmt.Sprintf("--as=%d", int64(qemuimg.CopyAddressSpace))}
		if op == "info" {
			limits = []string{fmt.Sprintf("--as=%d", int64(qemuimg.InfoAddressSpace)), fmt.Sprintf("--cpu=%d", qemuimg.InfoCPUSeconds)}
		}
		cmd = exec.CommandContext(ctx, prlimit(), append(append(limits, "--", "qemu-img"), args...)...)
	}
	cmd.Env = append(os.Environ(), "LC_ALL=C", "MALLOC_ARENA_MAX=2")
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// run runs cmd and turns a failure into a classed error about t (what
// says what was done to it) without t's secret.
func run(ctx context.Context, cmd *exec.Cmd, what string, t Target) error {
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return fmt.Errorf("iscsi %s %s: %w", what, t, ctx.Err())
	}
	msg := strings.TrimSpace(strings.ReplaceAll(stderr.String(), "qemu-img: ", ""))
	if t.Secret != "" {
		msg = strings.ReplaceAll(msg, t.Secret, redact.Marker)
	}
	msg = redact.Text(msg)
	// qemu-img repeats the whole option string; the target is named already.
	if i := strings.Index(msg, "': "); strings.HasPrefix(msg, "Could not open '") && i > 0 {
		msg = msg[i+3:]
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return fmt.Errorf("iscsi %s %s: qemu-img: %v: %w", what, t, err, errdefs.ErrUnavailable)
	}
	class := classify(msg)
	switch class {
	case errdefs.ErrUnauthenticated:
		return fmt.Errorf("iscsi %s %s: CHAP authentication failed for user %q (wrong user or secret, or CHAP required): %s: %w (qemu-img %w)", what, t, t.User, msg, class, ee)
	case errdefs.ErrNotFound:
		if strings.Contains(msg, "Target not found") {
			return fmt.Errorf("iscsi %s %s: target not found, or initiator %q is not allowed to log in: %s: %w (qemu-img %w)", what, t, t.Initiator, msg, class, ee)
		}
	}
	return fmt.Errorf("iscsi %s %s: %s: %w (qemu-img %w)", what, t, msg, class, ee)
}

// classify maps qemu-img's message (libiscsi's, inside) to a class.
func classify(msg string) error {
	switch {
	case strings.Contains(msg, "Authentication failure"):
		return errdefs.ErrUnauthenticated
	case strings.Contains(msg, "Target not found"), strings.Contains(msg, "LOGICAL_UNIT_NOT_SUPPORTED"),
		strings.Contains(msg, "No such file or directory"):
		return errdefs.ErrNotFound
	case strings.Contains(msg, "Failed to connect"), strings.Contains(msg, "Connection refused"),
		strings.Contains(msg, "reconnect"), strings.Contains(msg, "timed out"), strings.Contains(msg, "Network is unreachable"):
		return errdefs.ErrUnavailable
	case strings.Contains(msg, "Permission denied"):
		return errdefs.ErrPermissionDenied
	case strings.Contains(msg, "smaller than"), strings.Contains(msg, "too small"):
		return errdefs.ErrFailedPrecondition
	}
	return errdefs.ErrInternal
}

// fileArg keeps qemu-img from reading a relative path as a protocol
// ("nbd:…", "json:…").
func fileArg(path string) string {
	if filepath.IsAbs(path) || strings.HasPrefix(path, "./") || strings.HasPrefix(path, "../") {
		return path
	}
	return "./" + path
}

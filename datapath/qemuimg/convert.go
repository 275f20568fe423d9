package qemuimg

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/stowage/stowage/errdefs"
)

// ConvertOption tunes Convert.
type ConvertOption func(*convertConfig)

type convertConfig struct {
	srcFormat  string
	parallel   int
	outOfOrder bool
	sparse     string
	noCreate   bool
	cache      string
	options    string
	progress   func(percent float64)
}

// SourceFormat asserts the source's format (-f) instead of probing it.
// Always give it for images you did not write yourself: probing a raw image
// that starts with a qcow2 header would follow its backing file.
func SourceFormat(format string) ConvertOption {
	return func(c *convertConfig) { c.srcFormat = format }
}

// Parallel runs n coroutines (-m n, 1..16) and, with outOfOrder, lets
// writes complete out of order (-W).
func Parallel(n int, outOfOrder bool) ConvertOption {
	return func(c *convertConfig) { c.parallel, c.outOfOrder = n, outOfOrder }
}

// MinSparse sets the zero-detection unit (-S, e.g. "4k"; "0" writes
// everything).
func MinSparse(size string) ConvertOption {
	return func(c *convertConfig) { c.sparse = size }
}

// NoCreate writes into an existing destination (-n), e.g. a block device.
func NoCreate() ConvertOption { return func(c *convertConfig) { c.noCreate = true } }

// CacheMode sets the destination cache mode (-t: none, writeback, unsafe...).
func CacheMode(mode string) ConvertOption { return func(c *convertConfig) { c.cache = mode } }

// FormatOptions passes -o to the output format ("compat=1.1,cluster_size=65536").
func FormatOptions(opts string) ConvertOption { return func(c *convertConfig) { c.options = opts } }

// ConvertProgress runs qemu-img convert with -p and calls fn with the
// percentage done (0 to 100) as qemu-img reports it, from one goroutine.
func ConvertProgress(fn func(percent float64)) ConvertOption {
	return func(c *convertConfig) { c.progress = fn }
}

// Convert copies the image at src into a new image at dst in format
// (qemu-img convert). dst is overwritten if it exists; write to a temporary
// name and rename when the result must appear atomically.
func (t *Tool) Convert(ctx context.Context, src, dst, format string, opts ...ConvertOption) error {
	var c convertConfig
	for _, o := range opts {
		o(&c)
	}
	if src == "" || dst == "" || format == "" {
		return fmt.Errorf("qemu-img convert: source, destination and format are required: %w", errdefs.ErrInvalid)
	}
	args := []string{"convert", "-O", format}
	if c.srcFormat != "" {
		args = append(args, "-f", c.srcFormat)
	}
	if c.parallel > 0 {
		if c.parallel > 16 {
			return fmt.Errorf("qemu-img convert: -m %d: at most 16: %w", c.parallel, errdefs.ErrInvalid)
		}
		args = append(args, "-m", strconv.Itoa(c.parallel))
	}
	if c.outOfOrder {
		args = append(args, "-W")
	}
	if c.sparse != "" {
		args = append(args, "-S", c.sparse)
	}
	if c.noCreate {
		args = append(args, "-n")
	}
	if c.cache != "" {
		args = append(args, "-t", c.cache)
	}
	if c.options != "" {
		args = append(args, "-o", c.options)
	}
	if c.progress != nil {
		args = append(args, "-p")
	}
	args = append(args, fileArg(src), fileArg(dst))
	if c.progress == nil {
		_, err := t.run(ctx, "convert", src, args...)
		return err
	}
	return t.runTo(ctx, "convert", src, &percentWriter{fn: c.progress}, nil, args...)
}

// PercentWriter parses qemu-img's -p output, "    (12.34/100%)\r", and
// calls fn with each percentage.
func PercentWriter(fn func(float64)) io.Writer { return &percentWriter{fn: fn} }

// percentWriter parses qemu-img's -p output, "    (12.34/100%)\r".
type percentWriter struct {
	fn   func(float64)
	line []byte
}

func (w *percentWriter) Write(p []byte) (int, error) {
	for _, b := range p {
		if b != '\r' && b != '\n' {
			if len(w.line) < 64 {
				w.line = append(w.line, b)
			}
			continue
		}
		s := strings.TrimSpace(string(w.line))
		w.line = w.line[:0]
		s = strings.TrimSuffix(strings.TrimPrefix(s, "("), "/100%)")
		if v, err := strconv.ParseFloat(s, 64); err == nil {
			w.fn(v)
		}
	}
	return len(p), nil
}

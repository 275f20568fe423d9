package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
)

// copyFlags are the flags of `stowage copy`.
type copyFlags struct {
	// iscsi:// destinations (copy_lun.go).
	chapSecretFile string
	lunIsZero      bool

	sparse       bool
	direct       bool
	workers      int
	chunkSize    string
	checksum     string
	sha256       bool
	resume       bool
	progress     bool
	format       string
	sourceFormat string
	mode         string
	writeMode    string
	readMode     string
	rateLimit    string
	retries      int
	stall        time.Duration
	noResumeVrfy bool
	ignoreSrcSum bool
}

// newCopyCmd is `stowage copy SRC DST`: the block copy engine on the
// command line.
func newCopyCmd() *cobra.Command {
	var f copyFlags
	cmd := &cobra.Command{
		Use:   "copy SRC DST",
		Short: "Copy a disk image: sparse, parallel, verified and resumable",
		Long: `Copy SRC to DST. SRC is a path (file, block device, qcow2 image) or an
http(s):// URL; DST is a path (file or block device) or a LUN, iscsi://user@portal/iqn/lun
(written through libiscsi in qemu-img; --chap-secret-file). Holes are never read and
all-zero blocks are not written, so DST keeps exactly the allocation of the
data. DST appears only when the copy is complete and synced: it is written
under a hidden temporary name and renamed. An interrupted copy (killed,
cancelled, connection lost) continues with --resume.

Output formats: --format qcow2 has qemu-img write a qcow2 image.`,
		Example: `  stowage copy /srv/images/t.raw /srv/primary/v1.raw
  stowage copy --checksum sha256:1f0e... https://images.example/t.raw /srv/images/t.raw
  stowage copy --resume https://images.example/t.raw /srv/images/t.raw
  stowage copy -o json a.qcow2 /dev/loop3`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error { return runCopy(cmd, f, args[0], args[1]) },
	}
	fl := cmd.Flags()
	fl.BoolVar(&f.sparse, "sparse", true, "skip holes and zero blocks (--sparse=false writes every byte: a fully allocated destination)")
	fl.BoolVar(&f.direct, "direct", false, "O_DIRECT reads and writes (same as --read-mode direct --write-mode direct)")
	fl.IntVar(&f.workers, "workers", stream.DefaultWorkers, "chunks in flight")
	fl.StringVar(&f.chunkSize, "chunk-size", "2MiB", "unit of reads, writes and checkpoints (power of two, 64KiB-256MiB)")
	fl.StringVar(&f.checksum, "checksum", "", "expected checksum, sha256:HEX; on mismatch nothing is left at DST (exit 7)")
	fl.BoolVar(&f.sha256, "sha256", false, "compute the SHA-256 of the copied object and report it")
	fl.BoolVar(&f.resume, "resume", false, "continue an interrupted copy to DST from its checkpoint")
	fl.BoolVar(&f.progress, "progress", false, "report progress even when stderr is not a terminal (a bar is shown on a terminal anyway)")
	fl.StringVar(&f.format, "format", "raw", "destination format: raw or qcow2")
	fl.StringVar(&f.sourceFormat, "source-format", "", "source format: raw or qcow2 (default: detect)")
	fl.StringVar(&f.mode, "mode", "auto", "copy mechanism: auto (reflink when possible), readwrite, reflink, cfr (copy_file_range)")
	fl.StringVar(&f.writeMode, "write-mode", "auto", "file writes: auto, evict (write-back and drop pages), direct, buffered")
	fl.StringVar(&f.readMode, "read-mode", "auto", "file reads: auto, direct, buffered")
	fl.StringVar(&f.rateLimit, "rate-limit", "", "cap the read rate, e.g. 100MiB (per second)")
	fl.IntVar(&f.retries, "retries", 5, "retries of a failed or stalled HTTP read")
	fl.DurationVar(&f.stall, "stall-timeout", 30*time.Second, "give up an HTTP transfer attempt that received nothing for this long")
	fl.BoolVar(&f.noResumeVrfy, "no-resume-verify", false, "trust the checkpoint without re-hashing the chunks it lists")
	fl.BoolVar(&f.ignoreSrcSum, "ignore-source-checksum", false, "do not check the SHA-256 an HTTP server announces")
	fl.StringVar(&f.chapSecretFile, "chap-secret-file", "", "for an iscsi:// DST (iscsi://user@portal/iqn/lun?initiator=iqn): the file holding the CHAP secret")
	fl.BoolVar(&f.lunIsZero, "lun-is-zero", false, "for an iscsi:// DST: the LUN reads as zeros (new), so holes are not written at all")
	return cmd
}

// copySummary is the final report of `stowage copy`.
type copySummary struct {
	Source      string `json:"source"`
	Destination string `json:"destination"`
	stream.Result
}

func runCopy(cmd *cobra.Command, f copyFlags, srcArg, dstArg string) error {
	asJSON, err := outputJSON(cmd)
	if err != nil {
		return err
	}
	if strings.HasPrefix(dstArg, "iscsi://") {
		return copyToLUN(cmd, f, srcArg, dstArg, asJSON)
	}
	chunk, err := parseCopySize(f.chunkSize)
	if err != nil {
		return usageError{fmt.Errorf("--chunk-size: %w", err)}
	}
	var rate int64
	if f.rateLimit != "" {
		if rate, err = parseCopySize(f.rateLimit); err != nil {
			return usageError{fmt.Errorf("--rate-limit: %w", err)}
		}
	}
	mode, ok := stream.ParseCopyMode(f.mode)
	if !ok {
		return usageError{fmt.Errorf("--mode %q: want auto, readwrite, reflink or cfr", f.mode)}
	}
	wm, ok := stream.ParseWriteMode(f.writeMode)
	if !ok {
		return usageError{fmt.Errorf("--write-mode %q: want auto, evict, direct or buffered", f.writeMode)}
	}
	rm, ok := stream.ParseReadMode(f.readMode)
	if !ok {
		return usageError{fmt.Errorf("--read-mode %q: want auto, direct or buffered", f.readMode)}
	}
	if f.direct {
		wm, rm = stream.WriteDirect, stream.ReadDirect
	}
	if f.checksum != "" && !strings.HasPrefix(strings.ToLower(f.checksum), "sha256:") {
		return usageError{fmt.Errorf("--checksum %q: want sha256:HEX", f.checksum)}
	}
	if f.retries <= 0 {
		f.retries = -1 // HTTPOptions: 0 means the default, negative no retries
	}
	ctx := cmd.Context()
	src, err := stream.OpenSource(ctx, srcArg, stream.SourceOptions{
		ReadMode: rm,
		Format:   f.sourceFormat,
		HTTP:     stream.HTTPOptions{MaxRetries: f.retries, StallTimeout: f.stall},
	})
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := stream.OpenSink(ctx, dstArg, src.Size(), stream.SinkOptions{WriteMode: wm, Resume: f.resume, Format: f.format})
	if err != nil {
		return err
	}
	defer dst.Abort() // no-op after Copy, which always ends the sink
	logger, err := copyLogger(cmd)
	if err != nil {
		return err
	}
	opts := stream.Options{
		Logger:               logger,
		Workers:              f.workers,
		ChunkSize:            int(chunk),
		Mode:                 mode,
		SHA256:               f.sha256,
		ExpectSHA256:         f.checksum,
		IgnoreSourceChecksum: f.ignoreSrcSum,
		Resume:               f.resume,
		NoResumeVerify:       f.noResumeVrfy,
		RateLimit:            rate,
		Dense:                !f.sparse,
	}
	rep := newProgressReporter(cmd.ErrOrStderr(), "copy", src.Size(), f.progress)
	if rep != nil {
		opts.Progress = rep.update
		defer rep.close()
	}
	res, err := stream.Copy(ctx, src, dst, opts)
	if rep != nil {
		rep.close()
	}
	if err != nil {
		if f.resume || !resumableErr(err) {
			return err
		}
		return fmt.Errorf("%w (run again with --resume to continue)", err)
	}
	sum := copySummary{Source: srcArg, Destination: dstArg, Result: res}
	out := cmd.OutOrStdout()
	if asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(sum)
	}
	kv := [][2]string{
		{"source", srcArg},
		{"destination", dstArg},
		{"size", humanBytes(res.Size)},
		{"read", humanBytes(res.BytesRead)},
		{"written", humanBytes(res.BytesWritten)},
		{"skipped holes", humanBytes(res.BytesHoles)},
		{"skipped zeros", humanBytes(res.BytesZero)},
	}
	if res.BytesResumed > 0 {
		kv = append(kv, [2]string{"resumed", humanBytes(res.BytesResumed)})
	}
	if res.BytesReflink > 0 {
		kv = append(kv, [2]string{"reflinked", humanBytes(res.BytesReflink)})
	}
	kv = append(kv,
		[2]string{"method", res.Method},
		[2]string{"seconds", strconv.FormatFloat(res.Seconds, 'f', 3, 64)},
		[2]string{"MiB/s", strconv.FormatFloat(res.MiBPerS, 'f', 1, 64)},
	)
	if res.SHA256 != "" {
		kv = append(kv, [2]string{"sha256", res.SHA256})
	}
	keyValues(out, kv)
	return nil
}

// copyLogger is the process logger from the root's --log-level and
// --log-format, or slog's default when the command runs without them.
func copyLogger(cmd *cobra.Command) (*slog.Logger, error) {
	if cmd.Flags().Lookup("log-level") == nil || cmd.Flags().Lookup("log-format") == nil {
		return slog.Default(), nil
	}
	return newLogger(cmd)
}

// resumableErr reports whether a copy that failed with err left a
// checkpoint worth resuming.
func resumableErr(err error) bool {
	switch errdefs.Class(err) {
	case errdefs.ErrInvalid, errdefs.ErrNotFound, errdefs.ErrDataLoss, errdefs.ErrAborted, errdefs.ErrNotImplemented, errdefs.ErrPermissionDenied, errdefs.ErrUnauthenticated:
		return false
	}
	return true
}

// newVerifyCmd is `stowage verify A B`.
func newVerifyCmd() *cobra.Command {
	var progress bool
	var workers int
	var sfA, sfB string
	cmd := &cobra.Command{
		Use:   "verify A B",
		Short: "Compare two disk images by extents",
		Long: `Compare the guest-visible content of A and B (paths, block devices, qcow2
images or http(s):// URLs). Ranges that are holes in both are equal without
being read. Exits 0 when equal and 7 (data loss) at the first difference.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := outputJSON(cmd)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			a, err := stream.OpenSource(ctx, args[0], stream.SourceOptions{Format: sfA})
			if err != nil {
				return err
			}
			defer a.Close()
			b, err := stream.OpenSource(ctx, args[1], stream.SourceOptions{Format: sfB})
			if err != nil {
				return err
			}
			defer b.Close()
			opts := stream.VerifyOptions{Workers: workers}
			rep := newProgressReporter(cmd.ErrOrStderr(), "verify", min(a.Size(), b.Size()), progress)
			if rep != nil {
				opts.Progress = rep.update
				defer rep.close()
			}
			res, verr := stream.Verify(ctx, a, b, opts)
			if rep != nil {
				rep.close()
			}
			if verr != nil && errdefs.Class(verr) != errdefs.ErrDataLoss {
				return verr
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				if err := enc.Encode(struct {
					A string `json:"a"`
					B string `json:"b"`
					stream.VerifyResult
				}{args[0], args[1], res}); err != nil {
					return err
				}
			} else {
				verdict := "equal"
				if !res.Equal {
					verdict = fmt.Sprintf("DIFFERENT (first difference at byte %d)", res.FirstDiff)
				}
				keyValues(out, [][2]string{
					{"a", fmt.Sprintf("%s (%s)", args[0], humanBytes(res.SizeA))},
					{"b", fmt.Sprintf("%s (%s)", args[1], humanBytes(res.SizeB))},
					{"result", verdict},
					{"compared", humanBytes(res.BytesCompared)},
					{"skipped holes", humanBytes(res.BytesSkipped)},
					{"seconds", strconv.FormatFloat(res.Seconds, 'f', 3, 64)},
				})
			}
			return verr
		},
	}
	cmd.Flags().BoolVar(&progress, "progress", false, "report progress even when stderr is not a terminal")
	cmd.Flags().IntVar(&workers, "workers", stream.DefaultWorkers, "chunks compared in parallel")
	cmd.Flags().StringVar(&sfA, "format-a", "", "format of A: raw or qcow2 (default: detect)")
	cmd.Flags().StringVar(&sfB, "format-b", "", "format of B: raw or qcow2 (default: detect)")
	return cmd
}

// progressReporter draws a bar on a terminal, or prints a line per second
// when --progress asked for progress on a pipe.
type progressReporter struct {
	mu     sync.Mutex
	bar    *progressbar.ProgressBar
	w      io.Writer
	what   string
	last   time.Time
	closed bool
}

func newProgressReporter(w io.Writer, what string, total int64, force bool) *progressReporter {
	tty := false
	if f, ok := w.(*os.File); ok {
		tty = term.IsTerminal(int(f.Fd()))
	}
	switch {
	case tty:
		return &progressReporter{w: w, what: what, bar: progressbar.NewOptions64(total,
			progressbar.OptionSetWriter(w),
			progressbar.OptionSetDescription(what),
			progressbar.OptionShowBytes(true),
			progressbar.OptionUseIECUnits(true),
			progressbar.OptionShowCount(),
			progressbar.OptionThrottle(200*time.Millisecond),
			progressbar.OptionSetWidth(30),
			progressbar.OptionClearOnFinish(),
		)}
	case force:
		return &progressReporter{w: w, what: what}
	}
	return nil
}

func (r *progressReporter) update(p stream.Progress) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	if r.bar != nil {
		_ = r.bar.Set64(p.Done)
		return
	}
	if !p.Final && time.Since(r.last) < time.Second {
		return
	}
	r.last = time.Now()
	pct := 100.0
	if p.Total > 0 {
		pct = float64(p.Done) * 100 / float64(p.Total)
	}
	fmt.Fprintf(r.w, "%s: %s / %s (%.0f%%), %.0f MiB/s\n", r.what, humanBytes(p.Done), humanBytes(p.Total), pct, p.BytesPerS/(1<<20))
}

func (r *progressReporter) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	r.closed = true
	if r.bar != nil {
		_ = r.bar.Finish()
	}
}

// parseCopySize parses "4194304", "4M", "4MiB", "512k", "1G" (binary units).
func parseCopySize(s string) (int64, error) {
	t := strings.TrimSpace(strings.ToLower(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "ib"), "b")
	mult := int64(1)
	if t != "" {
		switch t[len(t)-1] {
		case 'k':
			mult = 1 << 10
		case 'm':
			mult = 1 << 20
		case 'g':
			mult = 1 << 30
		case 't':
			mult = 1 << 40
		}
		if mult > 1 {
			t = t[:len(t)-1]
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("size %q: want a number with an optional unit (k, M, G, T): %w", s, errdefs.ErrInvalid)
	}
	return n * mult, nil
}

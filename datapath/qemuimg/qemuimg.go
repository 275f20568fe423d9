// Package qemuimg runs the qemu-img binary: it creates, converts, resizes,
// rebases, checks and compares disk images, maps their allocation, reads
// their metadata and reports the tool's version. It is a thin wrapper: each
// call is one qemu-img process started with exec.CommandContext, so a
// cancelled context kills the process, and the wrapper adds only argument
// validation, JSON parsing and error classes.
//
// Errors from a qemu-img run are *Error values that keep qemu-img's own
// message (stderr) and carry an errdefs class: a missing or unusable binary
// is errdefs.ErrUnavailable, bad input (unknown format, bad option, an image
// in another format than asserted) is errdefs.ErrInvalid, a missing file is
// errdefs.ErrNotFound, a full disk errdefs.ErrResourceExhausted, an image
// locked by another process errdefs.ErrFailedPrecondition. When the context
// ends first the error wraps ctx.Err() and carries no class.
//
//	q := qemuimg.New()
//	if err := q.Create(ctx, "/srv/store/volumes/.tmp-v1.qcow2", qemuimg.FormatQCOW2, 10<<30); err != nil { ... }
//	info, err := q.Info(ctx, "/srv/store/volumes/v1.qcow2")
//
// Two qemu-img behaviours callers must know about:
//
//   - Create overwrites a file that already exists at path (a raw image is
//     truncated, a qcow2 one rewritten). Callers that must never clobber an
//     object create it under a temporary name and rename it without
//     replacing (agent/hostfs does).
//   - qemu-img rounds a virtual size up to a multiple of SectorSize. Create
//     refuses sizes that are not such a multiple instead of letting the
//     image and the caller's records disagree.
//
// Paths are passed to qemu-img as plain files: a relative path is prefixed
// with "./" so that a name such as "nbd:x" or "json:{...}" is never read as a
// qemu protocol, and a name starting with "-" never as an option.
package qemuimg

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/stowage/stowage/errdefs"
)

// The image formats Create writes.
const (
	FormatRaw   = "raw"
	FormatQCOW2 = "qcow2"
)

// The foreign formats Stowage reads (Info, Check, Convert -f) but never
// writes: templates as other clouds export them.
const (
	FormatVPC  = "vpc" // VHD
	FormatVHDX = "vhdx"
	FormatVMDK = "vmdk"
)

// SectorSize is the unit of a virtual disk size: qemu-img rounds sizes up to
// a multiple of it, so Create accepts only multiples.
const SectorSize = 512

// DefaultBinary is the qemu-img looked up in $PATH when no WithBinary is given.
const DefaultBinary = "qemu-img"

// maxStderr bounds how much of qemu-img's stderr an Error keeps.
const maxStderr = 16 << 10

// Tool runs one qemu-img binary. The zero value is not usable; call New.
// A Tool is safe for concurrent use.
type Tool struct {
	binary string
}

// Option configures a Tool.
type Option func(*Tool)

// WithBinary runs the qemu-img at path (or the name looked up in $PATH)
// instead of DefaultBinary.
func WithBinary(path string) Option { return func(t *Tool) { t.binary = path } }

// New returns a Tool running DefaultBinary unless an option says otherwise.
// It does not check that the binary exists; Version does.
func New(opts ...Option) *Tool {
	t := &Tool{binary: DefaultBinary}
	for _, o := range opts {
		o(t)
	}
	return t
}

// Version is New().Version: the version of the qemu-img in $PATH, what a
// host reports among its capabilities. Everything else goes through a Tool,
// so that the binary is chosen in one place.
func Version(ctx context.Context) (string, error) { return New().Version(ctx) }

// Error is a failed qemu-img run.
type Error struct {
	Op     string // "create", "info", "version"
	Path   string // the image path, "" for version
	Stderr string // qemu-img's message, "qemu-img: " prefixes removed
	// Class is the errdefs class; nil when the context ended first.
	Class error
	// Err is the underlying cause: the exec error or ctx.Err().
	Err error
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("qemu-img ")
	b.WriteString(e.Op)
	if e.Path != "" {
		b.WriteString(" ")
		b.WriteString(e.Path)
	}
	b.WriteString(": ")
	switch {
	case e.Stderr != "":
		b.WriteString(e.Stderr)
	case e.Err != nil:
		b.WriteString(e.Err.Error())
	default:
		b.WriteString("failed")
	}
	return b.String()
}

// Unwrap returns the cause and the class, so errors.Is finds both.
func (e *Error) Unwrap() []error {
	var errs []error
	if e.Err != nil {
		errs = append(errs, e.Err)
	}
	if e.Class != nil {
		errs = append(errs, e.Class)
	}
	return errs
}

var versionRE = regexp.MustCompile(`qemu-img version ([0-9]+(?:\.[0-9]+)*)`)

// Version returns the version of the qemu-img binary, e.g. "7.2.22". A
// binary that is missing, not executable or does not print a qemu-img
// version is errdefs.ErrUnavailable.
func (t *Tool) Version(ctx context.Context) (string, error) {
	out, err := t.run(ctx, "version", "", "--version")
	if err != nil {
		return "", err
	}
	m := versionRE.FindSubmatch(out)
	if m == nil {
		first, _, _ := strings.Cut(string(out), "\n")
		return "", fmt.Errorf("qemu-img version: %s printed %q, not a qemu-img version: %w", t.binary, first, errdefs.ErrUnavailable)
	}
	return string(m[1]), nil
}

// CreateOption tunes Create.
type CreateOption func(*createConfig)

type createConfig struct {
	backing, backingFormat string
	prealloc               string
	clusterSize            int64
	noBackingCheck         bool
}

// BackingFile makes the new image a qcow2 overlay of backing, whose format
// must be given (qemu-img no longer probes it). A relative backing path is
// relative to the new image's directory, as qemu-img records it; it is
// recorded as given, so a qemu protocol such as nbd://host/export works. With a
// backing file, size may be 0 to take the backing image's size.
func BackingFile(backing, format string) CreateOption {
	return func(c *createConfig) { c.backing, c.backingFormat = backing, format }
}

// SkipBackingCheck records the backing file without opening it (qemu-img
// create -u), so that an overlay can be made before its backing file is in
// place (an external snapshot made crash-safely). size must then be given.
func SkipBackingCheck() CreateOption {
	return func(c *createConfig) { c.noBackingCheck = true }
}

// Preallocation sets qemu-img's preallocation mode: "off" (the default:
// a sparse file), "metadata" (qcow2), "falloc" or "full".
func Preallocation(mode string) CreateOption {
	return func(c *createConfig) { c.prealloc = mode }
}

// ClusterSize sets the qcow2 cluster size in bytes.
func ClusterSize(bytes int64) CreateOption {
	return func(c *createConfig) { c.clusterSize = bytes }
}

// Create makes an image of format (FormatRaw or FormatQCOW2) and virtual size
// bytes at path. A raw image is a sparse file unless Preallocation says
// otherwise. Create overwrites an existing file at path (see the package doc).
func (t *Tool) Create(ctx context.Context, path, format string, size int64, opts ...CreateOption) error {
	var c createConfig
	for _, o := range opts {
		o(&c)
	}
	if path == "" {
		return fmt.Errorf("qemu-img create: empty path: %w", errdefs.ErrInvalid)
	}
	if format != FormatRaw && format != FormatQCOW2 {
		return fmt.Errorf("qemu-img create %s: format %q is not %q or %q: %w", path, format, FormatRaw, FormatQCOW2, errdefs.ErrInvalid)
	}
	switch {
	case size < 0:
		return fmt.Errorf("qemu-img create %s: negative size %d: %w", path, size, errdefs.ErrInvalid)
	case size == 0 && c.backing == "":
		return fmt.Errorf("qemu-img create %s: size 0 without a backing file: %w", path, errdefs.ErrInvalid)
	case size%SectorSize != 0:
		return fmt.Errorf("qemu-img create %s: size %d is not a multiple of %d bytes (qemu-img would round it up to %d): %w",
			path, size, SectorSize, (size/SectorSize+1)*SectorSize, errdefs.ErrInvalid)
	}
	if c.backing != "" {
		if format != FormatQCOW2 {
			return fmt.Errorf("qemu-img create %s: a backing file needs format %s, not %s: %w", path, FormatQCOW2, format, errdefs.ErrInvalid)
		}
		if c.backingFormat == "" {
			return fmt.Errorf("qemu-img create %s: backing file %s without its format: %w", path, c.backing, errdefs.ErrInvalid)
		}
		if c.noBackingCheck && size == 0 {
			return fmt.Errorf("qemu-img create %s: an unchecked backing file needs an explicit size: %w", path, errdefs.ErrInvalid)
		}
	}
	if c.clusterSize < 0 {
		return fmt.Errorf("qemu-img create %s: negative cluster size %d: %w", path, c.clusterSize, errdefs.ErrInvalid)
	}

	args := []string{"create", "-q", "-f", format}
	var o []string
	if c.prealloc != "" {
		o = append(o, "preallocation="+c.prealloc)
	}
	if c.clusterSize > 0 {
		o = append(o, "cluster_size="+strconv.FormatInt(c.clusterSize, 10))
	}
	for _, kv := range o {
		// qemu-img splits -o on commas; a comma in a value would smuggle an option in.
		if strings.Contains(kv, ",") {
			return fmt.Errorf("qemu-img create %s: option %q contains a comma: %w", path, kv, errdefs.ErrInvalid)
		}
	}
	if len(o) > 0 {
		args = append(args, "-o", strings.Join(o, ","))
	}
	if c.backing != "" {
		// Recorded in the image as given: a protocol (nbd://...) is allowed here.
		if c.noBackingCheck {
			args = append(args, "-u")
		}
		args = append(args, "-b", c.backing, "-F", c.backingFormat)
	}
	args = append(args, fileArg(path))
	if size > 0 {
		args = append(args, strconv.FormatInt(size, 10))
	}
	_, err := t.run(ctx, "create", path, args...)
	return err
}

// Info is what qemu-img info reports about one image (not its backing chain).
type Info struct {
	Filename string `json:"filename"`
	Format   string `json:"format"`
	// VirtualSize is the size the guest sees, in bytes.
	VirtualSize int64 `json:"virtual-size"`
	// ActualSize is the bytes allocated on the host (0 when unknown).
	ActualSize  int64 `json:"actual-size"`
	ClusterSize int64 `json:"cluster-size,omitempty"`
	// BackingFilename is the backing file as recorded in the image
	// (possibly relative); FullBackingFilename is it resolved.
	BackingFilename     string `json:"backing-filename,omitempty"`
	FullBackingFilename string `json:"full-backing-filename,omitempty"`
	BackingFormat       string `json:"backing-filename-format,omitempty"`
	// DirtyFlag is set on an image that was not closed cleanly (qcow2 with
	// lazy refcounts); it needs a qemu-img check before trusting it.
	DirtyFlag bool `json:"dirty-flag"`
	Encrypted bool `json:"encrypted,omitempty"`
	// Corrupt is qcow2's corrupt bit (format-specific data).
	Corrupt bool `json:"-"`
	// DataFile is the external data file of a qcow2 image (format-specific
	// data), "" when the image holds its own data. An image from an
	// untrusted source must not have one: it can name any file or device.
	DataFile string `json:"-"`
	// CreateType is a vmdk's create type (format-specific data):
	// "monolithicSparse", "streamOptimized", "monolithicFlat", ...
	CreateType string `json:"-"`
	// Extents are a vmdk's extent files (format-specific data): one naming
	// the image itself for a monolithic sparse or streamOptimized image.
	Extents []Extent `json:"-"`
}

// Extent is one extent file of a vmdk as qemu-img info reports it.
type Extent struct {
	Filename string `json:"filename"`
	Format   string `json:"format"`
}

// InfoOption tunes Info.
type InfoOption func(*infoConfig)

type infoConfig struct {
	format     string
	forceShare bool
}

// AssumeFormat makes qemu-img open the image as format instead of probing
// it; an image in another format then fails with errdefs.ErrInvalid. Use it
// whenever the format is known: probing a raw image whose guest wrote a
// qcow2 header reports what the guest chose.
func AssumeFormat(format string) InfoOption {
	return func(c *infoConfig) { c.format = format }
}

// ForceShare reads an image that a running VM holds locked (qemu-img -U);
// the answer may be stale while the VM writes.
func ForceShare() InfoOption {
	return func(c *infoConfig) { c.forceShare = true }
}

// Info reads the metadata of the image at path with qemu-img info --output=json.
func (t *Tool) Info(ctx context.Context, path string, opts ...InfoOption) (Info, error) {
	var c infoConfig
	for _, o := range opts {
		o(&c)
	}
	if path == "" {
		return Info{}, fmt.Errorf("qemu-img info: empty path: %w", errdefs.ErrInvalid)
	}
	args := []string{"info", "--output=json"}
	if c.format != "" {
		args = append(args, "-f", c.format)
	}
	if c.forceShare {
		args = append(args, "-U")
	}
	args = append(args, fileArg(path))
	out, err := t.run(ctx, "info", path, args...)
	if err != nil {
		return Info{}, err
	}
	var raw struct {
		Info
		FormatSpecific struct {
			Data struct {
				Corrupt    bool     `json:"corrupt"`
				DataFile   string   `json:"data-file"`
				CreateType string   `json:"create-type"`
				Extents    []Extent `json:"extents"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(out, &raw); err != nil {
		return Info{}, fmt.Errorf("qemu-img info %s: unexpected output: %v: %w", path, err, errdefs.ErrInternal)
	}
	info := raw.Info
	info.Corrupt = raw.FormatSpecific.Data.Corrupt
	info.DataFile = raw.FormatSpecific.Data.DataFile
	info.CreateType = raw.FormatSpecific.Data.CreateType
	info.Extents = raw.FormatSpecific.Data.Extents
	return info, nil
}

// fileArg makes path unambiguous on qemu-img's command line (see package doc).
func fileArg(path string) string {
	if filepath.IsAbs(path) || strings.HasPrefix(path, "./") || strings.HasPrefix(path, "../") {
		return path
	}
	return "./" + path
}

// Resource limits of the qemu-img commands that parse image headers a
// guest or a template's author wrote (a crafted image can make qemu-img
// loop or allocate without bound: CVE-2015-5162 and kin). Info and check
// get the values OpenStack gives qemu-img info: their work is bounded by
// the image's metadata, not its data.
const (
	InfoAddressSpace = 1 << 30 // bytes of address space
	InfoCPUSeconds   = 30
	// CopyAddressSpace bounds convert, compare and map, which also open
	// untrusted images. They get no CPU limit: their legitimate work grows
	// with the image (a convert or compare of a 100 GiB image reads all of
	// it, a map of a fragmented one prints every extent) and a CPU limit
	// would kill a long, legitimate copy; a runaway is still cut off by the
	// caller's context. Their address space is larger than info's: convert
	// runs up to 16 coroutines with their buffers plus the block layer's
	// worker threads, each with its own stack.
	CopyAddressSpace = 4 << 30
)

// limits returns the address space (bytes) and CPU time (seconds, 0: no
// limit) of op; as == 0 means op runs unlimited: create, resize, rebase
// and version work on images Stowage made or validated, or none.
func limits(op string) (as int64, cpu int) {
	switch op {
	case "info", "check":
		return InfoAddressSpace, InfoCPUSeconds
	case "convert", "compare", "map":
		return CopyAddressSpace, 0
	}
	return 0, 0
}

// prlimit is util-linux's prlimit, when installed.
var prlimit = sync.OnceValue(func() string {
	p, err := exec.LookPath("prlimit")
	if err != nil {
		return ""
	}
	return p
})

// command builds the qemu-img process of op, under op's limits (through
// prlimit, when installed): the one place qemu-img is wrapped. A limited
// process also gets MALLOC_ARENA_MAX=2, so that glibc's per-thread malloc
// arenas (64 MiB of address space reserved each) do not spend the limit on
// a host with many cores.
func (t *Tool) command(ctx context.Context, op string, args []string) *exec.Cmd {
	as, cpu := limits(op)
	if as == 0 || prlimit() == "" {
		cmd := exec.CommandContext(ctx, t.binary, args...)
		cmd.Env = append(os.Environ(), "LC_ALL=C")
		return cmd
	}
	limited := []string{fmt.Sprintf("--as=%d", as)}
	if cpu > 0 {
		limited = append(limited, fmt.Sprintf("--cpu=%d", cpu))
	}
	limited = append(append(limited, "--", t.binary), args...)
	cmd := exec.CommandContext(ctx, prlimit(), limited...)
	cmd.Env = append(os.Environ(), "LC_ALL=C", "MALLOC_ARENA_MAX=2")
	return cmd
}

// run starts qemu-img with args and returns its stdout.
func (t *Tool) run(ctx context.Context, op, path string, args ...string) ([]byte, error) {
	var stdout bytes.Buffer
	if err := t.runTo(ctx, op, path, &stdout, nil, args...); err != nil {
		return nil, err
	}
	return stdout.Bytes(), nil
}

// runTo starts qemu-img with args, its stdout going to stdout. A non-zero
// exit status for which okExit returns true is not an error (qemu-img check
// and compare report their findings that way).
func (t *Tool) runTo(ctx context.Context, op, path string, stdout io.Writer, okExit func(code int) bool, args ...string) error {
	if err := ctx.Err(); err != nil {
		return &Error{Op: op, Path: path, Err: err}
	}
	cmd := t.command(ctx, op, args)
	// After a kill, do not wait forever for a grandchild holding the pipes.
	cmd.WaitDelay = 5 * time.Second
	stderr := &capWriter{max: maxStderr}
	cmd.Stdout = stdout
	cmd.Stderr = stderr
	err := cmd.Run()
	if err == nil {
		return nil
	}
	if cerr := ctx.Err(); cerr != nil {
		return &Error{Op: op, Path: path, Stderr: cleanStderr(stderr.String()), Err: cerr}
	}
	var exit *exec.ExitError
	if !errors.As(err, &exit) {
		// The process did not start: no binary, not executable, ...
		return &Error{Op: op, Path: path, Class: errdefs.ErrUnavailable,
			Err: fmt.Errorf("%w (is qemu-img installed? Debian/Ubuntu package qemu-utils)", err)}
	}
	if okExit != nil && exit.ExitCode() > 0 && okExit(exit.ExitCode()) {
		return &exitStatus{code: exit.ExitCode(), stderr: cleanStderr(stderr.String())}
	}
	msg := cleanStderr(stderr.String())
	return &Error{Op: op, Path: path, Stderr: msg, Class: classify(msg), Err: err}
}

// exitStatus is a non-zero exit status the caller said it expects.
type exitStatus struct {
	code   int
	stderr string
}

func (e *exitStatus) Error() string { return fmt.Sprintf("exit status %d: %s", e.code, e.stderr) }

// cleanStderr trims qemu-img's "qemu-img: " prefixes and joins the lines.
func cleanStderr(s string) string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimSpace(strings.TrimPrefix(l, "qemu-img: "))
		if l != "" {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "; ")
}

// classes maps fragments of qemu-img messages to error classes; the first
// match wins, so errno texts come before the generic "invalid" ones.
var classes = []struct {
	fragment string
	class    error
}{
	{"No such file or directory", errdefs.ErrNotFound},
	{"Permission denied", errdefs.ErrPermissionDenied},
	{"Operation not permitted", errdefs.ErrPermissionDenied},
	{"No space left on device", errdefs.ErrResourceExhausted},
	{"Disk quota exceeded", errdefs.ErrResourceExhausted},
	{"Failed to get", errdefs.ErrFailedPrecondition}, // "Failed to get shared "write" lock"
	{"Read-only file system", errdefs.ErrFailedPrecondition},
	{"Input/output error", errdefs.ErrUnavailable},
	{"Stale file handle", errdefs.ErrUnavailable},
	{"Unknown file format", errdefs.ErrInvalid},
	{"is not in", errdefs.ErrInvalid}, // "Image is not in qcow2 format"
	{"Invalid", errdefs.ErrInvalid},
	{"invalid", errdefs.ErrInvalid},
	{"does not accept", errdefs.ErrInvalid},
	{"not supported", errdefs.ErrInvalid},
	{"Unknown", errdefs.ErrInvalid},
	{"unrecognized option", errdefs.ErrInvalid},
	{"Expecting", errdefs.ErrInvalid},
	{"must be", errdefs.ErrInvalid},
}

func classify(msg string) error {
	for _, c := range classes {
		if strings.Contains(msg, c.fragment) {
			return c.class
		}
	}
	return errdefs.ErrInternal
}

// capWriter keeps the first max bytes written to it.
type capWriter struct {
	buf bytes.Buffer
	max int
}

func (w *capWriter) Write(p []byte) (int, error) {
	if room := w.max - w.buf.Len(); room > 0 {
		if len(p) > room {
			w.buf.Write(p[:room])
		} else {
			w.buf.Write(p)
		}
	}
	return len(p), nil
}

func (w *capWriter) String() string { return w.buf.String() }

package stream

import (
	"context"
	"io"
	"log/slog"
	"os"
	"time"
)

// Extent is a range of an object's virtual address space with one status.
// A Hole reads as zeros and holds no data (a file hole, an unallocated or
// zero qcow2 cluster); everything else is data, which may still contain
// zero blocks that the engine detects.
type Extent struct {
	Off  int64 `json:"offset"`
	Len  int64 `json:"length"`
	Hole bool  `json:"hole"`
}

// End is Off+Len.
func (e Extent) End() int64 { return e.Off + e.Len }

// Source is something to copy from: a local file or block device, an HTTP
// URL, a qcow2 image, later an NBD export or an S3 object.
//
// ReadAt must be safe for concurrent use at different offsets. Extents
// returns extents that cover [off, off+length) in order without gaps; a
// source that cannot tell returns one data extent.
type Source interface {
	io.ReaderAt
	Size() int64
	Extents(ctx context.Context, off, length int64) ([]Extent, error)
	// Identity names the exact content the source serves (path, size and
	// mtime; URL and ETag; ...). A checkpoint is only resumed against a
	// source with the same identity.
	Identity() string
	Close() error
}

// ContextReaderAt is implemented by sources whose reads can block on a
// network; the engine prefers it to ReadAt so that a copy stops when its
// context ends.
type ContextReaderAt interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// Checksummed is implemented by sources that announce the SHA-256 of their
// content (an HTTP server's Repr-Digest or Digest header). The engine
// verifies it unless Options.IgnoreSourceChecksum is set.
type Checksummed interface {
	SourceChecksum() (sha256hex string, ok bool)
}

// Sequential is implemented by sources that can only be read front to back
// (an HTTP server without Range support); the engine reads them in order
// with one worker.
type Sequential interface {
	Sequential() bool
}

// Mapper is implemented by sources that can lend a read-only view of a
// range that is already in memory (a file range in the page cache), which
// saves copying it. ok is false when a read is the better way. A view stays
// valid until Close; reading it may fault if the source shrinks meanwhile,
// which the engine turns into an error.
type Mapper interface {
	MapRange(off, n int64) (view []byte, ok bool)
}

// DirectWriter is implemented by sinks that can write without a copy
// through the page cache (O_DIRECT where offsets allow it). The engine uses
// it for data lent by a Mapper: the kernel then moves the bytes from the
// source's page cache to the device with no copy at all.
type DirectWriter interface {
	WriteAtDirect(p []byte, off int64) (int, error)
}

// Sink is something to copy to. WriteAt must be safe for concurrent use at
// different offsets. Zero makes a range read as zeros, punching a hole where
// it can. Commit makes the written object durable and visible at its final
// name; Abort discards it. Exactly one of them ends a sink's life; Abort
// after Commit is a no-op so that `defer dst.Abort()` is safe.
type Sink interface {
	io.WriterAt
	Zero(off, length int64) error
	Sync() error
	Commit(ctx context.Context) error
	Abort() error
}

// KnownZeroer is implemented by sinks that know whether they read as zeros
// where nothing was written (a freshly created sparse file). The engine then
// skips zero ranges instead of calling Zero.
type KnownZeroer interface {
	KnownZero() bool
}

// Resumable is implemented by sinks that keep partial work across processes:
// the engine stores its checkpoint at CheckpointPath and, with
// Options.Resume, continues a copy whose checkpoint matches. Resumed
// reports whether the sink reopened partial work instead of starting empty.
// Suspend ends the sink like Abort but keeps the partial work and the
// checkpoint; the engine calls it when a copy fails in a way a retry can
// fix (cancelled, source unavailable).
type Resumable interface {
	CheckpointPath() string
	Resumed() bool
	Suspend() error
}

// FileBacked is implemented by sources and sinks that are a local file: it
// enables reflink and copy_file_range.
type FileBacked interface {
	File() *os.File
}

// WriteMode selects how a file sink writes.
type WriteMode int

const (
	// WriteAuto picks WriteEvict for files and block devices.
	WriteAuto WriteMode = iota
	// WriteEvict writes through the page cache, starts write-back at once
	// and drops the pages one window later (nbdcopy's scheme).
	WriteEvict
	// WriteDirect writes with O_DIRECT where offsets allow it.
	WriteDirect
	// WriteBuffered writes through the page cache and leaves it to the kernel.
	WriteBuffered
)

var writeModeNames = []string{"auto", "evict", "direct", "buffered"}

func (m WriteMode) String() string {
	if int(m) < len(writeModeNames) {
		return writeModeNames[m]
	}
	return "unknown"
}

// ParseWriteMode parses "auto", "evict", "direct" or "buffered".
func ParseWriteMode(s string) (WriteMode, bool) {
	for i, n := range writeModeNames {
		if n == s {
			return WriteMode(i), true
		}
	}
	return 0, false
}

// ReadMode selects how a file source reads.
type ReadMode int

const (
	// ReadAuto reads through the page cache, and drops the pages it brought
	// in when the source was not cached to begin with.
	ReadAuto ReadMode = iota
	// ReadDirect reads with O_DIRECT.
	ReadDirect
	// ReadBuffered reads through the page cache and leaves it to the kernel.
	ReadBuffered
)

var readModeNames = []string{"auto", "direct", "buffered"}

func (m ReadMode) String() string {
	if int(m) < len(readModeNames) {
		return readModeNames[m]
	}
	return "unknown"
}

// ParseReadMode parses "auto", "direct" or "buffered".
func ParseReadMode(s string) (ReadMode, bool) {
	for i, n := range readModeNames {
		if n == s {
			return ReadMode(i), true
		}
	}
	return 0, false
}

// CopyMode selects the copy mechanism between two local files.
type CopyMode int

const (
	// CopyAuto tries a reflink when both ends are files on one filesystem,
	// and reads and writes otherwise.
	CopyAuto CopyMode = iota
	// CopyReadWrite always reads and writes (no reflink).
	CopyReadWrite
	// CopyReflink requires a reflink and fails with ErrNotImplemented
	// when the filesystem cannot share extents.
	CopyReflink
	// CopyCFR uses copy_file_range per data extent (holes are kept because
	// only data extents are passed; zero blocks inside data are not detected).
	CopyCFR
)

var copyModeNames = []string{"auto", "readwrite", "reflink", "cfr"}

func (m CopyMode) String() string {
	if int(m) < len(copyModeNames) {
		return copyModeNames[m]
	}
	return "unknown"
}

// ParseCopyMode parses "auto", "readwrite", "reflink" or "cfr".
func ParseCopyMode(s string) (CopyMode, bool) {
	for i, n := range copyModeNames {
		if n == s {
			return CopyMode(i), true
		}
	}
	return 0, false
}

// Defaults of Options.
const (
	DefaultWorkers            = 8
	DefaultChunkSize          = 2 << 20
	DefaultZeroBlock          = 4 << 10
	DefaultCheckpointInterval = time.Second
	DefaultProgressInterval   = 500 * time.Millisecond
)

// Options tune a Copy. The zero value is a good default.
type Options struct {
	// Workers is the number of chunks in flight (DefaultWorkers).
	Workers int
	// ChunkSize is the unit of reading, writing, hashing and checkpointing;
	// a power of two of at least 64 KiB (DefaultChunkSize).
	ChunkSize int
	// ZeroBlock is the granularity of zero detection inside data, a power of
	// two of at least 512 dividing ChunkSize (DefaultZeroBlock). Set
	// NoZeroDetect to write data extents as they are.
	ZeroBlock    int
	NoZeroDetect bool
	// Dense writes every byte, holes and zero blocks included, so that the
	// destination ends fully allocated (thick provisioning). No reflink.
	Dense bool
	// Mode selects reflink, copy_file_range or read/write.
	Mode CopyMode
	// SHA256 computes the SHA-256 of the whole object (Result.SHA256).
	// It is implied by ExpectSHA256 and by a source that announces a checksum.
	SHA256 bool
	// ExpectSHA256 is the hex SHA-256 the object must have; on mismatch the
	// copy fails with errdefs.ErrDataLoss and the destination is aborted.
	ExpectSHA256 string
	// IgnoreSourceChecksum skips checking a checksum the source announces.
	IgnoreSourceChecksum bool
	// Resume continues from the sink's checkpoint when it matches the source.
	// Without it an old checkpoint is discarded.
	Resume bool
	// NoResumeVerify skips re-hashing the chunks a checkpoint says are done.
	NoResumeVerify bool
	// CheckpointInterval is how often the checkpoint is saved
	// (DefaultCheckpointInterval); negative disables checkpoints.
	CheckpointInterval time.Duration
	// RateLimit caps the read rate in bytes per second (0: no cap).
	RateLimit int64
	// Progress, if set, is called every ProgressInterval and once at the end.
	Progress         func(Progress)
	ProgressInterval time.Duration
	// Logger receives debug and warning records (slog.Default() if nil).
	Logger *slog.Logger
}

// Progress is a snapshot of a running copy.
type Progress struct {
	Total     int64         // virtual size of the object
	Done      int64         // virtual bytes handled (data, zeros and holes)
	Read      int64         // bytes read from the source
	Written   int64         // bytes written to the sink
	Elapsed   time.Duration // since the copy started
	BytesPerS float64       // Done per second, averaged over the last interval
	Final     bool          // set on the last call
}

// Result summarises a finished copy.
type Result struct {
	Size          int64   `json:"size"`
	BytesRead     int64   `json:"bytes_read"`
	BytesWritten  int64   `json:"bytes_written"`
	BytesHoles    int64   `json:"bytes_skipped_holes"`
	BytesZero     int64   `json:"bytes_skipped_zero"`
	BytesResumed  int64   `json:"bytes_resumed"`
	BytesReflink  int64   `json:"bytes_reflinked"`
	Seconds       float64 `json:"seconds"`
	MiBPerS       float64 `json:"mib_per_s"`
	SHA256        string  `json:"sha256,omitempty"`
	Method        string  `json:"method"`
	Workers       int     `json:"workers"`
	ChunkSize     int     `json:"chunk_size"`
	Resumed       bool    `json:"resumed"`
	ReadRetries   int64   `json:"read_retries,omitempty"`
	ChunksRedone  int64   `json:"chunks_redone_after_verify,omitempty"`
	WriteMode     string  `json:"write_mode,omitempty"`
	SourceChecked bool    `json:"source_checksum_verified,omitempty"`
}

package stream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/errdefs"
)

// dioAlign is the offset, length and memory alignment used for O_DIRECT.
// 4096 satisfies both 512-byte and 4 KiB logical block devices.
const dioAlign = 4096

// FileSource reads a local regular file or block device.
type FileSource struct {
	f        *os.File
	path     string
	reopen   string // what O_DIRECT reads open (path, or /proc/self/fd/N)
	size     int64
	block    bool
	mode     ReadMode
	identity string
	coldAll  bool // no page of the file was in the page cache at open
	dense    bool // at least half of the file is allocated

	dioOnce sync.Once
	dio     *os.File
	dioErr  error

	mapOnce sync.Once
	mapping []byte
}

var (
	_ Source     = (*FileSource)(nil)
	_ FileBacked = (*FileSource)(nil)
	_ Mapper     = (*FileSource)(nil)
)

// OpenFileSource opens a local file or block device for reading.
func OpenFileSource(path string, mode ReadMode) (*FileSource, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("open source %s: %w", path, errors.Join(err, errdefs.ErrNotFound))
		}
		if errors.Is(err, fs.ErrPermission) {
			return nil, fmt.Errorf("open source %s: %w", path, errors.Join(err, errdefs.ErrPermissionDenied))
		}
		return nil, fmt.Errorf("open source %s: %w", path, err)
	}
	return fileSource(f, path, path, mode)
}

// NewFileSource reads f, a file opened for reading by a caller that
// checked it (the agent's import directory: opened without following
// symbolic links), never by its path again: O_DIRECT reads reopen it
// through /proc/self/fd. name is what errors and the source's identity
// call it. The source owns f and closes it.
func NewFileSource(f *os.File, name string, mode ReadMode) (*FileSource, error) {
	return fileSource(f, name, "/proc/self/fd/"+strconv.Itoa(int(f.Fd())), mode)
}

// fileSource makes the source of the open file f; reopen is the path that
// names it for O_DIRECT reads.
func fileSource(f *os.File, path, reopen string, mode ReadMode) (*FileSource, error) {
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat source %s: %w", path, err)
	}
	s := &FileSource{f: f, path: path, reopen: reopen, mode: mode}
	switch {
	case st.Mode().IsRegular():
		s.size = st.Size()
	case st.Mode()&fs.ModeDevice != 0 && st.Mode()&fs.ModeCharDevice == 0:
		s.block = true
		end, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("size of block device %s: %w", path, err)
		}
		s.size = end
	default:
		f.Close()
		return nil, fmt.Errorf("source %s is not a regular file or block device: %w", path, errdefs.ErrInvalid)
	}
	var sys unix.Stat_t
	_ = unix.Fstat(int(f.Fd()), &sys)
	s.identity = fmt.Sprintf("file:%s:dev=%d:ino=%d:size=%d:mtime=%d.%09d", path, sys.Dev, sys.Ino, s.size, sys.Mtim.Sec, sys.Mtim.Nsec)
	// Dropping the pages a read brought in pays off when the copy streams
	// much more data than a window: the next reads reuse the freed pages
	// instead of faulting in fresh memory (bench/README.md). On a sparse
	// file the few data extents are cheaper to leave in the cache.
	s.dense = !s.block && sys.Blocks*512 >= s.size/2
	if mode == ReadAuto {
		if cached, ok := cachedBytes(f, 0, s.size); ok && cached == 0 {
			s.coldAll = true
			_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_SEQUENTIAL)
		}
	}
	return s, nil
}

// cachedBytes reports how many bytes of [off, off+n) are in the page cache.
func cachedBytes(f *os.File, off, n int64) (int64, bool) {
	if n <= 0 {
		return 0, true
	}
	var cs unix.Cachestat_t
	err := unix.Cachestat(uint(f.Fd()), &unix.CachestatRange{Off: uint64(off), Len: uint64(n)}, &cs, 0)
	if err != nil {
		return 0, false
	}
	return int64(cs.Cache) * int64(os.Getpagesize()), true
}

// Size is the size of the file or device.
func (s *FileSource) Size() int64 { return s.size }

// Identity names path, inode, size and mtime.
func (s *FileSource) Identity() string { return s.identity }

// File returns the underlying file.
func (s *FileSource) File() *os.File { return s.f }

// Close closes the file and drops the mapping MapRange made.
func (s *FileSource) Close() error {
	if s.dio != nil {
		s.dio.Close()
	}
	if s.mapping != nil {
		_ = unix.Munmap(s.mapping)
		s.mapping = nil
	}
	return s.f.Close()
}

// MapRange lends a view of [off, off+n) when the whole range is in the page
// cache (ReadAuto mode, regular files): the engine then writes it with
// O_DIRECT straight from the cache, with no copy. The view is a slice of
// one read-only mapping of the whole file, made on first use.
func (s *FileSource) MapRange(off, n int64) ([]byte, bool) {
	if s.mode != ReadAuto || s.block || s.coldAll || n <= 0 || off < 0 || off+n > s.size {
		return nil, false
	}
	if c, ok := cachedBytes(s.f, off, n); !ok || c < n {
		return nil, false
	}
	s.mapOnce.Do(func() {
		if m, err := unix.Mmap(int(s.f.Fd()), 0, int(s.size), unix.PROT_READ, unix.MAP_SHARED); err == nil {
			s.mapping = m
		}
	})
	if s.mapping == nil {
		return nil, false
	}
	v := s.mapping[off : off+n : off+n]
	// fill the page tables in one call instead of one fault per 64 KiB
	_ = unix.Madvise(v[:n&^int64(os.Getpagesize()-1)], unix.MADV_POPULATE_READ)
	return v, true
}

func (s *FileSource) directFile() (*os.File, error) {
	s.dioOnce.Do(func() {
		s.dio, s.dioErr = os.OpenFile(s.reopen, os.O_RDONLY|unix.O_DIRECT, 0)
	})
	return s.dio, s.dioErr
}

// ReadAt reads len(p) bytes at off, as io.ReaderAt.
func (s *FileSource) ReadAt(p []byte, off int64) (int, error) {
	if off >= s.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := len(p)
	if int64(want) > s.size-off {
		want = int(s.size - off)
	}
	var n int
	var err error
	switch {
	case s.mode == ReadDirect && s.canDirect(p, off, want):
		n, err = s.readDirect(p, off, want)
	case s.mode == ReadAuto && !s.block:
		evict := s.coldAll
		if !evict {
			c, ok := cachedBytes(s.f, off, int64(want))
			evict = ok && c < int64(want)
		}
		n, err = preadFull(s.f, p[:want], off)
		if evict && err == nil && s.dense {
			_ = unix.Fadvise(int(s.f.Fd()), off, int64(n), unix.FADV_DONTNEED)
		}
	default:
		n, err = preadFull(s.f, p[:want], off)
	}
	if err != nil {
		return n, fmt.Errorf("read %s at %d: %w", s.path, off, err)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (s *FileSource) canDirect(p []byte, off int64, want int) bool {
	if off%dioAlign != 0 || uintptr(unsafe.Pointer(unsafe.SliceData(p)))%dioAlign != 0 {
		return false
	}
	return cap(p) >= alignUp(want, dioAlign)
}

func (s *FileSource) readDirect(p []byte, off int64, want int) (int, error) {
	df, err := s.directFile()
	if err != nil {
		return preadFull(s.f, p[:want], off)
	}
	n, err := preadFull(df, p[:alignUp(want, dioAlign)], off)
	if err == nil && n < want {
		err = io.ErrUnexpectedEOF
	}
	return min(n, want), err
}

// preadFull reads until b is full, EOF or an error; EOF is not an error.
func preadFull(f *os.File, b []byte, off int64) (int, error) {
	n := 0
	for n < len(b) {
		k, err := unix.Pread(int(f.Fd()), b[n:], off+int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return n, err
		}
		if k == 0 {
			break
		}
		n += k
	}
	return n, nil
}

func alignUp(n, a int) int { return (n + a - 1) &^ (a - 1) }

// Extents lists data and holes with SEEK_DATA/SEEK_HOLE. Filesystems and
// devices that do not support them report one data extent.
func (s *FileSource) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	return seekExtents(ctx, s.f, off, length, s.size)
}

func seekExtents(ctx context.Context, f *os.File, off, length, size int64) ([]Extent, error) {
	end := min(off+length, size)
	var out []Extent
	fd := int(f.Fd())
	for pos := off; pos < end; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if err == unix.ENXIO || (err == nil && data >= end) {
			out = append(out, Extent{Off: pos, Len: end - pos, Hole: true})
			break
		}
		if err != nil {
			// no SEEK_DATA support: everything is data
			out = append(out, Extent{Off: pos, Len: end - pos})
			break
		}
		if data > pos {
			out = append(out, Extent{Off: pos, Len: data - pos, Hole: true})
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil || hole > end {
			hole = end
		}
		out = append(out, Extent{Off: data, Len: hole - data})
		pos = hole
	}
	return mergeExtents(out), nil
}

// mergeExtents joins neighbours of the same kind.
func mergeExtents(in []Extent) []Extent {
	out := in[:0]
	for _, e := range in {
		if e.Len <= 0 {
			continue
		}
		if n := len(out); n > 0 && out[n-1].Hole == e.Hole && out[n-1].End() == e.Off {
			out[n-1].Len += e.Len
			continue
		}
		out = append(out, e)
	}
	return out
}

// SinkOptions tune how a sink is opened.
type SinkOptions struct {
	// WriteMode for file and block-device sinks (WriteAuto: WriteEvict).
	WriteMode WriteMode
	// Resume reopens the temporary file and checkpoint of an interrupted
	// copy to the same destination instead of starting empty.
	Resume bool
	// Format of the destination: "" or "raw", or "qcow2" (written by
	// qemu-img from a raw staging file at Commit).
	Format string
	// EvictWindow is how many written bytes WriteEvict keeps in the page
	// cache before dropping them (default 16 MiB).
	EvictWindow int64
	// CheckpointPath overrides where a block-device sink keeps its checkpoint
	// (file sinks keep it next to the destination).
	CheckpointPath string
}

// FileSink writes a local file through a temporary name (renamed into place
// at Commit) or a block device in place.
type FileSink struct {
	final   string
	tmp     string
	ckpt    string
	f       *os.File
	dio     *os.File
	size    int64
	block   bool
	mode    WriteMode
	fresh   bool
	resumed bool

	evictMu     sync.Mutex
	evictFIFO   []Extent
	evictBytes  int64
	evictWindow int64

	endMu sync.Mutex
	ended bool

	directOnce sync.Once
	lazyDIO    *os.File // O_DIRECT handle opened by the first WriteAtDirect
}

var (
	_ Sink         = (*FileSink)(nil)
	_ DirectWriter = (*FileSink)(nil)
	_ KnownZeroer  = (*FileSink)(nil)
	_ Resumable    = (*FileSink)(nil)
	_ FileBacked   = (*FileSink)(nil)
)

// TempPath is the hidden name a file sink writes before Commit renames it.
func TempPath(final string) string {
	return filepath.Join(filepath.Dir(final), "."+filepath.Base(final)+".stowage-tmp")
}

// CheckpointPathFor is where a file sink keeps the checkpoint of final.
func CheckpointPathFor(final string) string {
	return filepath.Join(filepath.Dir(final), "."+filepath.Base(final)+".stowage-ckpt")
}

// OpenFileSink opens path for a copy of size bytes. A regular file is
// written under TempPath(path) and renamed at Commit (an existing file at
// path is replaced then, atomically); a block device is written in place and
// must be at least size bytes.
func OpenFileSink(path string, size int64, opts SinkOptions) (*FileSink, error) {
	if size < 0 {
		return nil, fmt.Errorf("sink %s: negative size %d: %w", path, size, errdefs.ErrInvalid)
	}
	mode := opts.WriteMode
	if mode == WriteAuto {
		mode = WriteEvict
	}
	s := &FileSink{final: path, size: size, mode: mode, evictWindow: opts.EvictWindow}
	if s.evictWindow <= 0 {
		s.evictWindow = 16 << 20
	}
	if st, err := os.Stat(path); err == nil && st.Mode()&fs.ModeDevice != 0 && st.Mode()&fs.ModeCharDevice == 0 {
		return s, s.openBlock(opts)
	} else if err == nil && st.IsDir() {
		return nil, fmt.Errorf("sink %s is a directory: %w", path, errdefs.ErrInvalid)
	}
	dir := filepath.Dir(path)
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("sink %s: directory %s does not exist: %w", path, dir, errdefs.ErrNotFound)
	}
	s.tmp, s.ckpt = TempPath(path), CheckpointPathFor(path)
	if opts.Resume {
		if f, err := os.OpenFile(s.tmp, os.O_RDWR, 0); err == nil {
			if st, err := f.Stat(); err == nil && st.Size() == size {
				if _, err := os.Stat(s.ckpt); err == nil {
					s.f, s.resumed = f, true
				}
			}
			if !s.resumed {
				f.Close()
			}
		}
	}
	if !s.resumed {
		_ = os.Remove(s.ckpt)
		f, err := os.OpenFile(s.tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o644)
		if err != nil {
			return nil, fmt.Errorf("create %s: %w", s.tmp, err)
		}
		if err := f.Truncate(size); err != nil {
			f.Close()
			os.Remove(s.tmp)
			return nil, fmt.Errorf("size %s to %d: %w", s.tmp, size, err)
		}
		s.f, s.fresh = f, true
	}
	if s.mode == WriteDirect {
		if df, err := os.OpenFile(s.tmp, os.O_RDWR|unix.O_DIRECT, 0); err == nil {
			s.dio = df
		}
	}
	return s, nil
}

func (s *FileSink) openBlock(opts SinkOptions) error {
	s.block = true
	f, err := os.OpenFile(s.final, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open block device %s: %w", s.final, err)
	}
	end, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return fmt.Errorf("size of block device %s: %w", s.final, err)
	}
	if end < s.size {
		f.Close()
		return fmt.Errorf("block device %s holds %d bytes, the source %d: %w", s.final, end, s.size, errdefs.ErrInvalid)
	}
	s.f = f
	s.ckpt = opts.CheckpointPath
	if s.ckpt != "" {
		if _, err := os.Stat(s.ckpt); err == nil && opts.Resume {
			s.resumed = true
		} else {
			_ = os.Remove(s.ckpt)
		}
	}
	if s.mode == WriteDirect {
		if df, err := os.OpenFile(s.final, os.O_RDWR|unix.O_DIRECT, 0); err == nil {
			s.dio = df
		}
	}
	return nil
}

// File returns the file being written (the temporary file, or the device).
func (s *FileSink) File() *os.File { return s.f }

// KnownZero is true for a freshly created temporary file.
func (s *FileSink) KnownZero() bool { return s.fresh }

// CheckpointPath is where the engine keeps this sink's checkpoint ("" for a
// block device opened without SinkOptions.CheckpointPath).
func (s *FileSink) CheckpointPath() string { return s.ckpt }

// Resumed reports whether the sink reopened an interrupted copy.
func (s *FileSink) Resumed() bool { return s.resumed }

// ReadAt reads back what was written (used to verify a resumed copy).
func (s *FileSink) ReadAt(p []byte, off int64) (int, error) {
	n, err := preadFull(s.f, p, off)
	if err == nil && n < len(p) {
		err = io.EOF
	}
	return n, err
}

// WriteAt writes p at off according to the write mode.
func (s *FileSink) WriteAt(p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if off+int64(len(p)) > s.size {
		return 0, fmt.Errorf("write %s at %d+%d: beyond size %d: %w", s.name(), off, len(p), s.size, errdefs.ErrInvalid)
	}
	n := 0
	if s.dio != nil && off%dioAlign == 0 && uintptr(unsafe.Pointer(unsafe.SliceData(p)))%dioAlign == 0 {
		if a := len(p) &^ (dioAlign - 1); a > 0 {
			k, err := pwriteFull(s.dio, p[:a], off)
			n += k
			if err != nil {
				return n, fmt.Errorf("write %s at %d: %w", s.name(), off, err)
			}
		}
	}
	if n < len(p) {
		k, err := pwriteFull(s.f, p[n:], off+int64(n))
		n += k
		if err != nil {
			return n, fmt.Errorf("write %s at %d: %w", s.name(), off, err)
		}
	}
	if s.mode == WriteEvict {
		if err := s.evict(off, int64(len(p))); err != nil {
			return n, fmt.Errorf("write-back %s at %d: %w", s.name(), off, err)
		}
	}
	return n, nil
}

// WriteAtDirect writes p at off with O_DIRECT where offset, length and
// memory allow it (the rest goes through WriteAt). In WriteBuffered mode it
// is WriteAt.
func (s *FileSink) WriteAtDirect(p []byte, off int64) (int, error) {
	if s.mode == WriteBuffered {
		return s.WriteAt(p, off)
	}
	dio := s.dio // opened at open time in WriteDirect mode, never changed
	if dio == nil {
		s.directOnce.Do(func() {
			if df, err := os.OpenFile(s.name(), os.O_RDWR|unix.O_DIRECT, 0); err == nil {
				s.lazyDIO = df
			}
		})
		dio = s.lazyDIO
	}
	if dio == nil || off%dioAlign != 0 || uintptr(unsafe.Pointer(unsafe.SliceData(p)))%dioAlign != 0 || len(p) < dioAlign {
		return s.WriteAt(p, off)
	}
	if off+int64(len(p)) > s.size {
		return 0, fmt.Errorf("write %s at %d+%d: beyond size %d: %w", s.name(), off, len(p), s.size, errdefs.ErrInvalid)
	}
	a := len(p) &^ (dioAlign - 1)
	n, err := pwriteFull(dio, p[:a], off)
	if err != nil {
		return n, fmt.Errorf("write %s at %d: %w", s.name(), off, err)
	}
	if a < len(p) {
		k, err := s.WriteAt(p[a:], off+int64(a))
		return n + k, err
	}
	return n, nil
}

// evict starts write-back of the range just written and, once more than
// the window is outstanding, waits for the oldest ranges and drops their
// pages so that the next writes reuse them.
func (s *FileSink) evict(off, n int64) error {
	fd := int(s.f.Fd())
	_ = unix.SyncFileRange(fd, off, n, unix.SYNC_FILE_RANGE_WRITE)
	s.evictMu.Lock()
	s.evictFIFO = append(s.evictFIFO, Extent{Off: off, Len: n})
	s.evictBytes += n
	var old []Extent
	for s.evictBytes > s.evictWindow && len(s.evictFIFO) > 1 {
		e := s.evictFIFO[0]
		s.evictFIFO = s.evictFIFO[1:]
		s.evictBytes -= e.Len
		old = append(old, e)
	}
	s.evictMu.Unlock()
	for _, e := range old {
		if err := unix.SyncFileRange(fd, e.Off, e.Len, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER); err != nil {
			return err
		}
		_ = unix.Fadvise(fd, e.Off, e.Len, unix.FADV_DONTNEED)
	}
	return nil
}

func pwriteFull(f *os.File, b []byte, off int64) (int, error) {
	n := 0
	for n < len(b) {
		k, err := unix.Pwrite(int(f.Fd()), b[n:], off+int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return n, err
		}
		if k == 0 {
			return n, io.ErrShortWrite
		}
		n += k
	}
	return n, nil
}

// Zero makes [off, off+length) read as zeros: a punched hole where the file
// system or device can, zeroes written otherwise.
func (s *FileSink) Zero(off, length int64) error {
	if length <= 0 {
		return nil
	}
	fd := int(s.f.Fd())
	err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if err == nil {
		return nil
	}
	if err = unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length); err == nil {
		return nil
	}
	for length > 0 {
		n := min(length, int64(len(zeroPage)))
		if _, err := pwriteFull(s.f, zeroPage[:n], off); err != nil {
			return fmt.Errorf("zero %s at %d: %w", s.name(), off, err)
		}
		off += n
		length -= n
	}
	return nil
}

// Sync makes everything written so far durable (fdatasync).
func (s *FileSink) Sync() error {
	if err := unix.Fdatasync(int(s.f.Fd())); err != nil {
		return fmt.Errorf("sync %s: %w", s.name(), err)
	}
	return nil
}

func (s *FileSink) name() string {
	if s.tmp != "" {
		return s.tmp
	}
	return s.final
}

func (s *FileSink) end() bool {
	s.endMu.Lock()
	defer s.endMu.Unlock()
	if s.ended {
		return false
	}
	s.ended = true
	return true
}

func (s *FileSink) closeFiles() error {
	if s.dio != nil {
		s.dio.Close()
	}
	if s.lazyDIO != nil {
		s.lazyDIO.Close()
	}
	return s.f.Close()
}

// Commit syncs the file and renames it to its final name (and syncs the
// directory); for a block device it syncs the device. The checkpoint is
// removed.
func (s *FileSink) Commit(ctx context.Context) error {
	if !s.end() {
		return fmt.Errorf("commit %s: sink already ended: %w", s.final, errdefs.ErrFailedPrecondition)
	}
	if err := ctx.Err(); err != nil {
		s.closeFiles()
		return err
	}
	if err := s.f.Sync(); err != nil {
		s.closeFiles()
		return fmt.Errorf("sync %s: %w", s.name(), err)
	}
	if s.mode == WriteEvict {
		_ = unix.Fadvise(int(s.f.Fd()), 0, 0, unix.FADV_DONTNEED)
	}
	if err := s.closeFiles(); err != nil {
		return fmt.Errorf("close %s: %w", s.name(), err)
	}
	if !s.block {
		if err := os.Rename(s.tmp, s.final); err != nil {
			return fmt.Errorf("rename %s to %s: %w", s.tmp, s.final, err)
		}
		if err := durable.SyncDir(filepath.Dir(s.final)); err != nil {
			return fmt.Errorf("sync directory %s: %w", filepath.Dir(s.final), err)
		}
	}
	if s.ckpt != "" {
		_ = os.Remove(s.ckpt)
	}
	return nil
}

// Abort closes and removes the temporary file and the checkpoint. On a
// block device the data written so far stays.
func (s *FileSink) Abort() error {
	if !s.end() {
		return nil
	}
	s.closeFiles()
	if s.tmp != "" {
		_ = os.Remove(s.tmp)
	}
	if s.ckpt != "" {
		_ = os.Remove(s.ckpt)
	}
	return nil
}

// Suspend closes the sink but keeps the temporary file and the checkpoint
// so that a later copy with Resume continues.
func (s *FileSink) Suspend() error {
	if !s.end() {
		return nil
	}
	return s.closeFiles()
}

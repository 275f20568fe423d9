// Package stream is Stowage's block copy engine. Every byte Stowage moves
// (template download and install, volume copy, snapshot backup and restore,
// migration) goes through Copy; Verify compares two objects.
//
// A copy reads a Source and writes a Sink. Both are small interfaces built on
// io.ReaderAt / io.WriterAt plus a size and, for sources, an extent map:
//
//	src, err := stream.OpenSource(ctx, "https://images.example/t.qcow2", stream.SourceOptions{})
//	if err != nil { ... }
//	defer src.Close()
//	dst, err := stream.OpenSink(ctx, "/srv/primary/v1.raw", src.Size(), stream.SinkOptions{})
//	if err != nil { ... }
//	res, err := stream.Copy(ctx, src, dst, stream.Options{SHA256: true})
//	// On success dst is committed (fsync + rename); on any error it is aborted
//	// and nothing is visible at the destination path.
//
// How a copy runs:
//
//   - The source is asked where its data is (SEEK_DATA/SEEK_HOLE for files,
//     the qcow2 cluster map, later NBD block status). Holes are never read.
//     Data is read in aligned chunks (Options.ChunkSize) by Options.Workers
//     goroutines into pooled, page-aligned buffers; every chunk is checked
//     for all-zero blocks (Options.ZeroBlock), which are skipped on a fresh
//     destination and punched on an existing one. The destination therefore
//     ends with exactly the allocation of the non-zero data.
//   - File writes default to WriteEvict: buffered writes whose pages are
//     written back at once (sync_file_range) and dropped from the page cache
//     one window later, as nbdcopy does. Fresh page-cache pages are the
//     expensive resource on the hypervisor hosts we measured (bench/README.md),
//     and this mode recycles a small set of pages instead of filling the cache.
//     Reads of a dense source that is not in the page cache are dropped after
//     use for the same reason. A source range that is already cached is not
//     read at all: it is mapped and written with O_DIRECT straight from the
//     page cache (no copy, and the cache is left as it was). WriteDirect
//     (O_DIRECT) and WriteBuffered are available.
//   - When both ends are files on one filesystem that can share extents
//     (xfs, btrfs), the whole copy is a reflink (FICLONE). copy_file_range is
//     used only on request (CopyModeCFR), per data extent, because on ext4 it
//     fills holes and goes through the page cache.
//   - A per-chunk xxh3 hash is always computed (it verifies a resumed copy);
//     a whole-object SHA-256, the identity users compare with sha256sum, is
//     computed in order when Options.SHA256 is set or a checksum is expected.
//     A mismatch fails with errdefs.ErrDataLoss and leaves nothing behind.
//   - A checkpoint of completed chunks (written atomically, after the
//     destination was synced) lets a killed or cancelled copy continue with
//     Options.Resume. HTTP sources retry dropped connections with Range
//     requests and backoff, and give up on a stalled server after a timeout.
//   - Progress is reported through Options.Progress; Collectors returns the
//     Prometheus counters; every call honours its context.
//
// The package knows nothing of the controller: it is driven by paths, URLs
// and options, and errors carry errdefs classes (ErrInvalid for bad
// arguments, ErrNotFound for a missing source, ErrUnavailable for an
// unreachable or stalled source, ErrDataLoss for a checksum mismatch).
package stream

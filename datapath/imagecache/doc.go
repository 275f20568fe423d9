// Package imagecache serves VM templates from a persistent, lazily filled
// local chunk cache, and exposes them read-only over FUSE so that a VM can
// boot before its template has fully arrived.
//
// A [Cache] owns one directory. Each template (identified by an id that is
// also its file name in the mount) lives in its own subdirectory:
//
//	DIR/
//	  <id>/
//	    data     sparse file of the template's full size; a chunk's bytes
//	             are valid only when the index says the chunk is present
//	    index    JSON: source URL, size, chunk size, per-chunk CRC-32C of
//	             every verified chunk (the bitmap), whole-file digest
//
// Reads are chunk-aligned (default 1 MiB). Present chunks are read from the
// data file; a small read through the mount (at most 256 KiB) whose chunks
// are neither present nor being fetched is answered with its own ranged
// request, its chunks fetched right after. Other missing chunks are
// fetched with one ranged request per run of
// adjacent missing chunks, each chunk fetched at most once however many
// readers miss it at the same time (a per-chunk single flight), with the
// number of concurrent fetches bounded by a semaphore. A fetched chunk is
// written at its offset in the data file (the work-in-progress copy, which
// no reader looks at yet), hashed, and only then marked present. The index
// is committed by fdatasync of the data file followed by temp+fsync+rename
// of the index, so after a crash every chunk the index names is on disk and
// chunks written after the last commit are simply fetched again.
//
// Chunks named by the index of an earlier life are not trusted blindly: the
// first read of such a chunk in this process checks it against its recorded
// CRC-32C (a per-process "checked" bit keeps later reads free of it; the
// checksum guards against the local disk, as in Ceph BlueStore; a digest
// the source announces for the whole file is checked with sha256),
// and a mismatching chunk is dropped and fetched again, never served. A
// template cached in full before a restart becomes complete (passthrough)
// only after a background pass has checked every chunk.
//
// A background prefetcher fills the remaining chunks at a bounded rate,
// following the readers: each run starts after the most recent demand read
// (where a booting guest is likely to read next), wrapping around until
// nothing is missing. A template whose chunks are all present is
// complete: the FUSE layer then hands new opens to the kernel with FUSE
// passthrough, so reads no longer reach this process at all (except while
// an open made before completion is still held: the kernel refuses
// passthrough opens of that inode until it is closed, so this process
// serves the new opens from the data file until then).
//
// With Options.CapacityBytes, the cache evicts whole templates, least
// recently read first, when the data files' allocated blocks exceed it. A
// template is never evicted while it is pinned (Cache.Pin: the agent pins
// the template of a running volume and the backing template of a linked
// clone, unless that template is complete elsewhere on the host), open
// through the mount, or being read or fetched. An evicted template stays
// listed and is fetched again on demand.
//
// The package knows nothing of the controller: it is given source URLs and
// sizes, and its FUSE mount is driven by Add and Remove.
package imagecache

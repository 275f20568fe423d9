package hostfs

import (
	"context"
	"os"
	"time"

	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/drivers"
)

// The requests and results of Local's steps, on host paths. They are
// Local's own vocabulary: the agent's LocalHost resolves every (store, key)
// of a hostops request beneath a store root and calls Local with them.

// imageOps are the host-side steps on disk images. Paths are absolute on the
// host; every step writes to a temporary name and renames into place only
// when it succeeded, so a failed or killed step leaves no partial object
// visible. Steps are idempotent: a step whose destination already exists
// with the expected content returns its info without doing the work again.
//
// Declared formats. The agent never probes the format of an existing image:
// a raw volume is guest-writable, and a guest that writes a qcow2 header
// naming a backing file (/etc/shadow, another tenant's disk) into it would
// otherwise have a later copy, clone, snapshot, backup or template read
// that file into something the guest or another user can read (the
// CVE-2008-2004 family). So every step that opens an existing image takes
// its format from the request (CopyRequest.SourceFormat,
// CloneRequest.BaseFormat, SnapshotRequest.Format,
// BackupRequest.SourceFormat, the format arguments of InspectImage,
// ResizeImage and RebaseImage) and opens the image as that format only
// (qemu-img -f / -F, the copy engine's Format option); an image that is not
// in the declared format fails, and an empty declared format is
// errdefs.ErrInvalid. A raw image is read as bytes, whatever they look
// like. A declared qcow2 may have a backing chain only inside its own store
// (the directory carrying the store marker): linked clones back onto the
// store's templates/, external snapshots onto its snapshots/. Every layer
// of the chain must record its backing file's format (raw or qcow2; never
// probed), be a plain file of that store (no qemu protocol, no symbolic
// link out of it) and have no external data file; anything else is refused
// with errdefs.ErrInvalid naming the offending backing path. FetchImage,
// whose source is not yet an image of the store, keeps its own checks
// (declared format against the content, no backing file at all).
type imageOps interface {
	// FetchImage streams req.Source (http://, https://, file:// or a path)
	// into req.Dest, verifying req.Checksum in-stream, then inspects the
	// result: the detected format must be req.Format (an ISO is raw data
	// with an ISO 9660 signature), and a qcow2 with a backing file is refused
	// (ErrInvalid). Checksum mismatch is ErrDataLoss; an unreachable or 404
	// source is ErrNotFound/ErrUnavailable.
	FetchImage(ctx context.Context, req FetchRequest, progress drivers.Progress) (ImageInfo, error)
	// CopyImage copies req.Source (a path on this host, or a URI another
	// agent granted: http(s)://, nbd://) to req.Dest through the stream
	// engine (extent-aware, sparse, reflink when both ends allow). The source
	// is req.SourceFormat (required). When req.Format differs from it, or
	// req.Flatten is set for a qcow2 with a backing chain, qemu-img converts
	// (-f req.SourceFormat) to a standalone image.
	CopyImage(ctx context.Context, req CopyRequest, progress drivers.Progress) (ImageInfo, error)
	// CloneImage creates req.Dest from req.Base by req.Mode: CloneReflink
	// (FICLONE; ErrNotImplemented where the filesystem cannot), CloneLinked
	// (a qcow2 whose backing file is Base, recorded as req.BaseFormat, of
	// Base's or a larger size; Base must be in Dest's store), or CloneFull (a
	// full sparse copy in req.Format). Base is opened as req.BaseFormat.
	CloneImage(ctx context.Context, req CloneRequest, progress drivers.Progress) (ImageInfo, error)
	// InspectImage reads the sizes and backing file of the image at path,
	// opened as format (qemu-img info -f). It reads metadata only, never the
	// backing chain, so it reports a backing file outside the store rather
	// than refusing it.
	InspectImage(ctx context.Context, path string, format drivers.Format) (ImageInfo, error)
	// ResizeImage grows the image at path, opened as format, to size bytes;
	// shrinking is ErrInvalid.
	ResizeImage(ctx context.Context, path string, format drivers.Format, size int64) (ImageInfo, error)
	// SnapshotImage takes a point-in-time snapshot of the volume at req.Volume
	// (opened as req.Format) into req.Snapshot. A qcow2 volume gets an O(1) external snapshot: the
	// volume's current file becomes the (read-only) snapshot and a new empty
	// overlay backed by it takes the volume's path. A raw volume is reflinked
	// where the filesystem allows and copied sparsely otherwise
	// (SnapshotInfo.Method says which).
	SnapshotImage(ctx context.Context, req SnapshotRequest) (SnapshotInfo, error)
	// RevertImage makes the volume at req.Volume read what req.Snapshot
	// holds (both of req.Format, the volume's format): a qcow2 volume gets a new empty overlay on the snapshot; a raw
	// volume gets a reflink or sparse copy of it. Other snapshots stay valid.
	RevertImage(ctx context.Context, req SnapshotRequest) (ImageInfo, error)
	// RebaseImage rewrites the qcow2 at path onto newBacking, an image of
	// backingFormat in the same store ("" makes it standalone; the format is
	// then unused), merging in the data of the backing files it leaves out
	// (qemu-img rebase, safe mode). Used to drop a snapshot from a chain.
	RebaseImage(ctx context.Context, path, newBacking string, backingFormat drivers.Format) (ImageInfo, error)
	// BackupImage reads the image at req.Source, opened as
	// req.SourceFormat, as a flat disk (a qcow2 chain is read through its
	// backing files) and stores it into the chunk store
	// under req.ChunkDir as content-addressed chunks (sha256 of the chunk,
	// req.ChunkSize bytes): all-zero chunks are not stored, a chunk already
	// present is not written again. The manifest (JSON: size, chunk size,
	// per chunk its sha256 or "zero") goes to req.Manifest. With
	// req.ParentManifest, chunks whose extents are unallocated in the top
	// layer of a qcow2 source are taken from the parent without reading.
	BackupImage(ctx context.Context, req BackupRequest, progress drivers.Progress) (BackupInfo, error)
	// RestoreImage rebuilds an image at req.Dest (req.Format) from a
	// manifest and its chunks, verifying every chunk's sha256 (ErrDataLoss on
	// a bad chunk); zero chunks become holes.
	RestoreImage(ctx context.Context, req RestoreRequest, progress drivers.Progress) (ImageInfo, error)
	// DeleteBackup removes a manifest and the chunks that no other manifest
	// next to it (same directory) refers to.
	DeleteBackup(ctx context.Context, req DeleteBackupRequest) (BackupInfo, error)
	// CollectChunks removes the chunks of req.ChunkDir that no manifest
	// of req.ManifestDir refers to, under the chunk store's exclusive lock.
	CollectChunks(ctx context.Context, req CollectChunksRequest) (CollectInfo, error)
	// Export serves the file at path read-only over HTTP (Range) from the
	// agent under an unguessable token, until Unexport or expires (zero:
	// never); it returns the URL. Other agents copy from it directly
	// (volume migration between hosts).
	Export(ctx context.Context, path string, expires time.Time, owner exports.Owner) (drivers.URI, error)
	// Unexport ends an export; an unknown one is not an error.
	Unexport(ctx context.Context, uri drivers.URI) error
	// ExportNBD serves the image at req.Path (a file of a store on this
	// host) over NBD from the agent under an unguessable export name (128
	// random bits, hex) and returns its nbd://host:port/name URI (nbds://
	// when the agent's NBD speaks TLS), until UnexportNBD or req.Expires. A
	// raw image is served as its bytes, a qcow2 as its guest view through
	// its backing chain (checked as every step checks a declared qcow2). A
	// hypervisor that cannot open the file directly attaches the volume
	// through it; another agent reads it for a copy.
	ExportNBD(ctx context.Context, req NBDExportRequest) (drivers.URI, error)
	// UnexportNBD removes the export at uri and closes its connections; an
	// unknown export is not an error.
	UnexportNBD(ctx context.Context, uri drivers.URI) error
	// ListExports returns the live exports of the host, HTTP and NBD, with
	// the owners they were made for.
	ListExports(ctx context.Context) ([]ExportInfo, error)
}

// NBDExportRequest asks an agent to serve an image over NBD.
type NBDExportRequest struct {
	Path string
	// Format is the image's format as the records say (required): raw
	// serves the file's bytes, qcow2 the guest view of its chain.
	Format drivers.Format
	// ReadOnly refuses writes, trims and zeroes.
	ReadOnly bool
	// Expires is when the export ends (zero: never); past it, the export
	// does not open and the agent removes it.
	Expires time.Time
	// Owner is whom the export is for; it only records it.
	Owner exports.Owner
}

// ImageInfo is what qemu-img says of an image, plus what the step measured.
type ImageInfo struct {
	Path         string
	Format       drivers.Format
	VirtualSize  int64
	PhysicalSize int64  // bytes allocated on disk
	BackingFile  string // "" when standalone
	// SHA256 of the image's bytes as stored, when the step computed it.
	SHA256 string
	// BytesWritten, BytesSkipped (holes and zeros) and Method ("reflink",
	// "copy_file_range", "read-write", "qemu-img convert", "linked") describe
	// the work a copying step did.
	BytesWritten int64
	BytesSkipped int64
	Method       string
}

// FetchRequest asks an agent to download an image.
type FetchRequest struct {
	Source string
	// SourceFile, when set, is read instead of opening Source (which then
	// only names it): a file:// import the agent opened beneath its import
	// directory without following symbolic links. FetchImage closes it.
	SourceFile *os.File
	Dest       string
	Format     drivers.Format
	Checksum   string // "sha256:HEX", "sha512:HEX", "md5:HEX" or ""
}

// CopyRequest asks an agent to copy an image.
type CopyRequest struct {
	Source string
	// SourceFormat is the format of Source as the records say (required):
	// the source is opened as it, never probed.
	SourceFormat drivers.Format
	Dest         string
	Format       drivers.Format // "" keeps the source's format
	Flatten      bool
	// Backing, when set, is the image (of Dest's store) the copy, a qcow2
	// overlay copied as stored, names as its backing file in place of the
	// source's: one that reads exactly as the old (a copy of the same
	// template), so only the name is rewritten (qemu-img rebase -u), and
	// the chain is checked as every chain is. BackingFormat is its format.
	Backing       string
	BackingFormat drivers.Format
}

// CloneRequest asks an agent to create a volume from a base image.
type CloneRequest struct {
	Base string
	// BaseFormat is the format of Base as the records say (required).
	BaseFormat drivers.Format
	Dest       string
	Mode       drivers.CloneMode
	Format     drivers.Format // format of Dest (CloneLinked is always qcow2)
	Size       int64          // 0 keeps Base's virtual size; larger grows the volume
}

// SnapshotRequest names a volume and one of its snapshots on the host.
type SnapshotRequest struct {
	Volume   string
	Snapshot string
	// Format is the volume's format as the records say (required); a
	// volume's snapshots have its format.
	Format drivers.Format
}

// SnapshotInfo is the result of SnapshotImage.
type SnapshotInfo struct {
	Snapshot ImageInfo
	Volume   ImageInfo
	// Method is "qcow2-external", "reflink" or "copy".
	Method string
}

// BackupRequest asks an agent to back an image up into a chunk store.
type BackupRequest struct {
	Source string
	// SourceFormat is the format of Source as the records say (required).
	SourceFormat   drivers.Format
	ChunkDir       string
	Manifest       string
	ParentManifest string
	ChunkSize      int64
}

// BackupInfo reports what a backup stored.
type BackupInfo struct {
	Manifest    string
	Size        int64 // virtual size of the image
	Chunks      int64
	ZeroChunks  int64
	NewChunks   int64 // chunks written by this backup
	NewBytes    int64 // bytes written by this backup
	ReusedBytes int64 // bytes of chunks that were already stored
	ReadBytes   int64 // bytes read from the source
}

// RestoreRequest asks an agent to rebuild an image from a backup.
type RestoreRequest struct {
	Manifest string
	ChunkDir string
	Dest     string
	Format   drivers.Format
}

// DeleteBackupRequest asks an agent to drop a backup's manifest and its
// unshared chunks.
type DeleteBackupRequest struct {
	Manifest string
	ChunkDir string
}

// CollectChunksRequest asks an agent to remove the chunks of ChunkDir that
// no manifest in ManifestDir (the manifests that share them) refers to.
type CollectChunksRequest struct {
	ChunkDir    string
	ManifestDir string
}

// CollectInfo is what CollectChunks found and removed.
type CollectInfo struct {
	Manifests     int64 // manifests read
	Chunks        int64 // chunks found
	KeptChunks    int64 // chunks some manifest refers to
	RemovedChunks int64
	RemovedBytes  int64
}

// StoreProbe is what a host sees of a store directory.
type StoreProbe struct {
	CapacityBytes  int64
	AvailableBytes int64
	Reflink        bool
	FSType         string
}

// FileInfo describes a file on a host.
type FileInfo struct {
	Path           string
	Size           int64
	AllocatedBytes int64
	IsDir          bool
	ModifiedAt     time.Time
	// Format is FormatQCOW2 for a file with a qcow2 header, "" otherwise.
	Format drivers.Format
	// VirtualSize is what a guest sees: the qcow2 header's size, else Size.
	VirtualSize int64
}

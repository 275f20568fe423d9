package hostops

import (
	"time"

	"github.com/stowage/stowage/drivers"
)

// FetchRequest asks an agent to download an image into a store.
type FetchRequest struct {
	Source   string // http:// or https://
	Dest     Ref
	Format   drivers.Format
	Checksum string // "sha256:HEX", "sha512:HEX", "md5:HEX" or ""
}

// CopyRequest asks an agent to copy an image into a store.
type CopyRequest struct {
	// Source is store://<store>/<key> or a URI granted to the host
	// (http(s)://, nbd://).
	Source drivers.URI
	// SourceFormat is the format of Source as the records say (required).
	SourceFormat drivers.Format
	Dest         Ref
	// DestURI, instead of Dest, is a writable URI a driver granted the
	// host (iscsi://): written in Format, never probed.
	DestURI drivers.URI
	// DestIsZero says DestURI reads as zeros (a new LUN).
	DestIsZero bool
	Format     drivers.Format // "" keeps the source's format
	Flatten    bool
	// Backing, when set, is an object of Dest's store that the copy (a
	// qcow2 overlay copied as stored) names as its backing file instead of
	// the source's: a copy of the same template, which reads exactly as
	// the old backing, so only the name is rewritten. BackingFormat is its
	// format as the records say.
	Backing       Ref
	BackingFormat drivers.Format
}

// CloneRequest asks an agent to create a volume from a base image of the
// same store (or of the host's template mount).
type CloneRequest struct {
	Base       Ref
	BaseFormat drivers.Format
	Dest       Ref
	Mode       drivers.CloneMode
	Format     drivers.Format // of Dest (CloneLinked is always qcow2)
	Size       int64          // 0 keeps Base's virtual size
}

// SnapshotRequest names a volume and one of its snapshots.
type SnapshotRequest struct {
	Volume   Ref
	Snapshot Ref
	Format   drivers.Format // the volume's
}

// ChunkStore is where backups keep chunks and manifests: a store directory
// (store://<store id>/<dir>) or an S3 prefix (s3://bucket/prefix?endpoint=…)
// with its credentials in Secret.
type ChunkStore struct {
	URI    drivers.URI
	Secret map[string]string
}

// BackupRequest asks an agent to back an image up into a chunk store.
type BackupRequest struct {
	Source Ref
	// SourceURI, instead of Source, is a URI a driver granted the host:
	// an iscsi:// LUN (read into a private scratch file, then backed up)
	// or an nbd(s):// export (read as it is chunked).
	SourceURI      drivers.URI
	SourceFormat   drivers.Format
	Chunks         ChunkStore
	Manifest       string
	ParentManifest string
	ChunkSize      int64
	// ChangedKnown says Changed holds every range in which the source may
	// differ from the image ParentManifest backs up (drivers.ChangeTracker):
	// the chunks outside them are the parent's, not read.
	ChangedKnown bool
	Changed      []drivers.Extent
}

// RestoreRequest asks an agent to rebuild an image from a backup.
type RestoreRequest struct {
	Chunks   ChunkStore
	Manifest string
	Dest     Ref
	Format   drivers.Format
	// DestURI, instead of Dest, is a writable nbd(s):// URI a driver
	// granted the host (an RBD image's export), written in place as raw
	// bytes; DestIsZero says it reads as zeros.
	DestURI    drivers.URI
	DestIsZero bool
}

// DeleteBackupRequest asks an agent to drop a backup's manifest and the
// chunks no other manifest refers to.
type DeleteBackupRequest struct {
	Chunks   ChunkStore
	Manifest string
}

// CollectChunksRequest asks an agent to remove the chunks of a chunk store
// that no manifest refers to.
type CollectChunksRequest struct {
	Chunks ChunkStore
}

// NBDExportRequest asks an agent to serve an image over NBD.
type NBDExportRequest struct {
	Ref Ref
	// RBD, when set, is a Ceph RBD image the agent serves through
	// qemu-storage-daemon's rbd driver; Ref then only names the object
	// the export is for (its store and key), resolved to no path, and
	// Format is raw.
	RBD      *RBDImage
	Format   drivers.Format
	ReadOnly bool
	// TTL is how long the export lasts from when the agent makes it
	// (zero: until UnexportNBD). A duration, not an instant, so that a
	// step retried after a controller restart is the same step.
	TTL time.Duration
}

// ImageInfo is what qemu-img says of an image, plus what the step measured.
type ImageInfo struct {
	Key          string
	Format       drivers.Format
	VirtualSize  int64
	PhysicalSize int64
	// HasBacking says the image has a backing file.
	HasBacking   bool
	SHA256       string
	BytesWritten int64
	BytesSkipped int64
	Method       string
}

// Object is what a driver reports of obj after a host step made it i.
func (i ImageInfo) Object(obj drivers.DataObject) drivers.ObjectInfo {
	return drivers.ObjectInfo{
		ID: obj.ID, Type: obj.Type, Key: obj.Key, Format: i.Format, Size: i.VirtualSize, PhysicalSize: i.PhysicalSize,
		SHA256: i.SHA256, Method: i.Method, BytesWritten: i.BytesWritten, BytesSkipped: i.BytesSkipped,
	}
}

// SnapshotInfo is the result of SnapshotImage.
type SnapshotInfo struct {
	Snapshot ImageInfo
	Volume   ImageInfo
	Method   string // "qcow2-external", "reflink" or "copy"
}

// CollectInfo reports what collecting a chunk store's unreferenced chunks
// found and removed.
type CollectInfo struct {
	Manifests     int64 // manifests read
	Chunks        int64 // chunks found in the store
	KeptChunks    int64 // chunks some manifest refers to
	RemovedChunks int64
	RemovedBytes  int64
}

// BackupInfo reports what a backup stored (or a delete freed).
type BackupInfo struct {
	Manifest    string
	Size        int64
	Chunks      int64
	ZeroChunks  int64
	NewChunks   int64
	NewBytes    int64
	ReusedBytes int64
	ReadBytes   int64
}

// RBDImage is a Ceph RBD image, or one of its snapshots, and how to reach
// its cluster: monitors (host:port), a cephx user and its key (base64, as
// in a keyring; never logged).
type RBDImage struct {
	Pool, Image, Snapshot string
	User, Key             string
	Mons                  []string
}

package hostops

import (
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/drivers"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Conversions between the Go types and the wire, shared by Remote and the
// agent's dispatcher (and, for formats, by the controller's API): the one
// table of formats and clone modes.

// formats is the one table of image formats on the wire.
var formats = []struct {
	f drivers.Format
	p stowagev1.ImageFormat
}{
	{drivers.FormatRaw, stowagev1.ImageFormat_IMAGE_FORMAT_RAW},
	{drivers.FormatQCOW2, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2},
	{drivers.FormatISO, stowagev1.ImageFormat_IMAGE_FORMAT_ISO},
	{drivers.FormatVHD, stowagev1.ImageFormat_IMAGE_FORMAT_VHD},
	{drivers.FormatVHDX, stowagev1.ImageFormat_IMAGE_FORMAT_VHDX},
	{drivers.FormatVMDK, stowagev1.ImageFormat_IMAGE_FORMAT_VMDK},
}

// FormatToProto converts an image format for the wire.
func FormatToProto(f drivers.Format) stowagev1.ImageFormat {
	for _, e := range formats {
		if e.f == f {
			return e.p
		}
	}
	return stowagev1.ImageFormat_IMAGE_FORMAT_UNSPECIFIED
}

// FormatFromProto converts an image format from the wire ("" when unspecified).
func FormatFromProto(p stowagev1.ImageFormat) drivers.Format {
	for _, e := range formats {
		if e.p == p {
			return e.f
		}
	}
	return ""
}

// cloneModes is the one table of clone modes on the wire.
var cloneModes = []struct {
	m drivers.CloneMode
	p stowagev1.CloneMode
}{
	{drivers.CloneReflink, stowagev1.CloneMode_CLONE_MODE_REFLINK},
	{drivers.CloneLinked, stowagev1.CloneMode_CLONE_MODE_LINKED},
	{drivers.CloneFull, stowagev1.CloneMode_CLONE_MODE_FULL},
}

// CloneModeToProto converts a clone mode for the wire.
func CloneModeToProto(m drivers.CloneMode) stowagev1.CloneMode {
	for _, e := range cloneModes {
		if e.m == m {
			return e.p
		}
	}
	return stowagev1.CloneMode_CLONE_MODE_UNSPECIFIED
}

// CloneModeFromProto converts a clone mode from the wire.
func CloneModeFromProto(p stowagev1.CloneMode) drivers.CloneMode {
	for _, e := range cloneModes {
		if e.p == p {
			return e.m
		}
	}
	return ""
}

// RefToProto converts a Ref for the wire.
func RefToProto(r Ref) *stowagev1.ObjectRef {
	return &stowagev1.ObjectRef{StoreId: r.Store, Key: r.Key}
}

// RefFromProto converts a Ref from the wire.
func RefFromProto(r *stowagev1.ObjectRef) Ref {
	return Ref{Store: r.GetStoreId(), Key: r.GetKey()}
}

// ChunkStoreToProto converts a chunk store for the wire.
func ChunkStoreToProto(c ChunkStore) *stowagev1.ChunkStoreRef {
	return &stowagev1.ChunkStoreRef{Uri: string(c.URI), Secret: c.Secret}
}

// ChunkStoreFromProto converts a chunk store from the wire.
func ChunkStoreFromProto(c *stowagev1.ChunkStoreRef) ChunkStore {
	return ChunkStore{URI: drivers.URI(c.GetUri()), Secret: c.GetSecret()}
}

// ProbeToProto converts a store probe for the wire.
func ProbeToProto(p StoreProbe) *stowagev1.StoreProbe {
	return &stowagev1.StoreProbe{CapacityBytes: p.CapacityBytes, AvailableBytes: p.AvailableBytes, Reflink: p.Reflink, FsType: p.FSType}
}

// ProbeFromProto converts a store probe from the wire.
func ProbeFromProto(p *stowagev1.StoreProbe) StoreProbe {
	return StoreProbe{CapacityBytes: p.GetCapacityBytes(), AvailableBytes: p.GetAvailableBytes(), Reflink: p.GetReflink(), FSType: p.GetFsType()}
}

// FileToProto converts file facts for the wire.
func FileToProto(f FileInfo) *stowagev1.FileInfo {
	out := &stowagev1.FileInfo{Key: f.Key, Size: f.Size, AllocatedBytes: f.AllocatedBytes, IsDir: f.IsDir,
		Format: FormatToProto(f.Format), VirtualSize: f.VirtualSize}
	if !f.ModifiedAt.IsZero() {
		out.ModifiedAt = timestamppb.New(f.ModifiedAt)
	}
	return out
}

// FileFromProto converts file facts from the wire.
func FileFromProto(f *stowagev1.FileInfo) FileInfo {
	out := FileInfo{Key: f.GetKey(), Size: f.GetSize(), AllocatedBytes: f.GetAllocatedBytes(), IsDir: f.GetIsDir(),
		Format: FormatFromProto(f.GetFormat()), VirtualSize: f.GetVirtualSize()}
	if f.GetModifiedAt() != nil {
		out.ModifiedAt = f.GetModifiedAt().AsTime()
	}
	return out
}

// ImageInfoToProto converts image facts for the wire.
func ImageInfoToProto(i ImageInfo) *stowagev1.ImageInfo {
	out := &stowagev1.ImageInfo{Key: i.Key, Format: FormatToProto(i.Format), VirtualSize: i.VirtualSize,
		PhysicalSize: i.PhysicalSize, Sha256: i.SHA256,
		BytesWritten: i.BytesWritten, BytesSkipped: i.BytesSkipped, Method: i.Method}
	if i.HasBacking {
		out.BackingFile = "yes"
	}
	if out.Format == stowagev1.ImageFormat_IMAGE_FORMAT_UNSPECIFIED {
		out.FormatName = string(i.Format)
	}
	return out
}

// ImageInfoFromProto converts image facts from the wire.
func ImageInfoFromProto(i *stowagev1.ImageInfo) ImageInfo {
	out := ImageInfo{Key: i.GetKey(), Format: FormatFromProto(i.GetFormat()), VirtualSize: i.GetVirtualSize(),
		PhysicalSize: i.GetPhysicalSize(), HasBacking: i.GetBackingFile() != "", SHA256: i.GetSha256(),
		BytesWritten: i.GetBytesWritten(), BytesSkipped: i.GetBytesSkipped(), Method: i.GetMethod()}
	if out.Format == "" {
		out.Format = drivers.Format(i.GetFormatName())
	}
	return out
}

// SnapshotInfoToProto converts a snapshot result for the wire.
func SnapshotInfoToProto(s SnapshotInfo) *stowagev1.SnapshotInfo {
	return &stowagev1.SnapshotInfo{Snapshot: ImageInfoToProto(s.Snapshot), Volume: ImageInfoToProto(s.Volume), Method: s.Method}
}

// SnapshotInfoFromProto converts a snapshot result from the wire.
func SnapshotInfoFromProto(s *stowagev1.SnapshotInfo) SnapshotInfo {
	return SnapshotInfo{Snapshot: ImageInfoFromProto(s.GetSnapshot()), Volume: ImageInfoFromProto(s.GetVolume()), Method: s.GetMethod()}
}

// BackupInfoToProto converts a backup result for the wire.
func BackupInfoToProto(b BackupInfo) *stowagev1.BackupInfo {
	return &stowagev1.BackupInfo{Manifest: b.Manifest, Size: b.Size, Chunks: b.Chunks, ZeroChunks: b.ZeroChunks,
		NewChunks: b.NewChunks, NewBytes: b.NewBytes, ReusedBytes: b.ReusedBytes, ReadBytes: b.ReadBytes}
}

// BackupInfoFromProto converts a backup result from the wire.
func BackupInfoFromProto(b *stowagev1.BackupInfo) BackupInfo {
	return BackupInfo{Manifest: b.GetManifest(), Size: b.GetSize(), Chunks: b.GetChunks(), ZeroChunks: b.GetZeroChunks(),
		NewChunks: b.GetNewChunks(), NewBytes: b.GetNewBytes(), ReusedBytes: b.GetReusedBytes(), ReadBytes: b.GetReadBytes()}
}

// CollectInfoToProto converts a collect result to the wire.
func CollectInfoToProto(c CollectInfo) *stowagev1.CollectInfo {
	return &stowagev1.CollectInfo{Manifests: c.Manifests, Chunks: c.Chunks, KeptChunks: c.KeptChunks,
		RemovedChunks: c.RemovedChunks, RemovedBytes: c.RemovedBytes}
}

// CollectInfoFromProto converts a collect result from the wire.
func CollectInfoFromProto(c *stowagev1.CollectInfo) CollectInfo {
	return CollectInfo{Manifests: c.GetManifests(), Chunks: c.GetChunks(), KeptChunks: c.GetKeptChunks(),
		RemovedChunks: c.GetRemovedChunks(), RemovedBytes: c.GetRemovedBytes()}
}

// TTLToProto converts an export's lifetime to whole seconds on the wire,
// rounded up so that a short TTL does not become "no expiry".
func TTLToProto(ttl time.Duration) int64 {
	if ttl <= 0 {
		return 0
	}
	return int64((ttl + time.Second - 1) / time.Second)
}

// backingToProto is a copy's backing Ref for the wire (nil when unset).
func backingToProto(r Ref) *stowagev1.ObjectRef {
	if r == (Ref{}) {
		return nil
	}
	return RefToProto(r)
}

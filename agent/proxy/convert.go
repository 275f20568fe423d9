package proxy

import (
	"context"
	"fmt"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// ProbeToProto converts a store probe for the wire.
func ProbeToProto(p drivers.StoreProbe) *stowagev1.StoreProbe {
	return &stowagev1.StoreProbe{CapacityBytes: p.CapacityBytes, AvailableBytes: p.AvailableBytes, Reflink: p.Reflink, FsType: p.FSType}
}

// ProbeFromProto converts a store probe from the wire.
func ProbeFromProto(p *stowagev1.StoreProbe) drivers.StoreProbe {
	return drivers.StoreProbe{CapacityBytes: p.GetCapacityBytes(), AvailableBytes: p.GetAvailableBytes(), Reflink: p.GetReflink(), FSType: p.GetFsType()}
}

// FileToProto converts file facts for the wire.
func FileToProto(f drivers.FileInfo) *stowagev1.FileInfo {
	out := &stowagev1.FileInfo{Path: f.Path, Size: f.Size, AllocatedBytes: f.AllocatedBytes, IsDir: f.IsDir,
		Format: FormatToProto(f.Format), VirtualSize: f.VirtualSize}
	if !f.ModifiedAt.IsZero() {
		out.ModifiedAt = timestamppb.New(f.ModifiedAt)
	}
	return out
}

// FileFromProto converts file facts from the wire.
func FileFromProto(f *stowagev1.FileInfo) drivers.FileInfo {
	out := drivers.FileInfo{Path: f.GetPath(), Size: f.GetSize(), AllocatedBytes: f.GetAllocatedBytes(), IsDir: f.GetIsDir(),
		Format: FormatFromProto(f.GetFormat()), VirtualSize: f.GetVirtualSize()}
	if f.GetModifiedAt() != nil {
		out.ModifiedAt = f.GetModifiedAt().AsTime()
	}
	return out
}

// FormatToProto converts an image format for the wire.
func FormatToProto(f drivers.Format) stowagev1.ImageFormat {
	switch f {
	case drivers.FormatRaw:
		return stowagev1.ImageFormat_IMAGE_FORMAT_RAW
	case drivers.FormatQCOW2:
		return stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2
	case drivers.FormatISO:
		return stowagev1.ImageFormat_IMAGE_FORMAT_ISO
	}
	return stowagev1.ImageFormat_IMAGE_FORMAT_UNSPECIFIED
}

// FormatFromProto converts an image format from the wire.
func FormatFromProto(f stowagev1.ImageFormat) drivers.Format {
	switch f {
	case stowagev1.ImageFormat_IMAGE_FORMAT_RAW:
		return drivers.FormatRaw
	case stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2:
		return drivers.FormatQCOW2
	case stowagev1.ImageFormat_IMAGE_FORMAT_ISO:
		return drivers.FormatISO
	}
	return ""
}

// ImageInfoToProto converts image facts for the wire.
func ImageInfoToProto(i drivers.ImageInfo) *stowagev1.ImageInfo {
	out := &stowagev1.ImageInfo{Path: i.Path, Format: FormatToProto(i.Format), VirtualSize: i.VirtualSize,
		PhysicalSize: i.PhysicalSize, BackingFile: i.BackingFile, Sha256: i.SHA256,
		BytesWritten: i.BytesWritten, BytesSkipped: i.BytesSkipped, Method: i.Method}
	if out.Format == stowagev1.ImageFormat_IMAGE_FORMAT_UNSPECIFIED {
		out.FormatName = string(i.Format)
	}
	return out
}

// ImageInfoFromProto converts image facts from the wire.
func ImageInfoFromProto(i *stowagev1.ImageInfo) drivers.ImageInfo {
	out := drivers.ImageInfo{Path: i.GetPath(), Format: FormatFromProto(i.GetFormat()), VirtualSize: i.GetVirtualSize(),
		PhysicalSize: i.GetPhysicalSize(), BackingFile: i.GetBackingFile(), SHA256: i.GetSha256(),
		BytesWritten: i.GetBytesWritten(), BytesSkipped: i.GetBytesSkipped(), Method: i.GetMethod()}
	if out.Format == "" {
		out.Format = drivers.Format(i.GetFormatName())
	}
	return out
}

// SnapshotInfoToProto converts a snapshot result for the wire.
func SnapshotInfoToProto(s drivers.SnapshotInfo) *stowagev1.SnapshotInfo {
	return &stowagev1.SnapshotInfo{Snapshot: ImageInfoToProto(s.Snapshot), Volume: ImageInfoToProto(s.Volume), Method: s.Method}
}

// SnapshotInfoFromProto converts a snapshot result from the wire.
func SnapshotInfoFromProto(s *stowagev1.SnapshotInfo) drivers.SnapshotInfo {
	return drivers.SnapshotInfo{Snapshot: ImageInfoFromProto(s.GetSnapshot()), Volume: ImageInfoFromProto(s.GetVolume()), Method: s.GetMethod()}
}

// BackupInfoToProto converts a backup result for the wire.
func BackupInfoToProto(b drivers.BackupInfo) *stowagev1.BackupInfo {
	return &stowagev1.BackupInfo{Manifest: b.Manifest, Size: b.Size, Chunks: b.Chunks, ZeroChunks: b.ZeroChunks,
		NewChunks: b.NewChunks, NewBytes: b.NewBytes, ReusedBytes: b.ReusedBytes, ReadBytes: b.ReadBytes}
}

// BackupInfoFromProto converts a backup result from the wire.
func BackupInfoFromProto(b *stowagev1.BackupInfo) drivers.BackupInfo {
	return drivers.BackupInfo{Manifest: b.GetManifest(), Size: b.GetSize(), Chunks: b.GetChunks(), ZeroChunks: b.GetZeroChunks(),
		NewChunks: b.GetNewChunks(), NewBytes: b.GetNewBytes(), ReusedBytes: b.GetReusedBytes(), ReadBytes: b.GetReadBytes()}
}

// CloneModeToProto converts a clone mode for the wire.
func CloneModeToProto(m drivers.CloneMode) stowagev1.CloneMode {
	switch m {
	case drivers.CloneReflink:
		return stowagev1.CloneMode_CLONE_MODE_REFLINK
	case drivers.CloneLinked:
		return stowagev1.CloneMode_CLONE_MODE_LINKED
	case drivers.CloneFull:
		return stowagev1.CloneMode_CLONE_MODE_FULL
	}
	return stowagev1.CloneMode_CLONE_MODE_UNSPECIFIED
}

// CloneModeFromProto converts a clone mode from the wire.
func CloneModeFromProto(m stowagev1.CloneMode) drivers.CloneMode {
	switch m {
	case stowagev1.CloneMode_CLONE_MODE_REFLINK:
		return drivers.CloneReflink
	case stowagev1.CloneMode_CLONE_MODE_LINKED:
		return drivers.CloneLinked
	case stowagev1.CloneMode_CLONE_MODE_FULL:
		return drivers.CloneFull
	}
	return ""
}

// Execute runs one wire task on a local endpoint and returns its result
// (without task id or error fields, which the caller fills in). progress,
// which may be nil, receives the progress of long steps.
func Execute(ctx context.Context, ep drivers.Endpoint, task *stowagev1.Task, progress drivers.Progress) (*stowagev1.TaskResult, error) {
	res := &stowagev1.TaskResult{TaskId: task.GetId()}
	image := func(i drivers.ImageInfo, err error) (*stowagev1.TaskResult, error) {
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_Image{Image: ImageInfoToProto(i)}
		return res, nil
	}
	backup := func(b drivers.BackupInfo, err error) (*stowagev1.TaskResult, error) {
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_Backup{Backup: BackupInfoToProto(b)}
		return res, nil
	}
	switch s := task.GetStep().(type) {
	case *stowagev1.Task_PrepareStore:
		p, err := ep.PrepareStore(ctx, s.PrepareStore.GetPath(), s.PrepareStore.GetStoreId(), s.PrepareStore.GetSubdirs())
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_Probe{Probe: ProbeToProto(p)}
	case *stowagev1.Task_ProbeStore:
		p, err := ep.ProbeStore(ctx, s.ProbeStore.GetPath(), s.ProbeStore.GetStoreId())
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_Probe{Probe: ProbeToProto(p)}
	case *stowagev1.Task_ReleaseStore:
		if err := ep.ReleaseStore(ctx, s.ReleaseStore.GetPath(), s.ReleaseStore.GetStoreId(), s.ReleaseStore.GetSubdirs()); err != nil {
			return nil, err
		}
	case *stowagev1.Task_CreateImage:
		f, err := ep.CreateImage(ctx, s.CreateImage.GetPath(), FormatFromProto(s.CreateImage.GetFormat()), s.CreateImage.GetSizeBytes())
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_File{File: FileToProto(f)}
	case *stowagev1.Task_DeletePath:
		if err := ep.DeletePath(ctx, s.DeletePath.GetPath()); err != nil {
			return nil, err
		}
	case *stowagev1.Task_ListDir:
		files, err := ep.ListDir(ctx, s.ListDir.GetPath())
		if err != nil {
			return nil, err
		}
		list := &stowagev1.FileList{}
		for _, f := range files {
			list.Files = append(list.Files, FileToProto(f))
		}
		res.Result = &stowagev1.TaskResult_Files{Files: list}
	case *stowagev1.Task_StatPath:
		f, err := ep.StatPath(ctx, s.StatPath.GetPath())
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_File{File: FileToProto(f)}
	case *stowagev1.Task_FetchImage:
		r := s.FetchImage
		return image(ep.FetchImage(ctx, drivers.FetchRequest{Source: r.GetSource(), Dest: r.GetDest(),
			Format: FormatFromProto(r.GetFormat()), Checksum: r.GetChecksum()}, progress))
	case *stowagev1.Task_CopyImage:
		r := s.CopyImage
		return image(ep.CopyImage(ctx, drivers.CopyRequest{Source: r.GetSource(), SourceFormat: FormatFromProto(r.GetSourceFormat()),
			Dest: r.GetDest(), Format: FormatFromProto(r.GetFormat()), Flatten: r.GetFlatten()}, progress))
	case *stowagev1.Task_CloneImage:
		r := s.CloneImage
		return image(ep.CloneImage(ctx, drivers.CloneRequest{Base: r.GetBase(), BaseFormat: FormatFromProto(r.GetBaseFormat()), Dest: r.GetDest(),
			Mode: CloneModeFromProto(r.GetMode()), Format: FormatFromProto(r.GetFormat()), Size: r.GetSizeBytes()}, progress))
	case *stowagev1.Task_InspectImage:
		return image(ep.InspectImage(ctx, s.InspectImage.GetPath(), FormatFromProto(s.InspectImage.GetFormat())))
	case *stowagev1.Task_ResizeImage:
		r := s.ResizeImage
		return image(ep.ResizeImage(ctx, r.GetPath(), FormatFromProto(r.GetFormat()), r.GetSizeBytes()))
	case *stowagev1.Task_SnapshotImage:
		r := s.SnapshotImage
		si, err := ep.SnapshotImage(ctx, drivers.SnapshotRequest{Volume: r.GetVolume(), Snapshot: r.GetSnapshot(), Format: FormatFromProto(r.GetFormat())})
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_Snapshot{Snapshot: SnapshotInfoToProto(si)}
	case *stowagev1.Task_RevertImage:
		r := s.RevertImage
		return image(ep.RevertImage(ctx, drivers.SnapshotRequest{Volume: r.GetVolume(), Snapshot: r.GetSnapshot(), Format: FormatFromProto(r.GetFormat())}))
	case *stowagev1.Task_RebaseImage:
		r := s.RebaseImage
		return image(ep.RebaseImage(ctx, r.GetPath(), r.GetNewBacking(), FormatFromProto(r.GetBackingFormat())))
	case *stowagev1.Task_BackupImage:
		r := s.BackupImage
		return backup(ep.BackupImage(ctx, drivers.BackupRequest{Source: r.GetSource(), SourceFormat: FormatFromProto(r.GetSourceFormat()), ChunkDir: r.GetChunkDir(),
			Manifest: r.GetManifest(), ParentManifest: r.GetParentManifest(), ChunkSize: r.GetChunkSize()}, progress))
	case *stowagev1.Task_RestoreImage:
		r := s.RestoreImage
		return image(ep.RestoreImage(ctx, drivers.RestoreRequest{Manifest: r.GetManifest(), ChunkDir: r.GetChunkDir(),
			Dest: r.GetDest(), Format: FormatFromProto(r.GetFormat())}, progress))
	case *stowagev1.Task_DeleteBackup:
		return backup(ep.DeleteBackup(ctx, drivers.DeleteBackupRequest{Manifest: s.DeleteBackup.GetManifest(), ChunkDir: s.DeleteBackup.GetChunkDir()}))
	case *stowagev1.Task_Export:
		u, err := ep.Export(ctx, s.Export.GetPath())
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_Uri{Uri: string(u)}
	case *stowagev1.Task_Unexport:
		if err := ep.Unexport(ctx, drivers.URI(s.Unexport.GetUri())); err != nil {
			return nil, err
		}
	case *stowagev1.Task_ExportNbd:
		r := s.ExportNbd
		u, err := ep.ExportNBD(ctx, drivers.NBDExportRequest{Path: r.GetPath(), Format: FormatFromProto(r.GetFormat()), ReadOnly: r.GetReadOnly()})
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_Uri{Uri: string(u)}
	case *stowagev1.Task_UnexportNbd:
		if err := ep.UnexportNBD(ctx, drivers.URI(s.UnexportNbd.GetUri())); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("task %s: unknown step %T: %w", task.GetId(), s, errdefs.ErrNotImplemented)
	}
	return res, nil
}

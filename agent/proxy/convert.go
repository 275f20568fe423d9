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

// Execute runs one wire task on a local endpoint and returns its result
// (without task id or error fields, which the caller fills in).
func Execute(ctx context.Context, ep drivers.Endpoint, task *stowagev1.Task) (*stowagev1.TaskResult, error) {
	res := &stowagev1.TaskResult{TaskId: task.GetId()}
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
	default:
		return nil, fmt.Errorf("task %s: unknown step %T: %w", task.GetId(), s, errdefs.ErrNotImplemented)
	}
	return res, nil
}

package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// Execute runs one wire task as a call on host (the counterpart of
// hostops.Remote, which makes the task) and returns its result (without the
// error fields, which the journal fills in). progress, which may be nil,
// receives the progress of long steps.
func Execute(ctx context.Context, host hostops.Host, task *stowagev1.Task, progress drivers.Progress) (*stowagev1.TaskResult, error) {
	res := &stowagev1.TaskResult{TaskId: task.GetId()}
	ctx = hostops.WithOwner(ctx, hostops.Owner{TaskID: task.GetId(), ParentID: task.GetParentId()})
	image := func(i hostops.ImageInfo, err error) (*stowagev1.TaskResult, error) {
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_Image{Image: hostops.ImageInfoToProto(i)}
		return res, nil
	}
	backup := func(b hostops.BackupInfo, err error) (*stowagev1.TaskResult, error) {
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_Backup{Backup: hostops.BackupInfoToProto(b)}
		return res, nil
	}
	probe := func(p hostops.StoreProbe, err error) (*stowagev1.TaskResult, error) {
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_Probe{Probe: hostops.ProbeToProto(p)}
		return res, nil
	}
	file := func(f hostops.FileInfo, err error) (*stowagev1.TaskResult, error) {
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_File{File: hostops.FileToProto(f)}
		return res, nil
	}
	uri := func(u drivers.URI, err error) (*stowagev1.TaskResult, error) {
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_Uri{Uri: string(u)}
		return res, nil
	}
	lun := func(l hostops.LUNInfo, err error) (*stowagev1.TaskResult, error) {
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_Lun{Lun: hostops.LUNToProto(l)}
		return res, nil
	}
	done := func(err error) (*stowagev1.TaskResult, error) {
		if err != nil {
			return nil, err
		}
		return res, nil
	}
	ref, format := hostops.RefFromProto, hostops.FormatFromProto
	switch s := task.GetStep().(type) {
	case *stowagev1.Task_PrepareStore:
		return probe(host.PrepareStore(ctx, prepareRoot(s.PrepareStore)))
	case *stowagev1.Task_ProbeStore:
		return probe(host.ProbeStore(ctx, probeRoot(s.ProbeStore)))
	case *stowagev1.Task_ReleaseStore:
		return done(host.ReleaseStore(ctx, releaseRoot(s.ReleaseStore)))
	case *stowagev1.Task_CreateImage:
		r := s.CreateImage
		return file(host.CreateImage(ctx, ref(r.GetRef()), format(r.GetFormat()), r.GetSizeBytes()))
	case *stowagev1.Task_DeleteObject:
		return done(host.DeleteObject(ctx, ref(s.DeleteObject.GetRef())))
	case *stowagev1.Task_ListObjects:
		files, err := host.ListObjects(ctx, ref(s.ListObjects.GetDir()))
		if err != nil {
			return nil, err
		}
		list := &stowagev1.FileList{}
		for _, f := range files {
			list.Files = append(list.Files, hostops.FileToProto(f))
		}
		res.Result = &stowagev1.TaskResult_Files{Files: list}
		return res, nil
	case *stowagev1.Task_StatObject:
		return file(host.StatObject(ctx, ref(s.StatObject.GetRef())))
	case *stowagev1.Task_FetchImage:
		return image(host.FetchImage(ctx, fetchRequest(s.FetchImage), progress))
	case *stowagev1.Task_CopyImage:
		return image(host.CopyImage(ctx, copyRequest(s.CopyImage), progress))
	case *stowagev1.Task_CloneImage:
		return image(host.CloneImage(ctx, cloneRequest(s.CloneImage), progress))
	case *stowagev1.Task_InspectImage:
		r := s.InspectImage
		return image(host.InspectImage(ctx, ref(r.GetRef()), format(r.GetFormat())))
	case *stowagev1.Task_ResizeImage:
		r := s.ResizeImage
		return image(host.ResizeImage(ctx, ref(r.GetRef()), format(r.GetFormat()), r.GetSizeBytes()))
	case *stowagev1.Task_SnapshotImage:
		r := s.SnapshotImage
		si, err := host.SnapshotImage(ctx, snapshotRequest(r.GetVolume(), r.GetSnapshot(), r.GetFormat()))
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_Snapshot{Snapshot: hostops.SnapshotInfoToProto(si)}
		return res, nil
	case *stowagev1.Task_RevertImage:
		r := s.RevertImage
		return image(host.RevertImage(ctx, snapshotRequest(r.GetVolume(), r.GetSnapshot(), r.GetFormat())))
	case *stowagev1.Task_RebaseImage:
		r := s.RebaseImage
		return image(host.RebaseImage(ctx, ref(r.GetRef()), newBacking(r), format(r.GetBackingFormat())))
	case *stowagev1.Task_BackupImage:
		return backup(host.BackupImage(ctx, backupRequest(s.BackupImage), progress))
	case *stowagev1.Task_RestoreImage:
		return image(host.RestoreImage(ctx, restoreRequest(s.RestoreImage), progress))
	case *stowagev1.Task_DeleteBackup:
		r := s.DeleteBackup
		return backup(host.DeleteBackup(ctx, hostops.DeleteBackupRequest{Chunks: hostops.ChunkStoreFromProto(r.GetChunks()), Manifest: r.GetManifest()}))
	case *stowagev1.Task_CollectChunks:
		ci, err := host.CollectChunks(ctx, hostops.CollectChunksRequest{Chunks: hostops.ChunkStoreFromProto(s.CollectChunks.GetChunks())})
		if err != nil {
			return nil, err
		}
		res.Result = &stowagev1.TaskResult_Collect{Collect: hostops.CollectInfoToProto(ci)}
		return res, nil
	case *stowagev1.Task_Export:
		return uri(host.Export(ctx, ref(s.Export.GetRef()), ttl(s.Export.GetTtlSeconds())))
	case *stowagev1.Task_Unexport:
		return done(host.Unexport(ctx, drivers.URI(s.Unexport.GetUri())))
	case *stowagev1.Task_ExportNbd:
		r := s.ExportNbd
		return uri(host.ExportNBD(ctx, hostops.NBDExportRequest{Ref: ref(r.GetRef()), RBD: hostops.RBDFromProto(r.GetRbd()), Format: format(r.GetFormat()),
			ReadOnly: r.GetReadOnly(), TTL: ttl(r.GetTtlSeconds())}))
	case *stowagev1.Task_UnexportNbd:
		return done(host.UnexportNBD(ctx, drivers.URI(s.UnexportNbd.GetUri())))
	case *stowagev1.Task_ListExports:
		list, err := host.ListExports(ctx, s.ListExports.GetStoreId())
		if err != nil {
			return nil, err
		}
		out := &stowagev1.ExportList{}
		for _, x := range list {
			out.Exports = append(out.Exports, hostops.ExportInfoToProto(x))
		}
		res.Result = &stowagev1.TaskResult_Exports{Exports: out}
		return res, nil
	case *stowagev1.Task_EnsureIscsiTarget:
		return done(host.EnsureTarget(ctx, hostops.ISCSITargetFromProto(s.EnsureIscsiTarget.GetTarget())))
	case *stowagev1.Task_DeleteIscsiTarget:
		return done(host.DeleteTarget(ctx, hostops.ISCSITargetFromProto(s.DeleteIscsiTarget.GetTarget())))
	case *stowagev1.Task_CreateLun:
		return lun(host.CreateLUN(ctx, lunRequest(s.CreateLun)))
	case *stowagev1.Task_DeleteLun:
		return done(host.DeleteLUN(ctx, lunRequest(s.DeleteLun)))
	case *stowagev1.Task_ResizeLun:
		return lun(host.ResizeLUN(ctx, lunRequest(s.ResizeLun)))
	case *stowagev1.Task_ConnectLun:
		return uri(host.ConnectLUN(ctx, drivers.URI(s.ConnectLun.GetUri())))
	case *stowagev1.Task_DisconnectLun:
		return done(host.DisconnectLUN(ctx, drivers.URI(s.DisconnectLun.GetUri())))
	case *stowagev1.Task_ListLuns:
		luns, err := host.ListLUNs(ctx, hostops.ISCSITargetFromProto(s.ListLuns.GetTarget()))
		if err != nil {
			return nil, err
		}
		list := &stowagev1.LunList{}
		for _, l := range luns {
			list.Luns = append(list.Luns, hostops.LUNToProto(l))
		}
		res.Result = &stowagev1.TaskResult_Luns{Luns: list}
		return res, nil
	}
	return nil, fmt.Errorf("task %s: unknown step %T: %w", task.GetId(), task.GetStep(), errdefs.ErrNotImplemented)
}

// The wire steps as hostops requests, shared by Execute and admit.

func lunRequest(s *stowagev1.LunStep) hostops.LUNRequest {
	return hostops.LUNRequest{Target: hostops.ISCSITargetFromProto(s.GetTarget()), Key: s.GetKey(), Size: s.GetSizeBytes()}
}

func prepareRoot(s *stowagev1.PrepareStoreStep) hostops.StoreRoot {
	return hostops.StoreRoot{ID: s.GetStoreId(), Path: s.GetPath(), Subdirs: s.GetSubdirs()}
}

func probeRoot(s *stowagev1.ProbeStoreStep) hostops.StoreRoot {
	return hostops.StoreRoot{ID: s.GetStoreId(), Path: s.GetPath()}
}

func releaseRoot(s *stowagev1.ReleaseStoreStep) hostops.StoreRoot {
	return hostops.StoreRoot{ID: s.GetStoreId(), Path: s.GetPath(), Subdirs: s.GetSubdirs()}
}

func fetchRequest(r *stowagev1.FetchImageStep) hostops.FetchRequest {
	return hostops.FetchRequest{Source: r.GetSource(), Dest: hostops.RefFromProto(r.GetDest()),
		Format: hostops.FormatFromProto(r.GetFormat()), Checksum: r.GetChecksum()}
}

func copyRequest(r *stowagev1.CopyImageStep) hostops.CopyRequest {
	return hostops.CopyRequest{Source: drivers.URI(r.GetSource()), SourceFormat: hostops.FormatFromProto(r.GetSourceFormat()),
		Dest: hostops.RefFromProto(r.GetDest()), Format: hostops.FormatFromProto(r.GetFormat()), Flatten: r.GetFlatten(),
		DestURI: drivers.URI(r.GetDestUri()), DestIsZero: r.GetDestIsZero(),
		Backing: hostops.RefFromProto(r.GetBacking()), BackingFormat: hostops.FormatFromProto(r.GetBackingFormat())}
}

func cloneRequest(r *stowagev1.CloneImageStep) hostops.CloneRequest {
	return hostops.CloneRequest{Base: hostops.RefFromProto(r.GetBase()), BaseFormat: hostops.FormatFromProto(r.GetBaseFormat()),
		Dest: hostops.RefFromProto(r.GetDest()), Mode: hostops.CloneModeFromProto(r.GetMode()),
		Format: hostops.FormatFromProto(r.GetFormat()), Size: r.GetSizeBytes()}
}

func snapshotRequest(vol, snap *stowagev1.ObjectRef, f stowagev1.ImageFormat) hostops.SnapshotRequest {
	return hostops.SnapshotRequest{Volume: hostops.RefFromProto(vol), Snapshot: hostops.RefFromProto(snap), Format: hostops.FormatFromProto(f)}
}

// newBacking is a rebase's new backing image (zero: standalone).
func newBacking(r *stowagev1.RebaseImageStep) hostops.Ref {
	if r.GetNewBacking() == nil {
		return hostops.Ref{}
	}
	return hostops.RefFromProto(r.GetNewBacking())
}

func backupRequest(r *stowagev1.BackupImageStep) hostops.BackupRequest {
	return hostops.BackupRequest{Source: hostops.RefFromProto(r.GetSource()), SourceFormat: hostops.FormatFromProto(r.GetSourceFormat()),
		Chunks: hostops.ChunkStoreFromProto(r.GetChunks()), Manifest: r.GetManifest(), ParentManifest: r.GetParentManifest(), ChunkSize: r.GetChunkSize(),
		SourceURI: drivers.URI(r.GetSourceUri()), ChangedKnown: r.GetChangedKnown(), Changed: hostops.ExtentsFromProto(r.GetChanged())}
}

func restoreRequest(r *stowagev1.RestoreImageStep) hostops.RestoreRequest {
	return hostops.RestoreRequest{Chunks: hostops.ChunkStoreFromProto(r.GetChunks()), Manifest: r.GetManifest(),
		Dest: hostops.RefFromProto(r.GetDest()), Format: hostops.FormatFromProto(r.GetFormat()),
		DestURI: drivers.URI(r.GetDestUri()), DestIsZero: r.GetDestIsZero()}
}

// admit checks everything task names, as the step itself will (store
// roots, Refs, sources, chunk stores), before the task is journalled or
// started: a refused task is answered with the error's class as the RPC's
// code (permission_denied for a path outside the stores the agent serves)
// and leaves no trace. The step checks again when it runs, since a store
// can be released in between.
func (h *LocalHost) admit(task *stowagev1.Task) error {
	ref := hostops.RefFromProto
	var err error
	switch s := task.GetStep().(type) {
	case *stowagev1.Task_PrepareStore:
		r := prepareRoot(s.PrepareStore)
		err = h.res.CheckRoot(r.ID, r.Path)
	case *stowagev1.Task_ProbeStore:
		r := probeRoot(s.ProbeStore)
		err = h.res.CheckRoot(r.ID, r.Path)
	case *stowagev1.Task_ReleaseStore:
		r := releaseRoot(s.ReleaseStore)
		err = h.res.CheckRoot(r.ID, r.Path)
	case *stowagev1.Task_CreateImage:
		_, err = h.object(ref(s.CreateImage.GetRef()))
	case *stowagev1.Task_DeleteObject:
		_, err = h.object(ref(s.DeleteObject.GetRef()))
	case *stowagev1.Task_ListObjects:
		_, err = h.object(ref(s.ListObjects.GetDir()))
	case *stowagev1.Task_StatObject:
		_, err = h.source(ref(s.StatObject.GetRef()))
	case *stowagev1.Task_FetchImage:
		r := fetchRequest(s.FetchImage)
		var file *os.File
		if file, err = h.fetchSource(r.Source); err == nil {
			if file != nil {
				file.Close() // opened to check it; the step opens it again
			}
			_, err = h.object(r.Dest)
		}
	case *stowagev1.Task_CopyImage:
		r := copyRequest(s.CopyImage)
		if _, err = h.copySource(r.Source); err == nil {
			if r.DestURI != "" {
				err = checkGrantedURI(r.DestURI)
			} else {
				_, err = h.object(r.Dest)
			}
		}
		if err == nil && r.Backing != (hostops.Ref{}) {
			_, err = h.copyBacking(r)
		}
	case *stowagev1.Task_CloneImage:
		r := cloneRequest(s.CloneImage)
		if _, err = h.cloneBase(r.Base, r.Dest); err == nil {
			_, err = h.object(r.Dest)
		}
	case *stowagev1.Task_InspectImage:
		_, err = h.source(ref(s.InspectImage.GetRef()))
	case *stowagev1.Task_ResizeImage:
		_, err = h.object(ref(s.ResizeImage.GetRef()))
	case *stowagev1.Task_SnapshotImage:
		r := s.SnapshotImage
		_, _, err = h.snapshotPair(snapshotRequest(r.GetVolume(), r.GetSnapshot(), r.GetFormat()))
	case *stowagev1.Task_RevertImage:
		r := s.RevertImage
		_, _, err = h.snapshotPair(snapshotRequest(r.GetVolume(), r.GetSnapshot(), r.GetFormat()))
	case *stowagev1.Task_RebaseImage:
		_, _, err = h.rebasePair(ref(s.RebaseImage.GetRef()), newBacking(s.RebaseImage))
	case *stowagev1.Task_BackupImage:
		r := backupRequest(s.BackupImage)
		if r.SourceURI != "" {
			err = checkGrantedURI(r.SourceURI)
		} else {
			_, err = h.object(r.Source)
		}
		if err == nil {
			names := []string{r.Manifest}
			if r.ParentManifest != "" {
				names = append(names, r.ParentManifest)
			}
			_, _, err = h.backupPaths(r.Chunks, names...)
		}
	case *stowagev1.Task_RestoreImage:
		r := restoreRequest(s.RestoreImage)
		if _, _, err = h.backupPaths(r.Chunks, r.Manifest); err == nil {
			if r.DestURI != "" {
				err = checkGrantedURI(r.DestURI)
			} else {
				_, err = h.object(r.Dest)
			}
		}
	case *stowagev1.Task_DeleteBackup:
		r := s.DeleteBackup
		_, _, err = h.backupPaths(hostops.ChunkStoreFromProto(r.GetChunks()), r.GetManifest())
	case *stowagev1.Task_CollectChunks:
		var cp chunkPaths
		if cp, err = h.chunkStore(hostops.ChunkStoreFromProto(s.CollectChunks.GetChunks())); err == nil && cp.s3 == nil {
			_, err = h.object(cp.manifests)
		}
	case *stowagev1.Task_Export:
		_, err = h.object(ref(s.Export.GetRef()))
	case *stowagev1.Task_ExportNbd:
		if s.ExportNbd.GetRbd() == nil {
			_, err = h.object(ref(s.ExportNbd.GetRef()))
		}
	case *stowagev1.Task_EnsureIscsiTarget:
		err = h.storeServed(hostops.ISCSITargetFromProto(s.EnsureIscsiTarget.GetTarget()))
	case *stowagev1.Task_DeleteIscsiTarget:
		err = h.storeServed(hostops.ISCSITargetFromProto(s.DeleteIscsiTarget.GetTarget()))
	case *stowagev1.Task_ConnectLun:
		err = checkISCSIURL(drivers.URI(s.ConnectLun.GetUri()))
	case *stowagev1.Task_DisconnectLun:
		err = checkISCSIURL(drivers.URI(s.DisconnectLun.GetUri()))
	case *stowagev1.Task_ListLuns:
		err = h.storeServed(hostops.ISCSITargetFromProto(s.ListLuns.GetTarget()))
	case *stowagev1.Task_CreateLun:
		_, err = h.lunPath(lunRequest(s.CreateLun))
	case *stowagev1.Task_DeleteLun:
		_, err = h.lunPath(lunRequest(s.DeleteLun))
	case *stowagev1.Task_ResizeLun:
		_, err = h.lunPath(lunRequest(s.ResizeLun))
	}
	if err != nil && !errors.Is(err, errdefs.ErrPermissionDenied) {
		// Only refusals are answered before the journal; any other problem
		// (a store root not mounted, a bad argument) is the step's outcome,
		// journalled like every other.
		return nil
	}
	return err
}

// ttl is an export's lifetime from the wire (0 or less: no expiry).
func ttl(seconds int64) time.Duration { return time.Duration(max(seconds, 0)) * time.Second }

package hostops

import (
	"context"
	"time"

	"github.com/stowage/stowage/drivers"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// The methods of Remote: one task each (remote.go runs them).

func (e *Remote) probe(ctx context.Context, task *stowagev1.Task) (StoreProbe, error) {
	res, err := e.run(ctx, task, nil)
	if err != nil {
		return StoreProbe{}, err
	}
	return ProbeFromProto(res.GetProbe()), nil
}

// PrepareStore implements Stores.
func (e *Remote) PrepareStore(ctx context.Context, root StoreRoot) (StoreProbe, error) {
	return e.probe(ctx, &stowagev1.Task{Step: &stowagev1.Task_PrepareStore{PrepareStore: &stowagev1.PrepareStoreStep{
		Path: root.Path, StoreId: root.ID, Subdirs: root.Subdirs, Claim: true,
	}}})
}

// ProbeStore implements Stores.
func (e *Remote) ProbeStore(ctx context.Context, root StoreRoot) (StoreProbe, error) {
	return e.probe(ctx, &stowagev1.Task{Step: &stowagev1.Task_ProbeStore{ProbeStore: &stowagev1.ProbeStoreStep{
		Path: root.Path, StoreId: root.ID,
	}}})
}

// ReleaseStore implements Stores.
func (e *Remote) ReleaseStore(ctx context.Context, root StoreRoot) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_ReleaseStore{ReleaseStore: &stowagev1.ReleaseStoreStep{
		Path: root.Path, StoreId: root.ID, Subdirs: root.Subdirs,
	}}}, nil)
	return err
}

// CreateImage implements Objects.
func (e *Remote) CreateImage(ctx context.Context, ref Ref, format drivers.Format, size int64) (FileInfo, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_CreateImage{CreateImage: &stowagev1.CreateImageStep{
		Ref: RefToProto(ref), Format: FormatToProto(format), SizeBytes: size,
	}}}, nil)
	if err != nil {
		return FileInfo{}, err
	}
	return FileFromProto(res.GetFile()), nil
}

// DeleteObject implements Objects.
func (e *Remote) DeleteObject(ctx context.Context, ref Ref) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_DeleteObject{DeleteObject: &stowagev1.DeleteObjectStep{Ref: RefToProto(ref)}}}, nil)
	return err
}

// ListObjects implements Objects.
func (e *Remote) ListObjects(ctx context.Context, dir Ref) ([]FileInfo, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_ListObjects{ListObjects: &stowagev1.ListObjectsStep{Dir: RefToProto(dir)}}}, nil)
	if err != nil {
		return nil, err
	}
	out := make([]FileInfo, 0, len(res.GetFiles().GetFiles()))
	for _, f := range res.GetFiles().GetFiles() {
		out = append(out, FileFromProto(f))
	}
	return out, nil
}

// StatObject implements Objects.
func (e *Remote) StatObject(ctx context.Context, ref Ref) (FileInfo, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_StatObject{StatObject: &stowagev1.StatObjectStep{Ref: RefToProto(ref)}}}, nil)
	if err != nil {
		return FileInfo{}, err
	}
	return FileFromProto(res.GetFile()), nil
}

// image runs a step whose result is an image.
func (e *Remote) image(ctx context.Context, task *stowagev1.Task, progress drivers.Progress) (ImageInfo, error) {
	res, err := e.run(ctx, task, progress)
	if err != nil {
		return ImageInfo{}, err
	}
	return ImageInfoFromProto(res.GetImage()), nil
}

// backup runs a step whose result is a backup.
func (e *Remote) backup(ctx context.Context, task *stowagev1.Task, progress drivers.Progress) (BackupInfo, error) {
	res, err := e.run(ctx, task, progress)
	if err != nil {
		return BackupInfo{}, err
	}
	return BackupInfoFromProto(res.GetBackup()), nil
}

// uri runs a step whose result is a URI.
func (e *Remote) uri(ctx context.Context, task *stowagev1.Task) (drivers.URI, error) {
	res, err := e.run(ctx, task, nil)
	if err != nil {
		return "", err
	}
	return drivers.URI(res.GetUri()), nil
}

// FetchImage implements Images.
func (e *Remote) FetchImage(ctx context.Context, req FetchRequest, progress drivers.Progress) (ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_FetchImage{FetchImage: &stowagev1.FetchImageStep{
		Source: req.Source, Dest: RefToProto(req.Dest), Format: FormatToProto(req.Format), Checksum: req.Checksum,
	}}}, progress)
}

// CopyImage implements Images.
func (e *Remote) CopyImage(ctx context.Context, req CopyRequest, progress drivers.Progress) (ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_CopyImage{CopyImage: &stowagev1.CopyImageStep{
		Source: string(req.Source), SourceFormat: FormatToProto(req.SourceFormat), Dest: RefToProto(req.Dest),
		Format: FormatToProto(req.Format), Flatten: req.Flatten, DestUri: string(req.DestURI), DestIsZero: req.DestIsZero,
		Backing: backingToProto(req.Backing), BackingFormat: FormatToProto(req.BackingFormat),
	}}}, progress)
}

// CloneImage implements Images.
func (e *Remote) CloneImage(ctx context.Context, req CloneRequest, progress drivers.Progress) (ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_CloneImage{CloneImage: &stowagev1.CloneImageStep{
		Base: RefToProto(req.Base), BaseFormat: FormatToProto(req.BaseFormat), Dest: RefToProto(req.Dest), Mode: CloneModeToProto(req.Mode),
		Format: FormatToProto(req.Format), SizeBytes: req.Size,
	}}}, progress)
}

// InspectImage implements Images.
func (e *Remote) InspectImage(ctx context.Context, ref Ref, format drivers.Format) (ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_InspectImage{InspectImage: &stowagev1.InspectImageStep{
		Ref: RefToProto(ref), Format: FormatToProto(format),
	}}}, nil)
}

// ResizeImage implements Images.
func (e *Remote) ResizeImage(ctx context.Context, ref Ref, format drivers.Format, size int64) (ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_ResizeImage{ResizeImage: &stowagev1.ResizeImageStep{
		Ref: RefToProto(ref), Format: FormatToProto(format), SizeBytes: size,
	}}}, nil)
}

// SnapshotImage implements Images.
func (e *Remote) SnapshotImage(ctx context.Context, req SnapshotRequest) (SnapshotInfo, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_SnapshotImage{SnapshotImage: &stowagev1.SnapshotImageStep{
		Volume: RefToProto(req.Volume), Snapshot: RefToProto(req.Snapshot), Format: FormatToProto(req.Format),
	}}}, nil)
	if err != nil {
		return SnapshotInfo{}, err
	}
	return SnapshotInfoFromProto(res.GetSnapshot()), nil
}

// RevertImage implements Images.
func (e *Remote) RevertImage(ctx context.Context, req SnapshotRequest) (ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_RevertImage{RevertImage: &stowagev1.RevertImageStep{
		Volume: RefToProto(req.Volume), Snapshot: RefToProto(req.Snapshot), Format: FormatToProto(req.Format),
	}}}, nil)
}

// RebaseImage implements Images.
func (e *Remote) RebaseImage(ctx context.Context, ref, newBacking Ref, backingFormat drivers.Format) (ImageInfo, error) {
	step := &stowagev1.RebaseImageStep{Ref: RefToProto(ref), BackingFormat: FormatToProto(backingFormat)}
	if !newBacking.IsZero() {
		step.NewBacking = RefToProto(newBacking)
	}
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_RebaseImage{RebaseImage: step}}, nil)
}

// BackupImage implements Backups.
func (e *Remote) BackupImage(ctx context.Context, req BackupRequest, progress drivers.Progress) (BackupInfo, error) {
	return e.backup(ctx, &stowagev1.Task{Step: &stowagev1.Task_BackupImage{BackupImage: &stowagev1.BackupImageStep{
		Source: RefToProto(req.Source), SourceFormat: FormatToProto(req.SourceFormat), Chunks: ChunkStoreToProto(req.Chunks),
		Manifest: req.Manifest, ParentManifest: req.ParentManifest, ChunkSize: req.ChunkSize, SourceUri: string(req.SourceURI),
		ChangedKnown: req.ChangedKnown, Changed: ExtentsToProto(req.Changed),
	}}}, progress)
}

// ExtentsToProto is the wire form of byte ranges.
func ExtentsToProto(xs []drivers.Extent) []*stowagev1.ByteRange {
	if len(xs) == 0 {
		return nil
	}
	out := make([]*stowagev1.ByteRange, len(xs))
	for i, x := range xs {
		out[i] = &stowagev1.ByteRange{Offset: x.Offset, Length: x.Length}
	}
	return out
}

// ExtentsFromProto is ExtentsToProto's inverse.
func ExtentsFromProto(ps []*stowagev1.ByteRange) []drivers.Extent {
	if len(ps) == 0 {
		return nil
	}
	out := make([]drivers.Extent, len(ps))
	for i, p := range ps {
		out[i] = drivers.Extent{Offset: p.GetOffset(), Length: p.GetLength()}
	}
	return out
}

// RestoreImage implements Backups.
func (e *Remote) RestoreImage(ctx context.Context, req RestoreRequest, progress drivers.Progress) (ImageInfo, error) {
	return e.image(ctx, &stowagev1.Task{Step: &stowagev1.Task_RestoreImage{RestoreImage: &stowagev1.RestoreImageStep{
		Chunks: ChunkStoreToProto(req.Chunks), Manifest: req.Manifest, Dest: RefToProto(req.Dest), Format: FormatToProto(req.Format),
		DestUri: string(req.DestURI), DestIsZero: req.DestIsZero,
	}}}, progress)
}

// DeleteBackup implements Backups.
func (e *Remote) DeleteBackup(ctx context.Context, req DeleteBackupRequest) (BackupInfo, error) {
	return e.backup(ctx, &stowagev1.Task{Step: &stowagev1.Task_DeleteBackup{DeleteBackup: &stowagev1.DeleteBackupStep{
		Chunks: ChunkStoreToProto(req.Chunks), Manifest: req.Manifest,
	}}}, nil)
}

// CollectChunks implements Backups.
func (e *Remote) CollectChunks(ctx context.Context, req CollectChunksRequest) (CollectInfo, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_CollectChunks{CollectChunks: &stowagev1.CollectChunksStep{
		Chunks: ChunkStoreToProto(req.Chunks),
	}}}, nil)
	if err != nil {
		return CollectInfo{}, err
	}
	return CollectInfoFromProto(res.GetCollect()), nil
}

// Export implements Exports.
func (e *Remote) Export(ctx context.Context, ref Ref, ttl time.Duration) (drivers.URI, error) {
	return e.uri(ctx, &stowagev1.Task{Step: &stowagev1.Task_Export{Export: &stowagev1.ExportStep{Ref: RefToProto(ref), TtlSeconds: TTLToProto(ttl)}}})
}

// Unexport implements Exports.
func (e *Remote) Unexport(ctx context.Context, uri drivers.URI) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_Unexport{Unexport: &stowagev1.UnexportStep{Uri: string(uri)}}}, nil)
	return err
}

// ExportNBD implements Exports.
func (e *Remote) ExportNBD(ctx context.Context, req NBDExportRequest) (drivers.URI, error) {
	return e.uri(ctx, &stowagev1.Task{Step: &stowagev1.Task_ExportNbd{ExportNbd: &stowagev1.ExportNbdStep{
		Ref: RefToProto(req.Ref), Format: FormatToProto(req.Format), ReadOnly: req.ReadOnly, TtlSeconds: TTLToProto(req.TTL), Rbd: RBDToProto(req.RBD),
	}}})
}

// RBDToProto is the wire form of an RBD image (nil: none).
func RBDToProto(r *RBDImage) *stowagev1.RbdImage {
	if r == nil {
		return nil
	}
	return &stowagev1.RbdImage{Pool: r.Pool, Image: r.Image, Snapshot: r.Snapshot, User: r.User, Mons: r.Mons, Key: r.Key}
}

// RBDFromProto is RBDToProto's inverse.
func RBDFromProto(p *stowagev1.RbdImage) *RBDImage {
	if p == nil {
		return nil
	}
	return &RBDImage{Pool: p.GetPool(), Image: p.GetImage(), Snapshot: p.GetSnapshot(), User: p.GetUser(), Mons: p.GetMons(), Key: p.GetKey()}
}

// UnexportNBD implements Exports.
func (e *Remote) UnexportNBD(ctx context.Context, uri drivers.URI) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_UnexportNbd{UnexportNbd: &stowagev1.UnexportNbdStep{Uri: string(uri)}}}, nil)
	return err
}

// TemplateShower is the optional role of a host whose template mount can be
// told to show one template at once (Remote implements it): a lazy volume's
// create uses it so as not to wait for the next heartbeat to carry the
// mount's new desired set.
type TemplateShower interface {
	// ShowTemplate returns once the host's template mount lists spec's
	// template (ErrUnavailable when the host has no mount, the cache
	// process's error when it cannot add the template).
	ShowTemplate(ctx context.Context, spec *stowagev1.CacheSpec) error
}

var _ TemplateShower = (*Remote)(nil)

// ShowTemplate implements TemplateShower.
func (e *Remote) ShowTemplate(ctx context.Context, spec *stowagev1.CacheSpec) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_ShowTemplate{ShowTemplate: &stowagev1.ShowTemplateStep{Template: spec}}}, nil)
	return err
}

package hostfs

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sort"

	"github.com/stowage/stowage/datapath/chunkstore"
	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// BackupImage stores what the guest of the image at req.Source (opened as
// req.SourceFormat, never probed) sees into the chunk store req.ChunkDir
// (datapath/chunkstore) and writes the manifest req.Manifest. A raw source
// is read as its bytes, whatever they look like. A qcow2 chain, which must
// pass checkChain, is read as a flat disk by the copy engine's qcow2 reader
// (go-qcow2reader, through the backing files as recorded); an
// image that reader cannot read is converted to a raw staging file with
// qemu-img first. Holes and unallocated clusters are never read.
//
// With req.ParentManifest (the backup of the source's backing file, for a
// qcow2 snapshot in a chain), chunks that the source's top layer does not
// touch (qemu-img map: nothing allocated at depth 0) are taken from the
// parent manifest without reading. The manifest records the path it backed
// up (Manifest.Source), and the parent is trusted that way only when it
// names the source's backing file; any other parent saves writes (its
// chunks are in the store) but not reads. An existing manifest at req.Manifest is
// returned as it is (a retried step).
func (l *Local) BackupImage(ctx context.Context, req BackupRequest, progress drivers.Progress) (BackupInfo, error) {
	info, err := l.backupImage(ctx, req, progress)
	if err != nil {
		return BackupInfo{}, fmt.Errorf("back up %s to %s on host %s: %w", req.Source, req.Manifest, l.hostID, err)
	}
	return info, nil
}

func (l *Local) backupImage(ctx context.Context, req BackupRequest, progress drivers.Progress) (BackupInfo, error) {
	if _, err := l.existingPath(req.Source); err != nil {
		return BackupInfo{}, err
	}
	if _, err := declared("source", req.SourceFormat); err != nil {
		return BackupInfo{}, err
	}
	var parents []string
	if req.ParentManifest != "" {
		parents = append(parents, req.ParentManifest)
	}
	t, err := l.DirChunkTarget(req.ChunkDir, req.Manifest, parents...)
	if err != nil {
		return BackupInfo{}, err
	}
	info, err := l.BackupInto(ctx, t, req.Source, req.SourceFormat, req.ChunkSize, progress)
	info.Manifest = req.Manifest
	return info, err
}

// DirChunkTarget opens the chunk directory chunkDir for backup manifest
// (a path of this host, its directory made) with its parent's (optional,
// existing).
func (l *Local) DirChunkTarget(chunkDir, manifest string, parent ...string) (ChunkTarget, error) {
	chunks, err := l.existingPath(chunkDir)
	if err != nil {
		return ChunkTarget{}, err
	}
	m, err := l.objectPath(manifest)
	if err != nil {
		return ChunkTarget{}, err
	}
	p := ""
	if len(parent) > 0 && parent[0] != "" {
		if p, err = l.existingPath(parent[0]); err != nil {
			return ChunkTarget{}, err
		}
	}
	if err := l.makeDir(m, manifest); err != nil {
		return ChunkTarget{}, err
	}
	if err := l.makeDir(filepath.Join(chunks, "x"), filepath.Join(chunkDir, "x")); err != nil {
		return ChunkTarget{}, err
	}
	store, err := chunkstore.Open(chunks)
	if err != nil {
		return ChunkTarget{}, err
	}
	return ChunkTarget{Store: store, Manifest: m, Parent: p, StageNear: m}, nil
}

// ChunkTarget is where a backup goes or comes from: an open chunk store
// (a directory's or an S3 prefix's), the backup's manifest name in it (a
// path for a directory store) and its parent's, and a local file next to
// which staging files go (a flattened qcow2, on a filesystem with room).
type ChunkTarget struct {
	Store     *chunkstore.Store
	Manifest  string
	Parent    string
	StageNear string
}

// BackupInto backs the image at source (a path on this host, opened as
// sourceFormat) up into t (see BackupImage). A manifest already at
// t.Manifest is returned as it is (a retried step).
func (l *Local) BackupInto(ctx context.Context, t ChunkTarget, source string, sourceFormat drivers.Format, chunkSize int64, progress drivers.Progress) (BackupInfo, error) {
	src, err := l.existingPath(source)
	if err != nil {
		return BackupInfo{}, err
	}
	srcFormat, err := declared("source", sourceFormat)
	if err != nil {
		return BackupInfo{}, err
	}
	parent, unlock, done, err := l.startBackup(ctx, t)
	if err != nil || done != nil {
		return deref(done), err
	}
	defer unlock()
	si, err := l.openDeclared(ctx, src, srcFormat, false)
	if err != nil {
		return BackupInfo{}, err
	}
	opts := chunkstore.BackupOptions{ChunkSize: chunkSize, Parent: parent, Progress: progress, Source: source}
	// The parent's chunks stand in for unread ranges only when the parent
	// is the backup of this image's backing file: anything else would put
	// another image's data into this backup. Otherwise it still saves
	// writing (chunks already stored), not reading.
	if parent != nil && srcFormat == qemuimg.FormatQCOW2 && si.BackingFilename != "" &&
		parent.Source != "" && parent.Source == l.callerPath(backingOf(si)) {
		unchanged, err := l.unchangedSinceBacking(ctx, src)
		if err != nil {
			return BackupInfo{}, err
		}
		opts.ParentUnchanged = unchanged
	}

	stageNear := t.StageNear
	if stageNear == "" {
		stageNear = src
	}
	srcStream, err := stream.OpenSource(ctx, src, l.peerSource(srcFormat))
	if errors.Is(err, errdefs.ErrNotImplemented) {
		// The Go qcow2 reader cannot read this image: flatten it with
		// qemu-img (-f as declared) next to the manifest.
		flat := stagePath(stageNear, "convert")
		removeStage(flat)
		defer removeStage(flat)
		if err := l.qemu.Convert(ctx, src, flat, qemuimg.FormatRaw, qemuimg.SourceFormat(srcFormat), qemuimg.MinSparse("4k")); err != nil {
			return BackupInfo{}, err
		}
		srcStream, err = stream.OpenSource(ctx, flat, stream.SourceOptions{Format: qemuimg.FormatRaw})
	}
	if err != nil {
		return BackupInfo{}, err
	}
	defer srcStream.Close()
	m, st, err := t.Store.Backup(ctx, srcStream, t.Manifest, opts)
	if err != nil {
		return BackupInfo{}, err
	}
	info := manifestInfo(t.Manifest, m)
	info.NewChunks, info.NewBytes, info.ReusedBytes, info.ReadBytes = st.NewChunks, st.NewBytes, st.ReusedBytes, st.ReadBytes
	return info, nil
}

// BackupFromURI backs up the raw bytes an export serves (uri: nbd(s)://,
// an RBD snapshot's) into t, reading them as they are chunked. With a
// parent and changedKnown, the chunks outside changed (sorted; every range
// in which the source may differ from the parent's image) are the
// parent's, not read. A manifest already at t.Manifest is returned as it
// is (a retried step).
func (l *Local) BackupFromURI(ctx context.Context, t ChunkTarget, uri string, chunkSize int64, changedKnown bool, changed []drivers.Extent, progress drivers.Progress) (BackupInfo, error) {
	parent, unlock, done, err := l.startBackup(ctx, t)
	if err != nil || done != nil {
		return deref(done), err
	}
	defer unlock()
	src, err := stream.OpenSource(ctx, uri, l.peerSource(qemuimg.FormatRaw))
	if err != nil {
		return BackupInfo{}, err
	}
	defer src.Close()
	opts := chunkstore.BackupOptions{ChunkSize: chunkSize, Parent: parent, Progress: progress}
	if parent != nil && changedKnown {
		opts.ParentUnchanged = outside(changed)
	}
	m, st, err := t.Store.Backup(ctx, src, t.Manifest, opts)
	if err != nil {
		return BackupInfo{}, fmt.Errorf("back up %s to %s on host %s: %w", redact.URL(uri), t.Manifest, l.hostID, err)
	}
	info := manifestInfo(t.Manifest, m)
	info.NewChunks, info.NewBytes, info.ReusedBytes, info.ReadBytes = st.NewChunks, st.NewBytes, st.ReusedBytes, st.ReadBytes
	return info, nil
}

// startBackup reads t's parent manifest (if any) and takes t.Manifest's
// lock (unlock releases it); done is the backup when its manifest already
// exists (a retried step), and the lock is then released.
func (l *Local) startBackup(ctx context.Context, t ChunkTarget) (parent *chunkstore.Manifest, unlock func(), done *BackupInfo, err error) {
	if t.Parent != "" {
		if parent, err = t.Store.Manifest(ctx, t.Parent); err != nil {
			return nil, nil, nil, fmt.Errorf("parent: %w", err)
		}
	}
	if unlock, err = l.locks.lock(ctx, t.Manifest); err != nil {
		return nil, nil, nil, err
	}
	m, err := t.Store.Manifest(ctx, t.Manifest)
	switch {
	case err == nil:
		unlock()
		info := manifestInfo(t.Manifest, m)
		return nil, nil, &info, nil
	case !errors.Is(err, errdefs.ErrNotFound):
		unlock()
		return nil, nil, nil, fmt.Errorf("%s exists and is not a manifest (%v): %w", t.Manifest, err, errdefs.ErrAlreadyExists)
	}
	return parent, unlock, nil, nil
}

func deref(b *BackupInfo) BackupInfo {
	if b == nil {
		return BackupInfo{}
	}
	return *b
}

// outside returns a function telling whether [off, off+n) misses every
// range of changed (sorted by offset, not overlapping).
func outside(changed []drivers.Extent) func(off, n int64) bool {
	return func(off, n int64) bool {
		// the first range ending after off
		i := sort.Search(len(changed), func(i int) bool { return changed[i].Offset+changed[i].Length > off })
		return i == len(changed) || changed[i].Offset >= off+n
	}
}

// unchangedSinceBacking returns a function telling whether a range of the
// qcow2 at host is untouched by its top layer (reads as its backing file).
func (l *Local) unchangedSinceBacking(ctx context.Context, host string) (func(off, n int64) bool, error) {
	m, err := l.qemu.Map(ctx, host, qemuimg.FormatQCOW2)
	if err != nil {
		return nil, err
	}
	var changed [][2]int64 // sorted, [start, end)
	for _, e := range m {
		if e.Depth == 0 && e.Present {
			changed = append(changed, [2]int64{e.Start, e.Start + e.Length})
		}
	}
	return func(off, n int64) bool {
		// the first changed range ending after off
		i := sort.Search(len(changed), func(i int) bool { return changed[i][1] > off })
		return i == len(changed) || changed[i][0] >= off+n
	}, nil
}

func manifestInfo(path string, m *chunkstore.Manifest) BackupInfo {
	info := BackupInfo{Manifest: path, Size: m.Size, Chunks: int64(len(m.Chunks))}
	for _, c := range m.Chunks {
		if c == chunkstore.ZeroChunk {
			info.ZeroChunks++
		}
	}
	return info
}

// RestoreImage rebuilds the image of a backup at req.Dest in req.Format
// (raw when empty): the chunks are verified and written into a fresh sparse
// staging file (zero chunks and zero blocks stay holes); a qcow2 is then
// converted from it with qemu-img. A bad chunk is errdefs.ErrDataLoss and
// leaves nothing behind. An image of that format and size already at
// req.Dest is returned as it is.
func (l *Local) RestoreImage(ctx context.Context, req RestoreRequest, progress drivers.Progress) (ImageInfo, error) {
	info, err := l.restoreImage(ctx, req, progress)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("restore %s to %s on host %s: %w", req.Manifest, req.Dest, l.hostID, err)
	}
	return info, nil
}

func (l *Local) restoreImage(ctx context.Context, req RestoreRequest, progress drivers.Progress) (ImageInfo, error) {
	manifest, err := l.existingPath(req.Manifest)
	if err != nil {
		return ImageInfo{}, err
	}
	chunks, err := l.existingPath(req.ChunkDir)
	if err != nil {
		return ImageInfo{}, err
	}
	store, err := chunkstore.Open(chunks)
	if err != nil {
		return ImageInfo{}, err
	}
	return l.RestoreFrom(ctx, ChunkTarget{Store: store, Manifest: manifest}, req.Dest, req.Format, progress)
}

// RestoreFrom rebuilds the image of backup t.Manifest of t.Store at dest
// (a path on this host) in format (see RestoreImage).
func (l *Local) RestoreFrom(ctx context.Context, t ChunkTarget, dest string, format drivers.Format, progress drivers.Progress) (ImageInfo, error) {
	final, err := l.objectPath(dest)
	if err != nil {
		return ImageInfo{}, err
	}
	switch format {
	case "":
		format = drivers.FormatRaw
	case drivers.FormatRaw, drivers.FormatQCOW2:
	default:
		return ImageInfo{}, fmt.Errorf("format %q is not raw or qcow2: %w", format, errdefs.ErrInvalid)
	}
	m, err := t.Store.Manifest(ctx, t.Manifest)
	if err != nil {
		return ImageInfo{}, err
	}
	if format == drivers.FormatQCOW2 && m.Size%qemuimg.SectorSize != 0 {
		return ImageInfo{}, fmt.Errorf("size %d is not a multiple of %d, as a qcow2 needs: %w", m.Size, qemuimg.SectorSize, errdefs.ErrInvalid)
	}
	unlock, err := l.lockDest(ctx, final, dest)
	if err != nil {
		return ImageInfo{}, err
	}
	defer unlock()
	if ok, err := exists(final); err != nil {
		return ImageInfo{}, err
	} else if ok {
		info, qi, err := l.imageInfo(ctx, dest, final, string(format), qemuimg.ForceShare())
		if err != nil || qi.VirtualSize != m.Size || qi.BackingFilename != "" {
			return ImageInfo{}, fmt.Errorf("%s exists and is not this backup's image: %w", dest, errdefs.ErrAlreadyExists)
		}
		info.Method = "existing"
		return info, nil
	}
	store := t.Store

	raw := stagePath(final, "restore-raw")
	if format == drivers.FormatRaw {
		raw = stagePath(final, "restore")
	}
	removeStage(raw)
	defer removeStage(raw)
	sink, err := stream.OpenSink(ctx, raw, m.Size, stream.SinkOptions{})
	if err != nil {
		return ImageInfo{}, err
	}
	if err := store.Restore(ctx, m, sink, chunkstore.RestoreOptions{Progress: progress}); err != nil {
		sink.Abort()
		return ImageInfo{}, err
	}
	if err := sink.Commit(ctx); err != nil {
		return ImageInfo{}, err
	}
	stage, method := raw, "chunks"
	if format == drivers.FormatQCOW2 {
		stage = stagePath(final, "restore")
		removeStage(stage)
		defer removeStage(stage)
		if err := l.qemu.Convert(ctx, raw, stage, qemuimg.FormatQCOW2, qemuimg.SourceFormat(qemuimg.FormatRaw), qemuimg.MinSparse("4k")); err != nil {
			return ImageInfo{}, err
		}
		method = "chunks+qemu-img convert"
	}
	info, err := l.publishImage(ctx, stage, final, dest, string(format))
	if err != nil {
		return ImageInfo{}, err
	}
	info.Method = method
	return info, nil
}

// RestoreToURI writes the image of backup t.Manifest of t.Store into the
// writable export uri (nbd:// or nbds://, an RBD image's), in place, as
// raw bytes, every chunk verified (errdefs.ErrDataLoss for a bad one:
// the export is then partly written, and its owner keeps it out of use).
// With zeroed (the destination reads as zeros) zero chunks and blocks are
// not written; otherwise they are zeroed.
func (l *Local) RestoreToURI(ctx context.Context, t ChunkTarget, uri string, zeroed bool, progress drivers.Progress) (ImageInfo, error) {
	m, err := t.Store.Manifest(ctx, t.Manifest)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("restore %s on host %s: %w", t.Manifest, l.hostID, err)
	}
	sink, err := stream.OpenSink(ctx, uri, m.Size, stream.SinkOptions{})
	if err != nil {
		return ImageInfo{}, fmt.Errorf("restore %s to %s on host %s: %w", t.Manifest, redact.URL(uri), l.hostID, err)
	}
	if zeroed {
		sink = zeroedSink{sink}
	}
	if err := t.Store.Restore(ctx, m, sink, chunkstore.RestoreOptions{Progress: progress}); err != nil {
		sink.Abort()
		return ImageInfo{}, fmt.Errorf("restore %s to %s on host %s: %w", t.Manifest, redact.URL(uri), l.hostID, err)
	}
	if err := sink.Commit(ctx); err != nil {
		return ImageInfo{}, fmt.Errorf("restore %s to %s on host %s: %w", t.Manifest, redact.URL(uri), l.hostID, err)
	}
	return ImageInfo{Format: drivers.FormatRaw, VirtualSize: m.Size, Method: "chunks into an nbd export"}, nil
}

// DeleteBackup removes the manifest req.Manifest and the chunks of
// req.ChunkDir that no other manifest in its directory uses. A missing
// manifest is not an error. The result describes the deleted backup
// (Manifest, Size, Chunks, ZeroChunks); BackupInfo has no field for what
// was freed.
func (l *Local) DeleteBackup(ctx context.Context, req DeleteBackupRequest) (BackupInfo, error) {
	info, err := l.deleteBackup(ctx, req)
	if err != nil {
		return BackupInfo{}, fmt.Errorf("delete backup %s on host %s: %w", req.Manifest, l.hostID, err)
	}
	return info, nil
}

func (l *Local) deleteBackup(ctx context.Context, req DeleteBackupRequest) (BackupInfo, error) {
	manifest, err := l.objectPath(req.Manifest)
	if err != nil {
		return BackupInfo{}, err
	}
	chunks, err := l.existingPath(req.ChunkDir)
	if err != nil {
		return BackupInfo{}, err
	}
	unlock, err := l.locks.lock(ctx, manifest)
	if err != nil {
		return BackupInfo{}, err
	}
	defer unlock()
	if ok, err := exists(manifest); err != nil || !ok {
		return BackupInfo{Manifest: req.Manifest}, err
	}
	store, err := chunkstore.Open(chunks)
	if err != nil {
		return BackupInfo{}, err
	}
	st, err := store.Delete(ctx, manifest)
	if err != nil {
		return BackupInfo{}, err
	}
	// NewChunks and NewBytes say what the delete freed (hostops.DeleteBackupRequest).
	return BackupInfo{Manifest: req.Manifest, Size: st.Size, Chunks: st.Chunks, ZeroChunks: st.ZeroChunks, NewChunks: st.RemovedChunks, NewBytes: st.RemovedBytes}, nil
}

// CollectChunks removes the chunks of req.ChunkDir that no manifest in
// req.ManifestDir refers to (what a backup killed before its manifest left
// behind), holding the chunk store's exclusive lock so that no backup
// writes meanwhile. A chunk directory that does not exist holds nothing to
// collect. A manifest that cannot be read, or a manifest directory that
// is missing while chunks may exist, is errdefs.ErrFailedPrecondition and
// nothing is removed.
func (l *Local) CollectChunks(ctx context.Context, req CollectChunksRequest) (CollectInfo, error) {
	info, err := l.collectChunks(ctx, req)
	if err != nil {
		return CollectInfo{}, fmt.Errorf("collect chunks of %s on host %s: %w", req.ChunkDir, l.hostID, err)
	}
	return info, nil
}

func (l *Local) collectChunks(ctx context.Context, req CollectChunksRequest) (CollectInfo, error) {
	chunks, err := l.existingPath(req.ChunkDir)
	if err != nil {
		return CollectInfo{}, err
	}
	manifests, err := l.existingPath(req.ManifestDir)
	if err != nil {
		return CollectInfo{}, err
	}
	if ok, err := exists(chunks); err != nil || !ok {
		return CollectInfo{}, err
	}
	if ok, err := exists(manifests); err != nil {
		return CollectInfo{}, err
	} else if !ok {
		return CollectInfo{}, fmt.Errorf("manifest directory %s is missing: every chunk would look unused; refusing to collect: %w", req.ManifestDir, errdefs.ErrFailedPrecondition)
	}
	store, err := chunkstore.Open(chunks)
	if err != nil {
		return CollectInfo{}, err
	}
	// Any name in the manifest directory: the store lists its siblings.
	st, err := store.Collect(ctx, filepath.Join(manifests, "collect"))
	if err != nil {
		return CollectInfo{}, err
	}
	return CollectInfoOf(st), nil
}

// CollectInfoOf reads a chunk store's CollectStats.
func CollectInfoOf(st chunkstore.CollectStats) CollectInfo {
	return CollectInfo{Manifests: st.Manifests, Chunks: st.Chunks, KeptChunks: st.KeptChunks,
		RemovedChunks: st.RemovedChunks, RemovedBytes: st.RemovedBytes}
}

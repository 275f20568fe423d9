package filesystem

import (
	"context"
	"fmt"
	"net"
	"net/http/httptest"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/agent/nbdexports"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// localHost is a hostops.Host for these tests only: it resolves a
// Ref{Store, Key} to <store directory>/<key> for the stores it prepared or
// probed, as the agent does, and runs the step on agent/hostfs's
// path-based Local, with an HTTP and an NBD export server on loopback.
//
// TODO(agent): when the agent's own hostops.Host over hostfs lands
// (agent.LocalHost or the like), use it here instead: this adapter is a
// stand-in so that the provider runs against real host work meanwhile.
type localHost struct {
	l     *hostfs.Local
	mount string // the template mount's directory, "" for none

	mu    sync.Mutex
	roots map[string]string // store id -> directory
}

var _ hostops.Host = (*localHost)(nil)

// newLocalHost returns host id on this machine, built with opts, serving
// exports until the test ends.
func newLocalHost(t *testing.T, id string, opts ...hostfs.Option) *localHost {
	t.Helper()
	x := exports.New()
	srv := httptest.NewServer(x)
	t.Cleanup(srv.Close)
	x.SetBaseURL(srv.URL)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	nx := nbdexports.New(nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = nx.Serve(ctx, ln) }()
	nx.SetAddress(ln.Addr().String())
	t.Cleanup(func() { cancel(); _ = nx.Close(); <-done })

	opts = append(opts, hostfs.WithExporter(x), hostfs.WithNBDExporter(nx))
	return &localHost{l: hostfs.New(id, opts...), roots: map[string]string{}}
}

// withMount gives h a template mount at dir.
func (h *localHost) withMount(dir string) *localHost {
	h.mount = dir
	h.l.SetBackingRoots(dir)
	return h
}

func (h *localHost) HostID() string { return h.l.HostID() }

func denied(ref hostops.Ref, why string) error {
	return fmt.Errorf("%s: %s: %w", ref, why, errdefs.ErrPermissionDenied)
}

// path resolves ref beneath the root of a store h serves.
func (h *localHost) path(ref hostops.Ref) (string, error) {
	if ref.Key == "" || !filepath.IsLocal(ref.Key) || filepath.Clean(ref.Key) != ref.Key {
		return "", denied(ref, "the key is not a clean relative path")
	}
	if ref.Store == hostops.TemplateMount {
		if h.mount == "" || strings.Contains(ref.Key, "/") {
			return "", denied(ref, "no such template in the mount")
		}
		return h.mount + "/" + ref.Key, nil
	}
	h.mu.Lock()
	root, ok := h.roots[ref.Store]
	h.mu.Unlock()
	if !ok {
		return "", denied(ref, "not a store this host serves")
	}
	return root + "/" + ref.Key, nil
}

// chunkPaths resolves a chunk store store://<id>/<dir> and a manifest name.
func (h *localHost) chunkPaths(cs hostops.ChunkStore, manifest string) (chunks, mpath string, err error) {
	ref, ok, err := hostops.ParseRef(cs.URI)
	if err != nil {
		return "", "", err
	}
	if !ok {
		return "", "", fmt.Errorf("chunk store %s: only store:// here: %w", cs.URI, errdefs.ErrNotImplemented)
	}
	dir, err := h.path(ref)
	if err != nil {
		return "", "", err
	}
	if manifest != "" && (strings.Contains(manifest, "/") || strings.HasPrefix(manifest, ".")) {
		return "", "", denied(ref, "manifest name "+manifest)
	}
	if manifest != "" {
		mpath = dir + "/manifests/" + manifest
	}
	return dir + "/chunks", mpath, nil
}

func probeOf(p drivers.StoreProbe) hostops.StoreProbe {
	return hostops.StoreProbe{CapacityBytes: p.CapacityBytes, AvailableBytes: p.AvailableBytes, Reflink: p.Reflink, FSType: p.FSType}
}

func (h *localHost) PrepareStore(ctx context.Context, r hostops.StoreRoot) (hostops.StoreProbe, error) {
	p, err := h.l.PrepareStore(ctx, r.Path, r.ID, r.Subdirs)
	if err != nil {
		return hostops.StoreProbe{}, err
	}
	h.mu.Lock()
	h.roots[r.ID] = r.Path
	h.mu.Unlock()
	return probeOf(p), nil
}

func (h *localHost) ProbeStore(ctx context.Context, r hostops.StoreRoot) (hostops.StoreProbe, error) {
	p, err := h.l.ProbeStore(ctx, r.Path, r.ID)
	if err != nil {
		return hostops.StoreProbe{}, err
	}
	h.mu.Lock()
	h.roots[r.ID] = r.Path
	h.mu.Unlock()
	return probeOf(p), nil
}

func (h *localHost) ReleaseStore(ctx context.Context, r hostops.StoreRoot) error {
	if err := h.l.ReleaseStore(ctx, r.Path, r.ID, r.Subdirs); err != nil {
		return err
	}
	h.mu.Lock()
	delete(h.roots, r.ID)
	h.mu.Unlock()
	return nil
}

func fileOf(key string, f drivers.FileInfo) hostops.FileInfo {
	return hostops.FileInfo{Key: key, Size: f.Size, AllocatedBytes: f.AllocatedBytes, IsDir: f.IsDir,
		ModifiedAt: f.ModifiedAt, Format: f.Format, VirtualSize: f.VirtualSize}
}

func imageOf(key string, i drivers.ImageInfo) hostops.ImageInfo {
	return hostops.ImageInfo{Key: key, Format: i.Format, VirtualSize: i.VirtualSize, PhysicalSize: i.PhysicalSize,
		HasBacking: i.BackingFile != "", SHA256: i.SHA256, BytesWritten: i.BytesWritten, BytesSkipped: i.BytesSkipped, Method: i.Method}
}

func backupOf(manifest string, b drivers.BackupInfo) hostops.BackupInfo {
	return hostops.BackupInfo{Manifest: manifest, Size: b.Size, Chunks: b.Chunks, ZeroChunks: b.ZeroChunks, NewChunks: b.NewChunks,
		NewBytes: b.NewBytes, ReusedBytes: b.ReusedBytes, ReadBytes: b.ReadBytes}
}

func (h *localHost) CreateImage(ctx context.Context, ref hostops.Ref, f drivers.Format, size int64) (hostops.FileInfo, error) {
	p, err := h.path(ref)
	if err != nil {
		return hostops.FileInfo{}, err
	}
	fi, err := h.l.CreateImage(ctx, p, f, size)
	return fileOf(ref.Key, fi), err
}

func (h *localHost) DeleteObject(ctx context.Context, ref hostops.Ref) error {
	p, err := h.path(ref)
	if err != nil {
		return err
	}
	return h.l.DeletePath(ctx, p)
}

func (h *localHost) ListObjects(ctx context.Context, dir hostops.Ref) ([]hostops.FileInfo, error) {
	p, err := h.path(dir)
	if err != nil {
		return nil, err
	}
	files, err := h.l.ListDir(ctx, p)
	if err != nil {
		return nil, err
	}
	out := make([]hostops.FileInfo, 0, len(files))
	for _, f := range files {
		out = append(out, fileOf(dir.Key+"/"+path.Base(f.Path), f))
	}
	return out, nil
}

func (h *localHost) StatObject(ctx context.Context, ref hostops.Ref) (hostops.FileInfo, error) {
	p, err := h.path(ref)
	if err != nil {
		return hostops.FileInfo{}, err
	}
	fi, err := h.l.StatPath(ctx, p)
	return fileOf(ref.Key, fi), err
}

func (h *localHost) FetchImage(ctx context.Context, req hostops.FetchRequest, progress drivers.Progress) (hostops.ImageInfo, error) {
	p, err := h.path(req.Dest)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	ii, err := h.l.FetchImage(ctx, drivers.FetchRequest{Source: req.Source, Dest: p, Format: req.Format, Checksum: req.Checksum}, progress)
	return imageOf(req.Dest.Key, ii), err
}

func (h *localHost) CopyImage(ctx context.Context, req hostops.CopyRequest, progress drivers.Progress) (hostops.ImageInfo, error) {
	dst, err := h.path(req.Dest)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	src := string(req.Source)
	if ref, ok, err := hostops.ParseRef(req.Source); err != nil {
		return hostops.ImageInfo{}, err
	} else if ok {
		if src, err = h.path(ref); err != nil {
			return hostops.ImageInfo{}, err
		}
	}
	ii, err := h.l.CopyImage(ctx, drivers.CopyRequest{Source: src, SourceFormat: req.SourceFormat, Dest: dst, Format: req.Format, Flatten: req.Flatten}, progress)
	return imageOf(req.Dest.Key, ii), err
}

func (h *localHost) CloneImage(ctx context.Context, req hostops.CloneRequest, progress drivers.Progress) (hostops.ImageInfo, error) {
	base, err := h.path(req.Base)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	dst, err := h.path(req.Dest)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	ii, err := h.l.CloneImage(ctx, drivers.CloneRequest{Base: base, BaseFormat: req.BaseFormat, Dest: dst, Mode: req.Mode, Format: req.Format, Size: req.Size}, progress)
	return imageOf(req.Dest.Key, ii), err
}

func (h *localHost) InspectImage(ctx context.Context, ref hostops.Ref, f drivers.Format) (hostops.ImageInfo, error) {
	p, err := h.path(ref)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	ii, err := h.l.InspectImage(ctx, p, f)
	return imageOf(ref.Key, ii), err
}

func (h *localHost) ResizeImage(ctx context.Context, ref hostops.Ref, f drivers.Format, size int64) (hostops.ImageInfo, error) {
	p, err := h.path(ref)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	ii, err := h.l.ResizeImage(ctx, p, f, size)
	return imageOf(ref.Key, ii), err
}

func (h *localHost) snapshotPaths(req hostops.SnapshotRequest) (drivers.SnapshotRequest, error) {
	vol, err := h.path(req.Volume)
	if err != nil {
		return drivers.SnapshotRequest{}, err
	}
	snap, err := h.path(req.Snapshot)
	if err != nil {
		return drivers.SnapshotRequest{}, err
	}
	return drivers.SnapshotRequest{Volume: vol, Snapshot: snap, Format: req.Format}, nil
}

func (h *localHost) SnapshotImage(ctx context.Context, req hostops.SnapshotRequest) (hostops.SnapshotInfo, error) {
	r, err := h.snapshotPaths(req)
	if err != nil {
		return hostops.SnapshotInfo{}, err
	}
	si, err := h.l.SnapshotImage(ctx, r)
	return hostops.SnapshotInfo{Snapshot: imageOf(req.Snapshot.Key, si.Snapshot), Volume: imageOf(req.Volume.Key, si.Volume), Method: si.Method}, err
}

func (h *localHost) RevertImage(ctx context.Context, req hostops.SnapshotRequest) (hostops.ImageInfo, error) {
	r, err := h.snapshotPaths(req)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	ii, err := h.l.RevertImage(ctx, r)
	return imageOf(req.Volume.Key, ii), err
}

func (h *localHost) RebaseImage(ctx context.Context, ref, newBacking hostops.Ref, f drivers.Format) (hostops.ImageInfo, error) {
	p, err := h.path(ref)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	var backing string
	if !newBacking.IsZero() {
		if backing, err = h.path(newBacking); err != nil {
			return hostops.ImageInfo{}, err
		}
	}
	ii, err := h.l.RebaseImage(ctx, p, backing, f)
	return imageOf(ref.Key, ii), err
}

func (h *localHost) BackupImage(ctx context.Context, req hostops.BackupRequest, progress drivers.Progress) (hostops.BackupInfo, error) {
	src, err := h.path(req.Source)
	if err != nil {
		return hostops.BackupInfo{}, err
	}
	chunks, manifest, err := h.chunkPaths(req.Chunks, req.Manifest)
	if err != nil {
		return hostops.BackupInfo{}, err
	}
	_, parent, err := h.chunkPaths(req.Chunks, req.ParentManifest)
	if err != nil {
		return hostops.BackupInfo{}, err
	}
	bi, err := h.l.BackupImage(ctx, drivers.BackupRequest{Source: src, SourceFormat: req.SourceFormat, ChunkDir: chunks,
		Manifest: manifest, ParentManifest: parent, ChunkSize: req.ChunkSize}, progress)
	return backupOf(req.Manifest, bi), err
}

func (h *localHost) RestoreImage(ctx context.Context, req hostops.RestoreRequest, progress drivers.Progress) (hostops.ImageInfo, error) {
	dst, err := h.path(req.Dest)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	chunks, manifest, err := h.chunkPaths(req.Chunks, req.Manifest)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	ii, err := h.l.RestoreImage(ctx, drivers.RestoreRequest{Manifest: manifest, ChunkDir: chunks, Dest: dst, Format: req.Format}, progress)
	return imageOf(req.Dest.Key, ii), err
}

func (h *localHost) DeleteBackup(ctx context.Context, req hostops.DeleteBackupRequest) (hostops.BackupInfo, error) {
	chunks, manifest, err := h.chunkPaths(req.Chunks, req.Manifest)
	if err != nil {
		return hostops.BackupInfo{}, err
	}
	bi, err := h.l.DeleteBackup(ctx, drivers.DeleteBackupRequest{Manifest: manifest, ChunkDir: chunks})
	return backupOf(req.Manifest, bi), err
}

func (h *localHost) Export(ctx context.Context, ref hostops.Ref) (drivers.URI, error) {
	p, err := h.path(ref)
	if err != nil {
		return "", err
	}
	return h.l.Export(ctx, p)
}

func (h *localHost) Unexport(ctx context.Context, uri drivers.URI) error {
	return h.l.Unexport(ctx, uri)
}

func (h *localHost) ExportNBD(ctx context.Context, req hostops.NBDExportRequest) (drivers.URI, error) {
	p, err := h.path(req.Ref)
	if err != nil {
		return "", err
	}
	return h.l.ExportNBD(ctx, drivers.NBDExportRequest{Path: p, Format: req.Format, ReadOnly: req.ReadOnly})
}

func (h *localHost) UnexportNBD(ctx context.Context, uri drivers.URI) error {
	return h.l.UnexportNBD(ctx, uri)
}

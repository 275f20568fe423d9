package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/agent/hostfs"
	"github.com/stowage/stowage/agent/nbdexports"
	"github.com/stowage/stowage/datapath/chunkstore"
	"github.com/stowage/stowage/datapath/netguard"
	"github.com/stowage/stowage/datapath/s3conn"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	"github.com/stowage/stowage/redact"
)

// LocalHost is the agent's hostops.Host: the host work of this machine,
// addressed by (store, key). It resolves every Ref with its Resolver and
// runs the step on agent/hostfs, which works on host paths. Results carry
// keys, never host paths (ImageInfo.HasBacking instead of a backing path).
//
// Stores it serves: a successful PrepareStore or ProbeStore (hostfs found
// the store's marker at root.Path) makes it serve the store at that root; a
// successful ReleaseStore ends that. The controller's store assignments
// come in as ProbeStore (Agent.capabilities). Store roots must pass the
// RootPolicy (the agent's --store-roots).
//
// Sources. FetchImage reads http:// and https://, and file:// only beneath
// the agent's import directory (ImportDir: --import-dir; none by default,
// and then file:// is errdefs.ErrPermissionDenied). CopyImage reads
// store://<store>/<key> (resolved like any Ref; the template mount allowed),
// http://, https:// and nbd://; a file:// URL, a plain path or any other
// scheme is errdefs.ErrPermissionDenied. Chunk stores are
// store://<store>/<dir> (chunks in <dir>/chunks, manifests in
// <dir>/manifests/<name>); s3:// is errdefs.ErrNotImplemented for now.
type LocalHost struct {
	fs      *hostfs.Local
	res     *Resolver
	imports *ImportDir // never nil
	// luns and lunWriter make it an iSCSI target host and a userspace
	// initiator (WithLUNs); nil: LUN steps are not implemented here.
	luns      LUNManager
	lunIO     LUNIO
	connector Connector
	swept     sync.Map // store id + root -> swept at start (sweepOnce)
	// scratch is a private directory for copies of LUNs being backed up
	// (the agent's state dir/scratch).
	scratch string
}

var _ hostops.Host = (*LocalHost)(nil)

// NewLocalHost returns the host of fs whose store roots follow policy.
func NewLocalHost(fs *hostfs.Local, policy *RootPolicy) *LocalHost {
	return &LocalHost{fs: fs, res: NewResolver(policy, fs.OnHost), imports: &ImportDir{}}
}

// SetImportDir sets the directory file:// imports are read from (nil: none).
func (h *LocalHost) SetImportDir(d *ImportDir) {
	if d == nil {
		d = &ImportDir{}
	}
	h.imports = d
}

// Resolver is how h turns Refs into paths.
func (h *LocalHost) Resolver() *Resolver { return h.res }

// SetTemplateMount records the host's template mount: Ref{Store:
// hostops.TemplateMount, Key: template id} names <dir>/<id>, and backing
// chains of lazy volumes may end there.
func (h *LocalHost) SetTemplateMount(dir string) {
	h.res.SetTemplateMount(dir)
	h.fs.SetBackingRoots(dir)
}

// HostID implements hostops.Host.
func (h *LocalHost) HostID() string { return h.fs.HostID() }

// PrepareStore implements hostops.Stores.
func (h *LocalHost) PrepareStore(ctx context.Context, root hostops.StoreRoot) (hostops.StoreProbe, error) {
	h.forgetReleased(ctx, root.Path)
	if err := h.res.CheckRoot(root.ID, root.Path); err != nil {
		return hostops.StoreProbe{}, fmt.Errorf("prepare store %s on host %s: %w", root.ID, h.HostID(), err)
	}
	p, err := h.fs.PrepareStore(ctx, root.Path, root.ID, root.Subdirs)
	if err != nil {
		return hostops.StoreProbe{}, err
	}
	h.res.Serve(root.ID, root.Path)
	return probeOf(p), nil
}

// forgetReleased stops serving a store at dir whose marker is no longer
// there: another host sharing the directory released it (store delete)
// before this agent's next heartbeat told it, and the directory may be
// prepared for a new store at once.
func (h *LocalHost) forgetReleased(ctx context.Context, dir string) {
	for id, served := range h.res.Stores() {
		if served != dir {
			continue
		}
		if _, err := h.fs.ProbeStore(ctx, dir, id); err != nil {
			h.res.Forget(id, dir)
		}
	}
}

// ProbeStore implements hostops.Stores.
func (h *LocalHost) ProbeStore(ctx context.Context, root hostops.StoreRoot) (hostops.StoreProbe, error) {
	if err := h.res.CheckRoot(root.ID, root.Path); err != nil {
		return hostops.StoreProbe{}, fmt.Errorf("probe store %s on host %s: %w", root.ID, h.HostID(), err)
	}
	p, err := h.fs.ProbeStore(ctx, root.Path, root.ID)
	if err != nil {
		return hostops.StoreProbe{}, err
	}
	h.res.Serve(root.ID, root.Path)
	h.sweepOnce(ctx, root)
	return probeOf(p), nil
}

// sweepOnce removes, the first time this agent serves a store, the stages a
// crash of an earlier run left in it (hostfs.SweepStages).
func (h *LocalHost) sweepOnce(ctx context.Context, root hostops.StoreRoot) {
	if _, done := h.swept.LoadOrStore(root.ID+"\x00"+root.Path, true); done {
		return
	}
	if removed := h.fs.SweepStages(ctx, root.Path); len(removed) > 0 {
		slog.Info("removed what interrupted steps left in a store", "store", root.ID, "files", len(removed))
	}
}

// ReleaseStore implements hostops.Stores.
func (h *LocalHost) ReleaseStore(ctx context.Context, root hostops.StoreRoot) error {
	if err := h.res.CheckRoot(root.ID, root.Path); err != nil {
		return fmt.Errorf("release store %s on host %s: %w", root.ID, h.HostID(), err)
	}
	if err := h.fs.ReleaseStore(ctx, root.Path, root.ID, root.Subdirs); err != nil {
		return err
	}
	h.res.Forget(root.ID, root.Path)
	return nil
}

// object resolves a Ref of a store the host serves (no template mount).
func (h *LocalHost) object(ref hostops.Ref) (string, error) {
	return h.res.Resolve(ref, UseObject)
}

// LocalPath resolves ref, an object that is only read, to its file on
// this machine (for a process of the host that opens it, such as the
// template cache).
func (h *LocalHost) LocalPath(ref hostops.Ref) (string, error) {
	p, err := h.res.Resolve(ref, UseSource)
	if err != nil {
		return "", err
	}
	return h.fs.OnHost(p), nil
}

// source resolves a Ref that is only read (the template mount allowed).
func (h *LocalHost) source(ref hostops.Ref) (string, error) {
	return h.res.Resolve(ref, UseSource)
}

// sameStore requires b to be of a's store.
func sameStore(what string, a, b hostops.Ref) error {
	if a.Store != b.Store {
		return fmt.Errorf("%s %s is not in store %s: %w", what, b, a.Store, errdefs.ErrInvalid)
	}
	return nil
}

// CreateImage implements hostops.Objects.
func (h *LocalHost) CreateImage(ctx context.Context, ref hostops.Ref, format drivers.Format, size int64) (hostops.FileInfo, error) {
	p, err := h.object(ref)
	if err != nil {
		return hostops.FileInfo{}, err
	}
	fi, err := h.fs.CreateImage(ctx, p, format, size)
	if err != nil {
		return hostops.FileInfo{}, err
	}
	return fileOf(ref.Key, fi), nil
}

// DeleteObject implements hostops.Objects.
func (h *LocalHost) DeleteObject(ctx context.Context, ref hostops.Ref) error {
	p, err := h.object(ref)
	if err != nil {
		return err
	}
	return h.fs.DeletePath(ctx, p)
}

// ListObjects implements hostops.Objects.
func (h *LocalHost) ListObjects(ctx context.Context, dir hostops.Ref) ([]hostops.FileInfo, error) {
	p, err := h.object(dir)
	if err != nil {
		return nil, err
	}
	files, err := h.fs.ListDir(ctx, p)
	if err != nil {
		return nil, err
	}
	out := make([]hostops.FileInfo, 0, len(files))
	for _, f := range files {
		name := filepath.Base(f.Path)
		if name == hostfs.MarkerFile {
			continue // a nested store's marker is not an object either
		}
		out = append(out, fileOf(path.Join(dir.Key, name), f))
	}
	return out, nil
}

// StatObject implements hostops.Objects.
func (h *LocalHost) StatObject(ctx context.Context, ref hostops.Ref) (hostops.FileInfo, error) {
	p, err := h.source(ref)
	if err != nil {
		return hostops.FileInfo{}, err
	}
	fi, err := h.fs.StatPath(ctx, p)
	if err != nil {
		return hostops.FileInfo{}, err
	}
	return fileOf(ref.Key, fi), nil
}

// fetchSource admits the source of a download: http:// or https://, or a
// file:// URL beneath the import directory, which it opens (the caller
// closes the file; nil for http).
func (h *LocalHost) fetchSource(src string) (*os.File, error) {
	u, err := url.Parse(src)
	if err == nil && strings.EqualFold(u.Scheme, "file") {
		return h.imports.Open(src)
	}
	if err != nil || u.Host == "" || (!strings.EqualFold(u.Scheme, "http") && !strings.EqualFold(u.Scheme, "https")) {
		return nil, fmt.Errorf("fetch source %q: the agent downloads http:// and https:// URLs, and file:// ones beneath its --import-dir, never a path of this host: %w",
			redact.URL(src), errdefs.ErrPermissionDenied)
	}
	if err := netguard.CheckURL(u); err != nil {
		return nil, fmt.Errorf("fetch source %s: %w", redact.URL(src), err)
	}
	return nil, nil
}

// copySource turns the source of a copy into what hostfs opens: the path
// of a store object (store://), or a URI another host or a driver granted
// (http://, https://, nbd://).
func (h *LocalHost) copySource(src drivers.URI) (string, error) {
	ref, isRef, err := hostops.ParseRef(src)
	if err != nil {
		return "", fmt.Errorf("copy source %q is not store://<store id>/<key> (%v): %w", redact.URL(string(src)), err, errdefs.ErrPermissionDenied)
	}
	if isRef {
		return h.source(ref)
	}
	u, err := url.Parse(string(src))
	if err == nil && u.Host != "" {
		switch strings.ToLower(u.Scheme) {
		case "http", "https", "nbd", "nbds", "iscsi":
			return string(src), nil
		}
	}
	return "", fmt.Errorf("copy source %q: the agent reads store://, http(s):// and nbd(s):// sources only, never a path of this host: %w",
		redact.URL(string(src)), errdefs.ErrPermissionDenied)
}

// FetchImage implements hostops.Images.
func (h *LocalHost) FetchImage(ctx context.Context, req hostops.FetchRequest, progress drivers.Progress) (hostops.ImageInfo, error) {
	file, err := h.fetchSource(req.Source)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	dest, err := h.object(req.Dest)
	if err != nil {
		if file != nil {
			file.Close()
		}
		return hostops.ImageInfo{}, err
	}
	info, err := h.fs.FetchImage(ctx, hostfs.FetchRequest{Source: req.Source, SourceFile: file, Dest: dest, Format: req.Format, Checksum: req.Checksum}, progress)
	return h.imageOf(req.Dest, info, err)
}

// CopyImage implements hostops.Images.
func (h *LocalHost) CopyImage(ctx context.Context, req hostops.CopyRequest, progress drivers.Progress) (hostops.ImageInfo, error) {
	src, err := h.copySource(req.Source)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	if req.DestURI != "" {
		if err := checkGrantedURI(req.DestURI); err != nil {
			return hostops.ImageInfo{}, err
		}
		if isNBD(string(req.DestURI)) {
			info, err := h.fs.CopyToURI(ctx, hostfs.CopyToURIRequest{Source: src, SourceFormat: req.SourceFormat, Dest: string(req.DestURI), DestIsZero: req.DestIsZero}, progress)
			return h.imageOf(hostops.Ref{}, info, err)
		}
		return h.copyISCSI(ctx, req, src, "", progress)
	}
	dest, err := h.object(req.Dest)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	if isISCSI(src) {
		return h.copyISCSI(ctx, req, src, dest, progress)
	}
	backing, err := h.copyBacking(req)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	info, err := h.fs.CopyImage(ctx, hostfs.CopyRequest{Source: src, SourceFormat: req.SourceFormat, Dest: dest, Format: req.Format, Flatten: req.Flatten,
		Backing: backing, BackingFormat: req.BackingFormat}, progress)
	return h.imageOf(req.Dest, info, err)
}

// copyBacking resolves the backing a copy is rebased onto: an existing
// object of the destination's store ("" when the request names none).
func (h *LocalHost) copyBacking(req hostops.CopyRequest) (string, error) {
	if req.Backing == (hostops.Ref{}) {
		return "", nil
	}
	if req.DestURI != "" || req.Flatten {
		return "", fmt.Errorf("a copy onto a new backing file is a qcow2 overlay copied as stored to a store object, not flattened: %w", errdefs.ErrInvalid)
	}
	if err := sameStore("backing", req.Dest, req.Backing); err != nil {
		return "", err
	}
	return h.source(req.Backing)
}

// cloneBase resolves the base of a clone: an object of dest's store, or a
// template of the host's template mount.
func (h *LocalHost) cloneBase(base, dest hostops.Ref) (string, error) {
	p, err := h.source(base)
	if err != nil {
		return "", err
	}
	if base.Store != hostops.TemplateMount {
		if err := sameStore("clone base", dest, base); err != nil {
			return "", err
		}
	}
	return p, nil
}

// CloneImage implements hostops.Images.
func (h *LocalHost) CloneImage(ctx context.Context, req hostops.CloneRequest, progress drivers.Progress) (hostops.ImageInfo, error) {
	base, err := h.cloneBase(req.Base, req.Dest)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	dest, err := h.object(req.Dest)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	info, err := h.fs.CloneImage(ctx, hostfs.CloneRequest{Base: base, BaseFormat: req.BaseFormat, Dest: dest, Mode: req.Mode, Format: req.Format, Size: req.Size}, progress)
	return h.imageOf(req.Dest, info, err)
}

// InspectImage implements hostops.Images.
func (h *LocalHost) InspectImage(ctx context.Context, ref hostops.Ref, format drivers.Format) (hostops.ImageInfo, error) {
	p, err := h.source(ref)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	info, err := h.fs.InspectImage(ctx, p, format)
	return h.imageOf(ref, info, err)
}

// ResizeImage implements hostops.Images.
func (h *LocalHost) ResizeImage(ctx context.Context, ref hostops.Ref, format drivers.Format, size int64) (hostops.ImageInfo, error) {
	p, err := h.object(ref)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	info, err := h.fs.ResizeImage(ctx, p, format, size)
	return h.imageOf(ref, info, err)
}

// snapshotPair resolves a volume and its snapshot, of one store.
func (h *LocalHost) snapshotPair(req hostops.SnapshotRequest) (vol, snap string, err error) {
	if vol, err = h.object(req.Volume); err != nil {
		return "", "", err
	}
	if snap, err = h.object(req.Snapshot); err != nil {
		return "", "", err
	}
	if err := sameStore("snapshot", req.Volume, req.Snapshot); err != nil {
		return "", "", err
	}
	return vol, snap, nil
}

// SnapshotImage implements hostops.Images.
func (h *LocalHost) SnapshotImage(ctx context.Context, req hostops.SnapshotRequest) (hostops.SnapshotInfo, error) {
	vol, snap, err := h.snapshotPair(req)
	if err != nil {
		return hostops.SnapshotInfo{}, err
	}
	si, err := h.fs.SnapshotImage(ctx, hostfs.SnapshotRequest{Volume: vol, Snapshot: snap, Format: req.Format})
	if err != nil {
		return hostops.SnapshotInfo{}, err
	}
	s, _ := h.imageOf(req.Snapshot, si.Snapshot, nil)
	v, _ := h.imageOf(req.Volume, si.Volume, nil)
	return hostops.SnapshotInfo{Snapshot: s, Volume: v, Method: si.Method}, nil
}

// RevertImage implements hostops.Images.
func (h *LocalHost) RevertImage(ctx context.Context, req hostops.SnapshotRequest) (hostops.ImageInfo, error) {
	vol, snap, err := h.snapshotPair(req)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	info, err := h.fs.RevertImage(ctx, hostfs.SnapshotRequest{Volume: vol, Snapshot: snap, Format: req.Format})
	return h.imageOf(req.Volume, info, err)
}

// rebasePair resolves an image and its new backing image (of its store;
// zero: none).
func (h *LocalHost) rebasePair(ref, newBacking hostops.Ref) (p, backing string, err error) {
	if p, err = h.object(ref); err != nil {
		return "", "", err
	}
	if newBacking.IsZero() {
		return p, "", nil
	}
	if backing, err = h.object(newBacking); err != nil {
		return "", "", err
	}
	if err := sameStore("new backing image", ref, newBacking); err != nil {
		return "", "", err
	}
	return p, backing, nil
}

// RebaseImage implements hostops.Images.
func (h *LocalHost) RebaseImage(ctx context.Context, ref, newBacking hostops.Ref, backingFormat drivers.Format) (hostops.ImageInfo, error) {
	p, backing, err := h.rebasePair(ref, newBacking)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	info, err := h.fs.RebaseImage(ctx, p, backing, backingFormat)
	return h.imageOf(ref, info, err)
}

// chunkPaths are a chunk store's directories on this host, or (s3 set)
// the S3 prefix it lives under.
type chunkPaths struct {
	chunks    string // <dir>/chunks
	manifests hostops.Ref
	s3        *s3conn.Config
}

// openS3 opens the S3 chunk store cp names, with the task's keys.
func (cp chunkPaths) openS3(ctx context.Context) (*chunkstore.Store, error) {
	store, err := chunkstore.OpenS3(ctx, *cp.s3)
	if err != nil {
		return nil, fmt.Errorf("chunk store %s: %w", cp.s3, err)
	}
	return store, nil
}

// chunkStore resolves a chunk store: store://<store>/<dir> of a store the
// host serves. The secret is never looked at here (S3 only), nor logged.
func (h *LocalHost) chunkStore(cs hostops.ChunkStore) (chunkPaths, error) {
	ref, isRef, err := hostops.ParseRef(cs.URI)
	if err != nil {
		return chunkPaths{}, fmt.Errorf("chunk store %q is not store://<store id>/<dir> (%v): %w", redact.URL(string(cs.URI)), err, errdefs.ErrPermissionDenied)
	}
	if !isRef {
		if u, err := url.Parse(string(cs.URI)); err == nil && strings.EqualFold(u.Scheme, "s3") {
			cfg, err := s3conn.ParseURI(string(cs.URI), cs.Secret)
			if err != nil {
				return chunkPaths{}, err
			}
			return chunkPaths{s3: &cfg}, nil
		}
		return chunkPaths{}, fmt.Errorf("chunk store %q: want store://<store id>/<dir> or s3://: %w", redact.URL(string(cs.URI)), errdefs.ErrPermissionDenied)
	}
	if err := CheckKey(ref.Key); err != nil {
		return chunkPaths{}, fmt.Errorf("chunk store %s: %w", ref, err)
	}
	chunks, err := h.object(hostops.Ref{Store: ref.Store, Key: path.Join(ref.Key, "chunks")})
	if err != nil {
		return chunkPaths{}, err
	}
	return chunkPaths{chunks: chunks, manifests: hostops.Ref{Store: ref.Store, Key: path.Join(ref.Key, "manifests")}}, nil
}

// manifest resolves a manifest's name (a plain file name) in the chunk store.
func (h *LocalHost) manifest(cp chunkPaths, name string) (string, error) {
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return "", fmt.Errorf("manifest name %q is not a plain file name: %w", name, errdefs.ErrPermissionDenied)
	}
	if cp.s3 != nil {
		return name, nil
	}
	return h.object(hostops.Ref{Store: cp.manifests.Store, Key: cp.manifests.Key + "/" + name})
}

// backupPaths resolves what a backup step reads and writes.
func (h *LocalHost) backupPaths(cs hostops.ChunkStore, names ...string) (chunkPaths, []string, error) {
	cp, err := h.chunkStore(cs)
	if err != nil {
		return chunkPaths{}, nil, err
	}
	out := make([]string, len(names))
	for i, n := range names {
		if out[i], err = h.manifest(cp, n); err != nil {
			return chunkPaths{}, nil, err
		}
	}
	return cp, out, nil
}

// BackupImage implements hostops.Backups.
func (h *LocalHost) BackupImage(ctx context.Context, req hostops.BackupRequest, progress drivers.Progress) (hostops.BackupInfo, error) {
	var src string
	var err error
	fromURI := req.SourceURI != "" && isNBD(string(req.SourceURI))
	switch {
	case fromURI:
		// An export (an RBD snapshot's): read as it is chunked.
		if err := checkGrantedURI(req.SourceURI); err != nil {
			return hostops.BackupInfo{}, err
		}
		if req.SourceFormat != drivers.FormatRaw {
			return hostops.BackupInfo{}, fmt.Errorf("an export backed up must serve raw bytes, not %s: %w", req.SourceFormat, errdefs.ErrInvalid)
		}
	case req.SourceURI != "":
		// A LUN: read through the userspace initiator into a private
		// scratch file, backed up from there and removed.
		var done func()
		if src, done, err = h.scratchCopy(ctx, req.SourceURI, req.SourceFormat); err != nil {
			return hostops.BackupInfo{}, err
		}
		defer done()
	default:
		if src, err = h.object(req.Source); err != nil {
			return hostops.BackupInfo{}, err
		}
	}
	names := []string{req.Manifest}
	if req.ParentManifest != "" {
		names = append(names, req.ParentManifest)
	}
	cp, manifests, err := h.backupPaths(req.Chunks, names...)
	if err != nil {
		return hostops.BackupInfo{}, err
	}
	var t hostfs.ChunkTarget
	if cp.s3 != nil {
		store, err := cp.openS3(ctx)
		if err != nil {
			return hostops.BackupInfo{}, err
		}
		t = hostfs.ChunkTarget{Store: store, Manifest: req.Manifest, Parent: req.ParentManifest}
	} else if fromURI {
		if t, err = h.fs.DirChunkTarget(cp.chunks, manifests[0], manifests[1:]...); err != nil {
			return hostops.BackupInfo{}, err
		}
	}
	var b hostfs.BackupInfo
	switch {
	case fromURI:
		b, err = h.fs.BackupFromURI(ctx, t, string(req.SourceURI), req.ChunkSize, req.ChangedKnown, req.Changed, progress)
	case cp.s3 != nil:
		b, err = h.fs.BackupInto(ctx, t, src, req.SourceFormat, req.ChunkSize, progress)
	default:
		r := hostfs.BackupRequest{Source: src, SourceFormat: req.SourceFormat, ChunkDir: cp.chunks, Manifest: manifests[0], ChunkSize: req.ChunkSize}
		if len(manifests) > 1 {
			r.ParentManifest = manifests[1]
		}
		b, err = h.fs.BackupImage(ctx, r, progress)
	}
	if err != nil {
		return hostops.BackupInfo{}, err
	}
	return backupOf(req.Manifest, b), nil
}

// RestoreImage implements hostops.Backups.
func (h *LocalHost) RestoreImage(ctx context.Context, req hostops.RestoreRequest, progress drivers.Progress) (hostops.ImageInfo, error) {
	cp, manifests, err := h.backupPaths(req.Chunks, req.Manifest)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	if req.DestURI != "" {
		// An export a driver granted (an RBD image's): raw, in place.
		if err := checkGrantedURI(req.DestURI); err != nil || !isNBD(string(req.DestURI)) {
			return hostops.ImageInfo{}, errors.Join(err, fmt.Errorf("restore into %s: only an nbd(s):// export: %w", redact.URL(string(req.DestURI)), errdefs.ErrPermissionDenied))
		}
		if req.Format != "" && req.Format != drivers.FormatRaw {
			return hostops.ImageInfo{}, fmt.Errorf("restore into an export writes raw bytes, not %s: %w", req.Format, errdefs.ErrInvalid)
		}
		t := hostfs.ChunkTarget{Manifest: req.Manifest}
		if cp.s3 != nil {
			if t.Store, err = cp.openS3(ctx); err != nil {
				return hostops.ImageInfo{}, err
			}
		} else if t, err = h.fs.DirChunkTarget(cp.chunks, manifests[0]); err != nil {
			return hostops.ImageInfo{}, err
		}
		info, err := h.fs.RestoreToURI(ctx, t, string(req.DestURI), req.DestIsZero, progress)
		return h.imageOf(hostops.Ref{}, info, err)
	}
	dest, err := h.object(req.Dest)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	if cp.s3 != nil {
		store, err := cp.openS3(ctx)
		if err != nil {
			return hostops.ImageInfo{}, err
		}
		info, err := h.fs.RestoreFrom(ctx, hostfs.ChunkTarget{Store: store, Manifest: req.Manifest}, dest, req.Format, progress)
		return h.imageOf(req.Dest, info, err)
	}
	info, err := h.fs.RestoreImage(ctx, hostfs.RestoreRequest{Manifest: manifests[0], ChunkDir: cp.chunks, Dest: dest, Format: req.Format}, progress)
	return h.imageOf(req.Dest, info, err)
}

// DeleteBackup implements hostops.Backups.
func (h *LocalHost) DeleteBackup(ctx context.Context, req hostops.DeleteBackupRequest) (hostops.BackupInfo, error) {
	cp, manifests, err := h.backupPaths(req.Chunks, req.Manifest)
	if err != nil {
		return hostops.BackupInfo{}, err
	}
	if cp.s3 != nil {
		store, err := cp.openS3(ctx)
		if err != nil {
			return hostops.BackupInfo{}, err
		}
		st, err := store.Delete(ctx, req.Manifest)
		if err != nil {
			return hostops.BackupInfo{}, err
		}
		return hostops.BackupInfo{Manifest: req.Manifest, Size: st.Size, Chunks: st.Chunks, ZeroChunks: st.ZeroChunks, NewChunks: st.RemovedChunks, NewBytes: st.RemovedBytes}, nil
	}
	b, err := h.fs.DeleteBackup(ctx, hostfs.DeleteBackupRequest{Manifest: manifests[0], ChunkDir: cp.chunks})
	if err != nil {
		return hostops.BackupInfo{}, err
	}
	return backupOf(req.Manifest, b), nil
}

// CollectChunks implements hostops.Backups.
func (h *LocalHost) CollectChunks(ctx context.Context, req hostops.CollectChunksRequest) (hostops.CollectInfo, error) {
	cp, err := h.chunkStore(req.Chunks)
	if err != nil {
		return hostops.CollectInfo{}, err
	}
	if cp.s3 != nil {
		store, err := cp.openS3(ctx)
		if err != nil {
			return hostops.CollectInfo{}, err
		}
		st, err := store.Collect(ctx, "")
		if err != nil {
			return hostops.CollectInfo{}, fmt.Errorf("collect chunks of %s on host %s: %w", cp.s3, h.HostID(), err)
		}
		return hostops.CollectInfo(hostfs.CollectInfoOf(st)), nil
	}
	manifests, err := h.object(cp.manifests)
	if err != nil {
		return hostops.CollectInfo{}, err
	}
	ci, err := h.fs.CollectChunks(ctx, hostfs.CollectChunksRequest{ChunkDir: cp.chunks, ManifestDir: manifests})
	if err != nil {
		return hostops.CollectInfo{}, err
	}
	return hostops.CollectInfo(ci), nil
}

// Export implements hostops.Exports. The export records ref and the task
// of ctx (hostops.OwnerFrom).
func (h *LocalHost) Export(ctx context.Context, ref hostops.Ref, ttl time.Duration) (drivers.URI, error) {
	p, err := h.object(ref)
	if err != nil {
		return "", err
	}
	return h.fs.Export(ctx, p, expiry(ttl), ownerOf(ctx, ref))
}

// ownerOf is what an export made for ref under ctx records.
func ownerOf(ctx context.Context, ref hostops.Ref) exports.Owner {
	o := hostops.OwnerFrom(ctx)
	return exports.Owner{TaskID: o.TaskID, ParentID: o.ParentID, Store: ref.Store, Key: ref.Key}
}

// expiry is when an export made now with ttl ends (zero: never).
func expiry(ttl time.Duration) time.Time {
	if ttl <= 0 {
		return time.Time{}
	}
	return time.Now().Add(ttl)
}

// Unexport implements hostops.Exports.
func (h *LocalHost) Unexport(ctx context.Context, uri drivers.URI) error {
	return h.fs.Unexport(ctx, uri)
}

// ExportNBD implements hostops.Exports.
func (h *LocalHost) ExportNBD(ctx context.Context, req hostops.NBDExportRequest) (drivers.URI, error) {
	if r := req.RBD; r != nil {
		img := nbdexports.RBDImage{Pool: r.Pool, Image: r.Image, Snapshot: r.Snapshot, User: r.User, Key: r.Key, Mons: r.Mons}
		return h.fs.ExportRBD(ctx, img, req.ReadOnly, expiry(req.TTL), ownerOf(ctx, req.Ref))
	}
	p, err := h.object(req.Ref)
	if err != nil {
		return "", err
	}
	return h.fs.ExportNBD(ctx, hostfs.NBDExportRequest{Path: p, Format: req.Format, ReadOnly: req.ReadOnly, Expires: expiry(req.TTL),
		Owner: ownerOf(ctx, req.Ref)})
}

// UnexportNBD implements hostops.Exports.
func (h *LocalHost) UnexportNBD(ctx context.Context, uri drivers.URI) error {
	return h.fs.UnexportNBD(ctx, uri)
}

// ListExports implements hostops.Exports: the live exports of the objects
// of store ("": every store). An export made before exports recorded their
// object is attributed to the served store its file lies in (none: it is
// listed only for "").
func (h *LocalHost) ListExports(ctx context.Context, store string) ([]hostops.ExportInfo, error) {
	list, err := h.fs.ListExports(ctx)
	if err != nil {
		return nil, fmt.Errorf("list exports: %w", err)
	}
	var roots map[string][]string // store id -> its root on this machine, as given and resolved
	out := make([]hostops.ExportInfo, 0, len(list))
	for _, x := range list {
		ref := hostops.Ref{Store: x.Owner.Store, Key: x.Owner.Key}
		if ref.IsZero() {
			if roots == nil {
				roots = h.storeRoots()
			}
			ref = refOfPath(roots, x.Path)
		}
		if store != "" && ref.Store != store {
			continue
		}
		kind := hostops.ExportHTTP
		if x.Kind == hostfs.ExportNBD {
			kind = hostops.ExportNBD
		}
		i := hostops.ExportInfo{URI: x.URI, Kind: kind, Ref: ref, Owner: hostops.Owner{TaskID: x.Owner.TaskID, ParentID: x.Owner.ParentID},
			ReadOnly: x.ReadOnly, Created: x.Created, Expires: x.Expires}
		for _, o := range x.SharedWith {
			i.SharedWith = append(i.SharedWith, hostops.Owner{TaskID: o.TaskID, ParentID: o.ParentID})
		}
		out = append(out, i)
	}
	return out, nil
}

// storeRoots returns the directories of the stores served on this machine,
// as recorded and with symbolic links resolved (NBD exports hold resolved
// paths).
func (h *LocalHost) storeRoots() map[string][]string {
	out := map[string][]string{}
	for id, root := range h.res.Stores() {
		p := h.fs.OnHost(root)
		out[id] = append(out[id], p)
		if r, err := filepath.EvalSymlinks(p); err == nil && r != p {
			out[id] = append(out[id], r)
		}
	}
	return out
}

// refOfPath names the object at path (on this machine) by the store whose
// root holds it (zero: none does).
func refOfPath(roots map[string][]string, path string) hostops.Ref {
	for id, dirs := range roots {
		for _, d := range dirs {
			if rel, err := filepath.Rel(d, path); err == nil && rel != "." && !strings.HasPrefix(rel, "..") && filepath.IsLocal(rel) {
				return hostops.Ref{Store: id, Key: filepath.ToSlash(rel)}
			}
		}
	}
	return hostops.Ref{}
}

// Conversions from hostfs's path-based results: keys, never host paths.

func probeOf(p hostfs.StoreProbe) hostops.StoreProbe {
	return hostops.StoreProbe{CapacityBytes: p.CapacityBytes, AvailableBytes: p.AvailableBytes, Reflink: p.Reflink, FSType: p.FSType}
}

func fileOf(key string, f hostfs.FileInfo) hostops.FileInfo {
	return hostops.FileInfo{Key: key, Size: f.Size, AllocatedBytes: f.AllocatedBytes, IsDir: f.IsDir, ModifiedAt: f.ModifiedAt,
		Format: f.Format, VirtualSize: f.VirtualSize}
}

// imageOf is the result of an image step that wrote (or read) dest: every
// such step's error passes here, so a store that filled up is named once,
// with its free space, in the message the job shows.
func (h *LocalHost) imageOf(dest hostops.Ref, i hostfs.ImageInfo, err error) (hostops.ImageInfo, error) {
	if err != nil {
		return hostops.ImageInfo{}, h.storeFull(dest.Store, err)
	}
	return hostops.ImageInfo{Key: dest.Key, Format: i.Format, VirtualSize: i.VirtualSize, PhysicalSize: i.PhysicalSize,
		HasBacking: i.BackingFile != "", SHA256: i.SHA256, BytesWritten: i.BytesWritten, BytesSkipped: i.BytesSkipped, Method: i.Method}, nil
}

func backupOf(manifest string, b hostfs.BackupInfo) hostops.BackupInfo {
	return hostops.BackupInfo{Manifest: manifest, Size: b.Size, Chunks: b.Chunks, ZeroChunks: b.ZeroChunks, NewChunks: b.NewChunks,
		NewBytes: b.NewBytes, ReusedBytes: b.ReusedBytes, ReadBytes: b.ReadBytes}
}

// storeFull says which store is full when err is errdefs.ErrResourceExhausted
// (ENOSPC or EDQUOT wherever hostfs, the copy engine or qemu-img wrote),
// with the free and total bytes of its filesystem as statfs sees them now
// (after the failed step removed its partial object).
func (h *LocalHost) storeFull(store string, err error) error {
	if !errors.Is(err, errdefs.ErrResourceExhausted) || store == "" {
		return err
	}
	free := ""
	if root, ok := h.res.Stores()[store]; ok {
		var st unix.Statfs_t
		if unix.Statfs(h.fs.OnHost(root), &st) == nil {
			free = fmt.Sprintf("; %d of %d bytes free after removing the partial copy", int64(st.Bavail)*st.Bsize, int64(st.Blocks)*st.Bsize)
		}
	}
	return fmt.Errorf("store %s is full (resource exhausted%s): %w", store, free, err)
}

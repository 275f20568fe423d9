package s3

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"path"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/stowage/stowage/datapath/chunkstore"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// Locate gives a template or ISO the key templates/<id>.<raw|qcow2|iso> and
// a snapshot backup the key of its manifest, backups/manifests/<id>.json
// (chunks are backups/chunks/<hh>/<sha256>, shared by every backup of the
// store). Volumes do not live on image stores.
func (d *Driver) Locate(obj drivers.DataObject) (string, error) {
	if obj.ID == "" || strings.ContainsAny(obj.ID, "/\\") || obj.ID == "." || obj.ID == ".." {
		return "", fmt.Errorf("object id %q: want a non-empty name without slashes: %w", obj.ID, errdefs.ErrInvalid)
	}
	switch obj.Type {
	case drivers.ObjectTemplate:
		e, err := ext(obj.Format)
		if err != nil {
			return "", err
		}
		return templatesDir + obj.ID + e, nil
	case drivers.ObjectSnapshot:
		return backupsDir + "/manifests/" + obj.ID + ".json", nil
	}
	return "", fmt.Errorf("an s3 store holds templates, ISOs and backups, not a %s: %w", obj.Type, errdefs.ErrInvalid)
}

// key returns obj's recorded key, or the one Locate gives it.
func (d *Driver) key(obj drivers.DataObject) (string, error) {
	if obj.Key != "" {
		return obj.Key, nil
	}
	return d.Locate(obj)
}

// Create is not implemented: an image store takes templates by Import and
// backups through its chunk store; it holds no blank volumes.
func (d *Driver) Create(ctx context.Context, obj drivers.DataObject) (drivers.ObjectInfo, error) {
	return drivers.ObjectInfo{}, fmt.Errorf("create %s %s on s3 store %s: an s3 store takes templates by import: %w", obj.Type, obj.ID, obj.Store.Name, errdefs.ErrNotImplemented)
}

// Delete removes the object (a backup through DeleteBackup, so its
// unshared chunks go too); a missing one is not an error.
func (d *Driver) Delete(ctx context.Context, obj drivers.DataObject) error {
	if obj.Type == drivers.ObjectSnapshot {
		_, err := d.DeleteBackup(ctx, obj)
		return err
	}
	st, err := d.store(ctx, obj.Store)
	if err != nil {
		return err
	}
	k, err := d.key(obj)
	if err != nil {
		return err
	}
	return st.Delete(ctx, k)
}

// ListObjects lists the templates and ISOs (templates/) and the backups
// (their manifests) of a store.
func (d *Driver) ListObjects(ctx context.Context, store drivers.StoreInfo) ([]drivers.ObjectInfo, error) {
	st, err := d.store(ctx, store)
	if err != nil {
		return nil, err
	}
	var out []drivers.ObjectInfo
	for _, dir := range []struct {
		prefix string
		typ    drivers.ObjectType
	}{{templatesDir, drivers.ObjectTemplate}, {backupsDir + "/manifests/", drivers.ObjectSnapshot}} {
		objs, err := st.List(ctx, dir.prefix)
		if err != nil {
			return nil, err
		}
		for _, o := range objs {
			name := path.Base(o.Key)
			e := path.Ext(name)
			oi := drivers.ObjectInfo{ID: strings.TrimSuffix(name, e), Type: dir.typ, Key: o.Key, Size: o.Size, PhysicalSize: o.Size, StoredSize: o.Size, ModifiedAt: o.ModTime}
			if dir.typ == drivers.ObjectTemplate {
				oi.Format = drivers.Format(strings.TrimPrefix(e, "."))
			}
			out = append(out, oi)
		}
	}
	return out, nil
}

// Stat describes one object; Size is obj.Size when the caller knows the
// virtual size, else the stored size.
func (d *Driver) Stat(ctx context.Context, obj drivers.DataObject) (drivers.ObjectInfo, error) {
	st, err := d.store(ctx, obj.Store)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	k, err := d.key(obj)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	o, err := st.Stat(ctx, k)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	size := obj.Size
	if size == 0 {
		size = o.Size
	}
	return drivers.ObjectInfo{ID: obj.ID, Type: obj.Type, Key: k, Format: obj.Format, Size: size, PhysicalSize: o.Size, StoredSize: o.Size,
		ModifiedAt: o.ModTime, SHA256: o.SHA256}, nil
}

// GrantAccess hands out a presigned GET URL (read-only, expiring) for
// reading (an agent's stream engine or template mount) and attaching (qemu
// opens https:// read-only, as for an ISO): the host never holds the
// bucket's keys. Writing is refused: an s3 store takes templates by import.
func (d *Driver) GrantAccess(ctx context.Context, obj drivers.DataObject, client drivers.Client) (drivers.Access, error) {
	switch client.Purpose {
	case drivers.PurposeRead, drivers.PurposeAttach, drivers.PurposeWrite:
	default:
		return drivers.Access{}, fmt.Errorf("grant access to %s %s: purpose %q: want attach, read or write: %w", obj.Type, obj.ID, client.Purpose, errdefs.ErrInvalid)
	}
	if client.Transport != "" && client.Transport != "https" && client.Transport != "http" {
		return drivers.Access{}, fmt.Errorf("grant access to %s %s: an s3 store hands out presigned URLs, not %s: %w", obj.Type, obj.ID, client.Transport, errdefs.ErrFailedPrecondition)
	}
	if client.Purpose == drivers.PurposeWrite {
		return drivers.Access{}, fmt.Errorf("host %s cannot write %s %s on s3 store %s: an s3 store takes templates by import only: %w",
			client.HostID, obj.Type, obj.ID, obj.Store.Name, errdefs.ErrFailedPrecondition)
	}
	st, err := d.store(ctx, obj.Store)
	if err != nil {
		return drivers.Access{}, err
	}
	k, err := d.key(obj)
	if err != nil {
		return drivers.Access{}, err
	}
	u, err := st.PresignGet(ctx, k, d.expiry)
	if err != nil {
		return drivers.Access{}, err
	}
	return drivers.Access{URI: drivers.URI(u.String()), ReadOnly: true, Expires: time.Now().Add(d.expiry)}, nil
}

// RevokeAccess does nothing: a presigned URL cannot be taken back; it
// expires (WithPresignExpiry).
func (d *Driver) RevokeAccess(ctx context.Context, obj drivers.DataObject, client drivers.Client, access drivers.Access) error {
	return ctx.Err()
}

// CanCopy is true between objects of one s3 store: a server-side copy.
func (d *Driver) CanCopy(src, dst drivers.DataObject) bool {
	return src.Store.Provider == Name && dst.Store.Provider == Name && src.Store.ID == dst.Store.ID
}

// Copy copies src to dst inside one store on the server (CopyObject, or
// part by part above 5 GiB); no byte passes through Stowage.
func (d *Driver) Copy(ctx context.Context, src, dst drivers.DataObject, progress drivers.Progress) (drivers.ObjectInfo, error) {
	if !d.CanCopy(src, dst) {
		return drivers.ObjectInfo{}, fmt.Errorf("copy %s %s to s3 store %s: only inside one s3 store: %w", src.Type, src.ID, dst.Store.Name, errdefs.ErrNotImplemented)
	}
	st, err := d.store(ctx, dst.Store)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	sk, err := d.key(src)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	dk, err := d.key(dst)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	o, err := st.Copy(ctx, sk, dk)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	if progress != nil {
		progress(o.Size, o.Size)
	}
	return drivers.ObjectInfo{ID: dst.ID, Type: dst.Type, Key: dk, Format: src.Format, Size: src.Size, PhysicalSize: o.Size, StoredSize: o.Size,
		Method: "server-side-copy"}, nil
}

// Import streams src into dst (Store.Import: multipart, checksum and
// format checked in-stream, nothing left behind on failure) in this
// process; the virtual size of a qcow2 is read back from its header.
func (d *Driver) Import(ctx context.Context, dst drivers.DataObject, src drivers.ImportSource, progress drivers.Progress) (drivers.ObjectInfo, error) {
	st, err := d.store(ctx, dst.Store)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	k, err := d.key(dst)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	if !strings.HasPrefix(src.URL, "http://") && !strings.HasPrefix(src.URL, "https://") {
		return drivers.ObjectInfo{}, fmt.Errorf("import into s3 store %s: the source must be an http:// or https:// URL (file:// imports are read by an agent, into a filesystem image store): %w", dst.Store.Name, errdefs.ErrInvalid)
	}
	client := d.fetch // the address policy for operators' URLs
	if src.Internal {
		client = d.peer // a URL Stowage made (an agent's export)
	}
	res, err := st.Import(ctx, ImportRequest{URL: src.URL, Key: k, Format: Format(dst.Format), Checksum: src.Checksum, Progress: progress, HTTPClient: client})
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	size := res.Size
	if dst.Format == drivers.FormatQCOW2 {
		if size, err = st.qcow2Size(ctx, k); err != nil {
			return drivers.ObjectInfo{}, err
		}
	}
	return drivers.ObjectInfo{ID: dst.ID, Type: dst.Type, Key: k, Format: dst.Format, Size: size, PhysicalSize: res.Size, StoredSize: res.Size,
		SHA256: res.SHA256, Method: "s3-multipart-import", BytesWritten: res.Size}, nil
}

// qcow2Size reads the virtual size from the qcow2 header of object key
// (big-endian, bytes 24-32).
func (s *Store) qcow2Size(ctx context.Context, key string) (int64, error) {
	opts := minio.GetObjectOptions{}
	if err := opts.SetRange(0, 31); err != nil {
		return 0, err
	}
	obj, err := s.c.GetObject(ctx, s.cfg.Bucket, s.cfg.Key(key), opts)
	if err != nil {
		return 0, s.wrap("read header of "+key, err)
	}
	defer obj.Close()
	var h [32]byte
	if _, err := io.ReadFull(obj, h[:]); err != nil {
		return 0, s.wrap("read header of "+key, err)
	}
	return int64(binary.BigEndian.Uint64(h[24:32])), nil
}

// BackupAccess gives a host the store's chunk store (its backups/ prefix)
// as an s3:// URI with the bucket's keys as its secret, and the backup's
// manifest name. The agent that backs up or restores holds the keys for
// that task only (never journalled nor logged); presigned part uploads or
// per-task credentials (STS) would avoid that and are not built.
func (d *Driver) BackupAccess(ctx context.Context, obj drivers.DataObject, client drivers.Client) (drivers.BackupAccess, error) {
	st, err := d.store(ctx, obj.Store)
	if err != nil {
		return drivers.BackupAccess{}, err
	}
	cfg := backupConfig(st.cfg)
	return drivers.BackupAccess{Chunks: drivers.URI(cfg.URI()), Manifest: obj.ID, Secret: cfg.Secret()}, nil
}

// DeleteBackup removes backup obj's manifest and the chunks no other
// backup of the store uses, from this process (metadata operations only).
func (d *Driver) DeleteBackup(ctx context.Context, obj drivers.DataObject) (drivers.BackupStats, error) {
	st, err := d.store(ctx, obj.Store)
	if err != nil {
		return drivers.BackupStats{}, err
	}
	cs, err := chunkstore.OpenS3(ctx, backupConfig(st.cfg))
	if err != nil {
		return drivers.BackupStats{}, err
	}
	ds, err := cs.Delete(ctx, obj.ID)
	if err != nil {
		return drivers.BackupStats{}, fmt.Errorf("delete backup %s on s3 store %s: %w", obj.ID, obj.Store.Name, err)
	}
	return drivers.BackupStats{Chunks: ds.RemovedChunks, FreedBytes: ds.RemovedBytes, KeptShared: ds.KeptChunks, ManifestGone: ds.Chunks > 0 || ds.Size > 0}, nil
}

// CollectChunks removes the chunks of the store's chunk store (its
// backups/ prefix) that no manifest refers to, from this process like
// DeleteBackup (listings and deletes only), under the chunk store's
// exclusive lease. Chunks is the number removed, FreedBytes their bytes,
// KeptShared the chunks backups still use. A manifest that cannot be read
// is errdefs.ErrFailedPrecondition and nothing is removed.
func (d *Driver) CollectChunks(ctx context.Context, store drivers.StoreInfo) (drivers.BackupStats, error) {
	st, err := d.collectChunks(ctx, store)
	if err != nil {
		return drivers.BackupStats{}, fmt.Errorf("collect chunks on s3 store %s: %w", store.Name, err)
	}
	return st, nil
}

func (d *Driver) collectChunks(ctx context.Context, store drivers.StoreInfo) (drivers.BackupStats, error) {
	st, err := d.store(ctx, store)
	if err != nil {
		return drivers.BackupStats{}, err
	}
	cs, err := chunkstore.OpenS3(ctx, backupConfig(st.cfg))
	if err != nil {
		return drivers.BackupStats{}, err
	}
	cst, err := cs.Collect(ctx, "")
	if err != nil {
		return drivers.BackupStats{}, err
	}
	return drivers.BackupStats{Chunks: cst.RemovedChunks, FreedBytes: cst.RemovedBytes, KeptShared: cst.KeptChunks}, nil
}

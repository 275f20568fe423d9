package filesystem

import (
	"context"
	"fmt"
	"path"
	"strings"
	"time"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// The transports a client may ask for (drivers.Client.Transport).
const (
	transportFile  = "file"
	transportStore = "store"
	transportHTTP  = "http"
	transportNBD   = "nbd"
)

// GrantAccess returns how client.HostID uses the object for
// client.Purpose (the table in the package doc): the file itself or its
// store:// name for a host in the store's scope, an export made on an Up
// host in scope (Revocable, Access.HostID set) for a host outside it. A
// host outside the scope cannot write (errdefs.ErrFailedPrecondition); an
// unknown host is errdefs.ErrNotFound.
func (d *Driver) GrantAccess(ctx context.Context, obj drivers.DataObject, client drivers.Client) (drivers.Access, error) {
	a, err := d.grantAccess(ctx, obj, client)
	if err != nil {
		return drivers.Access{}, fmt.Errorf("grant host %s %s access to %s %s on filesystem store %s: %w",
			client.HostID, client.Purpose, obj.Type, obj.ID, obj.Store.ID, err)
	}
	return a, nil
}

func (d *Driver) grantAccess(ctx context.Context, obj drivers.DataObject, client drivers.Client) (drivers.Access, error) {
	if err := ctx.Err(); err != nil {
		return drivers.Access{}, err
	}
	if client.HostID == "" {
		return drivers.Access{}, fmt.Errorf("no host to grant access to: %w", errdefs.ErrInvalid)
	}
	ref, err := objectRef(obj)
	if err != nil {
		return drivers.Access{}, err
	}
	in, err := d.hosts.InScope(ctx, client.HostID, obj.Store.Scope)
	if err != nil {
		return drivers.Access{}, err
	}
	readOnly := obj.Type != drivers.ObjectVolume
	refuse := func(why string) (drivers.Access, error) {
		return drivers.Access{}, fmt.Errorf("%s: %w", why, errdefs.ErrFailedPrecondition)
	}
	outside := fmt.Sprintf("host %s is outside the scope %s of store %s", client.HostID, scopeName(obj.Store.Scope), obj.Store.ID)
	switch client.Purpose {
	case drivers.PurposeAttach:
		switch client.Transport {
		case "", transportFile:
			if in {
				dir, err := storeDir(obj.Store)
				if err != nil {
					return drivers.Access{}, err
				}
				return drivers.Access{URI: fileURI(dir + "/" + ref.Key), ReadOnly: readOnly}, nil
			}
			if client.Transport == transportFile {
				return refuse(outside + "; it cannot open the file")
			}
			return d.exportNBD(ctx, obj, ref, formatOf(ref.Key), readOnly, client.GrantTTL())
		case transportNBD:
			return d.exportNBD(ctx, obj, ref, formatOf(ref.Key), readOnly, client.GrantTTL())
		}
	case drivers.PurposeRead:
		switch client.Transport {
		case "", transportStore:
			if in {
				return drivers.Access{URI: ref.URI(), ReadOnly: true}, nil
			}
			if client.Transport == transportStore {
				return refuse(outside + "; it does not serve the store")
			}
			return d.exportHTTP(ctx, obj, ref, client.GrantTTL())
		case transportHTTP:
			return d.exportHTTP(ctx, obj, ref, client.GrantTTL())
		case transportNBD:
			if client.GuestView && formatOf(ref.Key) == drivers.FormatQCOW2 {
				// The chain read through by the host that serves the
				// store: a copy elsewhere needs no backing file.
				a, err := d.exportNBD(ctx, obj, ref, drivers.FormatQCOW2, true, client.GrantTTL())
				if err != nil {
					return drivers.Access{}, err
				}
				a.Format = drivers.FormatRaw
				return a, nil
			}
			// Otherwise the object's bytes as stored (a qcow2 template
			// stays qcow2 to the template mount), as over HTTP.
			return d.exportNBD(ctx, obj, ref, drivers.FormatRaw, true, client.GrantTTL())
		}
	case drivers.PurposeWrite:
		switch client.Transport {
		case "", transportStore:
			if in {
				return drivers.Access{URI: ref.URI()}, nil
			}
			return refuse(outside + "; only a host in the scope writes to a filesystem store (run the step on one)")
		}
	default:
		return drivers.Access{}, fmt.Errorf("purpose %q is not %s, %s or %s: %w",
			client.Purpose, drivers.PurposeAttach, drivers.PurposeRead, drivers.PurposeWrite, errdefs.ErrInvalid)
	}
	return refuse(fmt.Sprintf("transport %q cannot serve purpose %s (a filesystem store gives file or nbd to attach, store, http or nbd to read, store to write)",
		client.Transport, client.Purpose))
}

// exportHTTP exports the object read-only over HTTP from an Up host in
// scope, for ttl (zero: until revoked).
func (d *Driver) exportHTTP(ctx context.Context, obj drivers.DataObject, ref hostops.Ref, ttl time.Duration) (drivers.Access, error) {
	h, err := d.host(ctx, obj.Store)
	if err != nil {
		return drivers.Access{}, err
	}
	expires := expiry(ttl)
	uri, err := h.Export(ctx, ref, ttl)
	if err != nil {
		return drivers.Access{}, fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	return drivers.Access{URI: uri, ReadOnly: true, Expires: expires, Revocable: true, HostID: h.HostID()}, nil
}

// expiry is when an export asked for now with ttl ends (zero: never). It
// is taken before the request goes out: the agent counts ttl from when it
// makes the export, so the export lasts at least until then.
func expiry(ttl time.Duration) time.Time {
	if ttl <= 0 {
		return time.Time{}
	}
	return time.Now().Add(ttl)
}

// exportNBD exports the object over NBD from an Up host in scope, served
// as format (the image's own to attach it, raw for its bytes as stored).
func (d *Driver) exportNBD(ctx context.Context, obj drivers.DataObject, ref hostops.Ref, format drivers.Format, readOnly bool, ttl time.Duration) (drivers.Access, error) {
	h, err := d.host(ctx, obj.Store)
	if err != nil {
		return drivers.Access{}, err
	}
	expires := expiry(ttl)
	uri, err := h.ExportNBD(ctx, hostops.NBDExportRequest{Ref: ref, Format: format, ReadOnly: readOnly, TTL: ttl})
	if err != nil {
		return drivers.Access{}, fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	return drivers.Access{URI: uri, ReadOnly: readOnly, Expires: expires, Revocable: true, HostID: h.HostID()}, nil
}

// RevokeAccess ends an export GrantAccess made, on the host that serves it
// (access.HostID). An Access that is not Revocable (a file or store name:
// any host that mounts the directory can open the file, so there is
// nothing per client to take back) is a no-op. A host that is gone took
// its exports with it: nil. A host that is not Up is errdefs.ErrUnavailable
// (retry: the export may still be served).
func (d *Driver) RevokeAccess(ctx context.Context, obj drivers.DataObject, client drivers.Client, access drivers.Access) error {
	if err := d.revokeAccess(ctx, access); err != nil {
		return fmt.Errorf("revoke host %s access %s to %s %s on filesystem store %s: %w",
			client.HostID, access.URI, obj.Type, obj.ID, obj.Store.ID, err)
	}
	return nil
}

func (d *Driver) revokeAccess(ctx context.Context, access drivers.Access) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if !access.Revocable {
		return nil
	}
	if access.HostID == "" {
		return fmt.Errorf("a revocable access names no host that serves it: %w", errdefs.ErrInvalid)
	}
	scheme, _, _ := strings.Cut(string(access.URI), "://")
	switch strings.ToLower(scheme) {
	case "http", "https", "nbd", "nbds":
	default:
		return fmt.Errorf("URI scheme %q is not an export of this provider (http, https, nbd, nbds): %w", scheme, errdefs.ErrInvalid)
	}
	h, err := d.hosts.ForHost(ctx, access.HostID)
	if errdefs.IsNotFound(err) && ctx.Err() == nil {
		return nil // the host is gone, and its exports with it
	}
	if err != nil {
		return err
	}
	if strings.EqualFold(scheme, "nbd") || strings.EqualFold(scheme, "nbds") {
		err = h.UnexportNBD(ctx, access.URI)
	} else {
		err = h.Unexport(ctx, access.URI)
	}
	if err != nil {
		return fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	return nil
}

// chunkStore is the chunk store of an image store's backups: its
// snapshots/ directory, in which the agent keeps chunks/ and manifests/.
func chunkStore(store drivers.StoreInfo) hostops.ChunkStore {
	return hostops.ChunkStore{URI: drivers.URI("store://" + store.ID + "/" + dirSnapshots)}
}

// backupRef checks that obj is a backup on an image store and returns its
// manifest's key.
func backupRef(obj drivers.DataObject) (hostops.Ref, error) {
	if obj.Store.Role != drivers.RoleImage {
		return hostops.Ref{}, fmt.Errorf("backups live on image stores, and store %s is a %s store: %w", obj.Store.ID, obj.Store.Role, errdefs.ErrInvalid)
	}
	if obj.Type != drivers.ObjectSnapshot {
		return hostops.Ref{}, fmt.Errorf("a backup is a snapshot, not a %s: %w", obj.Type, errdefs.ErrInvalid)
	}
	return objectRef(obj)
}

// BackupAccess returns where a host in the image store's scope writes or
// reads backup obj: the chunk store store://<store id>/snapshots and the
// manifest's name in it, <snapshot id>.manifest.json (the base name of the
// object's key). A host outside the scope is errdefs.ErrFailedPrecondition.
func (d *Driver) BackupAccess(ctx context.Context, obj drivers.DataObject, client drivers.Client) (drivers.BackupAccess, error) {
	a, err := d.backupAccess(ctx, obj, client)
	if err != nil {
		return drivers.BackupAccess{}, fmt.Errorf("backup access for host %s to %s on filesystem store %s: %w", client.HostID, obj.ID, obj.Store.ID, err)
	}
	return a, nil
}

func (d *Driver) backupAccess(ctx context.Context, obj drivers.DataObject, client drivers.Client) (drivers.BackupAccess, error) {
	if err := ctx.Err(); err != nil {
		return drivers.BackupAccess{}, err
	}
	if client.HostID == "" {
		return drivers.BackupAccess{}, fmt.Errorf("no host to grant access to: %w", errdefs.ErrInvalid)
	}
	ref, err := backupRef(obj)
	if err != nil {
		return drivers.BackupAccess{}, err
	}
	in, err := d.hosts.InScope(ctx, client.HostID, obj.Store.Scope)
	if err != nil {
		return drivers.BackupAccess{}, err
	}
	if !in {
		return drivers.BackupAccess{}, fmt.Errorf("host %s is outside the scope %s of image store %s and cannot reach its chunks; run the backup on a host in scope: %w",
			client.HostID, scopeName(obj.Store.Scope), obj.Store.ID, errdefs.ErrFailedPrecondition)
	}
	return drivers.BackupAccess{Chunks: chunkStore(obj.Store).URI, Manifest: path.Base(ref.Key)}, nil
}

// DeleteBackup has a host in scope remove backup obj's manifest and the
// chunks no other backup of the store uses; a missing backup is not an
// error (ManifestGone false). The host's answer reads as: Chunks and
// ZeroChunks of the deleted manifest, NewChunks and NewBytes the chunks
// removed and their bytes.
func (d *Driver) DeleteBackup(ctx context.Context, obj drivers.DataObject) (drivers.BackupStats, error) {
	st, err := d.deleteBackup(ctx, obj)
	if err != nil {
		return drivers.BackupStats{}, fmt.Errorf("delete backup %s on filesystem store %s: %w", obj.ID, obj.Store.ID, err)
	}
	return st, nil
}

func (d *Driver) deleteBackup(ctx context.Context, obj drivers.DataObject) (drivers.BackupStats, error) {
	ref, err := backupRef(obj)
	if err != nil {
		return drivers.BackupStats{}, err
	}
	h, err := d.host(ctx, obj.Store)
	if err != nil {
		return drivers.BackupStats{}, err
	}
	bi, err := h.DeleteBackup(ctx, hostops.DeleteBackupRequest{Chunks: chunkStore(obj.Store), Manifest: path.Base(ref.Key)})
	if err != nil {
		return drivers.BackupStats{}, fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	return backupStats(bi), nil
}

// CollectChunks has a host in scope remove the chunks of image store
// store's chunk store (snapshots/chunks) that no manifest
// (snapshots/manifests) refers to, under the chunk store's exclusive lock:
// what a backup killed before its manifest left behind. Chunks is the
// number removed, FreedBytes their bytes, KeptShared the chunks backups
// still use. A manifest the host cannot read is
// errdefs.ErrFailedPrecondition and nothing is removed.
func (d *Driver) CollectChunks(ctx context.Context, store drivers.StoreInfo) (drivers.BackupStats, error) {
	st, err := d.collectChunks(ctx, store)
	if err != nil {
		return drivers.BackupStats{}, fmt.Errorf("collect chunks on filesystem store %s: %w", store.ID, err)
	}
	return st, nil
}

func (d *Driver) collectChunks(ctx context.Context, store drivers.StoreInfo) (drivers.BackupStats, error) {
	if store.Role != drivers.RoleImage {
		return drivers.BackupStats{}, fmt.Errorf("backups live on image stores, and store %s is a %s store: %w", store.ID, store.Role, errdefs.ErrInvalid)
	}
	if err := checkStore(store); err != nil {
		return drivers.BackupStats{}, err
	}
	h, err := d.host(ctx, store)
	if err != nil {
		return drivers.BackupStats{}, err
	}
	ci, err := h.CollectChunks(ctx, hostops.CollectChunksRequest{Chunks: chunkStore(store)})
	if err != nil {
		return drivers.BackupStats{}, fmt.Errorf("host %s: %w", h.HostID(), err)
	}
	return drivers.BackupStats{Chunks: ci.RemovedChunks, FreedBytes: ci.RemovedBytes, KeptShared: ci.KeptChunks}, nil
}

// backupStats reads a host's answer to DeleteBackup.
func backupStats(bi hostops.BackupInfo) drivers.BackupStats {
	kept := max(bi.Chunks-bi.ZeroChunks-bi.NewChunks, 0)
	return drivers.BackupStats{
		Chunks:       bi.NewChunks,
		FreedBytes:   bi.NewBytes,
		KeptShared:   kept,
		ManifestGone: bi.Chunks > 0 || bi.Size > 0,
	}
}

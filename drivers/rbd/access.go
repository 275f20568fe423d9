//go:build ceph

package rbd

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// GrantAccess implements drivers.Driver.
//
//   - Attach (Transport "rbd", or "" for a host in the store's scope with
//     qemu's rbd driver): qemu opens rbd:POOL/IMAGE:id=USER:mon_host=...
//     as the store's cephx user; the hypervisor host needs that user's
//     keyring (/etc/ceph/ceph.client.USER.keyring; the key is never in a
//     grant).
//   - Attach with Transport "nbd" or from any other host, read and
//     write: an agent serves the
//     image (a snapshot read-only) over NBD through its qemu-storage-daemon's
//     rbd driver: the client host itself when it can (capability
//     rbd_export), else another Up host of the store's scope that can, so
//     a host without librbd reads and writes RBD images over the network.
//     The agent gets the key with the request (mutual TLS) and keeps it in
//     a private file for the export's life. A write grant makes the image
//     (obj.Size bytes) if it is missing; Access.Zeroed says it was.
func (d *Driver) GrantAccess(ctx context.Context, obj drivers.DataObject, client drivers.Client) (drivers.Access, error) {
	if _, err := d.Locate(obj); err != nil {
		return drivers.Access{}, err
	}
	loc, err := parseLocation(obj.Store.URL, obj.Store.Details)
	if err != nil {
		return drivers.Access{}, err
	}
	switch client.Purpose {
	case drivers.PurposeAttach:
		switch client.Transport {
		case "nbd":
			return d.export(ctx, loc, obj, client, false)
		case "rbd":
		case "":
			if !d.hasLibrbd(ctx, obj.Store.Scope, client.HostID) {
				// A host without librbd, or outside the store's
				// scope: an export from one that has it.
				return d.export(ctx, loc, obj, client, false)
			}
		default:
			return drivers.Access{}, fmt.Errorf("an rbd image is attached as rbd: or nbd, not %s: %w", client.Transport, errdefs.ErrFailedPrecondition)
		}
		info, err := d.Stat(ctx, obj)
		if err != nil {
			return drivers.Access{}, err
		}
		mons := strings.ReplaceAll(strings.ReplaceAll(loc.monHost, ":", `\:`), ",", ";")
		return drivers.Access{URI: drivers.URI(fmt.Sprintf("rbd:%s/%s:id=%s:mon_host=%s", loc.pool, info.Key, loc.user, mons)),
			ReadOnly: obj.Type == drivers.ObjectSnapshot, Format: drivers.FormatRaw}, nil
	case drivers.PurposeRead:
		if client.Transport != "" && client.Transport != "nbd" {
			return drivers.Access{}, fmt.Errorf("an rbd image is read over nbd, not %s: %w", client.Transport, errdefs.ErrFailedPrecondition)
		}
		return d.export(ctx, loc, obj, client, false)
	case drivers.PurposeWrite:
		if obj.Type == drivers.ObjectSnapshot {
			return drivers.Access{}, fmt.Errorf("a snapshot is not written: %w", errdefs.ErrInvalid)
		}
		if client.Transport != "" && client.Transport != "nbd" {
			return drivers.Access{}, fmt.Errorf("an rbd image is written over nbd, not %s: %w", client.Transport, errdefs.ErrFailedPrecondition)
		}
		return d.export(ctx, loc, obj, client, true)
	}
	return drivers.Access{}, fmt.Errorf("access purpose %q: %w", client.Purpose, errdefs.ErrInvalid)
}

// export has an agent serve obj over NBD for client.
func (d *Driver) export(ctx context.Context, loc location, obj drivers.DataObject, client drivers.Client, write bool) (drivers.Access, error) {
	if d.hosts == nil {
		return drivers.Access{}, fmt.Errorf("rbd: no agents to serve images over nbd: %w", errdefs.ErrFailedPrecondition)
	}
	mons, err := v1Mons(loc.monHost)
	if err != nil {
		return drivers.Access{}, err
	}
	key, err := readKey(loc.keyring, loc.user)
	if err != nil {
		return drivers.Access{}, err
	}
	var t target
	err = d.withPool(ctx, obj.Store, func(_ *cluster, io *rados.IOContext) error {
		if t, err = d.resolve(io, obj); err == nil {
			_, err = statTarget(io, obj, t)
		}
		return err
	})
	zeroed := false
	if write && errdefs.IsNotFound(err) {
		// Made here when missing: a copy's destination.
		if _, err = d.Create(ctx, obj); err == nil {
			zeroed = true
		}
	}
	if err != nil {
		return drivers.Access{}, err
	}
	h, err := d.exportHost(ctx, obj.Store.Scope, client.HostID)
	if err != nil {
		return drivers.Access{}, err
	}
	readOnly := !write && client.Purpose != drivers.PurposeAttach || t.snap != ""
	ttl := client.GrantTTL()
	uri, err := h.ExportNBD(ctx, hostops.NBDExportRequest{
		Ref:    hostops.Ref{Store: obj.Store.ID, Key: t.String()},
		RBD:    &hostops.RBDImage{Pool: loc.pool, Image: t.image, Snapshot: t.snap, User: loc.user, Key: key, Mons: mons},
		Format: drivers.FormatRaw, ReadOnly: readOnly, TTL: ttl,
	})
	if err != nil {
		return drivers.Access{}, fmt.Errorf("export %s over nbd on host %s: %w", t, h.HostID(), err)
	}
	a := drivers.Access{URI: uri, ReadOnly: readOnly, Revocable: true, HostID: h.HostID(), Zeroed: zeroed, Format: drivers.FormatRaw}
	if ttl > 0 {
		a.Expires = time.Now().Add(ttl)
	}
	return a, nil
}

// exportHost is the host that serves an export for client: the client
// itself when it is Up in scope and can, else the least busy that can.
func (d *Driver) exportHost(ctx context.Context, scope drivers.Scope, client string) (hostops.Host, error) {
	ctx = drivers.WithNeeds(ctx, drivers.CapRBDExport)
	if client != "" {
		ctx = drivers.WithHost(ctx, client)
	}
	h, err := d.hosts.ForScope(ctx, scope)
	if err != nil {
		return nil, fmt.Errorf("a host to serve the rbd image over nbd: %w", err)
	}
	return h, nil
}

// hasLibrbd says whether host opens rbd: itself: it is Up in scope and has
// qemu's rbd driver (capability rbd_export). Without agents to ask, or
// when no host of the scope has it, every host is taken to (the rbd:
// grant of a store whose hosts were set up by hand).
func (d *Driver) hasLibrbd(ctx context.Context, scope drivers.Scope, host string) bool {
	if d.hosts == nil {
		return true
	}
	h, err := d.exportHost(ctx, scope, host)
	if err != nil {
		in, ierr := d.hosts.InScope(ctx, host, scope)
		return ierr == nil && in
	}
	return h.HostID() == host
}

// RevokeAccess implements drivers.Driver: an NBD export ends on the host
// that serves it; an rbd: grant holds nothing.
func (d *Driver) RevokeAccess(ctx context.Context, obj drivers.DataObject, client drivers.Client, access drivers.Access) error {
	if !access.Revocable {
		return nil
	}
	if d.hosts == nil || access.HostID == "" {
		return fmt.Errorf("revoke %s: no host named: %w", obj.ID, errdefs.ErrInvalid)
	}
	h, err := d.hosts.ForHost(ctx, access.HostID)
	if err != nil {
		return fmt.Errorf("revoke the nbd export of %s on host %s: %w", obj.ID, access.HostID, err)
	}
	return h.UnexportNBD(ctx, access.URI)
}

// ListGrants implements drivers.GrantLister: the NBD exports of the
// store's images on the Up hosts of its scope.
func (d *Driver) ListGrants(ctx context.Context, store drivers.StoreInfo) ([]drivers.Grant, error) {
	if d.hosts == nil {
		return nil, nil
	}
	hs, err := d.hosts.AllInScope(ctx, store.Scope)
	if err != nil {
		if errdefs.IsUnavailable(err) {
			return nil, nil
		}
		return nil, err
	}
	var out []drivers.Grant
	var errs []error
	for _, h := range hs {
		xs, err := h.ListExports(ctx, store.ID)
		if err != nil {
			errs = append(errs, fmt.Errorf("host %s: %w", h.HostID(), err))
			continue
		}
		for _, x := range xs {
			if x.Kind == hostops.ExportNBD {
				out = append(out, hostops.GrantOf(h.HostID(), x))
			}
		}
	}
	return out, errors.Join(errs...)
}

// v1Mons turns a mon_host value (HOST:PORT[,HOST:PORT] or Ceph's
// [v2:H:P,v1:H:P] vectors) into the monitors' msgr v1 host:port, which
// qemu's rbd driver takes.
func v1Mons(monHost string) ([]string, error) {
	var out []string
	for _, f := range strings.FieldsFunc(monHost, func(r rune) bool { return r == ',' || r == ' ' || r == '[' || r == ']' }) {
		switch {
		case strings.HasPrefix(f, "v2:"):
			continue
		case strings.HasPrefix(f, "v1:"):
			f = strings.TrimPrefix(f, "v1:")
		}
		if !strings.Contains(f, ":") {
			f += ":6789"
		}
		out = append(out, f)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("mon_host %q names no msgr v1 monitor address (HOST:PORT, v1:HOST:PORT): %w", monHost, errdefs.ErrInvalid)
	}
	return out, nil
}

// readKey reads user's key from a keyring file ([client.USER] then
// key = BASE64). The key is never put in an error.
func readKey(path, user string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("keyring of client.%s: %w", user, errors.Join(err, errdefs.ErrFailedPrecondition))
	}
	defer f.Close()
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]") {
			section = strings.TrimSpace(line[1 : len(line)-1])
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if ok && section == "client."+user && strings.TrimSpace(k) == "key" {
			key := strings.TrimSpace(v)
			if b, err := base64.StdEncoding.DecodeString(key); err != nil || len(b) == 0 {
				return "", fmt.Errorf("keyring %s: the key of client.%s is not base64: %w", path, user, errdefs.ErrInvalid)
			}
			return key, nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("keyring %s: %w", path, err)
	}
	return "", fmt.Errorf("keyring %s has no key for client.%s: %w", path, user, errdefs.ErrFailedPrecondition)
}

//go:build ceph

package rbd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"

	"github.com/ceph/go-ceph/rados"
	cephrbd "github.com/ceph/go-ceph/rbd"

	"github.com/stowage/stowage/datapath/checksum"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

var _ drivers.Importer = (*Driver)(nil)

// importBlock is what Import reads and writes at a time: a block of zeros
// is not written (the image stays thin where the source has holes).
const importBlock = 4 << 20

// Import implements drivers.Importer: the image is made at the source's
// length (a raw image, which the data motion gives: another store's host
// converts and exports a staging copy) and written through librbd block by
// block, zero blocks skipped; a checksum given is verified. On any failure
// the image is removed: no partial object is left.
func (d *Driver) Import(ctx context.Context, dst drivers.DataObject, src drivers.ImportSource, progress drivers.Progress) (drivers.ObjectInfo, error) {
	if err := checkRaw(dst); err != nil {
		return drivers.ObjectInfo{}, err
	}
	name, err := d.Locate(dst)
	if err != nil {
		return drivers.ObjectInfo{}, err
	}
	var sum checksum.Sum
	if src.Checksum != "" {
		if sum, err = checksum.Parse(src.Checksum); err != nil {
			return drivers.ObjectInfo{}, err
		}
	}
	client := d.fetch // the address policy for operators' URLs
	if src.Internal {
		client = d.peer // a URL Stowage made (an agent's export)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, src.URL, nil)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("import: %w", errors.Join(err, errdefs.ErrInvalid))
	}
	resp, err := client.Do(req)
	if err != nil {
		return drivers.ObjectInfo{}, fmt.Errorf("import: GET: %w", errors.Join(err, errdefs.ErrUnavailable))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return drivers.ObjectInfo{}, fmt.Errorf("import: GET: %s: %w", resp.Status, errdefs.ErrUnavailable)
	}
	size := resp.ContentLength
	if size <= 0 {
		return drivers.ObjectInfo{}, fmt.Errorf("import: the source gives no length: %w", errdefs.ErrFailedPrecondition)
	}
	obj := dst
	obj.Size = size
	if _, err := d.Create(ctx, obj); err != nil {
		return drivers.ObjectInfo{}, err
	}
	var info drivers.ObjectInfo
	err = d.withPool(ctx, dst.Store, func(_ *cluster, ioctx *rados.IOContext) error {
		img, err := cephrbd.OpenImage(ioctx, name, cephrbd.NoSnapshot)
		if err != nil {
			return fmt.Errorf("image %s: %w", name, classify(err))
		}
		var h hash.Hash = sha256.New()
		if !sum.IsZero() {
			h = checksum.New(sum.Algo)
		}
		written, skipped, err := fill(ctx, img, io.TeeReader(resp.Body, h), size, progress)
		if cerr := img.Close(); err == nil && cerr != nil {
			err = classify(cerr)
		}
		if err != nil {
			return err
		}
		if !sum.IsZero() {
			if err := sum.Check(hex.EncodeToString(h.Sum(nil))); err != nil {
				return err
			}
		}
		if info, err = stat(ioctx, dst, name); err != nil {
			return err
		}
		info.Method, info.BytesWritten, info.BytesSkipped = "import", written, skipped
		if sum.IsZero() || sum.Algo == "sha256" {
			info.SHA256 = hex.EncodeToString(h.Sum(nil))
		}
		return nil
	})
	if err != nil {
		_ = d.Delete(context.WithoutCancel(ctx), dst)
		return drivers.ObjectInfo{}, fmt.Errorf("import into %s: %w", name, err)
	}
	return info, nil
}

// fill writes size bytes of r into img, skipping all-zero blocks.
func fill(ctx context.Context, img *cephrbd.Image, r io.Reader, size int64, progress drivers.Progress) (written, skipped int64, err error) {
	buf := make([]byte, importBlock)
	zero := make([]byte, importBlock)
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return written, skipped, err
		}
		n, err := io.ReadFull(r, buf[:min(int64(importBlock), size-off)])
		if err != nil {
			return written, skipped, fmt.Errorf("read the source at %d of %d: %w", off, size, errors.Join(err, errdefs.ErrUnavailable))
		}
		if bytes.Equal(buf[:n], zero[:n]) {
			skipped += int64(n)
		} else {
			if _, err := img.WriteAt(buf[:n], off); err != nil {
				return written, skipped, fmt.Errorf("write at %d: %w", off, classify(err))
			}
			written += int64(n)
		}
		off += int64(n)
		if progress != nil {
			progress(off, size)
		}
	}
	if err := img.Flush(); err != nil {
		return written, skipped, classify(err)
	}
	return written, skipped, nil
}

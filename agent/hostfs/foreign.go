package hostfs

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// The foreign template formats (vhd, vhdx, vmdk) are kept on an image
// store as uploaded and read only by qemu-img, the format always given
// (-f vpc|vhdx|vmdk). An image must hold all of its data: a VMDK must be
// a single monolithic sparse or streamOptimized file (its descriptor
// embedded, its one extent the file itself), and a VHD or VHDX must not be
// a differencing disk (no parent locator). The signature is read before
// qemu-img opens the file at all: a VMDK descriptor file names extent
// files that qemu-img would open, relative to the image or absolute.

// Where each format's signature sits.
const (
	vhdCookie  = "conectix" // the VHD footer, at 0 (dynamic) or size-512
	vhdxMagic  = "vhdxfile" // the VHDX file type identifier, at 0
	vmdkMagic  = "KDMV"     // a VMDK4 sparse extent header, at 0
	vhdFooter  = 512
	vhdDiffing = 4 // footer disk type of a differencing disk
)

// foreignMagic checks the signature of a vhd, vhdx or vmdk at host, and
// for a VHD that it is not a differencing disk. Failures are ErrInvalid.
func foreignMagic(host string, f drivers.Format) error {
	fh, err := os.Open(host)
	if err != nil {
		return classed(err)
	}
	defer fh.Close()
	read := func(off int64, n int) []byte {
		b := make([]byte, n)
		if off < 0 {
			return nil
		}
		if m, _ := fh.ReadAt(b, off); m != n {
			return nil
		}
		return b
	}
	switch f {
	case drivers.FormatVMDK:
		if b := read(0, 4); string(b) != vmdkMagic {
			return fmt.Errorf("declared vmdk, but the file does not start with a sparse extent header (%q): only a monolithic sparse or streamOptimized VMDK is accepted; a descriptor file whose extents are separate files is refused: %w", vmdkMagic, errdefs.ErrInvalid)
		}
	case drivers.FormatVHDX:
		if b := read(0, 8); string(b) != vhdxMagic {
			return fmt.Errorf("declared vhdx, but there is no VHDX signature %q at byte 0: %w", vhdxMagic, errdefs.ErrInvalid)
		}
	case drivers.FormatVHD:
		size, err := fh.Seek(0, io.SeekEnd)
		if err != nil {
			return classed(err)
		}
		footer := read(0, vhdFooter)
		if footer == nil || string(footer[:8]) != vhdCookie {
			footer = read(size-vhdFooter, vhdFooter)
		}
		if footer == nil || string(footer[:8]) != vhdCookie {
			return fmt.Errorf("declared vhd, but there is no VHD footer (%q) at the start or end of the file: %w", vhdCookie, errdefs.ErrInvalid)
		}
		if t := binary.BigEndian.Uint32(footer[60:64]); t == vhdDiffing {
			return fmt.Errorf("vhd is a differencing disk (its parent locator names another file); templates must be standalone: %w", errdefs.ErrInvalid)
		}
	default:
		return fmt.Errorf("format %q is not vhd, vhdx or vmdk: %w", f, errdefs.ErrInternal)
	}
	return nil
}

// checkForeign checks what qemu-img info (opened as f) says of the foreign
// image at host: no backing file and, for a VMDK, one extent that is the
// image itself, of a monolithic sparse or streamOptimized image.
func checkForeign(host string, f drivers.Format, qi qemuimg.Info) error {
	if qi.BackingFilename != "" {
		return fmt.Errorf("%s template has a parent (%s); templates must be standalone: %w", f, qi.BackingFilename, errdefs.ErrInvalid)
	}
	if f != drivers.FormatVMDK {
		return nil
	}
	switch qi.CreateType {
	case "monolithicSparse", "streamOptimized":
	default:
		return fmt.Errorf("vmdk create type %q: only monolithicSparse and streamOptimized are accepted (the data must be in the image): %w", qi.CreateType, errdefs.ErrInvalid)
	}
	if len(qi.Extents) != 1 {
		return fmt.Errorf("vmdk has %d extents; a template must be one file: %w", len(qi.Extents), errdefs.ErrInvalid)
	}
	if e := qi.Extents[0].Filename; filepath.Clean(e) != filepath.Clean(host) && filepath.Clean(e) != filepath.Clean(qi.Filename) {
		return fmt.Errorf("vmdk extent %q is outside the image; a template must hold its own data: %w", e, errdefs.ErrInvalid)
	}
	return nil
}

// validateForeign validates the vhd, vhdx or vmdk at host (its signature
// already checked by foreignMagic): opened as the declared format only,
// standalone (checkForeign), and passing qemu-img check where the format
// has one (vhdx, vmdk; qemu's vpc driver has none).
func (l *Local) validateForeign(ctx context.Context, host string, f drivers.Format) (qemuimg.Info, error) {
	qf := diskFormat(f)
	qi, err := l.qemu.Info(ctx, host, qemuimg.AssumeFormat(qf))
	if err != nil {
		return qi, err
	}
	if err := checkForeign(host, f, qi); err != nil {
		return qi, err
	}
	if qi.Encrypted {
		return qi, fmt.Errorf("%s image is encrypted: %w", f, errdefs.ErrInvalid)
	}
	if f == drivers.FormatVHD {
		return qi, nil
	}
	r, err := l.qemu.Check(ctx, host, qf)
	if err != nil {
		return qi, err
	}
	if !r.OK() {
		return qi, fmt.Errorf("%s image fails qemu-img check (%d corruptions, %d errors): %w", f, r.Corruptions, r.CheckErrors, errdefs.ErrInvalid)
	}
	return qi, nil
}

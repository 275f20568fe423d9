package hostfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// Declared formats and backing chains (imageOps in requests.go, "Declared
// formats"). No step probes the format of an existing image: a raw volume
// is guest-writable, and a qcow2 header its guest wrote would otherwise
// make qemu-img (or the copy engine's qcow2 reader) follow a backing file
// of the guest's choosing (/etc/shadow, another tenant's disk) and copy
// its data into a snapshot, backup, template or volume. Every step opens an
// existing image as the format the request declares (declared), and a
// declared qcow2 with a backing file is accepted only when its whole chain
// passes checkChain.

// maxChain bounds the length of a backing chain the agent follows.
const maxChain = 256

// declared checks the declared format of an existing image (what names it
// in messages) and returns the qemu-img format to open it as: raw for raw
// and ISO, qcow2 for qcow2. An empty format is errdefs.ErrInvalid: the
// agent never probes.
func declared(what string, f drivers.Format) (string, error) {
	switch f {
	case drivers.FormatRaw, drivers.FormatQCOW2, drivers.FormatISO, drivers.FormatVHD, drivers.FormatVHDX, drivers.FormatVMDK:
		return diskFormat(f), nil
	case "":
		return "", fmt.Errorf("%s: no format declared; the agent opens an existing image only as the format its records give, never probing it: %w", what, errdefs.ErrInvalid)
	}
	return "", fmt.Errorf("%s: declared format %q is not raw, qcow2, iso, vhd, vhdx or vmdk: %w", what, f, errdefs.ErrInvalid)
}

// storeOf returns the store directory holding host (a path on this
// machine): its nearest ancestor carrying MarkerFile (under the root).
func (l *Local) storeOf(host string) (string, bool) {
	for d := filepath.Dir(host); ; d = filepath.Dir(d) {
		if l.root != "" && !strings.HasPrefix(d+"/", l.root+"/") {
			return "", false
		}
		if fi, err := os.Lstat(filepath.Join(d, MarkerFile)); err == nil && fi.Mode().IsRegular() {
			return d, true
		}
		if d == filepath.Dir(d) {
			return "", false
		}
	}
}

// within reports whether p is strictly below dir.
func within(p, dir string) bool {
	return strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

// hasProtocol reports whether qemu reads name as a protocol ("nbd:...",
// "json:{...}") rather than a file: a ':' before any '/'.
func hasProtocol(name string) bool {
	i := strings.IndexAny(name, ":/")
	return i >= 0 && name[i] == ':'
}

// checkChain enforces the backing rule on the qcow2 at host (a path on
// this machine), whose qemu-img info, read with the format asserted as
// qcow2, is qi. A standalone image passes. Otherwise every layer down the
// chain must:
//
//   - have no external data file;
//   - name its backing file as a plain file (no qemu protocol) that lies,
//     by name and after resolving symbolic links, inside the store
//     directory holding host (the nearest ancestor with MarkerFile) or,
//     from there on to the end of the chain, inside one backing root (the
//     host's read-only template mount, SetBackingRoots), and is a regular
//     file;
//   - record the backing file's format, raw or qcow2: qemu-img and the copy
//     engine open each layer as recorded, never probing;
//
// and the chain must end (no loop, at most maxChain layers). A violation is
// errdefs.ErrInvalid naming the offending backing path; a missing backing
// file is errdefs.ErrNotFound. Each qcow2 layer is opened with
// qemu-img info -f qcow2, which never opens its backing file.
//
// qi may describe an image not written yet (a linked clone about to be
// created on a base, an image about to be rebased): its BackingFilename
// and BackingFormat are what the new image will record.
func (l *Local) checkChain(ctx context.Context, host string, qi qemuimg.Info) error {
	var store, storeReal, inRoot string
	seen := map[string]bool{}
	if r, err := filepath.EvalSymlinks(host); err == nil {
		seen[r] = true
	}
	cur := host
	for depth := 0; ; depth++ {
		if qi.DataFile != "" {
			return fmt.Errorf("qcow2 %s has an external data file (%s); images must hold their own data: %w", l.callerPath(cur), qi.DataFile, errdefs.ErrInvalid)
		}
		name := qi.BackingFilename
		if name == "" {
			return nil
		}
		if store == "" {
			var ok bool
			if store, ok = l.storeOf(host); !ok {
				return fmt.Errorf("qcow2 %s has backing file %s but is not inside a store (no %s above it): a backing chain must stay inside its store: %w",
					l.callerPath(host), name, MarkerFile, errdefs.ErrInvalid)
			}
			real, err := filepath.EvalSymlinks(store)
			if err != nil {
				return classed(err)
			}
			storeReal = real
		}
		if depth >= maxChain {
			return fmt.Errorf("the backing chain of %s is longer than %d images: %w", l.callerPath(host), maxChain, errdefs.ErrInvalid)
		}
		if hasProtocol(name) {
			return fmt.Errorf("backing file %q of %s names a qemu protocol, not a file of store %s: %w", name, l.callerPath(cur), l.callerPath(store), errdefs.ErrInvalid)
		}
		b := name
		if !filepath.IsAbs(b) {
			b = filepath.Join(filepath.Dir(cur), b)
		}
		b = filepath.Clean(b)
		// A chain stays inside its store, or ends in the host's template
		// mount (a lazy volume's template); it never leaves the mount again.
		dir, dirReal := store, storeReal
		if inRoot != "" || !within(b, store) {
			r, rr, ok := l.backingRoot(b)
			if !ok || (inRoot != "" && r != inRoot) {
				return fmt.Errorf("backing file %s of %s is outside its store %s; refusing to read it: %w", l.callerPath(b), l.callerPath(cur), l.callerPath(store), errdefs.ErrInvalid)
			}
			dir, dirReal, inRoot = r, rr, r
		}
		real, err := filepath.EvalSymlinks(b)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("backing file %s of %s does not exist: %w", l.callerPath(b), l.callerPath(cur), errors.Join(err, errdefs.ErrNotFound))
			}
			return classed(err)
		}
		if !within(real, dirReal) {
			return fmt.Errorf("backing file %s of %s resolves to %s, outside %s; refusing to read it: %w", l.callerPath(b), l.callerPath(cur), real, l.callerPath(dir), errdefs.ErrInvalid)
		}
		if fi, err := os.Stat(real); err != nil {
			return classed(err)
		} else if !fi.Mode().IsRegular() {
			return fmt.Errorf("backing file %s of %s is not a regular file: %w", l.callerPath(b), l.callerPath(cur), errdefs.ErrInvalid)
		}
		switch qi.BackingFormat {
		case qemuimg.FormatRaw:
			return nil // read as bytes: the end of the chain
		case qemuimg.FormatQCOW2:
		case "":
			return fmt.Errorf("backing file %s of %s is recorded without its format; the agent does not let qemu probe it: %w", l.callerPath(b), l.callerPath(cur), errdefs.ErrInvalid)
		default:
			return fmt.Errorf("backing file %s of %s is recorded as %q; a chain is made of raw and qcow2 images: %w", l.callerPath(b), l.callerPath(cur), qi.BackingFormat, errdefs.ErrInvalid)
		}
		if seen[real] {
			return fmt.Errorf("the backing chain of %s loops at %s: %w", l.callerPath(host), l.callerPath(b), errdefs.ErrInvalid)
		}
		seen[real] = true
		// A layer below the top is a base: read-only, its info cached.
		if qi, err = l.baseInfo(ctx, b, qemuimg.FormatQCOW2); err != nil {
			return fmt.Errorf("backing file %s of %s: %w", l.callerPath(b), l.callerPath(cur), err)
		}
		cur = b
	}
}

// openDeclared reads the qemu-img info of the existing image at host as
// format (a qemu-img format from declared; read shared unless exclusive,
// so that a volume a VM holds open fails with
// errdefs.ErrFailedPrecondition), and checks the backing chain of a qcow2.
func (l *Local) openDeclared(ctx context.Context, host, format string, exclusive bool) (qemuimg.Info, error) {
	opts := []qemuimg.InfoOption{qemuimg.AssumeFormat(format)}
	if !exclusive {
		opts = append(opts, qemuimg.ForceShare())
	}
	return l.checkDeclared(ctx, host, format, func() (qemuimg.Info, error) { return l.qemu.Info(ctx, host, opts...) })
}

// openBase is openDeclared, shared, for a base image (a clone's base:
// read-only by contract), whose qemu-img info may come from the cache
// (baseInfo). Its chain and, for a foreign format, its structure are
// checked every time.
func (l *Local) openBase(ctx context.Context, host, format string) (qemuimg.Info, error) {
	return l.checkDeclared(ctx, host, format, func() (qemuimg.Info, error) { return l.baseInfo(ctx, host, format) })
}

// checkDeclared is openDeclared with info reading host's qemu-img info.
func (l *Local) checkDeclared(ctx context.Context, host, format string, info func() (qemuimg.Info, error)) (qemuimg.Info, error) {
	if f := formatOf(format); f.Foreign() {
		if err := foreignMagic(host, f); err != nil {
			return qemuimg.Info{}, err
		}
	}
	qi, err := info()
	if err != nil {
		return qi, err
	}
	if format == qemuimg.FormatQCOW2 {
		if err := l.checkChain(ctx, host, qi); err != nil {
			return qi, err
		}
	}
	if f := formatOf(format); f.Foreign() {
		// Validated at import; checked again wherever it is opened (a
		// downloaded copy is a new file).
		if err := checkForeign(host, f, qi); err != nil {
			return qi, err
		}
	}
	return qi, nil
}

package agent

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
	"github.com/stowage/stowage/redact"
)

// LUNManager is a host's iSCSI target (agent/iscsi/tgt over tgtd; a vendor
// array's manager is another implementation). Backing paths are files of
// this host.
type LUNManager interface {
	EnsureTarget(ctx context.Context, iqn string) error
	DeleteTarget(ctx context.Context, iqn string) error
	AddLUN(ctx context.Context, iqn, backing string) (int, error)
	RemoveLUN(ctx context.Context, iqn, backing string) error
	Refresh(ctx context.Context, iqn, backing string) error
	Allow(ctx context.Context, iqn, initiator string) error
	SetCHAP(ctx context.Context, iqn, user, secret string) error
	LUNNumbers(ctx context.Context, iqn string) (map[string]int, error)
}

// LUNWriter writes images into LUNs and reads them out through the
// userspace initiator (datapath/iscsi: libiscsi in qemu-img).
type LUNWriter interface {
	// Write writes the guest view of src (a file of this host or an
	// http(s) URL) of format into the LUN at dest (iscsi://…).
	Write(ctx context.Context, src, format, dest string, destIsZero bool, progress func(done, total int64)) error
}

// WithLUNs makes this host an iSCSI target host (m) and, with w, a host
// that writes LUNs from userspace.
func WithLUNs(m LUNManager, w LUNWriter) Option {
	return func(a *Agent) { a.host.luns, a.host.lunWriter = m, w }
}

func (h *LocalHost) lunManager() (LUNManager, error) {
	if h.luns == nil {
		return nil, fmt.Errorf("host %s runs no iSCSI target (tgtd; stowage agent --iscsi-target): %w", h.HostID(), errdefs.ErrNotImplemented)
	}
	return h.luns, nil
}

// storeServed checks that this agent serves the target's store (its LUNs'
// files are beneath the store's directory).
func (h *LocalHost) storeServed(t hostops.ISCSITarget) error {
	if _, ok := h.res.Stores()[t.Store]; !ok {
		return fmt.Errorf("store %s is not served by host %s: %w", t.Store, h.HostID(), errdefs.ErrPermissionDenied)
	}
	if !strings.HasPrefix(t.IQN, "iqn.") && !strings.HasPrefix(t.IQN, "eui.") {
		return fmt.Errorf("target name %q is not an iqn. or eui. name: %w", t.IQN, errdefs.ErrInvalid)
	}
	return nil
}

// EnsureTarget implements hostops.LUNs.
func (h *LocalHost) EnsureTarget(ctx context.Context, t hostops.ISCSITarget) error {
	m, err := h.lunManager()
	if err != nil {
		return err
	}
	if err := h.storeServed(t); err != nil {
		return err
	}
	if err := m.EnsureTarget(ctx, t.IQN); err != nil {
		return err
	}
	for _, i := range t.Initiators {
		if err := m.Allow(ctx, t.IQN, i.IQN); err != nil {
			return err
		}
		if i.CHAPUser != "" {
			if err := m.SetCHAP(ctx, t.IQN, i.CHAPUser, i.CHAPSecret); err != nil {
				return err
			}
		}
	}
	return nil
}

// DeleteTarget implements hostops.LUNs.
func (h *LocalHost) DeleteTarget(ctx context.Context, t hostops.ISCSITarget) error {
	m, err := h.lunManager()
	if err != nil {
		return err
	}
	if err := h.storeServed(t); err != nil {
		return err
	}
	return m.DeleteTarget(ctx, t.IQN)
}

func (h *LocalHost) lunPath(req hostops.LUNRequest) (string, error) {
	if err := h.storeServed(req.Target); err != nil {
		return "", err
	}
	return h.object(hostops.Ref{Store: req.Target.Store, Key: req.Key})
}

// lunInfo describes the LUN backed by path.
func (h *LocalHost) lunInfo(ctx context.Context, m LUNManager, req hostops.LUNRequest, path string) (hostops.LUNInfo, error) {
	nums, err := m.LUNNumbers(ctx, req.Target.IQN)
	if err != nil {
		return hostops.LUNInfo{}, err
	}
	n, ok := nums[path]
	if !ok {
		return hostops.LUNInfo{}, fmt.Errorf("LUN of %s on target %s: %w", req.Key, req.Target.IQN, errdefs.ErrNotFound)
	}
	fi, err := h.fs.StatPath(ctx, path)
	if err != nil {
		return hostops.LUNInfo{}, err
	}
	return hostops.LUNInfo{Number: n, Key: req.Key, Size: fi.Size, AllocatedBytes: fi.AllocatedBytes}, nil
}

// CreateLUN implements hostops.LUNs.
func (h *LocalHost) CreateLUN(ctx context.Context, req hostops.LUNRequest) (hostops.LUNInfo, error) {
	m, err := h.lunManager()
	if err != nil {
		return hostops.LUNInfo{}, err
	}
	p, err := h.lunPath(req)
	if err != nil {
		return hostops.LUNInfo{}, err
	}
	if _, err := os.Lstat(p); os.IsNotExist(err) {
		if _, err := h.fs.CreateImage(ctx, p, drivers.FormatRaw, req.Size); err != nil {
			return hostops.LUNInfo{}, err
		}
	}
	if _, err := m.AddLUN(ctx, req.Target.IQN, p); err != nil {
		return hostops.LUNInfo{}, err
	}
	return h.lunInfo(ctx, m, req, p)
}

// DeleteLUN implements hostops.LUNs.
func (h *LocalHost) DeleteLUN(ctx context.Context, req hostops.LUNRequest) error {
	m, err := h.lunManager()
	if err != nil {
		return err
	}
	p, err := h.lunPath(req)
	if err != nil {
		return err
	}
	if err := m.RemoveLUN(ctx, req.Target.IQN, p); err != nil {
		return err
	}
	return h.fs.DeletePath(ctx, p)
}

// ResizeLUN implements hostops.LUNs.
func (h *LocalHost) ResizeLUN(ctx context.Context, req hostops.LUNRequest) (hostops.LUNInfo, error) {
	m, err := h.lunManager()
	if err != nil {
		return hostops.LUNInfo{}, err
	}
	p, err := h.lunPath(req)
	if err != nil {
		return hostops.LUNInfo{}, err
	}
	if _, err := h.fs.ResizeImage(ctx, p, drivers.FormatRaw, req.Size); err != nil {
		return hostops.LUNInfo{}, err
	}
	if err := m.Refresh(ctx, req.Target.IQN, p); err != nil {
		return hostops.LUNInfo{}, err
	}
	return h.lunInfo(ctx, m, req, p)
}

// ListLUNs implements hostops.LUNs.
func (h *LocalHost) ListLUNs(ctx context.Context, t hostops.ISCSITarget) ([]hostops.LUNInfo, error) {
	m, err := h.lunManager()
	if err != nil {
		return nil, err
	}
	if err := h.storeServed(t); err != nil {
		return nil, err
	}
	root := h.res.Stores()[t.Store]
	nums, err := m.LUNNumbers(ctx, t.IQN)
	if err != nil {
		return nil, err
	}
	var out []hostops.LUNInfo
	for path, n := range nums {
		key, ok := strings.CutPrefix(path, root+"/")
		if !ok {
			continue // a LUN this store did not make
		}
		info := hostops.LUNInfo{Number: n, Key: key}
		if fi, err := h.fs.StatPath(ctx, path); err == nil {
			info.Size, info.AllocatedBytes = fi.Size, fi.AllocatedBytes
		}
		out = append(out, info)
	}
	return out, nil
}

// WriteLUN implements hostops.LUNs.
func (h *LocalHost) WriteLUN(ctx context.Context, req hostops.WriteLUNRequest, progress drivers.Progress) (hostops.ImageInfo, error) {
	if h.lunWriter == nil {
		return hostops.ImageInfo{}, fmt.Errorf("host %s has no userspace iSCSI initiator (qemu-img with the iscsi block driver): %w", h.HostID(), errdefs.ErrNotImplemented)
	}
	src, err := h.copySource(req.Source)
	if err != nil {
		return hostops.ImageInfo{}, err
	}
	if err := checkISCSIURL(req.Dest); err != nil {
		return hostops.ImageInfo{}, err
	}
	var report func(done, total int64)
	if progress != nil {
		report = func(done, total int64) { progress(done, total) }
	}
	if err := h.lunWriter.Write(ctx, h.fs.OnHost(src), string(req.SourceFormat), string(req.Dest), req.DestIsZero, report); err != nil {
		return hostops.ImageInfo{}, err
	}
	return hostops.ImageInfo{Format: drivers.FormatRaw, Method: "qemu-img convert (libiscsi)"}, nil
}

// checkISCSIURL admits an iscsi://portal/iqn/lun destination only.
func checkISCSIURL(u drivers.URI) error {
	p, err := url.Parse(string(u))
	if err != nil || p.Scheme != "iscsi" || p.Host == "" {
		return fmt.Errorf("LUN %q is not an iscsi://portal/iqn/lun URL: %w", redact.URL(string(u)), errdefs.ErrPermissionDenied)
	}
	return nil
}

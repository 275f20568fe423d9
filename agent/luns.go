package agent

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strings"

	"github.com/stowage/stowage/failpoint"

	"github.com/stowage/stowage/agent/iscsi/tgt"
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
	Disallow(ctx context.Context, iqn, initiator string) error
	SetCHAP(ctx context.Context, iqn, user, secret string) error
	RemoveCHAP(ctx context.Context, iqn, user string) error
	LUNs(ctx context.Context, iqn string) ([]tgt.LUN, error)
	Target(ctx context.Context, iqn string) (tgt.Target, error)
	Logout(ctx context.Context, iqn, initiator string) (int, error)
}

// lunNumbers maps the backing files of iqn's LUNs to their numbers.
func lunNumbers(ctx context.Context, m LUNManager, iqn string) (map[string]int, error) {
	luns, err := m.LUNs(ctx, iqn)
	if err != nil {
		return nil, err
	}
	out := make(map[string]int, len(luns))
	for _, l := range luns {
		out[l.Backing] = l.Number
	}
	return out, nil
}

// LUNIO moves images into and out of LUNs through the userspace
// initiator (datapath/iscsi: libiscsi in qemu-img).
type LUNIO interface {
	// Convert writes src (a file of this host or an iscsi:// LUN) of
	// srcFormat into dst (a file or a LUN) as dstFormat; when the formats
	// are equal the bytes are copied as they are. dstIsZero says dst reads
	// as zeros, so holes are not written.
	Convert(ctx context.Context, src, srcFormat, dst, dstFormat string, dstIsZero bool, progress func(done, total int64)) error
}

// Connector logs this host's kernel initiator in to LUNs and out again
// (agent/iscsi/connector: the os-brick sequence over iscsiadm). grant is
// an iscsi:// grant URI; device is the LUN's block device.
type Connector interface {
	Connect(ctx context.Context, grant string) (device string, err error)
	Disconnect(ctx context.Context, grant string) error
}

// WithConnector gives the agent its kernel initiator (nil: none).
func WithConnector(c Connector) Option { return func(a *Agent) { a.host.connector = c } }

// ConnectLUN implements hostops.LUNs.
func (h *LocalHost) ConnectLUN(ctx context.Context, uri drivers.URI) (drivers.URI, error) {
	if err := checkISCSIURL(uri); err != nil {
		return "", err
	}
	if h.connector == nil {
		return "", fmt.Errorf("host %s has no kernel iSCSI initiator (open-iscsi and iscsi_tcp): %w", h.HostID(), errdefs.ErrNotImplemented)
	}
	dev, err := h.connector.Connect(ctx, string(uri))
	if err != nil {
		return "", err
	}
	return drivers.URI((&url.URL{Scheme: "file", Path: dev}).String()), nil
}

// DisconnectLUN implements hostops.LUNs.
func (h *LocalHost) DisconnectLUN(ctx context.Context, uri drivers.URI) error {
	if err := checkISCSIURL(uri); err != nil {
		return err
	}
	if h.connector == nil {
		return nil // nothing was connected here
	}
	return h.connector.Disconnect(ctx, string(uri))
}

// WithLUNs makes this host an iSCSI target host (m, nil for none) and a
// userspace initiator (io, nil for none).
func WithLUNs(m LUNManager, io LUNIO) Option {
	return func(a *Agent) { a.host.luns, a.host.lunIO = m, io }
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
	// A reconcile (Exact) leaves the accounts already bound alone: tgt
	// cannot compare secrets, and replacing one fails that host's logins
	// for a moment. A changed secret is set by the next grant or attach.
	var bound []string
	if t.Exact {
		cur, err := m.Target(ctx, t.IQN)
		if err != nil {
			return err
		}
		bound = cur.Accounts
	}
	for _, i := range t.Initiators {
		if err := m.Allow(ctx, t.IQN, i.IQN); err != nil {
			return err
		}
		if i.CHAPUser != "" && !slices.Contains(bound, i.CHAPUser) {
			if err := m.SetCHAP(ctx, t.IQN, i.CHAPUser, i.CHAPSecret); err != nil {
				return err
			}
		}
	}
	if t.Exact {
		return revokeOthers(ctx, m, t)
	}
	return nil
}

// revokeOthers leaves t's initiators the only ones admitted to t: every
// other ACL entry and bound CHAP account goes, so those initiators cannot
// log in again, then their sessions are logged out. A revoked host's
// hypervisor loses the LUNs it had open: it has left the store's scope.
func revokeOthers(ctx context.Context, m LUNManager, t hostops.ISCSITarget) error {
	cur, err := m.Target(ctx, t.IQN)
	if err != nil {
		return err
	}
	keepIQN, keepUser := map[string]bool{}, map[string]bool{}
	for _, i := range t.Initiators {
		keepIQN[i.IQN] = true
		if i.CHAPUser != "" {
			keepUser[i.CHAPUser] = true
		}
	}
	var gone []string
	for _, acl := range cur.ACLs {
		if keepIQN[acl] {
			continue
		}
		if err := m.Disallow(ctx, t.IQN, acl); err != nil {
			return fmt.Errorf("target %s: revoke initiator %s: %w", t.IQN, acl, err)
		}
		gone = append(gone, acl)
	}
	for _, user := range cur.Accounts {
		if keepUser[user] {
			continue
		}
		if err := m.RemoveCHAP(ctx, t.IQN, user); err != nil {
			return fmt.Errorf("target %s: revoke CHAP account %s: %w", t.IQN, user, err)
		}
	}
	// Sessions of initiators no longer admitted, whether their ACL entry
	// went now or earlier (a revoke that stopped before its logouts).
	for _, nx := range cur.Nexuses {
		if keepIQN[nx.Initiator] || slices.Contains(gone, nx.Initiator) {
			continue
		}
		gone = append(gone, nx.Initiator)
	}
	for _, i := range gone {
		if _, err := m.Logout(ctx, t.IQN, i); err != nil {
			return fmt.Errorf("target %s: log out initiator %s: %w", t.IQN, i, err)
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
	nums, err := lunNumbers(ctx, m, req.Target.IQN)
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
	if err := failpoint.Hit(failpoint.LUNAfterCreate); err != nil {
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
	nums, err := lunNumbers(ctx, m, t.IQN)
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

// copyISCSI runs a copy whose source or destination is a LUN (iscsi://)
// through the userspace initiator: into a LUN (req.DestURI), or out of one
// into the object at dest (a path of a store this host serves).
func (h *LocalHost) copyISCSI(ctx context.Context, req hostops.CopyRequest, src, dest string, progress drivers.Progress) (hostops.ImageInfo, error) {
	if h.lunIO == nil {
		return hostops.ImageInfo{}, fmt.Errorf("host %s has no userspace iSCSI initiator (qemu-img with the iscsi block driver): %w", h.HostID(), errdefs.ErrNotImplemented)
	}
	format := req.Format
	if format == "" {
		format = req.SourceFormat
	}
	var report func(done, total int64)
	if progress != nil {
		report = func(done, total int64) { progress(done, total) }
	}
	if req.DestURI != "" {
		if err := checkISCSIURL(req.DestURI); err != nil {
			return hostops.ImageInfo{}, err
		}
		if !isISCSI(src) {
			src = h.fs.OnHost(src)
		}
		if err := h.lunIO.Convert(ctx, src, string(req.SourceFormat), string(req.DestURI), string(format), req.DestIsZero, report); err != nil {
			return hostops.ImageInfo{}, err
		}
		return hostops.ImageInfo{Format: format, Method: "qemu-img convert (libiscsi)"}, nil
	}
	// Out of a LUN into a store object: staged, then published.
	info, err := h.fs.Produce(ctx, dest, format, func(ctx context.Context, stage string) error {
		return h.lunIO.Convert(ctx, src, string(req.SourceFormat), h.fs.OnHost(stage), string(format), true, report)
	})
	return h.imageOf(req.Dest, info, err)
}

func isISCSI(s string) bool { return strings.HasPrefix(s, "iscsi://") }

func isNBD(s string) bool { return strings.HasPrefix(s, "nbd://") || strings.HasPrefix(s, "nbds://") }

// checkGrantedURI admits the URIs a driver grants a host to read or write
// an object in place: a LUN (iscsi://portal/iqn/lun) or an NBD export of
// another agent or this one (nbd(s)://host:port/name: an RBD image).
func checkGrantedURI(u drivers.URI) error {
	if isNBD(string(u)) {
		p, err := url.Parse(string(u))
		if err != nil || p.Host == "" || p.RawQuery != "" {
			return fmt.Errorf("export %q is not an nbd(s)://host:port/name URL: %w", redact.URL(string(u)), errdefs.ErrPermissionDenied)
		}
		return nil
	}
	return checkISCSIURL(u)
}

// checkISCSIURL admits an iscsi://portal/iqn/lun destination only.
func checkISCSIURL(u drivers.URI) error {
	p, err := url.Parse(string(u))
	if err != nil || p.Scheme != "iscsi" || p.Host == "" {
		return fmt.Errorf("LUN %q is not an iscsi://portal/iqn/lun URL: %w", redact.URL(string(u)), errdefs.ErrPermissionDenied)
	}
	return nil
}

// scratchCopy reads the LUN at uri into a new private file of the agent's
// scratch directory (WithScratch) and returns it with its removal.
func (h *LocalHost) scratchCopy(ctx context.Context, uri drivers.URI, format drivers.Format) (string, func(), error) {
	if err := checkISCSIURL(uri); err != nil {
		return "", nil, err
	}
	if h.lunIO == nil {
		return "", nil, fmt.Errorf("host %s has no userspace iSCSI initiator (qemu-img with the iscsi block driver): %w", h.HostID(), errdefs.ErrNotImplemented)
	}
	if h.scratch == "" {
		return "", nil, fmt.Errorf("host %s has no scratch directory: %w", h.HostID(), errdefs.ErrFailedPrecondition)
	}
	if err := os.MkdirAll(h.scratch, 0o700); err != nil {
		return "", nil, fmt.Errorf("scratch: %w", err)
	}
	f, err := os.CreateTemp(h.scratch, "lun-*.img")
	if err != nil {
		return "", nil, fmt.Errorf("scratch: %w", err)
	}
	path := f.Name()
	f.Close()
	done := func() { _ = os.Remove(path) }
	if err := h.lunIO.Convert(ctx, string(uri), string(format), path, string(format), false, nil); err != nil {
		done()
		return "", nil, err
	}
	return path, done, nil
}

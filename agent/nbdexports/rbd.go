package nbdexports

import (
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/datapath/qsd"
	"github.com/stowage/stowage/errdefs"
)

// FormatRBD is an export of a Ceph RBD image (ExportRBD).
const FormatRBD = "rbd"

// RBDImage is a Ceph RBD image, or a snapshot of one, to serve.
type RBDImage struct {
	Pool, Image, Snapshot string
	// User is the cephx user (without "client.") and Key its secret
	// (base64, as a keyring's "key =" line has it).
	User string
	Key  string
	// Mons are the monitors' host:port.
	Mons []string
}

// ExportRBD serves an RBD image over NBD through a qemu-storage-daemon
// (qemu's rbd driver, librbd) under a new name, as ExportFormat serves a
// qcow2 image; a snapshot is served read-only. The key is kept for the
// export's life in a private file of the run directory (the daemon reads
// it there; it is never an argument) and removed with the export.
// errdefs.ErrNotImplemented without WithQcow2.
func (s *Server) ExportRBD(img RBDImage, readOnly bool, expires time.Time, owner exports.Owner) (string, error) {
	what := "rbd:" + img.Pool + "/" + img.Image
	if img.Snapshot != "" {
		what += "@" + img.Snapshot
		readOnly = true
	}
	addr := s.Address()
	if addr == "" {
		return "", fmt.Errorf("nbd export %s: this agent serves no NBD (--nbd-listen): %w", what, errdefs.ErrUnavailable)
	}
	if s.runDir == "" {
		return "", fmt.Errorf("nbd export %s: this agent serves no images through qemu-storage-daemon: %w", what, errdefs.ErrNotImplemented)
	}
	if !expires.IsZero() && !time.Now().Before(expires) {
		return "", fmt.Errorf("nbd export %s: expiry %s is past: %w", what, expires.UTC().Format(time.RFC3339), errdefs.ErrInvalid)
	}
	if k, err := base64.StdEncoding.DecodeString(img.Key); err != nil || len(k) == 0 {
		return "", fmt.Errorf("nbd export %s: the cephx key is not base64: %w", what, errdefs.ErrInvalid)
	}
	r := &qsd.RBD{Pool: img.Pool, Image: img.Image, Snapshot: img.Snapshot, User: img.User, Mons: img.Mons}
	e := &export{Name: newName(), Path: what, ReadOnly: readOnly, Expires: expires, Owner: owner, Created: time.Now(), Format: FormatRBD, RBD: r}
	r.KeyFile = s.keyPath(e.Name)
	if err := os.MkdirAll(s.runDir, 0o700); err != nil {
		return "", fmt.Errorf("nbd export %s: run directory: %w", what, err)
	}
	if err := durable.WriteFile(r.KeyFile, []byte(img.Key), 0o600); err != nil {
		return "", fmt.Errorf("nbd export %s: key file: %w", what, err)
	}
	return s.add(addr, e)
}

// keyPath is where export name's cephx key is kept.
func (s *Server) keyPath(name string) string { return filepath.Join(s.runDir, name+".key") }

// removeKey removes export name's key file, if it has one.
func (s *Server) removeKey(name string) {
	if s.runDir != "" {
		_ = os.Remove(s.keyPath(name))
	}
}

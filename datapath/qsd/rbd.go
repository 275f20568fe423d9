package qsd

import (
	"fmt"
	"net"
	"regexp"
	"strings"
)

// RBD is a Ceph RBD image, or one of its snapshots, that the daemon opens
// with qemu's rbd block driver (librbd, in Debian's qemu-block-extra) as a
// cephx user. The user's key is never an argument (arguments are visible
// to every local user in /proc): it is read from KeyFile, a private file
// holding the base64 key as a keyring's "key =" line gives it, through a
// qemu secret object. The cluster is reached at Mons only; no ceph.conf of
// the host is read.
type RBD struct {
	Pool     string   `json:"pool"`
	Image    string   `json:"image"`
	Snapshot string   `json:"snapshot,omitempty"`
	User     string   `json:"user"`
	Mons     []string `json:"mons"` // host:port (v1 protocol port)
	KeyFile  string   `json:"key_file"`
}

var rbdName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

func (r *RBD) check() error {
	for what, v := range map[string]string{"pool": r.Pool, "image": r.Image, "user": r.User} {
		if !rbdName.MatchString(v) {
			return fmt.Errorf("qsd: rbd %s %q is not a plain name", what, v)
		}
	}
	if r.Snapshot != "" && !rbdName.MatchString(r.Snapshot) {
		return fmt.Errorf("qsd: rbd snapshot %q is not a plain name", r.Snapshot)
	}
	if len(r.Mons) == 0 {
		return fmt.Errorf("qsd: rbd image %s/%s: no monitor address", r.Pool, r.Image)
	}
	for _, m := range r.Mons {
		if _, _, err := net.SplitHostPort(m); err != nil {
			return fmt.Errorf("qsd: rbd monitor %q is not host:port: %w", m, err)
		}
	}
	if !strings.HasPrefix(r.KeyFile, "/") {
		return fmt.Errorf("qsd: rbd key file %q is not an absolute path", r.KeyFile)
	}
	return nil
}

// blockdev is the daemon's --blockdev for the image: the rbd driver is the
// exported node itself (an RBD image is raw).
func (r *RBD) blockdev(readOnly bool) map[string]any {
	var servers []map[string]any
	for _, m := range r.Mons {
		h, p, _ := net.SplitHostPort(m)
		servers = append(servers, map[string]any{"host": h, "port": p})
	}
	b := map[string]any{
		"driver":               "rbd",
		"node-name":            "fmt",
		"read-only":            readOnly,
		"pool":                 r.Pool,
		"image":                r.Image,
		"user":                 r.User,
		"server":               servers,
		"key-secret":           "rbdkey",
		"auth-client-required": []string{"cephx"},
		// An empty configuration: the host's /etc/ceph/ceph.conf, if it
		// has one, does not change what the store's URL says.
		"conf": "/dev/null",
	}
	if r.Snapshot != "" {
		b["snapshot"] = r.Snapshot
		b["read-only"] = true
	} else if !readOnly {
		b["discard"] = "unmap"
		b["detect-zeroes"] = "unmap"
	}
	return b
}

// secretArgs define the secret object holding the key, read from its file.
func (r *RBD) secretArgs() []string {
	return []string{"--object", "secret,id=rbdkey,format=base64,file=" + strings.ReplaceAll(r.KeyFile, ",", ",,")}
}

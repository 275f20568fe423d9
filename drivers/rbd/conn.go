//go:build ceph

package rbd

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"syscall"

	"github.com/ceph/go-ceph/rados"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// location is a store's pool and how to reach its cluster, from its URL
// and details.
type location struct {
	pool    string
	monHost string
	user    string
	keyring string // path of the keyring file (details "keyring")
}

var (
	poolPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	userPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	hostPattern = regexp.MustCompile(`^[A-Za-z0-9.:\[\],_-]+$`)
)

// parseLocation reads rbd://POOL?mon_host=...&id=USER and details["keyring"].
func parseLocation(rawURL string, details map[string]string) (location, error) {
	u, err := url.Parse(rawURL)
	if err != nil || u.Scheme != "rbd" {
		return location{}, fmt.Errorf("url %q: want rbd://POOL?mon_host=HOST:PORT&id=USER: %w", rawURL, errdefs.ErrInvalid)
	}
	loc := location{pool: u.Host, monHost: u.Query().Get("mon_host"), user: u.Query().Get("id"), keyring: details["keyring"]}
	if !poolPattern.MatchString(loc.pool) || (u.Path != "" && u.Path != "/") {
		return location{}, fmt.Errorf("url %q: the pool is the URL's host part, rbd://POOL?...: %w", rawURL, errdefs.ErrInvalid)
	}
	if loc.monHost == "" || !hostPattern.MatchString(loc.monHost) {
		return location{}, fmt.Errorf("url %q: mon_host=HOST:PORT[,HOST:PORT] is required: %w", rawURL, errdefs.ErrInvalid)
	}
	if !userPattern.MatchString(loc.user) {
		return location{}, fmt.Errorf("url %q: id=USER (the cephx user, without client.) is required: %w", rawURL, errdefs.ErrInvalid)
	}
	if loc.keyring == "" || !strings.HasPrefix(loc.keyring, "/") {
		return location{}, fmt.Errorf("store details: keyring=/absolute/path/of/the/keyring/file is required: %w", errdefs.ErrInvalid)
	}
	return loc, nil
}

// cluster is an open connection to a store's cluster.
type cluster struct {
	conn *rados.Conn
}

// connections keeps one open cluster connection per location.
type connections struct {
	mu    sync.Mutex
	conns map[location]*cluster
}

// open returns the connection to loc's cluster, connecting (bounded by
// the timeouts below) the first time.
func (c *connections) open(loc location) (*cluster, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cl, ok := c.conns[loc]; ok {
		return cl, nil
	}
	conn, err := rados.NewConnWithUser(loc.user)
	if err != nil {
		return nil, fmt.Errorf("ceph: %w", errors.Join(err, errdefs.ErrInternal))
	}
	for k, v := range map[string]string{
		"mon_host": msgrV1(loc.monHost),
		"keyring":  loc.keyring,
		// librados calls take no context: every one is bounded here.
		"client_mount_timeout": "10",
		"rados_mon_op_timeout": "15",
		"rados_osd_op_timeout": "30",
		"log_to_stderr":        "false",
		"err_to_stderr":        "false",
	} {
		if err := conn.SetConfigOption(k, v); err != nil {
			conn.Shutdown()
			return nil, fmt.Errorf("ceph option %s: %w", k, errors.Join(err, errdefs.ErrInvalid))
		}
	}
	if err := conn.Connect(); err != nil {
		conn.Shutdown()
		return nil, fmt.Errorf("connect to the Ceph cluster at %s as client.%s: %w", loc.monHost, loc.user, classify(err))
	}
	cl := &cluster{conn: conn}
	if c.conns == nil {
		c.conns = map[location]*cluster{}
	}
	c.conns[loc] = cl
	return cl, nil
}

// drop closes and forgets loc's connection (after an error that may have
// broken it).
func (c *connections) drop(loc location) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cl, ok := c.conns[loc]; ok {
		cl.conn.Shutdown()
		delete(c.conns, loc)
	}
}

// errno is the errno a go-ceph error carries (they carry it negated), or 0.
func errno(err error) syscall.Errno {
	var coded interface{ ErrorCode() int }
	if errors.As(err, &coded) {
		if n := coded.ErrorCode(); n < 0 {
			return syscall.Errno(-n)
		} else {
			return syscall.Errno(n)
		}
	}
	return 0
}

// classify wraps err with its errdefs class.
func classify(err error) error {
	switch errno(err) {
	case syscall.EACCES, syscall.EPERM:
		return errors.Join(fmt.Errorf("%w (a wrong key, or a user without the caps)", err), errdefs.ErrUnauthenticated)
	case syscall.ENOENT:
		return errors.Join(err, errdefs.ErrNotFound)
	case syscall.EEXIST:
		return errors.Join(err, errdefs.ErrAlreadyExists)
	case syscall.EBUSY, syscall.ENOTEMPTY:
		return errors.Join(err, errdefs.ErrFailedPrecondition)
	case syscall.ETIMEDOUT, syscall.ECONNREFUSED, syscall.EHOSTUNREACH, syscall.EIO:
		return errors.Join(err, errdefs.ErrUnavailable)
	case syscall.ENOSPC, syscall.EDQUOT:
		return errors.Join(err, errdefs.ErrResourceExhausted)
	case syscall.EINVAL:
		return errors.Join(err, errdefs.ErrInvalid)
	}
	return errors.Join(err, errdefs.ErrInternal)
}

// imageName is the RBD image of an object: "<type>-<id>".
func imageName(obj drivers.DataObject) string { return string(obj.Type) + "-" + obj.ID }

// msgrV1 marks the plain HOST:PORT addresses of a mon_host value whose port
// is not the msgr v2 port (3300) as v1 ("v1:HOST:PORT"): librados would
// try v2 on them first and log the refusal.
func msgrV1(monHost string) string {
	if strings.ContainsAny(monHost, "[]") {
		return monHost
	}
	parts := strings.Split(monHost, ",")
	for i, p := range parts {
		p = strings.TrimSpace(p)
		if !strings.HasPrefix(p, "v1:") && !strings.HasPrefix(p, "v2:") && strings.Contains(p, ":") && !strings.HasSuffix(p, ":3300") {
			p = "v1:" + p
		}
		parts[i] = p
	}
	return strings.Join(parts, ",")
}

// Package connector logs a host's kernel iSCSI initiator (open-iscsi) in
// to LUNs and out again, in the sequence os-brick's ISCSIConnector uses:
// discovery (sendtargets), a node record with the CHAP settings and the
// initiator name the target's ACL expects, login unless a session to the
// target exists already (it is reused, and rescanned), a bounded wait for
// /dev/disk/by-path/ip-<portal>-iscsi-<iqn>-lun-<n> (with one rescan
// midway), the dm device on top of it when multipathd runs; and on
// disconnect, removal of the SCSI device, then logout and removal of the
// node record only when no other LUN of that target is in use on the host.
// Every step is safe to repeat after a crash, and Sessions lists the
// sessions the agent finds at start, so it adopts them instead of logging
// in twice.
//
// Every iscsiadm call goes through one runner (LC_ALL=C, a bounded time,
// stderr kept for errors with the CHAP secret removed), and its exit codes
// (open-iscsi's include/iscsi_err.h) map to errdefs classes: 24 (login
// authentication failed) is ErrUnauthenticated naming CHAP, 21 (no
// objects found) ErrNotFound, 15 (session exists) is success for a login,
// 8, 4 and 20 (transport timeout, transport error, iscsid not reachable)
// are ErrUnavailable.
//
// The CHAP password goes to iscsiadm in argv (node.session.auth.password),
// as os-brick passes it: iscsiadm has no other way to take it. It is never
// logged or put in an error.
package connector

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/stowage/stowage/datapath/iscsi"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// open-iscsi's exit codes (include/iscsi_err.h).
const (
	errTrans           = 4
	errTransTimeout    = 8
	errSessExists      = 15
	errISCSIDNotConn   = 20
	errNoObjsFound     = 21
	errLoginAuthFailed = 24
)

// Connector is one host's kernel initiator.
type Connector struct {
	bin        string
	byPath     string
	sysfs      string
	timeout    time.Duration
	cmdTimeout time.Duration
	multipath  func() bool
	log        *slog.Logger
}

// Option configures a Connector.
type Option func(*Connector)

// WithISCSIAdm sets the iscsiadm binary (default: iscsiadm in PATH).
func WithISCSIAdm(path string) Option { return func(c *Connector) { c.bin = path } }

// WithByPath sets the directory of by-path device links (default
// /dev/disk/by-path).
func WithByPath(dir string) Option { return func(c *Connector) { c.byPath = dir } }

// WithSysfs sets sysfs's root (default /sys).
func WithSysfs(root string) Option { return func(c *Connector) { c.sysfs = root } }

// WithTimeout bounds the wait for a LUN's device after login (default 20 s).
func WithTimeout(d time.Duration) Option { return func(c *Connector) { c.timeout = d } }

// WithMultipath says whether multipathd runs (default: multipathd in PATH).
func WithMultipath(on bool) Option {
	return func(c *Connector) { c.multipath = func() bool { return on } }
}

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(c *Connector) { c.log = l } }

// New returns a connector.
func New(opts ...Option) *Connector {
	c := &Connector{bin: "iscsiadm", byPath: "/dev/disk/by-path", sysfs: "/sys", timeout: 20 * time.Second, cmdTimeout: 2 * time.Minute,
		multipath: func() bool { _, err := exec.LookPath("multipathd"); return err == nil }, log: slog.Default()}
	for _, o := range opts {
		o(c)
	}
	return c
}

// Session is an iSCSI session of the host.
type Session struct {
	ID     int
	Portal string // host:port
	IQN    string
}

// Available says whether the kernel path can work here: iscsiadm is
// installed, the iscsi_tcp module is loaded and iscsid answers.
func (c *Connector) Available(ctx context.Context) (bool, string) {
	if _, err := exec.LookPath(c.bin); err != nil {
		return false, "iscsiadm is not installed (open-iscsi)"
	}
	if _, err := os.Stat(filepath.Join(c.sysfs, "module", "iscsi_tcp")); err != nil {
		return false, "the iscsi_tcp kernel module is not loaded"
	}
	if _, err := c.Sessions(ctx); err != nil {
		return false, err.Error()
	}
	return true, ""
}

// Sessions lists the host's sessions (none is not an error).
func (c *Connector) Sessions(ctx context.Context) ([]Session, error) {
	out, err := c.run(ctx, "", "-m", "session")
	if code(err) == errNoObjsFound {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var ss []Session
	for _, line := range strings.Split(out, "\n") {
		// tcp: [3] 10.0.0.5:3260,1 iqn.2026-12.org.example:san1 (non-flash)
		f := strings.Fields(line)
		if len(f) < 4 || !strings.HasPrefix(f[1], "[") {
			continue
		}
		id, err := strconv.Atoi(strings.Trim(f[1], "[]"))
		if err != nil {
			continue
		}
		portal, _, _ := strings.Cut(f[2], ",")
		ss = append(ss, Session{ID: id, Portal: portal, IQN: f[3]})
	}
	return ss, nil
}

func (c *Connector) session(ctx context.Context, t iscsi.Target) (Session, bool, error) {
	ss, err := c.Sessions(ctx)
	if err != nil {
		return Session{}, false, err
	}
	for _, s := range ss {
		if s.Portal == t.Portal && s.IQN == t.IQN {
			return s, true, nil
		}
	}
	return Session{}, false, nil
}

// devicePath is the by-path link of t's LUN.
func (c *Connector) devicePath(t iscsi.Target) string {
	return filepath.Join(c.byPath, fmt.Sprintf("ip-%s-iscsi-%s-lun-%d", t.Portal, t.IQN, t.LUN))
}

// Connect logs in to the LUN of grant (iscsi://user:secret@portal/iqn/lun?initiator=iqn)
// and returns its block device.
func (c *Connector) Connect(ctx context.Context, grant string) (string, error) {
	t, err := iscsi.ParseGrant(grant)
	if err != nil {
		return "", err
	}
	if err := c.discover(ctx, t); err != nil {
		return "", err
	}
	if err := c.node(ctx, t); err != nil {
		return "", err
	}
	s, ok, err := c.session(ctx, t)
	if err != nil {
		return "", err
	}
	if ok {
		c.log.Info("iSCSI session reused", "target", t.IQN, "portal", t.Portal, "sid", s.ID)
		_, _ = c.run(ctx, t.Secret, "-m", "session", "-r", strconv.Itoa(s.ID), "--rescan")
	} else if _, err := c.run(ctx, t.Secret, "-m", "node", "-T", t.IQN, "-p", t.Portal, "--login"); err != nil && code(err) != errSessExists {
		return "", c.explain(err, t, "log in to")
	}
	dev, err := c.waitDevice(ctx, t)
	if err != nil {
		return "", err
	}
	c.log.Info("iSCSI LUN connected", "target", t.IQN, "portal", t.Portal, "lun", t.LUN, "device", dev)
	return dev, nil
}

// discover runs sendtargets discovery and checks the target is offered.
func (c *Connector) discover(ctx context.Context, t iscsi.Target) error {
	out, err := c.run(ctx, t.Secret, "-m", "discovery", "-t", "sendtargets", "-p", t.Portal)
	if err != nil {
		return c.explain(err, t, "discover")
	}
	for _, line := range strings.Split(out, "\n") {
		// 10.0.0.5:3260,1 iqn.2026-12.org.example:san1
		if f := strings.Fields(line); len(f) == 2 && f[1] == t.IQN {
			return nil
		}
	}
	return fmt.Errorf("iSCSI discovery at %s does not offer target %s (not there, or this initiator is not allowed): %w", t.Portal, t.IQN, errdefs.ErrNotFound)
}

// node writes the node record: manual startup, the initiator name the
// target's ACL knows, and CHAP.
func (c *Connector) node(ctx context.Context, t iscsi.Target) error {
	if _, err := c.run(ctx, t.Secret, "-m", "node", "-T", t.IQN, "-p", t.Portal, "--op", "new"); err != nil && code(err) != errSessExists {
		return c.explain(err, t, "create the node record of")
	}
	set := [][2]string{{"node.startup", "manual"}, {"node.session.scan", "manual"}}
	if t.Initiator != "" {
		set = append(set, [2]string{"iface.initiatorname", t.Initiator})
	}
	if t.User != "" {
		set = append(set, [2]string{"node.session.auth.authmethod", "CHAP"}, [2]string{"node.session.auth.username", t.User},
			[2]string{"node.session.auth.password", t.Secret})
	}
	for _, kv := range set {
		if _, err := c.run(ctx, t.Secret, "-m", "node", "-T", t.IQN, "-p", t.Portal, "--op", "update", "-n", kv[0], "-v", kv[1]); err != nil {
			return c.explain(err, t, "update the node record ("+kv[0]+") of")
		}
	}
	return nil
}

// waitDevice waits for the LUN's by-path link, rescanning once midway.
func (c *Connector) waitDevice(ctx context.Context, t iscsi.Target) (string, error) {
	link := c.devicePath(t)
	deadline := time.Now().Add(c.timeout)
	rescanned := false
	for {
		if real, err := filepath.EvalSymlinks(link); err == nil {
			return c.holder(real), nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("iSCSI LUN %d of %s at %s: no device %s after %s: %w", t.LUN, t.IQN, t.Portal, link, c.timeout, errdefs.ErrUnavailable)
		}
		if !rescanned && time.Until(deadline) < c.timeout/2 {
			rescanned = true
			if s, ok, err := c.session(ctx, t); err == nil && ok {
				_, _ = c.run(ctx, t.Secret, "-m", "session", "-r", strconv.Itoa(s.ID), "--rescan")
			}
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// holder is the multipath device holding disk dev, when multipathd runs
// and one does; else dev.
func (c *Connector) holder(dev string) string {
	if !c.multipath() {
		return dev
	}
	holders, _ := filepath.Glob(filepath.Join(c.sysfs, "block", filepath.Base(dev), "holders", "dm-*"))
	if len(holders) == 0 {
		return dev
	}
	return "/dev/" + filepath.Base(holders[0])
}

// Disconnect removes the LUN's device and, when no other LUN of the
// target is in use on the host, logs out and deletes the node record.
// Disconnecting what is not connected succeeds.
func (c *Connector) Disconnect(ctx context.Context, grant string) error {
	t, err := iscsi.ParseGrant(grant)
	if err != nil {
		return err
	}
	if real, err := filepath.EvalSymlinks(c.devicePath(t)); err == nil {
		del := filepath.Join(c.sysfs, "block", filepath.Base(real), "device", "delete")
		if err := os.WriteFile(del, []byte("1"), 0o200); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove the device of LUN %d of %s: %w", t.LUN, t.IQN, err)
		}
		_ = os.Remove(c.devicePath(t)) // udev does it on a real host
	}
	others, _ := filepath.Glob(filepath.Join(c.byPath, fmt.Sprintf("ip-%s-iscsi-%s-lun-*", t.Portal, t.IQN)))
	if len(others) > 0 {
		c.log.Info("iSCSI session kept: other LUNs of the target are in use", "target", t.IQN, "luns", len(others))
		return nil
	}
	if _, err := c.run(ctx, t.Secret, "-m", "node", "-T", t.IQN, "-p", t.Portal, "--logout"); err != nil && code(err) != errNoObjsFound {
		return c.explain(err, t, "log out of")
	}
	if _, err := c.run(ctx, t.Secret, "-m", "node", "-T", t.IQN, "-p", t.Portal, "--op", "delete"); err != nil && code(err) != errNoObjsFound {
		return c.explain(err, t, "delete the node record of")
	}
	return nil
}

// runError is a failed iscsiadm run.
type runError struct {
	code   int
	stderr string
}

func (e *runError) Error() string { return fmt.Sprintf("iscsiadm exit %d: %s", e.code, e.stderr) }

func code(err error) int {
	var re *runError
	if errors.As(err, &re) {
		return re.code
	}
	return -1
}

// run runs iscsiadm with args; secret is removed from what an error says.
func (c *Connector) run(ctx context.Context, secret string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	err := cmd.Run()
	if err == nil {
		return out.String(), nil
	}
	msg := strings.TrimSpace(stderr.String())
	if secret != "" {
		msg = strings.ReplaceAll(msg, secret, redact.Marker)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return out.String(), &runError{code: ee.ExitCode(), stderr: msg}
	}
	return "", fmt.Errorf("iscsiadm: %v: %w", err, errdefs.ErrUnavailable)
}

// explain turns a failed iscsiadm run into a classed error about t.
func (c *Connector) explain(err error, t iscsi.Target, what string) error {
	var re *runError
	if !errors.As(err, &re) {
		return err
	}
	where := fmt.Sprintf("%s target %s at %s", what, t.IQN, t.Portal)
	switch {
	case re.code == errLoginAuthFailed:
		return fmt.Errorf("iSCSI CHAP authentication to %s failed for user %q: check the store's CHAP secret (%s): %w", where, t.User, re.stderr, errdefs.ErrUnauthenticated)
	case re.code == errNoObjsFound:
		return fmt.Errorf("iSCSI: cannot %s: no such target or record (%s): %w", where, re.stderr, errdefs.ErrNotFound)
	case re.code == errISCSIDNotConn || strings.Contains(re.stderr, "NETLINK_ISCSI"):
		return fmt.Errorf("iSCSI: cannot %s: iscsid is not running or the kernel has no iSCSI transport (iscsi_tcp): %s: %w", where, re.stderr, errdefs.ErrUnavailable)
	case re.code == errTransTimeout || re.code == errTrans:
		return fmt.Errorf("iSCSI: cannot %s: the portal does not answer (%s): %w", where, re.stderr, errdefs.ErrUnavailable)
	}
	return fmt.Errorf("iSCSI: cannot %s: %v: %w", where, re, errdefs.ErrInternal)
}

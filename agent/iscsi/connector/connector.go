package connector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/stowage/stowage/errdefs"
)

// Target is one LUN of an iSCSI target behind one portal, with the CHAP
// credentials this host logs in with. CHAPSecret never appears in an
// error or a log line (String leaves it out).
type Target struct {
	Portal     string // "IP:PORT"
	IQN        string
	LUN        int
	CHAPUser   string
	CHAPSecret string
	// Initiator, when set, is the initiator name the node logs in with
	// (iface.initiatorname): the one the target's ACL names for this
	// host, instead of /etc/iscsi/initiatorname.iscsi's.
	Initiator string
}

// String names the LUN without its credentials.
func (t Target) String() string { return fmt.Sprintf("%s at %s lun %d", t.IQN, t.Portal, t.LUN) }

// LogValue keeps the secret out of slog output.
func (t Target) LogValue() slog.Value { return slog.StringValue(t.String()) }

func (t Target) sameTarget(o Target) bool { return t.Portal == o.Portal && t.IQN == o.IQN }

func (t Target) validate() error {
	host, port, err := net.SplitHostPort(t.Portal)
	if err != nil || host == "" || port == "" {
		return fmt.Errorf("iSCSI portal %q: want IP:PORT: %w", t.Portal, errdefs.ErrInvalid)
	}
	if t.IQN == "" || strings.ContainsAny(t.IQN, " \t\n/") {
		return fmt.Errorf("iSCSI target name %q: %w", t.IQN, errdefs.ErrInvalid)
	}
	if t.LUN < 0 {
		return fmt.Errorf("iSCSI LUN %d: %w", t.LUN, errdefs.ErrInvalid)
	}
	if (t.CHAPUser == "") != (t.CHAPSecret == "") {
		return fmt.Errorf("iSCSI %s: CHAP needs both a user and a secret: %w", t, errdefs.ErrInvalid)
	}
	return nil
}

// Device is an attached LUN.
type Device struct {
	Path      string // what to open: the dm device under multipath, else the disk
	Disk      string // the SCSI disk, /dev/sdX
	Multipath bool   // Path is a device-mapper device holding Disk
	SessionID int    // the iSCSI session carrying the LUN
}

// Session is an iSCSI session as iscsiadm -m session lists it.
type Session struct {
	ID        int
	Transport string // "tcp"
	Portal    string // "IP:PORT"
	TPGT      int
	IQN       string
}

// InUse lists the LUNs this host still uses; Disconnect logs out of a
// target only when none of them belongs to it.
type InUse func(ctx context.Context) ([]Target, error)

// Connector attaches LUNs with iscsiadm. It is safe for concurrent use;
// calls for one portal+IQN are serialised.
type Connector struct {
	run       *runner
	byPath    string
	sysfs     string
	devDir    string
	timeout   time.Duration
	poll      time.Duration
	multipath func() bool
	modprobe  string
	log       *slog.Logger
	locks     *keyLock
}

// Option configures a Connector.
type Option func(*Connector)

// WithIscsiadm sets the iscsiadm binary (default: "iscsiadm" on PATH).
func WithIscsiadm(path string) Option { return func(c *Connector) { c.run.bin = path } }

// WithByPathDir sets the udev by-path directory (default /dev/disk/by-path).
func WithByPathDir(dir string) Option { return func(c *Connector) { c.byPath = dir } }

// WithSysfs sets the sysfs root (default /sys).
func WithSysfs(dir string) Option { return func(c *Connector) { c.sysfs = dir } }

// WithDevDir sets the directory of device nodes dm devices are named
// under (default /dev).
func WithDevDir(dir string) Option { return func(c *Connector) { c.devDir = dir } }

// WithDeviceTimeout bounds the wait for the LUN's device after login
// (default 30s) and sets the poll interval (default 100ms).
func WithDeviceTimeout(timeout, poll time.Duration) Option {
	return func(c *Connector) { c.timeout, c.poll = timeout, poll }
}

// WithCommandTimeout bounds each iscsiadm run (default 2m: a login
// retries for a while before it fails).
func WithCommandTimeout(d time.Duration) Option { return func(c *Connector) { c.run.timeout = d } }

// WithMultipath overrides the multipathd detection (default: multipathd
// on PATH).
func WithMultipath(on bool) Option {
	return func(c *Connector) { c.multipath = func() bool { return on } }
}

// WithModprobe sets the modprobe Available asks whether iscsi_tcp can be
// loaded; "" skips that question (default "modprobe").
func WithModprobe(path string) Option { return func(c *Connector) { c.modprobe = path } }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(c *Connector) { c.log = l; c.run.log = l }
}

// New returns a Connector.
func New(opts ...Option) *Connector {
	c := &Connector{
		run:      &runner{bin: "iscsiadm", timeout: 2 * time.Minute, log: slog.Default()},
		byPath:   "/dev/disk/by-path",
		sysfs:    "/sys",
		devDir:   "/dev",
		timeout:  30 * time.Second,
		poll:     100 * time.Millisecond,
		modprobe: "modprobe",
		log:      slog.Default(),
		locks:    newKeyLock(),
		multipath: func() bool {
			_, err := exec.LookPath("multipathd")
			return err == nil
		},
	}
	for _, o := range opts {
		o(c)
	}
	return c
}

func (c *Connector) node(t Target, extra ...string) []string {
	return append([]string{"-m", "node", "-T", t.IQN, "-p", t.Portal}, extra...)
}

func (c *Connector) lock(ctx context.Context, t Target) (func(), error) {
	return c.locks.lock(ctx, t.Portal+"|"+t.IQN)
}

// Connect logs this host in to t (or reuses its session) and returns the
// LUN's device once it exists.
func (c *Connector) Connect(ctx context.Context, t Target) (Device, error) {
	if err := t.validate(); err != nil {
		return Device{}, err
	}
	unlock, err := c.lock(ctx, t)
	if err != nil {
		return Device{}, fmt.Errorf("iSCSI connect %s: %w", t, err)
	}
	defer unlock()
	secrets := []string{t.CHAPSecret}

	if err := c.discover(ctx, t); err != nil {
		return Device{}, err
	}
	// The node record: discovery usually made it; --op new when not.
	if _, err := c.run.run(ctx, secrets, c.node(t)...); exitCode(err) == exitNoObjsFound {
		if _, err := c.run.run(ctx, secrets, c.node(t, "--op", "new")...); err != nil {
			return Device{}, fmt.Errorf("iSCSI connect %s: node record: %w", t, err)
		}
	} else if err != nil {
		return Device{}, fmt.Errorf("iSCSI connect %s: node record: %w", t, err)
	}
	// CHAP goes in argv, as os-brick passes it: iscsiadm reads no
	// values from stdin today, so the secret is visible in /proc/PID/cmdline
	// to root on this host for the life of the call. If iscsiadm gains a
	// way to read -v from stdin or a file, pass it there instead (or write
	// the node record file under /etc/iscsi/nodes directly, 0600).
	updates := [][2]string{}
	if t.CHAPUser != "" {
		updates = append(updates,
			[2]string{"node.session.auth.authmethod", "CHAP"},
			[2]string{"node.session.auth.username", t.CHAPUser},
			[2]string{"node.session.auth.password", t.CHAPSecret})
	}
	if t.Initiator != "" {
		updates = append(updates, [2]string{"iface.initiatorname", t.Initiator})
	}
	// manual: iscsid must not log in at boot behind the agent's back;
	// the agent adopts or re-creates sessions itself.
	updates = append(updates, [2]string{"node.startup", "manual"})
	for _, u := range updates {
		if _, err := c.run.run(ctx, secrets, c.node(t, "--op", "update", "-n", u[0], "-v", u[1])...); err != nil {
			return Device{}, fmt.Errorf("iSCSI connect %s: set %s: %w", t, u[0], err)
		}
	}

	sid, err := c.sessionID(ctx, t)
	if err != nil {
		return Device{}, fmt.Errorf("iSCSI connect %s: %w", t, err)
	}
	if sid == 0 {
		if err := c.login(ctx, t); err != nil {
			return Device{}, err
		}
		if sid, err = c.sessionID(ctx, t); err != nil {
			return Device{}, fmt.Errorf("iSCSI connect %s: %w", t, err)
		}
		if sid == 0 {
			return Device{}, fmt.Errorf("iSCSI connect %s: login succeeded but iscsiadm -m session lists no session: %w", t, errdefs.ErrInternal)
		}
	} else {
		c.log.InfoContext(ctx, "iSCSI session reused", "target", t, "sid", sid)
	}

	dev, err := c.waitDevice(ctx, t, sid)
	if err != nil {
		return Device{}, err
	}
	c.log.InfoContext(ctx, "iSCSI LUN attached", "target", t, "device", dev.Path, "sid", sid)
	return dev, nil
}

// discover runs SendTargets discovery and checks that t.IQN is offered.
func (c *Connector) discover(ctx context.Context, t Target) error {
	out, err := c.run.run(ctx, nil, "-m", "discovery", "-t", "sendtargets", "-p", t.Portal)
	if exitCode(err) == exitNoObjsFound {
		return fmt.Errorf("iSCSI connect %s: portal %s offers no targets: %w", t, t.Portal, errdefs.ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("iSCSI connect %s: discovery: %w", t, err)
	}
	for _, d := range parseDiscovery(out) {
		if d.IQN == t.IQN {
			return nil
		}
	}
	return fmt.Errorf("iSCSI connect %s: portal %s does not offer target %s: %w", t, t.Portal, t.IQN, errdefs.ErrNotFound)
}

func (c *Connector) login(ctx context.Context, t Target) error {
	_, err := c.run.run(ctx, []string{t.CHAPSecret}, c.node(t, "--login")...)
	switch code := exitCode(err); {
	case err == nil, code == exitSessExists:
		return nil
	case code == exitLoginAuthFaild && t.CHAPUser != "":
		return fmt.Errorf("iSCSI CHAP authentication to %s at %s failed: check the store's CHAP secret: %w", t.IQN, t.Portal, err)
	case code == exitLoginAuthFaild:
		return fmt.Errorf("iSCSI authentication to %s at %s failed: the target wants CHAP or does not allow this initiator: %w", t.IQN, t.Portal, err)
	}
	return fmt.Errorf("iSCSI login to %s: %w", t, err)
}

// sessionID returns the id of the session to t's portal and IQN, or 0.
func (c *Connector) sessionID(ctx context.Context, t Target) (int, error) {
	ss, err := c.sessions(ctx)
	if err != nil {
		return 0, err
	}
	for _, s := range ss {
		if s.Portal == t.Portal && s.IQN == t.IQN {
			return s.ID, nil
		}
	}
	return 0, nil
}

func (c *Connector) sessions(ctx context.Context) ([]Session, error) {
	out, err := c.run.run(ctx, nil, "-m", "session")
	if exitCode(err) == exitNoObjsFound {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list sessions: %w", err)
	}
	return parseSessions(out), nil
}

// ByPath is the udev link of t's LUN.
func (c *Connector) ByPath(t Target) string {
	return filepath.Join(c.byPath, fmt.Sprintf("ip-%s-iscsi-%s-lun-%d", t.Portal, t.IQN, t.LUN))
}

// waitDevice polls for t's by-path link until the device timeout,
// rescanning the session once half way through, as os-brick does.
func (c *Connector) waitDevice(ctx context.Context, t Target, sid int) (Device, error) {
	link := c.ByPath(t)
	start := time.Now()
	deadline := start.Add(c.timeout)
	rescanned := false
	tick := time.NewTicker(c.poll)
	defer tick.Stop()
	for {
		if dev, err := c.resolve(link); err == nil {
			dev.SessionID = sid
			return dev, nil
		} else if !errors.Is(err, os.ErrNotExist) {
			return Device{}, fmt.Errorf("iSCSI connect %s: %w", t, err)
		}
		now := time.Now()
		if now.After(deadline) {
			return Device{}, fmt.Errorf("iSCSI connect %s: %s did not appear within %s after login (session %d): %w",
				t, link, c.timeout, sid, errdefs.ErrUnavailable)
		}
		if !rescanned && now.Sub(start) >= c.timeout/2 {
			rescanned = true
			if _, err := c.run.run(ctx, nil, "-m", "session", "-r", strconv.Itoa(sid), "--rescan"); err != nil {
				c.log.WarnContext(ctx, "iSCSI session rescan failed", "target", t, "sid", sid, "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return Device{}, fmt.Errorf("iSCSI connect %s: waiting for %s: %w", t, link, ctx.Err())
		case <-tick.C:
		}
	}
}

// resolve follows a by-path link to the disk and, under multipath, to the
// dm device holding it.
func (c *Connector) resolve(link string) (Device, error) {
	disk, err := filepath.EvalSymlinks(link)
	if err != nil {
		return Device{}, err
	}
	dev := Device{Path: disk, Disk: disk}
	if !c.multipath() {
		return dev, nil
	}
	holders, _ := filepath.Glob(filepath.Join(c.sysfs, "block", filepath.Base(disk), "holders", "dm-*"))
	if len(holders) == 0 {
		return dev, nil
	}
	dm := filepath.Base(holders[0])
	dev.Multipath = true
	dev.Path = filepath.Join(c.devDir, dm)
	if name, err := os.ReadFile(filepath.Join(c.sysfs, "block", dm, "dm", "name")); err == nil && strings.TrimSpace(string(name)) != "" {
		dev.Path = filepath.Join(c.devDir, "mapper", strings.TrimSpace(string(name)))
	}
	return dev, nil
}

// Rescan makes the kernel see a resized LUN and returns its size in bytes.
func (c *Connector) Rescan(ctx context.Context, t Target) (int64, error) {
	if err := t.validate(); err != nil {
		return 0, err
	}
	unlock, err := c.lock(ctx, t)
	if err != nil {
		return 0, fmt.Errorf("iSCSI rescan %s: %w", t, err)
	}
	defer unlock()
	if _, err := c.run.run(ctx, nil, c.node(t, "-R")...); err != nil {
		return 0, fmt.Errorf("iSCSI rescan %s: %w", t, err)
	}
	dev, err := c.resolve(c.ByPath(t))
	if errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("iSCSI rescan %s: %s: not attached: %w", t, c.ByPath(t), errdefs.ErrNotFound)
	}
	if err != nil {
		return 0, fmt.Errorf("iSCSI rescan %s: %w", t, err)
	}
	name := filepath.Base(dev.Disk)
	// The session rescan finds new LUNs; a grown LUN's capacity is
	// re-read through the SCSI device's rescan attribute (os-brick's
	// extend_volume). A multipath map over the disk still needs
	// multipathd resize map NAME, which this package does not run yet.
	if err := os.WriteFile(filepath.Join(c.sysfs, "block", name, "device", "rescan"), []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("iSCSI rescan %s: %s: %w", t, name, errors.Join(err, errdefs.ErrInternal))
	}
	size, err := c.size(name)
	if err != nil {
		return 0, fmt.Errorf("iSCSI rescan %s: %w", t, err)
	}
	return size, nil
}

// size reads /sys/block/NAME/size, in 512-byte sectors whatever the
// logical block size.
func (c *Connector) size(name string) (int64, error) {
	b, err := os.ReadFile(filepath.Join(c.sysfs, "block", name, "size"))
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", name, errors.Join(err, errdefs.ErrInternal))
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", name, errors.Join(err, errdefs.ErrInternal))
	}
	return n * 512, nil
}

// Disconnect removes t's device from this host and, when no other LUN of
// the same target is in use (inUse; nil means "any other by-path link of
// the target"), logs out and deletes the node record. Disconnecting what
// is not connected succeeds.
func (c *Connector) Disconnect(ctx context.Context, t Target, inUse InUse) error {
	if err := t.validate(); err != nil {
		return err
	}
	unlock, err := c.lock(ctx, t)
	if err != nil {
		return fmt.Errorf("iSCSI disconnect %s: %w", t, err)
	}
	defer unlock()

	dev, err := c.resolve(c.ByPath(t))
	switch {
	case errors.Is(err, os.ErrNotExist):
		c.log.DebugContext(ctx, "iSCSI LUN not attached", "target", t)
	case err != nil:
		return fmt.Errorf("iSCSI disconnect %s: %w", t, err)
	default:
		if err := c.removeDisk(ctx, dev); err != nil {
			return fmt.Errorf("iSCSI disconnect %s: %w", t, err)
		}
	}

	others, err := c.otherLUNs(ctx, t, inUse)
	if err != nil {
		return fmt.Errorf("iSCSI disconnect %s: LUNs in use: %w", t, err)
	}
	if len(others) > 0 {
		c.log.InfoContext(ctx, "iSCSI session kept: other LUNs of the target in use", "target", t, "luns", others)
		return nil
	}
	if _, err := c.run.run(ctx, nil, c.node(t, "--logout")...); err != nil && exitCode(err) != exitNoObjsFound {
		return fmt.Errorf("iSCSI disconnect %s: logout: %w", t, err)
	}
	if _, err := c.run.run(ctx, nil, c.node(t, "--op", "delete")...); err != nil && exitCode(err) != exitNoObjsFound {
		return fmt.Errorf("iSCSI disconnect %s: node record: %w", t, err)
	}
	c.log.InfoContext(ctx, "iSCSI target logged out", "target", t)
	return nil
}

// removeDisk flushes the disk's buffers and deletes the SCSI device, as
// os-brick's remove_scsi_device does (blockdev --flushbufs; echo 1 >
// /sys/block/sdX/device/delete). A dm map holding the disk is flushed
// first (multipath -f); when that fails the disk stays, since deleting a
// path under a live map can leave its I/O queued forever.
func (c *Connector) removeDisk(ctx context.Context, dev Device) error {
	if dev.Multipath {
		if err := c.flushMap(ctx, filepath.Base(dev.Path)); err != nil {
			return err
		}
	}
	if f, err := os.OpenFile(dev.Disk, os.O_RDONLY, 0); err == nil {
		serr := f.Sync()
		f.Close()
		if serr != nil {
			c.log.WarnContext(ctx, "flush before SCSI device removal failed", "disk", dev.Disk, "err", serr)
		}
	}
	del := filepath.Join(c.sysfs, "block", filepath.Base(dev.Disk), "device", "delete")
	if err := os.WriteFile(del, []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", dev.Disk, errors.Join(err, errdefs.ErrInternal))
	}
	return nil
}

// flushMap removes the multipath map name (multipath -f).
func (c *Connector) flushMap(ctx context.Context, name string) error {
	cctx, cancel := context.WithTimeout(ctx, c.run.timeout)
	defer cancel()
	cmd := exec.CommandContext(cctx, "multipath", "-f", name)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return fmt.Errorf("multipath -f %s: %w", name, ctx.Err())
	}
	return fmt.Errorf("multipath -f %s: %v: %s: the map is in use or cannot be flushed, its paths stay: %w",
		name, err, strings.TrimSpace(string(out)), errdefs.ErrFailedPrecondition)
}

// otherLUNs lists the LUNs of t's target other than t.LUN still in use.
func (c *Connector) otherLUNs(ctx context.Context, t Target, inUse InUse) ([]int, error) {
	var luns []int
	if inUse != nil {
		ts, err := inUse(ctx)
		if err != nil {
			return nil, err
		}
		for _, o := range ts {
			if o.sameTarget(t) && o.LUN != t.LUN {
				luns = append(luns, o.LUN)
			}
		}
		return luns, nil
	}
	prefix := fmt.Sprintf("ip-%s-iscsi-%s-lun-", t.Portal, t.IQN)
	ents, err := os.ReadDir(c.byPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, errors.Join(err, errdefs.ErrInternal)
	}
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), prefix)
		if !ok {
			continue
		}
		if n, err := strconv.Atoi(rest); err == nil && n != t.LUN {
			luns = append(luns, n)
		}
	}
	return luns, nil
}

// Adopt lists the sessions this host already has, for the agent to take
// over at start instead of logging in again.
func (c *Connector) Adopt(ctx context.Context) ([]Session, error) {
	ss, err := c.sessions(ctx)
	if err != nil {
		return nil, fmt.Errorf("iSCSI adopt: %w", err)
	}
	for _, s := range ss {
		c.log.InfoContext(ctx, "iSCSI session adopted", "sid", s.ID, "iqn", s.IQN, "portal", s.Portal)
	}
	return ss, nil
}

// Available says whether the kernel path can work on this host and, when
// it cannot, why: iscsiadm must be installed, the iscsi_tcp module
// loaded or loadable, and iscsid reachable.
func (c *Connector) Available(ctx context.Context) (bool, string) {
	if _, err := exec.LookPath(c.run.bin); err != nil {
		return false, fmt.Sprintf("%s not found: install open-iscsi for the kernel iSCSI initiator", c.run.bin)
	}
	if _, err := os.Stat(filepath.Join(c.sysfs, "module", "iscsi_tcp")); err != nil {
		if c.modprobe == "" {
			return false, "kernel module iscsi_tcp is not loaded"
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		out, err := exec.CommandContext(cctx, c.modprobe, "-n", "iscsi_tcp").CombinedOutput()
		if err != nil {
			return false, fmt.Sprintf("kernel module iscsi_tcp is not loaded and cannot be loaded (%s): use the userspace (libiscsi) path",
				strings.TrimSpace(string(out)))
		}
	}
	if _, err := c.run.run(ctx, nil, "-m", "session"); err != nil && exitCode(err) != exitNoObjsFound {
		return false, fmt.Sprintf("iscsid is not reachable: %v", err)
	}
	return true, ""
}

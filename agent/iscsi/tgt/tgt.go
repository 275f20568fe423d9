package tgt

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/stowage/stowage/errdefs"
)

// LUNManager makes and exposes LUNs on one iSCSI target system. Targets
// are named by IQN, LUNs by their backing (a path on the target host, or
// whatever names a volume to a vendor array). Every method is idempotent:
// creating what exists succeeds and returns it, removing what is missing
// succeeds. Methods that name a target that does not exist return
// errdefs.ErrNotFound, except the removals.
type LUNManager interface {
	// EnsureTarget creates the target iqn unless it exists.
	EnsureTarget(ctx context.Context, iqn string) error
	// DeleteTarget removes the target, its LUNs and its ACLs, logging out
	// any initiator still logged in. The backings are left alone.
	DeleteTarget(ctx context.Context, iqn string) error
	// LUNs lists the target's LUNs (LUN 0, the controller, left out).
	LUNs(ctx context.Context, iqn string) ([]LUN, error)
	// AddLUN exposes backing as a LUN of the target and returns its
	// number: the existing one if backing is already exposed, else the
	// lowest free number from 1.
	AddLUN(ctx context.Context, iqn, backing string) (int, error)
	// RemoveLUN removes the LUN backed by backing.
	RemoveLUN(ctx context.Context, iqn, backing string) error
	// Refresh makes the target serve the backing's current size after it
	// grew; initiators then rescan. The LUN keeps its number.
	Refresh(ctx context.Context, iqn, backing string) error
	// Allow lets initiator (an initiator IQN or an IP address; "ALL" for
	// anyone, only when the caller means it) log in to the target.
	Allow(ctx context.Context, iqn, initiator string) error
	// Disallow removes what Allow added.
	Disallow(ctx context.Context, iqn, initiator string) error
	// SetCHAP requires initiators of the target to authenticate as user
	// with secret (one-way CHAP). It creates the account or replaces its
	// secret, and binds it to the target.
	SetCHAP(ctx context.Context, iqn, user, secret string) error
	// RemoveCHAP unbinds user from the target.
	RemoveCHAP(ctx context.Context, iqn, user string) error
	// Target describes the target: its LUNs, ACL, CHAP accounts and
	// sessions.
	Target(ctx context.Context, iqn string) (Target, error)
	// Logout ends the sessions of initiator on the target (a host no
	// longer admitted: Disallow and RemoveCHAP keep it from logging in
	// again) and returns how many connections it closed. An initiator
	// with no session is not an error.
	Logout(ctx context.Context, iqn, initiator string) (int, error)
}

var _ LUNManager = (*Manager)(nil)

// Manager is the LUNManager of a local tgtd, driven with tgtadm. It is
// safe for concurrent use; its changes are serialised among its callers
// (not with other processes running tgtadm against the same tgtd).
type Manager struct {
	bin  string
	ctl  int
	thin bool
	log  *slog.Logger
	mu   chan struct{} // a lock whose acquire takes a ctx
	// set is the SHA-256 of the secret this Manager last gave each CHAP
	// user (under mu): tgt cannot show a secret, and replacing an account
	// that already has it churns tgtd (a delete of an account in use by
	// live sessions, over and over, made tgtd 1.0 crash in the crash
	// matrix). A Manager that has not set a user yet replaces it once.
	set map[string][sha256.Size]byte
}

// Option configures a Manager.
type Option func(*Manager)

// WithBinary sets the tgtadm binary (default "tgtadm" on PATH).
func WithBinary(path string) Option { return func(m *Manager) { m.bin = path } }

// WithControlPort talks to the tgtd started with -C n (0..32767; default
// 0, tgtd's default): its control socket is /var/run/tgtd/socket.<n>.
func WithControlPort(n int) Option { return func(m *Manager) { m.ctl = n } }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(m *Manager) { m.log = l } }

// WithThinProvisioning sets whether new LUNs advertise thin provisioning
// (default true): tgt then answers UNMAP and WRITE SAME with UNMAP by
// punching holes in the backing file, so an initiator writing zeros with
// unmap allowed (qemu-img convert does) leaves the backing sparse. Without
// it those zeros are written out and allocate.
func WithThinProvisioning(on bool) Option { return func(m *Manager) { m.thin = on } }

// New returns a Manager of the local tgtd.
func New(opts ...Option) *Manager {
	m := &Manager{bin: "tgtadm", thin: true, log: slog.Default(), mu: make(chan struct{}, 1), set: map[string][sha256.Size]byte{}}
	for _, o := range opts {
		o(m)
	}
	return m
}

func (m *Manager) lock(ctx context.Context) (unlock func(), err error) {
	select {
	case m.mu <- struct{}{}:
		return func() { <-m.mu }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Targets lists the targets of the tgtd.
func (m *Manager) Targets(ctx context.Context) ([]Target, error) {
	ts, err := m.targets(ctx)
	for i := range ts {
		ts[i].Accounts = slices.DeleteFunc(ts[i].Accounts, func(u string) bool { return u == guardUser })
	}
	return ts, err
}

// targets lists the targets as tgtd has them: bound accounts in tgt's
// slot order, the guard account included.
func (m *Manager) targets(ctx context.Context) ([]Target, error) {
	out, err := m.run(ctx, "show targets", "--op", "show", "--mode", "target")
	if err != nil {
		return nil, err
	}
	return parseShow(out)
}

// Target implements LUNManager.
func (m *Manager) Target(ctx context.Context, iqn string) (Target, error) {
	t, err := m.target(ctx, iqn)
	t.Accounts = slices.DeleteFunc(t.Accounts, func(u string) bool { return u == guardUser })
	return t, err
}

// Logout implements LUNManager: tgtadm --op delete --mode conn for each
// connection of each session of initiator. tgt drops the connection at
// once; the session goes with its last connection.
func (m *Manager) Logout(ctx context.Context, iqn, initiator string) (int, error) {
	if err := checkName("initiator", initiator); err != nil {
		return 0, err
	}
	unlock, err := m.lock(ctx)
	if err != nil {
		return 0, err
	}
	defer unlock()
	t, err := m.target(ctx, iqn)
	if errdefs.IsNotFound(err) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	closed := 0
	for _, nx := range t.Nexuses {
		if nx.Initiator != initiator {
			continue
		}
		for _, cid := range nx.CIDs {
			_, err := m.run(ctx, fmt.Sprintf("log out %s (session %d, connection %d) of %s", initiator, nx.SID, cid, iqn),
				"--op", "delete", "--mode", "conn", "--tid", strconv.Itoa(t.TID), "--sid", strconv.Itoa(nx.SID), "--cid", strconv.Itoa(cid))
			if errdefs.IsNotFound(err) {
				continue // it went meanwhile
			}
			if err != nil {
				return closed, err
			}
			closed++
		}
	}
	if closed > 0 {
		m.log.InfoContext(ctx, "iscsi initiator logged out", "iqn", iqn, "initiator", initiator, "connections", closed)
	}
	return closed, nil
}

// target returns the target named iqn as tgtd has it (see targets), or
// ErrNotFound.
func (m *Manager) target(ctx context.Context, iqn string) (Target, error) {
	ts, err := m.targets(ctx)
	if err != nil {
		return Target{}, err
	}
	for _, t := range ts {
		if t.IQN == iqn {
			return t, nil
		}
	}
	return Target{}, fmt.Errorf("iscsi target %s: %w", iqn, errdefs.ErrNotFound)
}

// EnsureTarget implements LUNManager.
func (m *Manager) EnsureTarget(ctx context.Context, iqn string) error {
	if err := checkName("target", iqn); err != nil {
		return err
	}
	unlock, err := m.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	// Another process may take the tid we picked between show and new:
	// then look again.
	for attempt := 0; ; attempt++ {
		ts, err := m.Targets(ctx)
		if err != nil {
			return err
		}
		used := map[int]bool{}
		for _, t := range ts {
			if t.IQN == iqn {
				return nil
			}
			used[t.TID] = true
		}
		tid := 1
		for used[tid] {
			tid++
		}
		_, err = m.run(ctx, "new target "+iqn, "--op", "new", "--mode", "target", "--tid", strconv.Itoa(tid), "-T", iqn)
		if err == nil {
			m.log.InfoContext(ctx, "iscsi target created", "iqn", iqn, "tid", tid)
			return nil
		}
		if !errdefs.IsAlreadyExists(err) || attempt == 3 {
			return err
		}
	}
}

// DeleteTarget implements LUNManager.
func (m *Manager) DeleteTarget(ctx context.Context, iqn string) error {
	unlock, err := m.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	t, err := m.target(ctx, iqn)
	if errdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	_, err = m.run(ctx, "delete target "+iqn, "--op", "delete", "--mode", "target", "--tid", strconv.Itoa(t.TID), "--force")
	if err != nil && !errdefs.IsNotFound(err) {
		return err
	}
	m.log.InfoContext(ctx, "iscsi target deleted", "iqn", iqn, "tid", t.TID, "sessions", t.Sessions)
	return nil
}

// LUNs implements LUNManager.
func (m *Manager) LUNs(ctx context.Context, iqn string) ([]LUN, error) {
	t, err := m.target(ctx, iqn)
	if err != nil {
		return nil, err
	}
	return t.LUNs, nil
}

// AddLUN implements LUNManager. backing must be an absolute path on this
// host (a file or a block device).
func (m *Manager) AddLUN(ctx context.Context, iqn, backing string) (int, error) {
	if !filepath.IsAbs(backing) || strings.ContainsAny(backing, "\n") {
		return 0, fmt.Errorf("iscsi target %s: backing %q is not an absolute path: %w", iqn, backing, errdefs.ErrInvalid)
	}
	unlock, err := m.lock(ctx)
	if err != nil {
		return 0, err
	}
	defer unlock()
	t, err := m.target(ctx, iqn)
	if err != nil {
		return 0, err
	}
	// tgtd answers a missing backing with "invalid request" only; tgtd
	// runs on this host, so say what is wrong before asking it.
	if _, err := os.Stat(backing); err != nil {
		class := errdefs.ErrInvalid
		if errors.Is(err, fs.ErrNotExist) {
			class = errdefs.ErrNotFound
		}
		return 0, fmt.Errorf("iscsi target %s: backing: %v: %w", iqn, err, class)
	}
	used := map[int]bool{}
	for _, l := range t.LUNs {
		if l.Backing == backing {
			return l.Number, nil
		}
		used[l.Number] = true
	}
	n := 1
	for used[n] {
		n++
	}
	if err := m.newLUN(ctx, t, n, backing); err != nil {
		return 0, err
	}
	m.log.InfoContext(ctx, "iscsi lun added", "iqn", iqn, "lun", n, "backing", backing)
	return n, nil
}

func (m *Manager) newLUN(ctx context.Context, t Target, n int, backing string) error {
	what := fmt.Sprintf("new lun %d of %s backed by %s", n, t.IQN, backing)
	tid, lun := strconv.Itoa(t.TID), strconv.Itoa(n)
	if _, err := m.run(ctx, what, "--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", lun, "-b", backing); err != nil {
		if errdefs.IsInvalid(err) {
			// tgtd says only "invalid request"; its log says why.
			return fmt.Errorf("%w (is the backing missing or unreadable? tgtd's log has the reason)", err)
		}
		return err
	}
	if !m.thin {
		return nil
	}
	if _, err := m.run(ctx, "thin provisioning of "+what, "--op", "update", "--mode", "logicalunit", "--tid", tid, "--lun", lun, "--params", "thin_provisioning=1"); err != nil {
		// Do not leave a LUN that allocates zeros behind a success.
		if _, derr := m.run(context.WithoutCancel(ctx), "undo "+what, "--op", "delete", "--mode", "logicalunit", "--tid", tid, "--lun", lun); derr != nil {
			err = errors.Join(err, derr)
		}
		return err
	}
	return nil
}

// RemoveLUN implements LUNManager.
func (m *Manager) RemoveLUN(ctx context.Context, iqn, backing string) error {
	unlock, err := m.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	t, err := m.target(ctx, iqn)
	if errdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, l := range t.LUNs {
		if l.Backing != backing {
			continue
		}
		_, err := m.run(ctx, fmt.Sprintf("delete lun %d of %s", l.Number, iqn), "--op", "delete", "--mode", "logicalunit", "--tid", strconv.Itoa(t.TID), "--lun", strconv.Itoa(l.Number))
		if err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		m.log.InfoContext(ctx, "iscsi lun removed", "iqn", iqn, "lun", l.Number, "backing", backing)
	}
	return nil
}

// Refresh implements LUNManager. tgt reads a backing's size once, when the
// LUN is created, and `--op update --mode logicalunit` changes parameters
// only, not the size; so Refresh deletes the LUN and creates it again with
// the same number, backing and SCSI serial (tgt derives it from tid and
// number). Logged-in initiators keep their sessions; I/O in the moment
// between the two gets "logical unit not supported" and is retried by
// initiators, which then see the new capacity on rescan.
func (m *Manager) Refresh(ctx context.Context, iqn, backing string) error {
	unlock, err := m.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	t, err := m.target(ctx, iqn)
	if err != nil {
		return err
	}
	i := slices.IndexFunc(t.LUNs, func(l LUN) bool { return l.Backing == backing })
	if i < 0 {
		return fmt.Errorf("iscsi target %s: no lun backed by %s: %w", iqn, backing, errdefs.ErrNotFound)
	}
	n := t.LUNs[i].Number
	if _, err := m.run(ctx, fmt.Sprintf("delete lun %d of %s for refresh", n, iqn), "--op", "delete", "--mode", "logicalunit", "--tid", strconv.Itoa(t.TID), "--lun", strconv.Itoa(n)); err != nil {
		return err
	}
	// Once deleted, re-create even if the caller gives up: a LUN missing
	// is worse than a refresh that took a little longer.
	if err := m.newLUN(context.WithoutCancel(ctx), t, n, backing); err != nil {
		return fmt.Errorf("iscsi target %s: lun %d was removed for refresh and could not be re-added: %w", iqn, n, err)
	}
	m.log.InfoContext(ctx, "iscsi lun refreshed", "iqn", iqn, "lun", n, "backing", backing)
	return nil
}

// Allow implements LUNManager.
func (m *Manager) Allow(ctx context.Context, iqn, initiator string) error {
	return m.acl(ctx, "bind", iqn, initiator)
}

// Disallow implements LUNManager.
func (m *Manager) Disallow(ctx context.Context, iqn, initiator string) error {
	return m.acl(ctx, "unbind", iqn, initiator)
}

func (m *Manager) acl(ctx context.Context, op, iqn, initiator string) error {
	if err := checkName("initiator", initiator); err != nil {
		return err
	}
	unlock, err := m.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	t, err := m.target(ctx, iqn)
	if op == "unbind" && errdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if slices.Contains(t.ACLs, initiator) == (op == "bind") {
		return nil
	}
	_, err = m.run(ctx, op+" initiator "+initiator+" to "+iqn, "--op", op, "--mode", "target", "--tid", strconv.Itoa(t.TID), aclFlag(initiator), initiator)
	switch {
	case op == "bind" && errdefs.IsAlreadyExists(err), op == "unbind" && errdefs.IsNotFound(err):
		return nil
	case err != nil:
		return err
	}
	m.log.InfoContext(ctx, "iscsi acl changed", "op", op, "iqn", iqn, "initiator", initiator)
	return nil
}

func (m *Manager) run(ctx context.Context, what string, args ...string) (string, error) {
	return m.runSecret(ctx, what, "", args...)
}

// runSecret runs tgtadm -C <ctl> --lld iscsi args. what names the
// operation in errors; secret, when set, is replaced in anything tgtadm
// prints before it reaches an error.
func (m *Manager) runSecret(ctx context.Context, what, secret string, args ...string) (string, error) {
	// tgtd's control socket drops a request now and then while another
	// process's tgtadm talks to it ("failed to send request hdr …
	// Transport endpoint is not connected"): the request never reached
	// tgtd, so it is sent again, a few times, before tgtd is called gone.
	//
	// tgtd may also reset the connection before it answers ("can't get
	// the response"): the request may or may not have been applied, so it
	// is sent again, and a new thing that now already exists, or a deleted
	// one now missing, is what the first request did.
	wait := 20 * time.Millisecond
	ambiguous := false
	for attempt := 1; ; attempt++ {
		out, err := m.runOnce(ctx, what, secret, args...)
		// (Not for a new target: its tid may be another's; EnsureTarget
		// looks again.)
		if ambiguous && err != nil && (flag(args, "--op") == "new" && flag(args, "--mode") != "target" && errdefs.IsAlreadyExists(err) ||
			flag(args, "--op") == "delete" && errdefs.IsNotFound(err)) {
			return "", nil
		}
		if err == nil || attempt == 8 { // about 5 s of tries
			return out, err
		}
		switch {
		case strings.Contains(err.Error(), "failed to send request hdr"):
		case strings.Contains(err.Error(), "can't get the response"):
			ambiguous = true
		default:
			return out, err
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("tgtadm %s: %w", what, ctx.Err())
		case <-time.After(wait):
		}
		wait *= 2
	}
}

// flag is the value of option name in tgtadm args ("" if none).
func flag(args []string, name string) string {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == name {
			return args[i+1]
		}
	}
	return ""
}

// runOnce is one tgtadm run of runSecret.
func (m *Manager) runOnce(ctx context.Context, what, secret string, args ...string) (string, error) {
	argv := append([]string{"-C", strconv.Itoa(m.ctl), "--lld", "iscsi"}, args...)
	cmd := exec.CommandContext(ctx, m.bin, argv...)
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err == nil {
		return stdout.String(), nil
	}
	if ctx.Err() != nil {
		return "", fmt.Errorf("tgtadm %s: %w", what, ctx.Err())
	}
	msg := strings.TrimSpace(stderr.String() + " " + stdout.String())
	if secret != "" {
		msg = strings.ReplaceAll(msg, secret, "<redacted>")
	}
	msg = strings.TrimPrefix(msg, "tgtadm: ")
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		// Not started: missing or not executable.
		return "", fmt.Errorf("tgtadm %s: %v: %w", what, err, errdefs.ErrUnavailable)
	}
	if msg == "" {
		msg = err.Error()
	}
	class := classify(msg)
	if class == errdefs.ErrUnavailable {
		msg += fmt.Sprintf(" (no tgtd answers on control port %d: not running, or started with another -C)", m.ctl)
	}
	return "", fmt.Errorf("tgtadm %s: %s: %w", what, msg, class)
}

// aclFlag is tgtadm's option for an ACL entry: -I (--initiator-address)
// for an address, a CIDR prefix or ALL; --initiator-name for an IQN (or
// any other initiator name). `-I <iqn>` is accepted by tgtadm but makes an
// address rule that never matches.
func aclFlag(initiator string) string {
	if initiator == "ALL" || net.ParseIP(initiator) != nil {
		return "-I"
	}
	if _, _, err := net.ParseCIDR(initiator); err == nil {
		return "-I"
	}
	return "--initiator-name"
}

// classify maps a tgtadm message to an error class.
func classify(msg string) error {
	switch {
	case strings.Contains(msg, "can't find"), strings.Contains(msg, "does not exist"):
		return errdefs.ErrNotFound
	case strings.Contains(msg, "already exists"):
		return errdefs.ErrAlreadyExists
	case strings.Contains(msg, "failed to send request"), strings.Contains(msg, "can't connect"),
		strings.Contains(msg, "Connection refused"), strings.Contains(msg, "not connected"):
		// No tgtd behind the control socket (not running, or another -C).
		return errdefs.ErrUnavailable
	case strings.Contains(msg, "still active"):
		return errdefs.ErrFailedPrecondition
	case strings.Contains(msg, "invalid request"), strings.Contains(msg, "not allowed"),
		strings.Contains(msg, "invalid parameter"), strings.Contains(msg, "unknown"):
		return errdefs.ErrInvalid
	case strings.Contains(msg, "out of range"):
		return errdefs.ErrInvalid
	case strings.Contains(msg, "out of memory"):
		return errdefs.ErrResourceExhausted
	}
	return errdefs.ErrInternal
}

// checkName refuses names tgtadm would misread: empty, or with blanks,
// commas or control characters.
func checkName(kind, name string) error {
	if name == "" || strings.ContainsFunc(name, func(r rune) bool { return r <= ' ' || r == ',' || r == 0x7f }) {
		return fmt.Errorf("iscsi %s %q: empty or has blanks, commas or control characters: %w", kind, name, errdefs.ErrInvalid)
	}
	return nil
}

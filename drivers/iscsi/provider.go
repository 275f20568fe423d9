package iscsi

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// Name is the provider's name.
const Name = "iscsi"

// Provider is the iSCSI provider.
type Provider struct {
	lc  *LifeCycle
	drv *Driver
}

var _ drivers.Provider = (*Provider)(nil)

// Option configures the provider.
type Option func(*Driver)

// WithCHAPKey sets the key CHAP secrets are derived from (the controller's
// DATA/pki/chap.key). Without it stores cannot be initialised.
func WithCHAPKey(key []byte) Option { return func(d *Driver) { d.chapKey = key } }

// New returns the provider; hosts reach the target host and the hosts in a
// store's scope.
func New(hosts hostops.Selector, opts ...Option) *Provider {
	d := &Driver{hosts: hosts}
	for _, o := range opts {
		o(d)
	}
	return &Provider{lc: &LifeCycle{drv: d}, drv: d}
}

// Name implements drivers.Provider.
func (p *Provider) Name() string { return Name }

// Roles implements drivers.Provider: primary only.
func (p *Provider) Roles() []drivers.Role { return []drivers.Role{drivers.RolePrimary} }

// LifeCycle implements drivers.Provider.
func (p *Provider) LifeCycle() drivers.LifeCycle { return p.lc }

// Driver implements drivers.Provider.
func (p *Provider) Driver() drivers.Driver { return p.drv }

// HostRoot implements drivers.HostRooted: the backing directory on the
// store's target host, which creates, lists and deletes the LUNs' files
// there; no directory on the other hosts (they reach LUNs over iSCSI).
func (p *Provider) HostRoot(info drivers.StoreInfo, hostID string) string {
	s, err := storeOf(info)
	if err != nil || hostID != s.targetHost {
		return ""
	}
	return s.dir
}

// The store's details.
const (
	DetailTargetHost = "target_host"
	DetailBackingDir = "backing_dir"
)

// layout is what PrepareStore creates in the backing directory.
var layout = []string{"luns"}

// store is a store's iSCSI view.
type store struct {
	id, portal, iqn, targetHost, dir string
}

// parseStore reads the URL (iscsi://portal/iqn) and details of a store.
func parseStore(id, rawURL string, details map[string]string) (store, error) {
	u, err := url.Parse(rawURL)
	if err != nil || u.Scheme != "iscsi" || u.Host == "" || u.User != nil || u.RawQuery != "" {
		return store{}, fmt.Errorf("iSCSI store URL %q: want iscsi://portal[:3260]/<target iqn>: %w", rawURL, errdefs.ErrInvalid)
	}
	portal := u.Host
	if _, _, err := net.SplitHostPort(portal); err != nil {
		portal = net.JoinHostPort(portal, "3260")
	}
	iqn := strings.Trim(u.Path, "/")
	if !validIQN(iqn) {
		return store{}, fmt.Errorf("iSCSI store URL %q: %q is not a target name (iqn.YYYY-MM.reverse.domain[:name], lower case): %w", rawURL, iqn, errdefs.ErrInvalid)
	}
	s := store{id: id, portal: portal, iqn: iqn, targetHost: details[DetailTargetHost], dir: details[DetailBackingDir]}
	if s.targetHost == "" || s.dir == "" || !strings.HasPrefix(s.dir, "/") {
		return store{}, fmt.Errorf("iSCSI store: details %s (the host running the target: its agent has --iscsi-target) and %s (an absolute directory on it for the LUNs' files) are required: %w",
			DetailTargetHost, DetailBackingDir, errdefs.ErrInvalid)
	}
	return s, nil
}

func storeOf(info drivers.StoreInfo) (store, error) {
	return parseStore(info.ID, info.URL, info.Details)
}

func (s store) root() hostops.StoreRoot {
	return hostops.StoreRoot{ID: s.id, Path: s.dir, Subdirs: layout}
}

func validIQN(s string) bool {
	if !strings.HasPrefix(s, "iqn.") || len(s) > 223 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == ':') {
			return false
		}
	}
	return true
}

// InitiatorName is the iSCSI initiator name Stowage uses for host hostID
// (the userspace initiator logs in with it; the target's ACL names it).
func InitiatorName(hostID string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(hostID) {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '.' || r == '-' {
			b.WriteRune(r)
		} else {
			b.WriteByte('-')
		}
	}
	return "iqn.2026-12.org.stowage:host." + b.String()
}

// CHAP is host hostID's CHAP account on store storeID: a user name from
// the store and host ids and a 16-character secret, HMAC-SHA256(key,
// store, host).
func CHAP(key []byte, storeID, hostID string) (user, secret string) {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(storeID + "\x00" + hostID))
	// tgtd's accounts are global, not per target: the user is per store
	// and host too, or a second store on the same tgtd would replace the
	// first store's secret for the host.
	return "stw-" + strconv.FormatUint(uint64(fnv32(storeID+"\x00"+hostID)), 36), base64.RawURLEncoding.EncodeToString(m.Sum(nil))[:16]
}

// initiator is host hostID's initiator and CHAP account on store s.
func (d *Driver) initiator(s store, hostID string) (hostops.ISCSIInitiator, error) {
	if len(d.chapKey) < 16 {
		return hostops.ISCSIInitiator{}, fmt.Errorf("iSCSI store %s: the controller has no CHAP key: %w", s.id, errdefs.ErrFailedPrecondition)
	}
	user, secret := CHAP(d.chapKey, s.id, hostID)
	return hostops.ISCSIInitiator{IQN: InitiatorName(hostID), CHAPUser: user, CHAPSecret: secret}, nil
}

// fnv32 is FNV-1a: a short, stable CHAP user name per store and host.
func fnv32(s string) uint32 {
	h := uint32(2166136261)
	for i := 0; i < len(s); i++ {
		h ^= uint32(s[i])
		h *= 16777619
	}
	return h
}

// target is store s's target with the initiators of hostIDs.
func (d *Driver) target(s store, hostIDs ...string) (hostops.ISCSITarget, error) {
	t := hostops.ISCSITarget{Store: s.id, IQN: s.iqn}
	for _, h := range hostIDs {
		i, err := d.initiator(s, h)
		if err != nil {
			return hostops.ISCSITarget{}, err
		}
		t.Initiators = append(t.Initiators, i)
	}
	return t, nil
}

// targetHost is the agent running s's target, serving s's directory (it
// is probed every time: a restarted agent serves it again).
func (d *Driver) targetHost(ctx context.Context, s store) (hostops.Host, error) {
	h, err := d.hosts.ForHost(ctx, s.targetHost)
	if err != nil {
		return nil, fmt.Errorf("iSCSI store %s: target host %s: %w", s.id, s.targetHost, err)
	}
	if _, err := h.ProbeStore(ctx, s.root()); err != nil {
		return nil, fmt.Errorf("iSCSI store %s on target host %s: %w", s.id, s.targetHost, err)
	}
	return h, nil
}

// lunURI is how host hostID reaches LUN n of s.
func (d *Driver) lunURI(s store, hostID string, n int) (drivers.URI, error) {
	i, err := d.initiator(s, hostID)
	if err != nil {
		return "", err
	}
	u := url.URL{Scheme: "iscsi", User: url.UserPassword(i.CHAPUser, i.CHAPSecret), Host: s.portal, Path: "/" + s.iqn + "/" + strconv.Itoa(n),
		RawQuery: url.Values{"initiator": {i.IQN}}.Encode()}
	return drivers.URI(u.String()), nil
}

// hostIDs of hosts.
func hostIDs(hosts []hostops.Host) []string {
	out := make([]string, 0, len(hosts))
	for _, h := range hosts {
		out = append(out, h.HostID())
	}
	return out
}

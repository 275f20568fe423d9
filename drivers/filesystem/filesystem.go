package filesystem

import (
	"fmt"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// Name is the provider's registered name.
const Name = "filesystem"

// DefaultProbeTimeout bounds each host's probe in Attach.
const DefaultProbeTimeout = 30 * time.Second

// exampleURL is shown in every URL error.
const exampleURL = "file:///var/lib/stowage/primary"

// Provider is the filesystem storage provider.
type Provider struct {
	lc  *LifeCycle
	drv *Driver
}

var (
	_ drivers.Provider   = (*Provider)(nil)
	_ drivers.HostRooted = (*Provider)(nil)
)

// Option configures a Provider.
type Option func(*config)

type config struct {
	probeTimeout time.Duration
}

// WithProbeTimeout bounds each host's probe in Attach, so that one host
// stuck on a dead NFS server does not hold up the others (default
// DefaultProbeTimeout; zero or less keeps the default).
func WithProbeTimeout(d time.Duration) Option {
	return func(c *config) {
		if d > 0 {
			c.probeTimeout = d
		}
	}
}

// New returns the provider; it gets host work done on the hosts hosts
// selects (the controller's EndPointSelector), which must not be nil.
func New(hosts hostops.Selector, opts ...Option) *Provider {
	if hosts == nil {
		panic("filesystem.New: nil hostops.Selector")
	}
	c := config{probeTimeout: DefaultProbeTimeout}
	for _, o := range opts {
		o(&c)
	}
	drv := &Driver{hosts: hosts}
	return &Provider{
		lc:  &LifeCycle{hosts: hosts, drv: drv, probeTimeout: c.probeTimeout},
		drv: drv,
	}
}

// Name returns "filesystem".
func (p *Provider) Name() string { return Name }

// Roles returns primary and image.
func (p *Provider) Roles() []drivers.Role {
	return []drivers.Role{drivers.RolePrimary, drivers.RoleImage}
}

// LifeCycle returns the provider's *LifeCycle.
func (p *Provider) LifeCycle() drivers.LifeCycle { return p.lc }

// Driver returns the provider's *Driver: a drivers.PrimaryDriver with every
// optional capability.
func (p *Provider) Driver() drivers.Driver { return p.drv }

// HostRoot returns the store's directory on the hosts of its scope
// (Details["path"], else the path of its URL; the same on every host); ""
// when neither names one.
func (p *Provider) HostRoot(store drivers.StoreInfo, _ string) string {
	dir, err := storeDir(store)
	if err != nil {
		return ""
	}
	return dir
}

// parseURL returns the directory a store URL names, or errdefs.ErrInvalid
// saying what is wrong with it.
func parseURL(raw string) (string, error) {
	want := "want file:///absolute/path, e.g. " + exampleURL
	if raw == "" {
		return "", fmt.Errorf("store URL is missing; %s: %w", want, errdefs.ErrInvalid)
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("store URL %q does not parse (%v); %s: %w", raw, err, want, errdefs.ErrInvalid)
	}
	switch {
	case u.Scheme == "":
		return "", fmt.Errorf("store URL %q has no scheme; %s: %w", raw, want, errdefs.ErrInvalid)
	case u.Scheme != "file":
		return "", fmt.Errorf("store URL %q has scheme %q; the filesystem provider takes a directory the hosts see, %s (mount an NFS export on the hosts and give its mount point): %w",
			raw, u.Scheme, want, errdefs.ErrInvalid)
	case u.Opaque != "":
		return "", fmt.Errorf("store URL %q has the relative path %q; %s: %w", raw, u.Opaque, want, errdefs.ErrInvalid)
	case u.Host != "" || u.User != nil:
		return "", fmt.Errorf("store URL %q names host %q; a file URL has no host part, the hosts are the store's scope: write file:///%s (three slashes): %w",
			raw, u.Host, strings.TrimPrefix(u.Host+u.Path, "/"), errdefs.ErrInvalid)
	case !strings.HasPrefix(strings.ToLower(raw), "file://"):
		return "", fmt.Errorf("store URL %q lacks the // of a file URL; write file://%s: %w", raw, u.Path, errdefs.ErrInvalid)
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "":
		return "", fmt.Errorf("store URL %q has a query or fragment; %s: %w", raw, want, errdefs.ErrInvalid)
	case u.RawPath != "":
		return "", fmt.Errorf("store URL %q percent-encodes a / or another reserved character in its path; name a plain directory, %s: %w", raw, want, errdefs.ErrInvalid)
	}
	p := u.Path
	switch {
	case p == "":
		return "", fmt.Errorf("store URL %q has no path; %s: %w", raw, want, errdefs.ErrInvalid)
	case strings.IndexByte(p, 0) >= 0:
		return "", fmt.Errorf("store URL %q has a NUL byte in its path: %w", raw, errdefs.ErrInvalid)
	case !filepath.IsAbs(p):
		return "", fmt.Errorf("store URL %q has the relative path %q; %s: %w", raw, p, want, errdefs.ErrInvalid)
	case filepath.Clean(p) != p:
		return "", fmt.Errorf("store URL %q has the path %q, which is not clean (no \"..\", \".\", \"//\" or trailing /): write file://%s: %w",
			raw, p, filepath.Clean(p), errdefs.ErrInvalid)
	case p == "/":
		return "", fmt.Errorf("store URL %q names the root directory of the hosts; name a directory for the store, e.g. %s: %w", raw, exampleURL, errdefs.ErrInvalid)
	}
	return p, nil
}

// storeDir is the directory of store: Details["path"] when Initialize
// recorded it, else the path of the store's URL.
func storeDir(store drivers.StoreInfo) (string, error) {
	if p := store.Details["path"]; p != "" {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" {
			return "", fmt.Errorf("store %s: Details[\"path\"] %q is not a clean absolute directory: %w", store.ID, p, errdefs.ErrInvalid)
		}
		return p, nil
	}
	p, err := parseURL(store.URL)
	if err != nil {
		return "", fmt.Errorf("store %s: %w", store.ID, err)
	}
	return p, nil
}

// fileURI names an absolute path as a file:// URI.
func fileURI(path string) drivers.URI {
	return drivers.URI((&url.URL{Scheme: "file", Path: path}).String())
}

// scopeName renders a scope for messages, naming the empty one.
func scopeName(s drivers.Scope) string {
	if s == (drivers.Scope{}) {
		return "(any)"
	}
	return fmt.Sprintf("%q", s.String())
}

// within reports whether scope inner lies inside outer.
func within(inner, outer drivers.Scope) bool {
	return inner.Zone == outer.Zone &&
		(outer.Cluster == "" || inner.Cluster == outer.Cluster) &&
		(outer.HostID == "" || inner.HostID == outer.HostID)
}

// checkStore requires a store of this provider with an id.
func checkStore(store drivers.StoreInfo) error {
	switch {
	case store.ID == "":
		return fmt.Errorf("the store has no id: %w", errdefs.ErrInvalid)
	case store.Provider != "" && store.Provider != Name:
		return fmt.Errorf("store %s belongs to provider %q, not %q: %w", store.ID, store.Provider, Name, errdefs.ErrInvalid)
	}
	_, err := layout(store.Role)
	return err
}

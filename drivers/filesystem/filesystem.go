// Package filesystem is the "filesystem" storage provider: primary and
// image stores on a directory that the hosts in the store's scope see at
// the same path — a local disk for a host-scoped store, or an NFS (or any
// shared) export that the operator already mounted on every host.
//
// The store URL is file:///absolute/path. The provider never touches a host
// itself: it asks an agent's drivers.Endpoint to lay out, probe, create,
// list and delete. A store directory holds:
//
//	.stowage-store   marker naming the store id (agent/hostfs)
//	volumes/         <volume id>.<raw|qcow2>                      primary only
//	templates/       <template id>.<raw|qcow2|iso>  (primary: the template_spool cache)
//	snapshots/       <snapshot id>.qcow2  (image: snapshot backups)
//	tmp/             files being written; never listed as objects
//
// An object's id is its file name without the extension; its path, as
// ObjectInfo.Path and DataObject.Path carry it, is relative to the store
// ("volumes/v1.qcow2"), and GrantAccess returns it as file:///<store>/<path>.
//
// What this provider does not do yet: Copy (the stream engine comes later;
// CanCopy is false so the motion service picks another strategy) and
// snapshots (TakeSnapshot and RevertSnapshot return errdefs.ErrNotImplemented).
// Only blank volumes are created through Create; templates arrive by
// download or copy.
package filesystem

import (
	"fmt"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// Name is the provider's registered name.
const Name = "filesystem"

// DefaultProbeTimeout bounds each host's probe in Attach.
const DefaultProbeTimeout = 30 * time.Second

// exampleURL is shown in every URL error.
const exampleURL = "file:///var/lib/stowage/primary"

// The layout directories of a store.
const (
	dirVolumes   = "volumes"
	dirTemplates = "templates"
	dirSnapshots = "snapshots"
	dirTmp       = "tmp"
)

// layouts lists each role's subdirectories, tmp last.
var layouts = map[drivers.Role][]string{
	drivers.RolePrimary: {dirVolumes, dirSnapshots, dirTemplates, dirTmp},
	drivers.RoleImage:   {dirTemplates, dirSnapshots, dirTmp},
}

// typeDirs maps an object type to its directory.
var typeDirs = map[drivers.ObjectType]string{
	drivers.ObjectVolume:   dirVolumes,
	drivers.ObjectTemplate: dirTemplates,
	drivers.ObjectSnapshot: dirSnapshots,
}

// Provider is the filesystem storage provider.
type Provider struct {
	lc  *LifeCycle
	drv *Driver
}

var (
	_ drivers.Provider      = (*Provider)(nil)
	_ drivers.LifeCycle     = (*LifeCycle)(nil)
	_ drivers.PrimaryDriver = (*Driver)(nil)
	_ drivers.Factory       = Factory
)

// Option configures a Provider.
type Option func(*config)

type config struct {
	probeTimeout time.Duration
}

// WithProbeTimeout bounds each host's probe in Attach, so that one host
// stuck on a dead NFS server does not hold up the others (default
// DefaultProbeTimeout).
func WithProbeTimeout(d time.Duration) Option { return func(c *config) { c.probeTimeout = d } }

// New returns the provider; deps.Endpoints must not be nil (Factory checks).
func New(deps drivers.Deps, opts ...Option) *Provider {
	c := config{probeTimeout: DefaultProbeTimeout}
	for _, o := range opts {
		o(&c)
	}
	drv := &Driver{eps: deps.Endpoints}
	return &Provider{
		lc:  &LifeCycle{eps: deps.Endpoints, drv: drv, probeTimeout: c.probeTimeout},
		drv: drv,
	}
}

// Factory builds the provider for the registry.
func Factory(deps drivers.Deps) (drivers.Provider, error) {
	if deps.Endpoints == nil {
		return nil, fmt.Errorf("filesystem provider: no Endpoints in Deps: %w", errdefs.ErrInvalid)
	}
	return New(deps), nil
}

// Name returns "filesystem".
func (p *Provider) Name() string { return Name }

// Roles returns primary and image.
func (p *Provider) Roles() []drivers.Role {
	return []drivers.Role{drivers.RolePrimary, drivers.RoleImage}
}

// LifeCycle returns the provider's *LifeCycle.
func (p *Provider) LifeCycle() drivers.LifeCycle { return p.lc }

// Driver returns the provider's *Driver, a drivers.PrimaryDriver.
func (p *Provider) Driver() drivers.Driver { return p.drv }

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

// storePath is the directory of store.
func storePath(store drivers.StoreInfo) (string, error) {
	p, err := parseURL(store.URL)
	if err != nil {
		return "", fmt.Errorf("store %s: %w", store.ID, err)
	}
	return p, nil
}

// layout returns the subdirectories of a store of role.
func layout(role drivers.Role) ([]string, error) {
	l, ok := layouts[role]
	if !ok {
		return nil, fmt.Errorf("role %q: the filesystem provider serves %s and %s stores: %w",
			role, drivers.RolePrimary, drivers.RoleImage, errdefs.ErrInvalid)
	}
	return l, nil
}

// objectDirs returns the directories of role that hold objects (not tmp/).
func objectDirs(role drivers.Role) ([]string, error) {
	l, err := layout(role)
	if err != nil {
		return nil, err
	}
	return l[:len(l)-1], nil
}

// extensions maps formats to file extensions and back.
var extensions = map[drivers.Format]string{
	drivers.FormatRaw:   ".raw",
	drivers.FormatQCOW2: ".qcow2",
	drivers.FormatISO:   ".iso",
}

func formatOf(ext string) drivers.Format {
	for f, e := range extensions {
		if e == ext {
			return f
		}
	}
	return ""
}

// checkObjectID requires an id that is a plain file name without a leading dot.
func checkObjectID(id string) error {
	switch {
	case id == "":
		return fmt.Errorf("empty object id: %w", errdefs.ErrInvalid)
	case len(id) > 200:
		return fmt.Errorf("object id %.20q... is longer than 200 bytes: %w", id, errdefs.ErrInvalid)
	case strings.HasPrefix(id, "."):
		return fmt.Errorf("object id %q starts with a dot: %w", id, errdefs.ErrInvalid)
	case strings.ContainsFunc(id, func(r rune) bool { return r == '/' || r == '\\' || r < 0x20 || r == 0x7f }):
		return fmt.Errorf("object id %q contains a slash or a control character: %w", id, errdefs.ErrInvalid)
	}
	return nil
}

// objectPath returns obj's path relative to its store: obj.Path when set
// (checked to be an object file of the store's layout), else derived from
// its type, id and format.
func objectPath(obj drivers.DataObject) (string, error) {
	if obj.Path != "" {
		return checkObjectPath(obj.Store.Role, obj.Path)
	}
	if err := checkObjectID(obj.ID); err != nil {
		return "", err
	}
	dir, ok := typeDirs[obj.Type]
	if !ok {
		return "", fmt.Errorf("object %s has type %q, not volume, template or snapshot: %w", obj.ID, obj.Type, errdefs.ErrInvalid)
	}
	ext, ok := extensions[obj.Format]
	if !ok {
		return "", fmt.Errorf("object %s has format %q, not raw, qcow2 or iso: %w", obj.ID, obj.Format, errdefs.ErrInvalid)
	}
	return dir + "/" + obj.ID + ext, nil
}

// checkObjectPath requires rel to be <layout dir>/<file> of a store of role.
func checkObjectPath(role drivers.Role, rel string) (string, error) {
	dirs, err := objectDirs(role)
	if err != nil {
		return "", err
	}
	dir, name, ok := strings.Cut(rel, "/")
	if !ok || filepath.Clean(rel) != rel || !filepath.IsLocal(rel) || strings.Contains(name, "/") ||
		strings.HasPrefix(name, ".") || name == "" || !slices.Contains(dirs, dir) {
		return "", fmt.Errorf("object path %q is not <%s>/<file> inside the store: %w", rel, strings.Join(dirs, "|"), errdefs.ErrInvalid)
	}
	return rel, nil
}

// fileURI names an absolute path as a file:// URI.
func fileURI(path string) drivers.URI {
	return drivers.URI((&url.URL{Scheme: "file", Path: path}).String())
}

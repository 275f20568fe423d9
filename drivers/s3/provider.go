package s3

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/stowage/stowage/datapath/s3conn"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/hostops"
)

// Name is the provider's registered name.
const Name = "s3"

// DefaultPresignExpiry is how long a presigned read URL works.
const DefaultPresignExpiry = 12 * time.Hour

// The layout under a store's prefix.
const (
	markerKey    = ".stowage-store"
	templatesDir = "templates/"
	backupsDir   = "backups"
)

// Provider is the "s3" storage provider: image stores on an S3 bucket.
type Provider struct {
	lc  *LifeCycle
	drv *Driver
}

var (
	_ drivers.Provider       = (*Provider)(nil)
	_ drivers.LifeCycle      = (*LifeCycle)(nil)
	_ drivers.Driver         = (*Driver)(nil)
	_ drivers.Importer       = (*Driver)(nil)
	_ drivers.ChunkTarget    = (*Driver)(nil)
	_ drivers.ChunkCollector = (*Driver)(nil)
)

// Option configures a Provider.
type Option func(*Driver)

// WithPresignExpiry sets how long presigned read URLs work (default
// DefaultPresignExpiry; at most 7 days).
func WithPresignExpiry(d time.Duration) Option { return func(dr *Driver) { dr.expiry = d } }

// WithFetchClient sets the HTTP client Import downloads templates with
// (one whose dialer refuses addresses a template URL may not reach, see
// datapath/netguard); default http.DefaultClient.
func WithFetchClient(c *http.Client) Option { return func(dr *Driver) { dr.fetch = c } }

// WithPeerClient sets the HTTP client Import reads URLs Stowage made with
// (ImportSource.Internal: an agent's staging export, which answers the
// controller's certificate); default http.DefaultClient.
func WithPeerClient(c *http.Client) Option { return func(dr *Driver) { dr.peer = c } }

// New returns the provider. hosts gives the Up hosts of a store's scope
// (Attach): an S3 store needs no host work, its objects are reached by
// presigned URLs.
func New(hosts hostops.Selector, opts ...Option) *Provider {
	d := &Driver{hosts: hosts, expiry: DefaultPresignExpiry, stores: map[string]*Store{}}
	for _, o := range opts {
		o(d)
	}
	return &Provider{lc: &LifeCycle{d: d}, drv: d}
}

// Name returns "s3".
func (p *Provider) Name() string { return Name }

// Roles returns image: templates, ISOs and snapshot backups.
func (p *Provider) Roles() []drivers.Role { return []drivers.Role{drivers.RoleImage} }

// LifeCycle returns the provider's *LifeCycle.
func (p *Provider) LifeCycle() drivers.LifeCycle { return p.lc }

// Driver returns the provider's *Driver.
func (p *Provider) Driver() drivers.Driver { return p.drv }

// store returns the open Store of info (opened once per store id and
// settings; the credentials are read from their file or environment then).
func (d *Driver) store(ctx context.Context, info drivers.StoreInfo) (*Store, error) {
	cfg, err := LoadConfig(info.URL, info.Details)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	st, ok := d.stores[info.ID]
	d.mu.Unlock()
	if ok && st.cfg == cfg {
		return st, nil
	}
	st, err = Open(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("s3 store %s: %w", info.Name, err)
	}
	d.mu.Lock()
	d.stores[info.ID] = st
	d.mu.Unlock()
	return st, nil
}

// backupConfig is the chunk store of a store's backups.
func backupConfig(cfg s3conn.Config) s3conn.Config {
	cfg.Prefix = cfg.Key(backupsDir)
	return cfg
}

// ext is the file extension of a format.
func ext(f drivers.Format) (string, error) {
	switch f {
	case drivers.FormatRaw, drivers.FormatQCOW2, drivers.FormatISO:
		return "." + string(f), nil
	}
	if f.Foreign() {
		return "", fmt.Errorf("format %s: an S3 image store holds raw, qcow2 or iso; register a vhd, vhdx or vmdk template on a filesystem image store (its structure is validated by qemu-img on the stored file): %w", f, errdefs.ErrInvalid)
	}
	return "", fmt.Errorf("format %q: want raw, qcow2 or iso: %w", f, errdefs.ErrInvalid)
}

// Driver keeps templates, ISOs and backups as objects of a bucket.
type Driver struct {
	hosts  hostops.Selector
	expiry time.Duration
	fetch  *http.Client
	peer   *http.Client

	mu     sync.Mutex
	stores map[string]*Store // by store id
}

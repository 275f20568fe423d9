package trust

import (
	"crypto/x509"
	"fmt"
	"net/url"
	"strings"

	"github.com/stowage/stowage/errdefs"
)

// Identity is who a certificate names: the controller, or a host by id.
type Identity struct {
	// Host is the host id; empty for the controller.
	Host string
}

// Controller is the controller's identity.
var Controller = Identity{}

// HostIdentity is the identity of the host with id.
func HostIdentity(id string) Identity { return Identity{Host: id} }

const (
	trustDomain = "stowage"
	hostPrefix  = "/host/"
	ctrlPath    = "/controller"
)

// IsController says whether i is the controller.
func (i Identity) IsController() bool { return i.Host == "" }

// URI is the identity as a SPIFFE-style URI SAN.
func (i Identity) URI() *url.URL {
	if i.IsController() {
		return &url.URL{Scheme: "spiffe", Host: trustDomain, Path: ctrlPath}
	}
	return &url.URL{Scheme: "spiffe", Host: trustDomain, Path: hostPrefix + i.Host, RawPath: hostPrefix + url.PathEscape(i.Host)}
}

func (i Identity) String() string {
	if i.IsController() {
		return "controller"
	}
	return "host " + i.Host
}

// IdentityOf reads the identity a certificate names (its one
// spiffe://stowage/ URI SAN).
func IdentityOf(c *x509.Certificate) (Identity, error) {
	var found []Identity
	for _, u := range c.URIs {
		if u.Scheme != "spiffe" || u.Host != trustDomain {
			continue
		}
		switch p := u.Path; {
		case p == ctrlPath:
			found = append(found, Controller)
		case strings.HasPrefix(p, hostPrefix) && len(p) > len(hostPrefix):
			found = append(found, HostIdentity(strings.TrimPrefix(p, hostPrefix)))
		}
	}
	if len(found) != 1 {
		return Identity{}, fmt.Errorf("certificate %q names %d Stowage identities, want one: %w", c.Subject.CommonName, len(found), errdefs.ErrUnauthenticated)
	}
	return found[0], nil
}

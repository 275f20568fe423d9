package hostops

import (
	"fmt"
	"net/url"
	"strings"

	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// TemplateMount is the store id that names the host's template mount; the
// key is a template id.
const TemplateMount = "template-mount"

// Ref names an object of a store: the store's id and the object's key,
// relative to the store's root.
type Ref struct {
	Store string
	Key   string
}

// IsZero reports whether r names nothing.
func (r Ref) IsZero() bool { return r.Store == "" && r.Key == "" }

// String renders r as store:<id>/<key> for messages.
func (r Ref) String() string { return "store " + r.Store + " key " + r.Key }

// URI renders r as store://<store>/<key>, the form a copy's source takes.
func (r Ref) URI() drivers.URI {
	return drivers.URI("store://" + url.PathEscape(r.Store) + "/" + strings.TrimPrefix(r.Key, "/"))
}

// ParseRef parses a store://<store>/<key> URI; ok is false for any other
// scheme.
func ParseRef(u drivers.URI) (Ref, bool, error) {
	rest, ok := strings.CutPrefix(string(u), "store://")
	if !ok {
		return Ref{}, false, nil
	}
	id, key, ok := strings.Cut(rest, "/")
	if !ok || id == "" || key == "" {
		return Ref{}, true, fmt.Errorf("%q: want store://<store id>/<key>: %w", u, errdefs.ErrInvalid)
	}
	store, err := url.PathUnescape(id)
	if err != nil {
		return Ref{}, true, fmt.Errorf("%q: %w", u, errdefs.ErrInvalid)
	}
	return Ref{Store: store, Key: key}, true, nil
}

// WriteGrant splits the URI of a write Access a driver granted a host into
// what a copy or restore request names: an object of a store the host
// serves (dest, for store:// URIs), or else a URI the host writes into in
// place (destURI: an export of an RBD image, a LUN), all zeroes before
// when the grant says so (isZero).
func WriteGrant(acc drivers.Access) (dest Ref, destURI drivers.URI, isZero bool, err error) {
	ref, ok, err := ParseRef(acc.URI)
	switch {
	case err != nil:
		return Ref{}, "", false, err
	case ok:
		return ref, "", false, nil
	}
	return Ref{}, acc.URI, acc.Zeroed, nil
}

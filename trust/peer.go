package trust

import (
	"context"
	"net/http"
)

type peerKey struct{}

// WithPeer puts the identity of a request's client certificate (verified
// in the TLS handshake by ServerConfig) into the request's context, for
// PeerFrom.
func WithPeer(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			if id, err := IdentityOf(r.TLS.PeerCertificates[0]); err == nil {
				r = r.WithContext(context.WithValue(r.Context(), peerKey{}, id))
			}
		}
		h.ServeHTTP(w, r)
	})
}

// PeerFrom is the identity WithPeer found, if the client presented a
// certificate.
func PeerFrom(ctx context.Context) (Identity, bool) {
	id, ok := ctx.Value(peerKey{}).(Identity)
	return id, ok
}

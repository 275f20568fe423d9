package hostfs

import (
	"crypto/tls"
	"net/http"
	"time"

	"github.com/stowage/stowage/datapath/stream"
)

// WithTLS sets the client TLS of this host's HTTPS reads: peer (copies
// from other agents' exports: the controller's CA and this host's
// certificate) and web (template downloads from operator URLs: the
// system's roots plus the controller's CA, no certificate).
func WithTLS(peer, web *tls.Config) Option {
	return func(l *Local) { l.peerTLS, l.webTLS = peer, web }
}

// WithFetchRetryWindow sets how long a template download keeps retrying a
// source that went away (connection refused, dropped, stalled, 5xx) before
// the step fails as unavailable (stream.HTTPOptions.RetryFor); 0 leaves
// the copy engine's count of retries (about 6 s).
func WithFetchRetryWindow(d time.Duration) Option {
	return func(l *Local) { l.fetchRetry = d }
}

// fetchSource is the source options of a template download: through the
// fetch guard (WithFetchGuard) when there is one.
func (l *Local) fetchSource(format string) stream.SourceOptions {
	o := stream.SourceOptions{Format: format, HTTP: stream.HTTPOptions{TLS: l.webTLS, RetryFor: l.fetchRetry}}
	if l.fetchGuard != nil {
		c := l.fetchGuard.Client(nil)
		if t, ok := c.Transport.(*http.Transport); ok && l.webTLS != nil {
			t.TLSClientConfig = l.webTLS.Clone()
		}
		o.HTTP.Client = c
	}
	return o
}

// peerSource is the source options of a copy from another agent's export
// (a URL the controller granted, not operator input).
func (l *Local) peerSource(format string) stream.SourceOptions {
	return stream.SourceOptions{Format: format, HTTP: stream.HTTPOptions{TLS: l.peerTLS}}
}

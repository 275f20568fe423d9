package trust

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/stowage/stowage/errdefs"
)

// verifyChain checks that leaf chains to roots (with intermediates) for
// client and server use at now.
func verifyChain(leaf *x509.Certificate, intermediates []*x509.Certificate, roots *x509.CertPool, now time.Time) error {
	inter := x509.NewCertPool()
	for _, c := range intermediates {
		inter.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return fmt.Errorf("certificate %q: %v: %w", leaf.Subject.CommonName, err, errdefs.ErrUnauthenticated)
	}
	return nil
}

// VerifyPeer checks a peer's chain (leaf first, as in
// tls.ConnectionState.PeerCertificates) against roots and returns the
// identity it names; want, when non-nil, must accept that identity.
func VerifyPeer(certs []*x509.Certificate, roots *x509.CertPool, want func(Identity) error) (Identity, error) {
	if len(certs) == 0 {
		return Identity{}, fmt.Errorf("no client certificate: %w", errdefs.ErrUnauthenticated)
	}
	if err := verifyChain(certs[0], certs[1:], roots, time.Now()); err != nil {
		return Identity{}, err
	}
	id, err := IdentityOf(certs[0])
	if err != nil {
		return Identity{}, err
	}
	if want != nil {
		if err := want(id); err != nil {
			return id, err
		}
	}
	return id, nil
}

// Is accepts exactly the identity id.
func Is(id Identity) func(Identity) error {
	return func(got Identity) error {
		if got != id {
			return fmt.Errorf("peer is %s, want %s: %w", got, id, errdefs.ErrPermissionDenied)
		}
		return nil
	}
}

// AnyHost accepts any host identity (not the controller).
func AnyHost(got Identity) error {
	if got.IsController() {
		return fmt.Errorf("peer is the controller, want a host: %w", errdefs.ErrPermissionDenied)
	}
	return nil
}

// ServerConfig is a TLS server presenting kp. With ClientAuth
// tls.RequireAnyClientCert, peers must present a certificate that chains to
// roots and whose identity want accepts (nil: any); with
// tls.VerifyClientCertIfGiven a certificate is checked when one is given
// (callers without one authenticate otherwise, e.g. API tokens).
func ServerConfig(kp *KeyPair, roots *x509.CertPool, auth tls.ClientAuthType, want func(Identity) error) *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: kp.GetCertificate,
		ClientAuth:     auth,
		ClientCAs:      roots,
		NextProtos:     []string{"h2", "http/1.1"},
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				if auth == tls.RequireAnyClientCert || auth == tls.RequireAndVerifyClientCert {
					return fmt.Errorf("no client certificate: %w", errdefs.ErrUnauthenticated)
				}
				return nil
			}
			_, err := VerifyPeer(cs.PeerCertificates, roots, want)
			return err
		},
	}
}

// ClientConfig is a TLS client presenting kp (nil: no certificate) that
// accepts a server whose chain verifies against roots and whose identity
// want accepts. Server names are not checked: identity is.
func ClientConfig(kp *KeyPair, roots *x509.CertPool, want func(Identity) error) *tls.Config {
	c := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// The chain and identity are verified in VerifyConnection below,
		// which runs on every handshake, resumed or not.
		InsecureSkipVerify: true, //nolint:gosec // verified by identity
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := VerifyPeer(cs.PeerCertificates, roots, want)
			return err
		},
	}
	if kp != nil {
		c.GetClientCertificate = kp.GetClientCertificate
	}
	return c
}

// PinnedClientConfig is a TLS client for a first contact: it trusts the
// server's chain only if the chain's root has the public-key pin (see
// PinOf) and the leaf names the controller. caOut receives that root.
func PinnedClientConfig(pin string, caOut **x509.Certificate) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		InsecureSkipVerify: true, //nolint:gosec // verified by the pin
		VerifyConnection: func(cs tls.ConnectionState) error {
			for _, c := range cs.PeerCertificates {
				if !c.IsCA || PinOf(c) != pin {
					continue
				}
				if _, err := VerifyPeer(cs.PeerCertificates, Pool(c), Is(Controller)); err != nil {
					return err
				}
				if caOut != nil {
					*caOut = c
				}
				return nil
			}
			return fmt.Errorf("the controller's certificate chain has no CA with pin %s: %w", pin, errdefs.ErrUnauthenticated)
		},
	}
}

// PeerError says whether err (from a TLS handshake or a call over it) is a
// failed identity or chain check.
func PeerError(err error) bool {
	return errors.Is(err, errdefs.ErrUnauthenticated) || errors.Is(err, errdefs.ErrPermissionDenied)
}

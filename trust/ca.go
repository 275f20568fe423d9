package trust

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/errdefs"
)

// CA is the controller's certificate authority.
type CA struct {
	cert *x509.Certificate
	key  crypto.Signer
	pem  []byte
}

// CA file names in the directory given to LoadOrCreateCA.
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// caValidity is how long a CA made by LoadOrCreateCA is valid.
const caValidity = 10 * 365 * 24 * time.Hour

// LoadOrCreateCA loads dir/ca.crt and dir/ca.key (an operator-supplied CA,
// or the one made on a first start), or makes a new CA there when neither
// exists. The key file is written 0600 in a 0700 directory.
func LoadOrCreateCA(dir string) (*CA, error) {
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	certPEM, cerr := os.ReadFile(certPath)
	keyPEM, kerr := os.ReadFile(keyPath)
	switch {
	case cerr == nil && kerr == nil:
		return ParseCA(certPEM, keyPEM)
	case errors.Is(cerr, fs.ErrNotExist) && errors.Is(kerr, fs.ErrNotExist):
	case cerr != nil && !errors.Is(cerr, fs.ErrNotExist):
		return nil, fmt.Errorf("trust: read %s: %w", certPath, cerr)
	case kerr != nil && !errors.Is(kerr, fs.ErrNotExist):
		return nil, fmt.Errorf("trust: read %s: %w", keyPath, kerr)
	default:
		return nil, fmt.Errorf("trust: %s and %s must both exist or both be absent: %w", certPath, keyPath, errdefs.ErrFailedPrecondition)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("trust: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("trust: CA key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "Stowage CA", Organization: []string{"stowage"}},
		NotBefore:             now.Add(-5 * time.Minute),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("trust: CA certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("trust: CA key: %w", err)
	}
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	// The key first: a crash between the two leaves a key without a
	// certificate, which the next start refuses rather than silently
	// making a second CA that enrolled hosts would not trust.
	if err := durable.PublishNew(keyPath, keyPEM, 0o600); err != nil {
		return nil, fmt.Errorf("trust: write CA key: %w", err)
	}
	if err := durable.PublishNew(certPath, certPEM, 0o644); err != nil {
		return nil, fmt.Errorf("trust: write CA certificate: %w", err)
	}
	return ParseCA(certPEM, keyPEM)
}

// ParseCA parses a CA certificate and its private key (PEM).
func ParseCA(certPEM, keyPEM []byte) (*CA, error) {
	cert, err := ParseCertificate(certPEM)
	if err != nil {
		return nil, err
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("trust: %q is not a CA certificate: %w", cert.Subject.CommonName, errdefs.ErrInvalid)
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, err
	}
	if !publicKeysEqual(cert.PublicKey, key.Public()) {
		return nil, fmt.Errorf("trust: the CA key does not match the CA certificate: %w", errdefs.ErrInvalid)
	}
	return &CA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})}, nil
}

// Certificate is the CA's certificate.
func (ca *CA) Certificate() *x509.Certificate { return ca.cert }

// PEM is the CA's certificate, PEM-encoded.
func (ca *CA) PEM() []byte { return append([]byte(nil), ca.pem...) }

// Pool is a pool holding the CA's certificate alone.
func (ca *CA) Pool() *x509.CertPool { return Pool(ca.cert) }

// Pin is the CA's public-key pin: sha256:<hex> of its SubjectPublicKeyInfo.
func (ca *CA) Pin() string { return PinOf(ca.cert) }

// PinOf is the public-key pin of c.
func PinOf(c *x509.Certificate) string {
	sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// Request is what a certificate is issued for.
type Request struct {
	Identity Identity
	// PublicKey is the holder's key (from a CSR, or a key the caller made).
	PublicKey crypto.PublicKey
	// DNSNames and IPs are the addresses the holder serves under.
	DNSNames []string
	IPs      []net.IP
	// TTL is the validity (DefaultTTL when zero).
	TTL time.Duration
}

// backdate is how far before its issue a certificate is valid, for hosts
// whose clocks run a little behind.
const backdate = 5 * time.Minute

// DefaultTTL is the validity of issued certificates: 30 days, renewed at
// two thirds of it.
const DefaultTTL = 30 * 24 * time.Hour

// Issue signs a client-and-server certificate for r (DER).
func (ca *CA) Issue(r Request) ([]byte, error) {
	if r.PublicKey == nil {
		return nil, fmt.Errorf("trust: issue for %s: no public key: %w", r.Identity, errdefs.ErrInvalid)
	}
	ttl := r.TTL
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	now := time.Now()
	notAfter := now.Add(ttl)
	if notAfter.After(ca.cert.NotAfter) {
		notAfter = ca.cert.NotAfter
	}
	cn := "stowage-controller"
	if !r.Identity.IsController() {
		cn = "stowage-host:" + r.Identity.Host
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"stowage"}},
		NotBefore:    now.Add(-backdate),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         append([]*url.URL(nil), r.Identity.URI()),
		DNSNames:     r.DNSNames,
		IPAddresses:  r.IPs,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, r.PublicKey, ca.key)
	if err != nil {
		return nil, fmt.Errorf("trust: issue for %s: %w", r.Identity, err)
	}
	return der, nil
}

// IssueCSR checks a PEM or DER certificate signing request's signature and
// issues a certificate for its key as r (r.PublicKey is ignored): the
// identity and addresses come from the caller's decision, never the CSR.
func (ca *CA) IssueCSR(csrDER []byte, r Request) ([]byte, error) {
	if b, _ := pem.Decode(csrDER); b != nil {
		csrDER = b.Bytes
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, fmt.Errorf("trust: certificate request: %v: %w", err, errdefs.ErrInvalid)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("trust: certificate request signature: %v: %w", err, errdefs.ErrInvalid)
	}
	r.PublicKey = csr.PublicKey
	return ca.Issue(r)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

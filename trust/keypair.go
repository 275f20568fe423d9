package trust

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/errdefs"
)

// NewKey makes a private key for a certificate (ECDSA P-256).
func NewKey() (crypto.Signer, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("trust: key: %w", err)
	}
	return k, nil
}

// NewCSR is a certificate signing request for key (DER). Its subject is
// informational: the CA decides the identity.
func NewCSR(key crypto.Signer, id Identity) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: id.String()},
	}, key)
	if err != nil {
		return nil, fmt.Errorf("trust: certificate request: %w", err)
	}
	return der, nil
}

// ParseCertificate parses the first certificate of PEM (or DER) data.
func ParseCertificate(data []byte) (*x509.Certificate, error) {
	if b, _ := pem.Decode(data); b != nil {
		data = b.Bytes
	}
	c, err := x509.ParseCertificate(data)
	if err != nil {
		return nil, fmt.Errorf("trust: certificate: %v: %w", err, errdefs.ErrInvalid)
	}
	return c, nil
}

func parseKey(data []byte) (crypto.Signer, error) {
	b, _ := pem.Decode(data)
	if b == nil {
		return nil, fmt.Errorf("trust: private key: no PEM block: %w", errdefs.ErrInvalid)
	}
	var k any
	var err error
	switch b.Type {
	case "EC PRIVATE KEY":
		k, err = x509.ParseECPrivateKey(b.Bytes)
	case "RSA PRIVATE KEY":
		k, err = x509.ParsePKCS1PrivateKey(b.Bytes)
	default:
		k, err = x509.ParsePKCS8PrivateKey(b.Bytes)
	}
	if err != nil {
		return nil, fmt.Errorf("trust: private key: %v: %w", err, errdefs.ErrInvalid)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("trust: private key of type %T cannot sign: %w", k, errdefs.ErrInvalid)
	}
	return s, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	switch k := a.(type) {
	case *ecdsa.PublicKey, *rsa.PublicKey, ed25519.PublicKey:
		return k.(equaler).Equal(b)
	}
	return false
}

// KeyPair is a certificate and its key that can be swapped while TLS
// configurations use it (its callbacks read the current pair on every
// handshake). It is safe for concurrent use.
type KeyPair struct {
	mu    sync.RWMutex
	cert  *tls.Certificate
	leaf  *x509.Certificate
	onSet []func(*x509.Certificate)

	// Set by Follow: the directory another process renews the pair in.
	follow  string
	checked time.Time
	mtime   time.Time
}

// NewKeyPair holds key and its certificate chain (DER: leaf first).
func NewKeyPair(key crypto.Signer, chain ...[]byte) (*KeyPair, error) {
	kp := &KeyPair{}
	if err := kp.Set(key, chain...); err != nil {
		return nil, err
	}
	return kp, nil
}

// Set replaces the pair; handshakes from now on present it.
func (kp *KeyPair) Set(key crypto.Signer, chain ...[]byte) error {
	if len(chain) == 0 {
		return fmt.Errorf("trust: key pair without a certificate: %w", errdefs.ErrInvalid)
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return fmt.Errorf("trust: certificate: %v: %w", err, errdefs.ErrInvalid)
	}
	if !publicKeysEqual(leaf.PublicKey, key.Public()) {
		return fmt.Errorf("trust: the key does not match the certificate: %w", errdefs.ErrInvalid)
	}
	c := &tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}
	kp.mu.Lock()
	kp.cert, kp.leaf = c, leaf
	hooks := kp.onSet
	kp.mu.Unlock()
	for _, h := range hooks {
		h(leaf)
	}
	return nil
}

// Leaf is the current certificate.
func (kp *KeyPair) Leaf() *x509.Certificate {
	kp.mu.RLock()
	defer kp.mu.RUnlock()
	return kp.leaf
}

// TLSCertificate is the current pair for a tls.Config.
func (kp *KeyPair) TLSCertificate() *tls.Certificate {
	kp.reload()
	kp.mu.RLock()
	defer kp.mu.RUnlock()
	return kp.cert
}

// followEvery is how often a followed pair's files are looked at.
const followEvery = 30 * time.Second

// Follow loads the pair stored in dir by another process (the agent, for
// the host's template mount process) and picks up that process's renewals:
// the files are looked at again, at most every 30 s, when a handshake
// needs the pair.
func Follow(dir string) (*KeyPair, *x509.Certificate, error) {
	kp, ca, err := LoadKeyPair(dir)
	if err != nil {
		return nil, nil, err
	}
	kp.follow, kp.checked = dir, time.Now()
	if fi, err := os.Stat(filepath.Join(dir, CertFile)); err == nil {
		kp.mtime = fi.ModTime()
	}
	return kp, ca, nil
}

func (kp *KeyPair) reload() {
	if kp.follow == "" {
		return
	}
	kp.mu.Lock()
	if time.Since(kp.checked) < followEvery {
		kp.mu.Unlock()
		return
	}
	kp.checked = time.Now()
	kp.mu.Unlock()
	fi, err := os.Stat(filepath.Join(kp.follow, CertFile))
	if err != nil || fi.ModTime().Equal(kp.mtime) {
		return
	}
	next, _, err := LoadKeyPair(kp.follow)
	if err != nil {
		return // mid-rename or broken: keep the pair that worked
	}
	c := next.TLSCertificate()
	kp.mu.Lock()
	kp.cert, kp.leaf, kp.mtime = c, c.Leaf, fi.ModTime()
	kp.mu.Unlock()
}

// GetCertificate is for tls.Config.GetCertificate.
func (kp *KeyPair) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return kp.TLSCertificate(), nil
}

// GetClientCertificate is for tls.Config.GetClientCertificate.
func (kp *KeyPair) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return kp.TLSCertificate(), nil
}

// RenewAt is when the current certificate should be renewed: at two thirds
// of its life from its issue (NotBefore is backdated for clock skew).
func (kp *KeyPair) RenewAt() time.Time {
	l := kp.Leaf()
	issued := l.NotBefore.Add(backdate)
	if issued.After(l.NotAfter) {
		issued = l.NotBefore
	}
	return issued.Add(l.NotAfter.Sub(issued) * 2 / 3)
}

// Files a stored key pair lives in, beside the CA certificate that issued it.
const (
	KeyFile  = "host.key"
	CertFile = "host.crt"
)

// Store writes the pair and the CA certificate to dir (key 0600, each file
// replaced atomically and durably).
func (kp *KeyPair) Store(dir string, caPEM []byte) error {
	c := kp.TLSCertificate()
	keyDER, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		return fmt.Errorf("trust: store key: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("trust: %w", err)
	}
	var chain bytes.Buffer
	for _, der := range c.Certificate {
		_ = pem.Encode(&chain, &pem.Block{Type: "CERTIFICATE", Bytes: der})
	}
	// The CA first, then the key and its certificate: a crash in between
	// leaves an old pair that still verifies, or a new key without its
	// certificate, which LoadKeyPair refuses (the agent then joins again).
	for _, f := range []struct {
		name string
		data []byte
		perm fs.FileMode
	}{
		{CACertFile, caPEM, 0o644},
		{KeyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600},
		{CertFile, chain.Bytes(), 0o644},
	} {
		if err := durable.WriteFile(filepath.Join(dir, f.name), f.data, f.perm); err != nil {
			return fmt.Errorf("trust: store %s: %w", f.name, err)
		}
	}
	return nil
}

// ErrNoKeyPair is returned by LoadKeyPair when dir holds no pair yet.
var ErrNoKeyPair = errors.New("trust: no stored key pair")

// LoadKeyPair reads a pair and its CA stored by Store. A pair whose
// certificate does not chain to the stored CA, or has expired, is an error.
func LoadKeyPair(dir string) (*KeyPair, *x509.Certificate, error) {
	keyPEM, err := os.ReadFile(filepath.Join(dir, KeyFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, ErrNoKeyPair
	}
	if err != nil {
		return nil, nil, fmt.Errorf("trust: %w", err)
	}
	certPEM, err := os.ReadFile(filepath.Join(dir, CertFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, ErrNoKeyPair
	}
	if err != nil {
		return nil, nil, fmt.Errorf("trust: %w", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, nil, fmt.Errorf("trust: %w", err)
	}
	ca, err := ParseCertificate(caPEM)
	if err != nil {
		return nil, nil, err
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, nil, err
	}
	var chain [][]byte
	for rest := certPEM; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		chain = append(chain, b.Bytes)
	}
	kp, err := NewKeyPair(key, chain...)
	if err != nil {
		return nil, nil, err
	}
	if err := verifyChain(kp.Leaf(), nil, Pool(ca), time.Now()); err != nil {
		return nil, nil, fmt.Errorf("trust: stored certificate in %s: %w", dir, err)
	}
	return kp, ca, nil
}

// Pool is a pool of exactly certs (peers: the controller's CA alone).
func Pool(certs ...*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

// WebPool is the system's pool plus certs: for clients that reach public
// HTTPS servers and Stowage's own.
func WebPool(certs ...*x509.Certificate) *x509.CertPool {
	p, err := x509.SystemCertPool()
	if err != nil || p == nil {
		p = x509.NewCertPool()
	}
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

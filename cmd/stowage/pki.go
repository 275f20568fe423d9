package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/trust"
)

// controllerTrust is the controller's side of trust: its CA (in
// DATA/pki), its own rotating certificate, and the clients that call
// agents, each checking that the agent's certificate names its host.
type controllerTrust struct {
	ca      *trust.CA
	kp      *trust.KeyPair
	req     trust.Request
	clients sync.Map // host id -> *http.Client
}

// pkiDir is where the controller keeps its CA.
func pkiDir(dataDir string) string { return filepath.Join(dataDir, "pki") }

// newControllerTrust loads or makes the CA and issues the controller's
// certificate for the names it serves under: localhost, this host's name
// and loopback addresses, the --listen host, and every --tls-san.
func newControllerTrust(dataDir, listen string, sans []string, ttl time.Duration) (*controllerTrust, error) {
	ca, err := trust.LoadOrCreateCA(pkiDir(dataDir))
	if err != nil {
		return nil, err
	}
	req := trust.Request{Identity: trust.Controller, TTL: ttl, DNSNames: []string{"localhost"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}}
	if h, err := os.Hostname(); err == nil && h != "" {
		req.DNSNames = append(req.DNSNames, h)
	}
	names := append([]string(nil), sans...)
	if host, _, err := net.SplitHostPort(listen); err == nil && host != "" {
		names = append(names, host)
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			if !ip.IsUnspecified() {
				req.IPs = append(req.IPs, ip)
			}
		} else if n != "" {
			req.DNSNames = append(req.DNSNames, n)
		}
	}
	kp, err := trust.NewIssued(ca, req)
	if err != nil {
		return nil, err
	}
	return &controllerTrust{ca: ca, kp: kp, req: req}, nil
}

// serverTLS is the API port's TLS: the controller's certificate; a client
// certificate is checked when given (agents), API callers without one
// authenticate with tokens.
func (t *controllerTrust) serverTLS() *tls.Config {
	return trust.ServerConfig(t.kp, t.ca.Pool(), tls.VerifyClientCertIfGiven, nil)
}

// agentClient is the client of calls to the agent of hostID: it presents
// the controller's certificate and accepts only one naming hostID.
func (t *controllerTrust) agentClient(hostID string) *http.Client {
	if c, ok := t.clients.Load(hostID); ok {
		return c.(*http.Client)
	}
	c := &http.Client{Timeout: 10 * time.Minute, Transport: &http.Transport{
		TLSClientConfig:   trust.ClientConfig(t.kp, t.ca.Pool(), trust.Is(trust.HostIdentity(hostID))),
		ForceAttemptHTTP2: true,
		IdleConnTimeout:   90 * time.Second,
	}}
	got, _ := t.clients.LoadOrStore(hostID, c)
	return got.(*http.Client)
}

// peerClient reads agents' HTTPS exports (S3 imports from a staging
// export): the CA's roots, verified by address, with the controller's
// certificate.
func (t *controllerTrust) peerClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: t.ca.Pool(), GetClientCertificate: t.kp.GetClientCertificate},
		ForceAttemptHTTP2: true,
	}}
}

// renew keeps the controller's certificate valid while ctx lives.
func (t *controllerTrust) renew(ctx context.Context, log *slog.Logger) {
	trust.Renew(ctx, t.kp, trust.Controller, "", trust.SelfRenew(t.ca, t.req), 10*time.Second, log)
}

// issueHost issues and stores a certificate from ca for an agent of this
// process (stowage dev) in stateDir, unless one for hostID from ca is
// stored already.
func issueHost(ca *trust.CA, ttl time.Duration, stateDir, hostID string, addresses []string) error {
	dir := filepath.Join(stateDir, "pki")
	if kp, stored, err := trust.LoadKeyPair(dir); err == nil && trust.PinOf(stored) == ca.Pin() {
		if id, err := trust.IdentityOf(kp.Leaf()); err == nil && id == trust.HostIdentity(hostID) {
			return nil
		}
	}
	req := trust.Request{Identity: trust.HostIdentity(hostID), TTL: ttl}
	for _, a := range addresses {
		if ip := net.ParseIP(a); ip != nil {
			req.IPs = append(req.IPs, ip)
		} else {
			req.DNSNames = append(req.DNSNames, a)
		}
	}
	kp, err := trust.NewIssued(ca, req)
	if err != nil {
		return err
	}
	if err := kp.Store(dir, ca.PEM()); err != nil {
		return fmt.Errorf("dev: store the agent's certificate: %w", err)
	}
	return nil
}

// adminTokenFile is where the controller's first start writes its
// bootstrap admin token (apiauth.Tokens.Bootstrap), beneath its data dir.
const adminTokenFile = "admin.token"

// writeAdminConfig writes DATA/admin.json (0600): the client configuration
// of the bootstrap admin (server, CA, token), so that
// `STOWAGE_CONFIG=DATA/admin.json stowage …` works on the controller's
// host. Without a token file (removed by the operator) it writes none.
func writeAdminConfig(dataDir, server string, caPEM []byte) error {
	tok, err := os.ReadFile(filepath.Join(dataDir, adminTokenFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("admin token: %w", err)
	}
	return writeClientConfig(filepath.Join(dataDir, "admin.json"), clientConfig{Server: server, CAPEM: string(caPEM), Token: strings.TrimSpace(string(tok))})
}

// advertised is the host:port a listen address is reached at on this
// host (an unspecified host: loopback).
func advertised(listen string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return listen
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

// chapKey is the key iSCSI stores' CHAP secrets are derived from
// (DATA/pki/chap.key, 32 random bytes made on the first start, 0600).
func chapKey(dataDir string) ([]byte, error) {
	path := filepath.Join(pkiDir(dataDir), "chap.key")
	key, err := os.ReadFile(path)
	if err == nil && len(key) == 32 {
		return key, nil
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("CHAP key: %w", err)
	}
	if err == nil {
		return nil, fmt.Errorf("CHAP key %s: %d bytes, want 32: %w", path, len(key), errdefs.ErrFailedPrecondition)
	}
	key = make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	if err := durable.PublishNew(path, key, 0o600); err != nil {
		return nil, fmt.Errorf("CHAP key: %w", err)
	}
	return key, nil
}

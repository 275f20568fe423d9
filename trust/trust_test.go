package trust

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stowage/stowage/errdefs"
)

func newCA(t *testing.T) *CA {
	t.Helper()
	ca, err := LoadOrCreateCA(filepath.Join(t.TempDir(), "pki"))
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func issued(t *testing.T, ca *CA, id Identity, ttl time.Duration) *KeyPair {
	t.Helper()
	kp, err := NewIssued(ca, Request{Identity: id, IPs: []net.IP{net.ParseIP("127.0.0.1")}, TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

// serve accepts TLS connections on loopback with cfg and answers each with
// the identity of its client ("-" without a certificate).
func serve(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := c.(*tls.Conn)
				if err := tc.Handshake(); err != nil {
					return
				}
				who := "-"
				if pc := tc.ConnectionState().PeerCertificates; len(pc) > 0 {
					id, _ := IdentityOf(pc[0])
					who = id.String()
				}
				_, _ = io.WriteString(c, who)
			}()
		}
	}()
	return ln.Addr().String()
}

func dial(addr string, cfg *tls.Config) (string, *x509.Certificate, error) {
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		return "", nil, err
	}
	defer c.Close()
	b, err := io.ReadAll(c)
	if err != nil {
		return "", nil, err
	}
	return string(b), c.ConnectionState().PeerCertificates[0], nil
}

func TestCAPersistsAndRefusesHalfState(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	a, err := LoadOrCreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	b, err := LoadOrCreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if a.Pin() != b.Pin() {
		t.Fatalf("a second start made a new CA: %s != %s", a.Pin(), b.Pin())
	}
	fi, err := os.Stat(filepath.Join(dir, CAKeyFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("CA key mode %v, %v", fi.Mode(), err)
	}
	if err := os.Remove(filepath.Join(dir, CACertFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreateCA(dir); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("a key without its certificate: %v, want failed precondition", err)
	}
}

func TestMutualTLSByIdentity(t *testing.T) {
	ca := newCA(t)
	other := newCA(t)
	ctrl := issued(t, ca, Controller, 0)
	h1 := issued(t, ca, HostIdentity("h1"), 0)
	h2 := issued(t, ca, HostIdentity("h2"), 0)
	forged := issued(t, other, Controller, 0)

	// An agent's server: only the controller may call.
	agent := serve(t, ServerConfig(h1, ca.Pool(), tls.RequireAnyClientCert, Is(Controller)))
	who, peer, err := dial(agent, ClientConfig(ctrl, ca.Pool(), Is(HostIdentity("h1"))))
	if err != nil || who != "controller" {
		t.Fatalf("controller -> h1: %q %v", who, err)
	}
	if id, _ := IdentityOf(peer); id != HostIdentity("h1") {
		t.Fatalf("server identity %v", id)
	}
	for name, cfg := range map[string]*tls.Config{
		"no certificate":      ClientConfig(nil, ca.Pool(), nil),
		"another host":        ClientConfig(h2, ca.Pool(), nil),
		"another CA's cert":   ClientConfig(forged, ca.Pool(), nil),
		"wrong host expected": ClientConfig(ctrl, ca.Pool(), Is(HostIdentity("h2"))),
		"other CA roots":      ClientConfig(ctrl, other.Pool(), nil),
	} {
		if who, _, err := dial(agent, cfg); err == nil && who != "" {
			t.Errorf("%s: accepted as %q", name, who)
		}
	}

	// The controller's server: a certificate when given, else none.
	api := serve(t, ServerConfig(ctrl, ca.Pool(), tls.VerifyClientCertIfGiven, nil))
	if who, _, err := dial(api, ClientConfig(nil, ca.Pool(), Is(Controller))); err != nil || who != "-" {
		t.Fatalf("token caller: %q %v", who, err)
	}
	if who, _, err := dial(api, ClientConfig(h2, ca.Pool(), Is(Controller))); err != nil || who != "host h2" {
		t.Fatalf("h2 -> controller: %q %v", who, err)
	}
	if who, _, err := dial(api, ClientConfig(forged, ca.Pool(), Is(Controller))); err == nil && who != "" {
		t.Fatalf("a certificate of another CA was accepted as %q", who)
	}

	// First contact by pin: the right pin learns the CA, a wrong one fails.
	var learnt *x509.Certificate
	if _, _, err := dial(api, PinnedClientConfig(ca.Pin(), &learnt)); err != nil || learnt == nil || PinOf(learnt) != ca.Pin() {
		t.Fatalf("pinned: %v", err)
	}
	if _, _, err := dial(api, PinnedClientConfig(other.Pin(), nil)); err == nil {
		t.Fatal("a wrong pin was accepted")
	}
}

func TestRenewSwapsWithoutRestart(t *testing.T) {
	ca := newCA(t)
	ctrl := issued(t, ca, Controller, 0)
	dir := t.TempDir()
	h := issued(t, ca, HostIdentity("h1"), 3*time.Second)
	if err := h.Store(dir, ca.PEM()); err != nil {
		t.Fatal(err)
	}
	addr := serve(t, ServerConfig(h, ca.Pool(), tls.RequireAnyClientCert, Is(Controller)))
	_, first, err := dial(addr, ClientConfig(ctrl, ca.Pool(), nil))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go Renew(ctx, h, HostIdentity("h1"), dir, SelfRenew(ca, Request{Identity: HostIdentity("h1"), TTL: time.Hour}), 100*time.Millisecond, slog.New(slog.DiscardHandler))
	deadline := time.Now().Add(10 * time.Second)
	for h.Leaf().SerialNumber.Cmp(first.SerialNumber) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("not renewed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	_, second, err := dial(addr, ClientConfig(ctrl, ca.Pool(), nil))
	if err != nil {
		t.Fatal(err)
	}
	if second.SerialNumber.Cmp(first.SerialNumber) == 0 || !second.NotAfter.After(first.NotAfter) {
		t.Fatalf("the running server still presents the old certificate")
	}
	stored, caCert, err := LoadKeyPair(dir)
	if err != nil {
		t.Fatal(err)
	}
	if stored.Leaf().SerialNumber.Cmp(second.SerialNumber) != 0 || PinOf(caCert) != ca.Pin() {
		t.Fatal("the renewed pair was not stored")
	}
	if fi, _ := os.Stat(filepath.Join(dir, KeyFile)); fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v", fi.Mode())
	}
}

func TestIssueCSRTakesIdentityFromCaller(t *testing.T) {
	ca := newCA(t)
	key, _ := NewKey()
	csr, err := NewCSR(key, Controller) // asks to be the controller
	if err != nil {
		t.Fatal(err)
	}
	der, err := ca.IssueCSR(csr, Request{Identity: HostIdentity("h9")})
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	if id, err := IdentityOf(c); err != nil || id != HostIdentity("h9") {
		t.Fatalf("identity %v %v", id, err)
	}
	if _, err := ca.IssueCSR([]byte("junk"), Request{Identity: HostIdentity("h9")}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("junk CSR: %v", err)
	}
}

func TestJoinToken(t *testing.T) {
	tok, err := NewJoinToken()
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseJoinToken(tok.String())
	if err != nil || got != tok || !got.Matches(tok.Hash()) {
		t.Fatalf("round trip: %v", err)
	}
	bad := tok
	bad.Secret = tok.Secret[:63] + "0"
	if bad.Secret == tok.Secret {
		bad.Secret = tok.Secret[:63] + "1"
	}
	if bad.Matches(tok.Hash()) {
		t.Fatal("a wrong secret matched")
	}
	for _, s := range []string{"", "stj_", "stw_" + tok.ID + "." + tok.Secret, "stj_" + tok.ID, "stj_zz" + tok.ID[2:] + "." + tok.Secret} {
		if _, err := ParseJoinToken(s); !errors.Is(err, errdefs.ErrUnauthenticated) {
			t.Errorf("%q: %v", s, err)
		}
	}
}

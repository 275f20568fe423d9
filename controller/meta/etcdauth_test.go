package meta

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/stowage/stowage/errdefs"
)

// writeCert issues a certificate (signed by parent, or self-signed when
// parent is nil) and writes it and its key as PEM files under dir.
func writeCert(t *testing.T, dir, name string, tmpl *x509.Certificate, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl.SerialNumber = big.NewInt(time.Now().UnixNano())
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+".crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+".key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return cert, key
}

// TestEtcdTLSAndAuth: the backend reaches a cluster that requires client
// certificates and has auth enabled, with the options etcd's own clients
// take. A wrong password or a missing certificate is a clear error that
// does not echo the secret, and nothing is written.
func TestEtcdTLSAndAuth(t *testing.T) {
	if !onEtcd() {
		t.Skip("etcd pass only")
	}
	dir := t.TempDir()
	ca, caKey := writeCert(t, dir, "ca", &x509.Certificate{Subject: pkix.Name{CommonName: "test etcd CA"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}, nil, nil)
	writeCert(t, dir, "server", &x509.Certificate{Subject: pkix.Name{CommonName: "etcd"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}, ca, caKey)
	writeCert(t, dir, "client", &x509.Certificate{Subject: pkix.Name{CommonName: "stowage"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, ca, caKey)

	cfg, client, err := embedConfig(filepath.Join(dir, "data"), "https")
	if err != nil {
		t.Fatal(err)
	}
	cfg.ClientTLSInfo.CertFile = filepath.Join(dir, "server.crt")
	cfg.ClientTLSInfo.KeyFile = filepath.Join(dir, "server.key")
	cfg.ClientTLSInfo.TrustedCAFile = filepath.Join(dir, "ca.crt")
	cfg.ClientTLSInfo.ClientCertAuth = true
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		t.Fatal("etcd not ready")
	}

	good := EtcdOptions{CACert: filepath.Join(dir, "ca.crt"), Cert: filepath.Join(dir, "client.crt"), Key: filepath.Join(dir, "client.key"), DialTimeout: 3 * time.Second}
	tc, err := etcdTLS(good)
	if err != nil {
		t.Fatal(err)
	}
	// Auth on: a root user, and a stowage user with the prefix only.
	admin, err := clientv3.New(clientv3.Config{Endpoints: []string{client.String()}, TLS: tc, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, step := range []func() error{
		func() error { _, err := admin.UserAdd(ctx, "root", "rootpw"); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := admin.UserAdd(ctx, "stowage", "s3cret-pw"); return err },
		func() error { _, err := admin.RoleAdd(ctx, "stowage"); return err },
		func() error {
			_, err := admin.RoleGrantPermission(ctx, "stowage", "/cloud", clientv3.GetPrefixRangeEnd("/cloud"), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		},
		func() error { _, err := admin.UserGrantRole(ctx, "stowage", "stowage"); return err },
		func() error { _, err := admin.AuthEnable(ctx); return err },
	} {
		if err := step(); err != nil {
			t.Fatalf("etcd auth setup: %v", err)
		}
	}
	pwFile := filepath.Join(dir, "pw")
	spec := "etcd://" + client.Host + "/cloud"

	// No client certificate: refused by the server.
	if _, err := Open(spec, WithEtcd(EtcdOptions{CACert: good.CACert, DialTimeout: 2 * time.Second})); err == nil {
		t.Fatal("opened without a client certificate")
	}
	// A wrong password: unauthenticated, the password nowhere in the error.
	if err := os.WriteFile(pwFile, []byte("wrong-pw\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	bad := good
	bad.Username, bad.PasswordFile = "stowage", pwFile
	_, err = Open(spec, WithEtcd(bad))
	if !errors.Is(err, errdefs.ErrUnauthenticated) || strings.Contains(err.Error(), "wrong-pw") {
		t.Fatalf("wrong password: %v", err)
	}
	// The right one: the store opens, migrates and works.
	if err := os.WriteFile(pwFile, []byte("s3cret-pw\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	db, err := Open(spec, WithEtcd(bad))
	if err != nil {
		t.Fatalf("open with TLS and auth: %v", err)
	}
	defer db.Close()
	if _, err := db.Stores().Create(ctx, primary("s1", "p1")); err != nil {
		t.Fatal(err)
	}
	if v, err := db.SchemaVersion(ctx); err != nil || v != latestSchemaVersion() {
		t.Fatalf("schema %d %v", v, err)
	}
	// A prefix outside the user's permission: refused, nothing written.
	if _, err := Open("etcd://"+client.Host+"/other", WithEtcd(bad)); !errors.Is(err, errdefs.ErrPermissionDenied) || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("open outside the granted prefix: %v", err)
	}
	if n, err := admin.Get(ctx, "/other", clientv3.WithPrefix(), clientv3.WithCountOnly()); err == nil && n.Count != 0 {
		t.Fatalf("%d keys written under a refused prefix", n.Count)
	}
}

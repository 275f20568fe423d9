package nbdexports

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/internal/envtest"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// serve runs s on a TCP listener at addr ("127.0.0.1:0" for any port)
// until the returned stop is called, and announces that address.
func serve(t *testing.T, s *Server, addr string) (string, func()) {
	t.Helper()
	var l net.Listener
	var err error
	for range 50 { // the port of a server just stopped may linger briefly
		if l, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	s.SetAddress(l.Addr().String())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	stop := func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		s.Close()
	}
	return l.Addr().String(), stop
}

func image(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 1<<20); err != nil {
		t.Fatal(err)
	}
	return p
}

func needBin(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		envtest.Skipf(t, "%s not installed", name)
	}
}

func run(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// readHead reads the first bytes of the export at uri with our client.
func readHead(uri string, n int, cfg *tls.Config) (string, error) {
	c, err := nbd.Dial(context.Background(), uri, nbd.ClientOptions{TLS: cfg, Logger: quiet()})
	if err != nil {
		return "", err
	}
	defer c.Close()
	b := make([]byte, n)
	if _, err := c.ReadAt(b, 0); err != nil {
		return "", err
	}
	return string(b), nil
}

// TestExpiry: a past expiry is refused; an export past its expiry does not
// open, and Sweep removes it and closes the connections it had.
func TestExpiry(t *testing.T) {
	dir := t.TempDir()
	s := New(quiet())
	_, stop := serve(t, s, "127.0.0.1:0")
	defer stop()
	p := image(t, dir, "v.raw", "VOLUME")
	if _, err := s.Export(p, true, time.Now().Add(-time.Minute), exports.Owner{}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("past expiry: %v", err)
	}
	uri, err := s.Export(p, true, time.Now().Add(300*time.Millisecond), exports.Owner{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := nbd.Dial(context.Background(), uri, nbd.ClientOptions{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	time.Sleep(350 * time.Millisecond)
	if _, err := readHead(uri, 6, nil); !errdefs.IsNotFound(err) {
		t.Fatalf("open after expiry: %v", err)
	}
	b := make([]byte, 6)
	if _, err := c.ReadAt(b, 0); err != nil {
		t.Fatalf("a connection made before expiry ends at the sweep, not before: %v", err)
	}
	s.Sweep(time.Now())
	if len(s.Exported()) != 0 {
		t.Fatalf("after sweep: %v", s.Exported())
	}
	if _, err := c.ReadAt(b, 0); err == nil {
		t.Fatal("connection still served after the sweep")
	}
}

// TestRestore: a new Server loading the state file of the first serves
// the same URIs (read by nbdinfo and nbdcopy when installed), and drops the
// expired and the missing exports; the state file is 0600 and holds no
// data.
func TestRestore(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state", "nbd-exports.json")
	keep, short, gone := image(t, dir, "keep.raw", "KEEPDATA"), image(t, dir, "short.raw", "SHORTDATA"), image(t, dir, "gone.raw", "GONEDATA")

	s1 := New(quiet(), WithStateFile(state))
	if err := s1.Load(nil); err != nil { // no file yet: nothing
		t.Fatal(err)
	}
	addr, stop1 := serve(t, s1, "127.0.0.1:0")
	uKeep, err := s1.Export(keep, true, time.Now().Add(time.Hour), exports.Owner{})
	if err != nil {
		t.Fatal(err)
	}
	uRW, _ := s1.Export(keep, false, time.Time{}, exports.Owner{})
	uShort, _ := s1.Export(short, true, time.Now().Add(300*time.Millisecond), exports.Owner{})
	uGone, _ := s1.Export(gone, true, time.Time{}, exports.Owner{})
	uDone, _ := s1.Export(keep, true, time.Time{}, exports.Owner{})
	if err := s1.Unexport(uDone); err != nil {
		t.Fatal(err)
	}
	if got, err := readHead(uKeep, 8, nil); err != nil || got != "KEEPDATA" {
		t.Fatalf("before restart: %q %v", got, err)
	}
	b, _ := os.ReadFile(state)
	for _, data := range []string{"KEEPDATA", "SHORTDATA", "GONEDATA"} {
		if strings.Contains(string(b), data) {
			t.Fatalf("state file holds data:\n%s", b)
		}
	}
	if fi, err := os.Stat(state); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("state file: %v %v", fi, err)
	}
	stop1() // the agent stops
	time.Sleep(350 * time.Millisecond)
	os.Remove(gone)

	// A check that refuses (the store is no longer served) drops them.
	refused := New(quiet())
	refused.state = state
	b, _ = os.ReadFile(state)
	if err := refused.Load(func(string) error { return errdefs.ErrPermissionDenied }); err != nil || len(refused.Exported()) != 0 {
		t.Fatalf("load with a refusing check: %v %v", err, refused.Exported())
	}
	refused.Close()
	os.WriteFile(state, b, 0o600) // that Load rewrote it without them

	s2 := New(quiet(), WithStateFile(state))
	var checked []string
	if err := s2.Load(func(p string) error { checked = append(checked, p); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(checked) != 2 {
		t.Fatalf("checked %v, want the two exports of %s", checked, keep)
	}
	if got := s2.Exported(); len(got) != 2 {
		t.Fatalf("restored %v, want the two exports of %s", got, keep)
	}
	_, stop2 := serve(t, s2, addr)
	defer stop2()
	if got, err := readHead(uKeep, 8, nil); err != nil || got != "KEEPDATA" {
		t.Fatalf("after restart: %q %v", got, err)
	}
	c, err := nbd.Dial(context.Background(), uRW, nbd.ClientOptions{Logger: quiet()})
	if err != nil || c.ReadOnly() {
		t.Fatalf("read-write export after restart: %v read-only %v", err, c != nil && c.ReadOnly())
	}
	c.Close()
	for _, u := range []string{uShort, uGone, uDone} {
		if _, err := readHead(u, 4, nil); !errdefs.IsNotFound(err) {
			t.Errorf("%s after restart: %v, want not found", u, err)
		}
	}
	b, _ = os.ReadFile(state)
	if strings.Contains(string(b), "short.raw") || strings.Contains(string(b), "gone.raw") {
		t.Fatalf("dropped exports still in the state file:\n%s", b)
	}

	needBin(t, "nbdinfo")
	if out, err := run(t, "nbdinfo", "--size", uKeep); err != nil || strings.TrimSpace(out) != "1048576" {
		t.Fatalf("nbdinfo of a restored export: %v %s", err, out)
	}
	if _, err := exec.LookPath("nbdcopy"); err == nil {
		out := filepath.Join(dir, "out.raw")
		if o, err := run(t, "nbdcopy", uKeep, out); err != nil {
			t.Fatalf("nbdcopy: %v %s", err, o)
		}
		if got, _ := os.ReadFile(out); !strings.HasPrefix(string(got), "KEEPDATA") || len(got) != 1<<20 {
			t.Fatalf("nbdcopy of a restored export: %d bytes", len(got))
		}
	}

	os.WriteFile(state, []byte("{"), 0o600)
	if err := New(quiet(), WithStateFile(state)).Load(nil); !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("corrupt state file: %v", err)
	}
}

// TestTLS: with WithTLS the URIs are nbds://, nbdinfo reads them with the
// CA, and plaintext is refused.
func TestTLS(t *testing.T) {
	dir := t.TempDir()
	caPool, cert := testCerts(t, dir)
	cfg := &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &cert, nil }}
	s := New(quiet(), WithTLS(cfg, true))
	addr, stop := serve(t, s, "127.0.0.1:0")
	defer stop()
	uri, err := s.Export(image(t, dir, "v.raw", "TLSDATA"), true, time.Time{}, exports.Owner{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(uri, "nbds://"+addr+"/") {
		t.Fatalf("URI %s", uri)
	}
	if got, err := readHead(uri, 7, &tls.Config{RootCAs: caPool}); err != nil || got != "TLSDATA" {
		t.Fatalf("read over TLS: %q %v", got, err)
	}
	plain := "nbd" + strings.TrimPrefix(uri, "nbds")
	if _, err := readHead(plain, 7, nil); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("plaintext: %v", err)
	}
	if name, err := NameOf(uri); err != nil || !strings.HasSuffix(uri, name) {
		t.Fatalf("NameOf(%s): %q %v", uri, name, err)
	}
	needBin(t, "nbdinfo")
	if out, err := run(t, "nbdinfo", "--size", uri+"?tls-certificates="+dir); err != nil || strings.TrimSpace(out) != "1048576" {
		t.Fatalf("nbdinfo over TLS: %v %s", err, out)
	}
	if out, err := run(t, "nbdinfo", "--size", plain); err == nil {
		t.Fatalf("nbdinfo in plaintext succeeded: %s", out)
	}
	if err := s.Unexport(uri); err != nil || len(s.Exported()) != 0 {
		t.Fatalf("unexport of an nbds URI: %v %v", err, s.Exported())
	}
}

// testCerts writes a throwaway CA (dir/ca-cert.pem, as libnbd wants it)
// and returns its pool and a server certificate for 127.0.0.1.
func testCerts(t *testing.T, dir string) (*x509.CertPool, tls.Certificate) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "agent"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ca-cert.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(caCert)
	return pool, tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

package nbd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
)

// testPKI is a throwaway CA with a server certificate for 127.0.0.1 and
// localhost and a client certificate, written to dir under the names
// libnbd, qemu and nbdkit look for (ca-cert.pem, server-cert.pem,
// server-key.pem, client-cert.pem, client-key.pem).
type testPKI struct {
	dir    string
	pool   *x509.CertPool
	server tls.Certificate
	client tls.Certificate
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	dir := t.TempDir()
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	serial := int64(1)
	tmpl := func(cn string) *x509.Certificate {
		serial++
		return &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      pkix.Name{CommonName: cn, Organization: []string{"stowage test"}},
			NotBefore:    time.Now().Add(-time.Hour),
			NotAfter:     time.Now().Add(24 * time.Hour),
			// qemu refuses a leaf whose critical key usage lacks
			// key encipherment.
			KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			BasicConstraintsValid: true,
		}
	}
	write := func(name string, typ string, der []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	caKey := newKey()
	ca := tmpl("stowage test CA")
	ca.IsCA, ca.KeyUsage = true, x509.KeyUsageCertSign|x509.KeyUsageCRLSign
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	write("ca-cert.pem", "CERTIFICATE", caDER)
	p := &testPKI{dir: dir, pool: x509.NewCertPool()}
	p.pool.AddCert(caCert)
	leaf := func(prefix string, usage x509.ExtKeyUsage, server bool) tls.Certificate {
		k := newKey()
		c := tmpl(prefix)
		c.ExtKeyUsage = []x509.ExtKeyUsage{usage}
		if server {
			c.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
			c.DNSNames = []string{"localhost"}
		}
		der, err := x509.CreateCertificate(rand.Reader, c, caCert, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		write(prefix+"-cert.pem", "CERTIFICATE", der)
		write(prefix+"-key.pem", "PRIVATE KEY", kder)
		return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k}
	}
	p.server = leaf("server", x509.ExtKeyUsageServerAuth, true)
	p.client = leaf("client", x509.ExtKeyUsageClientAuth, false)
	return p
}

// serverConfig serves the server certificate through GetCertificate (as a
// rotating agent does); clientCerts asks for and verifies client
// certificates.
func (p *testPKI) serverConfig(clientCerts bool) *tls.Config {
	cfg := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &p.server, nil },
	}
	if clientCerts {
		cfg.ClientAuth, cfg.ClientCAs = tls.RequireAndVerifyClientCert, p.pool
	}
	return cfg
}

func (p *testPKI) clientConfig() *tls.Config {
	return &tls.Config{RootCAs: p.pool, Certificates: []tls.Certificate{p.client}, MinVersion: tls.VersionTLS12}
}

// tlsURI is the nbds:// URI of export name on the server's TCP listener.
func (s *testServer) tlsURI(name string) string { return "nbds://" + s.tcp + "/" + name }

// libnbdURI adds the certificate directory the way libnbd wants it.
func (p *testPKI) libnbdURI(uri string) string { return uri + "?tls-certificates=" + p.dir }

// TestTLSHandshakeRaw walks the STARTTLS rules byte by byte on a server
// that requires TLS.
func TestTLSHandshakeRaw(t *testing.T) {
	pki := newTestPKI(t)
	ts := startServer(t, ServerOptions{TLS: pki.serverConfig(false), TLSRequired: true}, false)
	path, want := sparseImage(t, ts.dir, mib, 0, 8192)
	if err := ts.AddExport("a", path, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	r := dialRaw(t, ts.sock)
	r.greet(flagCFixedNewstyle | flagCNoZeroes)
	for _, opt := range []struct {
		opt  uint32
		data []byte
	}{{optList, nil}, {optInfo, goData("a")}, {optGo, goData("a")}, {optStructuredReply, nil}, {optSetMetaContext, metaData("a", "base:allocation")}, {99, nil}} {
		r.opt(opt.opt, opt.data)
		if typ := r.finalReply(); typ != repErrTLSReqd {
			t.Fatalf("option %d before TLS: %#x, want NBD_REP_ERR_TLS_REQD", opt.opt, typ)
		}
	}
	r.opt(optStartTLS, []byte("x"))
	if typ := r.finalReply(); typ != repErrInvalid {
		t.Fatalf("STARTTLS with data: %#x", typ)
	}
	r.opt(optStartTLS, nil)
	if typ := r.finalReply(); typ != repAck {
		t.Fatalf("STARTTLS: %#x", typ)
	}
	tc := tls.Client(r.c, &tls.Config{RootCAs: pki.pool, ServerName: "localhost"})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	rt := &rawConn{t: t, c: tc, br: bufio.NewReader(tc)}
	rt.opt(optStartTLS, nil)
	if typ := rt.finalReply(); typ != repErrInvalid {
		t.Fatalf("second STARTTLS: %#x", typ)
	}
	rt.negotiate("a", true, true)
	rt.req(cmdRead, 0, 7, 0, 8192, nil)
	got, errno, _ := rt.structuredRead(7, 0, 8192)
	if errno != 0 || !bytes.Equal(got, want[:8192]) {
		t.Fatalf("read over TLS: errno %d equal %v", errno, bytes.Equal(got, want[:8192]))
	}

	// NBD_OPT_EXPORT_NAME in plaintext: closed, nothing sent.
	r2 := dialRaw(t, ts.sock)
	r2.greet(flagCFixedNewstyle)
	r2.opt(optExportName, []byte("a"))
	r2.expectClosed()

	// Plaintext pipelined behind STARTTLS (an injection): closed.
	r3 := dialRaw(t, ts.sock)
	r3.greet(flagCFixedNewstyle)
	b := be.AppendUint64(nil, magicOpt)
	b = be.AppendUint32(b, optStartTLS)
	b = be.AppendUint32(b, 0)
	b = be.AppendUint64(b, magicOpt)
	b = be.AppendUint32(b, optList)
	b = be.AppendUint32(b, 0)
	r3.write(b)
	if typ := r3.finalReply(); typ != repAck {
		t.Fatalf("STARTTLS: %#x", typ)
	}
	r3.expectClosed()
}

// TestTLSClient: our client over nbds:// against our server (server and
// client certificates), and the errors a caller sees when TLS is missing
// or wrong.
func TestTLSClient(t *testing.T) {
	pki := newTestPKI(t)
	ts := startServer(t, ServerOptions{TLS: pki.serverConfig(true), TLSRequired: true}, true)
	path, _ := sparseImage(t, ts.dir, 8*mib, 0, mib, 4*mib, mib)
	if err := ts.AddExport("d", path, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := Dial(context.Background(), ts.tlsURI("d"), ClientOptions{Connections: 2, TLS: pki.clientConfig(), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if c.Connections() != 2 || !c.HasBlockStatus() {
		t.Fatalf("connections %d block status %v", c.Connections(), c.HasBlockStatus())
	}
	exerciseClient(t, c)
	c.Close()

	_, err = Dial(context.Background(), ts.tcpURI("d"), ClientOptions{})
	if !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), "requires TLS") {
		t.Fatalf("plaintext to a TLS-required server: %v", err)
	}
	other := newTestPKI(t)
	_, err = Dial(context.Background(), ts.tlsURI("d"), ClientOptions{TLS: other.clientConfig()})
	if !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("server certificate from another CA: %v", err)
	}
	noCert := pki.clientConfig()
	noCert.Certificates = nil
	if _, err = Dial(context.Background(), ts.tlsURI("d"), ClientOptions{TLS: noCert}); err == nil {
		t.Fatal("no client certificate: connected")
	}
}

// TestTLSOptional: with TLS offered but not required, nbd:// and nbds://
// both work.
func TestTLSOptional(t *testing.T) {
	pki := newTestPKI(t)
	ts := startServer(t, ServerOptions{TLS: pki.serverConfig(false)}, true)
	path, want := sparseImage(t, ts.dir, mib, 0, mib)
	if err := ts.AddExport("d", path, ExportOptions{ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	for _, uri := range []string{ts.tcpURI("d"), ts.tlsURI("d")} {
		c, err := Dial(context.Background(), uri, ClientOptions{TLS: pki.clientConfig()})
		if err != nil {
			t.Fatal(uri, err)
		}
		got := make([]byte, mib)
		if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: read %v", uri, err)
		}
		c.Close()
	}
}

// TestTLSInterop: nbdinfo, nbdcopy and qemu-img over TLS against our
// server, which asks for client certificates; plaintext is refused.
func TestTLSInterop(t *testing.T) {
	needBin(t, "nbdinfo")
	pki := newTestPKI(t)
	ts := startServer(t, ServerOptions{TLS: pki.serverConfig(true), TLSRequired: true}, true)
	path, want := sparseImage(t, ts.dir, 16*mib, 0, mib, 8*mib, 2*mib)
	if err := ts.AddExport("disk", path, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	uri := pki.libnbdURI(ts.tlsURI("disk"))
	if out := mustRun(t, "nbdinfo", "--size", uri); strings.TrimSpace(out) != fmt.Sprint(16*mib) {
		t.Fatalf("nbdinfo --size: %q", out)
	}
	if out := mustRun(t, "nbdinfo", "--map", uri); !strings.Contains(out, "hole,zero") {
		t.Errorf("nbdinfo --map over TLS:\n%s", out)
	}
	if out, err := run(t, "nbdinfo", ts.tcpURI("disk")); err == nil {
		t.Fatalf("nbdinfo in plaintext to a TLS-required server succeeded:\n%s", out)
	}

	t.Run("nbdcopy", func(t *testing.T) {
		needBin(t, "nbdcopy")
		out := filepath.Join(ts.dir, "out.raw")
		mustRun(t, "nbdcopy", uri, out)
		fileEqual(t, out, want)
		// and back into a second export
		dst, _ := sparseImage(t, ts.dir, 16*mib)
		if err := ts.AddExport("dst", dst, ExportOptions{}); err != nil {
			t.Fatal(err)
		}
		mustRun(t, "nbdcopy", "--flush", path, pki.libnbdURI(ts.tlsURI("dst")))
		fileEqual(t, dst, want)
	})

	t.Run("qemu-img", func(t *testing.T) {
		needBin(t, "qemu-img")
		host, port, _ := net.SplitHostPort(ts.tcp)
		obj := "tls-creds-x509,id=tls0,dir=" + pki.dir + ",endpoint=client"
		opts := func(export string) string {
			return "driver=nbd,server.type=inet,server.host=" + host + ",server.port=" + port + ",export=" + export + ",tls-creds=tls0"
		}
		out := mustRun(t, "qemu-img", "info", "--object", obj, "--image-opts", opts("disk"))
		if !strings.Contains(out, "16 MiB") {
			t.Errorf("qemu-img info:\n%s", out)
		}
		conv := filepath.Join(ts.dir, "conv.raw")
		mustRun(t, "qemu-img", "convert", "--object", obj, "--image-opts", opts("disk"), "-O", "raw", conv)
		fileEqual(t, conv, want)
		dst, _ := sparseImage(t, ts.dir, 16*mib)
		if err := ts.AddExport("dst2", dst, ExportOptions{}); err != nil {
			t.Fatal(err)
		}
		mustRun(t, "qemu-img", "convert", "-n", "-f", "raw", path, "--object", obj, "--target-image-opts", opts("dst2"))
		fileEqual(t, dst, want)
		if out, err := run(t, "qemu-img", "info", "nbd://"+ts.tcp+"/disk"); err == nil {
			t.Errorf("qemu-img in plaintext to a TLS-required server succeeded:\n%s", out)
		}
	})
}

// TestTLSClientNbdkit: our client against nbdkit --tls=require.
func TestTLSClientNbdkit(t *testing.T) {
	needBin(t, "nbdkit")
	pki := newTestPKI(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := fmt.Sprint(l.Addr().(*net.TCPAddr).Port)
	l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, "nbdkit", "-f", "-i", "127.0.0.1", "-p", port, "--tls=require", "--tls-certificates="+pki.dir, "memory", "1M")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); cmd.Wait() })
	uri := "nbds://127.0.0.1:" + port + "/"
	var c *Client
	for deadline := time.Now().Add(10 * time.Second); ; {
		c, err = Dial(context.Background(), uri, ClientOptions{TLS: pki.clientConfig()})
		if err == nil || time.Now().After(deadline) || !errdefs.IsUnavailable(err) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		if strings.Contains(stderr.String(), "not compiled") || strings.Contains(stderr.String(), "TLS") && strings.Contains(stderr.String(), "support") {
			t.Skipf("nbdkit has no TLS: %s", stderr.String())
		}
		t.Fatalf("dial nbdkit over TLS: %v\n%s", err, stderr.String())
	}
	defer c.Close()
	buf := bytes.Repeat([]byte("tls!"), 16384)
	if _, err := c.WriteAt(buf, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(buf))
	if _, err := c.ReadAt(got, 4096); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("read back: %v", err)
	}
	_, err = Dial(context.Background(), "nbd://127.0.0.1:"+port+"/", ClientOptions{})
	if !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), "TLS") {
		t.Fatalf("plaintext to nbdkit --tls=require: %v", err)
	}
}

// TestStreamCopyThroughNBDS: with RegisterTLS the copy engine reads and
// writes nbds:// exports.
func TestStreamCopyThroughNBDS(t *testing.T) {
	pki := newTestPKI(t)
	RegisterTLS(pki.clientConfig())
	ts := startServer(t, ServerOptions{TLS: pki.serverConfig(true), TLSRequired: true}, true)
	src, want := sparseImage(t, ts.dir, 8*mib, 0, mib, 6*mib, 4096)
	exp, _ := sparseImage(t, ts.dir, 8*mib)
	if err := ts.AddExport("e", exp, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	copyURL := func(from, to string) {
		t.Helper()
		s, err := stream.OpenSource(ctx, from, stream.SourceOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		d, err := stream.OpenSink(ctx, to, s.Size(), stream.SinkOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Abort()
		if _, err := stream.Copy(ctx, s, d, stream.Options{}); err != nil {
			t.Fatal(err)
		}
	}
	copyURL(src, ts.tlsURI("e"))
	fileEqual(t, exp, want)
	out := filepath.Join(ts.dir, "out.raw")
	copyURL(ts.tlsURI("e"), out)
	fileEqual(t, out, want)
}

// TestTLSDisconnectGoodbye: after NBD_CMD_DISC and the client's TLS
// close_notify (what libnbd sends), the server answers with its own
// close_notify and a FIN, not a TCP reset. A reset (the server closing
// with the client's goodbye unread) made nbdcopy fail now and then with
// "server closed socket unexpectedly" at nbd_shutdown.
func TestTLSDisconnectGoodbye(t *testing.T) {
	pki := newTestPKI(t)
	ts := startServer(t, ServerOptions{TLS: pki.serverConfig(false), TLSRequired: true}, true)
	path, _ := sparseImage(t, ts.dir, mib, 0, 8192)
	if err := ts.AddExport("a", path, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		c, err := net.Dial("tcp", ts.tcp)
		if err != nil {
			t.Fatal(err)
		}
		r := &rawConn{t: t, c: c, br: bufio.NewReader(c)}
		r.greet(flagCFixedNewstyle | flagCNoZeroes)
		r.opt(optStartTLS, nil)
		if typ := r.finalReply(); typ != repAck {
			t.Fatalf("STARTTLS: %#x", typ)
		}
		tc := tls.Client(c, &tls.Config{RootCAs: pki.pool, ServerName: "localhost"})
		if err := tc.Handshake(); err != nil {
			t.Fatal(err)
		}
		rt := &rawConn{t: t, c: tc, br: bufio.NewReader(tc)}
		rt.negotiate("a", true, false)
		rt.req(cmdDisc, 0, 1, 0, 0, nil)
		if err := tc.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		// What comes back, read beneath TLS: one record (the server's
		// close_notify), then the end of the stream; no reset.
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		var got []byte
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			got = append(got, buf[:n]...)
			if err != nil {
				if !errors.Is(err, io.EOF) {
					t.Fatalf("connection %d: after DISC and close_notify: %v, want the end of the stream", i, err)
				}
				break
			}
		}
		c.Close()
		if len(got) < 5 || got[0] != 0x17 && got[0] != 0x15 {
			t.Fatalf("connection %d: after DISC the server sent %x, want a TLS record (its close_notify)", i, got)
		}
	}
}

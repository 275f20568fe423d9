package nbd

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
)

// benchImage is a dense 256 MiB file, written once per benchmark.
func benchImage(b *testing.B, dir string) string {
	b.Helper()
	path := filepath.Join(dir, "dense.raw")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, mib)
	for i := range buf {
		buf[i] = byte(i*31 + i>>8)
	}
	for range 256 {
		if _, err := f.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	return path
}

// BenchmarkNbdcopyRead: nbdcopy (4 connections) from the server to null:,
// warm page cache.
func BenchmarkNbdcopyRead(b *testing.B) {
	needBin(b, "nbdcopy")
	ts := startServer(b, ServerOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, false)
	if err := ts.AddExport("", benchImage(b, ts.dir), ExportOptions{ReadOnly: true}); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(256 * mib)
	for b.Loop() {
		mustRun(b, "nbdcopy", ts.uri(""), "null:")
	}
}

// BenchmarkNbdcopyWrite: nbdcopy --flush from a warm file into the server.
func BenchmarkNbdcopyWrite(b *testing.B) {
	needBin(b, "nbdcopy")
	ts := startServer(b, ServerOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, false)
	src := benchImage(b, ts.dir)
	dst := filepath.Join(ts.dir, "dst.raw")
	if err := os.WriteFile(dst, nil, 0o644); err != nil {
		b.Fatal(err)
	}
	if err := os.Truncate(dst, 256*mib); err != nil {
		b.Fatal(err)
	}
	if err := ts.AddExport("", dst, ExportOptions{}); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(256 * mib)
	for b.Loop() {
		mustRun(b, "nbdcopy", "--flush", src, ts.uri(""))
	}
}

// BenchmarkNbdcopyReadTCP and BenchmarkNbdcopyReadTLS: the same read over
// 127.0.0.1, in plaintext and over TLS (nbds://, server certificate only),
// to compare the cost of TLS with the plaintext TCP path in one run.
func BenchmarkNbdcopyReadTCP(b *testing.B) { benchReadTCP(b, false) }

func BenchmarkNbdcopyReadTLS(b *testing.B) { benchReadTCP(b, true) }

func benchReadTCP(b *testing.B, withTLS bool) {
	needBin(b, "nbdcopy")
	opts := ServerOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	var pki *testPKI
	if withTLS {
		pki = newTestPKI(b)
		opts.TLS, opts.TLSRequired = pki.serverConfig(false), true
	}
	ts := startServer(b, opts, true)
	if err := ts.AddExport("d", benchImage(b, ts.dir), ExportOptions{ReadOnly: true}); err != nil {
		b.Fatal(err)
	}
	uri := ts.tcpURI("d")
	if withTLS {
		uri = pki.libnbdURI(ts.tlsURI("d"))
	}
	b.SetBytes(256 * mib)
	for b.Loop() {
		mustRun(b, "nbdcopy", uri, "null:")
	}
}

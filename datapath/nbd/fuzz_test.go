package nbd

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

var (
	fuzzOnce sync.Once
	fuzzSrv  *Server
)

// fuzzServer is one server with a 1 MiB export "f", shared by fuzz runs.
func fuzzServer(t testing.TB) *Server {
	fuzzOnce.Do(func() {
		dir, err := os.MkdirTemp("", "nbdfuzz")
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "f.raw")
		if err := os.WriteFile(path, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		fuzzSrv = NewServer(ServerOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), ShutdownGrace: 100 * time.Millisecond})
		if err := fuzzSrv.AddExport("f", path, ExportOptions{}); err != nil {
			t.Fatal(err)
		}
	})
	return fuzzSrv
}

// handshakeBytes is what a client sends to reach transmission on "f" with
// structured replies and base:allocation.
func handshakeBytes() []byte {
	b := be.AppendUint32(nil, flagCFixedNewstyle|flagCNoZeroes)
	opt := func(o uint32, d []byte) {
		b = be.AppendUint64(b, magicOpt)
		b = be.AppendUint32(b, o)
		b = be.AppendUint32(b, uint32(len(d)))
		b = append(b, d...)
	}
	opt(optStructuredReply, nil)
	opt(optSetMetaContext, metaData("f", metaBaseAllocation))
	opt(optGo, goData("f", infoBlockSize))
	return b
}

// FuzzConnection feeds arbitrary client bytes to a connection: the server
// must neither panic nor hang, whatever it is sent.
func FuzzConnection(f *testing.F) {
	hs := handshakeBytes()
	req := func(typ, flags uint16, off uint64, n uint32, payload []byte) []byte {
		q := request{typ: typ, flags: flags, cookie: 1, off: off, length: n}
		return append(q.encode(nil), payload...)
	}
	cat := func(parts ...[]byte) []byte {
		var out []byte
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	f.Add(cat(hs, req(cmdRead, 0, 0, 4096, nil)))
	f.Add(cat(hs, req(cmdWrite, cmdFlagFUA, 512, 512, make([]byte, 512)), req(cmdFlush, 0, 0, 0, nil)))
	f.Add(cat(hs, req(cmdBlockStatus, cmdFlagReqOne, 0, 1<<20, nil), req(cmdDisc, 0, 0, 0, nil)))
	f.Add(cat(hs, req(cmdWriteZeroes, cmdFlagNoHole|cmdFlagFastZero, 0, 65536, nil), req(cmdTrim, 0, 4096, 4096, nil)))
	f.Add(cat(hs, req(cmdWrite, 0, 0, 1<<30, nil)))
	f.Add(cat(hs, req(99, 0xffff, ^uint64(0), 0xffffffff, nil)))
	f.Add(cat(hs[:20], []byte{0xff, 0xff}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		srv := fuzzServer(t)
		client, server := net.Pipe()
		done := make(chan struct{})
		go func() {
			srv.ServeConn(context.Background(), server)
			close(done)
		}()
		go io.Copy(io.Discard, client)
		client.SetWriteDeadline(time.Now().Add(2 * time.Second))
		client.Write(in)
		client.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("server hangs on this input")
		}
	})
}

var (
	fuzzTLSOnce sync.Once
	fuzzTLSSrv  *Server
)

// FuzzHandshakeTLS feeds arbitrary client bytes to a server that requires
// TLS: options before STARTTLS, STARTTLS followed by junk where the TLS
// handshake should be. It must neither panic nor hang.
func FuzzHandshakeTLS(f *testing.F) {
	pki := newTestPKI(f)
	opt := func(b []byte, o uint32, d []byte) []byte {
		b = be.AppendUint64(b, magicOpt)
		b = be.AppendUint32(b, o)
		b = be.AppendUint32(b, uint32(len(d)))
		return append(b, d...)
	}
	flags := be.AppendUint32(nil, flagCFixedNewstyle|flagCNoZeroes)
	f.Add(opt(flags, optStartTLS, nil))
	f.Add(append(opt(flags, optStartTLS, nil), 0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5))
	f.Add(opt(opt(flags, optStartTLS, nil), optList, nil))
	f.Add(opt(opt(flags, optGo, goData("f")), optStartTLS, []byte("x")))
	f.Add(opt(flags, optExportName, []byte("f")))
	f.Fuzz(func(t *testing.T, in []byte) {
		fuzzTLSOnce.Do(func() {
			fuzzTLSSrv = NewServer(ServerOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), TLS: pki.serverConfig(false), TLSRequired: true, HandshakeTimeout: 5 * time.Second})
		})
		client, server := net.Pipe()
		done := make(chan struct{})
		go func() {
			fuzzTLSSrv.ServeConn(context.Background(), server)
			close(done)
		}()
		go io.Copy(io.Discard, client)
		client.SetWriteDeadline(time.Now().Add(2 * time.Second))
		client.Write(in)
		client.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("server hangs on this input")
		}
	})
}

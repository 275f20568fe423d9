package nbd

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stowage/stowage/errdefs"
)

// TestHandshakeOptions walks the option haggling: LIST, INFO, unknown
// options, STARTTLS, meta contexts, malformed data, EXPORT_NAME.
func TestHandshakeOptions(t *testing.T) {
	ts := startServer(t, ServerOptions{}, false)
	path, _ := sparseImage(t, ts.dir, mib, 0, 4096)
	if err := ts.AddExport("a", path, ExportOptions{Description: "disk a"}); err != nil {
		t.Fatal(err)
	}
	r := dialRaw(t, ts.sock)
	r.greet(flagCFixedNewstyle)

	r.opt(optList, nil)
	_, typ, d := r.optReply()
	if typ != repServer || string(d[4:4+be.Uint32(d)]) != "a" || string(d[4+be.Uint32(d):]) != "disk a" {
		t.Fatalf("LIST: %#x %q", typ, d)
	}
	if typ := r.finalReply(); typ != repAck {
		t.Fatalf("LIST end %#x", typ)
	}
	r.opt(optList, []byte("x"))
	if typ := r.finalReply(); typ != repErrInvalid {
		t.Fatalf("LIST with data: %#x", typ)
	}
	r.opt(99, []byte("whatever"))
	if typ := r.finalReply(); typ != repErrUnsup {
		t.Fatalf("unknown option: %#x", typ)
	}
	r.opt(optStartTLS, nil)
	if typ := r.finalReply(); typ != repErrUnsup {
		t.Fatalf("STARTTLS: %#x", typ)
	}
	r.opt(optInfo, goData("nope"))
	if typ := r.finalReply(); typ != repErrUnknown {
		t.Fatalf("INFO unknown export: %#x", typ)
	}
	r.opt(optInfo, append(goData("a", infoDescription), 0)) // length mismatch
	if typ := r.finalReply(); typ != repErrInvalid {
		t.Fatalf("INFO malformed: %#x", typ)
	}
	r.opt(optInfo, be.AppendUint32(nil, 1000)) // name longer than the option
	if typ := r.finalReply(); typ != repErrInvalid {
		t.Fatalf("INFO short: %#x", typ)
	}
	r.opt(optInfo, goData("a", infoDescription, infoName, infoBlockSize))
	seen := map[uint16][]byte{}
	for {
		_, typ, d := r.optReply()
		if typ == repAck {
			break
		}
		if typ != repInfo {
			t.Fatalf("INFO: %#x", typ)
		}
		seen[be.Uint16(d)] = d[2:]
	}
	if e := seen[infoExport]; len(e) != 10 || be.Uint64(e) != mib || be.Uint16(e[8:])&tfHasFlags == 0 {
		t.Errorf("NBD_INFO_EXPORT %x", e)
	}
	if string(seen[infoDescription]) != "disk a" || string(seen[infoName]) != "a" {
		t.Errorf("name %q description %q", seen[infoName], seen[infoDescription])
	}
	if b := seen[infoBlockSize]; len(b) != 12 || be.Uint32(b) != 1 || be.Uint32(b[4:]) != 4096 || be.Uint32(b[8:]) != MaxPayload {
		t.Errorf("NBD_INFO_BLOCK_SIZE %x", b)
	}
	// meta contexts need structured replies first
	r.opt(optListMetaContext, metaData("a"))
	if typ := r.finalReply(); typ != repErrInvalid {
		t.Fatalf("LIST_META_CONTEXT before STRUCTURED_REPLY: %#x", typ)
	}
	r.opt(optStructuredReply, nil)
	if typ := r.finalReply(); typ != repAck {
		t.Fatalf("STRUCTURED_REPLY: %#x", typ)
	}
	for _, q := range [][]string{nil, {"base:"}, {"base:allocation", "qemu:dirty-bitmap:x"}} {
		r.opt(optListMetaContext, metaData("a", q...))
		_, typ, d := r.optReply()
		if typ != repMetaContext || string(d[4:]) != metaBaseAllocation {
			t.Fatalf("LIST_META_CONTEXT %q: %#x %q", q, typ, d)
		}
		if typ := r.finalReply(); typ != repAck {
			t.Fatalf("LIST_META_CONTEXT %q end: %#x", q, typ)
		}
	}
	r.opt(optSetMetaContext, metaData("a", "x-other:thing", "base:"))
	if typ := r.finalReply(); typ != repAck { // selects nothing
		t.Fatalf("SET_META_CONTEXT selecting nothing: %#x", typ)
	}
	r.opt(optSetMetaContext, metaData("a", "nocolon"))
	if typ := r.finalReply(); typ != repErrInvalid {
		t.Fatalf("SET_META_CONTEXT bad query: %#x", typ)
	}
	r.opt(optSetMetaContext, metaData("a", "base:allocation")[:10])
	if typ := r.finalReply(); typ != repErrInvalid {
		t.Fatalf("SET_META_CONTEXT truncated: %#x", typ)
	}
	// an option too large to read is skipped and refused
	r.opt(optInfo, make([]byte, maxOptionLen+1))
	if typ := r.finalReply(); typ != repErrTooBig {
		t.Fatalf("huge option: %#x", typ)
	}
	// EXPORT_NAME ends the handshake without option reply
	r.opt(optExportName, []byte("a"))
	h := r.read(10)
	if be.Uint64(h) != mib || be.Uint16(h[8:])&(tfHasFlags|tfSendDF) != tfHasFlags|tfSendDF {
		t.Fatalf("EXPORT_NAME reply %x", h)
	}
	r.read(124) // zeroes: NO_ZEROES was not negotiated
	// structured, no meta context: BLOCK_STATUS is EINVAL
	r.req(cmdBlockStatus, 0, 7, 0, 4096, nil)
	if c := r.chunk(); c.typ != replyError || be.Uint32(c.payload) != errInval || c.cookie != 7 {
		t.Fatalf("BLOCK_STATUS without context: %+v", c)
	}
	r.req(cmdDisc, 0, 8, 0, 0, nil)
	r.expectClosed()

	// EXPORT_NAME of an unknown export closes the connection
	r = dialRaw(t, ts.sock)
	r.greet(flagCFixedNewstyle | flagCNoZeroes)
	r.opt(optExportName, []byte("nope"))
	r.expectClosed()
	// ABORT is acknowledged
	r = dialRaw(t, ts.sock)
	r.greet(flagCFixedNewstyle)
	r.opt(optAbort, nil)
	if typ := r.finalReply(); typ != repAck {
		t.Fatalf("ABORT: %#x", typ)
	}
	r.expectClosed()
}

// TestMalformedRequests sends what no client should, one connection per
// case, and checks after each that a well-behaved connection still works.
func TestMalformedRequests(t *testing.T) {
	ts := startServer(t, ServerOptions{}, false)
	path, want := sparseImage(t, ts.dir, 4*mib, 0, 4*mib)
	if err := ts.AddExport("d", path, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	ro, _ := sparseImage(t, ts.dir, mib, 0, mib)
	if err := ts.AddExport("ro", ro, ExportOptions{ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	big, _ := sparseImage(t, ts.dir, 64*mib, mib, 4096)
	if err := ts.AddExport("big", big, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	good := dialRaw(t, ts.sock)
	good.open("d", false, false)
	cookie := uint64(1000)
	stillServing := func(t *testing.T) {
		t.Helper()
		cookie++
		good.with(t).expectRead(cookie, 4096, want[4096:8192])
	}
	open := func(t *testing.T, name string, structured bool) *rawConn {
		r := dialRaw(t, ts.sock)
		r.open(name, structured, false)
		return r
	}
	expectErr := func(r *rawConn, cookie uint64, errno uint32) {
		r.t.Helper()
		e, ck, _ := r.simple(0)
		if e != errno || ck != cookie {
			r.t.Fatalf("reply errno %d cookie %d, want errno %d cookie %d", e, ck, errno, cookie)
		}
	}

	t.Run("handshake garbage", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(flagCFixedNewstyle)
		r.write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		r.expectClosed()
		stillServing(t)
	})
	t.Run("unknown client flags", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(1 << 7)
		r.expectClosed()
		stillServing(t)
	})
	t.Run("close during greeting", func(t *testing.T) {
		c, err := net.Dial("unix", ts.sock)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		stillServing(t)
	})
	t.Run("bad request magic", func(t *testing.T) {
		r := open(t, "d", false)
		b := (&request{typ: cmdRead, cookie: 1, length: 512}).encode(nil)
		b[0] ^= 0xff
		r.write(b)
		r.expectClosed()
		stillServing(t)
	})
	t.Run("unknown command", func(t *testing.T) {
		r := open(t, "d", false)
		r.req(99, 0, 1, 0, 4096, nil)
		expectErr(r, 1, errInval)
		r.expectRead(2, 0, want[:512]) // and the connection goes on
		stillServing(t)
	})
	t.Run("unknown flags", func(t *testing.T) {
		r := open(t, "d", false)
		r.req(cmdRead, 1<<9, 1, 0, 512, nil)
		expectErr(r, 1, errInval)
		r.req(cmdRead, cmdFlagDF, 2, 0, 512, nil) // DF without structured replies
		expectErr(r, 2, errInval)
		r.expectRead(3, 0, want[:512])
	})
	t.Run("out of range", func(t *testing.T) {
		r := open(t, "d", false)
		r.req(cmdRead, 0, 1, 4*mib-512, 1024, nil)
		expectErr(r, 1, errInval)
		r.req(cmdRead, 0, 2, 1<<63, 512, nil)
		expectErr(r, 2, errInval)
		r.req(cmdWrite, 0, 3, 4*mib, 512, make([]byte, 512)) // payload consumed
		expectErr(r, 3, errNoSpc)
		r.req(cmdTrim, 0, 4, 4*mib-4096, 8192, nil)
		expectErr(r, 4, errInval)
		r.req(cmdWriteZeroes, 0, 5, ^uint64(0)-100, 4096, nil)
		expectErr(r, 5, errNoSpc)
		r.req(cmdCache, 0, 6, 5*mib, 1, nil)
		expectErr(r, 6, errInval)
		r.expectRead(7, 0, want[:512])
	})
	t.Run("oversized read", func(t *testing.T) {
		r := open(t, "big", false)
		r.req(cmdRead, 0, 1, 0, 64<<20, nil)
		expectErr(r, 1, errInval)
		r.expectRead(2, 0, make([]byte, 512))
		s := open(t, "big", true)
		s.req(cmdRead, 0, 3, 0, 40<<20, nil)
		if _, errno, _ := s.structuredRead(3, 0, 0); errno != errOverflow {
			t.Fatalf("structured oversized read: errno %d", errno)
		}
	})
	t.Run("oversized write skipped", func(t *testing.T) {
		r := open(t, "d", false)
		r.req(cmdWrite, 0, 1, 0, MaxPayload+4096, make([]byte, MaxPayload+4096))
		expectErr(r, 1, errInval)
		r.expectRead(2, 0, want[:512]) // nothing was written, still in step
		stillServing(t)
	})
	t.Run("huge write closes", func(t *testing.T) {
		r := open(t, "d", false)
		r.req(cmdWrite, 0, 1, 0, 0xffffffff, nil)
		expectErr(r, 1, errInval)
		r.expectClosed()
		stillServing(t)
	})
	t.Run("disconnect mid-write", func(t *testing.T) {
		r := open(t, "d", false)
		r.req(cmdWrite, 0, 1, 0, 65536, make([]byte, 1000))
		r.c.Close()
		stillServing(t)
		got, _ := os.ReadFile(path)
		if !bytes.Equal(got[:65536], want[:65536]) {
			t.Fatal("a partial write payload reached the file")
		}
	})
	t.Run("zero-length requests", func(t *testing.T) {
		r := open(t, "d", false)
		for i, typ := range []uint16{cmdRead, cmdWrite, cmdTrim, cmdWriteZeroes, cmdCache} {
			r.req(typ, 0, uint64(i), 0, 0, nil)
			expectErr(r, uint64(i), 0)
		}
	})
	t.Run("read-only", func(t *testing.T) {
		r := open(t, "ro", false)
		r.req(cmdWrite, cmdFlagFUA, 1, 0, 512, make([]byte, 512))
		expectErr(r, 1, errPerm)
		r.req(cmdTrim, 0, 2, 0, 512, nil)
		expectErr(r, 2, errPerm)
		r.req(cmdWriteZeroes, 0, 3, 0, 512, nil)
		expectErr(r, 3, errPerm)
		r.req(cmdFlush, 0, 4, 0, 0, nil)
		expectErr(r, 4, 0)
	})
	t.Run("garbage after handshake", func(t *testing.T) {
		for i := range 20 {
			r := open(t, "d", i%2 == 0)
			junk := make([]byte, 28*(1+i))
			for k := range junk {
				junk[k] = byte(k*7 + i)
			}
			r.write(junk)
			r.c.Close()
		}
		stillServing(t)
	})
}

// failingBackend fails reads in [failOff, failOff+failLen).
type failingBackend struct {
	*FileBackend
	failOff, failLen int64
}

func (f *failingBackend) ReadAt(p []byte, off int64) (int, error) {
	if off < f.failOff+f.failLen && off+int64(len(p)) > f.failOff {
		return 0, syscall.EIO
	}
	return f.FileBackend.ReadAt(p, off)
}

// TestReadError: a failed read is an error reply (simple and structured)
// and the connection keeps serving; no success header goes out first.
func TestReadError(t *testing.T) {
	ts := startServer(t, ServerOptions{}, false)
	path, want := sparseImage(t, ts.dir, mib, 0, mib)
	fb, err := OpenFileBackend(path, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.AddBackend("bad", &failingBackend{FileBackend: fb, failOff: 65536, failLen: 4096}, ExportOptions{ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	r := dialRaw(t, ts.sock)
	r.open("bad", false, false)
	r.req(cmdRead, 0, 1, 60000, 8192, nil)
	if errno, ck, _ := r.simple(0); errno != errIO || ck != 1 {
		t.Fatalf("simple read error: errno %d cookie %d", errno, ck)
	}
	r.expectRead(2, 0, want[:4096])

	s := dialRaw(t, ts.sock)
	s.open("bad", true, false)
	s.req(cmdRead, 0, 3, 0, 128<<10, nil)
	if _, errno, _ := s.structuredRead(3, 0, 128<<10); errno != errIO {
		t.Fatalf("structured read error: errno %d", errno)
	}
	s.req(cmdRead, 0, 4, 0, 4096, nil)
	if got, errno, _ := s.structuredRead(4, 0, 4096); errno != 0 || !bytes.Equal(got, want[:4096]) {
		t.Fatalf("read after error: errno %d", errno)
	}
}

// TestStructuredReadHoles: reads of sparse ranges come back as data and
// hole chunks that reassemble to the file content; DF gives one chunk.
func TestStructuredReadHoles(t *testing.T) {
	ts := startServer(t, ServerOptions{}, false)
	path, want := sparseImage(t, ts.dir, 4*mib, 0, 64<<10, mib, 4096, 3*mib, 8192)
	if err := ts.AddExport("s", path, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	r := dialRaw(t, ts.sock)
	_, flags := r.open("s", true, true)
	if flags&tfSendDF == 0 {
		t.Fatalf("flags %#x lack SEND_DF", flags)
	}
	r.req(cmdRead, 0, 1, 0, 4*mib, nil)
	got, errno, holes := r.structuredRead(1, 0, 4*mib)
	if errno != 0 || !bytes.Equal(got, want) || holes < 3 {
		t.Fatalf("sparse read: errno %d equal %v holes %d", errno, bytes.Equal(got, want), holes)
	}
	r.req(cmdRead, cmdFlagDF, 2, 0, 2*mib, nil)
	c := r.chunk()
	if c.typ != replyOffsetData || len(c.payload) != 8+2*mib || !bytes.Equal(c.payload[8:], want[:2*mib]) {
		t.Fatalf("DF read: chunk type %d len %d", c.typ, len(c.payload))
	}
	if c.flags&replyFlagDone == 0 {
		if c2 := r.chunk(); c2.typ != replyNone || c2.flags&replyFlagDone == 0 {
			t.Fatalf("DF read: second chunk %+v", c2)
		}
	}
	// block status: REQ_ONE gives one extent within the request
	r.req(cmdBlockStatus, cmdFlagReqOne, 3, 32768, mib, nil)
	c = r.chunk()
	if c.typ != replyBlockStatus || len(c.payload) != 12 || be.Uint32(c.payload) != baseAllocationID ||
		be.Uint32(c.payload[4:]) != 32768 || be.Uint32(c.payload[8:]) != 0 {
		t.Fatalf("REQ_ONE block status: %+v", c)
	}
	r.req(cmdBlockStatus, 0, 4, 0, 4*mib, nil)
	c = r.chunk()
	wantExt := []uint32{64 << 10, 0, mib - 64<<10, 3, 4096, 0, 2*mib - 4096, 3, 8192, 0, mib - 8192, 3}
	if c.typ != replyBlockStatus || len(c.payload) != 4+4*len(wantExt) {
		t.Fatalf("block status: %+v", c)
	}
	for i, w := range wantExt {
		if g := be.Uint32(c.payload[4+4*i:]); g != w {
			t.Fatalf("block status word %d = %d, want %d", i, g, w)
		}
	}
}

// gateBackend blocks reads at gateOff until the gate is opened.
type gateBackend struct {
	*FileBackend
	gateOff int64
	gate    chan struct{}
	entered chan struct{}
	once    sync.Once
}

func (g *gateBackend) ReadAt(p []byte, off int64) (int, error) {
	if off == g.gateOff {
		g.once.Do(func() { close(g.entered) })
		<-g.gate
	}
	return g.FileBackend.ReadAt(p, off)
}

// TestOutOfOrderReplies: a slow request does not hold back later ones on
// the same connection, and many pipelined requests are all answered once
// with the right data.
func TestOutOfOrderReplies(t *testing.T) {
	ts := startServer(t, ServerOptions{Workers: 8}, false)
	path, want := sparseImage(t, ts.dir, 4*mib, 0, 4*mib)
	fb, err := OpenFileBackend(path, false)
	if err != nil {
		t.Fatal(err)
	}
	gb := &gateBackend{FileBackend: fb, gateOff: mib, gate: make(chan struct{}), entered: make(chan struct{})}
	if err := ts.AddBackend("g", gb, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	r := dialRaw(t, ts.sock)
	r.open("g", false, false)
	r.req(cmdRead, 0, 1, mib, 4096, nil) // blocks in the backend
	<-gb.entered
	r.req(cmdRead, 0, 2, 0, 4096, nil)
	errno, ck, data := r.simple(4096)
	if errno != 0 || ck != 2 || !bytes.Equal(data, want[:4096]) {
		t.Fatalf("second request: errno %d cookie %d", errno, ck)
	}
	close(gb.gate)
	errno, ck, data = r.simple(4096)
	if errno != 0 || ck != 1 || !bytes.Equal(data, want[mib:mib+4096]) {
		t.Fatalf("first request: errno %d cookie %d", errno, ck)
	}

	// pipeline 200 mixed requests from one writer, replies in any order
	const n = 200
	go func() {
		for i := range n {
			off := uint64(i) * 16384
			if i%3 == 0 {
				r.req(cmdWrite, 0, uint64(10000+i), off, 4096, want[off:off+4096])
			} else {
				r.req(cmdRead, 0, uint64(10000+i), off, 16384, nil)
			}
		}
	}()
	seen := map[uint64]bool{}
	for range n {
		h := r.read(simpleReplyLen)
		ck := be.Uint64(h[8:])
		i := int(ck - 10000)
		if be.Uint32(h) != magicSimple || be.Uint32(h[4:]) != 0 || i < 0 || i >= n || seen[ck] {
			t.Fatalf("bad reply %x", h)
		}
		seen[ck] = true
		if i%3 != 0 {
			off := i * 16384
			if got := r.read(16384); !bytes.Equal(got, want[off:off+16384]) {
				t.Fatalf("read %d: wrong data", i)
			}
		}
	}
}

// TestDiscFinishesInFlight: DISC right behind a write still lands the write.
func TestDiscFinishesInFlight(t *testing.T) {
	ts := startServer(t, ServerOptions{}, false)
	path, _ := sparseImage(t, ts.dir, mib, 0, 0)
	if err := ts.AddExport("d", path, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	r := dialRaw(t, ts.sock)
	r.open("d", false, false)
	data := bytes.Repeat([]byte{0x5a}, 256<<10)
	r.req(cmdWrite, 0, 1, 4096, uint32(len(data)), data)
	r.req(cmdDisc, 0, 2, 0, 0, nil)
	if errno, ck, _ := r.simple(0); errno != 0 || ck != 1 {
		t.Fatalf("write: errno %d cookie %d", errno, ck)
	}
	r.expectClosed()
	got, _ := os.ReadFile(path)
	if !bytes.Equal(got[4096:4096+len(data)], data) {
		t.Fatal("write before DISC did not land")
	}
}

// TestRemoveExport closes that export's connections only.
func TestRemoveExport(t *testing.T) {
	ts := startServer(t, ServerOptions{ShutdownGrace: time.Second}, false)
	a, wa := sparseImage(t, ts.dir, mib, 0, mib)
	b, _ := sparseImage(t, ts.dir, mib, 0, mib)
	if err := ts.AddExport("a", a, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := ts.AddExport("a", a, ExportOptions{}); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("duplicate export: %v", err)
	}
	if err := ts.AddExport("b", b, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	ra, rb := dialRaw(t, ts.sock), dialRaw(t, ts.sock)
	ra.open("a", false, false)
	rb.open("b", false, false)
	done := make(chan error)
	go func() { done <- ts.RemoveExport("b") }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("RemoveExport hangs")
	}
	rb.expectClosed()
	ra.expectRead(1, 0, wa[:4096])
	if err := ts.RemoveExport("b"); err != nil {
		t.Fatalf("removing a removed export: %v", err)
	}
	r := dialRaw(t, ts.sock)
	r.greet(flagCFixedNewstyle)
	r.opt(optGo, goData("b"))
	if typ := r.finalReply(); typ != repErrUnknown {
		t.Fatalf("GO to a removed export: %#x", typ)
	}
}

// TestServeStops: cancelling Serve's context closes idle connections and
// returns.
func TestServeStops(t *testing.T) {
	dir := t.TempDir()
	srv := NewServer(ServerOptions{Logger: testLogger(t), ShutdownGrace: 200 * time.Millisecond})
	defer srv.Close()
	path, _ := sparseImage(t, dir, mib, 0, mib)
	if err := srv.AddExport("", path, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- srv.Serve(ctx, l) }()
	var conns []net.Conn
	for range 3 {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err := io.ReadAll(c)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Error("connection left open after Serve returned")
			}
		}()
	}
	wg.Wait()
}

// MaxConns: connections past the limit are closed before the handshake;
// a freed slot is taken again.
func TestMaxConns(t *testing.T) {
	dir := t.TempDir()
	srv := NewServer(ServerOptions{Logger: testLogger(t), MaxConns: 2})
	defer srv.Close()
	path, _ := sparseImage(t, dir, mib, 0, mib)
	if err := srv.AddExport("", path, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = srv.Serve(ctx, l) }()
	greeting := func() (net.Conn, string) {
		t.Helper()
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b := make([]byte, 8)
		n, _ := io.ReadFull(c, b)
		return c, string(b[:n])
	}
	a, ga := greeting()
	defer a.Close()
	b, gb := greeting()
	if ga != "NBDMAGIC" || gb != "NBDMAGIC" {
		t.Fatalf("the first two connections got %q and %q, want the NBD greeting", ga, gb)
	}
	c, gc := greeting()
	c.Close()
	if gc != "" {
		t.Fatalf("the third connection got %q, want it closed at once", gc)
	}
	b.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		d, gd := greeting()
		d.Close()
		if gd == "NBDMAGIC" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a freed slot was not taken again")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestExportExpires: an export past ExportOptions.Expires no longer opens
// and is not listed; one not yet expired does.
func TestExportExpires(t *testing.T) {
	ts := startServer(t, ServerOptions{}, false)
	path, _ := sparseImage(t, ts.dir, mib, 0, 4096)
	if err := ts.AddExport("old", path, ExportOptions{Expires: time.Now().Add(-time.Second)}); err != nil {
		t.Fatal(err)
	}
	if err := ts.AddExport("new", path, ExportOptions{Expires: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if _, err := Dial(context.Background(), ts.uri("old"), ClientOptions{}); !errdefs.IsNotFound(err) {
		t.Fatalf("expired export: %v", err)
	}
	c, err := Dial(context.Background(), ts.uri("new"), ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if l := ts.list(); len(l) != 1 || l[0].name != "new" {
		t.Fatalf("list: %v", l)
	}
}

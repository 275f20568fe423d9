package nbd

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// rawConn speaks the protocol byte by byte, for tests that send what a
// well-behaved client would not. Every read has a deadline, so a server
// that hangs fails the test instead of hanging it.
type rawConn struct {
	t  testing.TB
	c  net.Conn
	br *bufio.Reader
}

const rawTimeout = 5 * time.Second

func dialRaw(t testing.TB, sock string) *rawConn {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawConn{t: t, c: c, br: bufio.NewReader(c)}
}

// with returns r reporting to t (a subtest).
func (r *rawConn) with(t testing.TB) *rawConn {
	c := *r
	c.t = t
	return &c
}

func (r *rawConn) read(n int) []byte {
	r.t.Helper()
	b := make([]byte, n)
	r.c.SetReadDeadline(time.Now().Add(rawTimeout))
	if _, err := io.ReadFull(r.br, b); err != nil {
		r.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

func (r *rawConn) write(b []byte) {
	r.t.Helper()
	r.c.SetWriteDeadline(time.Now().Add(rawTimeout))
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

// greet reads the server greeting and sends client flags.
func (r *rawConn) greet(cflags uint32) {
	r.t.Helper()
	g := r.read(18)
	if be.Uint64(g) != magicInit || be.Uint64(g[8:]) != magicOpt || be.Uint16(g[16:]) != flagFixedNewstyle|flagNoZeroes {
		r.t.Fatalf("greeting %x", g)
	}
	r.write(be.AppendUint32(nil, cflags))
}

func (r *rawConn) opt(opt uint32, data []byte) {
	r.t.Helper()
	b := be.AppendUint64(nil, magicOpt)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, uint32(len(data)))
	r.write(append(b, data...))
}

func (r *rawConn) optReply() (opt, typ uint32, data []byte) {
	r.t.Helper()
	h := r.read(optReplyHeaderLen)
	if be.Uint64(h) != magicOptReply {
		r.t.Fatalf("option reply magic %x", h)
	}
	return be.Uint32(h[8:]), be.Uint32(h[12:]), r.read(int(be.Uint32(h[16:])))
}

// expectOpt reads replies until a final one and returns its type.
func (r *rawConn) finalReply() uint32 {
	r.t.Helper()
	for {
		_, typ, _ := r.optReply()
		if typ != repInfo && typ != repServer && typ != repMetaContext {
			return typ
		}
	}
}

func goData(name string, infos ...uint16) []byte {
	b := be.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = be.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = be.AppendUint16(b, i)
	}
	return b
}

func metaData(name string, queries ...string) []byte {
	b := be.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = be.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = be.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// open handshakes into export name and returns its size and flags.
func (r *rawConn) open(name string, structured, meta bool) (uint64, uint16) {
	r.t.Helper()
	r.greet(flagCFixedNewstyle | flagCNoZeroes)
	return r.negotiate(name, structured, meta)
}

// negotiate ends a handshake already greeted (or upgraded to TLS) in
// export name.
func (r *rawConn) negotiate(name string, structured, meta bool) (uint64, uint16) {
	r.t.Helper()
	if structured {
		r.opt(optStructuredReply, nil)
		if typ := r.finalReply(); typ != repAck {
			r.t.Fatalf("STRUCTURED_REPLY: %#x", typ)
		}
	}
	if meta {
		r.opt(optSetMetaContext, metaData(name, metaBaseAllocation))
		_, typ, d := r.optReply()
		if typ != repMetaContext || be.Uint32(d) != baseAllocationID || string(d[4:]) != metaBaseAllocation {
			r.t.Fatalf("SET_META_CONTEXT: %#x %q", typ, d)
		}
		if typ := r.finalReply(); typ != repAck {
			r.t.Fatalf("SET_META_CONTEXT: %#x", typ)
		}
	}
	r.opt(optGo, goData(name, infoBlockSize))
	var size uint64
	var flags uint16
	for {
		_, typ, d := r.optReply()
		if typ == repInfo && be.Uint16(d) == infoExport {
			size, flags = be.Uint64(d[2:]), be.Uint16(d[10:])
			continue
		}
		if typ == repInfo {
			continue
		}
		if typ != repAck {
			r.t.Fatalf("GO %q: reply %#x %q", name, typ, d)
		}
		return size, flags
	}
}

func (r *rawConn) req(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	r.t.Helper()
	q := request{flags: flags, typ: typ, cookie: cookie, off: off, length: length}
	r.write(append(q.encode(nil), payload...))
}

// simple reads a simple reply (and n payload bytes when it succeeded).
func (r *rawConn) simple(n int) (errno uint32, cookie uint64, data []byte) {
	r.t.Helper()
	h := r.read(simpleReplyLen)
	if be.Uint32(h) != magicSimple {
		r.t.Fatalf("simple reply magic %x", h)
	}
	errno, cookie = be.Uint32(h[4:]), be.Uint64(h[8:])
	if errno == 0 && n > 0 {
		data = r.read(n)
	}
	return errno, cookie, data
}

type chunk struct {
	flags, typ uint16
	cookie     uint64
	payload    []byte
}

// reply reads one reply of either kind; simple replies come back as a
// chunk of type 0xffff with the errno in payload.
func (r *rawConn) chunk() chunk {
	r.t.Helper()
	m := be.Uint32(r.read(4))
	switch m {
	case magicStructured:
		h := r.read(structuredHeaderLen - 4)
		c := chunk{flags: be.Uint16(h), typ: be.Uint16(h[2:]), cookie: be.Uint64(h[4:])}
		c.payload = r.read(int(be.Uint32(h[12:])))
		return c
	case magicSimple:
		h := r.read(12)
		return chunk{typ: 0xffff, flags: replyFlagDone, cookie: be.Uint64(h[4:]), payload: h[:4]}
	}
	r.t.Fatalf("reply magic %#x", m)
	return chunk{}
}

// structuredRead collects a structured READ reply into a buffer; it returns
// the errno of an error chunk, if any.
func (r *rawConn) structuredRead(cookie, off uint64, n int) ([]byte, uint32, int) {
	r.t.Helper()
	out := make([]byte, n)
	var errno uint32
	holes := 0
	for {
		c := r.chunk()
		if c.cookie != cookie {
			r.t.Fatalf("chunk for cookie %d, want %d", c.cookie, cookie)
		}
		switch c.typ {
		case replyOffsetData:
			o := be.Uint64(c.payload) - off
			copy(out[o:], c.payload[8:])
		case replyOffsetHole:
			holes++
			o, l := be.Uint64(c.payload)-off, be.Uint32(c.payload[8:])
			clear(out[o : o+uint64(l)])
		case replyError, replyErrorOffset:
			errno = be.Uint32(c.payload)
		case replyNone:
		default:
			r.t.Fatalf("unexpected chunk type %d", c.typ)
		}
		if c.flags&replyFlagDone != 0 {
			return out, errno, holes
		}
	}
}

// expectClosed checks that the server closed the connection (soon).
func (r *rawConn) expectClosed() {
	r.t.Helper()
	r.c.SetReadDeadline(time.Now().Add(rawTimeout))
	_, err := io.ReadAll(r.br)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		r.t.Fatalf("server did not close the connection")
	}
}

// expectData checks a successful simple read of want at off.
func (r *rawConn) expectRead(cookie, off uint64, want []byte) {
	r.t.Helper()
	r.req(cmdRead, 0, cookie, off, uint32(len(want)), nil)
	errno, ck, data := r.simple(len(want))
	if errno != 0 || ck != cookie || !bytes.Equal(data, want) {
		r.t.Fatalf("read %d: errno %d cookie %d, data equal %v", off, errno, ck, bytes.Equal(data, want))
	}
}

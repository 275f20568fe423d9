package nbd

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"strings"
)

// errAbort ends a handshake the client aborted (NBD_OPT_ABORT).
var errAbort = errors.New("client aborted the handshake")

// handshake runs the fixed newstyle negotiation and returns the export the
// client chose with NBD_OPT_GO or NBD_OPT_EXPORT_NAME.
func (c *conn) handshake() (*export, error) {
	b := be.AppendUint64(nil, magicInit)
	b = be.AppendUint64(b, magicOpt)
	b = be.AppendUint16(b, flagFixedNewstyle|flagNoZeroes)
	c.hw.Write(b)
	if err := c.hw.Flush(); err != nil {
		return nil, err
	}
	var cf [4]byte
	if err := readFull(c.br, cf[:]); err != nil {
		return nil, err
	}
	cflags := be.Uint32(cf[:])
	if cflags&^(flagCFixedNewstyle|flagCNoZeroes) != 0 {
		return nil, fmt.Errorf("unknown client flags %#x", cflags)
	}
	c.noZeroes = cflags&flagCNoZeroes != 0
	var hdr [optHeaderLen]byte
	for {
		if err := readFull(c.br, hdr[:]); err != nil {
			return nil, err
		}
		if m := be.Uint64(hdr[0:]); m != magicOpt {
			return nil, fmt.Errorf("bad option magic %#x", m)
		}
		opt, length := be.Uint32(hdr[8:]), be.Uint32(hdr[12:])
		if length > maxOptionLen {
			if opt == optExportName {
				return nil, fmt.Errorf("export name of %d bytes", length)
			}
			if _, err := io.CopyN(io.Discard, c.br, int64(length)); err != nil {
				return nil, err
			}
			c.optReply(opt, repErrTooBig, []byte("option too large"))
			if err := c.hw.Flush(); err != nil {
				return nil, err
			}
			continue
		}
		data := make([]byte, length)
		if err := readFull(c.br, data); err != nil {
			return nil, err
		}
		e, err := c.option(opt, data)
		if ferr := c.hw.Flush(); err == nil && ferr != nil {
			err = ferr
		}
		if err != nil || e != nil {
			return e, err
		}
	}
}

// optReply queues one option reply.
func (c *conn) optReply(opt, typ uint32, data []byte) {
	b := be.AppendUint64(make([]byte, 0, optReplyHeaderLen), magicOptReply)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, typ)
	b = be.AppendUint32(b, uint32(len(data)))
	c.hw.Write(b)
	c.hw.Write(data)
}

func (c *conn) optError(opt, typ uint32, format string, args ...any) {
	c.optReply(opt, typ, []byte(fmt.Sprintf(format, args...)))
}

// option handles one option; a non-nil export ends the handshake.
func (c *conn) option(opt uint32, data []byte) (*export, error) {
	if c.s.opts.TLSRequired && !c.tls {
		switch opt {
		case optStartTLS, optAbort:
		case optExportName:
			// No way to send an error: close, as the specification asks.
			return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS")
		default:
			c.optError(opt, repErrTLSReqd, "this server requires TLS (NBD_OPT_STARTTLS, nbds://)")
			return nil, nil
		}
	}
	switch opt {
	case optExportName:
		e := c.s.lookup(string(data))
		if e == nil {
			return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME: no export %q", data)
		}
		b := be.AppendUint64(nil, uint64(e.size))
		b = be.AppendUint16(b, e.flags(c.structured))
		if !c.noZeroes {
			b = append(b, make([]byte, 124)...)
		}
		c.hw.Write(b)
		return e, nil
	case optAbort:
		c.optReply(opt, repAck, nil)
		return nil, errAbort
	case optList:
		if c.s.opts.SecretNames {
			c.optError(opt, repErrPolicy, "export names are not listed on this server")
			return nil, nil
		}
		if len(data) != 0 {
			c.optError(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
			return nil, nil
		}
		for _, e := range c.s.list() {
			b := be.AppendUint32(nil, uint32(len(e.name)))
			b = append(b, e.name...)
			b = append(b, e.desc...)
			c.optReply(opt, repServer, b)
		}
		c.optReply(opt, repAck, nil)
	case optStartTLS:
		return nil, c.startTLS(data)
	case optInfo, optGo:
		return c.infoGo(opt, data)
	case optStructuredReply:
		if len(data) != 0 {
			c.optError(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
			return nil, nil
		}
		c.structured = true
		c.optReply(opt, repAck, nil)
	case optListMetaContext, optSetMetaContext:
		c.metaContext(opt, data)
	default:
		c.optError(opt, repErrUnsup, "option %d is not supported", opt)
	}
	return nil, nil
}

// startTLS handles NBD_OPT_STARTTLS: ACK, then the TLS handshake on the
// same connection, after which negotiation starts again (what was
// negotiated in plaintext is forgotten, as the specification asks).
func (c *conn) startTLS(data []byte) error {
	switch {
	case c.s.opts.TLS == nil:
		c.optError(optStartTLS, repErrUnsup, "TLS is not configured on this server")
		return nil
	case c.tls:
		c.optError(optStartTLS, repErrInvalid, "TLS is already up")
		return nil
	case len(data) != 0:
		c.optError(optStartTLS, repErrInvalid, "NBD_OPT_STARTTLS takes no data")
		return nil
	}
	c.optReply(optStartTLS, repAck, nil)
	if err := c.hw.Flush(); err != nil {
		return err
	}
	// Bytes sent after STARTTLS but before the TLS handshake would be read
	// as if they came over TLS (a man in the middle could inject options):
	// refuse them.
	if c.br.Buffered() != 0 {
		return fmt.Errorf("%d bytes of plaintext after NBD_OPT_STARTTLS", c.br.Buffered())
	}
	tc := tls.Server(c.raw, c.s.opts.TLS)
	if err := tc.Handshake(); err != nil { // bounded by the handshake deadline
		return fmt.Errorf("TLS handshake: %w", err)
	}
	c.nc, c.tls = tc, true
	c.br = bufio.NewReaderSize(tc, 64<<10)
	c.hw = bufio.NewWriterSize(tc, 4<<10)
	c.structured, c.metaExport = false, nil
	return nil
}

// infoGo handles NBD_OPT_INFO and NBD_OPT_GO.
func (c *conn) infoGo(opt uint32, data []byte) (*export, error) {
	if len(data) < 6 {
		c.optError(opt, repErrInvalid, "option data too short")
		return nil, nil
	}
	nl := be.Uint32(data)
	if uint64(nl) > uint64(len(data))-6 {
		c.optError(opt, repErrInvalid, "export name longer than the option")
		return nil, nil
	}
	name := string(data[4 : 4+nl])
	rest := data[4+nl:]
	nreq := int(be.Uint16(rest))
	if len(rest) != 2+2*nreq {
		c.optError(opt, repErrInvalid, "information request list does not match the option length")
		return nil, nil
	}
	var wantName, wantDesc bool
	for i := range nreq {
		switch be.Uint16(rest[2+2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	e := c.s.lookup(name)
	if e == nil {
		c.optError(opt, repErrUnknown, "no export %q", name)
		return nil, nil
	}
	b := be.AppendUint16(nil, infoExport)
	b = be.AppendUint64(b, uint64(e.size))
	b = be.AppendUint16(b, e.flags(c.structured))
	c.optReply(opt, repInfo, b)
	if wantName || name != e.name {
		c.optReply(opt, repInfo, append(be.AppendUint16(nil, infoName), e.name...))
	}
	if wantDesc && e.desc != "" {
		c.optReply(opt, repInfo, append(be.AppendUint16(nil, infoDescription), e.desc...))
	}
	// Block size constraints: a file takes any alignment; 4 KiB is where
	// page-cache I/O is efficient; payloads up to MaxPayload.
	b = be.AppendUint16(nil, infoBlockSize)
	b = be.AppendUint32(b, 1)
	b = be.AppendUint32(b, 4096)
	b = be.AppendUint32(b, MaxPayload)
	c.optReply(opt, repInfo, b)
	c.optReply(opt, repAck, nil)
	if opt == optGo {
		return e, nil
	}
	return nil, nil
}

// metaContext handles NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT. The only context is base:allocation.
func (c *conn) metaContext(opt uint32, data []byte) {
	set := opt == optSetMetaContext
	if set {
		c.metaExport = nil // replaced even when the option fails
	}
	if !c.structured {
		c.optError(opt, repErrInvalid, "negotiate structured replies first")
		return
	}
	p := data
	str := func() (string, bool) {
		if len(p) < 4 {
			return "", false
		}
		n := be.Uint32(p)
		if uint64(n) > uint64(len(p))-4 {
			return "", false
		}
		s := string(p[4 : 4+n])
		p = p[4+n:]
		return s, true
	}
	name, ok := str()
	if !ok || len(p) < 4 {
		c.optError(opt, repErrInvalid, "malformed meta context request")
		return
	}
	nq := be.Uint32(p)
	p = p[4:]
	var queries []string
	for range nq {
		q, ok := str()
		if !ok {
			c.optError(opt, repErrInvalid, "malformed meta context query")
			return
		}
		queries = append(queries, q)
	}
	if len(p) != 0 {
		c.optError(opt, repErrInvalid, "trailing data after meta context queries")
		return
	}
	e := c.s.lookup(name)
	if e == nil {
		c.optError(opt, repErrUnknown, "no export %q", name)
		return
	}
	match := !set && len(queries) == 0
	for _, q := range queries {
		ns, leaf, ok := strings.Cut(q, ":")
		if !ok {
			c.optError(opt, repErrInvalid, "meta context query %q has no namespace", q)
			return
		}
		if ns != "base" {
			continue // unknown namespaces are ignored
		}
		if leaf == "allocation" || (!set && leaf == "") {
			match = true
		}
	}
	if match {
		id := uint32(0)
		if set {
			id = baseAllocationID
			c.metaExport = e
		}
		c.optReply(opt, repMetaContext, append(be.AppendUint32(nil, id), metaBaseAllocation...))
	}
	c.optReply(opt, repAck, nil)
}

package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"

	"github.com/stowage/stowage/errdefs"
)

// maxOptReply bounds an option reply the client reads into memory.
const maxOptReply = 1 << 20

// handshake negotiates fixed newstyle: structured replies, base:allocation
// and NBD_OPT_GO, falling back to NBD_OPT_EXPORT_NAME on old servers.
func (cc *clientConn) handshake(ctx context.Context, export string) (negotiated, error) {
	n := negotiated{minBlock: 1, maxPayload: MaxPayload}
	var g [18]byte
	if err := readFull(cc.br, g[:16]); err != nil {
		return n, unavailable("greeting", err)
	}
	if be.Uint64(g[:]) != magicInit {
		return n, fmt.Errorf("not an NBD server (magic %#x): %w", be.Uint64(g[:]), errdefs.ErrInvalid)
	}
	if be.Uint64(g[8:]) == magicOldstyle {
		return n, fmt.Errorf("oldstyle NBD servers are not supported: %w", errdefs.ErrNotImplemented)
	}
	if be.Uint64(g[8:]) != magicOpt {
		return n, fmt.Errorf("bad NBD greeting %#x: %w", be.Uint64(g[8:]), errdefs.ErrInvalid)
	}
	if err := readFull(cc.br, g[16:18]); err != nil {
		return n, unavailable("greeting", err)
	}
	hflags := be.Uint16(g[16:])
	var cflags uint32
	if hflags&flagFixedNewstyle != 0 {
		cflags |= flagCFixedNewstyle
	}
	noZeroes := hflags&flagNoZeroes != 0
	if noZeroes {
		cflags |= flagCNoZeroes
	}
	if _, err := cc.nc.Write(be.AppendUint32(nil, cflags)); err != nil {
		return n, unavailable("client flags", err)
	}
	if cfg := cc.cl.tls; cfg != nil {
		if hflags&flagFixedNewstyle == 0 {
			return n, fmt.Errorf("nbds: the server does not speak fixed newstyle, so it has no TLS: %w", errdefs.ErrFailedPrecondition)
		}
		if err := cc.startTLS(ctx, cfg); err != nil {
			return n, err
		}
	} else if hflags&flagFixedNewstyle == 0 {
		return cc.exportName(export, noZeroes, n)
	}

	typ, msg, err := cc.option(optStructuredReply, nil, nil)
	if err != nil {
		return n, err
	}
	if typ == repErrTLSReqd {
		return n, tlsRequired(export, msg)
	}
	n.structured = typ == repAck
	if n.structured {
		q := be.AppendUint32(nil, uint32(len(export)))
		q = append(q, export...)
		q = be.AppendUint32(q, 1)
		q = be.AppendUint32(q, uint32(len(metaBaseAllocation)))
		q = append(q, metaBaseAllocation...)
		typ, _, err := cc.option(optSetMetaContext, q, func(rt uint32, d []byte) error {
			if rt == repMetaContext && len(d) >= 4 && string(d[4:]) == metaBaseAllocation {
				cc.metaID, n.meta = be.Uint32(d), true
			}
			return nil
		})
		if err != nil {
			return n, err
		}
		if typ != repAck {
			n.meta = false
		}
	}

	q := be.AppendUint32(nil, uint32(len(export)))
	q = append(q, export...)
	q = be.AppendUint16(q, 1)
	q = be.AppendUint16(q, infoBlockSize)
	var gotExport bool
	typ, msg, err = cc.option(optGo, q, func(rt uint32, d []byte) error {
		if rt != repInfo || len(d) < 2 {
			return nil
		}
		switch be.Uint16(d) {
		case infoExport:
			if len(d) != 12 {
				return fmt.Errorf("NBD_INFO_EXPORT of %d bytes: %w", len(d), errdefs.ErrInvalid)
			}
			n.size, n.flags, gotExport = int64(be.Uint64(d[2:])), be.Uint16(d[10:]), true
		case infoBlockSize:
			if len(d) != 14 {
				return fmt.Errorf("NBD_INFO_BLOCK_SIZE of %d bytes: %w", len(d), errdefs.ErrInvalid)
			}
			n.minBlock = max(be.Uint32(d[2:]), 1)
			if mp := be.Uint32(d[10:]); mp != 0 {
				n.maxPayload = max(min(mp, MaxPayload), n.minBlock)
			}
		}
		return nil
	})
	if err != nil {
		return n, err
	}
	switch typ {
	case repAck:
		if !gotExport {
			return n, fmt.Errorf("server sent no NBD_INFO_EXPORT: %w", errdefs.ErrInvalid)
		}
		return n, checkExport(&n)
	case repErrUnsup:
		return cc.exportName(export, noZeroes, n)
	case repErrUnknown:
		return n, fmt.Errorf("export %q: %s: %w", export, msg, errdefs.ErrNotFound)
	case repErrTLSReqd:
		return n, tlsRequired(export, msg)
	case repErrPolicy:
		return n, fmt.Errorf("export %q: refused by policy: %s: %w", export, msg, errdefs.ErrPermissionDenied)
	case repErrShutdown:
		return n, fmt.Errorf("export %q: server shutting down: %s: %w", export, msg, errdefs.ErrUnavailable)
	}
	return n, fmt.Errorf("export %q: NBD_OPT_GO failed (%#x): %s: %w", export, typ, msg, errdefs.ErrInvalid)
}

// tlsRequired is the error for a server that answers NBD_REP_ERR_TLS_REQD.
func tlsRequired(export, msg string) error {
	return fmt.Errorf("export %q: the server requires TLS (connect with nbds:// and a TLS config): %s: %w", export, msg, errdefs.ErrPermissionDenied)
}

// startTLS sends NBD_OPT_STARTTLS and runs the TLS handshake on the
// connection; negotiation then goes on inside TLS.
func (cc *clientConn) startTLS(ctx context.Context, cfg *tls.Config) error {
	typ, msg, err := cc.option(optStartTLS, nil, nil)
	if err != nil {
		return err
	}
	switch typ {
	case repAck:
	case repErrUnsup, repErrPolicy:
		return fmt.Errorf("nbds: the server does not offer TLS (NBD_OPT_STARTTLS refused: %s): %w", msg, errdefs.ErrFailedPrecondition)
	default:
		return fmt.Errorf("nbds: NBD_OPT_STARTTLS failed (%#x): %s: %w", typ, msg, errdefs.ErrInvalid)
	}
	if cc.br.Buffered() != 0 {
		return fmt.Errorf("nbds: %d bytes of plaintext after the STARTTLS reply: %w", cc.br.Buffered(), errdefs.ErrInvalid)
	}
	tc := tls.Client(cc.nc, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		var verr *tls.CertificateVerificationError
		if errors.As(err, &verr) {
			return fmt.Errorf("nbds: TLS handshake: %w: %w", err, errdefs.ErrPermissionDenied)
		}
		return fmt.Errorf("nbds: TLS handshake: %w: %w", err, errdefs.ErrUnavailable)
	}
	cc.nc = tc
	cc.br = bufio.NewReaderSize(tc, 256<<10)
	return nil
}

// checkExport validates what the server said about the export. Without
// NBD_FLAG_HAS_FLAGS no other flag means anything.
func checkExport(n *negotiated) error {
	if n.size < 0 {
		return fmt.Errorf("export size %d: %w", n.size, errdefs.ErrInvalid)
	}
	if n.flags&tfHasFlags == 0 {
		n.flags = 0
	}
	return nil
}

// exportName ends the handshake with NBD_OPT_EXPORT_NAME (no error replies:
// the server closes on an unknown export).
func (cc *clientConn) exportName(export string, noZeroes bool, n negotiated) (negotiated, error) {
	b := be.AppendUint64(nil, magicOpt)
	b = be.AppendUint32(b, optExportName)
	b = be.AppendUint32(b, uint32(len(export)))
	b = append(b, export...)
	if _, err := cc.nc.Write(b); err != nil {
		return n, unavailable("NBD_OPT_EXPORT_NAME", err)
	}
	r := make([]byte, 10, 134)
	if !noZeroes {
		r = r[:134]
	}
	if err := readFull(cc.br, r); err != nil {
		return n, fmt.Errorf("export %q: server closed the connection (no such export?): %w", export, errdefs.ErrNotFound)
	}
	n.size, n.flags = int64(be.Uint64(r)), be.Uint16(r[8:])
	return n, checkExport(&n)
}

// option sends one option and reads replies until a final one (ACK or an
// error), passing the others to each. It returns the final reply type and,
// for errors, the server's message.
func (cc *clientConn) option(opt uint32, data []byte, each func(typ uint32, data []byte) error) (uint32, string, error) {
	b := be.AppendUint64(nil, magicOpt)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, uint32(len(data)))
	if _, err := cc.nc.Write(append(b, data...)); err != nil {
		return 0, "", unavailable("option", err)
	}
	var h [optReplyHeaderLen]byte
	for {
		if err := readFull(cc.br, h[:]); err != nil {
			return 0, "", unavailable("option reply", err)
		}
		if be.Uint64(h[:]) != magicOptReply || be.Uint32(h[8:]) != opt {
			return 0, "", fmt.Errorf("bad option reply %x: %w", h, errdefs.ErrInvalid)
		}
		typ, l := be.Uint32(h[12:]), be.Uint32(h[16:])
		if l > maxOptReply {
			return 0, "", fmt.Errorf("option reply of %d bytes: %w", l, errdefs.ErrInvalid)
		}
		d := make([]byte, l)
		if err := readFull(cc.br, d); err != nil {
			return 0, "", unavailable("option reply", err)
		}
		if typ == repAck || typ&repErrBit != 0 {
			return typ, string(d), nil
		}
		if each != nil {
			if err := each(typ, d); err != nil {
				return 0, "", err
			}
		}
	}
}

func unavailable(what string, err error) error {
	return fmt.Errorf("handshake: %s: %w: %w", what, err, errdefs.ErrUnavailable)
}

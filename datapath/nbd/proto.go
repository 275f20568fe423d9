package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"syscall"

	"github.com/stowage/stowage/errdefs"
)

// Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).
// Names follow the specification's, without the NBD_ prefix.
const (
	magicInit       = 0x4e42444d41474943 // "NBDMAGIC"
	magicOldstyle   = 0x00420281861253   // cliserv_magic of the oldstyle handshake
	magicOpt        = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply   = 0x3e889045565a9
	magicRequest    = 0x25609513
	magicSimple     = 0x67446698
	magicStructured = 0x668e33ef

	// handshake flags (server) and client flags
	flagFixedNewstyle  = 1 << 0
	flagNoZeroes       = 1 << 1
	flagCFixedNewstyle = 1 << 0
	flagCNoZeroes      = 1 << 1

	// options
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10

	// option reply types
	repAck          = 1
	repServer       = 2
	repInfo         = 3
	repMetaContext  = 4
	repErrBit       = 1 << 31
	repErrUnsup     = repErrBit | 1
	repErrPolicy    = repErrBit | 2
	repErrInvalid   = repErrBit | 3
	repErrPlatform  = repErrBit | 4
	repErrTLSReqd   = repErrBit | 5
	repErrUnknown   = repErrBit | 6
	repErrShutdown  = repErrBit | 7
	repErrBlockReqd = repErrBit | 8
	repErrTooBig    = repErrBit | 9

	// NBD_INFO types
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3

	// transmission flags
	tfHasFlags        = 1 << 0
	tfReadOnly        = 1 << 1
	tfSendFlush       = 1 << 2
	tfSendFUA         = 1 << 3
	tfRotational      = 1 << 4
	tfSendTrim        = 1 << 5
	tfSendWriteZeroes = 1 << 6
	tfSendDF          = 1 << 7
	tfCanMultiConn    = 1 << 8
	tfSendCache       = 1 << 10
	tfSendFastZero    = 1 << 11

	// commands
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	// command flags
	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4

	// structured replies
	replyFlagDone       = 1 << 0
	replyNone           = 0
	replyOffsetData     = 1
	replyOffsetHole     = 2
	replyBlockStatus    = 5
	replyErrBit         = 1 << 15
	replyError          = replyErrBit | 1
	replyErrorOffset    = replyErrBit | 2
	metaBaseAllocation  = "base:allocation"
	stateHole           = 1 << 0
	stateZero           = 1 << 1
	baseAllocationID    = 1 // our metadata context ID for base:allocation
	requestHeaderLen    = 28
	simpleReplyLen      = 16
	structuredHeaderLen = 20
	optHeaderLen        = 16
	optReplyHeaderLen   = 20

	// errors carried in replies
	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108
)

// Size limits.
const (
	// MaxPayload is the largest READ or WRITE payload we serve or send
	// (2^25, the size every client honours without negotiation).
	MaxPayload = 32 << 20
	// maxString is the protocol's limit on names and messages.
	maxString = 4096
	// maxOptionLen bounds the data of one handshake option we read into
	// memory; larger options are skipped and refused with ERR_TOO_BIG.
	maxOptionLen = 64 << 10
	// maxExtents bounds the descriptors in one BLOCK_STATUS reply.
	maxExtents = 1 << 16
)

var be = binary.BigEndian

// request is a transmission request header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	off    uint64
	length uint32
}

func (r *request) decode(b []byte) (magic uint32) {
	magic = be.Uint32(b[0:])
	r.flags = be.Uint16(b[4:])
	r.typ = be.Uint16(b[6:])
	r.cookie = be.Uint64(b[8:])
	r.off = be.Uint64(b[16:])
	r.length = be.Uint32(b[24:])
	return magic
}

func (r *request) encode(b []byte) []byte {
	b = be.AppendUint32(b, magicRequest)
	b = be.AppendUint16(b, r.flags)
	b = be.AppendUint16(b, r.typ)
	b = be.AppendUint64(b, r.cookie)
	b = be.AppendUint64(b, r.off)
	return be.AppendUint32(b, r.length)
}

func appendSimpleReply(b []byte, errno uint32, cookie uint64) []byte {
	b = be.AppendUint32(b, magicSimple)
	b = be.AppendUint32(b, errno)
	return be.AppendUint64(b, cookie)
}

func appendChunkHeader(b []byte, flags, typ uint16, cookie uint64, length uint32) []byte {
	b = be.AppendUint32(b, magicStructured)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, cookie)
	return be.AppendUint32(b, length)
}

// cmdName names a command for logs and errors.
func cmdName(t uint16) string {
	switch t {
	case cmdRead:
		return "READ"
	case cmdWrite:
		return "WRITE"
	case cmdDisc:
		return "DISC"
	case cmdFlush:
		return "FLUSH"
	case cmdTrim:
		return "TRIM"
	case cmdCache:
		return "CACHE"
	case cmdWriteZeroes:
		return "WRITE_ZEROES"
	case cmdBlockStatus:
		return "BLOCK_STATUS"
	}
	return fmt.Sprintf("command %d", t)
}

// errnoOf maps a backend error to the NBD error a reply carries.
func errnoOf(err error) uint32 {
	var ne *errnoError // from an upstream server: passed on as it came
	if errors.As(err, &ne) {
		return ne.errno
	}
	var en syscall.Errno
	if errors.As(err, &en) {
		switch en {
		case syscall.EPERM, syscall.EACCES, syscall.EROFS:
			return errPerm
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return errNoSpc
		case syscall.EINVAL:
			return errInval
		case syscall.ENOMEM:
			return errNoMem
		case syscall.EOPNOTSUPP:
			return errNotSup
		}
		return errIO
	}
	switch errdefs.Class(err) {
	case errdefs.ErrPermissionDenied:
		return errPerm
	case errdefs.ErrInvalid:
		return errInval
	case errdefs.ErrResourceExhausted:
		return errNoSpc
	case errdefs.ErrNotImplemented:
		return errNotSup
	case errdefs.ErrUnavailable:
		return errShutdown
	}
	return errIO
}

// errnoError is an NBD error received from a server, with its class.
type errnoError struct {
	errno uint32
	msg   string
}

func (e *errnoError) Error() string {
	s := errnoName(e.errno)
	if e.msg != "" {
		s += ": " + e.msg
	}
	return s
}

// Unwrap gives the errdefs class of the server's error.
func (e *errnoError) Unwrap() error {
	switch e.errno {
	case errPerm:
		return errdefs.ErrPermissionDenied
	case errInval, errOverflow:
		return errdefs.ErrInvalid
	case errNoSpc, errNoMem:
		return errdefs.ErrResourceExhausted
	case errNotSup:
		return errdefs.ErrNotImplemented
	case errShutdown:
		return errdefs.ErrUnavailable
	}
	return errdefs.ErrInternal
}

func errnoName(e uint32) string {
	switch e {
	case errPerm:
		return "EPERM"
	case errIO:
		return "EIO"
	case errNoMem:
		return "ENOMEM"
	case errInval:
		return "EINVAL"
	case errNoSpc:
		return "ENOSPC"
	case errOverflow:
		return "EOVERFLOW"
	case errNotSup:
		return "ENOTSUP"
	case errShutdown:
		return "ESHUTDOWN"
	}
	return fmt.Sprintf("error %d", e)
}

// readFull reads exactly len(b) bytes; a connection that ends early gives
// io.ErrUnexpectedEOF (or io.EOF when nothing was read).
func readFull(r io.Reader, b []byte) error {
	_, err := io.ReadFull(r, b)
	return err
}

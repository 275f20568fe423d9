package nbd

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
)

// conn is one client connection: handshake, then a reader that decodes
// requests and hands them to Workers goroutines, which reply under wmu in
// whatever order they finish.
type conn struct {
	s   *Server
	raw net.Conn // the accepted connection
	nc  net.Conn // raw, or the TLS connection over it after STARTTLS
	log *slog.Logger
	br  *bufio.Reader
	hw  *bufio.Writer // handshake only

	// negotiated in the handshake
	noZeroes   bool
	tls        bool // STARTTLS done
	structured bool
	metaExport *export // export base:allocation was selected for
	exp        *export
	blockStat  bool // BLOCK_STATUS allowed

	ctx      context.Context
	cancel   context.CancelFunc
	shutOnce sync.Once

	budget *semaphore.Weighted // payload bytes in flight

	wmu    sync.Mutex
	broken atomic.Bool // a reply could not be written
}

// unixSendBuffer is the SO_SNDBUF asked for on unix connections (the kernel
// caps it at net.core.wmem_max).
const unixSendBuffer = 4 << 20

// job is one request on its way through a worker.
type job struct {
	req    request
	buf    *[]byte // WRITE payload
	weight int64   // bytes held from the server's in-flight budget
}

func (s *Server) handle(ctx context.Context, nc net.Conn) {
	c := &conn{
		s:   s,
		raw: nc,
		nc:  nc,
		log: s.log.With("remote", remoteName(nc)),
		br:  bufio.NewReaderSize(nc, 64<<10),
		hw:  bufio.NewWriterSize(nc, 4<<10),

		budget: semaphore.NewWeighted(s.opts.MaxInFlight),
	}
	if uc, ok := nc.(*net.UnixConn); ok {
		// Unix sockets have no buffer autotuning: with the default
		// 208 KiB one 256 KiB read reply already blocks the writer.
		uc.SetWriteBuffer(unixSendBuffer)
	}
	c.ctx, c.cancel = context.WithCancel(ctx)
	defer c.cancel()
	defer nc.Close()
	stop := context.AfterFunc(c.ctx, c.shutdown)
	defer stop()

	nc.SetDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	e, err := c.handshake()
	if err != nil {
		switch {
		case errors.Is(err, errAbort), clientGone(err) && c.ctx.Err() == nil:
			c.log.Debug("nbd: handshake ended by client", "err", err)
		case c.ctx.Err() != nil:
			c.log.Debug("nbd: handshake interrupted by shutdown", "err", err)
		default:
			c.log.Warn("nbd: handshake failed", "err", err)
		}
		return
	}
	nc.SetDeadline(time.Time{})
	if !e.attach(c) {
		c.log.Debug("nbd: export removed during handshake", "export", e.name)
		return
	}
	defer e.detach(c)
	if c.ctx.Err() != nil {
		return
	}
	c.exp = e
	c.blockStat = c.structured && c.metaExport == e
	c.log = c.log.With("export", e.name)
	c.log.Debug("nbd: transmission", "tls", c.tls, "structured", c.structured, "block_status", c.blockStat)
	if c.transmit() {
		c.closeGracefully()
	}
}

// discDrain bounds how long closeGracefully waits for the client's end of
// the stream after NBD_CMD_DISC.
const discDrain = 2 * time.Second

// closeGracefully ends a connection the client disconnected with
// NBD_CMD_DISC: it says goodbye (a TLS close_notify, or a FIN) and reads
// what the client still sends, up to its end of stream, before the socket
// is closed. Closing at once would leave the client's own goodbye (libnbd
// sends a TLS close_notify after DISC) unread, and the kernel answers
// unread data with a reset, which a client polling at that moment reports
// as "server closed socket unexpectedly".
func (c *conn) closeGracefully() {
	if c.ctx.Err() != nil {
		return
	}
	var err error
	if cw, ok := c.nc.(interface{ CloseWrite() error }); ok {
		c.wmu.Lock()
		c.nc.SetWriteDeadline(time.Now().Add(discDrain))
		err = cw.CloseWrite()
		c.wmu.Unlock()
	}
	if err != nil {
		return
	}
	c.nc.SetReadDeadline(time.Now().Add(discDrain))
	_, _ = io.Copy(io.Discard, io.LimitReader(c.br, 1<<20))
}

// clientGone reports errors that mean the client went away.
func clientGone(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)
}

func remoteName(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" && a.String() != "@" {
		return a.String()
	}
	if a := nc.LocalAddr(); a != nil {
		return "unix:" + a.String()
	}
	return "?"
}

// shutdown stops reading requests; requests in flight get ShutdownGrace to
// reply, then the connection is closed.
func (c *conn) shutdown() {
	c.shutOnce.Do(func() {
		c.cancel()
		// The raw connection: under TLS, closing its read side still lets
		// the replies in flight be written.
		if cr, ok := c.raw.(interface{ CloseRead() error }); ok && cr.CloseRead() == nil {
			time.AfterFunc(c.s.opts.ShutdownGrace, func() { c.raw.Close() })
			return
		}
		c.raw.Close()
	})
}

// transmit runs the transmission phase until the client disconnects, sends
// something that cannot be parsed, or the connection is shut down. It
// reports whether the client disconnected with NBD_CMD_DISC.
func (c *conn) transmit() (disconnected bool) {
	jobs := make(chan *job)
	var wg sync.WaitGroup
	for range c.s.opts.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				c.serve(j)
			}
		}()
	}
	err := c.readLoop(jobs)
	close(jobs)
	wg.Wait()
	switch {
	case err == nil:
		c.log.Debug("nbd: client disconnected")
		return true
	case c.ctx.Err() != nil:
		c.log.Debug("nbd: connection shut down", "err", err)
	case clientGone(err):
		c.log.Debug("nbd: connection closed by client", "err", err)
	default:
		c.log.Warn("nbd: closing connection", "err", err)
	}
	return false
}

// readLoop reads requests and dispatches them; it returns nil on
// NBD_CMD_DISC.
func (c *conn) readLoop(jobs chan<- *job) error {
	var hdr [requestHeaderLen]byte
	for {
		if err := readFull(c.br, hdr[:]); err != nil {
			return err
		}
		var r request
		if m := r.decode(hdr[:]); m != magicRequest {
			return errors.New("bad request magic: " + hexString(m))
		}
		j := &job{req: r}
		switch r.typ {
		case cmdDisc:
			return nil
		case cmdWrite:
			if r.length > MaxPayload {
				// Skip the payload to stay in step with the client, as
				// long as that is not a denial of service.
				if r.length > 2*MaxPayload {
					c.replyError(j, errInval, "write payload larger than 64 MiB")
					return errors.New("write payload too large to skip: " + itoa(int64(r.length)))
				}
				c.nc.SetReadDeadline(time.Now().Add(c.s.opts.IOTimeout))
				_, err := io.CopyN(io.Discard, c.br, int64(r.length))
				c.nc.SetReadDeadline(time.Time{})
				if err != nil {
					return err
				}
				c.replyError(j, errInval, "write payload larger than 32 MiB")
				continue
			}
			if err := c.acquire(j, int64(r.length)); err != nil {
				return err
			}
			j.buf = getBuf(int(r.length))
			c.nc.SetReadDeadline(time.Now().Add(c.s.opts.IOTimeout))
			err := readFull(c.br, *j.buf)
			c.nc.SetReadDeadline(time.Time{})
			if err != nil {
				c.release(j)
				return err
			}
		case cmdRead:
			if r.length <= MaxPayload {
				if err := c.acquire(j, int64(r.length)); err != nil {
					return err
				}
			}
		}
		jobs <- j
	}
}

func (c *conn) acquire(j *job, n int64) error {
	n = min(n, c.s.opts.MaxInFlight)
	if n == 0 {
		return nil
	}
	if err := c.budget.Acquire(c.ctx, n); err != nil {
		return err
	}
	j.weight = n
	return nil
}

// release returns j's buffer and budget.
func (c *conn) release(j *job) {
	putBuf(j.buf)
	j.buf = nil
	if j.weight > 0 {
		c.budget.Release(j.weight)
		j.weight = 0
	}
}

// serve runs one request and replies.
func (c *conn) serve(j *job) {
	defer c.release(j)
	r := &j.req
	e := c.exp
	if errno, msg := c.check(r); errno != 0 {
		c.replyError(j, errno, msg)
		return
	}
	var err error
	switch r.typ {
	case cmdRead:
		c.read(j)
		return
	case cmdWrite:
		if r.flags&cmdFlagFUA != 0 && e.fuaWriter != nil {
			_, err = e.fuaWriter.WriteAtFUA(*j.buf, int64(r.off))
		} else if _, err = e.be.WriteAt(*j.buf, int64(r.off)); err == nil && r.flags&cmdFlagFUA != 0 {
			err = e.be.Sync()
		}
	case cmdFlush:
		err = e.be.Sync()
	case cmdTrim:
		if e.trimmer != nil && r.length > 0 {
			err = e.trimmer.Trim(int64(r.off), int64(r.length))
		}
		if err == nil && r.flags&cmdFlagFUA != 0 {
			err = e.be.Sync()
		}
	case cmdWriteZeroes:
		if errno := c.writeZeroes(r); errno != 0 {
			c.replyError(j, errno, "")
			return
		}
		c.replyOK(j)
		return
	case cmdCache:
		if e.cacher != nil && r.length > 0 {
			err = e.cacher.Cache(int64(r.off), int64(r.length))
		}
	case cmdBlockStatus:
		c.blockStatus(j)
		return
	}
	if err != nil {
		c.log.Error("nbd: request failed", "cmd", cmdName(r.typ), "offset", r.off, "length", r.length, "err", err)
		c.replyError(j, errnoOf(err), err.Error())
		return
	}
	c.replyOK(j)
}

// check validates a request against the protocol and the export; a
// non-zero errno is the reply.
func (c *conn) check(r *request) (uint32, string) {
	e := c.exp
	allowed := uint16(cmdFlagFUA)
	switch r.typ {
	case cmdRead:
		if c.structured {
			allowed |= cmdFlagDF
		}
	case cmdWriteZeroes:
		allowed |= cmdFlagNoHole
		if e.zeroer != nil {
			allowed |= cmdFlagFastZero
		}
	case cmdBlockStatus:
		allowed |= cmdFlagReqOne
	case cmdWrite, cmdFlush, cmdTrim, cmdCache:
	default:
		return errInval, "unknown command " + itoa(int64(r.typ))
	}
	if r.flags&^allowed != 0 {
		return errInval, "flags " + hexString(uint32(r.flags)) + " are not valid for " + cmdName(r.typ)
	}
	switch r.typ {
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		if e.ro {
			return errPerm, "the export is read-only"
		}
	case cmdBlockStatus:
		if !c.blockStat {
			return errInval, "no metadata context was negotiated"
		}
		if r.length == 0 {
			return errInval, "zero-length block status"
		}
	case cmdFlush:
		return 0, ""
	}
	if r.off > uint64(e.size) || uint64(r.length) > uint64(e.size)-r.off {
		if r.typ == cmdWrite || r.typ == cmdWriteZeroes {
			return errNoSpc, "request beyond the end of the export"
		}
		return errInval, "request beyond the end of the export"
	}
	if r.typ == cmdRead && r.length > MaxPayload {
		if c.structured {
			return errOverflow, "read larger than 32 MiB"
		}
		return errInval, "read larger than 32 MiB"
	}
	return 0, ""
}

var zeros = make([]byte, 1<<20)

// writeZeroes zeroes a range: fallocate where the backend can, writes of
// zeros otherwise (never with NBD_CMD_FLAG_FAST_ZERO).
func (c *conn) writeZeroes(r *request) uint32 {
	e := c.exp
	off, n := int64(r.off), int64(r.length)
	var err error
	if n > 0 {
		err = errdefs.ErrNotImplemented
		if e.zeroer != nil {
			err = e.zeroer.ZeroRange(off, n, r.flags&cmdFlagNoHole == 0)
		}
		if errors.Is(err, errdefs.ErrNotImplemented) {
			if r.flags&cmdFlagFastZero != 0 {
				return errNotSup
			}
			err = nil
			for n > 0 && err == nil {
				k := min(n, int64(len(zeros)))
				_, err = e.be.WriteAt(zeros[:k], off)
				off, n = off+k, n-k
			}
		}
	}
	if err == nil && r.flags&cmdFlagFUA != 0 {
		err = e.be.Sync()
	}
	if err != nil {
		c.log.Error("nbd: write zeroes failed", "offset", r.off, "length", r.length, "err", err)
		return errnoOf(err)
	}
	return 0
}

// read serves NBD_CMD_READ. All data is read before anything is sent, so a
// failed read is an error reply, never a success followed by a disconnect.
// With structured replies, holes go out as NBD_REPLY_TYPE_OFFSET_HOLE.
func (c *conn) read(j *job) {
	r := &j.req
	e := c.exp
	off, n := int64(r.off), int64(r.length)
	if n == 0 {
		c.replyOK(j)
		return
	}
	exts := []stream.Extent{{Off: off, Len: n}}
	if c.structured && r.flags&cmdFlagDF == 0 && e.extenter != nil && !e.skipHoles {
		if x, err := e.extenter.Extents(c.ctx, off, n, 1024); err == nil && len(x) > 0 && covers(x, off, n) {
			exts = x
		}
	}
	buf := getBuf(int(n))
	defer putBuf(buf)
	b := *buf
	for _, x := range exts {
		if x.Hole {
			continue
		}
		if _, err := e.be.ReadAt(b[x.Off-off:x.End()-off], x.Off); err != nil {
			c.log.Error("nbd: read failed", "offset", x.Off, "length", x.Len, "err", err)
			c.replyError(j, errnoOf(err), "read failed: "+err.Error())
			return
		}
	}
	if !c.structured {
		hb := appendSimpleReply(make([]byte, 0, simpleReplyLen), 0, r.cookie)
		c.send(net.Buffers{hb, b})
		return
	}
	hb := make([]byte, 0, len(exts)*(structuredHeaderLen+12))
	bufs := make(net.Buffers, 0, 2*len(exts))
	for i, x := range exts {
		var fl uint16
		if i == len(exts)-1 {
			fl = replyFlagDone
		}
		start := len(hb)
		if x.Hole {
			hb = appendChunkHeader(hb, fl, replyOffsetHole, r.cookie, 12)
			hb = be.AppendUint64(hb, uint64(x.Off))
			hb = be.AppendUint32(hb, uint32(x.Len))
			bufs = append(bufs, hb[start:])
			continue
		}
		hb = appendChunkHeader(hb, fl, replyOffsetData, r.cookie, uint32(8+x.Len))
		hb = be.AppendUint64(hb, uint64(x.Off))
		bufs = append(bufs, hb[start:], b[x.Off-off:x.End()-off])
	}
	c.send(bufs)
}

// covers reports whether exts tile [off, off+n) exactly.
func covers(exts []stream.Extent, off, n int64) bool {
	pos := off
	for _, x := range exts {
		if x.Off != pos || x.Len <= 0 {
			return false
		}
		pos = x.End()
	}
	return pos == off+n
}

// blockStatus serves NBD_CMD_BLOCK_STATUS for base:allocation.
func (c *conn) blockStatus(j *job) {
	r := &j.req
	e := c.exp
	off, n := int64(r.off), int64(r.length)
	max := maxExtents
	if r.flags&cmdFlagReqOne != 0 {
		max = 1
	}
	exts := []stream.Extent{{Off: off, Len: n}}
	if e.extenter != nil {
		x, err := e.extenter.Extents(c.ctx, off, n, max)
		if err != nil {
			if c.ctx.Err() != nil {
				c.replyError(j, errShutdown, "server shutting down")
				return
			}
			// Not invalid usage: report the range as allocated data.
			c.log.Warn("nbd: block status", "offset", off, "length", n, "err", err)
		} else if len(x) > 0 {
			exts = x
		}
	}
	if len(exts) > max {
		exts = exts[:max]
	}
	b := appendChunkHeader(make([]byte, 0, structuredHeaderLen+4+8*len(exts)), replyFlagDone, replyBlockStatus, r.cookie, uint32(4+8*len(exts)))
	b = be.AppendUint32(b, baseAllocationID)
	for _, x := range exts {
		l := min(x.End(), off+n) - max64(x.Off, off)
		if l <= 0 {
			break
		}
		var st uint32
		if x.Hole {
			st = stateHole | stateZero
		}
		b = be.AppendUint32(b, uint32(l))
		b = be.AppendUint32(b, st)
	}
	// fix the length if the loop stopped early
	be.PutUint32(b[16:], uint32(len(b)-structuredHeaderLen))
	c.send(net.Buffers{b})
}

func max64(a, b int64) int64 {
	if a > b {
		return a
	}
	return b
}

// replyOK sends a success reply without payload.
func (c *conn) replyOK(j *job) {
	if c.structured && j.req.typ == cmdRead {
		c.send(net.Buffers{appendChunkHeader(nil, replyFlagDone, replyNone, j.req.cookie, 0)})
		return
	}
	c.send(net.Buffers{appendSimpleReply(make([]byte, 0, simpleReplyLen), 0, j.req.cookie)})
}

// replyError sends an error reply: a structured error chunk with msg when
// structured replies were negotiated, a simple reply otherwise.
func (c *conn) replyError(j *job, errno uint32, msg string) {
	if !c.structured {
		c.send(net.Buffers{appendSimpleReply(make([]byte, 0, simpleReplyLen), errno, j.req.cookie)})
		return
	}
	if len(msg) > maxString {
		msg = msg[:maxString]
	}
	b := appendChunkHeader(make([]byte, 0, structuredHeaderLen+6+len(msg)), replyFlagDone, replyError, j.req.cookie, uint32(6+len(msg)))
	b = be.AppendUint32(b, errno)
	b = be.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	c.send(net.Buffers{b})
}

// send writes one whole reply. A failed write closes the connection: the
// client cannot tell where the next reply starts.
func (c *conn) send(bufs net.Buffers) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.broken.Load() {
		return
	}
	c.nc.SetWriteDeadline(time.Now().Add(c.s.opts.IOTimeout))
	if _, err := bufs.WriteTo(c.nc); err != nil {
		c.broken.Store(true)
		if c.ctx.Err() == nil {
			c.log.Debug("nbd: write reply", "err", err)
		}
		c.cancel()
		c.raw.Close()
	}
}

package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/redact"
)

// ClientOptions tune Dial. The zero value is a good default.
type ClientOptions struct {
	// Connections is how many connections to open (1). Extra connections
	// are opened only when the server advertises NBD_FLAG_CAN_MULTI_CONN.
	Connections int
	// Logger receives connection records (slog.Default() if nil).
	Logger *slog.Logger
	// TLS is the configuration nbds:// and nbds+unix:// URLs connect with
	// (NBD_OPT_STARTTLS, then a TLS handshake on the same connection):
	// its RootCAs to verify the server, Certificates or
	// GetClientCertificate when the server asks for a client certificate.
	// An empty ServerName is filled in from the URL's host (nbds+unix://
	// has none: set ServerName, as libnbd's tls-hostname). Nil: nbds://
	// verifies the server against the system roots. nbd:// never uses it.
	TLS *tls.Config
}

// Client is a userspace NBD client for one export: several connections,
// each with many requests in flight. Its methods are safe for concurrent
// use. A connection that fails is not reopened; requests then go to the
// remaining ones, and fail with errdefs.ErrUnavailable when none is left.
type Client struct {
	target     string // redacted URL, for errors
	export     string
	size       int64
	flags      uint16
	structured bool
	meta       bool // base:allocation negotiated
	minBlock   uint32
	maxPayload uint32
	log        *slog.Logger
	tls        *tls.Config // nil: plaintext

	conns  []*clientConn
	next   atomic.Uint64
	ctx    context.Context // ends at Close; used by calls without a context
	cancel context.CancelFunc
	closed atomic.Bool
}

// negotiated is what one handshake established.
type negotiated struct {
	size       int64
	flags      uint16
	structured bool
	metaID     uint32
	meta       bool
	minBlock   uint32
	maxPayload uint32
}

// endpoint is where a URL points.
type endpoint struct {
	network, addr, export string
	tls                   bool   // nbds, nbds+unix: STARTTLS first
	serverName            string // host name of the URL, for TLS
}

// parseURL reads nbd[s]://host[:port]/export and
// nbd[s]+unix:///export?socket=path (the NBD URI format of libnbd and qemu).
func parseURL(raw string) (*url.URL, endpoint, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, endpoint{}, fmt.Errorf("NBD URL %q: %w", raw, errdefs.ErrInvalid)
	}
	ep, err := endpointOf(u)
	return u, ep, err
}

func endpointOf(u *url.URL) (endpoint, error) {
	ep := endpoint{export: strings.TrimPrefix(u.Path, "/")}
	scheme := strings.ToLower(u.Scheme)
	switch scheme {
	case "nbds":
		scheme, ep.tls = "nbd", true
	case "nbds+unix":
		scheme, ep.tls = "nbd+unix", true
	}
	switch scheme {
	case "nbd":
		ep.network = "tcp"
		host := u.Host
		if host == "" {
			return ep, fmt.Errorf("NBD URL %s: no host: %w", redact.URL(u.String()), errdefs.ErrInvalid)
		}
		if u.Port() == "" {
			host = net.JoinHostPort(u.Hostname(), "10809")
		}
		ep.addr = host
		ep.serverName = u.Hostname()
	case "nbd+unix":
		ep.network = "unix"
		ep.addr = u.Query().Get("socket")
		if ep.addr == "" || u.Host != "" {
			return ep, fmt.Errorf("NBD URL %s: want %s:///EXPORT?socket=PATH: %w", redact.URL(u.String()), u.Scheme, errdefs.ErrInvalid)
		}
	default:
		return ep, fmt.Errorf("URL %s: not an NBD URL (nbd://, nbds://, nbd+unix:// or nbds+unix://): %w", redact.URL(u.String()), errdefs.ErrInvalid)
	}
	return ep, nil
}

// Dial connects to the export a URL names and negotiates structured
// replies and base:allocation when the server has them.
func Dial(ctx context.Context, rawURL string, opts ClientOptions) (*Client, error) {
	u, ep, err := parseURL(rawURL)
	if err != nil {
		return nil, err
	}
	return dial(ctx, u, ep, opts)
}

func dial(ctx context.Context, u *url.URL, ep endpoint, opts ClientOptions) (*Client, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	c := &Client{target: redact.URL(u.String()), export: ep.export, log: opts.Logger.With("nbd", redact.URL(u.String()))}
	if ep.tls {
		c.tls = tlsConfig(opts.TLS, ep.serverName)
	}
	first, n, err := c.connect(ctx, ep)
	if err != nil {
		return nil, err
	}
	c.size, c.flags, c.structured, c.meta = n.size, n.flags, n.structured, n.meta
	c.minBlock, c.maxPayload = n.minBlock, n.maxPayload
	c.conns = []*clientConn{first}
	want := max(opts.Connections, 1)
	if want > 1 && c.flags&tfCanMultiConn != 0 {
		more := make([]*clientConn, want-1)
		errs := make([]error, want-1)
		var wg sync.WaitGroup
		for i := range more {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cc, n2, err := c.connect(ctx, ep)
				if err == nil && (n2.size != n.size || n2.flags != n.flags || n2.meta != n.meta) {
					cc.close()
					err = fmt.Errorf("nbd %s: connections disagree on the export: %w", c.target, errdefs.ErrUnavailable)
				}
				more[i], errs[i] = cc, err
			}()
		}
		wg.Wait()
		for i, cc := range more {
			if errs[i] != nil {
				for _, x := range append(c.conns, more...) {
					if x != nil {
						x.close()
					}
				}
				return nil, errs[i]
			}
			c.conns = append(c.conns, cc)
		}
	}
	c.ctx, c.cancel = context.WithCancel(context.WithoutCancel(ctx))
	for _, cc := range c.conns {
		go cc.readLoop()
	}
	return c, nil
}

// connect opens and negotiates one connection; ctx bounds the handshake.
func (c *Client) connect(ctx context.Context, ep endpoint) (*clientConn, negotiated, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, ep.network, ep.addr)
	if err != nil {
		return nil, negotiated{}, fmt.Errorf("nbd %s: %w: %w", c.target, err, errdefs.ErrUnavailable)
	}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	cc := &clientConn{cl: c, nc: nc, br: bufio.NewReaderSize(nc, 256<<10), pending: map[uint64]*call{}, abandoned: map[uint64]*call{}, done: make(chan struct{})}
	n, err := cc.handshake(ctx, ep.export)
	if !stop() || ctx.Err() != nil {
		nc.Close()
		return nil, n, fmt.Errorf("nbd %s: handshake: %w", c.target, context.Cause(ctx))
	}
	if err != nil {
		nc.Close()
		return nil, n, fmt.Errorf("nbd %s: %w", c.target, err)
	}
	nc.SetDeadline(time.Time{})
	return cc, n, nil
}

// tlsConfig is the config a connection to serverName starts TLS with.
func tlsConfig(cfg *tls.Config, serverName string) *tls.Config {
	if cfg == nil {
		cfg = &tls.Config{}
	}
	if cfg.ServerName == "" && serverName != "" {
		cfg = cfg.Clone()
		cfg.ServerName = serverName
	}
	return cfg
}

// Size is the export size in bytes.
func (c *Client) Size() int64 { return c.size }

// ReadOnly reports whether the server refuses writes.
func (c *Client) ReadOnly() bool { return c.flags&tfReadOnly != 0 }

// CanMultiConn reports whether the server allows several connections.
func (c *Client) CanMultiConn() bool { return c.flags&tfCanMultiConn != 0 }

// Connections is the number of open connections.
func (c *Client) Connections() int { return len(c.conns) }

// HasBlockStatus reports whether BlockStatus asks the server (otherwise it
// reports everything as data).
func (c *Client) HasBlockStatus() bool { return c.meta }

// Close disconnects (NBD_CMD_DISC on every connection) and waits for the
// connections to end.
func (c *Client) Close() error {
	if !c.closed.CompareAndSwap(false, true) {
		return nil
	}
	for _, cc := range c.conns {
		cc.disconnect()
	}
	c.cancel()
	return nil
}

// conn picks a healthy connection, round robin.
func (c *Client) conn() (*clientConn, error) {
	if c.closed.Load() {
		return nil, fmt.Errorf("nbd %s: client closed: %w", c.target, errdefs.ErrFailedPrecondition)
	}
	n := uint64(len(c.conns))
	start := c.next.Add(1)
	var last error
	for i := range n {
		cc := c.conns[(start+i)%n]
		if err := cc.failed(); err != nil {
			last = err
			continue
		}
		return cc, nil
	}
	return nil, last
}

// pieces splits [off, off+n) into requests of at most max bytes, aligned to
// the server's minimum block size where the range allows it.
func pieces(off, n, max int64, fn func(off, n int64) error) error {
	for n > 0 {
		k := min(n, max)
		if err := fn(off, k); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

func (c *Client) checkRange(op string, off, n int64) error {
	if off < 0 || n < 0 || off > c.size || n > c.size-off {
		return fmt.Errorf("nbd %s: %s [%d,+%d) outside the export (size %d): %w", c.target, op, off, n, c.size, errdefs.ErrInvalid)
	}
	return nil
}

// ReadAt reads len(p) bytes at off (io.ReaderAt); it is cancelled by Close.
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	return c.ReadAtContext(c.ctx, p, off)
}

// ReadAtContext reads len(p) bytes at off. Reads larger than the server's
// maximum payload are split and sent in parallel.
func (c *Client) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if err := c.checkRange("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	if int64(len(p)) <= int64(c.maxPayload) {
		if err := c.read(ctx, p, off); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	pieces(off, int64(len(p)), int64(c.maxPayload), func(o, k int64) error {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.read(ctx, p[o-off:o-off+k], o); err != nil {
				mu.Lock()
				first = cmpErr(first, err)
				mu.Unlock()
			}
		}()
		return nil
	})
	wg.Wait()
	if first != nil {
		return 0, first
	}
	return len(p), nil
}

func cmpErr(a, b error) error {
	if a == nil {
		return b
	}
	return a
}

func (c *Client) read(ctx context.Context, p []byte, off int64) error {
	cc, err := c.conn()
	if err != nil {
		return err
	}
	_, err = cc.do(ctx, request{typ: cmdRead, off: uint64(off), length: uint32(len(p))}, nil, p)
	return c.wrap("read", off, int64(len(p)), err)
}

func (c *Client) wrap(op string, off, n int64, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("nbd %s: %s [%d,+%d): %w", c.target, op, off, n, err)
}

// WriteAt writes p at off (io.WriterAt); it is cancelled by Close.
func (c *Client) WriteAt(p []byte, off int64) (int, error) {
	return c.WriteAtContext(c.ctx, p, off, false)
}

// WriteAtContext writes p at off; with fua the reply waits until the data
// is durable.
func (c *Client) WriteAtContext(ctx context.Context, p []byte, off int64, fua bool) (int, error) {
	if err := c.checkRange("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	var flags uint16
	if fua && c.flags&tfSendFUA != 0 {
		flags = cmdFlagFUA
	}
	err := pieces(off, int64(len(p)), int64(c.maxPayload), func(o, k int64) error {
		cc, err := c.conn()
		if err != nil {
			return err
		}
		_, err = cc.do(ctx, request{typ: cmdWrite, flags: flags, off: uint64(o), length: uint32(k)}, p[o-off:o-off+k], nil)
		return c.wrap("write", o, k, err)
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// ZeroOptions tune Zero.
type ZeroOptions struct {
	// NoHole keeps the range allocated (NBD_CMD_FLAG_NO_HOLE); without it
	// the server may punch a hole.
	NoHole bool
	// FUA waits until the zeroes are durable.
	FUA bool
}

// maxEffect bounds the length of one request without payload.
const maxEffect = 1 << 30

// Zero makes [off, off+n) read as zeros: NBD_CMD_WRITE_ZEROES when the
// server has it, writes of zeros otherwise.
func (c *Client) Zero(ctx context.Context, off, n int64, zo ZeroOptions) error {
	if err := c.checkRange("zero", off, n); err != nil {
		return err
	}
	if c.flags&tfSendWriteZeroes == 0 {
		return pieces(off, n, int64(min(c.maxPayload, uint32(len(zeros)))), func(o, k int64) error {
			_, err := c.WriteAtContext(ctx, zeros[:k], o, zo.FUA)
			return err
		})
	}
	var flags uint16
	if zo.NoHole {
		flags |= cmdFlagNoHole
	}
	if zo.FUA && c.flags&tfSendFUA != 0 {
		flags |= cmdFlagFUA
	}
	return pieces(off, n, maxEffect, func(o, k int64) error {
		cc, err := c.conn()
		if err != nil {
			return err
		}
		_, err = cc.do(ctx, request{typ: cmdWriteZeroes, flags: flags, off: uint64(o), length: uint32(k)}, nil, nil)
		return c.wrap("write zeroes", o, k, err)
	})
}

// Trim discards a range (a hint; a server without TRIM ignores it).
func (c *Client) Trim(ctx context.Context, off, n int64) error {
	if err := c.checkRange("trim", off, n); err != nil {
		return err
	}
	if c.flags&tfSendTrim == 0 {
		return nil
	}
	return pieces(off, n, maxEffect, func(o, k int64) error {
		cc, err := c.conn()
		if err != nil {
			return err
		}
		_, err = cc.do(ctx, request{typ: cmdTrim, off: uint64(o), length: uint32(k)}, nil, nil)
		return c.wrap("trim", o, k, err)
	})
}

// Flush makes every completed write durable. With several connections it
// flushes through one (the server said a flush covers all of them).
func (c *Client) Flush(ctx context.Context) error {
	if c.flags&tfSendFlush == 0 {
		return nil
	}
	cc, err := c.conn()
	if err != nil {
		return err
	}
	_, err = cc.do(ctx, request{typ: cmdFlush}, nil, nil)
	if err != nil {
		return fmt.Errorf("nbd %s: flush: %w", c.target, err)
	}
	return nil
}

// BlockStatus lists [off, off+n) as data and holes (base:allocation; a
// range is a Hole when it reads as zeros). Without block status support
// the whole range is one data extent.
func (c *Client) BlockStatus(ctx context.Context, off, n int64) ([]stream.Extent, error) {
	if err := c.checkRange("block status", off, n); err != nil {
		return nil, err
	}
	if !c.meta || n == 0 {
		if n == 0 {
			return nil, nil
		}
		return []stream.Extent{{Off: off, Len: n}}, nil
	}
	var out []stream.Extent
	end := off + n
	pos := off
	for pos < end {
		k := min(end-pos, 1<<31)
		cc, err := c.conn()
		if err != nil {
			return nil, err
		}
		call, err := cc.do(ctx, request{typ: cmdBlockStatus, off: uint64(pos), length: uint32(k)}, nil, nil)
		if err != nil {
			return nil, c.wrap("block status", pos, k, err)
		}
		progress := false
		for _, x := range call.exts {
			if x.Off != pos || pos >= end {
				break
			}
			x.Len = min(x.Len, end-pos)
			if l := len(out) - 1; l >= 0 && out[l].Hole == x.Hole {
				out[l].Len += x.Len
			} else {
				out = append(out, x)
			}
			pos += x.Len
			progress = true
		}
		if !progress {
			return nil, fmt.Errorf("nbd %s: block status at %d made no progress: %w", c.target, pos, errdefs.ErrInternal)
		}
	}
	return out, nil
}

// clientConn is one connection: requests are written whole under wmu, a
// reader goroutine matches replies to calls by cookie.
type clientConn struct {
	cl     *Client
	nc     net.Conn
	br     *bufio.Reader
	metaID uint32

	wmu     sync.Mutex
	dlMu    sync.Mutex // guards writer and the write deadline
	writer  *call      // call whose request is being written
	discOne sync.Once

	mu        sync.Mutex
	cookie    uint64
	pending   map[uint64]*call
	abandoned map[uint64]*call // calls whose caller gave up; replies are discarded
	err       error            // set when the connection failed
	done      chan struct{}    // closed when readLoop ends
}

// call is one request waiting for its reply.
type call struct {
	req       request
	buf       []byte // READ destination
	covered   int64  // READ bytes received
	exts      []stream.Extent
	err       error
	receiving bool // the reader is filling buf
	done      chan struct{}
}

func (cc *clientConn) failed() error {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return cc.err
}

// fail ends the connection and every call on it.
func (cc *clientConn) fail(err error) {
	cc.mu.Lock()
	if cc.err == nil {
		cc.err = fmt.Errorf("nbd %s: connection lost: %w: %w", cc.cl.target, err, errdefs.ErrUnavailable)
		for k, c := range cc.pending {
			if !c.receiving {
				c.err = cc.err
				close(c.done)
				delete(cc.pending, k)
			}
		}
	}
	cc.mu.Unlock()
	cc.nc.Close()
}

func (cc *clientConn) close() { cc.nc.Close() }

// drain ends every call still waiting once the reader has stopped (none is
// being filled any more).
func (cc *clientConn) drain() {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	for k, c := range cc.pending {
		c.err = cc.err
		c.receiving = false
		close(c.done)
		delete(cc.pending, k)
	}
}

// disconnect sends NBD_CMD_DISC and waits (briefly) for the server to close.
func (cc *clientConn) disconnect() {
	cc.discOne.Do(func() {
		if cc.failed() == nil {
			cc.wmu.Lock()
			cc.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
			q := request{typ: cmdDisc}
			cc.nc.Write(q.encode(nil))
			cc.wmu.Unlock()
		}
		select {
		case <-cc.done:
		case <-time.After(5 * time.Second):
		}
		cc.fail(errors.New("disconnected"))
		<-cc.done
	})
}

// do sends a request (with payload for WRITE) and waits for its reply; buf
// receives READ data. When ctx ends first the call is abandoned: its reply
// is discarded when it comes.
func (cc *clientConn) do(ctx context.Context, q request, payload, buf []byte) (*call, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	c := &call{req: q, buf: buf, done: make(chan struct{})}
	cc.mu.Lock()
	if cc.err != nil {
		cc.mu.Unlock()
		return nil, cc.err
	}
	cc.cookie++
	c.req.cookie = cc.cookie
	cc.pending[c.req.cookie] = c
	cc.mu.Unlock()

	if err := cc.send(ctx, c, payload); err != nil {
		cc.fail(err)
		<-c.done
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, c.err
	}
	select {
	case <-c.done:
		return c, c.err
	case <-ctx.Done():
	}
	cc.mu.Lock()
	if _, ok := cc.pending[c.req.cookie]; ok && !c.receiving {
		delete(cc.pending, c.req.cookie)
		cc.abandoned[c.req.cookie] = c
		cc.mu.Unlock()
		return nil, ctx.Err()
	}
	receiving := c.receiving
	cc.mu.Unlock()
	if receiving {
		// The reader is copying into buf: only a closed connection stops
		// it for sure.
		cc.fail(ctx.Err())
	}
	<-c.done
	if c.err != nil {
		return nil, ctx.Err()
	}
	return c, nil
}

// send writes a request; ctx ending mid-write breaks the connection.
func (cc *clientConn) send(ctx context.Context, c *call, payload []byte) error {
	cc.wmu.Lock()
	defer cc.wmu.Unlock()
	cc.dlMu.Lock()
	cc.writer = c
	cc.dlMu.Unlock()
	stop := context.AfterFunc(ctx, func() {
		cc.dlMu.Lock()
		if cc.writer == c {
			cc.nc.SetWriteDeadline(time.Unix(1, 0))
		}
		cc.dlMu.Unlock()
	})
	hdr := c.req.encode(make([]byte, 0, requestHeaderLen))
	bufs := net.Buffers{hdr}
	if len(payload) > 0 {
		bufs = append(bufs, payload)
	}
	_, err := bufs.WriteTo(cc.nc)
	stop()
	cc.dlMu.Lock()
	cc.writer = nil
	cc.nc.SetWriteDeadline(time.Time{})
	cc.dlMu.Unlock()
	return err
}

// readLoop reads replies until the connection ends.
func (cc *clientConn) readLoop() {
	defer close(cc.done)
	defer cc.drain()
	for {
		if err := cc.readReply(); err != nil {
			cc.fail(err)
			return
		}
	}
}

// claim finds the call a reply is for and marks it receiving; abandoned
// calls come back with discard set.
func (cc *clientConn) claim(cookie uint64) (c *call, discard bool, err error) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if c = cc.pending[cookie]; c != nil {
		c.receiving = true
		return c, false, nil
	}
	if c = cc.abandoned[cookie]; c != nil {
		return c, true, nil
	}
	return nil, false, fmt.Errorf("reply for unknown cookie %d", cookie)
}

// finish ends a call (final reply received).
func (cc *clientConn) finish(c *call, discard bool) {
	cc.mu.Lock()
	if discard {
		delete(cc.abandoned, c.req.cookie)
		cc.mu.Unlock()
		return
	}
	delete(cc.pending, c.req.cookie)
	c.receiving = false
	cc.mu.Unlock()
	close(c.done)
}

func (cc *clientConn) unclaim(c *call, discard bool) {
	if discard {
		return
	}
	cc.mu.Lock()
	c.receiving = false
	cc.mu.Unlock()
}

var errProto = errors.New("protocol error")

func (cc *clientConn) readReply() error {
	var h [structuredHeaderLen]byte
	if err := readFull(cc.br, h[:4]); err != nil {
		return err
	}
	switch m := be.Uint32(h[:]); m {
	case magicSimple:
		if err := readFull(cc.br, h[4:simpleReplyLen]); err != nil {
			return err
		}
		errno, cookie := be.Uint32(h[4:]), be.Uint64(h[8:])
		c, discard, err := cc.claim(cookie)
		if err != nil {
			return err
		}
		if errno != 0 {
			c.err = &errnoError{errno: errno}
		} else if c.req.typ == cmdRead {
			if cc.cl.structured {
				return fmt.Errorf("%w: simple reply to a read after structured replies were negotiated", errProto)
			}
			dst := c.buf
			if discard {
				dst = nil
			}
			if err := readInto(cc.br, dst, int64(c.req.length)); err != nil {
				return err
			}
		}
		cc.finish(c, discard)
		return nil
	case magicStructured:
		if err := readFull(cc.br, h[4:]); err != nil {
			return err
		}
		flags, typ, cookie, length := be.Uint16(h[4:]), be.Uint16(h[6:]), be.Uint64(h[8:]), be.Uint32(h[16:])
		c, discard, err := cc.claim(cookie)
		if err != nil {
			return err
		}
		if err := cc.chunk(c, discard, typ, length); err != nil {
			return err
		}
		if flags&replyFlagDone != 0 {
			if c.err == nil && c.req.typ == cmdRead && c.covered != int64(c.req.length) {
				c.err = fmt.Errorf("%w: read reply covers %d of %d bytes", errProto, c.covered, c.req.length)
			}
			if c.err == nil && c.req.typ == cmdBlockStatus && len(c.exts) == 0 {
				c.err = fmt.Errorf("%w: block status reply without extents", errProto)
			}
			cc.finish(c, discard)
		} else {
			cc.unclaim(c, discard)
		}
		return nil
	default:
		return fmt.Errorf("%w: reply magic %#x", errProto, m)
	}
}

// readInto reads n bytes into dst, or discards them when dst is nil.
func readInto(r io.Reader, dst []byte, n int64) error {
	if dst == nil {
		_, err := io.CopyN(io.Discard, r, n)
		return err
	}
	return readFull(r, dst[:n])
}

// chunk reads the payload of one structured reply chunk for c.
func (cc *clientConn) chunk(c *call, discard bool, typ uint16, length uint32) error {
	switch typ {
	case replyNone:
		if length != 0 {
			return fmt.Errorf("%w: NONE chunk with payload", errProto)
		}
		return nil
	case replyOffsetData, replyOffsetHole:
		if c.req.typ != cmdRead || length < 9 || (typ == replyOffsetHole && length != 12) {
			return fmt.Errorf("%w: bad content chunk (type %d, %d bytes)", errProto, typ, length)
		}
		var b [12]byte
		if err := readFull(cc.br, b[:8]); err != nil {
			return err
		}
		off := be.Uint64(b[:])
		n := uint64(length) - 8
		if typ == replyOffsetHole {
			if err := readFull(cc.br, b[8:12]); err != nil {
				return err
			}
			n = uint64(be.Uint32(b[8:]))
		}
		if off < c.req.off || n == 0 || n > uint64(c.req.length) || off-c.req.off > uint64(c.req.length)-n {
			return fmt.Errorf("%w: content chunk [%d,+%d) outside the request", errProto, off, n)
		}
		rel := off - c.req.off
		if typ == replyOffsetHole {
			if !discard {
				clear(c.buf[rel : rel+n])
			}
		} else {
			var dst []byte
			if !discard {
				dst = c.buf[rel:]
			}
			if err := readInto(cc.br, dst, int64(n)); err != nil {
				return err
			}
		}
		c.covered += int64(n)
		return nil
	case replyBlockStatus:
		if c.req.typ != cmdBlockStatus || length < 12 || (length-4)%8 != 0 || length > 4+8*(1<<20) {
			return fmt.Errorf("%w: bad block status chunk (%d bytes)", errProto, length)
		}
		b := make([]byte, length)
		if err := readFull(cc.br, b); err != nil {
			return err
		}
		if be.Uint32(b) != cc.metaID {
			return nil // a context we did not ask for
		}
		pos := int64(c.req.off)
		for p := b[4:]; len(p) >= 8; p = p[8:] {
			l, st := int64(be.Uint32(p)), be.Uint32(p[4:])
			if l == 0 {
				return fmt.Errorf("%w: zero-length extent", errProto)
			}
			c.exts = append(c.exts, stream.Extent{Off: pos, Len: l, Hole: st&stateZero != 0})
			pos += l
		}
		return nil
	}
	if typ&replyErrBit != 0 {
		if length < 6 || length > 6+maxString+8 {
			return fmt.Errorf("%w: bad error chunk (%d bytes)", errProto, length)
		}
		b := make([]byte, length)
		if err := readFull(cc.br, b); err != nil {
			return err
		}
		errno, ml := be.Uint32(b), int(be.Uint16(b[4:]))
		if ml > len(b)-6 {
			return fmt.Errorf("%w: error message longer than its chunk", errProto)
		}
		if errno == 0 {
			errno = errInval
		}
		if c.err == nil {
			c.err = &errnoError{errno: errno, msg: string(b[6 : 6+ml])}
		}
		return nil
	}
	return fmt.Errorf("%w: unknown chunk type %d", errProto, typ)
}

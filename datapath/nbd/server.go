package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/stowage/stowage/errdefs"
)

// Defaults of ServerOptions.
const (
	DefaultWorkers          = 16
	DefaultMaxInFlight      = 64 << 20
	DefaultHandshakeTimeout = 30 * time.Second
	DefaultIOTimeout        = 2 * time.Minute
	DefaultShutdownGrace    = 5 * time.Second
)

// ServerOptions tune a Server. The zero value is a good default.
type ServerOptions struct {
	// Logger receives connection and protocol records (slog.Default() if nil).
	Logger *slog.Logger
	// Workers is the number of requests one connection serves at once
	// (DefaultWorkers); replies go out in completion order.
	Workers int
	// MaxInFlight bounds the READ and WRITE payload bytes held by the
	// requests in flight on one connection (DefaultMaxInFlight). It is per
	// connection so that a client that stops reading its replies stalls
	// only itself.
	MaxInFlight int64
	// HandshakeTimeout bounds option haggling (DefaultHandshakeTimeout).
	HandshakeTimeout time.Duration
	// IOTimeout bounds reading one WRITE payload once its header has
	// arrived, and writing one reply (DefaultIOTimeout); a client that
	// takes longer is disconnected.
	IOTimeout time.Duration
	// ShutdownGrace is how long requests in flight may take to finish when
	// their export is removed or Serve stops (DefaultShutdownGrace).
	ShutdownGrace time.Duration
	// SecretNames makes export names capabilities: NBD_OPT_LIST is refused
	// (NBD_REP_ERR_POLICY) and the empty name never falls back to the only
	// export, so a client must know a name to open it. The agent's grants
	// use it; `stowage nbd serve` does not.
	SecretNames bool
	// MaxConns bounds the connections served at once over all listeners
	// (0: unlimited); a connection past it is closed at once, before the
	// handshake, and logged.
	MaxConns int
	// TLS, when set, lets clients upgrade with NBD_OPT_STARTTLS (nbds://
	// URIs); the handshake runs on the same connection and option
	// negotiation starts again inside it. The config is used as given, so
	// a GetCertificate or GetConfigForClient that rotates certificates
	// keeps working. Nil: STARTTLS is refused with NBD_REP_ERR_UNSUP.
	TLS *tls.Config
	// TLSRequired (with TLS) refuses every option but NBD_OPT_STARTTLS and
	// NBD_OPT_ABORT with NBD_REP_ERR_TLS_REQD until TLS is up, and closes a
	// connection that sends NBD_OPT_EXPORT_NAME in plaintext.
	TLSRequired bool
}

// ExportOptions describe one export.
type ExportOptions struct {
	// ReadOnly advertises NBD_FLAG_READ_ONLY and refuses writes, trims and
	// zeroes with EPERM.
	ReadOnly bool
	// Description is shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
	Description string
	// Expires, when set, is when the export stops opening: from then on
	// a client asking for it is told there is no such export (connections
	// already open go on until RemoveExport).
	Expires time.Time
}

// Server serves named exports over NBD. Add exports, then call Serve for
// each listener; exports can be added and removed while serving.
type Server struct {
	opts ServerOptions
	log  *slog.Logger
	// conns counts the connections Serve is serving (MaxConns).
	conns atomic.Int64

	mu      sync.Mutex
	exports map[string]*export
}

// export is one served backend and the connections attached to it.
type export struct {
	name, desc string
	be         Backend
	ro         bool
	expires    time.Time // zero: never
	size       int64
	zeroer     Zeroer
	trimmer    Trimmer
	extenter   Extenter
	cacher     Cacher
	fuaWriter  FUAWriter
	skipHoles  bool // reads do not look holes up (SkipHolesOnRead)

	mu      sync.Mutex
	conns   map[*conn]struct{}
	removed bool
	wg      sync.WaitGroup
}

// NewServer returns a server with no exports.
func NewServer(opts ServerOptions) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Workers <= 0 {
		opts.Workers = DefaultWorkers
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = DefaultMaxInFlight
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if opts.IOTimeout <= 0 {
		opts.IOTimeout = DefaultIOTimeout
	}
	if opts.ShutdownGrace <= 0 {
		opts.ShutdownGrace = DefaultShutdownGrace
	}
	if opts.TLS == nil {
		opts.TLSRequired = false
	}
	return &Server{
		opts:    opts,
		log:     opts.Logger,
		exports: map[string]*export{},
	}
}

// AddExport opens the file or block device at path and serves it as name.
// The empty name is the default export (see Serve).
func (s *Server) AddExport(name, path string, opts ExportOptions) error {
	b, err := OpenFileBackend(path, opts.ReadOnly)
	if err != nil {
		return err
	}
	if err := s.AddBackend(name, b, opts); err != nil {
		b.Close()
		return err
	}
	return nil
}

// AddBackend serves b as name. The server owns b from then on and closes it
// in RemoveExport or Close.
func (s *Server) AddBackend(name string, b Backend, opts ExportOptions) error {
	if len(name) > maxString || len(opts.Description) > maxString {
		return fmt.Errorf("export %.40q: name and description are limited to %d bytes: %w", name, maxString, errdefs.ErrInvalid)
	}
	e := &export{name: name, desc: opts.Description, be: b, ro: opts.ReadOnly, expires: opts.Expires, size: b.Size(), conns: map[*conn]struct{}{}}
	if e.size < 0 {
		return fmt.Errorf("export %q: negative size: %w", name, errdefs.ErrInvalid)
	}
	e.zeroer, _ = b.(Zeroer)
	e.trimmer, _ = b.(Trimmer)
	e.extenter, _ = b.(Extenter)
	e.cacher, _ = b.(Cacher)
	e.fuaWriter, _ = b.(FUAWriter)
	if sh, ok := b.(SkipHolesOnRead); ok {
		e.skipHoles = sh.SkipHolesOnRead()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.exports[name]; dup {
		return fmt.Errorf("export %q: %w", name, errdefs.ErrAlreadyExists)
	}
	s.exports[name] = e
	return nil
}

// RemoveExport stops serving name: its connections get ShutdownGrace to
// finish the requests in flight and are then closed, and its backend is
// closed. Removing an export that does not exist succeeds.
func (s *Server) RemoveExport(name string) error {
	s.mu.Lock()
	e := s.exports[name]
	delete(s.exports, name)
	s.mu.Unlock()
	if e == nil {
		return nil
	}
	return e.remove()
}

// Close removes every export.
func (s *Server) Close() error {
	s.mu.Lock()
	all := s.exports
	s.exports = map[string]*export{}
	s.mu.Unlock()
	var errs []error
	for _, e := range all {
		errs = append(errs, e.remove())
	}
	return errors.Join(errs...)
}

func (e *export) remove() error {
	e.mu.Lock()
	e.removed = true
	conns := make([]*conn, 0, len(e.conns))
	for c := range e.conns {
		conns = append(conns, c)
	}
	e.mu.Unlock()
	for _, c := range conns {
		c.shutdown()
	}
	e.wg.Wait()
	if err := e.be.Close(); err != nil {
		return fmt.Errorf("export %q: close: %w", e.name, err)
	}
	return nil
}

// attach registers c with e; false when e was removed meanwhile.
func (e *export) attach(c *conn) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.removed {
		return false
	}
	e.conns[c] = struct{}{}
	e.wg.Add(1)
	return true
}

func (e *export) detach(c *conn) {
	e.mu.Lock()
	delete(e.conns, c)
	e.mu.Unlock()
	e.wg.Done()
}

// flags are the transmission flags of e for a connection that did or did
// not negotiate structured replies.
func (e *export) flags(structured bool) uint16 {
	f := uint16(tfHasFlags | tfSendFlush | tfCanMultiConn | tfSendCache)
	if e.ro {
		f |= tfReadOnly
	} else {
		f |= tfSendFUA | tfSendTrim | tfSendWriteZeroes
		if e.zeroer != nil {
			f |= tfSendFastZero
		}
	}
	if structured {
		f |= tfSendDF
	}
	return f
}

// lookup finds an export by the name a client sent. The empty name is the
// default export: the one named "" if there is one, else the only export.
// An expired export is not found.
func (s *Server) lookup(name string) *export {
	e := s.find(name)
	if e != nil && !e.expires.IsZero() && !time.Now().Before(e.expires) {
		return nil
	}
	return e
}

func (s *Server) find(name string) *export {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.exports[name]; e != nil || name != "" {
		return e
	}
	if len(s.exports) == 1 && !s.opts.SecretNames {
		for _, e := range s.exports {
			return e
		}
	}
	return nil
}

// list returns the exports sorted by name.
func (s *Server) list() []*export {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*export, 0, len(s.exports))
	now := time.Now()
	for _, e := range s.exports {
		if e.expires.IsZero() || now.Before(e.expires) {
			out = append(out, e)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// Serve accepts connections on l until ctx ends, then closes l, gives the
// open connections ShutdownGrace to finish their requests in flight, closes
// them and returns nil. An accept error other than running out of file
// descriptors ends Serve with that error (class errdefs.ErrUnavailable)
// after the same shutdown. Serve may run on several listeners at once.
//
// Clients asking for the empty (default) export name get the export named
// "" or, when the server has exactly one export, that one; this is what
// nbd+unix:///?socket=... URIs ask for.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	backoff := 5 * time.Millisecond
	for {
		nc, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ECONNABORTED) {
				s.log.Warn("nbd: accept", "addr", l.Addr().String(), "err", err, "retry_in", backoff)
				select {
				case <-time.After(backoff):
				case <-ctx.Done():
					return nil
				}
				backoff = min(2*backoff, time.Second)
				continue
			}
			cancel()
			return fmt.Errorf("nbd: accept on %s: %w: %w", l.Addr(), err, errdefs.ErrUnavailable)
		}
		backoff = 5 * time.Millisecond
		if !s.admit() {
			s.log.Warn("nbd: connection refused: too many connections", "remote", nc.RemoteAddr().String(), "max", s.opts.MaxConns)
			nc.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer s.conns.Add(-1)
			s.handle(ctx, nc)
		}()
	}
}

// admit counts a new connection in, unless MaxConns are served already.
func (s *Server) admit() bool {
	if s.opts.MaxConns <= 0 {
		s.conns.Add(1)
		return true
	}
	for {
		n := s.conns.Load()
		if n >= int64(s.opts.MaxConns) {
			return false
		}
		if s.conns.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// ServeConn serves one already-accepted connection until the client
// disconnects or ctx ends.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) {
	s.handle(ctx, nc)
}

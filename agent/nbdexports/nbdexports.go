// Package nbdexports keeps the agent's NBD exports: files of the host's
// stores served over NBD (datapath/nbd) under unguessable export names, so
// that a hypervisor that cannot open a volume's file directly (its host is
// outside the store's scope) attaches it as nbd://agent:port/<name>, or
// nbds://… when the server speaks TLS (WithTLS).
//
// An export name is 128 random bits in hex, made per export: exporting the
// same file twice gives two names, each removed by its own Unexport, which
// closes that export's connections.
//
// The names are capabilities: the server runs with nbd.ServerOptions
// SecretNames, so NBD_OPT_LIST is refused and the empty (default) name
// opens nothing; a client must be given a name to open an export.
//
// # qcow2 images
//
// A raw file is served by the agent's own server from its file descriptor.
// A qcow2 image (a linked clone, a lazy volume on the template mount, a
// snapshot: the guest view through its backing chain) is served by a
// qemu-storage-daemon per export (datapath/qsd), started by ExportFormat
// on a unix socket in the run directory (WithQcow2) and reached through an
// nbd.UpstreamBackend (a read-only export is served by Stowage's own qcow2
// reader instead, nbd.Qcow2Backend, when it can read the image): the client still connects to the agent's listener,
// under the same secret export name, TLS, expiry and connection limit as a
// raw file. The daemon is supervised (restarted when it dies, requests in
// flight retried), stopped on Unexport, expiry and Close, and recorded
// with its PID in the state file: after an agent crash Load adopts a
// daemon that still runs (qsd.Adopt) instead of starting a second one, and
// stops daemons of the run directory that no export accounts for.
//
// # Expiry
//
// An export may expire (the expires argument of Export; zero: never). From
// then on it does not open, and the sweeper that runs while Serve runs
// removes it within SweepInterval and closes its connections.
//
// # Owners
//
// Every Export names its exports.Owner (the task it runs for and the
// object it serves); the export records it and when it was made, and List
// answers them with the URIs, so that the controller can tell which job
// made each export and end those no job accounts for. State files written
// before Owners were recorded load with empty Owners and zero creation
// times.
//
// # Persistence
//
// With WithStateFile every Export and Unexport rewrites a small JSON file
// crash-safely (datapath/durable: a new 0600 file, fsync, rename, fsync of
// the directory). It holds export names, paths, modes and expiries, never
// data. Load, once at start, serves again the exports the file lists that
// have not expired and whose path is still a regular file, under the same
// names, so the URIs granted before an agent restart keep working (with the
// same --nbd-listen address). Without a state file exports live in memory.
//
//	x := nbdexports.New(log, nbdexports.WithStateFile(dir+"/nbd-exports.json"))
//	err := x.Load(local.InStore)
//	go x.Serve(ctx, ln)          // ln from --nbd-listen
//	x.SetAddress("10.0.0.5:10809")
//	uri, err := x.Export("/srv/p1/volumes/v1.raw", false, time.Time{}, exports.Owner{Store: "p1", Key: "volumes/v1.raw"}) // nbd://10.0.0.5:10809/3f2a…
//	err = x.Unexport(uri)
package nbdexports

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/stowage/stowage/agent/exports"
	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/datapath/qsd"
	"github.com/stowage/stowage/errdefs"
)

// Server is the agent's NBD server and its exports. It is safe for
// concurrent use.
type Server struct {
	srv   *nbd.Server
	log   *slog.Logger
	state string // state file ("": none)
	tls   *tls.Config
	tlsOn bool // URIs are nbds://
	reqd  bool

	runDir string // qcow2 daemons' sockets ("": qcow2 not served)
	qsdBin string
	life   context.Context // the daemons' supervision
	stop   context.CancelFunc

	mu      sync.Mutex
	addr    string                 // host:port announced in URIs
	exports map[string]*export     // by name
	daemons map[string]*qsd.Daemon // qcow2 exports' daemons, by name
	saveMu  sync.Mutex             // orders state file writes
}

// export is what the state file records of one export.
type export struct {
	Name     string    `json:"name"`
	Path     string    `json:"path"`
	ReadOnly bool      `json:"read_only,omitempty"`
	Expires  time.Time `json:"expires,omitzero"`
	// Since Owners were recorded; absent in older state files.
	Owner   exports.Owner `json:"owner,omitzero"`
	Created time.Time     `json:"created,omitzero"`
	// Since qcow2 exports: the declared format ("": raw) and the PID of
	// the export's qemu-storage-daemon.
	Format string `json:"format,omitempty"`
	PID    int    `json:"qsd_pid,omitempty"`
	// Since rbd exports: the image (Format FormatRBD; Path is then
	// rbd:POOL/IMAGE[@SNAP], not a file).
	RBD *qsd.RBD `json:"rbd,omitempty"`
}

func (e *export) expired(now time.Time) bool { return !e.Expires.IsZero() && !now.Before(e.Expires) }

// stateFile is the JSON of the state file.
type stateFile struct {
	Version int       `json:"version"`
	Exports []*export `json:"exports"`
}

const stateVersion = 1

// MaxConns bounds the NBD connections the agent serves at once, over
// every export: one hypervisor disk attached through a grant is one or a
// few connections, so 256 leaves room for a host's VMs while a client that
// opens connections in a loop cannot exhaust the agent's descriptors.
const MaxConns = 256

// SweepInterval bounds how long an expired export keeps its connections.
const SweepInterval = 10 * time.Second

// Option configures a Server.
type Option func(*Server)

// WithTLS serves NBD over TLS (NBD_OPT_STARTTLS) with cfg, used as given
// (a GetCertificate that rotates certificates keeps working); required
// refuses plaintext clients, and Export then returns nbds:// URIs (without
// it TLS is offered to clients that ask, and URIs stay nbd://).
func WithTLS(cfg *tls.Config, required bool) Option {
	return func(s *Server) { s.tls, s.tlsOn, s.reqd = cfg, cfg != nil, required && cfg != nil }
}

// WithQcow2 serves qcow2 images (ExportFormat) through qemu-storage-daemon
// (binary; "" is qsd.DefaultBinary), one per export, with their sockets in
// runDir (created 0700: the socket names carry the export names).
func WithQcow2(runDir, binary string) Option {
	return func(s *Server) { s.runDir, s.qsdBin = runDir, binary }
}

// WithStateFile keeps the exports in the file at path so that Load
// restores them after a restart.
func WithStateFile(path string) Option { return func(s *Server) { s.state = path } }

// New returns a server with no exports (Load restores those of the state
// file).
func New(log *slog.Logger, opts ...Option) *Server {
	if log == nil {
		log = slog.Default()
	}
	s := &Server{log: log, exports: map[string]*export{}, daemons: map[string]*qsd.Daemon{}}
	for _, o := range opts {
		o(s)
	}
	s.life, s.stop = context.WithCancel(context.Background())
	s.srv = nbd.NewServer(nbd.ServerOptions{Logger: log, SecretNames: true, MaxConns: MaxConns, TLS: s.tls, TLSRequired: s.reqd})
	return s
}

// Load serves again the exports the state file lists that have not expired,
// whose file is still there and passes check (nil: no check; the agent's
// checks that it is still inside a store it serves); the others are
// dropped (and logged). A
// missing state file is no exports; one that cannot be read or parsed is an
// error (class errdefs.ErrDataLoss), so that a start does not silently
// forget the grants it holds. Without WithStateFile it does nothing.
func (s *Server) Load(check func(path string) error) error {
	if s.state == "" {
		return nil
	}
	b, err := os.ReadFile(s.state)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("nbd exports: state file %s: %w", s.state, errors.Join(err, errdefs.ErrUnavailable))
	}
	var st stateFile
	if err := json.Unmarshal(b, &st); err != nil || st.Version != stateVersion {
		return fmt.Errorf("nbd exports: state file %s: not a version %d state (%v): %w", s.state, stateVersion, err, errdefs.ErrDataLoss)
	}
	now := time.Now()
	kept, changed := 0, false
	for _, e := range st.Exports {
		if e == nil || validName(e.Name) != nil || (!filepath.IsAbs(e.Path) && e.RBD == nil) {
			s.log.Warn("nbd exports: malformed entry in the state file dropped", "state", s.state)
			continue
		}
		if e.expired(now) {
			s.log.Info("nbd exports: expired export dropped", "path", e.Path, "expired", e.Expires)
			s.removeKey(e.Name)
			continue
		}
		if e.RBD != nil {
			// An image of a cluster, not a file of this host: served
			// again with the key kept beside it.
		} else if fi, err := os.Lstat(e.Path); err != nil || !fi.Mode().IsRegular() {
			s.log.Warn("nbd exports: export dropped: its file is gone or not a regular file", "path", e.Path, "err", err)
			continue
		}
		if check != nil && e.RBD == nil {
			if err := check(e.Path); err != nil {
				s.log.Warn("nbd exports: export dropped: its file may no longer be served", "path", e.Path, "err", err)
				continue
			}
		}
		pid := e.PID
		if err := s.serve(context.Background(), e, true); err != nil {
			s.log.Warn("nbd exports: export dropped: cannot serve it again", "path", e.Path, "err", err)
			s.removeKey(e.Name)
			continue
		}
		s.mu.Lock()
		s.exports[e.Name] = e
		s.mu.Unlock()
		kept++
		if e.PID != pid {
			changed = true
		}
	}
	s.sweepRunDir()
	s.log.Info("nbd exports restored", "state", s.state, "kept", kept, "dropped", len(st.Exports)-kept)
	if kept != len(st.Exports) || changed {
		return s.save()
	}
	return nil
}

// save rewrites the state file with the current exports.
func (s *Server) save() error {
	if s.state == "" {
		return nil
	}
	s.saveMu.Lock()
	defer s.saveMu.Unlock()
	s.mu.Lock()
	st := stateFile{Version: stateVersion, Exports: make([]*export, 0, len(s.exports))}
	for _, e := range s.exports {
		c := *e
		st.Exports = append(st.Exports, &c)
	}
	s.mu.Unlock()
	sort.Slice(st.Exports, func(i, j int) bool { return st.Exports[i].Name < st.Exports[j].Name })
	if err := durable.WriteJSON(s.state, st); err != nil {
		return fmt.Errorf("nbd exports: state file %s: %w", s.state, errors.Join(err, errdefs.ErrUnavailable))
	}
	return nil
}

// SetAddress sets the host:port other hosts reach the NBD listener at.
func (s *Server) SetAddress(hostport string) {
	s.mu.Lock()
	s.addr = hostport
	s.mu.Unlock()
}

// Address is the host:port exports are announced under ("" before SetAddress).
func (s *Server) Address() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Serve serves NBD on l until ctx ends (nbd.Server.Serve), and meanwhile
// removes expired exports every SweepInterval.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go s.sweepLoop(ctx)
	return s.srv.Serve(ctx, l)
}

func (s *Server) sweepLoop(ctx context.Context) {
	t := time.NewTicker(SweepInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			s.Sweep(now)
		}
	}
}

// Sweep removes the exports expired at now and closes their connections.
func (s *Server) Sweep(now time.Time) {
	s.mu.Lock()
	var gone []*export
	for name, e := range s.exports {
		if e.expired(now) {
			gone = append(gone, e)
			delete(s.exports, name)
		}
	}
	s.mu.Unlock()
	if len(gone) == 0 {
		return
	}
	if err := s.save(); err != nil {
		s.log.Error("nbd exports: save state after expiry", "err", err)
	}
	for _, e := range gone {
		if err := s.drop(e.Name); err != nil {
			s.log.Warn("nbd exports: remove expired export", "path", e.Path, "err", err)
		}
	}
	s.log.Info("nbd exports expired", "count", len(gone))
}

// Close stops serving every export and closes its connections. The state
// file is kept: the exports come back at the next Load.
//
// The qcow2 daemons are stopped (Load starts them again).
func (s *Server) Close() error {
	s.mu.Lock()
	s.exports = map[string]*export{}
	daemons := s.daemons
	s.daemons = map[string]*qsd.Daemon{}
	s.mu.Unlock()
	err := s.srv.Close()
	for _, d := range daemons {
		err = errors.Join(err, s.stopDaemon(d))
	}
	s.stop()
	return err
}

// Export serves the file at path (on this machine) under a new name until
// expires (zero: until Unexport) and returns its nbd:// (nbds:// with TLS)
// URI; the export records owner. Before SetAddress it is errdefs.ErrUnavailable; an expiry already
// past is errdefs.ErrInvalid. With a state file, the export is recorded
// before Export returns.
func (s *Server) Export(path string, readOnly bool, expires time.Time, owner exports.Owner) (string, error) {
	return s.ExportFormat(path, FormatRaw, readOnly, expires, owner)
}

// The formats ExportFormat serves.
const (
	FormatRaw   = "raw"   // the file's bytes, by the agent's own server
	FormatQcow2 = "qcow2" // the guest view of the image and its backing chain (WithQcow2)
)

// ExportFormat is Export of an image of the declared format: FormatRaw
// (the file's bytes) or FormatQcow2 (the guest view through its backing
// chain, served by a qemu-storage-daemon; errdefs.ErrNotImplemented
// without WithQcow2). The caller has checked the chain (every layer's
// format recorded, no layer outside what it may serve).
func (s *Server) ExportFormat(path, format string, readOnly bool, expires time.Time, owner exports.Owner) (string, error) {
	addr := s.Address()
	if addr == "" {
		return "", fmt.Errorf("nbd export %s: this agent serves no NBD (--nbd-listen): %w", path, errdefs.ErrUnavailable)
	}
	if !expires.IsZero() && !time.Now().Before(expires) {
		return "", fmt.Errorf("nbd export %s: expiry %s is past: %w", path, expires.UTC().Format(time.RFC3339), errdefs.ErrInvalid)
	}
	switch format {
	case FormatRaw:
		format = ""
	case FormatQcow2:
		if s.runDir == "" {
			return "", fmt.Errorf("nbd export %s: this agent serves no qcow2 images over NBD: %w", path, errdefs.ErrNotImplemented)
		}
	default:
		return "", fmt.Errorf("nbd export %s: format %q is neither raw nor qcow2: %w", path, format, errdefs.ErrInvalid)
	}
	e := &export{Name: newName(), Path: path, ReadOnly: readOnly, Expires: expires, Owner: owner, Created: time.Now(), Format: format}
	return s.add(addr, e)
}

// newName is a new unguessable export name.
func newName() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	return hex.EncodeToString(b[:])
}

// add serves e, records it and returns its URI.
func (s *Server) add(addr string, e *export) (string, error) {
	if err := s.serve(context.Background(), e, false); err != nil {
		s.removeKey(e.Name)
		return "", fmt.Errorf("nbd export %s: %w", e.Path, err)
	}
	s.mu.Lock()
	s.exports[e.Name] = e
	s.mu.Unlock()
	if err := s.save(); err != nil {
		s.mu.Lock()
		delete(s.exports, e.Name)
		s.mu.Unlock()
		_ = s.drop(e.Name)
		return "", fmt.Errorf("nbd export %s: %w", e.Path, err)
	}
	return s.uri(addr, e.Name), nil
}

func (s *Server) uri(addr, name string) string {
	scheme := "nbd"
	if s.reqd {
		scheme = "nbds"
	}
	return (&url.URL{Scheme: scheme, Host: addr, Path: "/" + name}).String()
}

// Unexport removes the export at uri (an nbd:// or nbds:// URI or a bare
// name) and closes its connections; an unknown export is not an error, a
// URI that names no export of this kind is errdefs.ErrInvalid.
func (s *Server) Unexport(uri string) error {
	name, err := NameOf(uri)
	if err != nil {
		return err
	}
	s.mu.Lock()
	_, ok := s.exports[name]
	delete(s.exports, name)
	s.mu.Unlock()
	if ok {
		err = s.save()
	}
	return errors.Join(err, s.drop(name))
}

// Exported returns the paths currently exported, one per export.
func (s *Server) Exported() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.exports))
	for _, e := range s.exports {
		out = append(out, e.Path)
	}
	return out
}

// Info describes one live export (List).
type Info struct {
	// URI is the export's URI under the current address: what Export
	// returned, unless SetAddress changed since (Unexport takes either:
	// it goes by the name). It carries the export name, a capability:
	// never log it.
	URI      string
	Path     string
	ReadOnly bool
	Owner    exports.Owner
	Created  time.Time // zero: made before it was recorded
	Expires  time.Time // zero: never
}

// List returns the live (not expired) exports, by URI. Before SetAddress
// there are none to list (no URI can name them).
func (s *Server) List() []Info {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.addr == "" {
		return nil
	}
	out := make([]Info, 0, len(s.exports))
	for _, e := range s.exports {
		if e.expired(now) {
			continue
		}
		out = append(out, Info{URI: s.uri(s.addr, e.Name), Path: e.Path, ReadOnly: e.ReadOnly, Owner: e.Owner, Created: e.Created, Expires: e.Expires})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].URI < out[j].URI })
	return out
}

// NameOf returns the export name of an nbd:// or nbds:// URI or of a bare
// name.
func NameOf(uri string) (string, error) {
	name := uri
	if strings.Contains(uri, "/") {
		u, err := url.Parse(uri)
		if err != nil || (u.Scheme != "nbd" && u.Scheme != "nbds") {
			return "", fmt.Errorf("%q is not an nbd:// export URI: %w", uri, errdefs.ErrInvalid)
		}
		name = strings.TrimPrefix(u.Path, "/")
	}
	if err := validName(name); err != nil {
		return "", err
	}
	return name, nil
}

func validName(name string) error {
	if b, err := hex.DecodeString(name); err != nil || len(b) != 16 {
		return fmt.Errorf("%q is not an NBD export name: %w", name, errdefs.ErrInvalid)
	}
	return nil
}

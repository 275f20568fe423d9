// Package nbdexports keeps the agent's NBD exports: files of the host's
// stores served over NBD (datapath/nbd) under unguessable export names, so
// that a hypervisor that cannot open a volume's file directly (its host is
// outside the store's scope) attaches it as nbd://agent:port/<name>.
//
// An export name is 128 random bits in hex, made per export: exporting the
// same file twice gives two names, each removed by its own Unexport, which
// closes that export's connections. Exports live in memory: an agent
// restart ends them all (the controller grants again on demand).
//
// The names are capabilities: the server runs with nbd.ServerOptions
// SecretNames, so NBD_OPT_LIST is refused and the empty (default) name
// opens nothing; a client must be given a name to open an export.
//
//	x := nbdexports.New(log)
//	go x.Serve(ctx, ln)          // ln from --nbd-listen
//	x.SetAddress("10.0.0.5:10809")
//	uri, err := x.Export("/srv/p1/volumes/v1.raw", false) // nbd://10.0.0.5:10809/3f2a…
//	err = x.Unexport(uri)
package nbdexports

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"

	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/errdefs"
)

// Server is the agent's NBD server and its exports. It is safe for
// concurrent use.
type Server struct {
	srv *nbd.Server

	mu    sync.Mutex
	addr  string            // host:port announced in URIs
	names map[string]string // export name -> path
}

// MaxConns bounds the NBD connections the agent serves at once, over
// every export: one hypervisor disk attached through a grant is one or a
// few connections, so 256 leaves room for a host's VMs while a client that
// opens connections in a loop cannot exhaust the agent's descriptors.
const MaxConns = 256

// New returns a server with no exports.
func New(log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	s := &Server{srv: nbd.NewServer(nbd.ServerOptions{Logger: log, SecretNames: true, MaxConns: MaxConns}), names: map[string]string{}}
	return s
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

// Serve serves NBD on l until ctx ends (nbd.Server.Serve).
func (s *Server) Serve(ctx context.Context, l net.Listener) error { return s.srv.Serve(ctx, l) }

// Close removes every export and closes its connections.
func (s *Server) Close() error {
	s.mu.Lock()
	s.names = map[string]string{}
	s.mu.Unlock()
	return s.srv.Close()
}

// Export serves the file at path (on this machine) under a new name and
// returns its nbd:// URI. Before SetAddress it is errdefs.ErrUnavailable.
func (s *Server) Export(path string, readOnly bool) (string, error) {
	addr := s.Address()
	if addr == "" {
		return "", fmt.Errorf("nbd export %s: this agent serves no NBD (--nbd-listen): %w", path, errdefs.ErrUnavailable)
	}
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	name := hex.EncodeToString(b[:])
	if err := s.srv.AddExport(name, path, nbd.ExportOptions{ReadOnly: readOnly}); err != nil {
		return "", fmt.Errorf("nbd export %s: %w", path, err)
	}
	s.mu.Lock()
	s.names[name] = path
	s.mu.Unlock()
	return (&url.URL{Scheme: "nbd", Host: addr, Path: "/" + name}).String(), nil
}

// Unexport removes the export at uri (an nbd:// URI or a bare name) and
// closes its connections; an unknown export is not an error, a URI that
// names no export of this kind is errdefs.ErrInvalid.
func (s *Server) Unexport(uri string) error {
	name, err := NameOf(uri)
	if err != nil {
		return err
	}
	s.mu.Lock()
	delete(s.names, name)
	s.mu.Unlock()
	return s.srv.RemoveExport(name)
}

// Exported returns the paths currently exported, one per export.
func (s *Server) Exported() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.names))
	for _, p := range s.names {
		out = append(out, p)
	}
	return out
}

// NameOf returns the export name of an nbd:// URI or of a bare name.
func NameOf(uri string) (string, error) {
	name := uri
	if strings.Contains(uri, "/") {
		u, err := url.Parse(uri)
		if err != nil || u.Scheme != "nbd" {
			return "", fmt.Errorf("%q is not an nbd:// export URI: %w", uri, errdefs.ErrInvalid)
		}
		name = strings.TrimPrefix(u.Path, "/")
	}
	if b, err := hex.DecodeString(name); err != nil || len(b) != 16 {
		return "", fmt.Errorf("%q is not an NBD export name: %w", name, errdefs.ErrInvalid)
	}
	return name, nil
}

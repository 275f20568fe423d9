// Package exports serves files of the host read-only over HTTP, so that
// other agents can copy a volume or a snapshot straight from this host
// (volume migration, a copy between stores no single host reaches).
//
// An export is a file under an unguessable token (128 random bits, hex):
// GET and HEAD on /exports/<token> serve its bytes with Range support
// (http.ServeContent), an ETag naming the file's inode, size and mtime,
// and nothing else. The file is opened when it is exported and stays open
// until Unexport, so an export keeps serving the content it was made for
// even if the path is renamed or replaced meanwhile (a snapshot renaming
// the volume, a revert). Exports live in memory: an agent restart ends them
// all, and whoever needs one again exports again.
//
//	x := exports.New(exports.WithBaseURL("http://10.0.0.5:8471"))
//	mux.Handle(exports.Prefix, x)
//	url, err := x.Export("/srv/primary/volumes/v1.qcow2") // http://10.0.0.5:8471/exports/3f2a…
//	err = x.Unexport(url)
package exports

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"syscall"

	"github.com/stowage/stowage/errdefs"
)

// Prefix is the URL path under which exports are served.
const Prefix = "/exports/"

// Server keeps the exports of one agent and serves them. It is safe for
// concurrent use.
type Server struct {
	mu     sync.Mutex
	base   string
	byTok  map[string]*export
	byPath map[string]*export
}

var _ http.Handler = (*Server)(nil)

type export struct {
	token string
	path  string
	f     *os.File
	refs  int  // requests being served (under Server.mu)
	users int  // Export calls not yet matched by Unexport (under Server.mu)
	gone  bool // unexported: close f when refs drops to 0
}

// Option configures a Server.
type Option func(*Server)

// WithBaseURL sets the URL (scheme, host and port) other hosts reach this
// agent at; SetBaseURL sets it later.
func WithBaseURL(u string) Option { return func(s *Server) { s.base = strings.TrimRight(u, "/") } }

// New returns a Server without exports.
func New(opts ...Option) *Server {
	s := &Server{byTok: map[string]*export{}, byPath: map[string]*export{}}
	for _, o := range opts {
		o(s)
	}
	return s
}

// SetBaseURL sets the URL exports are announced under, e.g.
// "http://10.0.0.5:8471" (the agent's advertise URL, known once it listens).
func (s *Server) SetBaseURL(u string) {
	s.mu.Lock()
	s.base = strings.TrimRight(u, "/")
	s.mu.Unlock()
}

// Export serves the regular file at path (a path on this machine) and
// returns its URL. Exporting a path that is already exported returns the
// same URL while the path still names the same file, and the export then
// lasts until every Export of it is matched by an Unexport (a migration's
// short-lived export of a template must not end the template mount's); once
// the path names another file (the old one renamed or replaced), a new
// export is made and the old one keeps serving the old file until it is
// unexported. Before SetBaseURL it is errdefs.ErrUnavailable.
func (s *Server) Export(path string) (string, error) {
	s.mu.Lock()
	base := s.base
	old := s.byPath[path]
	s.mu.Unlock()
	if old != nil && samePath(path, old.f) {
		s.mu.Lock()
		if !old.gone {
			old.users++
			s.mu.Unlock()
			return base + Prefix + old.token, nil
		}
		s.mu.Unlock()
	}
	if base == "" {
		return "", fmt.Errorf("export %s: the agent's URL is not known yet: %w", path, errdefs.ErrUnavailable)
	}
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("export %s: %w", path, errors.Join(err, errdefs.ErrNotFound))
		}
		return "", fmt.Errorf("export %s: %w", path, errors.Join(err, errdefs.ErrFailedPrecondition))
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return "", fmt.Errorf("export %s: not a regular file: %w", path, errdefs.ErrInvalid)
	}
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	x := &export{token: hex.EncodeToString(b[:]), path: path, f: f, users: 1}
	s.mu.Lock()
	if cur := s.byPath[path]; cur != nil && cur != old && !cur.gone && samePath(path, cur.f) { // a concurrent Export won
		cur.users++
		s.mu.Unlock()
		f.Close()
		return base + Prefix + cur.token, nil
	}
	s.byTok[x.token] = x
	s.byPath[path] = x
	s.mu.Unlock()
	return base + Prefix + x.token, nil
}

// samePath reports whether path still names the file f.
func samePath(path string, f *os.File) bool {
	a, err := os.Stat(path)
	if err != nil {
		return false
	}
	b, err := f.Stat()
	return err == nil && os.SameFile(a, b)
}

// Unexport releases one Export of rawURL (or of its bare token) and ends
// the export when none is left. An unknown export is not an error; a URL
// that is not an export URL is errdefs.ErrInvalid. Requests already being
// served finish.
func (s *Server) Unexport(rawURL string) error {
	tok, err := TokenOf(rawURL)
	if err != nil {
		return err
	}
	s.mu.Lock()
	x, ok := s.byTok[tok]
	if ok && x.users > 1 {
		x.users--
		s.mu.Unlock()
		return nil
	}
	closeNow := false
	if ok {
		delete(s.byTok, tok)
		if s.byPath[x.path] == x {
			delete(s.byPath, x.path)
		}
		x.gone = true
		closeNow = x.refs == 0
	}
	s.mu.Unlock()
	if closeNow {
		x.f.Close()
	}
	return nil
}

// Exported returns the paths currently exported.
func (s *Server) Exported() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.byPath))
	for p := range s.byPath {
		out = append(out, p)
	}
	return out
}

// TokenOf returns the token of an export URL or of a bare token.
func TokenOf(rawURL string) (string, error) {
	tok := rawURL
	if strings.Contains(rawURL, "/") {
		u, err := url.Parse(rawURL)
		if err != nil || !strings.HasPrefix(u.Path, Prefix) {
			return "", fmt.Errorf("%q is not an export URL (…%s<token>): %w", rawURL, Prefix, errdefs.ErrInvalid)
		}
		tok = strings.TrimPrefix(u.Path, Prefix)
	}
	if b, err := hex.DecodeString(tok); err != nil || len(b) != 16 {
		return "", fmt.Errorf("%q is not an export token: %w", tok, errdefs.ErrInvalid)
	}
	return tok, nil
}

// ServeHTTP serves GET and HEAD on Prefix+token, with Range.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "exports are read-only", http.StatusMethodNotAllowed)
		return
	}
	tok, ok := strings.CutPrefix(r.URL.Path, Prefix)
	s.mu.Lock()
	x := s.byTok[tok]
	if x != nil {
		x.refs++
	}
	s.mu.Unlock()
	if !ok || x == nil {
		http.NotFound(w, r)
		return
	}
	defer func() {
		s.mu.Lock()
		x.refs--
		closeNow := x.gone && x.refs == 0
		s.mu.Unlock()
		if closeNow {
			x.f.Close()
		}
	}()
	fi, err := x.f.Stat()
	if err != nil {
		http.Error(w, "export unavailable", http.StatusInternalServerError)
		return
	}
	etag := fmt.Sprintf(`"%d-%d-%d"`, fi.Size(), fi.ModTime().UnixNano(), inode(fi))
	w.Header().Set("ETag", etag)
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Cache-Control", "no-store")
	// A SectionReader reads with ReadAt: concurrent requests share the file safely.
	http.ServeContent(w, r, "", fi.ModTime(), io.NewSectionReader(x.f, 0, fi.Size()))
}

func inode(fi fs.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}

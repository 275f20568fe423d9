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
// the volume, a revert).
//
// An export may expire (Export's expires; zero: never). An expired token
// is answered 404, as an unknown one, and Run removes expired exports
// within SweepInterval. Exporting an exported path again with another
// expiry keeps the later one (zero, never, is the latest).
//
// With WithStateFile every Export and Unexport rewrites a small JSON file
// crash-safely (datapath/durable): tokens, paths, the file's device and
// inode, use counts and expiries, never data. Load, once at start, opens
// again the exports that have not expired and whose path still names the
// same file (same device and inode), under the same tokens, so URLs granted
// before an agent restart keep working; the others are dropped. Without a
// state file exports live in memory and a restart ends them.
//
// # Owners
//
// Every Export names its Owner: the task it runs for and the object it
// serves. An export records its maker's Owner and when it was made, and the
// Owners of the later Exports that joined it (SharedWith, the latest
// MaxSharedWith distinct ones); List answers them, so that the controller
// can tell which job each export was made for and end those no job accounts
// for. An Unexport does not say whose Export it matches, so the Owners of
// the joiners stay listed until the export ends: a listing errs on the side
// of keeping an export. State files written before Owners were recorded
// load with empty Owners and zero creation times.
//
// URLs are built from the base URL (WithBaseURL, SetBaseURL), so they are
// https:// once the agent's listener is.
//
//	x := exports.New(exports.WithBaseURL("http://10.0.0.5:8471"), exports.WithStateFile(dir+"/exports.json"))
//	err := x.Load(local.InStore)
//	go x.Run(ctx)
//	mux.Handle(exports.Prefix, x)
//	url, err := x.Export("/srv/primary/volumes/v1.qcow2", time.Time{}, exports.Owner{TaskID: "j1.copy.export-3a9c01d2e4f5", Store: "p1", Key: "volumes/v1.qcow2"}) // http://10.0.0.5:8471/exports/3f2a…
//	err = x.Unexport(url)
package exports

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/errdefs"
)

// Prefix is the URL path under which exports are served.
const Prefix = "/exports/"

// Server keeps the exports of one agent and serves them. It is safe for
// concurrent use.
type Server struct {
	state  string // state file ("": none)
	log    *slog.Logger
	saveMu sync.Mutex // orders state file writes

	mu     sync.Mutex
	base   string
	byTok  map[string]*export
	byPath map[string]*export
}

// SweepInterval bounds how long an expired export keeps its file open.
const SweepInterval = 10 * time.Second

var _ http.Handler = (*Server)(nil)

type export struct {
	token string
	path  string
	f     *os.File
	refs  int  // requests being served (under Server.mu)
	users int  // Export calls not yet matched by Unexport (under Server.mu)
	gone  bool // unexported: close f when refs drops to 0
	// expires is when the export ends (zero: never; under Server.mu).
	expires time.Time
	owner   Owner     // the Export that made it
	created time.Time // when it was made (zero: before it was recorded)
	shared  []Owner   // the Exports that joined it (under Server.mu)
}

// Owner says whom an export is for: the task that asked for it (the id
// of the agent's task and the id of the controller's step it is part of;
// "" when unknown) and the object it serves (store id and key, as the
// caller named it; "" when unknown). An export only records it.
type Owner struct {
	TaskID   string `json:"task_id,omitempty"`
	ParentID string `json:"parent_id,omitempty"`
	Store    string `json:"store,omitempty"`
	Key      string `json:"key,omitempty"`
}

// MaxSharedWith bounds the Owners of joiners an export records (the
// latest distinct ones): a path exported again and again (a template mount
// renewing its export) does not grow the state file without end.
const MaxSharedWith = 16

// join records o as joining x (under Server.mu).
func (x *export) join(o Owner) {
	if o == (Owner{}) || o == x.owner {
		return
	}
	for i, s := range x.shared {
		if s == o {
			x.shared = append(x.shared[:i], x.shared[i+1:]...)
			break
		}
	}
	x.shared = append(x.shared, o)
	if len(x.shared) > MaxSharedWith {
		x.shared = x.shared[len(x.shared)-MaxSharedWith:]
	}
}

func (x *export) expired(now time.Time) bool { return !x.expires.IsZero() && !now.Before(x.expires) }

// saved is what the state file records of one export.
type saved struct {
	Token   string    `json:"token"`
	Path    string    `json:"path"`
	Dev     uint64    `json:"dev"`
	Ino     uint64    `json:"ino"`
	Users   int       `json:"users"`
	Expires time.Time `json:"expires,omitzero"`
	// Since Owners were recorded; absent in older state files.
	Owner      Owner     `json:"owner,omitzero"`
	Created    time.Time `json:"created,omitzero"`
	SharedWith []Owner   `json:"shared_with,omitempty"`
}

type stateFile struct {
	Version int     `json:"version"`
	Exports []saved `json:"exports"`
}

const stateVersion = 1

// Option configures a Server.
type Option func(*Server)

// WithBaseURL sets the URL (scheme, host and port) other hosts reach this
// agent at; SetBaseURL sets it later.
func WithBaseURL(u string) Option { return func(s *Server) { s.base = strings.TrimRight(u, "/") } }

// WithStateFile keeps the exports in the file at path so that Load
// restores them after a restart.
func WithStateFile(path string) Option { return func(s *Server) { s.state = path } }

// WithLogger sets where restore and expiry records go (slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(s *Server) { s.log = l } }

// New returns a Server without exports (Load restores those of the state
// file).
func New(opts ...Option) *Server {
	s := &Server{byTok: map[string]*export{}, byPath: map[string]*export{}, log: slog.Default()}
	for _, o := range opts {
		o(s)
	}
	return s
}

// Load opens again the exports the state file lists that have not expired,
// whose path still names the same file and passes check (nil: no check;
// the agent's checks that it is still inside a store it serves); the
// others are dropped (and logged). A missing state file is no exports; one that cannot be read or
// parsed is an error (class errdefs.ErrDataLoss). Without WithStateFile it
// does nothing.
func (s *Server) Load(check func(path string) error) error {
	if s.state == "" {
		return nil
	}
	b, err := os.ReadFile(s.state)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("exports: state file %s: %w", s.state, errors.Join(err, errdefs.ErrUnavailable))
	}
	var st stateFile
	if err := json.Unmarshal(b, &st); err != nil || st.Version != stateVersion {
		return fmt.Errorf("exports: state file %s: not a version %d state (%v): %w", s.state, stateVersion, err, errdefs.ErrDataLoss)
	}
	now := time.Now()
	kept := 0
	for _, e := range st.Exports {
		if _, err := TokenOf(e.Token); err != nil || !filepath.IsAbs(e.Path) || e.Users < 1 {
			s.log.Warn("exports: malformed entry in the state file dropped", "state", s.state)
			continue
		}
		x := &export{token: e.Token, path: e.Path, users: e.Users, expires: e.Expires, owner: e.Owner, created: e.Created, shared: e.SharedWith}
		if x.expired(now) {
			s.log.Info("exports: expired export dropped", "path", e.Path, "expired", e.Expires)
			continue
		}
		f, err := openRegular(e.Path)
		if err != nil {
			s.log.Warn("exports: export dropped: its file is gone", "path", e.Path, "err", err)
			continue
		}
		if fi, err := f.Stat(); err != nil || devIno(fi) != [2]uint64{e.Dev, e.Ino} {
			f.Close()
			s.log.Warn("exports: export dropped: its path names another file now", "path", e.Path)
			continue
		}
		if check != nil {
			if err := check(e.Path); err != nil {
				f.Close()
				s.log.Warn("exports: export dropped: its file may no longer be served", "path", e.Path, "err", err)
				continue
			}
		}
		x.f = f
		s.mu.Lock()
		s.byTok[x.token] = x
		if cur := s.byPath[x.path]; cur == nil || x.expires.IsZero() || (!cur.expires.IsZero() && x.expires.After(cur.expires)) {
			s.byPath[x.path] = x
		}
		s.mu.Unlock()
		kept++
	}
	s.log.Info("exports restored", "state", s.state, "kept", kept, "dropped", len(st.Exports)-kept)
	if kept != len(st.Exports) {
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
	st := stateFile{Version: stateVersion, Exports: []saved{}}
	s.mu.Lock()
	for _, x := range s.byTok {
		d := saved{Token: x.token, Path: x.path, Users: x.users, Expires: x.expires, Owner: x.owner, Created: x.created,
			SharedWith: append([]Owner(nil), x.shared...)}
		if fi, err := x.f.Stat(); err == nil {
			di := devIno(fi)
			d.Dev, d.Ino = di[0], di[1]
		}
		st.Exports = append(st.Exports, d)
	}
	s.mu.Unlock()
	sort.Slice(st.Exports, func(i, j int) bool { return st.Exports[i].Token < st.Exports[j].Token })
	if err := durable.WriteJSON(s.state, st); err != nil {
		return fmt.Errorf("exports: state file %s: %w", s.state, errors.Join(err, errdefs.ErrUnavailable))
	}
	return nil
}

// Run removes expired exports every SweepInterval until ctx ends.
func (s *Server) Run(ctx context.Context) {
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

// Sweep removes the exports expired at now; requests being served finish.
func (s *Server) Sweep(now time.Time) {
	var gone []*export
	s.mu.Lock()
	for tok, x := range s.byTok {
		if x.expired(now) {
			gone = append(gone, x)
			s.dropLocked(tok, x)
		}
	}
	var closeNow []*export
	for _, x := range gone {
		if x.refs == 0 {
			closeNow = append(closeNow, x)
		}
	}
	s.mu.Unlock()
	if len(gone) == 0 {
		return
	}
	for _, x := range closeNow {
		x.f.Close()
	}
	s.log.Info("exports expired", "count", len(gone))
	if err := s.save(); err != nil {
		s.log.Error("exports: save state after expiry", "err", err)
	}
}

// dropLocked removes x (under s.mu); its file is closed by whoever sees
// refs reach 0.
func (s *Server) dropLocked(tok string, x *export) {
	delete(s.byTok, tok)
	if s.byPath[x.path] == x {
		delete(s.byPath, x.path)
	}
	x.gone = true
}

// later is the later of two expiries, zero (never) being the latest.
func later(a, b time.Time) time.Time {
	if a.IsZero() || b.IsZero() {
		return time.Time{}
	}
	if a.After(b) {
		return a
	}
	return b
}

func openRegular(path string) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, errors.Join(err, errdefs.ErrNotFound)
		}
		return nil, errors.Join(err, errdefs.ErrFailedPrecondition)
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("not a regular file: %w", errdefs.ErrInvalid)
	}
	return f, nil
}

func devIno(fi fs.FileInfo) [2]uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return [2]uint64{uint64(st.Dev), st.Ino}
	}
	return [2]uint64{}
}

// SetBaseURL sets the URL exports are announced under, e.g.
// "http://10.0.0.5:8471" (the agent's advertise URL, known once it listens).
func (s *Server) SetBaseURL(u string) {
	s.mu.Lock()
	s.base = strings.TrimRight(u, "/")
	s.mu.Unlock()
}

// Export serves the regular file at path (a path on this machine) until
// expires (zero: until Unexport) for owner and returns its URL. Exporting a path that
// is already exported returns the same URL while the path still names the
// same file, with the later of the two expiries, and the export then lasts
// until every Export of it is matched by an Unexport (a migration's
// short-lived export of a template must not end the template mount's); once
// the path names another file (the old one renamed or replaced), a new
// export is made and the old one keeps serving the old file until it is
// unexported. The export records owner (see Owners in the package doc).
// Before SetBaseURL it is errdefs.ErrUnavailable; an expiry
// already past is errdefs.ErrInvalid. With a state file the export is
// recorded before Export returns.
func (s *Server) Export(path string, expires time.Time, owner Owner) (string, error) {
	if !expires.IsZero() && !time.Now().Before(expires) {
		return "", fmt.Errorf("export %s: expiry %s is past: %w", path, expires.UTC().Format(time.RFC3339), errdefs.ErrInvalid)
	}
	s.mu.Lock()
	base := s.base
	old := s.byPath[path]
	s.mu.Unlock()
	if old != nil && samePath(path, old.f) {
		s.mu.Lock()
		if !old.gone && !old.expired(time.Now()) {
			old.users++
			old.expires = later(old.expires, expires)
			old.join(owner)
			s.mu.Unlock()
			return s.saved(base+Prefix+old.token, old)
		}
		s.mu.Unlock()
	}
	if base == "" {
		return "", fmt.Errorf("export %s: the agent's URL is not known yet: %w", path, errdefs.ErrUnavailable)
	}
	f, err := openRegular(path)
	if err != nil {
		return "", fmt.Errorf("export %s: %w", path, err)
	}
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	x := &export{token: hex.EncodeToString(b[:]), path: path, f: f, users: 1, expires: expires, owner: owner, created: time.Now()}
	s.mu.Lock()
	if cur := s.byPath[path]; cur != nil && cur != old && !cur.gone && !cur.expired(time.Now()) && samePath(path, cur.f) { // a concurrent Export won
		cur.users++
		cur.expires = later(cur.expires, expires)
		cur.join(owner)
		s.mu.Unlock()
		f.Close()
		return s.saved(base+Prefix+cur.token, cur)
	}
	s.byTok[x.token] = x
	s.byPath[path] = x
	s.mu.Unlock()
	return s.saved(base+Prefix+x.token, x)
}

// saved records the state after an Export of x; when that fails the
// Export is taken back (the caller would hold a URL a restart forgets).
func (s *Server) saved(u string, x *export) (string, error) {
	if err := s.save(); err != nil {
		_ = s.Unexport(x.token)
		return "", fmt.Errorf("export %s: %w", x.path, err)
	}
	return u, nil
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
		return s.save()
	}
	closeNow := false
	if ok {
		s.dropLocked(tok, x)
		closeNow = x.refs == 0
	}
	s.mu.Unlock()
	if closeNow {
		x.f.Close()
	}
	if ok {
		return s.save()
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

// Info describes one live export (List).
type Info struct {
	// URL is the export's URL under the current base URL: what Export
	// returned, unless SetBaseURL changed since (Unexport takes either:
	// it goes by the token). It carries the token, a capability: never
	// log it.
	URL     string
	Path    string
	Owner   Owner
	Created time.Time // zero: made before it was recorded
	Expires time.Time // zero: never
	// SharedWith are the Owners of the Exports that joined this one
	// (oldest first), and Users how many Exports of it are not yet matched
	// by an Unexport.
	SharedWith []Owner
	Users      int
}

// List returns the live (not expired) exports, by token.
func (s *Server) List() []Info {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Info, 0, len(s.byTok))
	for _, x := range s.byTok {
		if x.expired(now) {
			continue
		}
		out = append(out, Info{URL: s.base + Prefix + x.token, Path: x.path, Owner: x.owner, Created: x.created, Expires: x.expires,
			SharedWith: append([]Owner(nil), x.shared...), Users: x.users})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].URL < out[j].URL })
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
	if x != nil && x.expired(time.Now()) {
		x = nil // answered as an unknown token: nothing tells it existed
	}
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

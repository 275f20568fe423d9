package exports

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/errdefs"
)

func TestExportServesRangesUntilUnexport(t *testing.T) {
	x := New()
	mux := http.NewServeMux()
	mux.Handle(Prefix, x)
	srv := httptest.NewServer(mux)
	defer srv.Close()

	p := filepath.Join(t.TempDir(), "disk.raw")
	data := bytes.Repeat([]byte("0123456789abcdef"), 4096)
	os.WriteFile(p, data, 0o644)

	if _, err := x.Export(p, time.Time{}, Owner{}); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("export before the base URL is known: %v", err)
	}
	x.SetBaseURL(srv.URL + "/")
	u, err := x.Export(p, time.Time{}, Owner{})
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := TokenOf(u)
	if !strings.HasPrefix(u, srv.URL+Prefix) || len(tok) != 32 {
		t.Fatalf("export URL %q", u)
	}
	if again, _ := x.Export(p, time.Time{}, Owner{}); again != u {
		t.Fatalf("second export of the same path: %q, want %q", again, u)
	}

	req, _ := http.NewRequest(http.MethodGet, u, nil)
	req.Header.Set("Range", "bytes=16-31")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusPartialContent || string(body) != "0123456789abcdef" || resp.Header.Get("ETag") == "" {
		t.Fatalf("range GET: %s %q etag=%q", resp.Status, body, resp.Header.Get("ETag"))
	}
	resp, err = http.Head(u)
	if err != nil || resp.StatusCode != http.StatusOK || resp.ContentLength != int64(len(data)) {
		t.Fatalf("HEAD: %v %v", resp, err)
	}
	// Replacing the path does not change what the export serves; exporting
	// the path again exports the new file under a new token.
	os.Rename(p, p+".old")
	os.WriteFile(p, []byte("other"), 0o644)
	resp, _ = http.Get(u)
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if !bytes.Equal(body, data) {
		t.Fatalf("export followed the path instead of the file (%d bytes)", len(body))
	}
	u2, err := x.Export(p, time.Time{}, Owner{})
	if err != nil || u2 == u {
		t.Fatalf("export of a replaced path: %q %v", u2, err)
	}
	resp, _ = http.Get(u2)
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "other" {
		t.Fatalf("new export serves %q", body)
	}
	if err := x.Unexport(u2); err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{http.MethodPut, http.MethodDelete, http.MethodPost} {
		req, _ := http.NewRequest(m, u, strings.NewReader("x"))
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != http.StatusMethodNotAllowed {
			t.Fatalf("%s: %v %v", m, resp, err)
		}
		resp.Body.Close()
	}
	if resp, _ := http.Get(srv.URL + Prefix + strings.Repeat("0", 32)); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("unknown token: %s", resp.Status)
	}
	// u was exported twice (two users, e.g. the template mount and a
	// migration's copy): the first Unexport leaves it serving.
	if err := x.Unexport(u); err != nil {
		t.Fatal(err)
	}
	if resp, _ := http.Get(u); resp.StatusCode != http.StatusOK {
		t.Fatalf("after one of two unexports: %s", resp.Status)
	}
	if err := x.Unexport(u); err != nil {
		t.Fatalf("second unexport: %v", err)
	}
	if resp, _ := http.Get(u); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("after unexport: %s", resp.Status)
	}
	if err := x.Unexport(u); err != nil {
		t.Fatalf("third unexport: %v", err)
	}
	if err := x.Unexport("http://h/not-an-export"); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("unexport of a bad URL: %v", err)
	}
	if _, err := x.Export(filepath.Join(t.TempDir(), "missing"), time.Time{}, Owner{}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("export of a missing file: %v", err)
	}
	if _, err := x.Export(t.TempDir(), time.Time{}, Owner{}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("export of a directory: %v", err)
	}
}

func get(t *testing.T, u string) (int, string) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestExportExpires: an expired token is a plain 404, Sweep removes it
// (the state file with it), a past expiry is refused, and a second Export
// of the path keeps the later expiry.
func TestExportExpires(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state", "exports.json")
	x := New(WithStateFile(state))
	srv := httptest.NewServer(x)
	defer srv.Close()
	x.SetBaseURL(srv.URL)
	p := filepath.Join(dir, "a.raw")
	os.WriteFile(p, []byte("secret bytes"), 0o600)

	if _, err := x.Export(p, time.Now().Add(-time.Second), Owner{}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("export with a past expiry: %v", err)
	}
	u, err := x.Export(p, time.Now().Add(200*time.Millisecond), Owner{})
	if err != nil {
		t.Fatal(err)
	}
	if code, body := get(t, u); code != http.StatusOK || body != "secret bytes" {
		t.Fatalf("before expiry: %d %q", code, body)
	}
	time.Sleep(250 * time.Millisecond)
	code, body := get(t, u)
	_, unknown := get(t, srv.URL+Prefix+strings.Repeat("ab", 16))
	if code != http.StatusNotFound || body != unknown {
		t.Fatalf("expired token: %d %q (an unknown one: %q)", code, body, unknown)
	}
	x.Sweep(time.Now())
	if len(x.Exported()) != 0 {
		t.Fatalf("after sweep: %v", x.Exported())
	}
	b, _ := os.ReadFile(state)
	if strings.Contains(string(b), "a.raw") {
		t.Fatalf("state after sweep:\n%s", b)
	}

	soon := time.Now().Add(time.Minute)
	u1, _ := x.Export(p, soon, Owner{})
	u2, _ := x.Export(p, time.Time{}, Owner{})
	if u1 != u2 {
		t.Fatalf("two exports of one path: %s %s", u1, u2)
	}
	x.Sweep(soon.Add(time.Second))
	if code, _ := get(t, u1); code != http.StatusOK {
		t.Fatalf("export with a later (no) expiry ended at the first's: %d", code)
	}
}

// TestExportRestore: a new Server loading the same state file serves the
// same URLs for exports still valid, and drops the expired, the missing and
// the replaced ones. The state file holds no file content and is 0600.
func TestExportRestore(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "exports.json")
	mk := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	keep, exp, gone, repl := mk("keep.raw", "KEEPDATA"), mk("exp.raw", "EXPDATA"), mk("gone.raw", "GONEDATA"), mk("repl.raw", "REPLDATA")

	x1 := New(WithStateFile(state), WithBaseURL("http://agent:8471"))
	uKeep, err := x1.Export(keep, time.Now().Add(time.Hour), Owner{})
	if err != nil {
		t.Fatal(err)
	}
	x1.Export(keep, time.Time{}, Owner{}) // two users
	uExp, _ := x1.Export(exp, time.Now().Add(300*time.Millisecond), Owner{})
	x1.Export(gone, time.Time{}, Owner{})
	x1.Export(repl, time.Time{}, Owner{})
	b, _ := os.ReadFile(state)
	for _, data := range []string{"KEEPDATA", "EXPDATA", "GONEDATA", "REPLDATA"} {
		if strings.Contains(string(b), data) {
			t.Fatalf("state file holds file content:\n%s", b)
		}
	}
	if fi, _ := os.Stat(state); fi.Mode().Perm() != 0o600 {
		t.Fatalf("state file mode %v", fi.Mode())
	}
	time.Sleep(350 * time.Millisecond)
	os.Remove(gone)
	os.Remove(repl)
	mk("repl.raw", "OTHER")

	x2 := New(WithStateFile(state))
	saved, _ := os.ReadFile(state)
	if refused := New(WithStateFile(state)); refused.Load(func(string) error { return errdefs.ErrPermissionDenied }) != nil || len(refused.Exported()) != 0 {
		t.Fatal("a refusing check kept exports")
	}
	os.WriteFile(state, saved, 0o600) // that Load rewrote it without them
	if err := x2.Load(nil); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(x2)
	defer srv.Close()
	x2.SetBaseURL(srv.URL)
	if got := x2.Exported(); len(got) != 1 || got[0] != keep {
		t.Fatalf("restored %v, want only %s", got, keep)
	}
	tok, _ := TokenOf(uKeep)
	if code, body := get(t, srv.URL+Prefix+tok); code != http.StatusOK || body != "KEEPDATA" {
		t.Fatalf("restored export: %d %q", code, body)
	}
	tok, _ = TokenOf(uExp)
	if code, _ := get(t, srv.URL+Prefix+tok); code != http.StatusNotFound {
		t.Fatalf("expired export after restore: %d", code)
	}
	// the use count survived: one Unexport leaves it served
	if err := x2.Unexport(uKeep); err != nil {
		t.Fatal(err)
	}
	if again, _ := x2.Export(keep, time.Time{}, Owner{}); !strings.HasSuffix(again, Prefix+strings.TrimPrefix(uKeep, "http://agent:8471"+Prefix)) {
		t.Fatalf("export after restore: %s, want the restored token", again)
	}

	os.WriteFile(state, []byte("{not json"), 0o600)
	if err := New(WithStateFile(state)).Load(nil); !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("corrupt state: %v", err)
	}
}

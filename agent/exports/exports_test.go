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

	if _, err := x.Export(p); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("export before the base URL is known: %v", err)
	}
	x.SetBaseURL(srv.URL + "/")
	u, err := x.Export(p)
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := TokenOf(u)
	if !strings.HasPrefix(u, srv.URL+Prefix) || len(tok) != 32 {
		t.Fatalf("export URL %q", u)
	}
	if again, _ := x.Export(p); again != u {
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
	u2, err := x.Export(p)
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
	if _, err := x.Export(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("export of a missing file: %v", err)
	}
	if _, err := x.Export(t.TempDir()); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("export of a directory: %v", err)
	}
}

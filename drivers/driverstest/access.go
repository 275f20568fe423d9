package driverstest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/stowage/stowage/datapath/nbd"
	"github.com/stowage/stowage/drivers"
	"github.com/stowage/stowage/errdefs"
)

// time0 is the modification time the suite's HTTP server announces.
var time0 = time.Time{}

// fetch reads an http(s) URI, or a plain nbd:// export (status 200 when
// it could be read whole, 0 when it could not be reached); ok is false for
// any other scheme.
func fetch(t *testing.T, uri drivers.URI) (body []byte, status int, ok bool) {
	t.Helper()
	u, err := url.Parse(string(uri))
	if err == nil && u.Scheme == "nbd" {
		c, err := nbd.Dial(t.Context(), string(uri), nbd.ClientOptions{})
		if err != nil {
			return nil, 0, true
		}
		defer c.Close()
		b := make([]byte, c.Size())
		if _, err := c.ReadAt(b, 0); err != nil {
			t.Fatalf("read %s: %v", uri, err)
		}
		return b, http.StatusOK, true
	}
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, 0, false
	}
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, string(uri), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, 0, true
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read %s: %v", uri, err)
	}
	return b, resp.StatusCode, true
}

// wantBytes checks obj's bytes by reading them from e.Remote through an
// http(s) URI the driver grants for reading; without a remote host or
// such a URI it only logs.
func wantBytes(t *testing.T, e Env, obj drivers.DataObject, want []byte, what string) {
	t.Helper()
	if e.Remote == "" {
		t.Logf("%s: no remote host, bytes not checked", what)
		return
	}
	d := e.Provider.Driver()
	client := drivers.Client{HostID: e.Remote, Purpose: drivers.PurposeRead, Transport: "http"}
	a, err := d.GrantAccess(t.Context(), obj, client)
	if errors.Is(err, errdefs.ErrFailedPrecondition) {
		// No http(s) read access: the driver's own kind (an NBD export).
		client.Transport = ""
		a, err = d.GrantAccess(t.Context(), obj, client)
	}
	if err != nil {
		t.Errorf("%s: GrantAccess to read over http: %v", what, err)
		return
	}
	defer func() {
		if err := d.RevokeAccess(t.Context(), obj, client, a); err != nil {
			t.Errorf("%s: RevokeAccess: %v", what, err)
		}
	}()
	got, status, ok := fetch(t, a.URI)
	switch {
	case !ok:
		t.Logf("%s: read access %s is not http(s), bytes not checked", what, a.URI)
	case status != http.StatusOK:
		t.Errorf("%s: GET %s: status %d", what, a.URI, status)
	case !bytes.Equal(got, want):
		t.Errorf("%s: the %d bytes read differ from the %d expected", what, len(got), len(want))
	}
}

func testAccess(t *testing.T, e Env) {
	ctx := t.Context()
	d := e.Provider.Driver()
	info := attached(t, e)
	obj, content := source(t, e, info, "access-1")

	type grant struct {
		host      string
		purpose   drivers.Purpose
		transport string
		// mustWork: the workflows need this grant.
		mustWork bool
	}
	grants := []grant{
		{e.Client, drivers.PurposeAttach, "", info.Role == drivers.RolePrimary},
		{e.Client, drivers.PurposeRead, "", true},
		// A store that takes objects only by import (an object store) may
		// refuse host writes; a primary or host-rooted store must not.
		{e.Client, drivers.PurposeWrite, "", writable(e)},
	}
	if e.Remote != "" {
		grants = append(grants,
			grant{e.Remote, drivers.PurposeAttach, "", false},
			grant{e.Remote, drivers.PurposeRead, "", true},
			grant{e.Remote, drivers.PurposeRead, "nbd", false},
			grant{e.Remote, drivers.PurposeWrite, "", false},
		)
	}
	for _, g := range grants {
		client := drivers.Client{HostID: g.host, Purpose: g.purpose, Transport: g.transport}
		name := fmt.Sprintf("%s for %s (transport %q)", g.purpose, g.host, g.transport)
		a, err := d.GrantAccess(ctx, obj, client)
		if err != nil {
			if g.mustWork || !errors.Is(err, errdefs.ErrFailedPrecondition) && !errors.Is(err, errdefs.ErrNotImplemented) {
				t.Errorf("GrantAccess %s: %v", name, err)
			} else {
				t.Logf("GrantAccess %s: refused: %v", name, err)
			}
			continue
		}
		u, err := url.Parse(string(a.URI))
		if err != nil || u.Scheme == "" {
			t.Errorf("GrantAccess %s = %q: not a URI with a scheme (%v)", name, a.URI, err)
		}
		if g.transport != "" && u != nil && u.Scheme != g.transport {
			t.Errorf("GrantAccess %s = %q, want a %s URI", name, a.URI, g.transport)
		}
		if g.purpose == drivers.PurposeWrite && a.ReadOnly {
			t.Errorf("GrantAccess %s = %+v is read-only", name, a)
		}
		if g.purpose == drivers.PurposeRead && content != nil {
			if got, status, ok := fetch(t, a.URI); ok && (status != http.StatusOK || !bytes.Equal(got, content)) {
				t.Errorf("GrantAccess %s = %s: GET gives status %d and %d bytes, want the object's %d", name, a.URI, status, len(got), len(content))
			}
		}
		t.Logf("GrantAccess %s = %+v", name, a)
		for i := range 2 {
			if err := d.RevokeAccess(ctx, obj, client, a); err != nil {
				t.Errorf("RevokeAccess %s (%d): %v", name, i+1, err)
			}
		}
		if a.Revocable {
			if _, status, ok := fetch(t, a.URI); ok && status == http.StatusOK {
				t.Errorf("after RevokeAccess %s, GET %s still works", name, a.URI)
			}
		}
	}
	if _, err := d.GrantAccess(ctx, obj, drivers.Client{HostID: e.Client, Purpose: "bogus"}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("GrantAccess for an unknown purpose: err = %v, want ErrInvalid", err)
	}
	remove(t, d, obj)
}

// writable reports whether hosts in scope must be able to write e's
// store's objects: primary stores and stores that are host directories.
func writable(e Env) bool {
	_, rooted := e.Provider.(drivers.HostRooted)
	return e.Spec.Role == drivers.RolePrimary || rooted
}

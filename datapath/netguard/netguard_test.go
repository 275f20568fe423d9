package netguard

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"

	"github.com/stowage/stowage/errdefs"
)

func TestCheck(t *testing.T) {
	g, err := Parse("")
	if err != nil {
		t.Fatal(err)
	}
	for addr, rule := range map[string]string{
		"127.0.0.1": "loopback", "::1": "loopback", "169.254.169.254": "link-local", "fe80::1": "link-local",
		"10.1.2.3": "private", "172.16.0.1": "private", "192.168.1.1": "private", "fd00::1": "private",
		"100.64.0.1": "shared", "0.0.0.0": "unspecified", "239.1.1.1": "multicast", "::ffff:127.0.0.1": "loopback",
	} {
		err := g.Check(netip.MustParseAddr(addr))
		if !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), rule) || !strings.Contains(err.Error(), "--fetch-allow-cidrs") {
			t.Errorf("Check(%s) = %v, want a refusal naming %q and the flag", addr, err, rule)
		}
	}
	for _, addr := range []string{"93.184.216.34", "2606:2800:220:1::1"} {
		if err := g.Check(netip.MustParseAddr(addr)); err != nil {
			t.Errorf("Check(%s) = %v, want allowed", addr, err)
		}
	}
	allowed, err := Parse("127.0.0.0/8, 10.0.0.5")
	if err != nil {
		t.Fatal(err)
	}
	for _, addr := range []string{"127.0.0.1", "10.0.0.5"} {
		if err := allowed.Check(netip.MustParseAddr(addr)); err != nil {
			t.Errorf("allowed Check(%s) = %v", addr, err)
		}
	}
	if err := allowed.Check(netip.MustParseAddr("10.0.0.6")); err == nil {
		t.Error("10.0.0.6 passed an allow list of 10.0.0.5 only")
	}
	if _, err := Parse("10.0.0.0/33"); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("bad CIDR: %v", err)
	}
}

// A guarded client refuses loopback at dial time, also when a name
// resolves there and when an allowed server redirects there.
func TestClientDialTime(t *testing.T) {
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "secret") }))
	defer target.Close()
	g, _ := Parse("")
	for _, u := range []string{target.URL, strings.Replace(target.URL, "127.0.0.1", "localhost", 1)} {
		if _, err := g.Client(nil).Get(u); !errors.Is(err, errdefs.ErrPermissionDenied) {
			t.Errorf("GET %s: %v, want permission denied at dial time", u, err)
		}
	}
	// Allowed (loopback here), the client reaches a server that
	// redirects, and redirects are capped.
	redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, target.URL, http.StatusFound)
	}))
	defer redirector.Close()
	allowOne, _ := Parse("127.0.0.1")
	loop := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, r.URL.String(), http.StatusFound)
	}))
	defer loop.Close()
	if _, err := allowOne.Client(nil).Get(loop.URL); !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), "redirects") {
		t.Errorf("a redirect loop: %v, want refused after %d redirects", err, MaxRedirects)
	}
	resp, err := allowOne.Client(nil).Get(redirector.URL)
	if err != nil {
		t.Fatalf("allowed: %v", err)
	}
	resp.Body.Close()
}

// A redirect may not drop from https to plain http (a plain-http template
// needs a checksum; an https one does not).
func TestNoDowngradeRedirect(t *testing.T) {
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "bytes") }))
	defer plain.Close()
	secure := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, plain.URL, http.StatusFound)
	}))
	defer secure.Close()
	g, _ := Parse("127.0.0.1")
	c := g.Client(nil)
	c.Transport.(*http.Transport).TLSClientConfig = secure.Client().Transport.(*http.Transport).TLSClientConfig
	if _, err := c.Get(secure.URL); !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), "plain http") {
		t.Fatalf("https redirected to http: %v, want refused", err)
	}
}

package netguard

import (
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/stowage/stowage/errdefs"
)

func TestCheck(t *testing.T) {
	g, err := Parse("")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ addr, rule string }{
		{"127.0.0.1", "loopback"}, {"::1", "loopback"},
		{"169.254.169.254", "link-local"}, {"fe80::1", "link-local"},
		{"10.1.2.3", "private"}, {"172.16.0.1", "private"}, {"192.168.1.1", "private"},
		{"fd00::1", "unique-local (fc00::/7)"}, {"fc00::1", "unique-local"}, {"fec0::1", "site-local (fec0::/10)"},
		{"100.64.0.1", "private: shared address space"}, {"100.127.255.254", "carrier-grade NAT"},
		{"0.0.0.0", "unspecified"}, {"0.1.2.3", "unspecified (0.0.0.0/8"}, {"::", "unspecified"},
		{"255.255.255.255", "broadcast"}, {"240.0.0.1", "reserved (240.0.0.0/4)"}, {"250.1.2.3", "reserved"},
		{"239.1.1.1", "multicast"}, {"224.0.1.1", "multicast"}, {"ff02::1", "link-local"}, {"ff05::2", "multicast"},
		{"::ffff:127.0.0.1", "address 127.0.0.1 is loopback"}, {"::ffff:10.0.0.1", "private"},
		{"::ffff:169.254.169.254", "link-local"}, {"::10.0.0.1", "IPv4-compatible"},
		{"64:ff9b::7f00:1", "NAT64 (64:ff9b::/96) embedding 127.0.0.1"}, {"64:ff9b::a9fe:a9fe", "link-local"},
		{"64:ff9b::10.1.2.3", "private"}, {"64:ff9b:1::1", "local-use NAT64"},
		{"2002:c0a8:0101::1", "6to4 (2002::/16) embedding 192.168.1.1"}, {"2002:7f00:1::", "loopback"},
		{"2002:a9fe:a9fe::1", "link-local"}, {"fe80::1%eth0", "zone"}, {"2606:2800:220:1::1%eth0", "zone"},
	} {
		err := g.Check(netip.MustParseAddr(c.addr))
		if !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), c.rule) {
			t.Errorf("Check(%s) = %v, want a refusal naming %q", c.addr, err, c.rule)
		} else if !strings.Contains(err.Error(), "--fetch-allow-cidrs") && !strings.Contains(err.Error(), "zone") {
			t.Errorf("Check(%s) = %v, want the flag named", c.addr, err)
		}
	}
	// Public IPv4 inside NAT64 and 6to4, and public addresses, pass.
	for _, addr := range []string{"64:ff9b::5db8:d822", "2002:5db8:d822::1", "::ffff:93.184.216.34", "100.128.0.1", "223.255.255.255"} {
		if err := g.Check(netip.MustParseAddr(addr)); err != nil {
			t.Errorf("Check(%s) = %v, want allowed", addr, err)
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
	// The allow list also judges the IPv4 a mapped or embedding address carries.
	for _, addr := range []string{"::ffff:10.0.0.5", "64:ff9b::10.0.0.5", "2002:0a00:0005::1"} {
		if err := allowed.Check(netip.MustParseAddr(addr)); err != nil {
			t.Errorf("allowed Check(%s) = %v", addr, err)
		}
	}
	// A zone is refused even where its address is allowed.
	linkOK, _ := Parse("fe80::/10")
	if err := linkOK.Check(netip.MustParseAddr("fe80::1%lo")); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("zoned fe80::1 with fe80::/10 allowed: %v, want refused", err)
	}
	// At dial time the address comes with its zone, and is refused too.
	if err := linkOK.control("tcp6", "[fe80::1%lo]:80", nil); !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), "zone") {
		t.Errorf("dialing a zoned address: %v, want refused naming the zone", err)
	}
	if err := linkOK.control("tcp6", "[fe80::1]:80", nil); err != nil {
		t.Errorf("dialing an allowed link-local address: %v", err)
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

// CheckURL refuses a literal IPv6 zone in a URL, escaped or not.
func TestCheckURLZone(t *testing.T) {
	for raw, bad := range map[string]bool{
		"http://[fe80::1%25eth0]/img": true, "http://[fe80::1%25lo]:8080/": true,
		"https://[2001:db8::1]/img": false, "http://example.com/a%25b": false,
	} {
		u, err := url.Parse(raw)
		if err != nil {
			t.Fatalf("%s: %v", raw, err)
		}
		err = CheckURL(u)
		if got := err != nil; got != bad || (bad && (!errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), "zone"))) {
			t.Errorf("CheckURL(%s) = %v, want refused: %v", raw, err, bad)
		}
	}
}

// A redirect chain across real servers on loopback: each hop is checked
// when dialed, so an allowed server cannot hand the download on to a
// refused address (127.0.0.2 here, also spelt as a mapped IPv6 address, and
// a zoned link-local literal); the refused server never sees a request.
func TestRedirectChain(t *testing.T) {
	var hits atomic.Int32
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Skipf("cannot listen on 127.0.0.2: %v", err)
	}
	target := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		io.WriteString(w, "secret")
	}))
	target.Listener.Close()
	target.Listener = ln
	target.Start()
	defer target.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())

	hop := func(next string) *httptest.Server {
		return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, next, http.StatusFound)
		}))
	}
	g, _ := Parse("127.0.0.1") // the hops are allowed, 127.0.0.2 is not
	for _, c := range []struct{ last, rule string }{
		{target.URL + "/img", "address 127.0.0.2 is loopback"},
		{"http://[::ffff:127.0.0.2]:" + port + "/img", "address 127.0.0.2 is loopback"},
		{"http://[fe80::1%25lo]:" + port + "/img", "zone"},
	} {
		second := hop(c.last)
		first := hop(second.URL + "/next")
		_, err := g.Client(nil).Get(first.URL)
		first.Close()
		second.Close()
		if !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), c.rule) {
			t.Errorf("chain to %s: %v, want refused naming %q", c.last, err, c.rule)
		}
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("the refused server answered %d requests", n)
	}
	// Allowed, the same chain arrives.
	both, _ := Parse("127.0.0.1, 127.0.0.2")
	second := hop(target.URL + "/img")
	defer second.Close()
	first := hop(second.URL)
	defer first.Close()
	resp, err := both.Client(nil).Get(first.URL)
	if err != nil {
		t.Fatalf("allowed chain: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "secret" || hits.Load() != 1 {
		t.Errorf("allowed chain: %q, %d hits", body, hits.Load())
	}
}

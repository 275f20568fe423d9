// Package netguard decides which addresses a download of a user-supplied
// URL (a template or ISO) may connect to. A URL is the operator's input,
// not trust: without a guard a template URL could make an agent, running
// as root on the management network, read the controller's API on
// loopback, a cloud's metadata service on 169.254.169.254 or any private
// host. The check runs at dial time on the resolved address
// (net.Dialer.Control), so DNS answers and redirects cannot get around it;
// redirects are capped and must stay http(s).
//
//	g, err := netguard.Parse("10.1.0.0/16")  // the CIDRs the operator allows
//	client := g.Client(nil)                  // for the download only
//
// Refused unless allowed, each refusal naming its rule: unspecified
// (0.0.0.0/8, ::), loopback, link-local (incl. metadata), broadcast
// (255.255.255.255), reserved (240.0.0.0/4, the deprecated
// IPv4-compatible ::/96), multicast, and private: RFC 1918, the shared
// address space 100.64.0.0/10 (carrier-grade NAT), unique-local fc00::/7,
// site-local fec0::/10 and local-use NAT64 64:ff9b:1::/48. An IPv4-mapped
// address (::ffff:a.b.c.d) is judged as its IPv4; so are the IPv4
// addresses that NAT64 (64:ff9b::/96) and 6to4 (2002::/16) addresses
// embed. A literal IPv6 zone (http://[fe80::1%25eth0]/) is refused in any
// URL, allowed or not (CheckURL; at dial time too). Every refusal is
// errdefs.ErrPermissionDenied.
package netguard

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/stowage/stowage/errdefs"
)

// MaxRedirects caps the redirects a guarded download follows.
const MaxRedirects = 5

// Guard is a policy: the allowed CIDRs override the refused ranges.
type Guard struct {
	allow []netip.Prefix
}

// Parse reads a comma-separated list of CIDRs (or single addresses) to
// allow; "" allows none.
func Parse(list string) (*Guard, error) {
	g := &Guard{}
	for _, f := range strings.Split(list, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			a, aerr := netip.ParseAddr(f)
			if aerr != nil {
				return nil, fmt.Errorf("allowed address %q: want a CIDR such as 10.0.0.0/8 or an address: %w", f, errors.Join(err, errdefs.ErrInvalid))
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		g.allow = append(g.allow, p.Masked())
	}
	return g, nil
}

// Ranges netip has no predicate for.
var (
	thisNet   = netip.MustParsePrefix("0.0.0.0/8")      // "this network": unspecified as a destination
	shared    = netip.MustParsePrefix("100.64.0.0/10")  // carrier-grade NAT: private in all but name
	reserved4 = netip.MustParsePrefix("240.0.0.0/4")    // reserved for future use (class E)
	broadcast = netip.MustParseAddr("255.255.255.255")  // limited broadcast
	siteLocal = netip.MustParsePrefix("fec0::/10")      // deprecated site-local: private
	uniqLocal = netip.MustParsePrefix("fc00::/7")       // unique-local: private
	compat4   = netip.MustParsePrefix("::/96")          // deprecated IPv4-compatible (::a.b.c.d)
	nat64     = netip.MustParsePrefix("64:ff9b::/96")   // well-known NAT64: the last 32 bits are an IPv4
	nat64Loc  = netip.MustParsePrefix("64:ff9b:1::/48") // local-use NAT64 (RFC 8215): private
	sixToFour = netip.MustParsePrefix("2002::/16")      // 6to4: bits 16-47 are an IPv4
)

// Check refuses addr unless it is public or allowed. An IPv4-mapped IPv6
// address (::ffff:a.b.c.d) is judged as the IPv4 inside, and so are the
// IPv4 addresses NAT64 (64:ff9b::/96) and 6to4 (2002::/16) embed: a
// gateway would turn them into a connection to that IPv4. An address with
// a zone (fe80::1%eth0) is always refused.
func (g *Guard) Check(addr netip.Addr) error {
	if addr.Zone() != "" {
		return zoneError(addr.String())
	}
	addr = addr.Unmap()
	if g.allowed(addr) {
		return nil
	}
	rule := rule(addr)
	if rule == "" && addr.Is6() {
		if v4, via := embedded(addr); v4.IsValid() {
			if err := g.Check(v4); err != nil {
				return fmt.Errorf("address %s is %s embedding %s: %w", addr, via, v4, err)
			}
			return nil
		}
	}
	if rule == "" {
		return nil
	}
	return fmt.Errorf("address %s is %s: a template URL may not reach it (allow it with --fetch-allow-cidrs): %w", addr, rule, errdefs.ErrPermissionDenied)
}

func (g *Guard) allowed(addr netip.Addr) bool {
	for _, p := range g.allow {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// rule names the refused range addr is in ("" for none).
func rule(addr netip.Addr) string {
	switch {
	case addr.IsUnspecified() || thisNet.Contains(addr):
		return "unspecified (0.0.0.0/8, ::)"
	case addr.IsLoopback():
		return "loopback"
	case addr.IsLinkLocalUnicast() || addr.IsLinkLocalMulticast():
		return "link-local (cloud metadata lives there)"
	case addr == broadcast:
		return "broadcast (255.255.255.255)"
	case reserved4.Contains(addr):
		return "reserved (240.0.0.0/4)"
	case addr.IsMulticast():
		return "multicast"
	case uniqLocal.Contains(addr):
		return "private: unique-local (fc00::/7)"
	case siteLocal.Contains(addr):
		return "private: site-local (fec0::/10)"
	case addr.IsPrivate():
		return "private"
	case shared.Contains(addr):
		return "private: shared address space (100.64.0.0/10, carrier-grade NAT)"
	case nat64Loc.Contains(addr):
		return "private: local-use NAT64 (64:ff9b:1::/48)"
	case compat4.Contains(addr):
		return "reserved: IPv4-compatible IPv6 (::/96, deprecated)"
	}
	return ""
}

// embedded returns the IPv4 address a NAT64 or 6to4 address carries, and
// which of the two it is.
func embedded(addr netip.Addr) (netip.Addr, string) {
	b := addr.As16()
	switch {
	case nat64.Contains(addr):
		return netip.AddrFrom4([4]byte(b[12:16])), "NAT64 (64:ff9b::/96)"
	case sixToFour.Contains(addr):
		return netip.AddrFrom4([4]byte(b[2:6])), "6to4 (2002::/16)"
	}
	return netip.Addr{}, ""
}

func zoneError(host string) error {
	return fmt.Errorf("address %s has an IPv6 zone: a literal zone (fe80::1%%eth0) picks a network interface of the host and is never accepted in a template URL: %w", host, errdefs.ErrPermissionDenied)
}

// CheckURL refuses what the address of u alone tells: a literal IPv6
// address with a zone ([fe80::1%25eth0]). Everything else is decided at
// dial time.
func CheckURL(u *url.URL) error {
	if h := u.Hostname(); strings.Contains(h, "%") {
		return zoneError(h)
	}
	return nil
}

// control is the net.Dialer hook: it checks the address being dialed.
func (g *Guard) control(network, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("dial %s: %w", address, errors.Join(err, errdefs.ErrPermissionDenied))
	}
	return g.Check(ap.Addr())
}

// Client returns an HTTP client whose every connection is checked by g
// and that follows at most MaxRedirects redirects, each to http(s). base,
// when given, lends its timeout; its transport is not reused.
func (g *Guard) Client(base *http.Client) *http.Client {
	d := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second, Control: g.control}
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Proxy = nil // a proxy would dial on our behalf, past the guard
	t.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		return d.DialContext(ctx, network, addr)
	}
	t.MaxIdleConnsPerHost = 16
	c := &http.Client{Transport: t}
	if base != nil {
		c.Timeout = base.Timeout
	}
	c.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		if len(via) >= MaxRedirects {
			return fmt.Errorf("more than %d redirects: %w", MaxRedirects, errdefs.ErrPermissionDenied)
		}
		if err := CheckURL(req.URL); err != nil {
			return err
		}
		if req.URL.Scheme != "http" && req.URL.Scheme != "https" {
			return fmt.Errorf("redirect to a %s URL: only http and https: %w", req.URL.Scheme, errdefs.ErrPermissionDenied)
		}
		if req.URL.Scheme == "http" && via[0].URL.Scheme == "https" {
			// A plain-http template needs a checksum; an https one does
			// not, so it may not be handed over to plain http.
			return fmt.Errorf("redirect from https to plain http (%s): %w", req.URL.Host, errdefs.ErrPermissionDenied)
		}
		return nil
	}
	return c
}

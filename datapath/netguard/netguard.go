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
// Refused unless allowed: loopback, private (RFC 1918, fc00::/7),
// link-local (incl. metadata), unspecified, multicast and the shared
// address space (100.64.0.0/10). Every refusal names the rule and is
// errdefs.ErrPermissionDenied.
package netguard

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
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

// shared is 100.64.0.0/10, the carrier-grade NAT range.
var shared = netip.MustParsePrefix("100.64.0.0/10")

// Check refuses addr unless it is public or allowed.
func (g *Guard) Check(addr netip.Addr) error {
	addr = addr.Unmap()
	for _, p := range g.allow {
		if p.Contains(addr) {
			return nil
		}
	}
	var rule string
	switch {
	case addr.IsLoopback():
		rule = "loopback"
	case addr.IsLinkLocalUnicast() || addr.IsLinkLocalMulticast():
		rule = "link-local (cloud metadata lives there)"
	case addr.IsPrivate():
		rule = "private"
	case shared.Contains(addr):
		rule = "shared address space (100.64.0.0/10)"
	case addr.IsUnspecified():
		rule = "unspecified"
	case addr.IsMulticast():
		rule = "multicast"
	default:
		return nil
	}
	return fmt.Errorf("address %s is %s: a template URL may not reach it (allow it with --fetch-allow-cidrs): %w", addr, rule, errdefs.ErrPermissionDenied)
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

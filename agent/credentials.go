package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/errdefs/errconnect"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/trust"
)

// Credentials are the agent's identity: its key pair (a certificate from
// the controller's CA naming its host id, renewed while the agent runs)
// and the CA certificate it trusts.
type Credentials struct {
	KeyPair *trust.KeyPair
	CA      *x509.Certificate
	// Dir is where the pair is stored (renewals are written there).
	Dir string
}

// PKIDir is where an agent keeps its key pair, beneath its state directory.
func PKIDir(stateDir string) string { return filepath.Join(stateDir, "pki") }

// Roots is the pool of the controller's CA alone: for peers (the
// controller, other agents).
func (c *Credentials) Roots() *x509.CertPool { return trust.Pool(c.CA) }

// WebRoots is the system's pool plus the controller's CA: for downloads,
// which reach public HTTPS servers and other agents' HTTPS exports.
func (c *Credentials) WebRoots() *x509.CertPool { return trust.WebPool(c.CA) }

// PeerTLS is the TLS client of copies from other agents' HTTPS exports:
// the controller's CA, verified by address (their certificates carry the
// addresses they advertise), presenting this host's certificate (agents
// serve exports to enrolled peers only).
func (c *Credentials) PeerTLS() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: c.Roots(), GetClientCertificate: c.KeyPair.GetClientCertificate}
}

// NBDServerTLS is the NBD server's TLS: the agent's certificate; a client
// certificate is checked when one is given (qemu on a hypervisor host may
// have none: the export's name is its ticket).
func (c *Credentials) NBDServerTLS() *tls.Config {
	cfg := trust.ServerConfig(c.KeyPair, c.Roots(), tls.VerifyClientCertIfGiven, nil)
	cfg.NextProtos = nil
	return cfg
}

// WebTLS is the TLS client of downloads from operator URLs: the system's
// roots plus the controller's CA, no certificate.
func (c *Credentials) WebTLS() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: c.WebRoots()}
}

// ClientTLS is a TLS client presenting the agent's certificate to a peer
// whose certificate names want.
func (c *Credentials) ClientTLS(want trust.Identity) *tls.Config {
	return trust.ClientConfig(c.KeyPair, c.Roots(), trust.Is(want))
}

// HTTPClient is an HTTP/2-capable client presenting the agent's
// certificate to the controller.
func (c *Credentials) HTTPClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		TLSClientConfig:   c.ClientTLS(trust.Controller),
		ForceAttemptHTTP2: true,
		IdleConnTimeout:   90 * time.Second,
	}}
}

// EnrolConfig is how an agent gets its credentials.
type EnrolConfig struct {
	ControllerURL string
	HostID        string
	StateDir      string
	// JoinToken admits a first join (stowage host token create).
	JoinToken string
	// CAPin (sha256:<hex>, printed with the token) or CAFile (the CA
	// certificate) tells the agent which controller to trust on its first
	// contact, before it sends the token.
	CAPin  string
	CAFile string
	// Addresses go into the certificate's SANs: the hosts of the advertise
	// URL and the NBD address.
	Addresses []string
}

// Enrol returns the agent's stored credentials, or joins the controller
// with the join token to get them (retrying while the controller is
// unreachable, until ctx ends). A stored certificate for another host id,
// or an expired one without a token to join again, is an error: the
// operator decides.
func Enrol(ctx context.Context, cfg EnrolConfig, log *slog.Logger) (*Credentials, error) {
	dir := PKIDir(cfg.StateDir)
	kp, ca, err := trust.LoadKeyPair(dir)
	switch {
	case err == nil:
		id, err := trust.IdentityOf(kp.Leaf())
		if err != nil {
			return nil, fmt.Errorf("agent: stored certificate in %s: %w", dir, err)
		}
		if id != trust.HostIdentity(cfg.HostID) {
			return nil, fmt.Errorf("agent: %s holds a certificate for %s, not host %s; use that --host-id or another --state-dir: %w", dir, id, cfg.HostID, errdefs.ErrFailedPrecondition)
		}
		return &Credentials{KeyPair: kp, CA: ca, Dir: dir}, nil
	case errors.Is(err, trust.ErrNoKeyPair):
	default:
		if cfg.JoinToken == "" {
			return nil, fmt.Errorf("agent: %w; join again with --join-token", err)
		}
		log.Warn("stored certificate unusable; joining again with the join token", "err", err)
	}
	if cfg.JoinToken == "" {
		return nil, fmt.Errorf("agent: host %s is not enrolled: start it once with --join-token (from `stowage host token create`) and --ca-pin: %w", cfg.HostID, errdefs.ErrUnauthenticated)
	}
	first, learnt, err := firstContact(cfg)
	if err != nil {
		return nil, err
	}
	control, err := newControlClient(&http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: first}}, cfg.ControllerURL)
	if err != nil {
		return nil, err
	}
	key, err := trust.NewKey()
	if err != nil {
		return nil, err
	}
	csr, err := trust.NewCSR(key, trust.HostIdentity(cfg.HostID))
	if err != nil {
		return nil, err
	}
	backoff := 250 * time.Millisecond
	for {
		resp, err := control.Join(ctx, connect.NewRequest(&stowagev1.JoinRequest{
			Token: cfg.JoinToken, HostId: cfg.HostID, Csr: csr, Addresses: cfg.Addresses,
		}))
		if err == nil {
			kp, err := trust.NewKeyPair(key, resp.Msg.GetChain()...)
			if err != nil {
				return nil, fmt.Errorf("agent: join: %w", err)
			}
			ca := *learnt
			if ca == nil {
				return nil, fmt.Errorf("agent: join: the controller's CA was not verified: %w", errdefs.ErrUnauthenticated)
			}
			if err := kp.Store(dir, resp.Msg.GetCaPem()); err != nil {
				return nil, err
			}
			log.Info("joined the controller", "host", cfg.HostID, "expires", kp.Leaf().NotAfter, "ca", trust.PinOf(ca))
			return &Credentials{KeyPair: kp, CA: ca, Dir: dir}, nil
		}
		// A failed CA check (in the handshake) or a refused token is
		// final; an unreachable controller is retried.
		if trust.PeerError(err) {
			return nil, fmt.Errorf("agent: join: %w", err)
		}
		err = errconnect.FromConnect(err)
		if !errors.Is(err, errdefs.ErrUnavailable) || ctx.Err() != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		log.Warn("join failed; retrying", "err", err, "in", backoff)
		if !sleep(ctx, backoff) {
			return nil, ctx.Err()
		}
		backoff = min(backoff*2, 10*time.Second)
	}
}

// firstContact is the TLS configuration of the join call: the controller's
// chain must verify against --ca-file, or hold a CA with --ca-pin; learnt
// receives that CA.
func firstContact(cfg EnrolConfig) (*tls.Config, **x509.Certificate, error) {
	learnt := new(*x509.Certificate)
	switch {
	case cfg.CAFile != "":
		data, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, nil, fmt.Errorf("agent: --ca-file: %w", err)
		}
		ca, err := trust.ParseCertificate(data)
		if err != nil {
			return nil, nil, fmt.Errorf("agent: --ca-file: %w", err)
		}
		if cfg.CAPin != "" && trust.PinOf(ca) != cfg.CAPin {
			return nil, nil, fmt.Errorf("agent: --ca-file's pin is %s, not --ca-pin %s: %w", trust.PinOf(ca), cfg.CAPin, errdefs.ErrInvalid)
		}
		*learnt = ca
		return trust.ClientConfig(nil, trust.Pool(ca), trust.Is(trust.Controller)), learnt, nil
	case cfg.CAPin != "":
		return trust.PinnedClientConfig(cfg.CAPin, learnt), learnt, nil
	}
	return nil, nil, fmt.Errorf("agent: joining needs --ca-pin (printed by `stowage host token create`) or --ca-file, so the token goes to the real controller only: %w", errdefs.ErrInvalid)
}

// Renew keeps the credentials valid while ctx lives (trust.Renew through
// the controller's AgentControlService.Renew).
func (c *Credentials) Renew(ctx context.Context, control stowagev1connect.AgentControlServiceClient, hostID string, addresses func() []string, log *slog.Logger) {
	trust.Renew(ctx, c.KeyPair, trust.HostIdentity(hostID), c.Dir, func(ctx context.Context, csr []byte) ([][]byte, []byte, error) {
		resp, err := control.Renew(ctx, connect.NewRequest(&stowagev1.RenewRequest{Csr: csr, Addresses: addresses()}))
		if err != nil {
			return nil, nil, errconnect.FromConnect(err)
		}
		return resp.Msg.GetChain(), resp.Msg.GetCaPem(), nil
	}, 10*time.Second, log)
}

// AddressesOf are the hosts of the given URLs and host:port pairs (for
// certificate SANs), without duplicates or empties.
func AddressesOf(urlsOrHostPorts ...string) []string {
	var out []string
	seen := map[string]bool{}
	for _, s := range urlsOrHostPorts {
		h := s
		if u, err := url.Parse(s); err == nil && u.Host != "" {
			h = u.Hostname()
		} else if host, _, err := net.SplitHostPort(s); err == nil {
			h = host
		}
		if h != "" && !seen[h] {
			seen[h] = true
			out = append(out, h)
		}
	}
	return out
}

// controllerOnly refuses AgentService (and reflection) calls that do not
// come with the controller's certificate, unary and streaming alike.
func controllerOnly(log *slog.Logger) connect.Interceptor { return controllerGate{log} }

type controllerGate struct{ log *slog.Logger }

var _ connect.Interceptor = controllerGate{}

func (g controllerGate) check(ctx context.Context, procedure, addr string) error {
	peer, ok := trust.PeerFrom(ctx)
	switch {
	case !ok:
		g.log.Warn("agent call refused: no client certificate", "procedure", procedure, "peer", addr)
		return fmt.Errorf("%s: only the controller may call the agent, with its certificate: %w", procedure, errdefs.ErrUnauthenticated)
	case !peer.IsController():
		g.log.Warn("agent call refused: not the controller", "procedure", procedure, "peer", addr, "identity", peer.String())
		return fmt.Errorf("%s: the caller is %s; only the controller may call the agent: %w", procedure, peer, errdefs.ErrPermissionDenied)
	}
	return nil
}

func (g controllerGate) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if err := g.check(ctx, req.Spec().Procedure, req.Peer().Addr); err != nil {
			return nil, err
		}
		return next(ctx, req)
	}
}

func (g controllerGate) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (g controllerGate) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		if err := g.check(ctx, conn.Spec().Procedure, conn.Peer().Addr); err != nil {
			return err
		}
		return next(ctx, conn)
	}
}

// DefaultAddresses are the addresses an agent configured with cfg serves
// under, before it listens: its advertise URL's host, or its listen
// address's (this host's outbound address and loopback when it listens on
// all interfaces), and its NBD address's.
func DefaultAddresses(cfg Config) []string {
	var in []string
	if cfg.AdvertiseURL != "" {
		in = append(in, cfg.AdvertiseURL)
	} else if host, _, err := net.SplitHostPort(cfg.Listen); err == nil {
		if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
			if out, err := outboundIP(); err == nil {
				in = append(in, out)
			}
			in = append(in, "127.0.0.1")
		} else {
			in = append(in, host)
		}
	}
	if cfg.NBDAddress != "" {
		in = append(in, cfg.NBDAddress)
	}
	return AddressesOf(in...)
}

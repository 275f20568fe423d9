// Package enrol admits agents: it makes one-time join tokens, signs the
// certificate an agent joins with (bound to one host id), renews it, and
// checks that an agent's calls come from the host its certificate names.
//
// A join token admits a new host id, or, when the operator bound it to a
// host id (`stowage host token create --host ID`), that host id whether it
// exists or not (re-enrolment of a host that lost its certificate). A
// token is used once: it is deleted in the transaction that accepts it.
// The controller stores only the SHA-256 of a token's secret.
package enrol

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/controller/hosts"
	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/trust"
)

// Service enrols agents with the controller's CA.
type Service struct {
	db      *meta.DB
	ca      *trust.CA
	certTTL time.Duration
	log     *slog.Logger
	now     func() time.Time
}

// DefaultTokenTTL is how long a join token admits a join when no TTL is asked.
const DefaultTokenTTL = time.Hour

// MaxTokenTTL bounds a join token's life.
const MaxTokenTTL = 7 * 24 * time.Hour

// New returns the enrolment service; certTTL is the validity of host
// certificates (trust.DefaultTTL when zero).
func New(db *meta.DB, ca *trust.CA, certTTL time.Duration, log *slog.Logger) *Service {
	return &Service{db: db, ca: ca, certTTL: certTTL, log: log, now: time.Now}
}

// CreateToken makes a join token valid for ttl (DefaultTokenTTL when
// zero), bound to hostID when that is not empty. The token is returned
// once and never stored.
func (s *Service) CreateToken(ctx context.Context, ttl time.Duration, hostID string) (*stowagev1.CreateJoinTokenResponse, error) {
	if ttl == 0 {
		ttl = DefaultTokenTTL
	}
	if ttl < 0 || ttl > MaxTokenTTL {
		return nil, fmt.Errorf("join token: ttl %s is outside (0, %s]: %w", ttl, MaxTokenTTL, errdefs.ErrInvalid)
	}
	if hostID != "" {
		if err := hosts.ValidateID(hostID); err != nil {
			return nil, err
		}
	}
	tok, err := trust.NewJoinToken()
	if err != nil {
		return nil, err
	}
	expires := s.now().Add(ttl)
	err = s.db.Txn(ctx, func(tx *meta.Tx) error {
		_, err := meta.JoinTokens.CreateTx(tx, &stowagev1.JoinToken{
			Id: tok.ID, SecretSha256: tok.Hash(), HostId: hostID, ExpiresAt: timestamppb.New(expires),
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("join token: %w", err)
	}
	s.log.Info("join token created", "token_id", tok.ID, "host", hostID, "expires", expires)
	return &stowagev1.CreateJoinTokenResponse{Token: tok.String(), ExpiresAt: timestamppb.New(expires), CaPin: s.ca.Pin()}, nil
}

// Join admits the agent of req.HostId if its token is valid, and signs its
// certificate request. Every refusal is unauthenticated (bad token) or
// permission_denied (the token does not admit this host id) and names
// neither the token nor its secret.
func (s *Service) Join(ctx context.Context, req *stowagev1.JoinRequest, peer string) (*stowagev1.JoinResponse, error) {
	host := req.GetHostId()
	if err := hosts.ValidateID(host); err != nil {
		return nil, err
	}
	tok, err := trust.ParseJoinToken(req.GetToken())
	if err != nil {
		s.log.Warn("join refused", "host", host, "peer", peer, "reason", "malformed token")
		return nil, fmt.Errorf("join as host %s: %w", host, err)
	}
	ips, names := splitAddresses(req.GetAddresses())
	var chain []byte
	err = s.db.Txn(ctx, func(tx *meta.Tx) error {
		rec, err := meta.JoinTokens.GetTx(tx, tok.ID)
		if errdefs.IsNotFound(err) || (err == nil && !tok.Matches(rec.GetSecretSha256())) {
			return fmt.Errorf("join as host %s: the join token is unknown or already used: %w", host, errdefs.ErrUnauthenticated)
		}
		if err != nil {
			return err
		}
		if !s.now().Before(rec.GetExpiresAt().AsTime()) {
			return fmt.Errorf("join as host %s: the join token expired at %s: %w", host, rec.GetExpiresAt().AsTime().Format(time.RFC3339), errdefs.ErrUnauthenticated)
		}
		switch bound := rec.GetHostId(); {
		case bound != "" && bound != host:
			return fmt.Errorf("join as host %s: the join token admits host %s only: %w", host, bound, errdefs.ErrPermissionDenied)
		case bound == "":
			if _, err := meta.Hosts.GetTx(tx, host); err == nil {
				return fmt.Errorf("join as host %s: a host with this id is enrolled already; re-enrol it with a token made for it (stowage host token create --host %s): %w", host, host, errdefs.ErrPermissionDenied)
			} else if !errdefs.IsNotFound(err) {
				return err
			}
		}
		chain, err = s.ca.IssueCSR(req.GetCsr(), trust.Request{Identity: trust.HostIdentity(host), IPs: ips, DNSNames: names, TTL: s.certTTL})
		if err != nil {
			return err
		}
		return meta.JoinTokens.DeleteTx(tx, tok.ID, rec.GetRevision())
	})
	if err != nil {
		s.log.Warn("join refused", "host", host, "peer", peer, "token_id", tok.ID, "err", err)
		return nil, err
	}
	s.log.Info("host joined", "host", host, "peer", peer, "token_id", tok.ID)
	return &stowagev1.JoinResponse{Chain: [][]byte{chain, s.ca.Certificate().Raw}, CaPem: s.ca.PEM()}, nil
}

// Renew signs a new certificate for the host the caller's certificate
// names (peer, from the TLS handshake).
func (s *Service) Renew(ctx context.Context, req *stowagev1.RenewRequest, peer trust.Identity) (*stowagev1.RenewResponse, error) {
	if peer.IsController() {
		return nil, fmt.Errorf("renew: only hosts renew here: %w", errdefs.ErrPermissionDenied)
	}
	ips, names := splitAddresses(req.GetAddresses())
	der, err := s.ca.IssueCSR(req.GetCsr(), trust.Request{Identity: peer, IPs: ips, DNSNames: names, TTL: s.certTTL})
	if err != nil {
		return nil, fmt.Errorf("renew host %s: %w", peer.Host, err)
	}
	s.log.Info("host certificate renewed", "host", peer.Host)
	return &stowagev1.RenewResponse{Chain: [][]byte{der, s.ca.Certificate().Raw}, CaPem: s.ca.PEM()}, nil
}

// Authorize checks that a call about host comes from that host's
// certificate (peer; ok false when the client presented none).
func Authorize(host string, peer trust.Identity, ok bool) error {
	if !ok {
		return fmt.Errorf("host %s: agents must call with the certificate they joined with (stowage agent --join-token): %w", host, errdefs.ErrUnauthenticated)
	}
	if peer.IsController() || peer.Host != host {
		return fmt.Errorf("the caller's certificate names %s, not host %s: %w", peer, host, errdefs.ErrPermissionDenied)
	}
	return nil
}

// maxAddresses bounds the SANs one certificate carries.
const maxAddresses = 16

func splitAddresses(addrs []string) (ips []net.IP, names []string) {
	for i, a := range addrs {
		if i == maxAddresses {
			break
		}
		if ip := net.ParseIP(a); ip != nil {
			ips = append(ips, ip)
		} else if a != "" && len(a) <= 253 {
			names = append(names, a)
		}
	}
	return ips, names
}

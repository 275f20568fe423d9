package trust

import (
	"context"
	"crypto"
	"log/slog"
	"time"
)

// IssueFunc asks the CA for a certificate for a CSR; it returns the chain
// (DER, leaf first) and the CA certificate (PEM).
type IssueFunc func(ctx context.Context, csr []byte) (chain [][]byte, caPEM []byte, err error)

// Renew keeps kp valid: at two thirds of its certificate's life it makes a
// new key, has issue sign it, stores the pair in dir (when dir is not
// empty) and swaps it in, so running TLS configurations present it from
// the next handshake on. It retries failures every retry (at most) until
// ctx ends.
func Renew(ctx context.Context, kp *KeyPair, id Identity, dir string, issue IssueFunc, retry time.Duration, log *slog.Logger) {
	for {
		wait := time.Until(kp.RenewAt())
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
		if err := renewOnce(ctx, kp, id, dir, issue); err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Warn("certificate renewal failed; retrying", "identity", id.String(), "expires", kp.Leaf().NotAfter, "err", err, "in", retry)
			select {
			case <-ctx.Done():
				return
			case <-time.After(retry):
			}
			continue
		}
		log.Info("certificate renewed", "identity", id.String(), "expires", kp.Leaf().NotAfter)
	}
}

func renewOnce(ctx context.Context, kp *KeyPair, id Identity, dir string, issue IssueFunc) error {
	key, err := NewKey()
	if err != nil {
		return err
	}
	csr, err := NewCSR(key, id)
	if err != nil {
		return err
	}
	chain, caPEM, err := issue(ctx, csr)
	if err != nil {
		return err
	}
	next, err := NewKeyPair(key, chain...)
	if err != nil {
		return err
	}
	if dir != "" {
		if err := next.Store(dir, caPEM); err != nil {
			return err
		}
	}
	return kp.Set(key, chain...)
}

// SelfRenew is Renew for a holder of the CA itself (the controller): it
// issues its own certificates.
func SelfRenew(ca *CA, req Request) IssueFunc {
	return func(_ context.Context, csr []byte) ([][]byte, []byte, error) {
		der, err := ca.IssueCSR(csr, req)
		if err != nil {
			return nil, nil, err
		}
		return [][]byte{der, ca.cert.Raw}, ca.PEM(), nil
	}
}

// NewIssued makes a key and has ca issue a certificate for it as req: the
// controller's own pair at start.
func NewIssued(ca *CA, req Request) (*KeyPair, error) {
	key, err := NewKey()
	if err != nil {
		return nil, err
	}
	req.PublicKey = key.Public()
	der, err := ca.Issue(req)
	if err != nil {
		return nil, err
	}
	return NewKeyPair(crypto.Signer(key), der, ca.cert.Raw)
}

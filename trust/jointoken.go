package trust

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/stowage/stowage/errdefs"
)

// JoinToken is a one-time secret that admits one agent: stj_<id>.<secret>.
// The controller keeps the id and the secret's SHA-256 only.
type JoinToken struct {
	ID     string
	Secret string
}

const joinPrefix = "stj_"

// NewJoinToken makes a token: an 8-byte id and a 32-byte secret, hex.
func NewJoinToken() (JoinToken, error) {
	id, secret := make([]byte, 8), make([]byte, 32)
	if _, err := rand.Read(id); err != nil {
		return JoinToken{}, fmt.Errorf("trust: join token: %w", err)
	}
	if _, err := rand.Read(secret); err != nil {
		return JoinToken{}, fmt.Errorf("trust: join token: %w", err)
	}
	return JoinToken{ID: hex.EncodeToString(id), Secret: hex.EncodeToString(secret)}, nil
}

// String is the token as an operator passes it to `stowage agent --join-token`.
func (t JoinToken) String() string { return joinPrefix + t.ID + "." + t.Secret }

// ParseJoinToken parses stj_<id>.<secret>; the error never contains the token.
func ParseJoinToken(s string) (JoinToken, error) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(s), joinPrefix)
	id, secret, ok2 := strings.Cut(rest, ".")
	if !ok || !ok2 || len(id) != 16 || len(secret) != 64 || !isHex(id) || !isHex(secret) {
		return JoinToken{}, fmt.Errorf("a join token has the form stj_<16 hex>.<64 hex>: %w", errdefs.ErrUnauthenticated)
	}
	return JoinToken{ID: id, Secret: secret}, nil
}

// Hash is what the controller stores for the token's secret.
func (t JoinToken) Hash() string {
	sum := sha256.Sum256([]byte(t.Secret))
	return hex.EncodeToString(sum[:])
}

// Matches says whether the token's secret hashes to hash (constant time).
func (t JoinToken) Matches(hash string) bool {
	return subtle.ConstantTimeCompare([]byte(t.Hash()), []byte(hash)) == 1
}

func isHex(s string) bool {
	_, err := hex.DecodeString(s)
	return err == nil
}

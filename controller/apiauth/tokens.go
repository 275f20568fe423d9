package apiauth

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

const (
	tokenPrefix = "stw_"
	idBytes     = 6  // 12 hex digits
	secretBytes = 32 // 256 bits
	// BootstrapName is the name of the admin token Bootstrap creates.
	BootstrapName = "bootstrap-admin"
	// maxNameLen bounds a token's name (it appears in logs and job records).
	maxNameLen = 64
)

// Tokens keeps the API tokens in the metadata database. It implements
// Authenticator for the Guard and the TokenService of controller/api.
type Tokens struct {
	db  *meta.DB
	now func() time.Time
}

// TokensOption configures NewTokens.
type TokensOption func(*Tokens)

// WithClock sets the clock that decides expiry (tests).
func WithClock(now func() time.Time) TokensOption {
	return func(t *Tokens) {
		if now != nil {
			t.now = now
		}
	}
}

// NewTokens returns the token store over db.
func NewTokens(db *meta.DB, opts ...TokensOption) *Tokens {
	t := &Tokens{db: db, now: time.Now}
	for _, o := range opts {
		o(t)
	}
	return t
}

var _ Authenticator = (*Tokens)(nil)

// Create makes a token and returns it with its bearer form, which is never
// shown again. An unspecified role or an empty name is errdefs.ErrInvalid;
// ttl <= 0 means the token does not expire.
func (t *Tokens) Create(ctx context.Context, req *stowagev1.CreateTokenRequest) (*stowagev1.CreateTokenResponse, error) {
	role := RoleFromProto(req.GetRole())
	if role == RoleNone {
		return nil, fmt.Errorf("create token: role %v: want admin, operator or reader: %w", req.GetRole(), errdefs.ErrInvalid)
	}
	ttl := req.GetTtl().AsDuration()
	if req.GetTtl() != nil {
		if err := req.GetTtl().CheckValid(); err != nil {
			return nil, fmt.Errorf("create token: ttl: %v: %w", err, errdefs.ErrInvalid)
		}
		if ttl < 0 {
			return nil, fmt.Errorf("create token: negative ttl %s: %w", ttl, errdefs.ErrInvalid)
		}
	}
	rec, bearer, err := t.create(ctx, req.GetName(), role, ttl)
	if err != nil {
		return nil, err
	}
	return &stowagev1.CreateTokenResponse{Token: view(rec), Secret: bearer}, nil
}

// create stores a new token and returns its record and bearer form.
func (t *Tokens) create(ctx context.Context, name string, role Role, ttl time.Duration) (*stowagev1.TokenRecord, string, error) {
	rec, bearer, err := t.newToken(name, role, ttl)
	if err != nil {
		return nil, "", err
	}
	stored, err := t.db.Tokens().Create(ctx, rec)
	if err != nil {
		return nil, "", fmt.Errorf("create token %q: %w", name, err)
	}
	return stored, bearer, nil
}

// newToken makes a token record and its bearer form, without storing it.
func (t *Tokens) newToken(name string, role Role, ttl time.Duration) (*stowagev1.TokenRecord, string, error) {
	if err := checkName(name); err != nil {
		return nil, "", err
	}
	idb := make([]byte, idBytes)
	secret := make([]byte, secretBytes)
	_, _ = rand.Read(idb) // crypto/rand.Read never fails
	_, _ = rand.Read(secret)
	id := hex.EncodeToString(idb)
	enc := base64.RawURLEncoding.EncodeToString(secret)
	sum := sha256.Sum256([]byte(enc))
	now := t.now()
	rec := &stowagev1.TokenRecord{
		Id: id, Name: name, Role: role.Proto(), SecretSha256: sum[:],
		CreatedAt: timestamppb.New(now),
	}
	if ttl > 0 {
		rec.ExpiresAt = timestamppb.New(now.Add(ttl))
	}
	return rec, tokenPrefix + id + "." + enc, nil
}

func checkName(name string) error {
	if name == "" || len(name) > maxNameLen || !utf8.ValidString(name) {
		return fmt.Errorf("token name %q: want 1-%d characters: %w", name, maxNameLen, errdefs.ErrInvalid)
	}
	for _, r := range name {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("token name %q: no control characters: %w", name, errdefs.ErrInvalid)
		}
	}
	return nil
}

// List returns every token, revoked and expired ones too, oldest first;
// never secrets or hashes.
func (t *Tokens) List(ctx context.Context) ([]*stowagev1.Token, error) {
	recs, err := t.db.Tokens().List(ctx, meta.Filter[*stowagev1.TokenRecord]{})
	if err != nil {
		return nil, fmt.Errorf("list tokens: %w", err)
	}
	out := make([]*stowagev1.Token, 0, len(recs))
	for _, r := range recs {
		out = append(out, view(r))
	}
	return out, nil
}

// Revoke makes the token unusable from the next call on; revoking a
// revoked token succeeds. An unknown id is errdefs.ErrNotFound.
func (t *Tokens) Revoke(ctx context.Context, id string) (*stowagev1.Token, error) {
	// Accept the whole bearer form too, and never echo its secret.
	id, _, _ = strings.Cut(strings.TrimPrefix(id, tokenPrefix), ".")
	rec, err := t.db.Tokens().Update(ctx, id, 0, func(r *stowagev1.TokenRecord) error {
		if !r.GetRevoked() {
			r.Revoked, r.RevokedAt = true, timestamppb.New(t.now())
		}
		return nil
	})
	if errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("token %q: no such token; see `stowage token list`: %w", id, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("revoke token %s: %w", id, err)
	}
	return view(rec), nil
}

// Authenticate checks a bearer token ("stw_<id>.<secret>") and returns its
// caller. A malformed, unknown, wrong, expired or revoked token is
// errdefs.ErrUnauthenticated; the error names the token id when the token
// parsed, never the secret. A token that parsed yields its Caller (id and
// name) even with an error, for the log.
func (t *Tokens) Authenticate(ctx context.Context, bearer string) (Caller, error) {
	id, secret, ok := parseBearer(bearer)
	if !ok {
		return Caller{}, fmt.Errorf("malformed token: want stw_<id>.<secret>: %w", errdefs.ErrUnauthenticated)
	}
	rec, err := t.db.Tokens().Get(ctx, id)
	if errdefs.IsNotFound(err) {
		// The same words as a wrong secret: a client learns nothing about
		// which ids exist.
		return Caller{TokenID: id}, fmt.Errorf("token %s: unknown token or wrong secret: %w", id, errdefs.ErrUnauthenticated)
	}
	if err != nil {
		return Caller{TokenID: id}, fmt.Errorf("token %s: %w", id, err)
	}
	c := Caller{TokenID: id, Name: rec.GetName(), Role: RoleFromProto(rec.GetRole())}
	sum := sha256.Sum256([]byte(secret))
	if subtle.ConstantTimeCompare(sum[:], rec.GetSecretSha256()) != 1 {
		return c, fmt.Errorf("token %s: unknown token or wrong secret: %w", id, errdefs.ErrUnauthenticated)
	}
	if rec.GetRevoked() {
		return c, fmt.Errorf("token %s (%s) was revoked: %w", id, rec.GetName(), errdefs.ErrUnauthenticated)
	}
	if exp := rec.GetExpiresAt(); exp != nil && !t.now().Before(exp.AsTime()) {
		return c, fmt.Errorf("token %s (%s) expired at %s: %w", id, rec.GetName(), exp.AsTime().UTC().Format(time.RFC3339), errdefs.ErrUnauthenticated)
	}
	if c.Role == RoleNone {
		return c, fmt.Errorf("token %s (%s) has no role: %w", id, rec.GetName(), errdefs.ErrUnauthenticated)
	}
	return c, nil
}

// parseBearer splits "stw_<id>.<secret>".
func parseBearer(s string) (id, secret string, ok bool) {
	rest, ok := strings.CutPrefix(s, tokenPrefix)
	if !ok {
		return "", "", false
	}
	id, secret, ok = strings.Cut(rest, ".")
	if !ok || len(id) != 2*idBytes || len(secret) != base64.RawURLEncoding.EncodedLen(secretBytes) {
		return "", "", false
	}
	if _, err := hex.DecodeString(id); err != nil {
		return "", "", false
	}
	return id, secret, true
}

// usable reports whether rec can authenticate at now.
func usable(rec *stowagev1.TokenRecord, now time.Time) bool {
	exp := rec.GetExpiresAt()
	return !rec.GetRevoked() && (exp == nil || now.Before(exp.AsTime()))
}

// Bootstrap creates the first admin token: when no usable admin token
// exists it makes one named "bootstrap-admin" and writes its bearer form to
// path (mode 0600; a temporary file opened O_EXCL|O_NOFOLLOW, fsynced and
// renamed over path, then the directory fsynced). The file is written
// before the token is stored, so a crash leaves either no token (the next
// start makes a new one and replaces the file) or a token whose file is in
// place. When a usable admin token exists it does nothing: the file is
// never rewritten and the token never shown again.
func (t *Tokens) Bootstrap(ctx context.Context, path string) error {
	admins, err := t.db.Tokens().List(ctx, meta.Filter[*stowagev1.TokenRecord]{
		Index: meta.IndexRole, Value: meta.TokenRoleName(stowagev1.TokenRole_TOKEN_ROLE_ADMIN),
		Where: func(r *stowagev1.TokenRecord) bool { return usable(r, t.now()) },
		Limit: 1,
	})
	if err != nil {
		return fmt.Errorf("bootstrap admin token: %w", err)
	}
	if len(admins) > 0 {
		return nil
	}
	return t.writeAdmin(ctx, BootstrapName, path)
}

// ResetAdmin recovers from a lost admin token: it revokes every admin
// token and writes a new one, named name, to path as Bootstrap does. Run
// it with the controller stopped, on the controller's metadata directory.
func (t *Tokens) ResetAdmin(ctx context.Context, name, path string) error {
	admins, err := t.db.Tokens().ListBy(ctx, meta.IndexRole, meta.TokenRoleName(stowagev1.TokenRole_TOKEN_ROLE_ADMIN))
	if err != nil {
		return fmt.Errorf("reset admin tokens: %w", err)
	}
	for _, a := range admins {
		if _, err := t.Revoke(ctx, a.GetId()); err != nil {
			return fmt.Errorf("reset admin tokens: %w", err)
		}
	}
	return t.writeAdmin(ctx, name, path)
}

func (t *Tokens) writeAdmin(ctx context.Context, name, path string) error {
	rec, bearer, err := t.newToken(name, RoleAdmin, 0)
	if err != nil {
		return err
	}
	if err := durable.WriteFile(path, []byte(bearer+"\n"), 0o600); err != nil {
		return fmt.Errorf("write admin token file: %w", err)
	}
	if _, err := t.db.Tokens().Create(ctx, rec); err != nil {
		return fmt.Errorf("store admin token %s: %w", rec.GetId(), err)
	}
	return nil
}

// view is a token as the API shows it.
func view(r *stowagev1.TokenRecord) *stowagev1.Token {
	return &stowagev1.Token{
		Id: r.GetId(), Name: r.GetName(), Role: r.GetRole(),
		CreatedAt: r.GetCreatedAt(), ExpiresAt: r.GetExpiresAt(), Revoked: r.GetRevoked(),
	}
}

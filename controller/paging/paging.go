// Package paging turns the page_size and page_token of a list request into
// the bounds of one metadata scan, and the scan's result back into a page
// and the token of the next one.
//
// A token is opaque to clients: base64url of a version byte, eight bytes
// of a hash of the request's filters (every field but page_size and
// page_token) and the id of the last record of the previous page. Ids are
// the scan order, so a page starts strictly after that id: records added
// while a client pages through come after the ones it has seen (ids are
// time-ordered) and no record is seen twice or skipped. A token presented
// with other filters than the ones it was issued for is refused.
package paging

import (
	"crypto/sha256"
	"encoding/base64"
	"fmt"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/stowage/stowage/errdefs"
)

const (
	// DefaultSize is the page size when a request sets none.
	DefaultSize = 500
	// MaxSize caps page_size; larger requests are clamped to it.
	MaxSize = 1000

	tokenVersion = 1
	hashLen      = 8
)

// Page is where one page starts and how many records it holds.
type Page struct {
	// After is the id of the last record of the previous page ("" for the
	// first page).
	After string
	// Size is the number of records on the page (1..MaxSize).
	Size int
	key  [hashLen]byte
}

// Request is a list request with paging fields.
type Request interface {
	proto.Message
	GetPageSize() int32
	GetPageToken() string
}

// Parse reads req's page_size and page_token. A negative size or a token
// that is malformed or was issued for other filters fails with
// errdefs.ErrInvalid.
func Parse(req Request) (Page, error) {
	p := Page{Size: int(req.GetPageSize()), key: filterKey(req)}
	switch {
	case p.Size < 0:
		return Page{}, fmt.Errorf("page_size %d: want 0 (default %d) to %d: %w", p.Size, DefaultSize, MaxSize, errdefs.ErrInvalid)
	case p.Size == 0:
		p.Size = DefaultSize
	case p.Size > MaxSize:
		p.Size = MaxSize
	}
	tok := req.GetPageToken()
	if tok == "" {
		return p, nil
	}
	raw, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil || len(raw) <= 1+hashLen || raw[0] != tokenVersion {
		return Page{}, fmt.Errorf("page_token %q is not one this controller issued: %w", tok, errdefs.ErrInvalid)
	}
	if [hashLen]byte(raw[1:1+hashLen]) != p.key {
		return Page{}, fmt.Errorf("page_token was issued for other filters; start again without a token: %w", errdefs.ErrInvalid)
	}
	p.After = string(raw[1+hashLen:])
	return p, nil
}

// Limit is the number of records to ask the scan for: one more than the
// page, so that a full last page carries no token.
func (p Page) Limit() int { return p.Size + 1 }

// Cut trims recs (at most Limit of them, in scan order) to the page and
// returns the token of the next page, "" when recs was the last of them.
func Cut[T any](p Page, recs []T, id func(T) string) ([]T, string) {
	if len(recs) <= p.Size {
		return recs, ""
	}
	recs = recs[:p.Size]
	raw := make([]byte, 0, 1+hashLen+64)
	raw = append(raw, tokenVersion)
	raw = append(raw, p.key[:]...)
	raw = append(raw, id(recs[len(recs)-1])...)
	return recs, base64.RawURLEncoding.EncodeToString(raw)
}

// filterKey hashes every field of req but the paging fields.
func filterKey(req Request) [hashLen]byte {
	m := proto.Clone(req).ProtoReflect()
	fields := m.Descriptor().Fields()
	for _, name := range []protoreflect.Name{"page_size", "page_token"} {
		if fd := fields.ByName(name); fd != nil {
			m.Clear(fd)
		}
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m.Interface())
	if err != nil { // a well-formed request always marshals
		b = []byte(err.Error())
	}
	// The message name keeps a token of one list from another list's.
	h := sha256.Sum256(append([]byte(m.Descriptor().FullName()+"\x00"), b...))
	return [hashLen]byte(h[:hashLen])
}

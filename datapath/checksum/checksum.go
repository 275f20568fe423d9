// Package checksum reads the expected digests operators give for templates
// ("sha256:HEX", "sha512:HEX", "md5:HEX", CloudStack's "{SHA-256}HEX", or a
// bare HEX told apart by its length) and compares digests in constant
// time. A malformed checksum is errdefs.ErrInvalid, a mismatch
// errdefs.ErrDataLoss.
//
//	sum, err := checksum.Parse("sha256:9f86d0…")
//	h := checksum.New(sum.Algo)
//	io.Copy(h, r)
//	err = sum.Check(hex.EncodeToString(h.Sum(nil)))
package checksum

import (
	"crypto/md5"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"hash"
	"strings"

	"github.com/stowage/stowage/errdefs"
)

// Sum is an expected digest: Algo is "sha256", "sha512" or "md5" ("" for
// none), Hex its lower-case hex digits.
type Sum struct {
	Algo string
	Hex  string
}

// String renders s as algo:hex.
func (s Sum) String() string { return s.Algo + ":" + s.Hex }

// IsZero reports whether s asks for no check.
func (s Sum) IsZero() bool { return s.Algo == "" }

// sizes are the digest lengths of the algorithms.
var sizes = map[string]int{"md5": md5.Size, "sha256": sha256.Size, "sha512": sha512.Size}

// Parse reads a checksum; "" is the zero Sum (no check).
func Parse(s string) (Sum, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return Sum{}, nil
	}
	var algo, val string
	switch {
	case strings.HasPrefix(s, "{"):
		i := strings.IndexByte(s, '}')
		if i < 0 {
			return Sum{}, fmt.Errorf("checksum %q: unclosed {: %w", s, errdefs.ErrInvalid)
		}
		algo, val = s[1:i], s[i+1:]
	case strings.Contains(s, ":"):
		algo, val, _ = strings.Cut(s, ":")
	default:
		val = s
		for a, n := range sizes {
			if len(s) == 2*n {
				algo = a
			}
		}
	}
	algo = strings.ReplaceAll(strings.ToLower(algo), "-", "")
	val = strings.ToLower(val)
	want := sizes[algo]
	if want == 0 {
		return Sum{}, fmt.Errorf("checksum %q: want sha256:, sha512: or md5: and hex digits: %w", s, errdefs.ErrInvalid)
	}
	if b, err := hex.DecodeString(val); err != nil || len(b) != want {
		return Sum{}, fmt.Errorf("checksum %q: want %d hex digits for %s: %w", s, 2*want, algo, errdefs.ErrInvalid)
	}
	return Sum{Algo: algo, Hex: val}, nil
}

// New returns a hash of algo (sha256 for any other).
func New(algo string) hash.Hash {
	switch algo {
	case "sha512":
		return sha512.New()
	case "md5":
		return md5.New()
	}
	return sha256.New()
}

// Check compares got (hex) with s in constant time: errdefs.ErrDataLoss
// naming both when they differ.
func (s Sum) Check(got string) error {
	if subtle.ConstantTimeCompare([]byte(got), []byte(s.Hex)) != 1 {
		return fmt.Errorf("checksum mismatch: got %s:%s, expected %s: %w", s.Algo, got, s, errdefs.ErrDataLoss)
	}
	return nil
}

package hostfs

import (
	"context"
	"crypto/md5"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/stowage/stowage/errdefs"
)

// checksum is an expected digest of a download.
type checksum struct {
	algo string // "sha256", "sha512", "md5"; "" for none
	hex  string
}

func (c checksum) String() string { return c.algo + ":" + c.hex }

// parseChecksum reads "sha256:HEX", "sha512:HEX", "md5:HEX", CloudStack's
// "{SHA-256}HEX" and a bare HEX (md5, sha256 or sha512 by its length).
func parseChecksum(s string) (checksum, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return checksum{}, nil
	}
	var algo, val string
	switch {
	case strings.HasPrefix(s, "{"):
		i := strings.IndexByte(s, '}')
		if i < 0 {
			return checksum{}, fmt.Errorf("checksum %q: unclosed {: %w", s, errdefs.ErrInvalid)
		}
		algo, val = s[1:i], s[i+1:]
	case strings.Contains(s, ":"):
		algo, val, _ = strings.Cut(s, ":")
	default:
		val = s
		switch len(s) {
		case 2 * md5.Size:
			algo = "md5"
		case 2 * sha256.Size:
			algo = "sha256"
		case 2 * sha512.Size:
			algo = "sha512"
		}
	}
	algo = strings.ReplaceAll(strings.ToLower(algo), "-", "")
	val = strings.ToLower(val)
	want := map[string]int{"md5": md5.Size, "sha256": sha256.Size, "sha512": sha512.Size}[algo]
	if want == 0 {
		return checksum{}, fmt.Errorf("checksum %q: want sha256:, sha512: or md5: and hex digits: %w", s, errdefs.ErrInvalid)
	}
	if b, err := hex.DecodeString(val); err != nil || len(b) != want {
		return checksum{}, fmt.Errorf("checksum %q: want %d hex digits for %s: %w", s, 2*want, algo, errdefs.ErrInvalid)
	}
	return checksum{algo: algo, hex: val}, nil
}

func newHash(algo string) hash.Hash {
	switch algo {
	case "sha512":
		return sha512.New()
	case "md5":
		return md5.New()
	}
	return sha256.New()
}

// hashFile computes the algo digest of the file at p.
func hashFile(ctx context.Context, p, algo string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", classed(err)
	}
	defer f.Close()
	_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_SEQUENTIAL)
	h := newHash(algo)
	buf := make([]byte, 1<<20)
	for {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n, err := f.Read(buf)
		h.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", classed(err)
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// verifyChecksum checks the file at p against sum (ErrDataLoss on mismatch).
func verifyChecksum(ctx context.Context, p string, sum checksum) error {
	got, err := hashFile(ctx, p, sum.algo)
	if err != nil {
		return err
	}
	if subtle.ConstantTimeCompare([]byte(got), []byte(sum.hex)) != 1 {
		return fmt.Errorf("checksum mismatch: got %s:%s, expected %s: %w", sum.algo, got, sum, errdefs.ErrDataLoss)
	}
	return nil
}

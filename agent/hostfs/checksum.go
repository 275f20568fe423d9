package hostfs

import (
	"context"
	"encoding/hex"
	"io"
	"os"

	"github.com/stowage/stowage/datapath/checksum"
	"golang.org/x/sys/unix"
)

// hashFile computes the algo digest of the file at p.
func hashFile(ctx context.Context, p, algo string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", classed(err)
	}
	defer f.Close()
	_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_SEQUENTIAL)
	h := checksum.New(algo)
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
func verifyChecksum(ctx context.Context, p string, sum checksum.Sum) error {
	got, err := hashFile(ctx, p, sum.Algo)
	if err != nil {
		return err
	}
	return sum.Check(got)
}

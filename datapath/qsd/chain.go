package qsd

import (
	"context"
	"fmt"

	"github.com/stowage/stowage/datapath/qemuimg"
	"github.com/stowage/stowage/errdefs"
)

// maxChain bounds the backing chain walked by CheckChain.
const maxChain = 64

// CheckChain walks the backing chain of file (declared format) with
// qemu-img info, each layer opened as the format its child records, and
// refuses what would make qemu probe or reach outside the chain: a backing
// file recorded without its format (qemu would probe it from its
// contents), an external data file, a corrupt image, a chain longer than
// 64. It returns the chain, top first. Start runs it before a qcow2 export.
func CheckChain(ctx context.Context, file, format string) ([]string, error) {
	qi := qemuimg.New()
	var chain []string
	for path, fmtName := file, format; path != ""; {
		if len(chain) == maxChain {
			return nil, fmt.Errorf("qsd: %s: backing chain longer than %d: %w", file, maxChain, errdefs.ErrInvalid)
		}
		info, err := qi.Info(ctx, path, qemuimg.AssumeFormat(fmtName), qemuimg.ForceShare())
		if err != nil {
			return nil, fmt.Errorf("qsd: chain of %s: %w", file, err)
		}
		chain = append(chain, path)
		switch {
		case info.Corrupt:
			return nil, fmt.Errorf("qsd: %s is marked corrupt: %w", path, errdefs.ErrDataLoss)
		case info.DataFile != "":
			return nil, fmt.Errorf("qsd: %s has an external data file %s: %w", path, info.DataFile, errdefs.ErrInvalid)
		case info.BackingFilename != "" && info.BackingFormat == "":
			return nil, fmt.Errorf("qsd: %s names backing file %s without its format (it would be probed): %w", path, info.BackingFilename, errdefs.ErrInvalid)
		}
		path, fmtName = info.FullBackingFilename, info.BackingFormat
		if path == "" {
			path = info.BackingFilename
		}
	}
	return chain, nil
}

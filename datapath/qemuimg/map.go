package qemuimg

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/stowage/stowage/errdefs"
)

// MapEntry is one range of `qemu-img map --output=json`: Data is false for
// ranges that read as zeros without stored data, Zero is true for ranges
// known to read as zeros, Depth is the backing-chain level that holds them.
type MapEntry struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset,omitempty"`
}

// Hole reports whether the range reads as zeros and holds no data.
func (e MapEntry) Hole() bool { return e.Zero || !e.Data }

// Map lists the allocation of the image at path (format "" probes it).
func (t *Tool) Map(ctx context.Context, path, format string) ([]MapEntry, error) {
	if path == "" {
		return nil, fmt.Errorf("qemu-img map: empty path: %w", errdefs.ErrInvalid)
	}
	args := []string{"map", "--output=json"}
	if format != "" {
		args = append(args, "-f", format)
	}
	args = append(args, fileArg(path))
	out, err := t.run(ctx, "map", path, args...)
	if err != nil {
		return nil, err
	}
	var m []MapEntry
	if err := json.Unmarshal(out, &m); err != nil {
		return nil, fmt.Errorf("qemu-img map %s: unexpected output: %v: %w", path, err, errdefs.ErrInternal)
	}
	return m, nil
}

// DataBytes sums the lengths of the entries that hold data.
func DataBytes(m []MapEntry) int64 {
	var n int64
	for _, e := range m {
		if !e.Hole() {
			n += e.Length
		}
	}
	return n
}
